/**
 * The transmission phase of one connection: requests are parsed incrementally
 * from the input queue, validated in one place, run concurrently against the
 * export's device, and answered as they complete (out of order).
 *
 * Bounds: at most `maxInflightRequests` requests and `maxInflightBytes` payload
 * bytes in flight, and at most `maxQueuedReplyBytes` waiting in the socket;
 * past any of them the session stops reading, so TCP pushes back on the client.
 */
import * as C from '../protocol/constants.js';
import * as codec from '../protocol/codec.js';
import type { Connection } from './connection.js';
import { nbdErrorFor, nbdErrorName } from './errno.js';
import type { Negotiated } from './handshake.js';
import { incomingJobOf } from './export.js';
import { MemoryBudget } from './memory-budget.js';

export interface SessionLimits {
  maxInflightRequests: number;
  maxInflightBytes: number;
  maxQueuedReplyBytes: number;
  /** A connection with nothing in flight and no traffic for this long is closed; 0 = never. */
  idleTimeoutMs: number;
}

export const DEFAULT_SESSION_LIMITS: SessionLimits = {
  maxInflightRequests: 128,
  maxInflightBytes: 64 * 1024 * 1024,
  maxQueuedReplyBytes: 64 * 1024 * 1024,
  idleTimeoutMs: 0,
};

/** A WRITE payload that receives nothing for this long ends the connection (its memory is charged meanwhile). */
const PAYLOAD_STALL_MS = 30_000;

/** Extents per BLOCK_STATUS chunk: 4 + 8n bytes must stay within QEMU's 1000-byte limit. */
const MAX_EXTENTS_PER_CHUNK = Math.floor((C.MAX_NON_DATA_PAYLOAD - 4) / 8);

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
  [C.NBD_CMD_MIGRATE_COMPLETE]: 0,
  [C.NBD_CMD_MIGRATE_RELEASE]: 0,
};

interface Refusal {
  error: number;
  message: string;
}

export class Session {
  private inflight = 0;
  private inflightBytes = 0;
  /** Bytes of a refused WRITE's payload still to be read and dropped. */
  private discardLeft = 0;
  /** The refused WRITE being drained: answered only once its payload is gone (libnbd matches replies to fully sent requests). */
  private drainingRefusal: { h: codec.RequestHeader; refusal: Refusal } | undefined;
  /** A WRITE whose header is parsed and whose payload is still arriving. */
  private pendingWrite: codec.RequestHeader | undefined;
  private paused = false;
  /** DISC received: read nothing more, close once idle. */
  private stopping = false;
  /** The server is shutting down: new requests are refused with ESHUTDOWN. */
  private shuttingDown = false;
  private idleWaiters: Array<() => void> = [];
  private readonly flags: number;

  private readonly onBudget = () => this.maybeResume();
  private payloadTimer: NodeJS.Timeout | undefined;
  private payloadSeen = -1;

  /** Disconnects a client whose WRITE payload makes no progress for PAYLOAD_STALL_MS. */
  private armPayloadTimer(buffered: number): void {
    if (buffered === this.payloadSeen && this.payloadTimer) return;
    this.payloadSeen = buffered;
    clearTimeout(this.payloadTimer);
    this.payloadTimer = setTimeout(() => {
      this.conn.log.warn('payload-stalled', { export: this.n.export.name, waitedMs: PAYLOAD_STALL_MS, action: 'disconnect' });
      this.conn.destroy();
    }, PAYLOAD_STALL_MS);
    this.payloadTimer.unref();
  }

  constructor(
    private readonly conn: Connection,
    private readonly n: Negotiated,
    private readonly limits: SessionLimits = DEFAULT_SESSION_LIMITS,
    private readonly budget: MemoryBudget = new MemoryBudget(Number.POSITIVE_INFINITY),
  ) {
    this.flags = n.export.transmissionFlags(n.structuredReplies);
    conn.socket.on('drain', () => this.maybeResume());
    budget.wait(this.onBudget);
    conn.onClose(() => {
      budget.unwait(this.onBudget);
      // A WRITE whose payload never came gives its memory back.
      const h = this.pendingWrite;
      this.pendingWrite = undefined;
      if (h) this.finish(h.length);
      clearTimeout(this.payloadTimer);
    });
    if (limits.idleTimeoutMs > 0) {
      conn.socket.setTimeout(limits.idleTimeoutMs);
      conn.socket.on('timeout', () => {
        if (this.inflight > 0 || this.pendingWrite) return; // busy, just quiet on the wire
        conn.log.info('idle-timeout', { export: n.export.name, idleMs: limits.idleTimeoutMs, action: 'disconnect' });
        conn.destroy();
      });
    }
    conn.onClose(() => this.notifyIdle());
  }

  get exportName(): string {
    return this.n.export.name;
  }

  start(): void {
    this.conn.log.info('transmission', {
      export: this.n.export.name,
      structuredReplies: this.n.structuredReplies,
      metaContexts: this.n.metaContexts.map((m) => m.name),
    });
    this.conn.takeOver(() => this.pump());
  }

  /** Hard disconnect; true if the connection was open. */
  destroy(reason: string): boolean {
    if (this.conn.closed) return false;
    this.conn.log.info('connection-dropped', { export: this.n.export.name, reason });
    this.conn.destroy();
    return true;
  }

  get remoteAddress(): string | undefined {
    return this.conn.remoteAddress;
  }

  /**
   * Server shutdown (proto.md, "Terminating the transmission phase"): requests
   * in flight finish; any request that arrives from now on is answered
   * NBD_ESHUTDOWN, on which the client must soft-disconnect. Once nothing is in
   * flight the connection is closed softly (replies flushed first). Resolves then.
   */
  async shutdown(): Promise<void> {
    this.shuttingDown = true;
    await this.idle();
    if (!this.conn.closed) {
      this.conn.log.info('connection-dropped', { export: this.n.export.name, reason: 'shutdown' });
      this.conn.end();
    }
  }

  private idle(): Promise<void> {
    if (this.inflight === 0 || this.conn.closed) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private notifyIdle(): void {
    for (const fn of this.idleWaiters.splice(0)) fn();
  }

  private throttled(): boolean {
    return (
      this.inflight >= this.limits.maxInflightRequests ||
      this.inflightBytes >= this.limits.maxInflightBytes ||
      this.conn.socket.writableLength >= this.limits.maxQueuedReplyBytes ||
      this.budget.exhausted
    );
  }

  private maybeResume(): void {
    if (this.paused && !this.stopping && !this.throttled()) {
      this.paused = false;
      this.conn.socket.resume();
      this.pump();
    }
  }

  /** Parses as many complete requests as the input holds. */
  private pump(): void {
    const input = this.conn.input;
    while (!this.stopping && !this.conn.closed) {
      if (this.discardLeft > 0) {
        this.discardLeft -= input.drop(this.discardLeft);
        if (this.discardLeft > 0) return;
        const d = this.drainingRefusal;
        this.drainingRefusal = undefined;
        if (d) this.sendError(d.h, d.refusal.error, d.refusal.message);
        continue;
      }
      if (this.pendingWrite) {
        const h = this.pendingWrite;
        if (input.length < h.length) {
          // More payload to come; reading stays on. A payload that stops arriving is not waited for forever.
          this.armPayloadTimer(input.length);
          return;
        }
        clearTimeout(this.payloadTimer);
        this.payloadTimer = undefined;
        this.pendingWrite = undefined;
        this.runWrite(h, input.takeSlices(h.length));
        continue;
      }
      if (this.throttled()) {
        this.paused = true;
        this.conn.socket.pause();
        return;
      }
      if (input.length < C.REQUEST_HEADER_LENGTH) return;
      const h = codec.decodeRequestHeader(input.peek(C.REQUEST_HEADER_LENGTH));
      input.drop(C.REQUEST_HEADER_LENGTH);
      if (h.magic !== C.NBD_REQUEST_MAGIC) {
        this.conn.log.warn('protocol-violation', { cause: `bad request magic 0x${h.magic.toString(16)}`, action: 'disconnect' });
        this.conn.destroy();
        return;
      }
      this.dispatch(h);
    }
  }

  private dispatch(h: codec.RequestHeader): void {
    // "There is no reply to an NBD_CMD_DISC", whatever its flags: it is always a disconnect.
    if (h.type === C.NBD_CMD_DISC) {
      this.conn.log.debug('disconnect-requested', { flags: h.flags });
      this.stopping = true;
      this.conn.socket.pause(); // nothing after DISC is read; end() discards what comes
      this.conn.input.clear();
      void this.idle().then(() => this.conn.end());
      return;
    }
    const refusal = this.validate(h);
    if (refusal) {
      this.conn.log.info('request-refused', {
        command: C.COMMAND_NAMES[h.type] ?? h.type,
        offset: h.offset,
        length: h.length,
        flags: h.flags,
        errno: nbdErrorName(refusal.error),
        cause: refusal.message,
      });
      this.n.export.stats.op(h.type).error(nbdErrorName(refusal.error));
      // The payload of a refused WRITE is drained so the stream stays in sync, then answered.
      if (h.type === C.NBD_CMD_WRITE && h.length > 0) {
        this.discardLeft = h.length;
        this.drainingRefusal = { h, refusal };
        return;
      }
      this.sendError(h, refusal.error, refusal.message);
      return;
    }
    switch (h.type) {
      case C.NBD_CMD_WRITE:
        // Charged now, before its payload arrives: memory for payloads being received is bounded too.
        this.begin(h.length);
        this.pendingWrite = h; // pump() runs it once the payload is in
        return;
      default:
        this.run(h);
    }
  }

  /** The one place a request is checked; the error values follow proto.md "Error values". */
  private validate(h: codec.RequestHeader): Refusal | undefined {
    if (this.shuttingDown) return { error: C.NBD_ESHUTDOWN, message: 'the server is shutting down' };
    const exp = this.n.export;
    const allowed = ALLOWED_FLAGS[h.type];
    if (allowed === undefined) return { error: C.NBD_EINVAL, message: `unknown command ${h.type}` };
    let valid = allowed;
    if (!(this.flags & C.NBD_FLAG_SEND_FUA)) valid &= ~C.NBD_CMD_FLAG_FUA;
    if (!(this.flags & C.NBD_FLAG_SEND_FAST_ZERO)) valid &= ~C.NBD_CMD_FLAG_FAST_ZERO;
    if (!this.n.structuredReplies) valid &= ~C.NBD_CMD_FLAG_DF;
    if (h.flags & ~valid) return { error: C.NBD_EINVAL, message: `flags 0x${h.flags.toString(16)} not valid for ${C.COMMAND_NAMES[h.type]}` };

    const writes = h.type === C.NBD_CMD_WRITE || h.type === C.NBD_CMD_TRIM || h.type === C.NBD_CMD_WRITE_ZEROES;
    if (writes && exp.readOnly) return { error: C.NBD_EPERM, message: `export "${exp.name}" is read-only` };

    if ((h.type === C.NBD_CMD_READ || h.type === C.NBD_CMD_WRITE) && h.length > C.MAX_PAYLOAD)
      return { error: C.NBD_EINVAL, message: `${h.length} bytes is over the ${C.MAX_PAYLOAD}-byte maximum block size` };

    if (h.type !== C.NBD_CMD_FLUSH && h.type !== C.NBD_CMD_DISC && h.offset + h.length > exp.size) {
      const error = h.type === C.NBD_CMD_WRITE || h.type === C.NBD_CMD_WRITE_ZEROES ? C.NBD_ENOSPC : C.NBD_EINVAL;
      return { error, message: `range ${h.offset}+${h.length} is beyond the end of the ${exp.size}-byte export` };
    }
    if ((h.type === C.NBD_CMD_MIGRATE_COMPLETE || h.type === C.NBD_CMD_MIGRATE_RELEASE) && !incomingJobOf(this.n.metaContexts))
      return { error: C.NBD_EINVAL, message: `unknown command ${h.type}` };
    if (h.type === C.NBD_CMD_BLOCK_STATUS) {
      if (this.n.metaContexts.length === 0) return { error: C.NBD_EINVAL, message: 'no metadata context was negotiated' };
      if (h.length === 0) return { error: C.NBD_EINVAL, message: 'block status of zero length' };
    }
    return undefined;
  }

  private begin(bytes: number): void {
    this.inflight++;
    this.inflightBytes += bytes;
    this.budget.charge(bytes);
  }

  /** `budgetHeld`: the bytes stay charged to the server budget until their reply is flushed. */
  private finish(bytes: number, budgetHeld = false): void {
    this.inflight--;
    this.inflightBytes -= bytes;
    if (!budgetHeld) this.budget.release(bytes);
    if (this.inflight === 0) this.notifyIdle();
    this.maybeResume();
  }

  private runWrite(h: codec.RequestHeader, data: Buffer[]): void {
    const started = performance.now();
    const fua = (h.flags & C.NBD_CMD_FLAG_FUA) !== 0;
    this.n.export.device.write(h.offset, data, { fua }).then(
      () => {
        this.account(h, started);
        this.sendOk(h);
      },
      (e) => this.sendFailure(h, e),
    ).finally(() => this.finish(h.length));
  }

  private run(h: codec.RequestHeader): void {
    const bytes = h.type === C.NBD_CMD_READ ? h.length : 0;
    this.begin(bytes);
    const started = performance.now();
    let replyHoldsBudget = false;
    this.execute(h).then(
      (held) => {
        replyHoldsBudget = held === true;
        this.account(h, started);
      },
      (e) => this.sendFailure(h, e),
    ).finally(() => this.finish(bytes, replyHoldsBudget));
  }

  /** Runs a request and replies; resolves true when a READ reply now holds its bytes' budget. */
  private async execute(h: codec.RequestHeader): Promise<boolean | void> {
    const dev = this.n.export.device;
    const fua = (h.flags & C.NBD_CMD_FLAG_FUA) !== 0;
    switch (h.type) {
      case C.NBD_CMD_READ:
        return this.read(h);
      case C.NBD_CMD_FLUSH:
        await dev.flush();
        break;
      case C.NBD_CMD_TRIM:
        await dev.trim(h.offset, h.length, { fua });
        break;
      case C.NBD_CMD_WRITE_ZEROES:
        await dev.zero(h.offset, h.length, {
          fua,
          noHole: (h.flags & C.NBD_CMD_FLAG_NO_HOLE) !== 0,
          fast: (h.flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0,
        });
        break;
      case C.NBD_CMD_CACHE:
        await dev.cache(h.offset, h.length);
        break;
      case C.NBD_CMD_BLOCK_STATUS:
        return this.blockStatus(h);
      case C.NBD_CMD_MIGRATE_COMPLETE:
        await this.n.export.completeIncoming(incomingJobOf(this.n.metaContexts)!.jobId);
        this.conn.log.info('migration-received', { export: this.n.export.name });
        break;
      case C.NBD_CMD_MIGRATE_RELEASE:
        this.n.export.releaseIncoming(incomingJobOf(this.n.metaContexts)!.jobId);
        break;
    }
    this.sendOk(h);
  }

  /** Reads and replies; true when the queued reply now holds the bytes' budget (released once flushed). */
  private async read(h: codec.RequestHeader): Promise<boolean> {
    const dev = this.n.export.device;
    let buf: Buffer;
    if (this.n.structuredReplies) {
      if (h.length === 0) {
        this.conn.send(codec.encodeStructuredNone(h.cookie));
        return false;
      }
      // One allocation holds the chunk header and the data; the device reads straight into it.
      buf = Buffer.allocUnsafe(codec.OFFSET_DATA_PREFIX + h.length);
      await dev.read(h.offset, h.length, buf, codec.OFFSET_DATA_PREFIX);
      codec.writeOffsetDataPrefix(buf, C.NBD_REPLY_FLAG_DONE, h.cookie, h.offset, h.length);
    } else {
      buf = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_LENGTH + h.length);
      await dev.read(h.offset, h.length, buf, C.SIMPLE_REPLY_HEADER_LENGTH);
      codec.writeSimpleReplyHeader(buf, 0, 0, h.cookie);
    }
    const length = h.length;
    return this.conn.send(buf, () => this.budget.release(length)) !== undefined;
  }

  private async blockStatus(h: codec.RequestHeader): Promise<void> {
    const max = h.flags & C.NBD_CMD_FLAG_REQ_ONE ? 1 : MAX_EXTENTS_PER_CHUNK;
    const contexts = this.n.metaContexts;
    const chunks = await Promise.all(contexts.map((m) => m.extents(h.offset, h.length, max)));
    contexts.forEach((m, i) => {
      this.conn.send(codec.encodeBlockStatusChunk(h.cookie, i === contexts.length - 1, m.id, chunks[i]!.slice(0, max)));
    });
  }

  private sendOk(h: codec.RequestHeader): void {
    this.conn.send(codec.encodeSimpleReply(0, h.cookie));
  }

  private sendFailure(h: codec.RequestHeader, e: unknown): void {
    const error = nbdErrorFor(e);
    this.account(h, 0, error);
    this.conn.log.warn('request-failed', {
      command: C.COMMAND_NAMES[h.type] ?? h.type,
      offset: h.offset,
      length: h.length,
      errno: nbdErrorName(error),
      cause: e,
    });
    this.sendError(h, error, (e as Error)?.message ?? String(e));
  }

  /** Counts a finished request in the export's statistics. */
  private account(h: codec.RequestHeader, started: number, error?: number): void {
    const op = this.n.export.stats.op(h.type);
    if (error) op.error(nbdErrorName(error));
    else op.observe(h.type === C.NBD_CMD_READ || h.type === C.NBD_CMD_WRITE ? h.length : 0, (performance.now() - started) / 1000);
  }

  private sendError(h: codec.RequestHeader, error: number, message: string): void {
    // With structured replies READ may not get a simple reply; errors carry their message in a chunk.
    if (this.n.structuredReplies) this.conn.send(codec.encodeStructuredError(h.cookie, error, message));
    else this.conn.send(codec.encodeSimpleReply(error, h.cookie));
  }
}
