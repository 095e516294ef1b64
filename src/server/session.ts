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
import { settledWithin } from '../util/within.js';
import * as codec from '../protocol/codec.js';
import type { ChunkOwner } from '../util/byte-queue.js';
import { returnReplyBuffer, takeReplyBuffer } from './reply-pool.js';
import type { Connection } from './connection.js';
import { nbdErrorFor, nbdErrorName } from './errno.js';
import type { Negotiated } from './handshake.js';
import { MemoryBudget } from './memory-budget.js';
import { validateRequest, type Refusal, type RequestContext } from './validate.js';

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

/** READs of at least this many bytes are sent from the image's file when they can be (sendfile): fio randread at 128 KiB 3506 against 2963 MB/s copied, at 64 KiB 3566 against 3801 (medians of 3). Smaller ones are copied. */
const SENDFILE_MIN = 128 * 1024;

/** What the session reads next. */
type Input =
  | { readonly kind: 'header' }
  /** Nothing: a bound is reached, the socket is paused until it clears (maybeResume). */
  | { readonly kind: 'paused' }
  /** The payload of a WRITE that runs once it is in (its bytes are charged already). */
  | { readonly kind: 'payload'; readonly h: codec.RequestHeader }
  /** The payload of a refused WRITE, dropped; the refusal is sent once it is gone (libnbd matches replies to fully sent requests). */
  | { readonly kind: 'discard'; readonly h: codec.RequestHeader; readonly refusal: Refusal; left: number };

/** Where the session is in its life (proto.md "Terminating the transmission phase"). */
type Phase =
  | { readonly kind: 'serving'; input: Input }
  /** Server shutdown: every request read from now on is refused with ESHUTDOWN; a soft close follows once idle. */
  | { readonly kind: 'shutting-down'; input: Input }
  /**
   * Handoff after a cutover (--handoff disconnect): no new request is read (the payload
   * of a WRITE already begun is); requests read are completed and answered, then a soft close.
   */
  | { readonly kind: 'handing-off'; input: Input }
  /** NBD_CMD_DISC received: nothing more is read; a soft close follows once idle. */
  | { readonly kind: 'disconnecting' }
  /** The connection is gone. */
  | { readonly kind: 'closed' };

const HEADER: Input = { kind: 'header' };
const PAUSED: Input = { kind: 'paused' };

export class Session {
  private inflight = 0;
  private inflightBytes = 0;
  private phase: Phase = { kind: 'serving', input: HEADER };
  private idleWaiters: Array<() => void> = [];
  private readonly flags: number;
  /** The export extension's commands, and whether this connection may send each (decided once, at attach). */
  private readonly extraCommands: ReadonlyMap<number, boolean>;

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
    this.extraCommands = new Map([...(n.export.extension?.commands ?? [])].map(([type, cmd]) => [type, cmd.permitted(n.metaContexts)]));
    conn.socket.on('drain', () => this.maybeResume());
    budget.wait(this.onBudget);
    conn.onClose(() => {
      budget.unwait(this.onBudget);
      const input = this.input;
      this.phase = { kind: 'closed' };
      // A WRITE whose payload never came gives its memory back.
      if (input?.kind === 'payload') this.finish(input.h.length);
      clearTimeout(this.payloadTimer);
    });
    if (limits.idleTimeoutMs > 0) {
      conn.socket.setTimeout(limits.idleTimeoutMs);
      conn.socket.on('timeout', () => {
        if (this.inflight > 0 || this.input?.kind === 'payload') return; // busy, just quiet on the wire
        conn.log.info('idle-timeout', { export: n.export.name, idleMs: limits.idleTimeoutMs, action: 'disconnect' });
        conn.destroy();
      });
    }
    conn.onClose(() => this.notifyIdle());
  }

  /** What is read next; undefined once nothing more is read. */
  private get input(): Input | undefined {
    const p = this.phase;
    return p.kind === 'serving' || p.kind === 'shutting-down' || p.kind === 'handing-off' ? p.input : undefined;
  }

  private setInput(input: Input): void {
    const p = this.phase;
    if (p.kind === 'serving' || p.kind === 'shutting-down' || p.kind === 'handing-off') p.input = input;
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
    if (this.phase.kind === 'serving') this.phase = { kind: 'shutting-down', input: this.phase.input };
    await this.idle();
    if (!this.conn.closed) {
      this.conn.log.info('connection-dropped', { export: this.n.export.name, reason: 'shutdown' });
      this.conn.end();
    }
  }

  /**
   * Handoff after a cutover (--handoff disconnect): stops reading requests (a
   * WRITE whose payload is arriving is read to its end), lets every request
   * already read (the writes held during the switch among them) complete on
   * the export's device, now the target, and be answered, then closes softly:
   * a client never gets an error for a write that landed. The client resends
   * what it sent after that on its next connection (QEMU's reconnect-delay).
   * Past `timeoutMs` the connection is closed hard. Resolves once closed, with
   * the number of requests answered meanwhile.
   */
  async handOff(timeoutMs: number): Promise<number> {
    if (this.conn.closed) return 0;
    const p = this.phase;
    if (p.kind !== 'serving' && p.kind !== 'shutting-down') return 0;
    this.phase = { kind: 'handing-off', input: p.input };
    const started = this.inflight;
    if (p.input.kind === 'header' || p.input.kind === 'paused') this.conn.socket.pause();
    const timedOut = !(await settledWithin(this.idle(), timeoutMs));
    if (this.conn.closed) return started;
    if (timedOut) {
      this.conn.log.warn('handoff-timeout', { export: this.n.export.name, timeoutMs, inflight: this.inflight, action: 'disconnect' });
      this.conn.destroy();
      return started - this.inflight;
    }
    this.conn.log.info('connection-dropped', { export: this.n.export.name, reason: 'handoff', answered: started });
    this.conn.end();
    return started;
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
    if (this.input?.kind === 'paused' && !this.throttled() && this.phase.kind !== 'handing-off') {
      this.setInput(HEADER);
      this.conn.socket.resume();
      this.pump();
    }
  }

  /** Parses as many complete requests as the input holds. */
  private pump(): void {
    const input = this.conn.input;
    while (!this.conn.closed) {
      const next = this.input;
      // Nothing read after DISC; and once paused only maybeResume() reads on.
      if (next === undefined || next.kind === 'paused') return;
      // Handing off: the request being read is finished; nothing new is read.
      if (next.kind === 'header' && this.phase.kind === 'handing-off') {
        this.conn.socket.pause();
        return;
      }
      if (next.kind === 'discard') {
        next.left -= input.drop(next.left);
        if (next.left > 0) return;
        this.setInput(HEADER);
        this.sendError(next.h, next.refusal.error, next.refusal.message);
        continue;
      }
      if (next.kind === 'payload') {
        const h = next.h;
        if (input.length < h.length) {
          // More payload to come; reading stays on. A payload that stops arriving is not waited for forever.
          this.armPayloadTimer(input.length);
          return;
        }
        clearTimeout(this.payloadTimer);
        this.payloadTimer = undefined;
        this.setInput(HEADER);
        const held: ChunkOwner[] = [];
        this.runWrite(h, input.takeSlices(h.length, held), held);
        continue;
      }
      if (this.throttled()) {
        this.setInput(PAUSED);
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
      this.phase = { kind: 'disconnecting' };
      this.conn.socket.pause(); // nothing after DISC is read; end() discards what comes
      this.conn.input.clear();
      void this.idle().then(() => this.conn.end());
      return;
    }
    const refusal = validateRequest(h, this.requestContext());
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
        this.setInput({ kind: 'discard', h, refusal, left: h.length });
        return;
      }
      this.sendError(h, refusal.error, refusal.message);
      return;
    }
    switch (h.type) {
      case C.NBD_CMD_WRITE:
        // Charged now, before its payload arrives: memory for payloads being received is bounded too.
        this.begin(h.length);
        this.setInput({ kind: 'payload', h }); // pump() runs it once the payload is in
        return;
      default:
        this.run(h);
    }
  }

  /** What validateRequest() needs; the export's size and writability are read as they are now. */
  private requestContext(): RequestContext {
    const exp = this.n.export;
    return {
      transmissionFlags: this.flags,
      structuredReplies: this.n.structuredReplies,
      exportName: exp.name,
      readOnly: exp.readOnly,
      size: exp.size,
      metaContexts: this.n.metaContexts.length,
      extraCommands: this.extraCommands,
      shuttingDown: this.phase.kind === 'shutting-down',
    };
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

  /** `held`: the receive slabs the payload sits in, released once the device is done with it. */
  private runWrite(h: codec.RequestHeader, data: Buffer[], held: ChunkOwner[]): void {
    const started = performance.now();
    const fua = (h.flags & C.NBD_CMD_FLAG_FUA) !== 0;
    const dev = this.n.export.device;
    // Made within this call when nothing on the way can wait (Device.writeNow): no promise per layer.
    if (!fua && dev.writeNow?.(h.offset, data) === true) {
      for (const o of held) o.unref();
      this.account(h, started);
      this.sendOk(h);
      this.finish(h.length);
      return;
    }
    dev.write(h.offset, data, { fua }).then(
      () => {
        this.account(h, started);
        this.sendOk(h);
      },
      (e) => this.sendFailure(h, e),
    ).finally(() => {
      for (const o of held) o.unref();
      this.finish(h.length);
    });
  }

  private run(h: codec.RequestHeader): void {
    const bytes = h.type === C.NBD_CMD_READ ? h.length : 0;
    this.begin(bytes);
    const started = performance.now();
    if (h.type === C.NBD_CMD_READ && h.length > 0) {
      // At hand: sent from the image's file, or copied from the page cache, within this turn.
      const held = (h.length >= SENDFILE_MIN ? this.sendFromFile(h) : undefined) ?? this.readNow(h);
      if (held !== undefined) {
        this.account(h, started);
        this.finish(bytes, held);
        return;
      }
    }
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
      default: {
        // Validated: one of the export extension's commands, permitted to this connection.
        const cmd = this.n.export.extension!.commands.get(h.type)!;
        await cmd.run(this.n.metaContexts);
      }
    }
    this.sendOk(h);
  }

  /** The reply's header length before its data: an offset-data chunk's, or a simple reply's. */
  private get readPrefix(): number {
    return this.n.structuredReplies ? codec.OFFSET_DATA_PREFIX : C.SIMPLE_REPLY_HEADER_LENGTH;
  }

  /**
   * A READ answered in this turn when the device has the data at hand (Device.readNow): as
   * read() resolves, or undefined (nothing sent) when it has not.
   */
  private readNow(h: codec.RequestHeader): boolean | undefined {
    const dev = this.n.export.device;
    if (!dev.readNow) return undefined;
    const buf = takeReplyBuffer(this.readPrefix + h.length);
    if (!dev.readNow(h.offset, h.length, buf, this.readPrefix)) {
      returnReplyBuffer(buf);
      return undefined;
    }
    return this.sendRead(h, buf);
  }

  /** The header of a READ reply sent from the file: reused, sendFileReply is done with it when it returns. */
  private fileReplyHeader: Buffer | undefined;

  /**
   * A READ answered in this turn from the file that holds its data (Device.fileRange,
   * Connection.sendFileReply), as read() resolves; undefined (nothing sent) when it cannot be.
   */
  private sendFromFile(h: codec.RequestHeader): boolean | undefined {
    const range = this.n.export.device.fileRange?.(h.offset, h.length);
    if (range === undefined) return undefined;
    const header = (this.fileReplyHeader ??= Buffer.alloc(this.readPrefix));
    this.writeReadHeader(header, h);
    const length = h.length;
    const r = this.conn.sendFileReply(header, range.fd, range.position, length, () => this.budget.release(length));
    return r === undefined ? undefined : r === 'queued';
  }

  /** Reads and replies; true when the queued reply now holds the bytes' budget (released once flushed). */
  private async read(h: codec.RequestHeader): Promise<boolean> {
    if (this.n.structuredReplies && h.length === 0) {
      this.conn.send(codec.encodeStructuredNone(h.cookie));
      return false;
    }
    // One allocation holds the reply's header and the data; the device reads straight into it.
    const buf = takeReplyBuffer(this.readPrefix + h.length);
    await this.n.export.device.read(h.offset, h.length, buf, this.readPrefix);
    return this.sendRead(h, buf);
  }

  /** Sends a READ's data (in `buf`, after the header room); true when the reply holds the bytes' budget until flushed. */
  private sendRead(h: codec.RequestHeader, buf: Buffer): boolean {
    this.writeReadHeader(buf, h);
    const length = h.length;
    const queued = this.conn.send(buf, () => {
      this.budget.release(length);
      returnReplyBuffer(buf);
    });
    if (queued === undefined) returnReplyBuffer(buf);
    return queued !== undefined;
  }

  /** A successful READ reply's header, at the start of `buf`: an offset-data chunk's, or a simple reply's. */
  private writeReadHeader(buf: Buffer, h: codec.RequestHeader): void {
    if (this.n.structuredReplies) codec.writeOffsetDataPrefix(buf, C.NBD_REPLY_FLAG_DONE, h.cookie, h.offset, h.length);
    else codec.writeSimpleReplyHeader(buf, 0, 0, h.cookie);
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
    const error = nbdErrorFor(e, h.flags);
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
