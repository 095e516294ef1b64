// The fuzzer's oracle: an independent model of what a correct NBD server
// must send back for a given client byte stream, written from proto.md (not
// from the server's code). It is fed the server's output as it arrives and
// records every deviation as a Violation.
//
// The client stream is known in full in advance; how the server must frame
// it depends on the server's own answers (a GO that succeeds switches to
// transmission, one that fails keeps haggling), so the model walks the client
// bytes in step with the replies.
//
// What counts as a violation is what the spec makes mandatory (MUST), plus a
// few SHOULDs this server documents that it follows (EINVAL for unknown
// commands and flags, an error for out-of-range requests, the 1000-byte cap
// on non-data chunks that QEMU relies on). Where the spec leaves the server a
// choice (zero-length requests, FAST_ZERO, non-zero FLUSH fields...), either
// answer is accepted.

import { C } from './wire.js';

export interface ExportInfo {
  name: string;
  size: bigint;
  readOnly: boolean;
}

export interface CheckerConfig {
  listener: 'newstyle' | 'oldstyle';
  /** Every export the server offers; the first one is the default (""). */
  exports: ExportInfo[];
  /** For listener 'oldstyle': the export the port serves. */
  oldstyleExport?: string;
  /** Options accepted per handshake before the server drops the client. */
  maxOptions: number;
  /** Option payloads above this are refused (skipped) rather than parsed. */
  maxOptionLength: number;
  /** Largest READ/WRITE the server accepts (its advertised maximum block size). */
  maxPayload: number;
  /** Metadata contexts the server offers on every export. */
  contexts: string[];
  /** Further contexts it may offer (and list with an empty query) besides those: the server's own namespace. */
  extraContexts?: RegExp;
}

export interface Violation {
  kind: string;
  detail: string;
}

type Expect = 'ok' | 'err' | 'any';

/** Errors a server may put on the wire (proto.md "Error values"). */
const WIRE_ERRORS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);

const ERR_BIT = 0x80000000;

const CMD_NAMES: Record<number, string> = {
  0: 'READ',
  1: 'WRITE',
  2: 'DISC',
  3: 'FLUSH',
  4: 'TRIM',
  5: 'CACHE',
  6: 'WRITE_ZEROES',
  7: 'BLOCK_STATUS',
};
const cmdName = (t: number) => CMD_NAMES[t] ?? `cmd${t}`;

const OPT_NAMES: Record<number, string> = {
  1: 'EXPORT_NAME',
  2: 'ABORT',
  3: 'LIST',
  4: 'PEEK_EXPORT',
  5: 'STARTTLS',
  6: 'INFO',
  7: 'GO',
  8: 'STRUCTURED_REPLY',
  9: 'LIST_META_CONTEXT',
  10: 'SET_META_CONTEXT',
  11: 'EXTENDED_HEADERS',
};
const optName = (o: number) => OPT_NAMES[o] ?? `opt${o}`;

/** A queue of received chunks that can be peeked and skipped without joining them all. */
class InQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  length = 0;
  push(b: Buffer): void {
    if (b.length) {
      this.chunks.push(b);
      this.length += b.length;
    }
  }
  peek(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    for (let i = 0; got < n; i++) {
      const c = this.chunks[i]!;
      const from = i === 0 ? this.head : 0;
      const k = Math.min(c.length - from, n - got);
      c.copy(out, got, from, from + k);
      got += k;
    }
    return out;
  }
  take(n: number): Buffer {
    const b = Buffer.from(this.peek(n));
    this.drop(n);
    return b;
  }
  drop(n: number): void {
    let left = n;
    this.length -= n;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        left -= avail;
        this.chunks.shift();
        this.head = 0;
      } else {
        this.head += left;
        left = 0;
      }
    }
  }
}

interface PendingReq {
  index: number;
  cookie: bigint;
  type: number;
  flags: number;
  offset: bigint;
  length: number;
  expect: Expect;
  /** A reply must arrive (false when the server may legitimately drop it). */
  required: boolean;
  done: boolean;
  /** Structured reply state. */
  error: number;
  contentChunks: number;
  covered: bigint;
  ranges: Array<[bigint, bigint]>;
  bsContexts: Set<number>;
}

interface OptState {
  option: number;
  payloadLength: number;
  mustError: boolean;
  mustSucceed: boolean;
  /** Export the option names (INFO/GO/META), resolved. */
  export?: ExportInfo;
  exportLiteral?: string;
  queries?: string[];
  intermediate: number;
  servers: string[];
  infoExport?: { size: bigint; flags: number };
  metas: Map<number, string>;
}

type Phase = 'greeting' | 'flags' | 'option' | 'option-replies' | 'export-info' | 'await-close' | 'transmission' | 'stopped';

export interface CloseInfo {
  /** We closed or reset the connection ourselves first. */
  clientInitiated: boolean;
  /** Milliseconds from connect to the server's close. */
  elapsedMs: number;
  /** The server's handshake timeout in ms. */
  handshakeTimeoutMs: number;
}

export class SessionChecker {
  readonly violations: Violation[] = [];
  private readonly q = new InQueue();
  private phase: Phase = 'greeting';
  private cur = 0;
  private noZeroes = false;
  private structured = false;
  private optionsSeen = 0;
  private opt: OptState | undefined;
  /** Contexts selected by the last SET_META_CONTEXT: undefined = none, 'unknown' = unclear after an error. */
  private meta: { export: string; ids: Map<number, string> } | 'unknown' | undefined;
  private pendingExport: ExportInfo | undefined;
  /** Why the server is expected to close: 'now' (promptly) or 'timeout' (at its handshake timeout). */
  closeExpected: 'now' | 'timeout' | undefined;
  private closePermitted = false;
  private closed = false;
  /** Transmission state. */
  private tx:
    | {
        exp: ExportInfo;
        flags: number;
        contexts: Map<number, string> | 'unknown';
        byCookie: Map<bigint, PendingReq[]>;
        reqs: PendingReq[];
        disc: boolean;
        /** The DISC request, once parsed. */
        discReq?: { cookie: bigint; flags: number; offset: bigint; length: number };
        /** Bytes were sent after DISC or a bad magic: the server may reset, losing queued replies. */
        trailing: boolean;
        /** Partial structured reply being read. */
        ambiguous: boolean;
      }
    | undefined;
  /** What the session came to, for statistics. */
  outcome = 'running';

  constructor(
    private readonly client: Buffer,
    private readonly cfg: CheckerConfig,
  ) {
    if (cfg.listener === 'oldstyle') this.phase = 'greeting';
  }

  // ------------------------------------------------------------------ public

  feed(chunk: Buffer): void {
    if (this.phase === 'stopped') return;
    this.q.push(chunk);
    try {
      this.advance();
    } catch (e) {
      // A bug in the oracle must not pass for a server bug, nor kill the run.
      this.fatal('checker-error', `the checker threw: ${(e as Error).stack ?? e}`);
    }
  }

  /** True when nothing more is owed by the server except possibly a close. */
  settled(): boolean {
    if (this.phase === 'stopped') return true;
    if (this.phase === 'await-close') return this.closed;
    if (this.phase !== 'transmission') return this.closed;
    const tx = this.tx!;
    const owed = tx.reqs.some((r) => r.required && !r.done);
    if (owed) return this.closed;
    if (this.closeExpected) return this.closed;
    return true;
  }

  /** The handshake is over on our side: only the server's close (at its timeout, or now) is owed. */
  awaitingClose(): 'now' | 'timeout' | undefined {
    return this.phase === 'await-close' ? this.closeExpected : undefined;
  }

  inHandshake(): boolean {
    return this.phase !== 'transmission' && this.phase !== 'stopped';
  }

  /** For a hang report: what the model is still waiting for. */
  waitingFor(): string {
    if (this.phase === 'transmission') {
      const owed = this.tx!.reqs.filter((r) => r.required && !r.done);
      const list = owed.slice(0, 5).map((r) => `${cmdName(r.type)}(cookie=${r.cookie},off=${r.offset},len=${r.length},flags=0x${r.flags.toString(16)})`);
      return owed.length
        ? `replies to ${owed.length} request(s): ${list.join(', ')}${owed.length > 5 ? ', ...' : ''}`
        : `the server to close the connection (${this.closeExpected})`;
    }
    if (this.phase === 'await-close') return `the server to close the connection (${this.closeExpected})`;
    if (this.phase === 'option-replies') return `replies to ${optName(this.opt!.option)}`;
    return `phase ${this.phase}`;
  }

  serverClosed(info: CloseInfo): void {
    if (this.closed) return;
    this.closed = true;
    if (this.phase === 'stopped' || info.clientInitiated) return;
    const timedOut = info.elapsedMs >= info.handshakeTimeoutMs - 100;
    switch (this.phase) {
      case 'await-close':
        if (this.closeExpected === 'timeout' && !timedOut)
          this.violate('early-close', `server closed an idle handshake after ${info.elapsedMs} ms, before its ${info.handshakeTimeoutMs} ms timeout`);
        this.outcome = `closed-${this.closeExpected}`;
        return;
      case 'transmission': {
        const tx = this.tx!;
        // A hard close (bad magic, oversized write) may cut a reply short; a DISC must not.
        if (this.q.length > 0 && !tx.trailing && !this.closePermitted)
          this.violate('truncated-reply', `server closed in the middle of a reply (${this.q.length} bytes pending)`);
        const owed = tx.reqs.filter((r) => r.required && !r.done);
        if (owed.length && !this.closePermitted) {
          const kind = tx.disc ? 'disc-dropped-replies' : 'closed-with-requests-pending';
          this.violate(kind, `server closed the connection with ${owed.length} request(s) unanswered: ${this.waitingFor()}`);
        } else if (!this.closeExpected && !this.closePermitted) {
          this.violate('unexpected-close', 'server closed the connection during transmission without a DISC or a protocol violation');
        }
        this.outcome = this.closeExpected ? `closed-${this.closeExpected}` : 'closed';
        return;
      }
      default:
        if (timedOut) {
          this.outcome = 'closed-handshake-timeout';
          return;
        }
        if (this.closeAheadInHandshake()) {
          this.outcome = 'closed-pipelined';
          return;
        }
        if (this.q.length > 0) this.violate('truncated-reply', `server closed with ${this.q.length} bytes of an incomplete message pending in phase ${this.phase}`);
        this.violate('unexpected-close', `server closed the connection in handshake phase ${this.phase} after ${info.elapsedMs} ms (waiting for ${this.waitingFor()})`);
        this.outcome = 'closed-unexpected';
    }
  }

  // ------------------------------------------------------------------ helpers

  private violate(kind: string, detail: string): void {
    if (this.violations.length < 20) this.violations.push({ kind, detail });
  }

  /** A violation after which the server's stream cannot be followed any further. */
  private fatal(kind: string, detail: string): void {
    this.violate(kind, detail);
    this.phase = 'stopped';
    this.outcome = 'desync';
  }

  private get clientLeft(): number {
    return this.client.length - this.cur;
  }

  private exportByName(name: string): ExportInfo | undefined {
    if (name === '') return this.cfg.exports[0];
    return this.cfg.exports.find((e) => e.name === name);
  }

  private expectClose(kind: 'now' | 'timeout'): void {
    this.closeExpected = kind;
    this.phase = 'await-close';
  }

  private advance(): void {
    for (let guard = 0; guard < 1_000_000; guard++) {
      if (this.phase === 'stopped') return;
      if (!this.step()) return;
    }
  }

  /** One unit of progress; false when more server bytes are needed. */
  private step(): boolean {
    switch (this.phase) {
      case 'greeting':
        return this.cfg.listener === 'oldstyle' ? this.oldstyleGreeting() : this.newstyleGreeting();
      case 'flags':
        return this.clientFlags();
      case 'option':
        return this.nextOption();
      case 'option-replies':
        return this.optionReply();
      case 'export-info':
        return this.exportInfo();
      case 'await-close':
        if (this.q.length > 0) {
          this.fatal('data-after-close-expected', `server sent ${this.q.length} more bytes where it had to close the connection (${this.closeExpected})`);
        }
        return false;
      case 'transmission':
        return this.reply();
      default:
        return false;
    }
  }

  // ------------------------------------------------------------------ handshake

  private oldstyleGreeting(): boolean {
    if (this.q.length < C.OLDSTYLE_GREETING_LENGTH) return false;
    const g = this.q.take(C.OLDSTYLE_GREETING_LENGTH);
    if (g.readBigUInt64BE(0) !== C.NBD_MAGIC || g.readBigUInt64BE(8) !== C.NBD_OLDSTYLE_MAGIC) {
      this.fatal('bad-greeting', `oldstyle greeting magic ${g.subarray(0, 16).toString('hex')}`);
      return false;
    }
    const exp = this.exportByName(this.cfg.oldstyleExport ?? '')!;
    const size = g.readBigUInt64BE(16);
    const flags = g.readUInt32BE(24);
    if (size !== exp.size) this.violate('bad-export-size', `oldstyle greeting size ${size}, export is ${exp.size}`);
    if (flags >>> 16) this.violate('bad-greeting', `oldstyle flags 0x${flags.toString(16)} set handshake flag bits`);
    if (!g.subarray(28).every((x) => x === 0)) this.violate('bad-greeting', 'oldstyle greeting padding is not zero');
    this.enterTransmission(exp, flags & 0xffff, false, undefined);
    return true;
  }

  private newstyleGreeting(): boolean {
    if (this.q.length < 18) return false;
    const g = this.q.take(18);
    if (g.readBigUInt64BE(0) !== C.NBD_MAGIC || g.readBigUInt64BE(8) !== C.NBD_IHAVEOPT) {
      this.fatal('bad-greeting', `newstyle greeting ${g.toString('hex')}`);
      return false;
    }
    const hflags = g.readUInt16BE(16);
    if (!(hflags & C.NBD_FLAG_FIXED_NEWSTYLE)) this.violate('bad-greeting', 'NBD_FLAG_FIXED_NEWSTYLE not set');
    if (hflags & ~(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES)) this.violate('bad-greeting', `unknown handshake flags 0x${hflags.toString(16)}`);
    this.phase = 'flags';
    return true;
  }

  private clientFlags(): boolean {
    if (this.clientLeft < 4) {
      this.expectClose('timeout');
      return true;
    }
    const f = this.client.readUInt32BE(this.cur);
    this.cur += 4;
    if (f & ~C.KNOWN_CLIENT_FLAGS) {
      this.expectClose('now'); // "the server MUST drop the TCP connection if the client sets an unknown flag"
      return true;
    }
    this.noZeroes = (f & C.NBD_FLAG_C_NO_ZEROES) !== 0;
    this.phase = 'option';
    return true;
  }

  private nextOption(): boolean {
    if (this.optionsSeen >= this.cfg.maxOptions) {
      this.expectClose('now');
      return true;
    }
    if (this.clientLeft < 16) {
      this.expectClose('timeout');
      return true;
    }
    const at = this.cur;
    const magic = this.client.readBigUInt64BE(at);
    const option = this.client.readUInt32BE(at + 8);
    const length = this.client.readUInt32BE(at + 12);
    if (magic !== C.NBD_IHAVEOPT) {
      this.expectClose('now');
      return true;
    }
    this.optionsSeen++;
    this.cur += 16;
    if (option === C.NBD_OPT_EXPORT_NAME) {
      if (length > C.MAX_STRING_LENGTH) {
        this.expectClose('now'); // a name over 4096 bytes breaks a MUST: the server may hang up
        return true;
      }
      if (this.clientLeft < length) {
        this.expectClose('timeout');
        return true;
      }
      const name = this.client.toString('utf8', this.cur, this.cur + length);
      this.cur += length;
      const exp = this.exportByName(name);
      if (!exp) {
        this.expectClose('now'); // "If the chosen export does not exist ... the server MUST terminate the session"
        return true;
      }
      this.pendingExport = exp;
      this.phase = 'export-info';
      return true;
    }
    if (this.clientLeft < length) {
      this.expectClose('timeout');
      return true;
    }
    const payload = this.client.subarray(this.cur, this.cur + length);
    this.cur += length;
    this.opt = this.classifyOption(option, payload);
    this.phase = 'option-replies';
    return true;
  }

  private classifyOption(option: number, payload: Buffer): OptState {
    const o: OptState = {
      option,
      payloadLength: payload.length,
      mustError: false,
      mustSucceed: false,
      intermediate: 0,
      servers: [],
      metas: new Map(),
    };
    if (payload.length > this.cfg.maxOptionLength) {
      o.mustError = true;
      return o;
    }
    switch (option) {
      case C.NBD_OPT_ABORT:
        o.mustSucceed = true;
        break;
      case C.NBD_OPT_LIST:
        if (payload.length) o.mustError = true;
        else o.mustSucceed = true;
        break;
      case C.NBD_OPT_STARTTLS:
        o.mustError = true; // this server has no TLS: NOTLS mode
        break;
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (payload.length) o.mustError = true;
        else if (!this.structured) o.mustSucceed = true;
        break;
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO: {
        const p = parseInfoPayload(payload);
        if (!p) o.mustError = true;
        else if (p.nameLength > C.MAX_STRING_LENGTH) o.mustError = true;
        else {
          o.exportLiteral = p.name;
          o.export = this.exportByName(p.name);
          if (!o.export) o.mustError = true;
          else o.mustSucceed = true;
        }
        break;
      }
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT: {
        if (!this.structured) {
          o.mustError = true;
          break;
        }
        const p = parseMetaPayload(payload);
        if (!p) o.mustError = true;
        else if (p.nameLength > C.MAX_STRING_LENGTH) o.mustError = true;
        else {
          o.exportLiteral = p.name;
          o.export = this.exportByName(p.name);
          o.queries = p.queries;
          if (!o.export) o.mustError = true;
          else if (p.queryLengths.every((l) => l <= C.MAX_STRING_LENGTH)) o.mustSucceed = true;
        }
        break;
      }
      default:
        // Unknown (and unimplemented) options: "NBD_REP_ERR_UNSUP".
        o.mustError = true;
    }
    return o;
  }

  private optionReply(): boolean {
    if (this.q.length < 20) return false;
    const h = this.q.peek(20);
    const magic = h.readBigUInt64BE(0);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    const o = this.opt!;
    if (magic !== C.NBD_OPT_REPLY_MAGIC) {
      this.fatal('bad-option-reply', `option reply magic 0x${magic.toString(16)} in reply to ${optName(o.option)}`);
      return false;
    }
    if (len > 1024 * 1024) {
      this.fatal('bad-option-reply', `option reply of ${len} bytes to ${optName(o.option)}`);
      return false;
    }
    if (this.q.length < 20 + len) return false;
    this.q.drop(20);
    const data = this.q.take(len);
    if (option !== o.option) this.violate('bad-option-reply', `reply names option ${option}, the request was ${optName(o.option)} (${o.option})`);

    if (type & ERR_BIT) {
      if (len > C.MAX_STRING_LENGTH) this.violate('bad-option-reply', `error message of ${len} bytes (max 4096)`);
      if (o.mustSucceed) this.violate('option-refused', `${optName(o.option)} refused with 0x${type.toString(16)}: ${data.toString('utf8').slice(0, 200)}`);
      if (o.option === C.NBD_OPT_STARTTLS && ![C.NBD_REP_ERR_UNSUP, C.NBD_REP_ERR_POLICY].includes(type))
        this.violate('bad-option-reply', `STARTTLS refused with 0x${type.toString(16)} (NOTLS mode allows ERR_UNSUP or ERR_POLICY)`);
      if (o.payloadLength <= this.cfg.maxOptionLength && !(o.option in OPT_NAMES && o.option !== 4 && o.option !== 11) && type !== C.NBD_REP_ERR_UNSUP)
        this.violate('bad-option-reply', `unknown option ${o.option} refused with 0x${type.toString(16)}, not NBD_REP_ERR_UNSUP`);
      if (o.option === C.NBD_OPT_SET_META_CONTEXT) this.meta = this.meta === undefined ? undefined : 'unknown';
      this.opt = undefined;
      this.phase = 'option';
      return true;
    }

    if (type === C.NBD_REP_ACK) {
      if (len !== 0) this.violate('bad-option-reply', `NBD_REP_ACK with ${len} bytes of data`);
      if (o.mustError) this.violate('option-accepted', `${optName(o.option)} with a ${o.payloadLength}-byte invalid payload was acknowledged`);
      return this.optionDone(o);
    }

    o.intermediate++;
    if (o.intermediate > 64) {
      this.fatal('bad-option-reply', `more than 64 replies to one ${optName(o.option)}`);
      return false;
    }
    switch (type) {
      case C.NBD_REP_SERVER:
        if (o.option !== C.NBD_OPT_LIST) break;
        if (len < 4 || data.readUInt32BE(0) > len - 4) this.violate('bad-option-reply', `NBD_REP_SERVER payload ${data.toString('hex')}`);
        else o.servers.push(data.toString('utf8', 4, 4 + data.readUInt32BE(0)));
        return true;
      case C.NBD_REP_INFO:
        if (o.option !== C.NBD_OPT_INFO && o.option !== C.NBD_OPT_GO) break;
        this.checkInfo(o, data);
        return true;
      case C.NBD_REP_META_CONTEXT:
        if (o.option !== C.NBD_OPT_LIST_META_CONTEXT && o.option !== C.NBD_OPT_SET_META_CONTEXT) break;
        if (len < 4) {
          this.violate('bad-option-reply', `NBD_REP_META_CONTEXT of ${len} bytes`);
          return true;
        }
        {
          const id = data.readUInt32BE(0);
          const name = data.toString('utf8', 4);
          if (!this.cfg.contexts.includes(name) && !this.cfg.extraContexts?.test(name)) this.violate('bad-meta-context', `server offered unknown context "${name}"`);
          if (o.option === C.NBD_OPT_SET_META_CONTEXT) {
            if (!o.queries!.includes(name)) this.violate('bad-meta-context', `SET_META_CONTEXT selected "${name}", not among the queries ${JSON.stringify(o.queries)}`);
            if (o.metas.has(id)) this.violate('bad-meta-context', `context id ${id} given twice`);
          }
          o.metas.set(id, name);
        }
        return true;
    }
    this.violate('bad-option-reply', `reply type 0x${type.toString(16)} to ${optName(o.option)}`);
    return true;
  }

  private checkInfo(o: OptState, data: Buffer): void {
    if (data.length < 2) {
      this.violate('bad-info', `NBD_REP_INFO of ${data.length} bytes`);
      return;
    }
    const t = data.readUInt16BE(0);
    switch (t) {
      case C.NBD_INFO_EXPORT:
        if (data.length !== 12) this.violate('bad-info', `NBD_INFO_EXPORT of ${data.length} bytes`);
        else o.infoExport = { size: data.readBigUInt64BE(2), flags: data.readUInt16BE(10) };
        break;
      case C.NBD_INFO_NAME:
      case C.NBD_INFO_DESCRIPTION:
        if (data.length - 2 > C.MAX_STRING_LENGTH) this.violate('bad-info', `info string of ${data.length - 2} bytes`);
        break;
      case C.NBD_INFO_BLOCK_SIZE: {
        if (data.length !== 14) {
          this.violate('bad-info', `NBD_INFO_BLOCK_SIZE of ${data.length} bytes`);
          break;
        }
        const min = data.readUInt32BE(2);
        const pref = data.readUInt32BE(6);
        const max = data.readUInt32BE(10);
        const pow2 = (x: number) => x > 0 && (x & (x - 1)) === 0;
        if (!pow2(min) || min > 65536 || !pow2(pref) || pref < min || max < min || (max !== 0xffffffff && max % min !== 0))
          this.violate('bad-info', `block sizes min ${min} preferred ${pref} max ${max}`);
        break;
      }
      default:
        break; // clients ignore unknown info types
    }
  }

  private optionDone(o: OptState): boolean {
    this.opt = undefined;
    this.phase = 'option';
    switch (o.option) {
      case C.NBD_OPT_ABORT:
        this.expectClose('now');
        return true;
      case C.NBD_OPT_LIST: {
        const want = this.cfg.exports.map((e) => e.name).sort();
        const got = [...o.servers].sort();
        if (JSON.stringify(want) !== JSON.stringify(got)) this.violate('bad-list', `NBD_OPT_LIST named ${JSON.stringify(got)}, exports are ${JSON.stringify(want)}`);
        return true;
      }
      case C.NBD_OPT_STRUCTURED_REPLY:
        this.structured = true;
        return true;
      case C.NBD_OPT_LIST_META_CONTEXT:
        if (o.queries!.length === 0) {
          const got = [...o.metas.values()].filter((n) => this.cfg.contexts.includes(n) || !this.cfg.extraContexts?.test(n)).sort();
          if (JSON.stringify(got) !== JSON.stringify([...this.cfg.contexts].sort()))
            this.violate('bad-meta-context', `LIST_META_CONTEXT with no query listed ${JSON.stringify(got)}`);
        }
        return true;
      case C.NBD_OPT_SET_META_CONTEXT: {
        for (const q of o.queries!) {
          if (this.cfg.contexts.includes(q) && ![...o.metas.values()].includes(q))
            this.violate('bad-meta-context', `SET_META_CONTEXT for "${q}" selected nothing`);
        }
        this.meta = { export: o.export!.name, ids: o.metas };
        return true;
      }
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO: {
        const exp = o.export!;
        if (!o.infoExport) this.violate('bad-info', `${optName(o.option)} acknowledged without NBD_INFO_EXPORT`);
        else {
          if (o.infoExport.size !== exp.size) this.violate('bad-export-size', `NBD_INFO_EXPORT size ${o.infoExport.size}, export "${exp.name}" is ${exp.size}`);
          this.checkTransmissionFlags(o.infoExport.flags, exp);
        }
        if (o.option === C.NBD_OPT_GO) this.enterTransmission(exp, o.infoExport?.flags ?? C.NBD_FLAG_HAS_FLAGS, this.structured, this.contextsFor(exp));
        return true;
      }
      default:
        return true;
    }
  }

  private contextsFor(exp: ExportInfo): Map<number, string> | 'unknown' | undefined {
    if (this.meta === undefined || this.meta === 'unknown') return this.meta;
    return this.meta.export === exp.name ? this.meta.ids : undefined;
  }

  private checkTransmissionFlags(flags: number, exp: ExportInfo): void {
    if (!(flags & C.NBD_FLAG_HAS_FLAGS)) this.violate('bad-transmission-flags', `NBD_FLAG_HAS_FLAGS clear in 0x${flags.toString(16)}`);
    if (!!(flags & C.NBD_FLAG_READ_ONLY) !== exp.readOnly)
      this.violate('bad-transmission-flags', `READ_ONLY is ${!!(flags & C.NBD_FLAG_READ_ONLY)} for export "${exp.name}"`);
    if (flags & C.NBD_FLAG_SEND_DF && !this.structured) this.violate('bad-transmission-flags', 'NBD_FLAG_SEND_DF set without structured replies');
  }

  private exportInfo(): boolean {
    const n = 10 + (this.noZeroes ? 0 : C.ZERO_PAD_LENGTH);
    if (this.q.length < n) return false;
    const b = this.q.take(n);
    const exp = this.pendingExport!;
    const size = b.readBigUInt64BE(0);
    const flags = b.readUInt16BE(8);
    if (size !== exp.size) this.violate('bad-export-size', `EXPORT_NAME reply size ${size}, export "${exp.name}" is ${exp.size}`);
    this.checkTransmissionFlags(flags, exp);
    if (!b.subarray(10).every((x) => x === 0)) this.violate('bad-export-info', 'the 124 reserved bytes are not zero');
    this.enterTransmission(exp, flags, this.structured, this.contextsFor(exp));
    return true;
  }

  /**
   * The server closed during the handshake while we still waited for replies:
   * fine if a later option in the client's (pipelined) stream would have made
   * it hang up anyway, since a hard close may discard replies still queued.
   */
  private closeAheadInHandshake(): boolean {
    if (this.phase === 'export-info') return this.closeAheadInTransmission(this.cur);
    if (this.phase === 'greeting') {
      // The greeting itself is lost when the server hangs up in the same turn.
      if (this.cfg.listener === 'oldstyle') return this.closeAheadInTransmission(0);
      if (this.client.length < 4) return false;
      if (this.client.readUInt32BE(0) & ~C.KNOWN_CLIENT_FLAGS) return true;
      return this.closeAheadInOptions(4, 0);
    }
    // While a GO is answered, what follows it is either more options (GO refused) or requests.
    if (this.phase === 'option-replies' && this.opt?.option === C.NBD_OPT_GO && this.closeAheadInTransmission(this.cur)) return true;
    return this.closeAheadInOptions(this.cur, this.optionsSeen);
  }

  private closeAheadInOptions(at: number, n: number): boolean {
    for (;;) {
      if (n >= this.cfg.maxOptions) return true;
      if (this.client.length - at < 16) return false;
      if (this.client.readBigUInt64BE(at) !== C.NBD_IHAVEOPT) return true;
      const option = this.client.readUInt32BE(at + 8);
      const length = this.client.readUInt32BE(at + 12);
      n++;
      at += 16;
      if (option === C.NBD_OPT_EXPORT_NAME) {
        if (length > C.MAX_STRING_LENGTH) return true;
        if (this.client.length - at < length) return false;
        if (!this.exportByName(this.client.toString('utf8', at, at + length))) return true;
        return this.closeAheadInTransmission(at + length);
      }
      if (option === C.NBD_OPT_ABORT) return true;
      if (this.client.length - at < length) return false;
      if (option === C.NBD_OPT_GO) {
        const p = parseInfoPayload(this.client.subarray(at, at + length));
        if (p && p.nameLength <= C.MAX_STRING_LENGTH && this.exportByName(p.name)) return this.closeAheadInTransmission(at + length);
      }
      at += length;
    }
  }

  /** Whether pipelined requests from `at` on contain a bad magic (the server then hangs up at once). */
  private closeAheadInTransmission(at: number): boolean {
    const b = this.client;
    while (b.length - at >= C.REQUEST_HEADER_LENGTH) {
      if (b.readUInt32BE(at) !== C.NBD_REQUEST_MAGIC) return true;
      const type = b.readUInt16BE(at + 6);
      if (type === C.NBD_CMD_DISC) return false;
      at += C.REQUEST_HEADER_LENGTH + (type === C.NBD_CMD_WRITE ? b.readUInt32BE(at + 24) : 0);
    }
    return false;
  }

  // ------------------------------------------------------------------ transmission

  private enterTransmission(exp: ExportInfo, flags: number, structured: boolean, contexts: Map<number, string> | 'unknown' | undefined): void {
    this.phase = 'transmission';
    this.outcome = 'transmission';
    this.tx = {
      exp,
      flags,
      contexts: contexts ?? new Map(),
      byCookie: new Map(),
      reqs: [],
      disc: false,
      trailing: false,
      ambiguous: false,
    };
    this.structured = structured;
    this.parseRequests();
  }

  private parseRequests(): void {
    const tx = this.tx!;
    const b = this.client;
    while (this.cur < b.length) {
      if (b.length - this.cur < C.REQUEST_HEADER_LENGTH) break; // a partial header: nothing owed
      const at = this.cur;
      const magic = b.readUInt32BE(at);
      if (magic !== C.NBD_REQUEST_MAGIC) {
        // The server hangs up; replies still queued may be lost with the connection.
        this.closeExpected = 'now';
        for (const r of tx.reqs) r.required = false;
        tx.trailing = true;
        return;
      }
      const flags = b.readUInt16BE(at + 4);
      const type = b.readUInt16BE(at + 6);
      const cookie = b.readBigUInt64BE(at + 8);
      const offset = b.readBigUInt64BE(at + 16);
      const length = b.readUInt32BE(at + 24);
      this.cur += C.REQUEST_HEADER_LENGTH;
      if (type === C.NBD_CMD_DISC) {
        tx.disc = true;
        tx.discReq = { cookie, flags, offset, length };
        this.closeExpected = 'now';
        if (this.cur < b.length) {
          // The client broke "MUST NOT send anything after DISC"; the server may
          // close with unread input (a reset), which can lose queued replies.
          tx.trailing = true;
          for (const r of tx.reqs) r.required = false;
        }
        return;
      }
      const expect = this.classifyRequest(flags, type, offset, length);
      const req: PendingReq = {
        index: tx.reqs.length,
        cookie,
        type,
        flags,
        offset,
        length,
        expect,
        required: true,
        done: false,
        error: 0,
        contentChunks: 0,
        covered: 0n,
        ranges: [],
        bsContexts: new Set(),
      };
      if (type === C.NBD_CMD_WRITE) {
        if (length > this.cfg.maxPayload) this.closePermitted = true; // proto.md lets a server hang up on oversized writes
        if (b.length - this.cur < length) {
          // Payload incomplete: a valid write cannot run yet; a refused one may be answered early.
          if (expect !== 'ok') {
            req.required = false;
            this.addReq(req);
          }
          this.cur = b.length;
          return;
        }
        this.cur += length;
      }
      this.addReq(req);
    }
  }

  private addReq(r: PendingReq): void {
    const tx = this.tx!;
    tx.reqs.push(r);
    const list = tx.byCookie.get(r.cookie);
    if (list) {
      list.push(r);
      // Clients must not reuse a cookie in flight; replies cannot be matched reliably.
      tx.ambiguous = true;
    } else tx.byCookie.set(r.cookie, [r]);
  }

  private classifyRequest(flags: number, type: number, offset: bigint, length: number): Expect {
    const tx = this.tx!;
    const tf = tx.flags;
    const known = type in CMD_NAMES;
    if (!known) return 'err'; // "SHOULD return EINVAL if it receives an unknown command"
    let valid = 0;
    if (tf & C.NBD_FLAG_SEND_FUA) valid |= C.NBD_CMD_FLAG_FUA;
    if (type === C.NBD_CMD_WRITE_ZEROES) {
      valid |= C.NBD_CMD_FLAG_NO_HOLE;
      if (tf & C.NBD_FLAG_SEND_FAST_ZERO) valid |= C.NBD_CMD_FLAG_FAST_ZERO;
    }
    if (type === C.NBD_CMD_READ && tf & C.NBD_FLAG_SEND_DF) valid |= C.NBD_CMD_FLAG_DF;
    if (type === C.NBD_CMD_BLOCK_STATUS) valid |= C.NBD_CMD_FLAG_REQ_ONE;
    if (flags & ~valid) return 'err'; // "SHOULD return EINVAL if it receives ... a flag not documented as applicable"
    const writes = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES;
    if (writes && tx.exp.readOnly) return 'err'; // "MUST error subsequent write operations"
    const needs: Record<number, number> = {
      [C.NBD_CMD_FLUSH]: C.NBD_FLAG_SEND_FLUSH,
      [C.NBD_CMD_TRIM]: C.NBD_FLAG_SEND_TRIM,
      [C.NBD_CMD_WRITE_ZEROES]: C.NBD_FLAG_SEND_WRITE_ZEROES,
      [C.NBD_CMD_CACHE]: C.NBD_FLAG_SEND_CACHE,
    };
    if (needs[type] !== undefined && !(tf & needs[type]!)) return 'any';
    if ((type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE) && length > this.cfg.maxPayload) return 'err';
    if (type === C.NBD_CMD_FLUSH) return offset === 0n && length === 0 ? 'ok' : 'any';
    if (offset + BigInt(length) > tx.exp.size) return 'err'; // beyond the end: ENOSPC / EINVAL
    if (type === C.NBD_CMD_BLOCK_STATUS) {
      if (!this.structured) return 'err';
      if (tx.contexts === 'unknown') return 'any';
      if (tx.contexts.size === 0) return 'err'; // "Servers SHOULD reply ... with EINVAL"
      if (length === 0) return 'any';
      return 'ok';
    }
    if (length === 0) return 'any'; // unspecified by the protocol
    if (type === C.NBD_CMD_WRITE_ZEROES && flags & C.NBD_CMD_FLAG_FAST_ZERO) return 'any'; // may fail fast with ENOTSUP
    return 'ok';
  }

  private findReq(cookie: bigint): PendingReq | undefined {
    const d = this.tx!.discReq;
    if (d && d.cookie === cookie && !this.tx!.byCookie.get(cookie)?.some((r) => !r.done)) {
      this.fatal('reply-to-disc', `server answered NBD_CMD_DISC (flags 0x${d.flags.toString(16)}, offset ${d.offset}, length ${d.length}) instead of closing: "There is no reply to an NBD_CMD_DISC"`);
      return undefined;
    }
    const list = this.tx!.byCookie.get(cookie);
    if (list && list.length > 1) {
      // A cookie reused while in flight: replies cannot be matched to requests.
      this.phase = 'stopped';
      this.outcome = 'ambiguous';
      return undefined;
    }
    return list?.find((r) => !r.done);
  }

  private reply(): boolean {
    if (this.q.length < 4) return false;
    const magic = this.q.peek(4).readUInt32BE(0);
    if (magic === C.NBD_SIMPLE_REPLY_MAGIC) return this.simpleReply();
    if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) return this.structuredChunk();
    this.fatal('bad-reply-magic', `reply magic 0x${magic.toString(16)}`);
    return false;
  }

  private simpleReply(): boolean {
    if (this.q.length < 16) return false;
    const h = this.q.peek(16);
    const error = h.readUInt32BE(4);
    const cookie = h.readBigUInt64BE(8);
    const req = this.findReq(cookie);
    if (this.phase === 'stopped') return false;
    if (!req) {
      this.fatal('unexpected-reply', `simple reply (error ${error}) for cookie ${cookie}, which has no request awaiting a reply`);
      return false;
    }
    const dataLen = req.type === C.NBD_CMD_READ && error === 0 ? req.length : 0;
    if (this.q.length < 16 + dataLen) return false;
    this.q.drop(16 + dataLen);
    if (this.structured && req.type === C.NBD_CMD_READ) this.violate('simple-reply-to-read', `simple reply to READ (cookie ${cookie}) with structured replies negotiated`);
    if (this.structured && req.type === C.NBD_CMD_BLOCK_STATUS && error === 0)
      this.violate('bad-block-status', `simple success reply to BLOCK_STATUS (cookie ${cookie})`);
    this.finish(req, error);
    return true;
  }

  private structuredChunk(): boolean {
    if (this.q.length < 20) return false;
    const h = this.q.peek(20);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const cookie = h.readBigUInt64BE(8);
    const len = h.readUInt32BE(16);
    if (!this.structured) {
      this.fatal('structured-without-negotiation', `structured reply chunk (type ${type}) without NBD_OPT_STRUCTURED_REPLY`);
      return false;
    }
    if (len > this.cfg.maxPayload + 8) {
      this.fatal('bad-chunk', `chunk of ${len} bytes`);
      return false;
    }
    const req = this.findReq(cookie);
    if (this.phase === 'stopped') return false;
    if (!req) {
      this.fatal('unexpected-reply', `structured chunk type ${type} for cookie ${cookie}, which has no request awaiting a reply`);
      return false;
    }
    if (type === C.NBD_REPLY_TYPE_OFFSET_DATA) {
      // Only the 8-byte offset is needed; the data is skipped as it comes.
      if (len < 9) {
        this.fatal('bad-chunk', `OFFSET_DATA chunk of ${len} bytes`);
        return false;
      }
      if (this.q.length < 28) return false;
      if (this.q.length < 20 + len) return false;
      const off = this.q.peek(28).readBigUInt64BE(20);
      this.q.drop(20 + len);
      this.content(req, off, BigInt(len - 8), 'OFFSET_DATA');
    } else {
      if (len > C.MAX_NON_DATA_PAYLOAD) this.violate('oversized-chunk', `${type === C.NBD_REPLY_TYPE_BLOCK_STATUS ? 'BLOCK_STATUS' : `type ${type}`} chunk of ${len} bytes (QEMU drops the connection above ${C.MAX_NON_DATA_PAYLOAD})`);
      if (this.q.length < 20 + len) return false;
      this.q.drop(20);
      const p = this.q.take(len);
      this.chunkPayload(req, type, p);
    }
    if (flags & ~C.NBD_REPLY_FLAG_DONE) this.violate('bad-chunk', `reply flags 0x${flags.toString(16)}`);
    if (type === C.NBD_REPLY_TYPE_NONE && !(flags & C.NBD_REPLY_FLAG_DONE)) this.violate('bad-chunk', 'NONE chunk without the DONE flag');
    if (flags & C.NBD_REPLY_FLAG_DONE) this.finishStructured(req);
    return true;
  }

  private content(req: PendingReq, off: bigint, n: bigint, what: string): void {
    if (req.type !== C.NBD_CMD_READ) {
      this.violate('bad-chunk', `${what} chunk in reply to ${cmdName(req.type)}`);
      return;
    }
    const end = req.offset + BigInt(req.length);
    if (off < req.offset || off + n > end) this.violate('bad-chunk', `${what} ${off}+${n} outside the request ${req.offset}+${req.length}`);
    for (const [a, b] of req.ranges) if (off < b && a < off + n) this.violate('bad-chunk', `${what} ${off}+${n} overlaps an earlier chunk`);
    req.ranges.push([off, off + n]);
    req.covered += n;
    req.contentChunks++;
    if (req.flags & C.NBD_CMD_FLAG_DF && req.contentChunks > 1) this.violate('bad-chunk', 'more than one content chunk for a READ with NBD_CMD_FLAG_DF');
  }

  private chunkPayload(req: PendingReq, type: number, p: Buffer): void {
    switch (type) {
      case C.NBD_REPLY_TYPE_NONE:
        if (p.length) this.violate('bad-chunk', `NONE chunk with ${p.length} bytes`);
        return;
      case C.NBD_REPLY_TYPE_OFFSET_HOLE:
        if (p.length !== 12) return this.violate('bad-chunk', `OFFSET_HOLE chunk of ${p.length} bytes`);
        if (p.readUInt32BE(8) === 0) this.violate('bad-chunk', 'OFFSET_HOLE of size 0');
        this.content(req, p.readBigUInt64BE(0), BigInt(p.readUInt32BE(8)), 'OFFSET_HOLE');
        return;
      case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (req.type !== C.NBD_CMD_BLOCK_STATUS) return this.violate('bad-chunk', `BLOCK_STATUS chunk in reply to ${cmdName(req.type)}`);
        if (p.length < 12 || (p.length - 4) % 8 !== 0) return this.violate('bad-block-status', `BLOCK_STATUS chunk of ${p.length} bytes`);
        const id = p.readUInt32BE(0);
        const ctx = this.tx!.contexts;
        if (ctx !== 'unknown' && !ctx.has(id)) this.violate('bad-block-status', `BLOCK_STATUS for context id ${id}, not negotiated`);
        if (req.bsContexts.has(id)) this.violate('bad-block-status', `two BLOCK_STATUS chunks for context id ${id}`);
        req.bsContexts.add(id);
        const n = (p.length - 4) / 8;
        if (req.flags & C.NBD_CMD_FLAG_REQ_ONE && n !== 1) this.violate('bad-block-status', `${n} extents with NBD_CMD_FLAG_REQ_ONE`);
        let sum = 0n;
        for (let i = 0; i < n; i++) {
          const l = p.readUInt32BE(4 + 8 * i);
          const f = p.readUInt32BE(8 + 8 * i);
          if (l === 0) this.violate('bad-block-status', 'extent of length 0');
          if (ctx !== 'unknown' && ctx.get(id) === C.BASE_ALLOCATION && f & ~3) this.violate('bad-block-status', `base:allocation flags 0x${f.toString(16)}`);
          sum += BigInt(l);
        }
        if (sum > BigInt(req.length)) this.violate('bad-block-status', `extents sum to ${sum}, request length is ${req.length}`);
        return;
      }
      case C.NBD_REPLY_TYPE_ERROR:
      case C.NBD_REPLY_TYPE_ERROR_OFFSET: {
        const extra = type === C.NBD_REPLY_TYPE_ERROR ? 0 : 8;
        if (p.length < 6 + extra) return this.violate('bad-chunk', `error chunk of ${p.length} bytes`);
        const err = p.readUInt32BE(0);
        const msgLen = p.readUInt16BE(4);
        if (msgLen !== p.length - 6 - extra) this.violate('bad-chunk', `error message length ${msgLen} in a ${p.length}-byte chunk`);
        if (err === 0) this.violate('bad-errno', 'error chunk with error 0');
        req.error = req.error || err || C.NBD_EIO;
        if (!WIRE_ERRORS.has(err)) this.violate('bad-errno', `error ${err} is not an NBD error value`);
        return;
      }
      default:
        if (type & 0x8000) {
          this.violate('bad-chunk', `unknown error chunk type 0x${type.toString(16)}`);
          req.error = req.error || C.NBD_EIO;
        } else this.violate('bad-chunk', `unknown chunk type ${type}`);
    }
  }

  private finishStructured(req: PendingReq): void {
    if (!req.error) {
      if (req.type === C.NBD_CMD_READ && req.covered !== BigInt(req.length))
        this.violate('read-incomplete', `READ ${req.offset}+${req.length} succeeded with ${req.covered} bytes described`);
      if (req.type === C.NBD_CMD_BLOCK_STATUS) {
        const ctx = this.tx!.contexts;
        if (req.bsContexts.size === 0) this.violate('bad-block-status', 'BLOCK_STATUS succeeded without a BLOCK_STATUS chunk');
        else if (ctx !== 'unknown' && req.bsContexts.size !== ctx.size)
          this.violate('bad-block-status', `BLOCK_STATUS answered for ${req.bsContexts.size} of ${ctx.size} contexts`);
      }
    }
    this.finish(req, req.error);
  }

  private finish(req: PendingReq, error: number): void {
    req.done = true;
    const what = `${cmdName(req.type)} flags=0x${req.flags.toString(16)} offset=${req.offset} length=${req.length}`;
    if (error && !WIRE_ERRORS.has(error)) this.violate('bad-errno', `${what}: error ${error} is not an NBD error value`);
    if (req.expect === 'ok' && error) this.violate('unexpected-error', `${what} failed with error ${error}`);
    if (req.expect === 'err' && !error) this.violate('accepted-invalid', `${what} succeeded; it must fail`);
  }
}

function parseInfoPayload(p: Buffer): { name: string; nameLength: number } | undefined {
  if (p.length < 6) return undefined;
  const n = p.readUInt32BE(0);
  if (n > p.length - 6) return undefined;
  const count = p.readUInt16BE(4 + n);
  if (p.length !== 6 + n + 2 * count) return undefined;
  return { name: p.toString('utf8', 4, 4 + n), nameLength: n };
}

function parseMetaPayload(p: Buffer): { name: string; nameLength: number; queries: string[]; queryLengths: number[] } | undefined {
  if (p.length < 8) return undefined;
  const n = p.readUInt32BE(0);
  if (n > p.length - 8) return undefined;
  const name = p.toString('utf8', 4, 4 + n);
  let at = 4 + n;
  const count = p.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  const queryLengths: number[] = [];
  for (let i = 0; i < count; i++) {
    if (p.length - at < 4) return undefined;
    const l = p.readUInt32BE(at);
    at += 4;
    if (p.length - at < l) return undefined;
    queries.push(p.toString('utf8', at, at + l));
    queryLengths.push(l);
    at += l;
  }
  if (at !== p.length) return undefined;
  return { name, nameLength: n, queries, queryLengths };
}
