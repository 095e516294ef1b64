/**
 * An NBD client that is a Device: the mirror's copy engine treats a remote
 * NBD export exactly like a local file.
 *
 * - Fixed newstyle handshake over TCP or a Unix socket (see handshake.ts).
 * - Pipelined transmission: every request gets a 64-bit cookie (a counter);
 *   replies are matched by cookie, in any order (see replies.ts).
 * - Bounded: at most `maxInflightRequests` requests and `maxInflightBytes`
 *   of READ/WRITE payload are on the wire; further requests wait in a FIFO.
 *   The socket's write side is respected ('drain'), and replies are read all
 *   the while, so full buffers in both directions cannot deadlock.
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
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import * as C from '../protocol/constants.js';
import * as codec from '../protocol/codec.js';
import type { Extent } from '../protocol/codec.js';
import { DeviceError, type Capabilities, type Device, type WriteOptions, type ZeroOptions } from '../storage/device.js';
import { NbdProtocolError, NbdRequestError, errnoNameForNbd } from './errors.js';
import { HandshakeReader, negotiate, type BlockSize, type NegotiatedExport } from './handshake.js';
import { PendingRequest, ReplyParser } from './replies.js';
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
  /** Metadata contexts to select when structured replies are available (default ['base:allocation']). */
  metaContexts?: readonly string[];
  /** NBD_OPT_LIST_META_CONTEXT queries whose answers are kept in `listedContexts` (default none). */
  listMetaContexts?: readonly string[];
  /**
   * With requests outstanding and no reply for this long, the connection is
   * dropped: everything pending rejects with ETIMEDOUT (default 0: never).
   */
  requestTimeoutMs?: number;
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
/** Socket write buffer before 'drain' is awaited. */
const WRITE_HIGH_WATER = 1024 * 1024;
/** How long close() waits for the server to close after NBD_CMD_DISC. */
const DISCONNECT_GRACE_MS = 5000;

const STATE_MASK = C.NBD_STATE_HOLE | C.NBD_STATE_ZERO;

/** node:tls options from an nbds:// URI (libnbd's tls-certificates directory layout). */
function tlsOptions(u: NbdUri): tls.ConnectionOptions {
  const t = u.tls!;
  const file = (name: string) => (t.certificates ? path.join(t.certificates, name) : undefined);
  const readIf = (f: string | undefined) => (f && fs.existsSync(f) ? fs.readFileSync(f) : undefined);
  const ca = readIf(file('ca-cert.pem'));
  const cert = readIf(file('client-cert.pem'));
  const key = readIf(file('client-key.pem'));
  if (t.certificates && !ca) throw new Error(`${formatNbdUri(u)}: ${file('ca-cert.pem')} not found (tls-certificates=)`);
  const servername = t.hostname ?? (u.transport === 'tcp' ? u.host : 'localhost');
  return {
    ...(ca ? { ca } : {}),
    ...(cert && key ? { cert, key } : {}),
    rejectUnauthorized: t.verifyPeer,
    // SNI takes no IP literals; the name is still checked against the certificate.
    ...(net.isIP(servername) ? {} : { servername }),
    checkServerIdentity: (_host, c) => tls.checkServerIdentity(servername, c),
    minVersion: 'TLSv1.2',
  };
}

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

  private readonly maxRequests: number;
  private readonly maxBytes: number;
  /** READ/WRITE split size: the server's maximum, at most 32 MiB, a multiple of its minimum. */
  private readonly splitBytes: number;
  private readonly bigSplit: number;
  private readonly parser: ReplyParser;
  private readonly inflight = new Map<number, PendingRequest>();
  private inflightBytes = 0;
  private queue: PendingRequest[] = [];
  private queueHead = 0;
  private nextCookie = 1;
  private writeBlocked = false;
  /** Set once the connection is unusable: the reason. */
  private dead: Error | undefined;
  private deadCode = 'ECONNRESET';
  /** close() was called (or the server asked for a disconnect with ESHUTDOWN). */
  private closing = false;
  private closePromise: Promise<void> | undefined;
  private shutdownReason: Error | undefined;
  private idleWaiters: Array<() => void> = [];
  private closeWaiters: Array<() => void> = [];
  private socketClosed = false;
  private lastSocketError: Error | undefined;
  private zeroBuffer: Buffer | undefined;
  /** Device operations in progress (close() waits for them). */
  private busy = 0;
  /** Last sign of life while requests were outstanding: a reply byte, a drained write, or the first send. */
  private lastProgress = 0;
  private readonly requestTimeoutMs: number;
  private watchdog: NodeJS.Timeout | undefined;

  /** Use NbdClient.connect(). */
  private constructor(
    private readonly socket: net.Socket,
    n: NegotiatedExport,
    readAhead: Buffer[],
    opts: Required<Pick<NbdClientOptions, 'maxInflightRequests' | 'maxInflightBytes' | 'requestTimeoutMs'>>,
    uri: string,
  ) {
    super();
    this.requestTimeoutMs = opts.requestTimeoutMs;
    this.listedContexts = n.listedContexts;
    this.uri = uri;
    this.size = n.size;
    this.transmissionFlags = n.transmissionFlags;
    this.structuredReplies = n.structuredReplies;
    this.exportName = n.exportName;
    this.contexts = n.contexts;
    this.blockSize = n.blockSize;
    this.readOnly = (n.transmissionFlags & C.NBD_FLAG_READ_ONLY) !== 0;
    this.maxRequests = opts.maxInflightRequests;
    this.maxBytes = opts.maxInflightBytes;
    const min = Math.max(1, n.blockSize.minimum);
    const max = Math.min(n.blockSize.maximum, C.MAX_PAYLOAD);
    this.splitBytes = Math.max(min, max - (max % min));
    this.bigSplit = Math.max(min, BIG_SPLIT - (BIG_SPLIT % min));

    this.parser = new ReplyParser(n.structuredReplies, {
      lookup: (cookie) => this.inflight.get(cookie),
      done: (req) => this.complete(req),
    });
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('drain', () => {
      this.lastProgress = performance.now();
      this.writeBlocked = false;
      this.pump();
    });
    socket.on('error', (e) => {
      this.lastSocketError = e;
    });
    socket.on('end', () => this.onSocketEnd());
    socket.on('close', () => this.onSocketClose());
    for (const b of readAhead) this.onData(b);
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

    // A bad certificate directory fails before anything is sent.
    const tlsOpts = u.tls ? tlsOptions(u) : undefined;
    const socket =
      u.transport === 'tcp'
        ? net.connect({
            host: u.host,
            port: u.port,
            noDelay: true,
            // Notices a peer that vanished while the connection was idle.
            keepAlive: true,
            keepAliveInitialDelay: 30_000,
            writableHighWaterMark: WRITE_HIGH_WATER,
          } as net.NetConnectOpts)
        : net.connect({ path: u.socket, writableHighWaterMark: WRITE_HIGH_WATER } as net.NetConnectOpts);
    const reader = new HandshakeReader(socket);
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    try {
      const timeout = new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => {
          timedOut = true;
          const e = new Error(`${label}: connection and handshake timed out after ${opts.connectTimeoutMs} ms`);
          reader.fail(e);
          reject(e);
        }, opts.connectTimeoutMs);
      });
      await Promise.race([
        new Promise<void>((resolve, reject) => {
          socket.once('connect', resolve);
          socket.once('error', (e) => reject(new Error(`${label}: cannot connect: ${e.message}`, { cause: e })));
        }),
        timeout,
      ]);
      const io = { socket: socket as net.Socket, reader };
      const n = await Promise.race([
        negotiate(io, { exportName: u.exportName, metaContexts: opts.metaContexts, listMetaContexts: opts.listMetaContexts, label, tls: tlsOpts }),
        timeout,
      ]);
      clearTimeout(timer);
      io.reader.detach();
      const readAhead = io.reader.queue.length > 0 ? io.reader.queue.takeSlices(io.reader.queue.length) : [];
      return new NbdClient(io.socket, n, readAhead, opts, label);
    } catch (e) {
      clearTimeout(timer);
      reader.detach();
      socket.on('error', () => {}); // late errors after we gave up
      if (timedOut || !socket.writable) socket.destroy();
      else {
        // Let an NBD_OPT_ABORT (if one was queued) go out, then close.
        socket.end();
        setTimeout(() => socket.destroy(), 1000).unref();
      }
      throw e;
    }
  }

  // ---------------------------------------------------------------- state

  /** The connection can no longer carry requests. */
  get closed(): boolean {
    return this.dead !== undefined;
  }

  /** Requests on the wire, their payload bytes, and requests waiting to go. */
  get stats(): { inflightRequests: number; inflightBytes: number; queuedRequests: number } {
    return { inflightRequests: this.inflight.size, inflightBytes: this.inflightBytes, queuedRequests: this.queue.length - this.queueHead };
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

  private async doExtents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    checkRange('extents', offset, length);
    if (offset > this.size || (offset === this.size && length > 0))
      throw new DeviceError('EINVAL', `extents at ${offset} are beyond the end of the ${this.size}-byte export`);
    const min = this.blockSize.minimum;
    const maxLen = 0xffffffff - (0xffffffff % min);
    const len = Math.min(length, this.size - offset, maxLen);
    if (len === 0) return [];
    const id = this.contexts.get(C.BASE_ALLOCATION);
    if (id === undefined) return [{ length: len, flags: 0 }];
    const flags = maxExtents <= 1 ? C.NBD_CMD_FLAG_REQ_ONE : 0;
    const req = await this.submit(C.NBD_CMD_BLOCK_STATUS, flags, offset, len);
    const out: Extent[] = [];
    let covered = 0;
    for (const e of req.statuses?.get(id) ?? []) {
      if (out.length >= Math.max(1, maxExtents) || covered >= len) break;
      if (e.length === 0) continue;
      const n = Math.min(e.length, len - covered);
      out.push({ length: n, flags: e.flags & STATE_MASK });
      covered += n;
    }
    if (out.length === 0) out.push({ length: len, flags: 0 });
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
   * Resolves once the socket is gone; never rejects.
   */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.closePromise = (async () => {
      await this.idle();
      if (this.dead) {
        this.socket.destroy();
        return;
      }
      this.socket.write(codec.encodeRequestHeader(0, C.NBD_CMD_DISC, this.cookie(this.nextCookie++), 0, 0));
      this.socket.end();
      this.dead = new Error('the client closed the connection');
      this.deadCode = 'EPIPE';
      const t = setTimeout(() => this.socket.destroy(), DISCONNECT_GRACE_MS);
      t.unref();
      await this.socketGone();
      clearTimeout(t);
      this.emitClose(this.shutdownReason, true);
    })();
    return this.closePromise;
  }

  /** Hard disconnect: drops the socket; everything pending rejects with ECONNRESET. Emits 'close' (no error). */
  destroy(): void {
    if (!this.dead) {
      this.dead = new Error('connection destroyed by the client');
      this.deadCode = 'ECONNRESET';
      this.rejectAll();
      this.emitClose(this.shutdownReason);
    }
    this.socket.destroy();
  }

  // ---------------------------------------------------------------- internals

  private cookie(n: number): codec.Cookie {
    return { hi: Math.floor(n / 0x100000000), lo: n >>> 0 };
  }

  /** Runs one Device operation; close() waits for operations (including their follow-up flushes). */
  private async op<T>(fn: () => Promise<T>): Promise<T> {
    this.checkAlive();
    this.busy++;
    try {
      return await fn();
    } finally {
      this.busy--;
      this.checkIdle();
    }
  }

  private checkAlive(): void {
    if (this.dead) throw this.deadError();
    if (this.closing)
      throw this.shutdownReason
        ? new DeviceError('ESHUTDOWN', `${this.uri}: the server is shutting down`)
        : new DeviceError('EPIPE', `${this.uri}: the client is closing`);
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw new DeviceError('EPERM', `${this.uri}: ${what} on a read-only export`);
  }

  private deadError(): DeviceError {
    return new DeviceError(this.deadCode, `${this.uri}: NBD connection is closed: ${this.dead!.message}`, { cause: this.dead });
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
    opts: { payload?: readonly Buffer[]; into?: Buffer; at?: number } = {},
  ): Promise<PendingRequest> {
    if (this.dead) return Promise.reject(this.deadError());
    const bytes = type === C.NBD_CMD_READ ? length : (opts.payload ? length : 0);
    return new Promise<PendingRequest>((resolve, reject) => {
      const req = new PendingRequest(type, flags, offset, length, bytes, opts.payload, opts.into, opts.at ?? 0, (err, r) =>
        err ? reject(err) : resolve(r),
      );
      this.queue.push(req);
      this.pump();
    });
  }

  /** Sends queued requests while the bounds and the socket allow. */
  private pump(): void {
    while (!this.dead && !this.writeBlocked && this.queueHead < this.queue.length) {
      const req = this.queue[this.queueHead]!;
      if (this.inflight.size >= this.maxRequests) break;
      if (this.inflight.size > 0 && this.inflightBytes + req.bytes > this.maxBytes) break;
      this.queue[this.queueHead++] = undefined as unknown as PendingRequest;
      if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
        this.queue = this.queue.slice(this.queueHead);
        this.queueHead = 0;
      }
      this.send(req);
    }
    if (this.queueHead === this.queue.length && this.queueHead > 0) {
      this.queue = [];
      this.queueHead = 0;
    }
  }

  private send(req: PendingRequest): void {
    if (this.inflight.size === 0) {
      this.lastProgress = performance.now();
      this.armWatchdog();
    }
    req.cookie = this.nextCookie++;
    this.inflight.set(req.cookie, req);
    this.inflightBytes += req.bytes;
    const header = codec.encodeRequestHeader(req.flags, req.type, this.cookie(req.cookie), req.offset, req.length);
    const payload = req.payload;
    req.payload = undefined;
    let ok: boolean;
    if (payload && payload.length > 0) {
      // Header and payload as separate writes, gathered into one writev by cork.
      this.socket.cork();
      ok = this.socket.write(header);
      for (const b of payload) if (b.length > 0) ok = this.socket.write(b) && ok;
      this.socket.uncork();
    } else ok = this.socket.write(header);
    if (!ok) this.writeBlocked = true;
  }

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    this.lastProgress = performance.now();
    try {
      this.parser.push(chunk);
    } catch (e) {
      if (e instanceof NbdProtocolError) this.fail(new NbdProtocolError(`protocol error from the server: ${e.message}`));
      else this.fail(e as Error);
    }
  }

  /** A reply is complete: settle its request. */
  private complete(req: PendingRequest): void {
    this.inflight.delete(req.cookie);
    this.inflightBytes -= req.bytes;
    let err: Error | undefined;
    const command = C.COMMAND_NAMES[req.type] ?? `command ${req.type}`;
    if (req.error) {
      const { nbdErrno, message } = req.error;
      const name = errnoNameForNbd(nbdErrno);
      err = new NbdRequestError(
        nbdErrno,
        command,
        message,
        `${this.uri}: ${command} ${req.offset}+${req.length} failed: ${name} (NBD error ${nbdErrno})${message ? `: ${message}` : ''}`,
      );
      if (nbdErrno === C.NBD_ESHUTDOWN) this.serverShutdown();
    } else if (req.type === C.NBD_CMD_READ && !req.simple && !req.fullyCovered) {
      err = new DeviceError('EIO', `${this.uri}: read ${req.offset}+${req.length}: the server reported success without sending all the data`);
    }
    req.settle(err, req);
    if (!this.dead) this.pump();
    this.checkIdle();
  }

  /** ESHUTDOWN: the spec asks the client for a soft disconnect. Queued requests are not sent. */
  private serverShutdown(): void {
    if (this.shutdownReason) return;
    this.shutdownReason = new Error('the server is shutting down (ESHUTDOWN)');
    const queued = this.queue.slice(this.queueHead);
    this.queue = [];
    this.queueHead = 0;
    for (const r of queued)
      r.settle(new DeviceError('ESHUTDOWN', `${this.uri}: the server is shutting down; ${C.COMMAND_NAMES[r.type] ?? r.type} not sent`), r);
    void this.close();
  }

  private isIdle(): boolean {
    return this.dead !== undefined || (this.busy === 0 && this.inflight.size === 0 && this.queueHead === this.queue.length);
  }

  private idle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private checkIdle(): void {
    if (this.isIdle()) for (const fn of this.idleWaiters.splice(0)) fn();
  }

  private socketGone(): Promise<void> {
    if (this.socketClosed) return Promise.resolve();
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  private onSocketClose(): void {
    this.socketClosed = true;
    this.onSocketEnd();
    for (const fn of this.closeWaiters.splice(0)) fn();
  }

  /** The server closed (or the socket failed): fatal unless we were closing and had nothing pending. */
  private onSocketEnd(): void {
    if (this.dead) return;
    if (this.closing && this.busy === 0 && this.inflight.size === 0 && this.queueHead === this.queue.length) {
      this.dead = new Error('the server closed the connection');
      this.deadCode = 'EPIPE';
      this.emitClose(this.shutdownReason);
      this.checkIdle();
      return;
    }
    this.fail(this.lastSocketError ?? new Error('the server closed the connection'));
  }

  /**
   * Watches outstanding requests while there are any: a connection that makes
   * no progress for requestTimeoutMs (a frozen server, a silent network
   * partition) is dropped, so callers see ETIMEDOUT instead of waiting forever.
   */
  private armWatchdog(): void {
    if (this.requestTimeoutMs === 0 || this.watchdog || this.dead) return;
    const every = Math.max(10, Math.min(1000, Math.floor(this.requestTimeoutMs / 4)));
    this.watchdog = setInterval(() => {
      if (this.dead || (this.inflight.size === 0 && this.queueHead === this.queue.length)) {
        clearInterval(this.watchdog);
        this.watchdog = undefined;
        return;
      }
      const quiet = performance.now() - this.lastProgress;
      if (this.inflight.size > 0 && quiet > this.requestTimeoutMs) {
        const oldest = this.inflight.values().next().value as PendingRequest;
        this.fail(
          new Error(`no reply from the server for ${Math.round(quiet)} ms with ${this.inflight.size} request(s) outstanding ` +
            `(oldest: ${C.COMMAND_NAMES[oldest.type] ?? oldest.type} ${oldest.offset}+${oldest.length}); timeout ${this.requestTimeoutMs} ms`),
          'ETIMEDOUT',
        );
      }
    }, every);
    this.watchdog.unref();
  }

  /** The connection died unexpectedly: everything pending rejects, 'close' carries the reason. */
  private fail(reason: Error, code = 'ECONNRESET'): void {
    if (this.dead) return;
    this.dead = reason;
    this.deadCode = code;
    this.socket.destroy();
    this.rejectAll();
    this.emitClose(reason);
  }

  private rejectAll(): void {
    if (this.watchdog) {
      clearInterval(this.watchdog);
      this.watchdog = undefined;
    }
    const reqs = [...this.inflight.values(), ...this.queue.slice(this.queueHead)];
    this.inflight.clear();
    this.inflightBytes = 0;
    this.queue = [];
    this.queueHead = 0;
    for (const r of reqs) r.settle(this.deadError(), r);
    this.checkIdle();
  }

  private closeEmitted = false;
  /** Emits 'close' once: asynchronously unless `now` (listeners must not run inside a caller's stack). */
  private emitClose(err: Error | undefined, now = false): void {
    if (this.closeEmitted) return;
    this.closeEmitted = true;
    const emit = () => (err ? this.emit('close', err) : this.emit('close'));
    if (now) emit();
    else process.nextTick(emit);
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
