/**
 * Errors the NBD client raises: request failures (a DeviceError carrying the
 * NBD error value), handshake failures, and protocol violations by the server.
 */
import * as C from '../protocol/constants.js';
import { DeviceError } from '../storage/device.js';
import { errorCode, NbdMigrateError } from '../util/errors.js';

/**
 * What a failed request to a server means, in one place: the copy engine, the
 * mirror job and the post-cutover forwarding device all decide by it.
 * - connection: the connection is gone (or timed out); reconnect and go on;
 * - permanent: the server refused in a way that will not pass (no space, read-only,
 *   a request it calls invalid): fail fast with the reason;
 * - transient: the server answered an error that may pass (EIO): retry the request.
 */
export type TargetErrorKind = 'connection' | 'permanent' | 'transient';

/** Errors that mean "the connection is gone", not "the server said no". */
export const CONNECTION_LOST: ReadonlySet<string> = new Set(['ECONNRESET', 'EPIPE', 'ESHUTDOWN', 'ECONNREFUSED', 'ETIMEDOUT', 'EUNREACHABLE']);
/** Errors that retrying will not cure. */
export const PERMANENT: ReadonlySet<string> = new Set(['ENOSPC', 'EPERM', 'EROFS', 'EDQUOT', 'EFBIG', 'EINVAL', 'EOVERFLOW', 'ENOTSUP']);

/** The connection is gone (reset, closed, timed out, unreachable): reconnecting may cure it. */
export function isConnectionLost(e: unknown): boolean {
  const code = errorCode(e);
  return code !== undefined && CONNECTION_LOST.has(code);
}

/** The server refused in a way retrying will not cure (by code, or an error marked `permanent`). */
export function isPermanent(e: unknown): boolean {
  if (isConnectionLost(e)) return false;
  const code = errorCode(e);
  return (code !== undefined && PERMANENT.has(code)) || (e as { permanent?: unknown } | null | undefined)?.permanent === true;
}

export function targetErrorKind(e: unknown): TargetErrorKind {
  if (isConnectionLost(e)) return 'connection';
  if (isPermanent(e)) return 'permanent';
  return 'transient';
}

/** POSIX errno name for an NBD error value; values the spec does not define become EIO. */
export function errnoNameForNbd(nbdErrno: number): string {
  return C.NBD_ERROR_NAMES[nbdErrno] ?? 'EIO';
}

/**
 * A request the server answered with an error. `code` is the errno name (the
 * Device contract), `nbdErrno` the value on the wire, `serverMessage` the text
 * of a structured error chunk (absent for simple replies).
 */
export class NbdRequestError extends DeviceError {
  constructor(
    readonly nbdErrno: number,
    readonly command: string,
    readonly serverMessage: string | undefined,
    message: string,
  ) {
    super(errnoNameForNbd(nbdErrno), message);
  }
}

/**
 * Negotiation failed: the server refused an option, closed the connection, or is not a usable NBD server.
 * Code EHANDSHAKE: neither "connection lost" nor "permanent" (see targetErrorKind); what went wrong is in the message and details.
 */
export class NbdHandshakeError extends NbdMigrateError {
  override readonly name: string = 'NbdHandshakeError';
  constructor(
    message: string,
    readonly details: {
      /** The option that was refused, if any. */
      option?: number;
      /** The NBD_REP_ERR_* value the server replied with, if any. */
      reply?: number;
      /** The server's error string, if it sent one. */
      serverMessage?: string;
      cause?: unknown;
    } = {},
  ) {
    super('EHANDSHAKE', message, details.cause === undefined ? undefined : { cause: details.cause });
  }
}

/** The server broke the protocol in the transmission phase: the connection is dropped (its requests fail with ECONNRESET). */
export class NbdProtocolError extends NbdMigrateError {
  override readonly name: string = 'NbdProtocolError';
  constructor(message: string, options?: { cause?: unknown }) {
    super('EPROTO', message, options);
  }
}

const OPTION_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [C.NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [C.NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [C.NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [C.NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [C.NBD_OPT_GO]: 'NBD_OPT_GO',
  [C.NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [C.NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [C.NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
};

export function optionName(option: number): string {
  return OPTION_NAMES[option] ?? `option ${option}`;
}

const REPLY_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_REP_ACK]: 'NBD_REP_ACK',
  [C.NBD_REP_SERVER]: 'NBD_REP_SERVER',
  [C.NBD_REP_INFO]: 'NBD_REP_INFO',
  [C.NBD_REP_META_CONTEXT]: 'NBD_REP_META_CONTEXT',
  [C.NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [C.NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [C.NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [C.NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [C.NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [C.NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [C.NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [C.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [C.NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};

export function replyName(type: number): string {
  return REPLY_NAMES[type >>> 0] ?? `reply type 0x${(type >>> 0).toString(16)}`;
}
