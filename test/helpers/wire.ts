// Bytes of NBD replies as a server would send them, for the client's tests.
import * as C from '../../src/protocol/constants.js';
import * as codec from '../../src/protocol/codec.js';

/** A cookie from a number (high and low 32 bits). */
export const ck = (n: number): codec.Cookie => ({ hi: Math.floor(n / 2 ** 32), lo: n >>> 0 });

/** One structured reply chunk: its header, then the payload. */
export function chunk(flags: number, type: number, cookie: number, payload: Buffer): Buffer {
  const b = Buffer.alloc(C.STRUCTURED_REPLY_HEADER_LENGTH + payload.length);
  codec.writeStructuredHeader(b, 0, flags, type, ck(cookie), payload.length);
  payload.copy(b, C.STRUCTURED_REPLY_HEADER_LENGTH);
  return b;
}

export function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}
