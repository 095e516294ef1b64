/**
 * Pure encoders and decoders for NBD messages: Buffers in, Buffers out, no I/O.
 * Framing (deciding how many bytes make a message) lives with the connection.
 */
import * as C from './constants.js';

/** A 64-bit cookie kept as two 32-bit halves: echoed back verbatim, never interpreted. */
export interface Cookie {
  readonly hi: number;
  readonly lo: number;
}

export function cookieToBigInt(c: Cookie): bigint {
  return (BigInt(c.hi) << 32n) | BigInt(c.lo);
}

/**
 * A 64-bit value from its two 32-bit halves, as a number. Values beyond 2^53
 * cannot be a valid offset, size or cookie of ours; they become Infinity, so
 * range checks and lookups fail instead of wrapping.
 */
export function u64FromHalves(hi: number, lo: number): number {
  if (hi >= 0x200000) return Number.POSITIVE_INFINITY;
  return hi * 0x100000000 + lo;
}

/** The one 64-bit big-endian read: Infinity beyond 2^53 (see u64FromHalves). */
export function readU64(buf: Buffer, at: number): number {
  return u64FromHalves(buf.readUInt32BE(at), buf.readUInt32BE(at + 4));
}

/** A client's numeric cookie (a counter below 2^53) as the two halves on the wire. */
export function cookieFromNumber(n: number): Cookie {
  return { hi: Math.floor(n / 0x100000000), lo: n >>> 0 };
}

/** A cookie as a number (Infinity beyond 2^53: no cookie we sent). */
export function cookieToNumber(c: Cookie): number {
  return u64FromHalves(c.hi, c.lo);
}

/** The 8-byte cookie field of a request or reply header. */
export function readCookie(b: Buffer, at: number): Cookie {
  return { hi: b.readUInt32BE(at), lo: b.readUInt32BE(at + 4) };
}

/** A cookie for messages: 16 hex digits. */
export function cookieText(c: Cookie): string {
  return `0x${c.hi.toString(16).padStart(8, '0')}${c.lo.toString(16).padStart(8, '0')}`;
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

// ---------------------------------------------------------------- handshake

export function encodeOldstyleGreeting(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(C.OLDSTYLE_GREETING_LENGTH); // zero padding included
  b.writeBigUInt64BE(C.NBD_MAGIC, 0);
  b.writeBigUInt64BE(C.NBD_OLDSTYLE_MAGIC, 8);
  writeU64(b, size, 16);
  // 32 bits of flags in oldstyle: transmission flags in the low 16.
  b.writeUInt32BE(transmissionFlags & 0xffff, 24);
  return b;
}

export function encodeNewstyleGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(C.NBD_MAGIC, 0);
  b.writeBigUInt64BE(C.NBD_IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** Option request header: IHAVEOPT(8) option(4) length(4). */
export const OPTION_HEADER_LENGTH = 16;

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

export function decodeOptionHeader(b: Buffer): OptionHeader {
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOptionRequest(option: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_LENGTH + payload.length);
  b.writeBigUInt64BE(C.NBD_IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(payload.length, 12);
  payload.copy(b, OPTION_HEADER_LENGTH);
  return b;
}

/** Option reply: magic(8) option(4) type(4) length(4) payload. */
export function encodeOptionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + payload.length);
  b.writeBigUInt64BE(C.NBD_OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, 20);
  return b;
}

export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, Buffer.from(truncateUtf8(message, C.MAX_STRING_LENGTH)));
}

/** Reply to NBD_OPT_EXPORT_NAME: size(8) flags(2) and 124 zeros unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : C.ZERO_PAD_LENGTH));
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

/** NBD_REP_SERVER payload for NBD_OPT_LIST: u32 name length, name, then optional description. */
export function encodeServerEntry(name: string, description?: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.from(description ?? '');
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(C.NBD_INFO_EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(infoType: number, text: string): Buffer {
  const s = Buffer.from(truncateUtf8(text, C.MAX_STRING_LENGTH));
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(infoType, 0);
  s.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(C.NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** A decode failure inside an option payload: answered with NBD_REP_ERR_INVALID. */
export class OptionPayloadError extends Error {
  override readonly name = 'OptionPayloadError';
}

/** A bounds-checked cursor over an option payload. */
class Reader {
  private at = 0;
  constructor(private readonly b: Buffer) {}
  u16(): number {
    this.need(2);
    const v = this.b.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.b.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  string(length: number, what: string): string {
    if (length > C.MAX_STRING_LENGTH) throw new OptionPayloadError(`${what} is ${length} bytes, over ${C.MAX_STRING_LENGTH}`);
    this.need(length);
    const s = this.b.toString('utf8', this.at, this.at + length);
    this.at += length;
    return s;
  }
  end(): void {
    if (this.at !== this.b.length) throw new OptionPayloadError(`${this.b.length - this.at} trailing bytes in option payload`);
  }
  private need(n: number): void {
    if (this.at + n > this.b.length) throw new OptionPayloadError('option payload is truncated');
  }
}

/** NBD_OPT_INFO / NBD_OPT_GO payload: u32 name length, name, u16 count, count * u16 info types. */
export function decodeInfoRequest(payload: Buffer): { name: string; infos: number[] } {
  const r = new Reader(payload);
  const name = r.string(r.u32(), 'export name');
  const count = r.u16();
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(r.u16());
  r.end();
  return { name, infos };
}

export function encodeInfoRequest(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

/** LIST/SET_META_CONTEXT payload: u32 name length, name, u32 count, count * (u32 length, query). */
export function decodeMetaContextRequest(payload: Buffer): { name: string; queries: string[] } {
  const r = new Reader(payload);
  const name = r.string(r.u32(), 'export name');
  const count = r.u32();
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string(r.u32(), 'context query'));
  r.end();
  return { name, queries };
}

export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name);
  const head = Buffer.alloc(4);
  head.writeUInt32BE(n.length);
  parts.push(head, n);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q);
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------- transmission

export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  cookie: Cookie;
  /** Infinity when the wire offset is beyond 2^53. */
  offset: number;
  length: number;
}

export function decodeRequestHeader(b: Buffer, at = 0): RequestHeader {
  return {
    magic: b.readUInt32BE(at),
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookie: readCookie(b, at + 8),
    offset: readU64(b, at + 16),
    length: b.readUInt32BE(at + 24),
  };
}

export function encodeRequestHeader(flags: number, type: number, cookie: Cookie, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(C.REQUEST_HEADER_LENGTH);
  b.writeUInt32BE(C.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie.hi, 8);
  b.writeUInt32BE(cookie.lo, 12);
  writeU64(b, offset, 16);
  b.writeUInt32BE(length, 24);
  return b;
}

/** Writes a simple reply header at `at` (the caller may have reserved room for READ data after it). */
export function writeSimpleReplyHeader(b: Buffer, at: number, error: number, cookie: Cookie): void {
  b.writeUInt32BE(C.NBD_SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookie.hi, at + 8);
  b.writeUInt32BE(cookie.lo, at + 12);
}

export function encodeSimpleReply(error: number, cookie: Cookie): Buffer {
  const b = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_LENGTH);
  writeSimpleReplyHeader(b, 0, error, cookie);
  return b;
}

export function writeStructuredHeader(b: Buffer, at: number, flags: number, type: number, cookie: Cookie, length: number): void {
  b.writeUInt32BE(C.NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookie.hi, at + 8);
  b.writeUInt32BE(cookie.lo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

/** Room to leave in front of READ data for an OFFSET_DATA chunk: header + u64 offset. */
export const OFFSET_DATA_PREFIX = C.STRUCTURED_REPLY_HEADER_LENGTH + 8;

/** Fills the OFFSET_DATA prefix in front of `dataLength` bytes of READ data already in `b`. */
export function writeOffsetDataPrefix(b: Buffer, flags: number, cookie: Cookie, offset: number, dataLength: number): void {
  writeStructuredHeader(b, 0, flags, C.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataLength);
  writeU64(b, offset, C.STRUCTURED_REPLY_HEADER_LENGTH);
}

export function encodeStructuredNone(cookie: Cookie): Buffer {
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_LENGTH);
  writeStructuredHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_NONE, cookie, 0);
  return b;
}

export function encodeStructuredError(cookie: Cookie, error: number, message: string): Buffer {
  // Keep the whole chunk under QEMU's 1000-byte limit for non-data payloads.
  const msg = Buffer.from(truncateUtf8(message, C.MAX_NON_DATA_PAYLOAD - 6));
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_LENGTH + 6 + msg.length);
  writeStructuredHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_ERROR, cookie, 6 + msg.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

export interface Extent {
  length: number;
  flags: number;
}

/** One BLOCK_STATUS chunk for one context; the caller bounds the extent count. */
export function encodeBlockStatusChunk(cookie: Cookie, done: boolean, contextId: number, extents: readonly Extent[]): Buffer {
  const length = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_LENGTH + length);
  writeStructuredHeader(b, 0, done ? C.NBD_REPLY_FLAG_DONE : 0, C.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, length);
  b.writeUInt32BE(contextId, 20);
  let at = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

/** Cuts a string to at most `maxBytes` of UTF-8 without splitting a code point. */
export function truncateUtf8(s: string, maxBytes: number): string {
  const b = Buffer.from(s);
  if (b.length <= maxBytes) return s;
  let end = maxBytes;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.toString('utf8', 0, end);
}
