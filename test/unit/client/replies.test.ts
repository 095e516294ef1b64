// The client's reply parser on its own: byte streams in, settled requests out.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import { NbdProtocolError } from '../../../src/client/errors.js';
import { PendingRequest, ReplyParser } from '../../../src/client/replies.js';
import { ck, chunk, u64, u32 } from '../../helpers/wire.js';

function req(cookie: number, type: number, offset: number, length: number, into?: Buffer, at = 0): PendingRequest {
  const r = new PendingRequest(type, 0, offset, length, 0, undefined, into, at, () => {});
  r.cookie = cookie;
  return r;
}

function harness(structured: boolean, reqs: PendingRequest[]) {
  const map = new Map(reqs.map((r) => [r.cookie, r]));
  const done: PendingRequest[] = [];
  const parser = new ReplyParser(structured, {
    lookup: (c) => map.get(c),
    done: (r) => {
      map.delete(r.cookie);
      done.push(r);
    },
  });
  return { parser, done, map };
}


function dataChunk(flags: number, cookie: number, offset: number, data: Buffer): Buffer {
  return chunk(flags, C.NBD_REPLY_TYPE_OFFSET_DATA, cookie, Buffer.concat([u64(offset), data]));
}
function holeChunk(flags: number, cookie: number, offset: number, size: number): Buffer {
  return chunk(flags, C.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, Buffer.concat([u64(offset), u32(size)]));
}
function errorChunk(flags: number, cookie: number, errno: number, msg: string, offset?: number): Buffer {
  const m = Buffer.from(msg);
  const head = Buffer.alloc(6);
  head.writeUInt32BE(errno, 0);
  head.writeUInt16BE(m.length, 4);
  const parts: Buffer[] = [head, m];
  if (offset !== undefined) parts.push(u64(offset));
  return chunk(flags, offset === undefined ? C.NBD_REPLY_TYPE_ERROR : C.NBD_REPLY_TYPE_ERROR_OFFSET, cookie, Buffer.concat(parts));
}
const DONE = C.NBD_REPLY_FLAG_DONE;

/** Feeds `stream` in pieces of `step` bytes. */
function feed(parser: ReplyParser, stream: Buffer, step: number): void {
  for (let i = 0; i < stream.length; i += step) parser.push(stream.subarray(i, i + step));
}

t.test('structured READ assembled from data and hole chunks, in any order and any segmentation', async (t) => {
  const data1 = Buffer.alloc(1000, 0xaa);
  const data2 = Buffer.alloc(24, 0xbb);
  for (const step of [1, 3, 7, 20, 64, 4096]) {
    const into = Buffer.alloc(4096 + 10, 0xee); // garbage where holes go
    const r = req(5, C.NBD_CMD_READ, 1 << 20, 4096, into, 10);
    const h = harness(true, [r]);
    const stream = Buffer.concat([
      dataChunk(0, 5, (1 << 20) + 3072, data2.subarray(0, 24)), // out of order
      holeChunk(0, 5, (1 << 20) + 1000, 2072),
      dataChunk(0, 5, 1 << 20, data1),
      holeChunk(0, 5, (1 << 20) + 3096, 1000),
      chunk(DONE, C.NBD_REPLY_TYPE_NONE, 5, Buffer.alloc(0)),
    ]);
    feed(h.parser, stream, step);
    t.equal(h.done.length, 1, `step ${step}: done once`);
    t.ok(r.fullyCovered, 'every byte described');
    t.equal(r.error, undefined);
    t.ok(into.subarray(10, 1010).equals(data1), 'data at its offset');
    t.ok(into.subarray(1010, 3082).every((b) => b === 0), 'hole zero-filled');
    t.ok(into.subarray(3082, 3106).equals(data2), 'second data chunk');
    t.ok(into.subarray(3106, 4106).every((b) => b === 0), 'second hole');
    t.ok(into.subarray(0, 10).every((b) => b === 0xee), 'nothing written before `at`');
    t.ok(h.parser.idle, 'parser idle');
  }
});

t.test('replies for several requests interleave and complete out of order', async (t) => {
  const a = req(1, C.NBD_CMD_READ, 0, 8, Buffer.alloc(8));
  const b = req(2, C.NBD_CMD_WRITE, 0, 8);
  const c = req(3, C.NBD_CMD_READ, 8, 8, Buffer.alloc(8));
  const h = harness(true, [a, b, c]);
  const stream = Buffer.concat([
    dataChunk(0, 3, 8, Buffer.from('CCCCcccc').subarray(0, 4)),
    dataChunk(0, 1, 0, Buffer.from('AAAAAAAA')),
    codec.encodeSimpleReply(0, ck(2)), // a simple reply is fine for a WRITE
    dataChunk(DONE, 3, 12, Buffer.from('cccc')),
    chunk(DONE, C.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(0)),
  ]);
  feed(h.parser, stream, 5);
  t.same(h.done.map((r) => r.cookie), [2, 3, 1], 'completion order follows the stream');
  t.equal(a.into!.toString(), 'AAAAAAAA');
  t.equal(c.into!.toString(), 'CCCCcccc');
});

t.test('simple READ data goes straight into the caller buffer', async (t) => {
  const into = Buffer.alloc(100, 1);
  const r = req(0x1_0000_0002, C.NBD_CMD_READ, 0, 64, into, 20); // a cookie above 2^32
  const w = req(9, C.NBD_CMD_WRITE, 0, 1);
  const h = harness(false, [r, w]);
  const data = Buffer.alloc(64);
  for (let i = 0; i < 64; i++) data[i] = i;
  const stream = Buffer.concat([codec.encodeSimpleReply(0, ck(0x1_0000_0002)), data, codec.encodeSimpleReply(0, ck(9))]);
  feed(h.parser, stream, 3);
  t.same(h.done.map((x) => x.cookie), [0x1_0000_0002, 9]);
  t.ok(into.subarray(20, 84).equals(data));
  t.ok(into.subarray(0, 20).every((b) => b === 1) && into.subarray(84).every((b) => b === 1), 'only the target range written');
  t.ok(r.simple);
});

t.test('simple error replies carry no payload', async (t) => {
  const r = req(1, C.NBD_CMD_READ, 0, 4096, Buffer.alloc(4096));
  const w = req(2, C.NBD_CMD_WRITE, 0, 1);
  const h = harness(false, [r, w]);
  feed(h.parser, Buffer.concat([codec.encodeSimpleReply(C.NBD_EINVAL, ck(1)), codec.encodeSimpleReply(C.NBD_ENOSPC, ck(2))]), 4);
  t.same(r.error, { nbdErrno: C.NBD_EINVAL });
  t.same(w.error, { nbdErrno: C.NBD_ENOSPC });
  t.equal(h.done.length, 2);
});

t.test('error chunks: message, offset, first one wins, reply ends at DONE', async (t) => {
  const r = req(1, C.NBD_CMD_READ, 4096, 8192, Buffer.alloc(8192));
  const w = req(2, C.NBD_CMD_WRITE, 0, 1);
  const h = harness(true, [r, w]);
  feed(
    h.parser,
    Buffer.concat([
      errorChunk(0, 1, C.NBD_EIO, 'disk on fire', 4096 + 512),
      dataChunk(0, 1, 4096 + 4096, Buffer.alloc(4096, 1)),
      errorChunk(DONE, 1, C.NBD_ENOSPC, 'second'),
      errorChunk(DONE, 2, C.NBD_EPERM, 'ünïcode message'),
    ]),
    2,
  );
  t.same(r.error, { nbdErrno: C.NBD_EIO, message: 'disk on fire', offset: 4608 });
  t.same(w.error, { nbdErrno: C.NBD_EPERM, message: 'ünïcode message' });
  t.same(h.done.map((x) => x.cookie), [1, 2]);
});

t.test('unknown error chunk types are errors; error value 0 becomes EIO', async (t) => {
  const w = req(2, C.NBD_CMD_WRITE, 0, 1);
  const f = req(3, C.NBD_CMD_FLUSH, 0, 0);
  const h = harness(true, [w, f]);
  const odd = Buffer.concat([u32(C.NBD_ENOTSUP), Buffer.from([0, 2]), Buffer.from('no'), Buffer.alloc(5)]);
  feed(h.parser, Buffer.concat([chunk(DONE, 0x8123, 2, odd), errorChunk(DONE, 3, 0, '')]), 1);
  t.same(w.error, { nbdErrno: C.NBD_ENOTSUP, message: 'no' });
  t.same(f.error, { nbdErrno: C.NBD_EIO });
});

t.test('BLOCK_STATUS chunks per context', async (t) => {
  const r = req(7, C.NBD_CMD_BLOCK_STATUS, 0, 1 << 20);
  const h = harness(true, [r]);
  const bs = (id: number, ext: number[][], flags: number) =>
    chunk(flags, C.NBD_REPLY_TYPE_BLOCK_STATUS, 7, Buffer.concat([u32(id), ...ext.flatMap(([l, f]) => [u32(l!), u32(f!)])]));
  feed(h.parser, Buffer.concat([bs(4, [[4096, 3], [8192, 0]], 0), bs(9, [[1 << 20, 0]], DONE)]), 6);
  t.same(r.statuses?.get(4), [
    { length: 4096, flags: 3 },
    { length: 8192, flags: 0 },
  ]);
  t.same(r.statuses?.get(9), [{ length: 1 << 20, flags: 0 }]);
  t.equal(h.done.length, 1);
});

t.test('protocol violations throw (the connection must be dropped)', async (t) => {
  const cases: Array<[string, boolean, () => PendingRequest[], Buffer, RegExp]> = [
    ['unknown cookie', true, () => [req(1, C.NBD_CMD_READ, 0, 8, Buffer.alloc(8))], chunk(DONE, 0, 99, Buffer.alloc(0)), /unknown cookie 0x0000000000000063/],
    ['unknown cookie (simple)', false, () => [], codec.encodeSimpleReply(0, ck(5)), /unknown cookie/],
    ['bad magic', true, () => [], Buffer.from('HTTP/1.1 400 Bad Request\r\n'), /bad reply magic 0x48545450/],
    ['structured when not negotiated', false, () => [req(1, C.NBD_CMD_FLUSH, 0, 0)], chunk(DONE, 0, 1, Buffer.alloc(0)), /not negotiated/],
    ['simple READ data when structured', true, () => [req(1, C.NBD_CMD_READ, 0, 8, Buffer.alloc(8))], codec.encodeSimpleReply(0, ck(1)), /structured replies were negotiated/],
    ['data outside the request', true, () => [req(1, C.NBD_CMD_READ, 0, 8, Buffer.alloc(8))], dataChunk(DONE, 1, 4, Buffer.alloc(8)), /outside the read/],
    ['hole before the request', true, () => [req(1, C.NBD_CMD_READ, 100, 8, Buffer.alloc(8))], holeChunk(DONE, 1, 96, 8), /outside the read/],
    [
      'overlapping chunks',
      true,
      () => [req(1, C.NBD_CMD_READ, 0, 16, Buffer.alloc(16))],
      Buffer.concat([dataChunk(0, 1, 8, Buffer.alloc(8)), holeChunk(0, 1, 4, 8)]),
      /overlaps/,
    ],
    ['data chunk for a WRITE', true, () => [req(1, C.NBD_CMD_WRITE, 0, 8)], dataChunk(DONE, 1, 0, Buffer.alloc(8)), /other than READ/],
    ['unknown non-error chunk type', true, () => [req(1, C.NBD_CMD_FLUSH, 0, 0)], chunk(DONE, 42, 1, Buffer.alloc(0)), /unknown chunk type/],
    ['NONE without DONE', true, () => [req(1, C.NBD_CMD_FLUSH, 0, 0)], chunk(0, C.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(0)), /without the DONE/],
    ['error message overrun', true, () => [req(1, C.NBD_CMD_FLUSH, 0, 0)], chunk(DONE, C.NBD_REPLY_TYPE_ERROR, 1, Buffer.from([0, 0, 0, 5, 0, 50, 65])), /overruns/],
    ['bad block status length', true, () => [req(1, C.NBD_CMD_BLOCK_STATUS, 0, 8)], chunk(DONE, C.NBD_REPLY_TYPE_BLOCK_STATUS, 1, Buffer.alloc(8)), /4 \+ 8n/],
    ['hole of size 0', true, () => [req(1, C.NBD_CMD_READ, 0, 8, Buffer.alloc(8))], holeChunk(DONE, 1, 0, 0), /size 0/],
  ];
  for (const [name, structured, reqs, stream, re] of cases) {
    const h = harness(structured, reqs());
    t.throws(() => feed(h.parser, stream, stream.length), re, name);
    const h2 = harness(structured, reqs());
    t.throws(() => feed(h2.parser, stream, 1), NbdProtocolError, `${name} (byte by byte)`);
  }
});

t.test('a reply after DONE has an unknown cookie', async (t) => {
  const r = req(1, C.NBD_CMD_FLUSH, 0, 0);
  const h = harness(true, [r]);
  h.parser.push(chunk(DONE, C.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(0)));
  t.throws(() => h.parser.push(chunk(DONE, C.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(0))), /unknown cookie/);
});

t.test('coverage bookkeeping', async (t) => {
  const r = req(1, C.NBD_CMD_READ, 0, 100);
  t.ok(r.addRange(50, 60));
  t.ok(r.addRange(0, 10));
  t.ok(r.addRange(90, 100));
  t.notOk(r.addRange(55, 58), 'inside a range');
  t.notOk(r.addRange(5, 15), 'straddles a start');
  t.notOk(r.addRange(40, 95), 'spans ranges');
  t.notOk(r.fullyCovered);
  t.ok(r.addRange(10, 50));
  t.ok(r.addRange(60, 90));
  t.ok(r.fullyCovered, 'merged into one range');
  t.notOk(r.addRange(0, 1));
});
