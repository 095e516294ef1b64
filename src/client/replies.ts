/**
 * Transmission-phase reply parsing for the client: simple replies and
 * structured reply chunks, decoded incrementally from a ByteQueue and matched
 * to pending requests by cookie. READ data (simple-reply payloads and
 * OFFSET_DATA chunks) is copied from the received chunks straight into the
 * caller's buffer as it arrives; nothing else is buffered beyond one chunk.
 *
 * Anything that leaves the stream's framing in doubt (bad magic, unknown
 * cookie, an unknown non-error chunk type, inconsistent lengths or offsets)
 * throws NbdProtocolError: the caller must drop the connection.
 */
import * as C from '../protocol/constants.js';
import { cookieText, cookieToNumber, readU64, type Cookie, type Extent } from '../protocol/codec.js';
import {
  chunkProblem,
  decodeBlockStatus,
  decodeChunkHeader,
  decodeErrorChunk,
  decodeOffsetHole,
  decodeSimpleReplyHeader,
  errorChunkProblem,
  type ReplyError,
} from '../protocol/replies.js';
import { ByteQueue, type ChunkOwner } from '../util/byte-queue.js';
import { NbdProtocolError } from './errors.js';

export { MAX_CHUNK_PAYLOAD, type ReplyError } from '../protocol/replies.js';

/** A request on the wire (or queued to go on it), as the parser needs to see it. */
export class PendingRequest {
  cookie = 0;
  /** First error reported for this request. */
  error: ReplyError | undefined;
  /** The reply was a simple reply (no structured chunks). */
  simple = false;
  /** BLOCK_STATUS: descriptors by metadata context id. */
  statuses: Map<number, Extent[]> | undefined;
  /** WRITE payload; dropped once handed to the socket. */
  payload: readonly Buffer[] | undefined;
  /** Structured READ: merged [start, end) ranges (relative to `offset`) described by content chunks. */
  private ranges: number[] = [];

  constructor(
    readonly type: number,
    readonly flags: number,
    readonly offset: number,
    readonly length: number,
    /** Bytes counted against the in-flight byte budget. */
    readonly bytes: number,
    payload: readonly Buffer[] | undefined,
    /** READ destination and where in it `offset` lands. */
    readonly into: Buffer | undefined,
    readonly at: number,
    readonly settle: (err: Error | undefined, req: PendingRequest) => void,
  ) {
    this.payload = payload;
  }

  /** Records a content chunk's range; false if it overlaps one already seen. */
  addRange(start: number, end: number): boolean {
    const r = this.ranges;
    // Fast path: chunks usually arrive in order.
    if (r.length === 0 || start >= r[r.length - 1]!) {
      if (r.length > 0 && start === r[r.length - 1]) r[r.length - 1] = end;
      else r.push(start, end);
      return true;
    }
    // Binary search for the first range ending after `start`.
    let lo = 0;
    let hi = r.length / 2;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (r[2 * mid + 1]! <= start) lo = mid + 1;
      else hi = mid;
    }
    const i = 2 * lo;
    if (i < r.length && r[i]! < end) return false; // overlaps range lo
    // Insert, merging with neighbours that touch.
    const touchPrev = i > 0 && r[i - 1] === start;
    const touchNext = i < r.length && r[i] === end;
    if (touchPrev && touchNext) {
      r[i - 1] = r[i + 1]!;
      r.splice(i, 2);
    } else if (touchPrev) r[i - 1] = end;
    else if (touchNext) r[i] = start;
    else r.splice(i, 0, start, end);
    return true;
  }

  /** Content chunks described every byte of the request. */
  get fullyCovered(): boolean {
    return this.length === 0 || (this.ranges.length === 2 && this.ranges[0] === 0 && this.ranges[1] === this.length);
  }
}

export interface ReplySink {
  /** The request with this cookie, if one is in flight. */
  lookup(cookie: number): PendingRequest | undefined;
  /** The request's reply is complete (successful or not): it is no longer in flight. */
  done(req: PendingRequest): void;
}

type State =
  | { kind: 'header' }
  /** Simple-reply READ data still to copy. */
  | { kind: 'simple-data'; req: PendingRequest; pos: number; left: number }
  /** OFFSET_DATA: its 8-byte offset is next. */
  | { kind: 'data-offset'; req: PendingRequest; flags: number; dataLength: number }
  /** OFFSET_DATA bytes still to copy. */
  | { kind: 'data'; req: PendingRequest; flags: number; pos: number; left: number }
  /** A non-data chunk payload, handled once complete. */
  | { kind: 'payload'; req: PendingRequest; flags: number; type: number; length: number };

const HEADER: State = { kind: 'header' };

/** Marks chunks whose memory is reused after pushTransient returns: the queue copies what it keeps of them. */
const TRANSIENT: ChunkOwner = { ref() {}, unref() {} };

export class ReplyParser {
  readonly input = new ByteQueue();
  private state: State = HEADER;
  /** takeSlices' references (TRANSIENT's, which need no release). */
  private readonly held: ChunkOwner[] = [];

  constructor(
    private readonly structured: boolean,
    private readonly sink: ReplySink,
  ) {}

  /** True between replies (nothing half-parsed). */
  get idle(): boolean {
    return this.state.kind === 'header' && this.input.length === 0;
  }

  push(chunk: Buffer): void {
    this.input.push(chunk);
    this.parse();
  }

  /**
   * Parses a chunk whose memory is reused once this returns (a read into the
   * transport's reused buffer): what is left unparsed (part of a header or of
   * a non-data chunk) is copied out of it.
   */
  pushTransient(chunk: Buffer): void {
    this.input.push(chunk, TRANSIENT);
    try {
      this.parse();
    } finally {
      const q = this.input;
      if (q.length > 0) {
        this.held.length = 0;
        for (const slice of q.takeSlices(q.length, this.held)) q.push(slice.buffer === chunk.buffer ? Buffer.from(slice) : slice);
        this.held.length = 0;
      }
    }
  }

  /**
   * Where the next read may land in place: the rest of the READ data being
   * received, when at least `min` bytes of it are still to come and nothing is
   * buffered ahead of it. Undefined otherwise.
   */
  directTarget(min: number): Buffer | undefined {
    const s = this.state;
    if ((s.kind !== 'simple-data' && s.kind !== 'data') || s.left < min || this.input.length > 0) return undefined;
    return s.req.into!.subarray(s.pos, s.pos + s.left);
  }

  /** `n` bytes were read in place into the buffer directTarget() returned. */
  landed(n: number): void {
    const s = this.state;
    if (s.kind !== 'simple-data' && s.kind !== 'data') throw new Error(`${n} bytes read in place with no READ data expected`);
    s.pos += n;
    s.left -= n;
    if (s.left > 0) return;
    this.state = HEADER;
    if (s.kind === 'simple-data' || s.flags & C.NBD_REPLY_FLAG_DONE) this.sink.done(s.req);
  }

  /** Consumes everything parseable; throws NbdProtocolError on a violation. */
  parse(): void {
    const q = this.input;
    for (;;) {
      const s = this.state;
      switch (s.kind) {
        case 'header':
          if (!this.header()) return;
          break;
        case 'simple-data':
        case 'data': {
          const n = Math.min(s.left, q.length);
          if (n === 0) return;
          const into = s.req.into!;
          let pos = s.pos;
          for (const slice of q.takeSlices(n, this.held)) pos += slice.copy(into, pos);
          this.held.length = 0;
          s.pos = pos;
          s.left -= n;
          if (s.left > 0) return;
          this.state = HEADER;
          if (s.kind === 'simple-data' || s.flags & C.NBD_REPLY_FLAG_DONE) this.sink.done(s.req);
          break;
        }
        case 'data-offset': {
          if (q.length < 8) return;
          const { req, dataLength } = s;
          const off = readU64(q.take(8), 0);
          const rel = off - req.offset;
          if (!(rel >= 0 && rel + dataLength <= req.length))
            throw new NbdProtocolError(`OFFSET_DATA chunk ${off}+${dataLength} lies outside the read ${req.offset}+${req.length}`);
          if (!req.addRange(rel, rel + dataLength))
            throw new NbdProtocolError(`OFFSET_DATA chunk ${off}+${dataLength} overlaps an earlier chunk of the read`);
          this.state = { kind: 'data', req, flags: s.flags, pos: req.at + rel, left: dataLength };
          break;
        }
        case 'payload': {
          if (q.length < s.length) return;
          const p = q.take(s.length);
          this.state = HEADER;
          this.chunkPayload(s.req, s.type, p);
          if (s.flags & C.NBD_REPLY_FLAG_DONE) this.sink.done(s.req);
          break;
        }
      }
    }
  }

  /** Parses a reply header if one is complete; false if more input is needed. */
  private header(): boolean {
    const q = this.input;
    if (q.length < 4) return false;
    const magic = q.peek(4).readUInt32BE(0);
    if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
      if (q.length < C.SIMPLE_REPLY_HEADER_LENGTH) return false;
      const { error, cookie } = decodeSimpleReplyHeader(q.take(C.SIMPLE_REPLY_HEADER_LENGTH));
      const req = this.find(cookie);
      req.simple = true;
      if (error !== 0) {
        // No payload follows an error, whatever the command.
        req.error ??= { nbdErrno: error };
        this.sink.done(req);
        return true;
      }
      if (req.type === C.NBD_CMD_READ) {
        if (this.structured)
          throw new NbdProtocolError('simple reply with data to a READ, but structured replies were negotiated');
        if (req.length > 0) {
          this.state = { kind: 'simple-data', req, pos: req.at, left: req.length };
          return true;
        }
      }
      if (req.type === C.NBD_CMD_BLOCK_STATUS && !this.structured)
        throw new NbdProtocolError('successful simple reply to BLOCK_STATUS');
      this.sink.done(req);
      return true;
    }
    if (magic !== C.NBD_STRUCTURED_REPLY_MAGIC) throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
    if (!this.structured) throw new NbdProtocolError('structured reply chunk, but structured replies were not negotiated');
    if (q.length < C.STRUCTURED_REPLY_HEADER_LENGTH) return false;
    const h = decodeChunkHeader(q.take(C.STRUCTURED_REPLY_HEADER_LENGTH));
    const { flags, type, length } = h;
    const req = this.find(h.cookie);
    const problem = chunkProblem(h, req.type);
    if (problem)
      throw new NbdProtocolError(`${problem} (chunk type ${type}, length ${length}, for ${C.COMMAND_NAMES[req.type] ?? `command ${req.type}`})`);
    if (type === C.NBD_REPLY_TYPE_NONE) this.sink.done(req);
    else if (type === C.NBD_REPLY_TYPE_OFFSET_DATA) this.state = { kind: 'data-offset', req, flags, dataLength: length - 8 };
    else this.state = { kind: 'payload', req, flags, type, length };
    return true;
  }

  private find(cookie: Cookie): PendingRequest {
    const req = this.sink.lookup(cookieToNumber(cookie));
    if (!req) throw new NbdProtocolError(`reply for unknown cookie ${cookieText(cookie)}`);
    return req;
  }

  private chunkPayload(req: PendingRequest, type: number, p: Buffer): void {
    switch (type) {
      case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const { offset: off, size } = decodeOffsetHole(p);
        const rel = off - req.offset;
        if (size === 0) throw new NbdProtocolError('OFFSET_HOLE chunk of size 0');
        if (!(rel >= 0 && rel + size <= req.length))
          throw new NbdProtocolError(`OFFSET_HOLE chunk ${off}+${size} lies outside the read ${req.offset}+${req.length}`);
        if (!req.addRange(rel, rel + size)) throw new NbdProtocolError(`OFFSET_HOLE chunk ${off}+${size} overlaps an earlier chunk of the read`);
        req.into!.fill(0, req.at + rel, req.at + rel + size);
        return;
      }
      case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
        const { contextId: id, extents } = decodeBlockStatus(p);
        req.statuses ??= new Map();
        if (req.statuses.has(id)) throw new NbdProtocolError(`two BLOCK_STATUS chunks for metadata context ${id} in one reply`);
        req.statuses.set(id, extents);
        return;
      }
      default: {
        const problem = errorChunkProblem(type, p);
        if (problem) throw new NbdProtocolError(problem);
        req.error ??= decodeErrorChunk(type, p);
      }
    }
  }
}
