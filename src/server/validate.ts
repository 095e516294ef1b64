/**
 * The one check of a transmission request before it runs (nbdkit's
 * validate_request in server/protocol.c plays the same part). Pure: the
 * request header and what was negotiated in, a refusal or undefined out.
 * The error values follow proto.md "Error values"; the order of the rules
 * decides which error a request breaking several of them gets.
 */
import * as C from '../protocol/constants.js';
import type { RequestHeader } from '../protocol/codec.js';

/** Flags each command accepts (before negotiation-dependent checks). */
const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [C.NBD_CMD_READ]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_DF,
  [C.NBD_CMD_WRITE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_DISC]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_FLUSH]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_TRIM]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_CACHE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_WRITE_ZEROES]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO,
  [C.NBD_CMD_BLOCK_STATUS]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_REQ_ONE,
};

/** Why a request is not run: the NBD error value to answer and the cause to log and send. */
export interface Refusal {
  error: number;
  message: string;
}

/** What a connection negotiated and the export it is attached to, as the rules need them. */
export interface RequestContext {
  /** The transmission flags this connection was given. */
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly exportName: string;
  readonly readOnly: boolean;
  /** The export's size in bytes. */
  readonly size: number;
  /** How many metadata contexts were negotiated. */
  readonly metaContexts: number;
  /** Commands the export's extension adds (they take no flags): whether this connection may send each. */
  readonly extraCommands: ReadonlyMap<number, boolean>;
  /** The server is shutting down: every request is refused with ESHUTDOWN. */
  readonly shuttingDown: boolean;
}

/** The refusal for `h`, or undefined if it may run. NBD_CMD_DISC is the caller's (it is never refused). */
export function validateRequest(h: Pick<RequestHeader, 'type' | 'flags' | 'offset' | 'length'>, c: RequestContext): Refusal | undefined {
  if (c.shuttingDown) return { error: C.NBD_ESHUTDOWN, message: 'the server is shutting down' };
  const allowed = ALLOWED_FLAGS[h.type] ?? (c.extraCommands.has(h.type) ? 0 : undefined);
  if (allowed === undefined) return { error: C.NBD_EINVAL, message: `unknown command ${h.type}` };
  let valid = allowed;
  if (!(c.transmissionFlags & C.NBD_FLAG_SEND_FUA)) valid &= ~C.NBD_CMD_FLAG_FUA;
  if (!(c.transmissionFlags & C.NBD_FLAG_SEND_FAST_ZERO)) valid &= ~C.NBD_CMD_FLAG_FAST_ZERO;
  if (!c.structuredReplies) valid &= ~C.NBD_CMD_FLAG_DF;
  if (h.flags & ~valid) return { error: C.NBD_EINVAL, message: `flags 0x${h.flags.toString(16)} not valid for ${C.COMMAND_NAMES[h.type]}` };

  const writes = h.type === C.NBD_CMD_WRITE || h.type === C.NBD_CMD_TRIM || h.type === C.NBD_CMD_WRITE_ZEROES;
  if (writes && c.readOnly) return { error: C.NBD_EPERM, message: `export "${c.exportName}" is read-only` };

  if ((h.type === C.NBD_CMD_READ || h.type === C.NBD_CMD_WRITE) && h.length > C.MAX_PAYLOAD)
    return { error: C.NBD_EINVAL, message: `${h.length} bytes is over the ${C.MAX_PAYLOAD}-byte maximum block size` };

  // A range past the end: ENOSPC for the commands that write data (as the spec and nbdkit answer), EINVAL otherwise.
  if (h.type !== C.NBD_CMD_FLUSH && h.type !== C.NBD_CMD_DISC && h.offset + h.length > c.size) {
    const error = h.type === C.NBD_CMD_WRITE || h.type === C.NBD_CMD_WRITE_ZEROES ? C.NBD_ENOSPC : C.NBD_EINVAL;
    return { error, message: `range ${h.offset}+${h.length} is beyond the end of the ${c.size}-byte export` };
  }
  // An extension's commands exist only for the connections it permits (nbd-migrate's: the source that named its job).
  if (c.extraCommands.get(h.type) === false)
    return { error: C.NBD_EINVAL, message: `unknown command ${h.type}` };
  if (h.type === C.NBD_CMD_BLOCK_STATUS) {
    if (c.metaContexts === 0) return { error: C.NBD_EINVAL, message: 'no metadata context was negotiated' };
    if (h.length === 0) return { error: C.NBD_EINVAL, message: 'block status of zero length' };
  }
  return undefined;
}
