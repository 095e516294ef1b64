/**
 * The NBD client's transmission phase on one negotiated socket (connect.ts
 * dials and negotiates).
 *
 * - Pipelined: every request gets a 64-bit cookie (a counter); replies are
 *   matched by cookie, in any order (replies.ts).
 * - Bounded: at most `maxInflightRequests` requests and `maxInflightBytes`
 *   of READ/WRITE payload are on the wire; further requests wait in a FIFO.
 *   The socket's write side is respected ('drain'), and replies are read all
 *   the while, so full buffers in both directions cannot deadlock.
 * - Watched: with requests outstanding and no progress for
 *   `requestTimeoutMs`, the connection is dropped (ETIMEDOUT).
 *
 * States (READY, CLOSED and DEAD as libnbd's generator/state_machine.ml names
 * them; CLOSING is the soft disconnect draining):
 *   READY    requests are accepted and sent.
 *   CLOSING  close() was called, or the server answered ESHUTDOWN: new
 *            operations are refused (EPIPE, ESHUTDOWN), the queued and
 *            in-flight ones finish, then NBD_CMD_DISC goes out.
 *   CLOSED   the connection ended as asked (NBD_CMD_DISC sent, or the server
 *            closed while nothing was pending): calls reject EPIPE.
 *   DEAD     the connection failed (socket error, the server closed it with
 *            requests pending, a protocol violation, the request timeout) or
 *            destroy() was called: calls reject ECONNRESET (ETIMEDOUT).
 * Leaving READY/CLOSING rejects everything pending and reports 'close' once.
 */
import type * as net from 'node:net';
import * as C from '../protocol/constants.js';
import * as codec from '../protocol/codec.js';
import { DeviceError } from '../storage/device.js';
import { NbdProtocolError, NbdRequestError, errnoNameForNbd } from './errors.js';
import { PendingRequest, ReplyParser } from './replies.js';
import { adoptForOnread } from '../util/onread.js';
import { settledWithin } from '../util/within.js';

/** How long close() waits for the server to close after NBD_CMD_DISC. */
const DISCONNECT_GRACE_MS = 5000;
/** The reused buffer replies are read into on a plain socket (headers, small payloads, the start of READ data). */
const SCRATCH_BYTES = 64 * 1024;
/** READ data still to come from this many bytes on is read straight into the caller's buffer. */
const DIRECT_MIN = 16 * 1024;

export type TransportState =
  | { readonly kind: 'READY' }
  | { readonly kind: 'CLOSING' }
  | { readonly kind: 'CLOSED'; readonly reason: Error }
  | { readonly kind: 'DEAD'; readonly reason: Error; readonly code: string };

export interface TransportLimits {
  maxInflightRequests: number;
  maxInflightBytes: number;
  /** 0: never time out. */
  requestTimeoutMs: number;
}

export class Transport {
  private current: TransportState = { kind: 'READY' };
  private readonly parser: ReplyParser;
  private readonly inflight = new Map<number, PendingRequest>();
  private inflightBytes = 0;
  private queue: PendingRequest[] = [];
  private queueHead = 0;
  private nextCookie = 1;
  private writeBlocked = false;
  private closePromise: Promise<void> | undefined;
  /** The server answered ESHUTDOWN: why we are closing, and what 'close' reports. */
  private shutdownReason: Error | undefined;
  private idleWaiters: Array<() => void> = [];
  /** Resolves once the socket has closed (after the state has seen it). */
  private readonly socketGone: Promise<void>;
  private lastSocketError: Error | undefined;
  /** Device operations in progress (close() waits for them). */
  private busy = 0;
  /** Last sign of life while requests were outstanding: a reply byte, a drained write, or the first send. */
  private lastProgress = 0;
  private watchdog: NodeJS.Timeout | undefined;
  private closeEmitted = false;

  private socket: net.Socket;
  /** Where plain-socket reads land when not in place (undefined: 'data' events, e.g. TLS). */
  private readonly scratch: Buffer | undefined;
  /** The dialled socket's 'data' listeners (TCP_QUICKACK re-arming), called once per read. */
  private readonly readHooks: Array<(chunk: Buffer) => void> = [];

  /** `onClose` is called once when the connection ends, with the reason if it failed. */
  constructor(
    socket: net.Socket,
    structuredReplies: boolean,
    readAhead: readonly Buffer[],
    private readonly limits: TransportLimits,
    /** The URI, for messages. */
    private readonly uri: string,
    private readonly onClose: (err?: Error) => void,
  ) {
    this.parser = new ReplyParser(structuredReplies, {
      lookup: (cookie) => this.inflight.get(cookie),
      done: (req) => this.complete(req),
    });
    this.socket = socket;
    for (const b of readAhead) this.onData(b);
    const scratch = Buffer.allocUnsafeSlow(SCRATCH_BYTES);
    const hooks = socket.listeners('data') as Array<(chunk: Buffer) => void>;
    const adopted = this.closed
      ? undefined
      : adoptForOnread(socket, {
          buffer: () => (this.closed ? undefined : this.parser.directTarget(DIRECT_MIN)) ?? scratch,
          callback: (n, buf) => this.onRead(n, buf),
        });
    if (adopted) {
      this.scratch = scratch;
      this.readHooks = hooks;
      socket = adopted;
    } else socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket = socket;
    socket.on('drain', () => {
      this.lastProgress = performance.now();
      this.writeBlocked = false;
      this.pump();
    });
    socket.on('error', (e) => {
      this.lastSocketError = e;
    });
    socket.on('end', () => this.onSocketEnd());
    socket.on('close', () => this.onSocketEnd());
    this.socketGone = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  get state(): TransportState {
    return this.current;
  }

  /** The connection can no longer carry requests (CLOSED or DEAD). */
  get closed(): boolean {
    return this.current.kind === 'CLOSED' || this.current.kind === 'DEAD';
  }

  /** Requests on the wire, their payload bytes, and requests waiting to go. */
  get stats(): { inflightRequests: number; inflightBytes: number; queuedRequests: number } {
    return { inflightRequests: this.inflight.size, inflightBytes: this.inflightBytes, queuedRequests: this.queue.length - this.queueHead };
  }

  /** Runs one device operation; refused unless READY. close() waits for operations (including their follow-up requests). */
  async operation<T>(fn: () => Promise<T>): Promise<T> {
    const s = this.current;
    if (s.kind === 'CLOSED' || s.kind === 'DEAD') throw this.deadError();
    if (s.kind === 'CLOSING')
      throw this.shutdownReason
        ? new DeviceError('ESHUTDOWN', `${this.uri}: the server is shutting down`)
        : new DeviceError('EPIPE', `${this.uri}: the client is closing`);
    this.busy++;
    try {
      return await fn();
    } finally {
      this.busy--;
      this.checkIdle();
    }
  }

  /** Queues one request; resolves with it once its reply is complete and successful. */
  submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    opts: { payload?: readonly Buffer[]; into?: Buffer; at?: number } = {},
  ): Promise<PendingRequest> {
    if (this.closed) return Promise.reject(this.deadError());
    const bytes = type === C.NBD_CMD_READ ? length : (opts.payload ? length : 0);
    return new Promise<PendingRequest>((resolve, reject) => {
      const req = new PendingRequest(type, flags, offset, length, bytes, opts.payload, opts.into, opts.at ?? 0, (err, r) =>
        err ? reject(err) : resolve(r),
      );
      this.queue.push(req);
      this.pump();
    });
  }

  /**
   * Soft disconnect: new operations are refused (EPIPE), queued and in-flight
   * requests finish, then NBD_CMD_DISC is sent and the socket closed.
   * Resolves once the socket is gone; never rejects.
   */
  close(waitMs?: number): Promise<void> {
    if (this.closePromise) return this.closePromise;
    if (this.current.kind === 'READY') this.current = { kind: 'CLOSING' };
    this.closePromise = (async () => {
      if (waitMs === undefined) await this.idle();
      else if (!(await settledWithin(this.idle(), waitMs))) {
        // What is still in flight is given up: it rejects (ECONNRESET), and the socket is dropped.
        this.destroy();
        return;
      }
      if (this.closed) {
        this.socket.destroy();
        return;
      }
      this.socket.write(codec.encodeRequestHeader(0, C.NBD_CMD_DISC, codec.cookieFromNumber(this.nextCookie++), 0, 0));
      this.socket.end();
      this.current = { kind: 'CLOSED', reason: new Error('the client closed the connection') };
      const t = setTimeout(() => this.socket.destroy(), DISCONNECT_GRACE_MS);
      t.unref();
      await this.socketGone;
      clearTimeout(t);
      this.emitClose(this.shutdownReason, true);
    })();
    return this.closePromise;
  }

  /** Hard disconnect: drops the socket; everything pending rejects with ECONNRESET. Reports 'close' (no error). */
  destroy(): void {
    if (!this.closed) {
      this.current = { kind: 'DEAD', reason: new Error('connection destroyed by the client'), code: 'ECONNRESET' };
      this.rejectAll();
      this.emitClose(this.shutdownReason);
    }
    this.socket.destroy();
  }

  // ---------------------------------------------------------------- internals

  private deadError(): DeviceError {
    const s = this.current;
    const reason = s.kind === 'CLOSED' || s.kind === 'DEAD' ? s.reason : new Error('the connection is open');
    const code = s.kind === 'DEAD' ? s.code : 'EPIPE';
    return new DeviceError(code, `${this.uri}: NBD connection is closed: ${reason.message}`, { cause: reason });
  }

  /** Sends queued requests while the bounds and the socket allow. */
  private pump(): void {
    while (!this.closed && !this.writeBlocked && this.queueHead < this.queue.length) {
      const req = this.queue[this.queueHead]!;
      if (this.inflight.size >= this.limits.maxInflightRequests) break;
      if (this.inflight.size > 0 && this.inflightBytes + req.bytes > this.limits.maxInflightBytes) break;
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
    const header = codec.encodeRequestHeader(req.flags, req.type, codec.cookieFromNumber(req.cookie), req.offset, req.length);
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

  /** A read on the adopted socket: `n` bytes in `buf`, the scratch buffer or READ data read in place. */
  private onRead(n: number, buf: Buffer): void {
    if (this.closed) return;
    this.lastProgress = performance.now();
    for (const h of this.readHooks) h(buf);
    try {
      if (buf === this.scratch) this.parser.pushTransient(buf.subarray(0, n));
      else this.parser.landed(n);
    } catch (e) {
      if (e instanceof NbdProtocolError) this.fail(new NbdProtocolError(`protocol error from the server: ${e.message}`));
      else this.fail(e as Error);
    }
  }

  private onData(chunk: Buffer): void {
    if (this.closed) return;
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
    if (!this.closed) this.pump();
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

  private get nothingPending(): boolean {
    return this.busy === 0 && this.inflight.size === 0 && this.queueHead === this.queue.length;
  }

  private idle(): Promise<void> {
    if (this.closed || this.nothingPending) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private checkIdle(): void {
    if (this.closed || this.nothingPending) for (const fn of this.idleWaiters.splice(0)) fn();
  }

  /** The server closed (or the socket failed): fatal unless we were closing and had nothing pending. */
  private onSocketEnd(): void {
    if (this.closed) return;
    if (this.current.kind === 'CLOSING' && this.nothingPending) {
      this.current = { kind: 'CLOSED', reason: new Error('the server closed the connection') };
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
    const timeoutMs = this.limits.requestTimeoutMs;
    if (timeoutMs === 0 || this.watchdog || this.closed) return;
    const every = Math.max(10, Math.min(1000, Math.floor(timeoutMs / 4)));
    this.watchdog = setInterval(() => {
      if (this.closed || (this.inflight.size === 0 && this.queueHead === this.queue.length)) {
        clearInterval(this.watchdog);
        this.watchdog = undefined;
        return;
      }
      const quiet = performance.now() - this.lastProgress;
      if (this.inflight.size > 0 && quiet > timeoutMs) {
        const oldest = this.inflight.values().next().value as PendingRequest;
        this.fail(
          new Error(`no reply from the server for ${Math.round(quiet)} ms with ${this.inflight.size} request(s) outstanding ` +
            `(oldest: ${C.COMMAND_NAMES[oldest.type] ?? oldest.type} ${oldest.offset}+${oldest.length}); timeout ${timeoutMs} ms`),
          'ETIMEDOUT',
        );
      }
    }, every);
    this.watchdog.unref();
  }

  /** The connection died unexpectedly: everything pending rejects, 'close' carries the reason. */
  private fail(reason: Error, code = 'ECONNRESET'): void {
    if (this.closed) return;
    this.current = { kind: 'DEAD', reason, code };
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

  /** Reports 'close' once: asynchronously unless `now` (listeners must not run inside a caller's stack). */
  private emitClose(err: Error | undefined, now = false): void {
    if (this.closeEmitted) return;
    this.closeEmitted = true;
    const emit = () => this.onClose(err);
    if (now) emit();
    else process.nextTick(emit);
  }
}
