// Case generators and mutators. A case is a client byte stream plus how it is
// delivered (all at once, in random pieces, or slow-loris), where it goes (TCP,
// Unix socket, oldstyle port) and how the client ends (waits for every reply,
// half-closes, resets, or stalls). Everything derives from one Rng, so a case
// is reproduced from (seed, index).

import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from './prng.js';
import { C, clientFlags, infoPayload, metaPayload, option, request, requestHeader, type Segment, u32, u64 } from './wire.js';

export const MiB = 1024 * 1024;

/** The fuzz server's exports (the same sizes the corpus was captured with). */
export const FUZZ_EXPORTS = {
  vm1: { name: 'vm1', size: 64 * MiB, readOnly: false },
  ro: { name: 'ro', size: 1 * MiB, readOnly: true },
  good: { name: 'good', size: 8 * MiB, readOnly: false },
};

export type Target = 'tcp' | 'unix' | 'oldstyle';
export type Finish = 'wait' | 'fin' | 'reset';

export interface CaseSpec {
  index: number;
  /** Generator and mutations, for statistics and reports. */
  gen: string;
  target: Target;
  bytes: Buffer;
  /** Message boundaries, when still known (minimisation works on them first). */
  segments?: Segment[];
  /** [bytes, delay before sending them in ms]...; empty: everything at once. */
  plan: Array<[number, number]>;
  finish: Finish;
  /** After sending, do not read replies for this long (back-pressure on the server). */
  pauseReadMs: number;
  /** Keep sending after the server closed its side (half-open connection). */
  sendAfterClose?: boolean;
}

// ---------------------------------------------------------------- dictionaries

const INTERESTING_U64: bigint[] = [
  0n,
  1n,
  511n,
  512n,
  4095n,
  4096n,
  0x7fffffffn,
  0x80000000n,
  0xffffffffn,
  0x100000000n,
  2n ** 53n - 1n,
  2n ** 53n,
  2n ** 53n + 1n,
  2n ** 63n - 1n,
  2n ** 63n,
  2n ** 64n - 1n,
  2n ** 64n - 4096n,
];

const INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 15, 16, 255, 511, 512, 1000, 4095, 4096, 4097, 65535, 65536, 65537, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

const PAYLOAD_SIZES = [32 * MiB - 1, 32 * MiB, 32 * MiB + 1, 16 * MiB, 64 * MiB, 1 * MiB];

const NAMES: Array<string | Buffer> = [
  'vm1',
  '',
  'ro',
  'nope',
  'VM1',
  'vm1\0',
  'vm1 ',
  'base:allocation',
  '\u00e9\u00e8',
  Buffer.from([0xff, 0xfe, 0x80]),
  'x'.repeat(4096),
  'x'.repeat(4097),
];

const QUERIES: Array<string | Buffer> = ['base:allocation', 'base:', '', 'base', 'nbd-migrate:incoming', 'nbd-migrate:', 'qemu:dirty-bitmap:x', 'x'.repeat(4097), Buffer.from([0xc3])];

/** One shared block of random bytes that WRITE payloads are sliced from. */
const POOL = new Rng(0xb10c).bytes(8 * MiB + 4096);
function payloadBytes(rng: Rng, n: number): Buffer {
  if (n <= POOL.length) {
    const at = rng.int(POOL.length - n + 1);
    return POOL.subarray(at, at + n);
  }
  return Buffer.alloc(n, 0x5a);
}

/** `n` bytes of 0x41, shared between cases (only ever copied from). */
const FILL_41 = new Map<number, Buffer>();
function fill41(n: number): Buffer {
  let b = FILL_41.get(n);
  if (!b) FILL_41.set(n, (b = Buffer.alloc(n, 0x41)));
  return b;
}

// ---------------------------------------------------------------- builders

function pickName(rng: Rng): string | Buffer {
  return rng.weighted<string | Buffer>([
    [80, 'vm1'],
    [8, ''],
    [8, 'ro'],
    [4, rng.pick(NAMES)],
  ]);
}

function randomFlags(rng: Rng): number {
  return rng.weighted([
    [70, C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES],
    [18, C.NBD_FLAG_C_FIXED_NEWSTYLE],
    [6, 0],
    [3, C.NBD_FLAG_C_NO_ZEROES],
    [3, rng.u32()],
  ]);
}

/** A well-formed option other than EXPORT_NAME / GO / ABORT. */
function preludeOption(rng: Rng, structured: boolean): Segment {
  const which = rng.weighted<string>([
    [15, 'list'],
    [15, 'sr'],
    [15, 'info'],
    [structured ? 15 : 3, 'listmeta'],
    [structured ? 15 : 3, 'setmeta'],
    [5, 'starttls'],
    [8, 'unknown'],
  ]);
  switch (which) {
    case 'list':
      return option(C.NBD_OPT_LIST);
    case 'sr':
      return option(C.NBD_OPT_STRUCTURED_REPLY);
    case 'info':
      return option(C.NBD_OPT_INFO, infoPayload(pickName(rng), randomInfos(rng)));
    case 'listmeta':
      return option(C.NBD_OPT_LIST_META_CONTEXT, metaPayload(pickName(rng), rng.chance(0.5) ? [] : randomQueries(rng)));
    case 'setmeta':
      return option(C.NBD_OPT_SET_META_CONTEXT, metaPayload(pickName(rng), randomQueries(rng)));
    case 'starttls':
      return option(C.NBD_OPT_STARTTLS);
    default:
      return option(rng.pick([0, 4, 11, 12, 13, 0x7fff, 0x80000000, 0xffffffff, rng.u32()]), rng.bytes(rng.int(24)));
  }
}

function randomInfos(rng: Rng): number[] {
  const out: number[] = [];
  const n = rng.weighted([
    [40, 0],
    [40, rng.range(1, 3)],
    [20, rng.range(4, 40)],
  ]);
  for (let i = 0; i < n; i++) out.push(rng.chance(0.85) ? rng.range(0, 3) : rng.u32() & 0xffff);
  return out;
}

function randomQueries(rng: Rng): Array<string | Buffer> {
  if (rng.chance(0.75)) return ['base:allocation'];
  const n = rng.range(0, 5);
  const out: Array<string | Buffer> = [];
  for (let i = 0; i < n; i++) out.push(rng.pick(QUERIES));
  return out;
}

interface Handshake {
  segments: Segment[];
  target: Target;
}

/** A handshake the way real clients make them (nbd-client, qemu, libnbd), with some variety. */
function validHandshake(rng: Rng): Handshake {
  const target = rng.weighted<Target>([
    [70, 'tcp'],
    [15, 'unix'],
    [15, 'oldstyle'],
  ]);
  if (target === 'oldstyle') return { segments: [], target };
  const segs: Segment[] = [clientFlags(randomFlags(rng))];
  let structured = false;
  if (rng.chance(0.35)) {
    // nbd-client / kernel style: maybe some options, then EXPORT_NAME.
    for (let i = rng.int(3); i > 0; i--) {
      const o = preludeOption(rng, structured);
      if (o.bytes.readUInt32BE(8) === C.NBD_OPT_STRUCTURED_REPLY) structured = true;
      segs.push(o);
    }
    segs.push(option(C.NBD_OPT_EXPORT_NAME, Buffer.from(pickName(rng))));
  } else {
    // qemu / libnbd style: STRUCTURED_REPLY, SET_META_CONTEXT, GO.
    const name = pickName(rng);
    if (rng.chance(0.1)) segs.push(option(C.NBD_OPT_LIST));
    if (rng.chance(0.9)) {
      segs.push(option(C.NBD_OPT_STRUCTURED_REPLY));
      structured = true;
    }
    if (structured && rng.chance(0.25)) segs.push(option(C.NBD_OPT_LIST_META_CONTEXT, metaPayload(name, rng.chance(0.5) ? [] : ['base:'])));
    if (structured && rng.chance(0.8)) segs.push(option(C.NBD_OPT_SET_META_CONTEXT, metaPayload(rng.chance(0.9) ? name : pickName(rng), randomQueries(rng))));
    if (rng.chance(0.15)) segs.push(preludeOption(rng, structured));
    if (rng.chance(0.15)) segs.push(option(C.NBD_OPT_INFO, infoPayload(name, randomInfos(rng))));
    segs.push(option(C.NBD_OPT_GO, infoPayload(name, rng.chance(0.7) ? [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE].slice(0, rng.range(0, 3)) : randomInfos(rng))));
  }
  return { segments: segs, target };
}

const CMD_WEIGHTS: ReadonlyArray<readonly [number, number]> = [
  [30, C.NBD_CMD_READ],
  [22, C.NBD_CMD_WRITE],
  [10, C.NBD_CMD_BLOCK_STATUS],
  [6, C.NBD_CMD_FLUSH],
  [8, C.NBD_CMD_TRIM],
  [8, C.NBD_CMD_WRITE_ZEROES],
  [5, C.NBD_CMD_CACHE],
];

class Cookies {
  private next: bigint;
  readonly used: bigint[] = [];
  /** Some sessions reuse cookies (clients must not, while in flight): replies then cannot be checked one by one. */
  private readonly reuse: boolean;
  constructor(rng: Rng) {
    this.next = rng.chance(0.2) ? rng.u64() : BigInt(rng.int(1000));
    this.reuse = rng.chance(0.03);
  }
  take(rng: Rng): bigint {
    if (this.reuse && this.used.length && rng.chance(0.1)) return rng.pick(this.used);
    const c = BigInt.asUintN(64, this.next++);
    this.used.push(c);
    return c;
  }
}

function interestingOffset(rng: Rng, size: number): bigint {
  return rng.weighted<bigint>([
    [40, rng.pick(INTERESTING_U64)],
    [20, BigInt(size + rng.range(-4096, 4096))],
    [15, BigInt(size) - BigInt(rng.pick([0, 1, 512, 4096, 32 * MiB, 32 * MiB - 1]))],
    [10, rng.u64()],
    [15, BigInt(rng.int(size))],
  ]);
}

function interestingLength(rng: Rng, size: number, offset: bigint): number {
  const toEnd = Number(BigInt(size) - offset);
  return rng.weighted<number>([
    [40, rng.pick(INTERESTING_U32)],
    [15, rng.pick(PAYLOAD_SIZES)],
    [15, toEnd >= 0 && toEnd <= 0xffffffff ? toEnd + rng.range(-1, 1) : rng.u32()],
    [10, rng.u32()],
    [20, rng.range(1, 1 << 20)],
  ]) >>> 0;
}

/** One request; mostly valid and in range, sometimes with boundary values. */
function genRequest(rng: Rng, cookies: Cookies, size: number, structured: boolean, maxWritePayload: number): Segment {
  let type: number = rng.weighted(CMD_WEIGHTS);
  if (rng.chance(0.03)) type = rng.pick([8, 9, 12, 0x4e4d, 0x8000, 0xffff, rng.u32() & 0xffff]);
  let flags = 0;
  if (rng.chance(0.2)) flags |= C.NBD_CMD_FLAG_FUA;
  if (type === C.NBD_CMD_READ && structured && rng.chance(0.15)) flags |= C.NBD_CMD_FLAG_DF;
  if (type === C.NBD_CMD_BLOCK_STATUS && rng.chance(0.3)) flags |= C.NBD_CMD_FLAG_REQ_ONE;
  if (type === C.NBD_CMD_WRITE_ZEROES) {
    if (rng.chance(0.3)) flags |= C.NBD_CMD_FLAG_NO_HOLE;
    if (rng.chance(0.2)) flags |= C.NBD_CMD_FLAG_FAST_ZERO;
  }
  if (rng.chance(0.04)) flags = rng.weighted([
    [50, 1 << rng.int(16)],
    [50, rng.u32() & 0xffff],
  ]);
  let offset: bigint;
  let length: number;
  const boundary = rng.chance(0.12);
  if (boundary) {
    offset = interestingOffset(rng, size);
    length = interestingLength(rng, size, offset);
  } else {
    const big = type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES || type === C.NBD_CMD_BLOCK_STATUS || type === C.NBD_CMD_CACHE;
    const maxLen = big ? size : type === C.NBD_CMD_READ && rng.chance(0.02) ? 32 * MiB : 256 * 1024;
    length = rng.weighted([
      [60, 512 * rng.range(1, Math.max(1, Math.floor(Math.min(maxLen, size) / 512 / (big ? 1 : 8))))],
      [30, rng.range(1, Math.min(maxLen, 65536))],
      [10, Math.min(maxLen, size)],
    ]);
    length = Math.min(length, size);
    const start = rng.chance(0.7) ? 512 * rng.int(Math.floor((size - length) / 512) + 1) : rng.int(size - length + 1);
    offset = BigInt(start);
  }
  if (type === C.NBD_CMD_FLUSH && !boundary) {
    offset = 0n;
    length = 0;
  }
  const cookie = cookies.take(rng);
  if (type === C.NBD_CMD_WRITE) {
    // A declared length we will not send in full ends the stream mid-payload.
    const n = length <= maxWritePayload ? length : rng.chance(0.5) ? 0 : rng.int(Math.min(length, 65536));
    return request({ flags, type, cookie, offset, length }, payloadBytes(rng, n));
  }
  return request({ flags, type, cookie, offset, length });
}

function genRequests(rng: Rng, n: number, size: number, structured: boolean): Segment[] {
  const cookies = new Cookies(rng);
  const out: Segment[] = [];
  // A large valid write (a real payload over 1 MiB) is rare: it costs real bytes.
  const maxWritePayload = rng.chance(0.02) ? 4 * MiB : 256 * 1024;
  for (let i = 0; i < n; i++) out.push(genRequest(rng, cookies, size, structured, maxWritePayload));
  if (rng.chance(0.3)) out.push(request({ flags: 0, type: C.NBD_CMD_DISC, cookie: cookies.take(rng), offset: 0n, length: 0 }));
  return out;
}

function requestCount(rng: Rng): number {
  return rng.weighted([
    [45, rng.range(1, 5)],
    [40, rng.range(6, 30)],
    [12, rng.range(31, 150)],
    [3, rng.range(151, 600)],
  ]);
}

/** Export size the handshake is likely to select (for in-range offsets). */
function sizeFor(h: Handshake): number {
  const last = h.segments[h.segments.length - 1];
  if (!last || h.target === 'oldstyle') return FUZZ_EXPORTS.vm1.size;
  const text = last.bytes.toString('latin1');
  return /\bro/.test(text.slice(16, 40)) ? FUZZ_EXPORTS.ro.size : FUZZ_EXPORTS.vm1.size;
}

function isStructured(h: Handshake): boolean {
  return h.segments.some((s) => s.kind === 'option' && s.bytes.readUInt32BE(8) === C.NBD_OPT_STRUCTURED_REPLY);
}

export function validSession(rng: Rng): { segments: Segment[]; target: Target } {
  const h = validHandshake(rng);
  const reqs = genRequests(rng, requestCount(rng), sizeFor(h), isStructured(h));
  return { segments: [...h.segments, ...reqs], target: h.target };
}

// ---------------------------------------------------------------- corpus

export interface CorpusEntry {
  name: string;
  target: Target;
  bytes: Buffer;
}

export function loadCorpus(dir: string): CorpusEntry[] {
  if (!existsSync(dir)) return [];
  const out: CorpusEntry[] = [];
  for (const f of readdirSync(dir).sort()) {
    if (!f.endsWith('.bin')) continue;
    out.push({ name: f, target: f.includes('oldstyle') ? 'oldstyle' : f.includes('unix') ? 'unix' : 'tcp', bytes: readFileSync(join(dir, f)) });
  }
  return out;
}

/** Splits a newstyle client stream into messages, assuming every GO / EXPORT_NAME of a known export succeeds. */
export function segmentStream(b: Buffer, target: Target): Segment[] {
  const out: Segment[] = [];
  let at = 0;
  const raw = () => {
    if (at < b.length) out.push({ kind: 'raw', bytes: b.subarray(at) });
    return out;
  };
  if (target !== 'oldstyle') {
    if (b.length < 4) return raw();
    out.push({ kind: 'flags', bytes: b.subarray(0, 4) });
    at = 4;
    for (;;) {
      if (b.length - at < 16 || b.readBigUInt64BE(at) !== C.NBD_IHAVEOPT) return raw();
      const opt = b.readUInt32BE(at + 8);
      const len = b.readUInt32BE(at + 12);
      if (b.length - at - 16 < len) return raw();
      out.push({ kind: 'option', bytes: b.subarray(at, at + 16 + len) });
      at += 16 + len;
      if (opt === C.NBD_OPT_EXPORT_NAME || opt === C.NBD_OPT_GO) {
        const name = opt === C.NBD_OPT_EXPORT_NAME ? b.toString('utf8', at - len, at) : b.length >= at - len + 4 ? b.toString('utf8', at - len + 4, at - len + 4 + b.readUInt32BE(at - len)) : '?';
        if (['', 'vm1', 'ro', 'good'].includes(name)) break;
      }
    }
  }
  while (b.length - at >= C.REQUEST_HEADER_LENGTH && b.readUInt32BE(at) === C.NBD_REQUEST_MAGIC) {
    const type = b.readUInt16BE(at + 6);
    const len = b.readUInt32BE(at + 24);
    const n = C.REQUEST_HEADER_LENGTH + (type === C.NBD_CMD_WRITE ? len : 0);
    if (b.length - at < n) break;
    out.push({ kind: 'request', bytes: b.subarray(at, at + n) });
    at += n;
  }
  return raw();
}

// ---------------------------------------------------------------- mutators

function mutateOptionSegment(rng: Rng, s: Segment): Segment {
  const b = Buffer.from(s.bytes);
  if (b.length < 16) return { kind: 'raw', bytes: b };
  switch (rng.int(6)) {
    case 0:
      b.writeUInt32BE(rng.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x7fffffff, 0xffffffff, rng.u32()]) >>> 0, 8);
      break;
    case 1:
      b.writeUInt32BE(rng.pick([...INTERESTING_U32, b.length - 16 + 1, Math.max(0, b.length - 17)]) >>> 0, 12);
      break;
    case 2:
      b[rng.int(8)] ^= 1 << rng.int(8);
      break;
    case 3:
      // Corrupt a length field inside the payload (name length, count, query length).
      if (b.length >= 20) {
        const at = 16 + rng.int(Math.max(1, b.length - 19));
        b.writeUInt32BE(rng.pick(INTERESTING_U32) >>> 0, Math.min(at, b.length - 4));
      }
      break;
    case 4:
      return { kind: 'option', bytes: Buffer.concat([b, rng.bytes(rng.range(1, 16))]) };
    default:
      if (b.length > 16) return { kind: 'option', bytes: b.subarray(0, 16 + rng.int(b.length - 16)) };
  }
  return { kind: 'option', bytes: b };
}

function mutateRequestSegment(rng: Rng, s: Segment): Segment {
  const b = Buffer.from(s.bytes);
  if (b.length < 28) return { kind: 'raw', bytes: b };
  switch (rng.int(7)) {
    case 0:
      b.writeUInt32BE(rng.pick([0, 0x25609512, 0x67446698, 0x668e33ef, 0x21e41c71, rng.u32()]) >>> 0, 0);
      break;
    case 1:
      b.writeUInt16BE(rng.pick([0, 1, 2, 4, 8, 16, 32, 0x8000, 0xffff, rng.u32() & 0xffff]), 4);
      break;
    case 2:
      b.writeUInt16BE(rng.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x4e4d, 0xffff, rng.u32() & 0xffff]), 6);
      break;
    case 3:
      b.writeBigUInt64BE(BigInt.asUintN(64, rng.pick([...INTERESTING_U64, BigInt(FUZZ_EXPORTS.vm1.size), BigInt(FUZZ_EXPORTS.vm1.size - 1), rng.u64()])), 16);
      break;
    case 4:
      b.writeUInt32BE(rng.pick([...INTERESTING_U32, ...PAYLOAD_SIZES, b.length - 28, b.length - 27]) >>> 0, 24);
      break;
    case 5:
      b.writeBigUInt64BE(rng.u64(), 8);
      break;
    default:
      return { kind: 'request', bytes: b.subarray(0, rng.int(b.length)) };
  }
  return { kind: 'request', bytes: b };
}

function extraSegment(rng: Rng): Segment {
  if (rng.chance(0.5)) return preludeOption(rng, true);
  const cookies = new Cookies(rng);
  return genRequest(rng, cookies, FUZZ_EXPORTS.vm1.size, true, 4096);
}

/** Applies 1..4 message-level mutations; returns their names. */
export function mutateSegments(rng: Rng, segs: Segment[]): string[] {
  const names: string[] = [];
  for (let n = rng.small(4); n > 0; n--) {
    if (segs.length === 0) {
      segs.push(extraSegment(rng));
      names.push('insert');
      continue;
    }
    const i = rng.int(segs.length);
    const what = rng.weighted<string>([
      [35, 'field'],
      [12, 'dup'],
      [10, 'swap'],
      [10, 'drop'],
      [15, 'insert'],
      [8, 'truncate-msg'],
      [5, 'repeat'],
    ]);
    names.push(what);
    const s = segs[i]!;
    switch (what) {
      case 'field':
        segs[i] =
          s.kind === 'option'
            ? mutateOptionSegment(rng, s)
            : s.kind === 'request'
              ? mutateRequestSegment(rng, s)
              : s.kind === 'flags'
                ? clientFlags(rng.pick([0, 1, 2, 3, 4, 0x80000000, 0xffffffff, rng.u32()]))
                : { kind: 'raw', bytes: Buffer.concat([s.bytes, rng.bytes(4)]) };
        break;
      case 'dup':
        segs.splice(i, 0, s);
        break;
      case 'swap': {
        const j = rng.int(segs.length);
        segs[i] = segs[j]!;
        segs[j] = s;
        break;
      }
      case 'drop':
        segs.splice(i, 1);
        break;
      case 'insert':
        segs.splice(i, 0, extraSegment(rng));
        break;
      case 'truncate-msg':
        segs[i] = { kind: s.kind, bytes: s.bytes.subarray(0, rng.int(s.bytes.length)) };
        break;
      case 'repeat': {
        const k = rng.range(2, 40);
        segs.splice(i, 0, ...Array.from({ length: k }, () => s));
        break;
      }
    }
  }
  return names;
}

/** Applies 1..4 byte-level mutations to a stream. */
export function mutateBytes(rng: Rng, input: Buffer, other?: Buffer): { bytes: Buffer; names: string[] } {
  let b: Buffer = Buffer.from(input);
  const names: string[] = [];
  for (let n = rng.small(4); n > 0; n--) {
    const what = rng.weighted<string>([
      [30, 'bitflip'],
      [15, 'byte'],
      [10, 'insert-bytes'],
      [10, 'delete-bytes'],
      [15, 'truncate'],
      [8, 'splice'],
      [12, 'u32'],
    ]);
    names.push(what);
    if (b.length === 0) {
      b = rng.bytes(rng.range(1, 64));
      continue;
    }
    switch (what) {
      case 'bitflip':
        for (let k = rng.small(8); k > 0; k--) b[rng.int(b.length)] ^= 1 << rng.int(8);
        break;
      case 'byte':
        b[rng.int(b.length)] = rng.pick([0, 1, 0x7f, 0x80, 0xff, rng.int(256)]);
        break;
      case 'insert-bytes': {
        const at = rng.int(b.length + 1);
        b = Buffer.concat([b.subarray(0, at), rng.bytes(rng.range(1, 32)), b.subarray(at)]);
        break;
      }
      case 'delete-bytes': {
        const at = rng.int(b.length);
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + rng.range(1, 32)))]);
        break;
      }
      case 'truncate':
        b = b.subarray(0, rng.int(b.length));
        break;
      case 'splice': {
        const src = other && other.length ? other : rng.bytes(64);
        const from = rng.int(src.length);
        const piece = src.subarray(from, from + rng.range(1, 256));
        const at = rng.int(b.length + 1);
        b = Buffer.concat([b.subarray(0, at), piece, b.subarray(at)]);
        break;
      }
      case 'u32':
        if (b.length >= 4) b.writeUInt32BE(rng.pick(INTERESTING_U32) >>> 0, rng.int(b.length - 3));
        break;
    }
  }
  return { bytes: b, names };
}

// ---------------------------------------------------------------- delivery

/** Random pieces with small delays. */
function chunkPlan(rng: Rng, total: number): Array<[number, number]> {
  const plan: Array<[number, number]> = [];
  let left = total;
  let budget = 800; // ms of delays at most
  while (left > 0) {
    const n = Math.min(left, rng.weighted([
      [30, rng.range(1, 8)],
      [40, rng.range(9, 512)],
      [30, rng.range(513, 65536)],
    ]));
    const d = budget > 0 && rng.chance(0.3) ? rng.range(0, 40) : 0;
    budget -= d;
    plan.push([n, d]);
    left -= n;
  }
  return plan;
}

/** Slow-loris: a few bytes at a time for up to ~2.5 s, then the rest. */
function slowPlan(rng: Rng, total: number): Array<[number, number]> {
  const plan: Array<[number, number]> = [];
  let left = total;
  let time = 0;
  while (left > 0 && time < 2500) {
    const n = Math.min(left, rng.range(1, 3));
    const d = rng.range(5, 60);
    plan.push([n, d]);
    time += d;
    left -= n;
  }
  if (left > 0) plan.push([left, 0]);
  return plan;
}

// ---------------------------------------------------------------- top level

export interface GenContext {
  corpus: CorpusEntry[];
}

function finishCase(rng: Rng, index: number, gen: string, target: Target, segs: Segment[] | undefined, bytes: Buffer, opts: Partial<CaseSpec> = {}): CaseSpec {
  const delivery = rng.weighted<string>([
    [70, 'all'],
    [25, 'chunks'],
    [5, 'slow'],
  ]);
  const plan = delivery === 'all' ? [] : delivery === 'chunks' ? chunkPlan(rng, bytes.length) : slowPlan(rng, bytes.length);
  const finish = rng.weighted<Finish>([
    [86, 'wait'],
    [7, 'fin'],
    [7, 'reset'],
  ]);
  return { index, gen: delivery === 'all' ? gen : `${gen}+${delivery}`, target, bytes, segments: segs, plan, finish, pauseReadMs: 0, ...opts };
}

const concat = (segs: Segment[]) => Buffer.concat(segs.map((s) => s.bytes));

/** The case with this index in a campaign with this seed. */
export function generateCase(seed: number, index: number, ctx: GenContext): CaseSpec {
  const rng = new Rng(seed, index);
  const kind = rng.weighted<string>([
    [22, 'valid'],
    [28, 'mutate-msg'],
    [14, 'mutate-bytes'],
    [ctx.corpus.length ? 12 : 0, 'corpus'],
    [5, 'random-options'],
    [3, 'random-bytes'],
    [4, 'huge-option'],
    [4, 'stall'],
    [3, 'abrupt'],
    [2, 'slowloris'],
    [2, 'backpressure'],
    [1, 'max-options'],
    [2, 'after-close'],
  ]);
  switch (kind) {
    case 'valid': {
      const s = validSession(rng);
      return finishCase(rng, index, 'valid', s.target, s.segments, concat(s.segments));
    }
    case 'mutate-msg': {
      const s = validSession(rng);
      const names = mutateSegments(rng, s.segments);
      return finishCase(rng, index, `mutate-msg(${names.join(',')})`, s.target, s.segments, concat(s.segments));
    }
    case 'mutate-bytes': {
      const s = validSession(rng);
      const other = ctx.corpus.length ? rng.pick(ctx.corpus).bytes : undefined;
      const m = mutateBytes(rng, concat(s.segments), other);
      return finishCase(rng, index, `mutate-bytes(${m.names.join(',')})`, s.target, undefined, m.bytes);
    }
    case 'corpus': {
      const e = rng.pick(ctx.corpus);
      const segs = segmentStream(e.bytes, e.target);
      let gen = `corpus(${e.name})`;
      if (rng.chance(0.85)) {
        if (rng.chance(0.65)) gen += `+msg(${mutateSegments(rng, segs).join(',')})`;
        else {
          const m = mutateBytes(rng, concat(segs), rng.pick(ctx.corpus).bytes);
          return finishCase(rng, index, `${gen}+bytes(${m.names.join(',')})`, e.target, undefined, m.bytes);
        }
      }
      return finishCase(rng, index, gen, e.target, segs, concat(segs));
    }
    case 'random-options': {
      const segs: Segment[] = [clientFlags(randomFlags(rng))];
      for (let n = rng.range(1, 12); n > 0; n--) {
        const opt = rng.weighted<number>([
          [70, rng.range(0, 12)],
          [30, rng.u32()],
        ]);
        const payload = rng.chance(0.5) ? rng.bytes(rng.int(64)) : rng.chance(0.5) ? infoPayload(pickName(rng), randomInfos(rng)) : metaPayload(pickName(rng), randomQueries(rng));
        segs.push(option(opt, payload, rng.chance(0.1) ? rng.pick(INTERESTING_U32) : undefined));
      }
      if (rng.chance(0.5)) segs.push(option(C.NBD_OPT_GO, infoPayload('vm1', [])), ...genRequests(rng, rng.range(1, 5), FUZZ_EXPORTS.vm1.size, true));
      return finishCase(rng, index, 'random-options', rng.chance(0.8) ? 'tcp' : 'unix', segs, concat(segs));
    }
    case 'random-bytes': {
      const target = rng.weighted<Target>([
        [60, 'tcp'],
        [20, 'unix'],
        [20, 'oldstyle'],
      ]);
      const prefix = target === 'oldstyle' || rng.chance(0.5) ? Buffer.alloc(0) : u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);
      const b = Buffer.concat([prefix, rng.bytes(rng.range(1, 2048))]);
      return finishCase(rng, index, 'random-bytes', target, undefined, b);
    }
    case 'huge-option': {
      const h = validHandshake(rng);
      const target = h.target === 'oldstyle' ? 'tcp' : h.target;
      const segs = h.target === 'oldstyle' ? [clientFlags(3)] : h.segments.slice(0, 1 + rng.int(h.segments.length));
      const declared = rng.pick([65536, 65537, 1 << 20, 0x7fffffff, 0x80000000, 0xffffffff]);
      const opt = rng.pick([C.NBD_OPT_GO, C.NBD_OPT_INFO, C.NBD_OPT_LIST, C.NBD_OPT_SET_META_CONTEXT, C.NBD_OPT_EXPORT_NAME, 0x1234]);
      // Send the whole payload only when it is modest; otherwise the server is left waiting for it.
      const full = declared <= 1 << 20 && rng.chance(0.6);
      const payload = full ? payloadBytes(rng, declared) : payloadBytes(rng, rng.int(4096));
      segs.push(option(opt, payload, declared));
      if (full) segs.push(option(C.NBD_OPT_GO, infoPayload('vm1', [])), ...genRequests(rng, rng.range(1, 4), FUZZ_EXPORTS.vm1.size, false));
      return finishCase(rng, index, `huge-option(${opt},${declared},${full ? 'full' : 'partial'})`, target, segs, concat(segs));
    }
    case 'stall': {
      // A handshake cut anywhere: the server must drop it at its handshake timeout.
      const h = validHandshake(rng);
      const target = h.target === 'oldstyle' ? 'tcp' : h.target;
      const segs = h.target === 'oldstyle' ? [clientFlags(3), option(C.NBD_OPT_GO, infoPayload('vm1', []))] : h.segments;
      const all = concat(segs);
      const bytes = all.subarray(0, rng.int(all.length));
      return { index, gen: 'stall', target, bytes, plan: [], finish: 'wait', pauseReadMs: 0 };
    }
    case 'abrupt': {
      const s = validSession(rng);
      const all = concat(s.segments);
      const bytes = all.subarray(0, rng.int(all.length + 1));
      return { index, gen: 'abrupt', target: s.target, bytes, plan: rng.chance(0.5) ? [] : chunkPlan(rng, bytes.length), finish: rng.chance(0.5) ? 'reset' : 'fin', pauseReadMs: 0 };
    }
    case 'slowloris': {
      const s = validSession(rng);
      const bytes = concat(s.segments);
      return { index, gen: 'slowloris', target: s.target, bytes, segments: s.segments, plan: slowPlan(rng, bytes.length), finish: 'wait', pauseReadMs: 0 };
    }
    case 'backpressure': {
      const h = validHandshake(rng);
      const size = sizeFor(h);
      const cookies = new Cookies(rng);
      const reqs: Segment[] = [];
      let total = 0;
      while (total < 48 * MiB) {
        const len = Math.min(size, rng.pick([1, 2, 4, 8]) * MiB);
        reqs.push(request({ flags: 0, type: C.NBD_CMD_READ, cookie: cookies.take(rng), offset: BigInt(rng.int(size - len + 1)), length: len }));
        total += len;
        if (rng.chance(0.2)) break;
      }
      const segs = [...h.segments, ...reqs];
      return { index, gen: 'backpressure', target: h.target, bytes: concat(segs), segments: segs, plan: [], finish: 'wait', pauseReadMs: rng.range(300, 2000) };
    }
    case 'after-close': {
      // The client ends the session (DISC, or ABORT in the handshake) and keeps sending:
      // the server must drop the connection, not keep it half-open or buffer what follows.
      const h = validHandshake(rng);
      const abort = h.target !== 'oldstyle' && rng.chance(0.4);
      const segs = abort
        ? [...h.segments.slice(0, 1 + rng.int(h.segments.length - 1)), option(C.NBD_OPT_ABORT)]
        : [...h.segments, ...genRequests(rng, rng.range(0, 3), sizeFor(h), isStructured(h)).filter((r) => r.bytes.readUInt16BE(6) !== C.NBD_CMD_DISC), request({ flags: 0, type: C.NBD_CMD_DISC, cookie: 0xd15cn, offset: 0n, length: 0 })];
      const head = concat(segs);
      const more = rng.pick([64 * 1024, 256 * 1024, 1 * MiB, 40 * MiB]);
      const plan: Array<[number, number]> = [[head.length, 0]];
      // The big variant is spread over about 5 s, so that a server that keeps reading (past a grace period) shows it.
      const piece = more > MiB ? MiB : 64 * 1024;
      for (let left = more; left > 0; left -= piece) plan.push([Math.min(piece, left), left === more ? 200 : more > MiB ? 125 : 0]);
      const bytes = Buffer.concat([head, payloadBytes(rng, Math.min(more, POOL.length)), more > POOL.length ? fill41(more - POOL.length) : Buffer.alloc(0)]);
      return { index, gen: `after-close(${abort ? 'abort' : 'disc'},${more})`, target: h.target, bytes, segments: undefined, plan, finish: 'wait', pauseReadMs: 0, sendAfterClose: true };
    }
    default: {
      // max-options: around the 1024-option bound, then GO.
      const n = rng.range(1000, 1100);
      const segs: Segment[] = [clientFlags(3)];
      const o = rng.pick([option(C.NBD_OPT_LIST), option(C.NBD_OPT_STRUCTURED_REPLY), option(0x4242, Buffer.alloc(8)), option(C.NBD_OPT_INFO, infoPayload('vm1', []))]);
      for (let i = 0; i < n; i++) segs.push(o);
      segs.push(option(C.NBD_OPT_GO, infoPayload('vm1', [])), ...genRequests(rng, 2, FUZZ_EXPORTS.vm1.size, false));
      return { index, gen: `max-options(${n})`, target: 'tcp', bytes: concat(segs), segments: segs, plan: [], finish: 'wait', pauseReadMs: 0 };
    }
  }
}

export { requestHeader, u64 };
