// Golden bytes for the reply decoders, and the chunk shapes each command allows.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import * as R from '../../../src/protocol/replies.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

t.test('readU64: one 64-bit read, Infinity beyond 2^53', async (t) => {
  t.equal(codec.readU64(hex('0000000000001000'), 0), 4096);
  t.equal(codec.readU64(hex('ff 00000001 00000002'), 1), 0x1_0000_0002, 'at an offset');
  t.equal(codec.readU64(hex('001fffff ffffffff'), 0), Number.MAX_SAFE_INTEGER, '2^53 - 1');
  t.equal(codec.readU64(hex('00200000 00000000'), 0), Number.POSITIVE_INFINITY, '2^53');
  t.equal(codec.readU64(hex('ffffffff ffffffff'), 0), Number.POSITIVE_INFINITY, '2^64 - 1');
  t.equal(codec.decodeRequestHeader(hex('25609513 0000 0000 0000000000000001 ffffffffffffffff 00001000')).offset, Number.POSITIVE_INFINITY, 'request offsets use it');
});

t.test('cookies as numbers and back', async (t) => {
  t.same(codec.cookieFromNumber(0x1_0000_0002), { hi: 1, lo: 2 });
  t.equal(codec.cookieToNumber({ hi: 1, lo: 2 }), 0x1_0000_0002);
  t.equal(codec.cookieToNumber({ hi: 0xffffffff, lo: 0 }), Number.POSITIVE_INFINITY, 'no cookie we sent');
  t.equal(codec.cookieText({ hi: 0xab, lo: 1 }), '0x000000ab00000001');
});

t.test('simple reply header', async (t) => {
  t.same(R.decodeSimpleReplyHeader(hex('67446698 0000001c 01020304 05060708')), { error: C.NBD_ENOSPC, cookie: { hi: 0x01020304, lo: 0x05060708 } });
  const b = codec.encodeSimpleReply(C.NBD_EIO, { hi: 7, lo: 9 });
  t.same(R.decodeSimpleReplyHeader(b), { error: C.NBD_EIO, cookie: { hi: 7, lo: 9 } }, 'round trip with the encoder');
});

t.test('structured chunk header', async (t) => {
  t.same(R.decodeChunkHeader(hex('668e33ef 0001 0005 00000000 0000002a 0000000c')), {
    flags: C.NBD_REPLY_FLAG_DONE,
    type: C.NBD_REPLY_TYPE_BLOCK_STATUS,
    cookie: { hi: 0, lo: 42 },
    length: 12,
  });
});

t.test('chunk payloads', async (t) => {
  t.same(R.decodeOffsetHole(hex('0000000100000000 00002000')), { offset: 2 ** 32, size: 8192 });
  t.same(R.decodeBlockStatus(hex('00000001 00001000 00000003 00010000 00000000')), {
    contextId: 1,
    extents: [
      { length: 4096, flags: C.NBD_STATE_HOLE | C.NBD_STATE_ZERO },
      { length: 65536, flags: 0 },
    ],
  });
  const err = hex('0000001c 0004 66756c6c');
  t.equal(R.errorChunkProblem(C.NBD_REPLY_TYPE_ERROR, err), undefined);
  t.same(R.decodeErrorChunk(C.NBD_REPLY_TYPE_ERROR, err), { nbdErrno: C.NBD_ENOSPC, message: 'full' });
  const withOffset = hex('00000005 0000 0000000000100000');
  t.same(R.decodeErrorChunk(C.NBD_REPLY_TYPE_ERROR_OFFSET, withOffset), { nbdErrno: C.NBD_EIO, offset: 1 << 20 }, 'ERROR_OFFSET, no message');
  t.same(R.decodeErrorChunk(C.NBD_REPLY_TYPE_ERROR, hex('00000000 0000')), { nbdErrno: C.NBD_EIO }, 'error 0 in an error chunk is EIO');
  t.match(R.errorChunkProblem(C.NBD_REPLY_TYPE_ERROR, hex('00000005 0009 6e6f')), /message of 9 bytes overruns the 8-byte chunk/);
  t.match(R.errorChunkProblem(C.NBD_REPLY_TYPE_ERROR_OFFSET, hex('00000005 0000 00000000')), /overruns/, 'ERROR_OFFSET without room for its offset');
  // The server's own encoder decodes back.
  const e = codec.encodeStructuredError({ hi: 0, lo: 1 }, C.NBD_EPERM, 'read-only');
  t.same(R.decodeErrorChunk(C.NBD_REPLY_TYPE_ERROR, e.subarray(C.STRUCTURED_REPLY_HEADER_LENGTH)), { nbdErrno: C.NBD_EPERM, message: 'read-only' });
});

t.test('which chunks a reply to each command may carry', async (t) => {
  const h = (type: number, length: number, flags = 0): R.ChunkHeader => ({ flags, type, cookie: { hi: 0, lo: 1 }, length });
  const DONE = C.NBD_REPLY_FLAG_DONE;
  const cases: Array<[string, R.ChunkHeader, number, RegExp | undefined]> = [
    ['NONE + DONE', h(C.NBD_REPLY_TYPE_NONE, 0, DONE), C.NBD_CMD_WRITE, undefined],
    ['NONE with payload', h(C.NBD_REPLY_TYPE_NONE, 1, DONE), C.NBD_CMD_READ, /NONE chunk with a payload/],
    ['NONE without DONE', h(C.NBD_REPLY_TYPE_NONE, 0), C.NBD_CMD_READ, /without the DONE flag/],
    ['OFFSET_DATA to READ', h(C.NBD_REPLY_TYPE_OFFSET_DATA, 9), C.NBD_CMD_READ, undefined],
    ['OFFSET_DATA to WRITE', h(C.NBD_REPLY_TYPE_OFFSET_DATA, 9), C.NBD_CMD_WRITE, /other than READ/],
    ['OFFSET_DATA without data', h(C.NBD_REPLY_TYPE_OFFSET_DATA, 8), C.NBD_CMD_READ, /shorter than 9/],
    ['OFFSET_HOLE to READ', h(C.NBD_REPLY_TYPE_OFFSET_HOLE, 12), C.NBD_CMD_READ, undefined],
    ['OFFSET_HOLE to CACHE', h(C.NBD_REPLY_TYPE_OFFSET_HOLE, 12), C.NBD_CMD_CACHE, /other than READ/],
    ['OFFSET_HOLE of 13 bytes', h(C.NBD_REPLY_TYPE_OFFSET_HOLE, 13), C.NBD_CMD_READ, /not 12 bytes/],
    ['BLOCK_STATUS', h(C.NBD_REPLY_TYPE_BLOCK_STATUS, 12), C.NBD_CMD_BLOCK_STATUS, undefined],
    ['BLOCK_STATUS to READ', h(C.NBD_REPLY_TYPE_BLOCK_STATUS, 12), C.NBD_CMD_READ, /other than BLOCK_STATUS/],
    ['BLOCK_STATUS without descriptors', h(C.NBD_REPLY_TYPE_BLOCK_STATUS, 4), C.NBD_CMD_BLOCK_STATUS, /4 \+ 8n/],
    ['BLOCK_STATUS of 4 + 8n + 1', h(C.NBD_REPLY_TYPE_BLOCK_STATUS, 13), C.NBD_CMD_BLOCK_STATUS, /4 \+ 8n/],
    ['BLOCK_STATUS too large', h(C.NBD_REPLY_TYPE_BLOCK_STATUS, R.MAX_CHUNK_PAYLOAD + 4), C.NBD_CMD_BLOCK_STATUS, /too large/],
    ['ERROR to any command', h(C.NBD_REPLY_TYPE_ERROR, 6, DONE), C.NBD_CMD_FLUSH, undefined],
    ['unknown error type', h(0x8123, 6), C.NBD_CMD_READ, undefined],
    ['short error', h(C.NBD_REPLY_TYPE_ERROR, 5), C.NBD_CMD_READ, /shorter than 6/],
    ['error too large', h(C.NBD_REPLY_TYPE_ERROR, R.MAX_CHUNK_PAYLOAD + 1), C.NBD_CMD_READ, /error chunk too large/],
    ['unknown non-error type', h(3, 0), C.NBD_CMD_READ, /unknown chunk type/],
  ];
  for (const [name, header, command, problem] of cases) {
    const p = R.chunkProblem(header, command);
    if (problem) t.match(p, problem, name);
    else t.equal(p, undefined, name);
  }
});
