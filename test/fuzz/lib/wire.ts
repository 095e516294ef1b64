// Builders for the client side of the NBD wire protocol, deliberately lax:
// every length field can disagree with the data that follows, so the
// mutators can produce any framing they like.

import * as C from '../../../src/protocol/constants.js';

export { C };

export const u16 = (v: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
};
export const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
export const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, v));
  return b;
};

/** A client message with a label, so mutators can work message by message. */
export interface Segment {
  kind: 'flags' | 'option' | 'request' | 'payload' | 'raw';
  bytes: Buffer;
}

export function clientFlags(flags: number): Segment {
  return { kind: 'flags', bytes: u32(flags) };
}

/** Option request; `declaredLength` defaults to the payload's real length. */
export function option(opt: number, payload: Buffer = Buffer.alloc(0), declaredLength?: number, magic = C.NBD_IHAVEOPT): Segment {
  return {
    kind: 'option',
    bytes: Buffer.concat([u64(magic), u32(opt), u32(declaredLength ?? payload.length), payload]),
  };
}

export function str(s: string | Buffer): Buffer {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  return Buffer.concat([u32(b.length), b]);
}

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
export function infoPayload(name: string | Buffer, infos: number[]): Buffer {
  return Buffer.concat([str(name), u16(infos.length), ...infos.map(u16)]);
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload. */
export function metaPayload(name: string | Buffer, queries: Array<string | Buffer>): Buffer {
  return Buffer.concat([str(name), u32(queries.length), ...queries.map(str)]);
}

export interface RequestFields {
  magic?: number;
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

export function requestHeader(r: RequestFields): Buffer {
  const b = Buffer.alloc(C.REQUEST_HEADER_LENGTH);
  b.writeUInt32BE((r.magic ?? C.NBD_REQUEST_MAGIC) >>> 0, 0);
  b.writeUInt16BE(r.flags & 0xffff, 4);
  b.writeUInt16BE(r.type & 0xffff, 6);
  b.writeBigUInt64BE(BigInt.asUintN(64, r.cookie), 8);
  b.writeBigUInt64BE(BigInt.asUintN(64, r.offset), 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

export function request(r: RequestFields, payload?: Buffer): Segment {
  return { kind: 'request', bytes: payload ? Buffer.concat([requestHeader(r), payload]) : requestHeader(r) };
}

export function hex(b: Buffer): string {
  return b.toString('hex');
}
