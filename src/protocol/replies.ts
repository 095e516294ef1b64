/**
 * Pure decoders for transmission replies (proto.md "Simple reply message" and
 * "Structured reply chunk message"): Buffers in, values out, no I/O and no
 * state. Framing (how many bytes make a reply, which request it answers)
 * belongs to the client's reply parser; what a chunk may look like, and for
 * which command, is decided here. Checks return the problem as text, and the
 * caller decides what a violation costs (the client drops the connection).
 */
import * as C from './constants.js';
import { readCookie, readU64, type Cookie, type Extent } from './codec.js';

/** Largest non-data chunk payload accepted (block status for a 4 GiB range of 4 KiB extents is 8 MiB). */
export const MAX_CHUNK_PAYLOAD = 16 * 1024 * 1024;

/** An error reported for a request, from a simple reply or an error chunk. */
export interface ReplyError {
  nbdErrno: number;
  message?: string;
  /** NBD_REPLY_TYPE_ERROR_OFFSET: where it happened. */
  offset?: number;
}

/** Simple reply header (16 bytes): magic(4) error(4) cookie(8); READ data may follow. */
export interface SimpleReplyHeader {
  error: number;
  cookie: Cookie;
}

export function decodeSimpleReplyHeader(b: Buffer, at = 0): SimpleReplyHeader {
  return { error: b.readUInt32BE(at + 4), cookie: readCookie(b, at + 8) };
}

/** Structured reply chunk header (20 bytes): magic(4) flags(2) type(2) cookie(8) length(4). */
export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: Cookie;
  /** Payload bytes following the header. */
  length: number;
}

export function decodeChunkHeader(b: Buffer, at = 0): ChunkHeader {
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookie: readCookie(b, at + 8),
    length: b.readUInt32BE(at + 16),
  };
}

/** Error chunk types have the high bit set; every one starts with error(4) and message length(2). */
export const isErrorChunk = (type: number): boolean => (type & 0x8000) !== 0;

/**
 * Why a chunk with this header cannot belong to the reply to `command`
 * (undefined: it can). Checks type, length and the DONE flag where the spec
 * fixes them; offsets are for the caller, which knows the request's range.
 */
export function chunkProblem(h: ChunkHeader, command: number): string | undefined {
  const { type, length } = h;
  switch (type) {
    case C.NBD_REPLY_TYPE_NONE:
      if (length !== 0) return 'NONE chunk with a payload';
      if (!(h.flags & C.NBD_REPLY_FLAG_DONE)) return 'NONE chunk without the DONE flag';
      return undefined;
    case C.NBD_REPLY_TYPE_OFFSET_DATA:
      if (command !== C.NBD_CMD_READ) return 'OFFSET_DATA chunk for a command other than READ';
      if (length < 9) return 'OFFSET_DATA chunk shorter than 9 bytes';
      return undefined;
    case C.NBD_REPLY_TYPE_OFFSET_HOLE:
      if (command !== C.NBD_CMD_READ) return 'OFFSET_HOLE chunk for a command other than READ';
      if (length !== 12) return 'OFFSET_HOLE chunk not 12 bytes long';
      return undefined;
    case C.NBD_REPLY_TYPE_BLOCK_STATUS:
      if (command !== C.NBD_CMD_BLOCK_STATUS) return 'BLOCK_STATUS chunk for a command other than BLOCK_STATUS';
      if (length < 12 || (length - 4) % 8 !== 0) return 'BLOCK_STATUS chunk length is not 4 + 8n (n > 0)';
      if (length > MAX_CHUNK_PAYLOAD) return 'BLOCK_STATUS chunk too large';
      return undefined;
    default:
      if (!isErrorChunk(type)) return 'unknown chunk type';
      if (length < 6) return 'error chunk shorter than 6 bytes';
      if (length > MAX_CHUNK_PAYLOAD) return 'error chunk too large';
      return undefined;
  }
}

/** OFFSET_HOLE payload: offset(8) size(4). */
export function decodeOffsetHole(p: Buffer): { offset: number; size: number } {
  return { offset: readU64(p, 0), size: p.readUInt32BE(8) };
}

/** BLOCK_STATUS payload: context id(4), then (length(4), flags(4)) descriptors. */
export function decodeBlockStatus(p: Buffer): { contextId: number; extents: Extent[] } {
  const extents: Extent[] = [];
  for (let at = 4; at < p.length; at += 8) extents.push({ length: p.readUInt32BE(at), flags: p.readUInt32BE(at + 4) });
  return { contextId: p.readUInt32BE(0), extents };
}

/** Why an error chunk's payload is malformed (undefined: decodeErrorChunk may read it). */
export function errorChunkProblem(type: number, p: Buffer): string | undefined {
  const msgLength = p.readUInt16BE(4);
  const tail = type === C.NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
  if (6 + msgLength + tail > p.length) return `error chunk message of ${msgLength} bytes overruns the ${p.length}-byte chunk`;
  return undefined;
}

/**
 * Error chunk payload: error(4) message length(2) message, and for
 * ERROR_OFFSET the offset(8) after it. An error value of 0 is no error at
 * all in an error chunk: it is reported as EIO.
 */
export function decodeErrorChunk(type: number, p: Buffer): ReplyError {
  const nbdErrno = p.readUInt32BE(0);
  const msgLength = p.readUInt16BE(4);
  const message = p.toString('utf8', 6, 6 + msgLength);
  const error: ReplyError = { nbdErrno: nbdErrno === 0 ? C.NBD_EIO : nbdErrno };
  if (message) error.message = message;
  if (type === C.NBD_REPLY_TYPE_ERROR_OFFSET) error.offset = readU64(p, 6 + msgLength);
  return error;
}
