/**
 * An NBD client that is a Device: the mirror's copy engine treats a remote
 * NBD export exactly like a local file. This is the device adapter; the
 * connection is transport.ts (cookies, in-flight bounds, the request watchdog,
 * READY/CLOSING/CLOSED/DEAD), reaching the server connect.ts, TLS tls.ts.
 *
 * - Fixed newstyle handshake over TCP or a Unix socket (see handshake.ts).
 * - Pipelined and bounded (see transport.ts).
 * - READ and WRITE larger than the server's maximum block size (capped at
 *   32 MiB) are split; TRIM and WRITE_ZEROES are split at 1 GiB.
 * - Missing server features are handled here, so callers need not check:
 *   no WRITE_ZEROES -> zeros are written (unless `fast`: ENOTSUP); no FUA ->
 *   write then flush; no TRIM -> trim is a no-op; no FLUSH -> flush is a
 *   no-op; read-only -> writes fail EPERM without being sent.
 * - Errors: a failed request rejects with NbdRequestError (a DeviceError,
 *   `code` the errno name). If the connection dies (socket error, server
 *   closed it, protocol violation), every pending and later call rejects
 *   with DeviceError 'ECONNRESET' ('EPIPE' after close()), and 'close' is
 *   emitted with the Error.
 */
import { EventEmitter } from 'node:events';
import type * as net from 'node:net';
import * as C from '../protocol/constants.js';
import type { Extent } from '../protocol/codec.js';
import { DeviceError, type Capabilities, type Device, type WriteOptions, type ZeroOptions } from '../storage/device.js';
import type { BlockSize, NegotiatedExport } from './handshake.js';
import type { PendingRequest } from './replies.js';
import { dial } from './connect.js';
import { armQuickAck, type SetQuickAck } from './quickack.js';
import { Transport, type TransportLimits } from './transport.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from './uri.js';

export { NbdHandshakeError, NbdProtocolError, NbdRequestError } from './errors.js';
export { parseNbdUri, formatNbdUri, NbdUriError, type NbdUri } from './uri.js';
export type { BlockSize } from './handshake.js';

export interface NbdClientOptions {
  /** Requests on the wire at once (default 64). */
  maxInflightRequests?: number;
  /** READ + WRITE payload bytes on the wire at once (default 64 MiB). A larger single request goes alone. */
  maxInflightBytes?: number;
  /** Bound on connecting plus the whole handshake (default 10 s). */
  connectTimeoutMs?: number;
  /** Aborting it gives up connecting (connect() rejects, the socket is closed). */
  signal?: AbortSignal;
  /** TCP_QUICKACK during the handshake: the addon's by default (connect.ts); for tests. */
  handshakeQuickAck?: SetQuickAck | null;
  /** Metadata contexts to select when structured replies are available (default ['base:allocation']). */
  metaContexts?: readonly string[];
  /**
   * Ask for structured replies (default true). False: simple replies, no metadata contexts,
   * one handshake round trip less: for a connection that only writes (`copy`'s target).
   */
  structuredReplies?: boolean;
  /** NBD_OPT_LIST_META_CONTEXT queries whose answers are kept in `listedContexts` (default none). */
  listMetaContexts?: readonly string[];
  /**
   * With requests outstanding and no reply for this long, the connection is
   * dropped: everything pending rejects with ETIMEDOUT (default 0: never).
   */
  requestTimeoutMs?: number;
  /** TCP_QUICKACK re-armed after every read (quickack.ts): replies acknowledged at once, for servers without TCP_NODELAY (default false). */
  quickAck?: boolean;
}

const DEFAULTS = {
  maxInflightRequests: 64,
  maxInflightBytes: 64 * 1024 * 1024,
  connectTimeoutMs: 10_000,
  metaContexts: [C.BASE_ALLOCATION] as readonly string[],
  listMetaContexts: [] as readonly string[],
  requestTimeoutMs: 0,
};

/** TRIM / WRITE_ZEROES / CACHE are split at this (qemu refuses requests of 2 GiB and more). */
const BIG_SPLIT = 1024 * 1024 * 1024;
/** Largest zero buffer kept for emulating WRITE_ZEROES. */
const ZERO_BUFFER = 1024 * 1024;

const STATE_MASK = C.NBD_STATE_HOLE | C.NBD_STATE_ZERO;

export class NbdClient extends EventEmitter implements Device {
  /** The URI connected to, canonical form. */
  readonly uri: string;
  readonly size: number;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly exportName: string;
  /** Negotiated metadata contexts: name -> id. */
  readonly contexts: ReadonlyMap<string, number>;
  /** Context names the server listed for the `listMetaContexts` queries. */
  readonly listedContexts: readonly string[];
  /** As reported by the server (NBD_INFO_BLOCK_SIZE), else { 1, 4096, 32 MiB }. */
  readonly blockSize: BlockSize;
  readonly readOnly: boolean;

  private readonly transport: Transport;
  /** READ/WRITE split size: the server's maximum, at most 32 MiB, a multiple of its minimum. */
  private readonly splitBytes: number;
  private readonly bigSplit: number;
  private zeroBuffer: Buffer | undefined;

  /** Use NbdClient.connect(). */
  private constructor(socket: net.Socket, n: NegotiatedExport, readAhead: Buffer[], limits: TransportLimits, uri: string) {
    super();
    this.listedContexts = n.listedContexts;
    this.uri = uri;
    this.size = n.size;
    this.transmissionFlags = n.transmissionFlags;
    this.structuredReplies = n.structuredReplies;
    this.exportName = n.exportName;
    this.contexts = n.contexts;
    this.blockSize = n.blockSize;
    this.readOnly = (n.transmissionFlags & C.NBD_FLAG_READ_ONLY) !== 0;
    const min = Math.max(1, n.blockSize.minimum);
    const max = Math.min(n.blockSize.maximum, C.MAX_PAYLOAD);
    this.splitBytes = Math.max(min, max - (max % min));
    this.bigSplit = Math.max(min, BIG_SPLIT - (BIG_SPLIT % min));

    this.transport = new Transport(socket, n.structuredReplies, readAhead, limits, uri, (err) =>
      err ? this.emit('close', err) : this.emit('close'),
    );
  }

  /**
   * Connects and negotiates. Rejects with an Error whose message names the URI
   * and the reason (refused connection, timeout, NbdHandshakeError with the
   * server's error string for a refused export, ...).
   */
  static async connect(uri: string | NbdUri, options: NbdClientOptions = {}): Promise<NbdClient> {
    const u = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const label = formatNbdUri(u);
    const opts = { ...DEFAULTS, ...stripUndefined(options) };
    for (const k of ['maxInflightRequests', 'maxInflightBytes', 'connectTimeoutMs'] as const) {
      if (!(Number.isInteger(opts[k]) && opts[k] > 0)) throw new RangeError(`${k} must be a positive integer, got ${opts[k]}`);
    }
    if (!(Number.isInteger(opts.requestTimeoutMs) && opts.requestTimeoutMs >= 0))
      throw new RangeError(`requestTimeoutMs must be a non-negative integer, got ${opts.requestTimeoutMs}`);

    const { socket, negotiated, readAhead } = await dial(u, opts, label);
    if (opts.quickAck) armQuickAck(socket);
    return new NbdClient(socket, negotiated, readAhead, opts, label);
  }

  // ---------------------------------------------------------------- state

  /** The connection can no longer carry requests. */
  get closed(): boolean {
    return this.transport.closed;
  }

  /** Requests on the wire, their payload bytes, and requests waiting to go. */
  get stats(): { inflightRequests: number; inflightBytes: number; queuedRequests: number } {
    return this.transport.stats;
  }

  private has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return {
      canWrite: w,
      canFlush: this.has(C.NBD_FLAG_SEND_FLUSH),
      canFua: w && this.has(C.NBD_FLAG_SEND_FUA),
      canTrim: w && this.has(C.NBD_FLAG_SEND_TRIM),
      canZero: w && this.has(C.NBD_FLAG_SEND_WRITE_ZEROES),
      canFastZero: w && this.has(C.NBD_FLAG_SEND_WRITE_ZEROES) && this.has(C.NBD_FLAG_SEND_FAST_ZERO),
      canExtents: this.contexts.has(C.BASE_ALLOCATION),
      canCache: this.has(C.NBD_FLAG_SEND_CACHE),
      canMultiConn: this.has(C.NBD_FLAG_CAN_MULTI_CONN),
    };
  }

  // ---------------------------------------------------------------- Device

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.op(() => this.doRead(offset, length, into, at));
  }

  private async doRead(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    checkRange('read', offset, length);
    if (!Number.isInteger(at) || at < 0 || at + length > into.length)
      throw new DeviceError('EINVAL', `read of ${length} bytes does not fit the buffer (${into.length} bytes, at ${at})`);
    if (length === 0) return;
    const parts: Array<Promise<unknown>> = [];
    for (let pos = 0; pos < length; pos += this.splitBytes) {
      const n = Math.min(this.splitBytes, length - pos);
      parts.push(this.submit(C.NBD_CMD_READ, 0, offset + pos, n, { into, at: at + pos }));
    }
    await settleAll(parts);
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.op(() => this.doWrite(offset, data, opts));
  }

  private async doWrite(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    let length = 0;
    for (const b of data) length += b.length;
    checkRange('write', offset, length);
    this.checkWritable('write');
    if (length === 0) return;
    const fuaFlag = opts.fua && this.has(C.NBD_FLAG_SEND_FUA) ? C.NBD_CMD_FLAG_FUA : 0;
    const parts: Array<Promise<unknown>> = [];
    if (length <= this.splitBytes) parts.push(this.submit(C.NBD_CMD_WRITE, fuaFlag, offset, length, { payload: data }));
    else {
      const cursor = new BufferCursor(data);
      for (let pos = 0; pos < length; pos += this.splitBytes) {
        const n = Math.min(this.splitBytes, length - pos);
        parts.push(this.submit(C.NBD_CMD_WRITE, fuaFlag, offset + pos, n, { payload: cursor.take(n) }));
      }
    }
    await settleAll(parts);
    if (opts.fua && !fuaFlag) await this.doFlush();
  }

  flush(): Promise<void> {
    return this.op(() => this.doFlush());
  }

  private async doFlush(): Promise<void> {
    if (!this.has(C.NBD_FLAG_SEND_FLUSH)) return;
    await this.submit(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.op(() => this.doTrim(offset, length, opts));
  }

  private async doTrim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    checkRange('trim', offset, length);
    this.checkWritable('trim');
    if (length === 0 || !this.has(C.NBD_FLAG_SEND_TRIM)) return;
    const fuaFlag = opts.fua && this.has(C.NBD_FLAG_SEND_FUA) ? C.NBD_CMD_FLAG_FUA : 0;
    await settleAll(this.splitBig(offset, length, (o, n) => this.submit(C.NBD_CMD_TRIM, fuaFlag, o, n)));
    if (opts.fua && !fuaFlag) await this.doFlush();
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.op(() => this.doZero(offset, length, opts));
  }

  private async doZero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    checkRange('zero', offset, length);
    this.checkWritable('zero');
    const canZero = this.has(C.NBD_FLAG_SEND_WRITE_ZEROES);
    if (opts.fast && !(canZero && this.has(C.NBD_FLAG_SEND_FAST_ZERO)))
      throw new DeviceError('ENOTSUP', `${this.uri}: the server cannot zero quickly (no NBD_FLAG_SEND_FAST_ZERO)`);
    if (length === 0) return;
    const fuaFlag = opts.fua && this.has(C.NBD_FLAG_SEND_FUA) ? C.NBD_CMD_FLAG_FUA : 0;
    if (canZero) {
      const flags = fuaFlag | (opts.noHole ? C.NBD_CMD_FLAG_NO_HOLE : 0) | (opts.fast ? C.NBD_CMD_FLAG_FAST_ZERO : 0);
      await settleAll(this.splitBig(offset, length, (o, n) => this.submit(C.NBD_CMD_WRITE_ZEROES, flags, o, n)));
    } else {
      // Emulated: write zeros, one shared zero buffer referenced as often as needed.
      const zb = (this.zeroBuffer ??= Buffer.alloc(Math.min(ZERO_BUFFER, this.splitBytes)));
      const parts: Array<Promise<unknown>> = [];
      for (let pos = 0; pos < length; pos += this.splitBytes) {
        const n = Math.min(this.splitBytes, length - pos);
        const payload: Buffer[] = [];
        for (let left = n; left > 0; left -= zb.length) payload.push(left >= zb.length ? zb : zb.subarray(0, left));
        parts.push(this.submit(C.NBD_CMD_WRITE, fuaFlag, offset + pos, n, { payload }));
      }
      await settleAll(parts);
    }
    if (opts.fua && !fuaFlag) await this.doFlush();
  }

  /**
   * base:allocation extents from `offset`: at most `maxExtents`, covering at
   * most `length` bytes (capped at the export's end and at 2^32-1 per
   * request), and at least one. Without the context (or with an empty
   * answer) the range is one extent of flags 0: allocated data.
   */
  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.op(() => this.doExtents(offset, length, maxExtents));
  }

  /**
   * Extents of another negotiated metadata context (`qemu:dirty-bitmap:NAME`, say), flags
   * as the server sent them; the same bounds as extents(). Rejects when `context` was not
   * negotiated.
   */
  contextExtents(context: string, offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    if (!this.contexts.has(context)) return Promise.reject(new DeviceError('EINVAL', `the server did not agree to metadata context ${context}`));
    return this.op(() => this.doExtents(offset, length, maxExtents, context, 0xffffffff));
  }

  private async doExtents(offset: number, length: number, maxExtents: number, context = C.BASE_ALLOCATION, mask = STATE_MASK): Promise<Extent[]> {
    checkRange('extents', offset, length);
    if (offset > this.size || (offset === this.size && length > 0))
      throw new DeviceError('EINVAL', `extents at ${offset} are beyond the end of the ${this.size}-byte export`);
    const min = this.blockSize.minimum;
    const maxLen = 0xffffffff - (0xffffffff % min);
    const len = Math.min(length, this.size - offset, maxLen);
    if (len === 0) return [];
    const id = this.contexts.get(context);
    if (id === undefined) return [{ length: len, flags: 0 }];
    const flags = maxExtents <= 1 ? C.NBD_CMD_FLAG_REQ_ONE : 0;
    const req = await this.submit(C.NBD_CMD_BLOCK_STATUS, flags, offset, len);
    const out: Extent[] = [];
    let covered = 0;
    for (const e of req.statuses?.get(id) ?? []) {
      if (out.length >= Math.max(1, maxExtents) || covered >= len) break;
      if (e.length === 0) continue;
      const n = Math.min(e.length, len - covered);
      out.push({ length: n, flags: (e.flags & mask) >>> 0 });
      covered += n;
    }
    if (out.length === 0) {
      // base:allocation defaults to data; any other context has no safe default (a dirty bitmap must not read as clean).
      if (context !== C.BASE_ALLOCATION) throw new DeviceError('EPROTO', `the server sent no ${context} extents for ${len} bytes at ${offset}`);
      out.push({ length: len, flags: 0 });
    }
    return out;
  }

  cache(offset: number, length: number): Promise<void> {
    return this.op(() => this.doCache(offset, length));
  }

  private async doCache(offset: number, length: number): Promise<void> {
    checkRange('cache', offset, length);
    if (length === 0 || !this.has(C.NBD_FLAG_SEND_CACHE)) return;
    const parts: Array<Promise<unknown>> = [];
    for (let pos = 0; pos < length; pos += this.splitBytes)
      parts.push(this.submit(C.NBD_CMD_CACHE, 0, offset + pos, Math.min(this.splitBytes, length - pos)));
    await settleAll(parts);
  }

  /**
   * Sends one raw request and resolves when the server answers it without
   * error (a simple reply with error 0, or a structured reply ending without
   * an error chunk); rejects with NbdRequestError otherwise. For commands
   * whose success carries no data: used for nbd-migrate's own
   * NBD_CMD_MIGRATE_COMPLETE. The request is not split and `flags` are sent
   * as given. `payload`, if any, follows the header and must total `length`
   * bytes. READ, BLOCK_STATUS and DISC are refused (use read(), extents(),
   * close()).
   */
  request(type: number, flags: number, offset: number, length: number, payload?: readonly Buffer[]): Promise<void> {
    return this.op(() => this.doRequest(type, flags, offset, length, payload));
  }

  private async doRequest(type: number, flags: number, offset: number, length: number, payload?: readonly Buffer[]): Promise<void> {
    if (!Number.isInteger(type) || type < 0 || type > 0xffff) throw new DeviceError('EINVAL', `bad command type ${type}`);
    if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw new DeviceError('EINVAL', `bad command flags ${flags}`);
    if (type === C.NBD_CMD_READ || type === C.NBD_CMD_BLOCK_STATUS || type === C.NBD_CMD_DISC)
      throw new DeviceError('EINVAL', `request() cannot send ${C.COMMAND_NAMES[type]}; use the Device methods`);
    checkRange('request', offset, length);
    if (length > 0xffffffff) throw new DeviceError('EINVAL', `request length ${length} does not fit 32 bits`);
    let payloadBytes = 0;
    for (const b of payload ?? []) payloadBytes += b.length;
    if (payload && payloadBytes !== length)
      throw new DeviceError('EINVAL', `request payload is ${payloadBytes} bytes but length is ${length}`);
    await this.submit(type, flags, offset, length, payload ? { payload } : {});
  }

  /**
   * Soft disconnect: new calls are refused (EPIPE), queued and in-flight
   * requests finish, then NBD_CMD_DISC is sent and the socket closed.
   * With `waitMs`, requests still in flight after that long are given up
   * (they reject with ECONNRESET) and the connection is dropped instead: a
   * server that stopped answering cannot hold the caller.
   * Resolves once the socket is gone; never rejects.
   */
  close(waitMs?: number): Promise<void> {
    return this.transport.close(waitMs);
  }

  /** Hard disconnect: drops the socket; everything pending rejects with ECONNRESET. Emits 'close' (no error). */
  destroy(): void {
    this.transport.destroy();
  }

  // ---------------------------------------------------------------- internals

  /** Runs one Device operation; close() waits for operations (including their follow-up flushes). */
  private op<T>(fn: () => Promise<T>): Promise<T> {
    return this.transport.operation(fn);
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw new DeviceError('EPERM', `${this.uri}: ${what} on a read-only export`);
  }

  private splitBig(offset: number, length: number, send: (o: number, n: number) => Promise<unknown>): Array<Promise<unknown>> {
    const parts: Array<Promise<unknown>> = [];
    for (let pos = 0; pos < length; pos += this.bigSplit) parts.push(send(offset + pos, Math.min(this.bigSplit, length - pos)));
    return parts;
  }

  private submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    opts?: { payload?: readonly Buffer[]; into?: Buffer; at?: number },
  ): Promise<PendingRequest> {
    return this.transport.submit(type, flags, offset, length, opts);
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function checkRange(what: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || offset + length > Number.MAX_SAFE_INTEGER)
    throw new DeviceError('EINVAL', `${what}: bad range ${offset}+${length}`);
}

/** Waits for every part, then rejects with the first failure (so no part still writes into a caller's buffer). */
async function settleAll(parts: Array<Promise<unknown>>): Promise<void> {
  if (parts.length === 1) {
    await parts[0];
    return;
  }
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** Cuts consecutive byte ranges out of a list of buffers without copying. */
class BufferCursor {
  private i = 0;
  private off = 0;
  constructor(private readonly bufs: readonly Buffer[]) {}
  take(n: number): Buffer[] {
    const out: Buffer[] = [];
    while (n > 0) {
      const b = this.bufs[this.i]!;
      const avail = b.length - this.off;
      if (avail === 0) {
        this.i++;
        this.off = 0;
        continue;
      }
      const k = Math.min(avail, n);
      out.push(this.off === 0 && k === b.length ? b : b.subarray(this.off, this.off + k));
      this.off += k;
      n -= k;
    }
    return out;
  }
}
