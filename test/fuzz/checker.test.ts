// The fuzzer's oracle on its own: scripted server output in, violations out.
// Guards against an oracle that would let a broken server pass (or flag a
// correct one) without anyone noticing.

import t from 'tap';
import * as codec from '../../src/protocol/codec.js';
import { SessionChecker, type Violation } from './lib/checker.js';
import { checkerConfig } from './lib/campaign.js';
import { C, clientFlags, infoPayload, metaPayload, option, request } from './lib/wire.js';
import { FUZZ_EXPORTS } from './lib/generate.js';

const VM1 = FUZZ_EXPORTS.vm1.size;
const TFLAGS =
  C.NBD_FLAG_HAS_FLAGS |
  C.NBD_FLAG_SEND_FLUSH |
  C.NBD_FLAG_SEND_FUA |
  C.NBD_FLAG_SEND_TRIM |
  C.NBD_FLAG_SEND_WRITE_ZEROES |
  C.NBD_FLAG_SEND_FAST_ZERO |
  C.NBD_FLAG_CAN_MULTI_CONN |
  C.NBD_FLAG_SEND_CACHE;
const ck = (n: number) => ({ hi: 0, lo: n });
const greeting = codec.encodeNewstyleGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES);
const exportNameSession = (...reqs: Buffer[]) =>
  Buffer.concat([clientFlags(3).bytes, option(C.NBD_OPT_EXPORT_NAME, Buffer.from('vm1')).bytes, ...reqs]);
const exportNameReply = codec.encodeExportNameReply(VM1, TFLAGS, true);
const req = (type: number, cookie: number, offset: number, length: number, flags = 0, payload?: Buffer) =>
  request({ type, cookie: BigInt(cookie), offset: BigInt(offset), length, flags }, payload).bytes;

function check(client: Buffer, server: Buffer[], close: 'server' | 'none' = 'none', elapsedMs = 10): { v: Violation[]; settled: boolean } {
  const c = new SessionChecker(client, checkerConfig('tcp'));
  for (const b of server) c.feed(b);
  if (close === 'server') c.serverClosed({ clientInitiated: false, elapsedMs, handshakeTimeoutMs: 1000 });
  return { v: c.violations, settled: c.settled() };
}
const kinds = (v: Violation[]) => v.map((x) => x.kind);

t.test('a correct EXPORT_NAME session passes', async (t) => {
  const client = exportNameSession(req(C.NBD_CMD_READ, 1, 0, 512), req(C.NBD_CMD_WRITE, 2, 512, 4, 0, Buffer.from('abcd')), req(C.NBD_CMD_DISC, 3, 0, 0));
  const read = Buffer.alloc(16 + 512);
  codec.writeSimpleReplyHeader(read, 0, 0, ck(1));
  const r = check(client, [greeting, exportNameReply, codec.encodeSimpleReply(0, ck(2)), read], 'server');
  t.same(r.v, []);
  t.ok(r.settled);
});

t.test('a missing reply is a hang until the server closes, then a violation', async (t) => {
  const client = exportNameSession(req(C.NBD_CMD_READ, 1, 0, 512));
  t.notOk(check(client, [greeting, exportNameReply]).settled, 'not settled while the READ is unanswered');
  t.same(kinds(check(client, [greeting, exportNameReply], 'server').v), ['closed-with-requests-pending']);
});

t.test('replies with unknown cookies, success for invalid requests, errors for valid ones', async (t) => {
  t.same(kinds(check(exportNameSession(req(C.NBD_CMD_FLUSH, 1, 0, 0)), [greeting, exportNameReply, codec.encodeSimpleReply(0, ck(9))]).v), ['unexpected-reply']);
  const beyond = exportNameSession(req(C.NBD_CMD_TRIM, 1, VM1 - 4096, 8192));
  t.same(kinds(check(beyond, [greeting, exportNameReply, codec.encodeSimpleReply(0, ck(1))]).v), ['accepted-invalid']);
  const valid = exportNameSession(req(C.NBD_CMD_TRIM, 1, 0, 8192));
  t.same(kinds(check(valid, [greeting, exportNameReply, codec.encodeSimpleReply(C.NBD_EIO, ck(1))]).v), ['unexpected-error']);
  t.same(kinds(check(valid, [greeting, exportNameReply, codec.encodeSimpleReply(17, ck(1))]).v), ['bad-errno', 'unexpected-error']);
});

t.test('NBD_CMD_DISC: no reply, replies to earlier requests first, then a close', async (t) => {
  const client = exportNameSession(req(C.NBD_CMD_FLUSH, 1, 0, 0), req(C.NBD_CMD_DISC, 2, 0, 0, 0x8000));
  t.same(kinds(check(client, [greeting, exportNameReply, codec.encodeSimpleReply(0, ck(1)), codec.encodeSimpleReply(C.NBD_EINVAL, ck(2))]).v), ['reply-to-disc']);
  t.same(kinds(check(client, [greeting, exportNameReply], 'server').v), ['disc-dropped-replies']);
  const ok = check(client, [greeting, exportNameReply, codec.encodeSimpleReply(0, ck(1))]);
  t.same(ok.v, []);
  t.notOk(ok.settled, 'waits for the close after DISC');
});

const srHandshake = Buffer.concat([
  clientFlags(3).bytes,
  option(C.NBD_OPT_STRUCTURED_REPLY).bytes,
  option(C.NBD_OPT_SET_META_CONTEXT, metaPayload('vm1', ['base:allocation'])).bytes,
  option(C.NBD_OPT_GO, infoPayload('vm1', [])).bytes,
]);
const srReplies = [
  greeting,
  codec.encodeOptionReply(C.NBD_OPT_STRUCTURED_REPLY, C.NBD_REP_ACK),
  codec.encodeOptionReply(C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_META_CONTEXT, codec.encodeMetaContextReply(1, 'base:allocation')),
  codec.encodeOptionReply(C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_ACK),
  codec.encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_INFO, codec.encodeInfoExport(VM1, TFLAGS | C.NBD_FLAG_SEND_DF)),
  codec.encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_ACK),
];

t.test('structured replies', async (t) => {
  const read = (cookie: number, off: number, len: number) => {
    const b = Buffer.alloc(codec.OFFSET_DATA_PREFIX + len);
    codec.writeOffsetDataPrefix(b, C.NBD_REPLY_FLAG_DONE, ck(cookie), off, len);
    return b;
  };
  const client = Buffer.concat([srHandshake, req(C.NBD_CMD_READ, 1, 4096, 1024), req(C.NBD_CMD_BLOCK_STATUS, 2, 0, 1 << 20)]);
  const bs = codec.encodeBlockStatusChunk(ck(2), true, 1, [{ length: 65536, flags: 3 }]);
  t.same(check(client, [...srReplies, read(1, 4096, 1024), bs]).v, [], 'a correct session passes');
  t.same(kinds(check(client, [...srReplies, read(1, 4096, 512), bs]).v), ['read-incomplete']);
  t.same(kinds(check(client, [...srReplies, codec.encodeSimpleReply(0, ck(1)), Buffer.alloc(1024), bs]).v), ['simple-reply-to-read']);
  const big = codec.encodeBlockStatusChunk(ck(2), true, 1, Array.from({ length: 130 }, () => ({ length: 512, flags: 0 })));
  t.same(kinds(check(client, [...srReplies, read(1, 4096, 1024), big]).v), ['oversized-chunk']);
  const wrongCtx = codec.encodeBlockStatusChunk(ck(2), true, 7, [{ length: 512, flags: 0 }]);
  t.match(kinds(check(client, [...srReplies, read(1, 4096, 1024), wrongCtx]).v), ['bad-block-status']);
});

t.test('handshake replies', async (t) => {
  const list = Buffer.concat([clientFlags(3).bytes, option(C.NBD_OPT_LIST).bytes]);
  const server = (name: string) => codec.encodeOptionReply(C.NBD_OPT_LIST, C.NBD_REP_SERVER, codec.encodeServerEntry(name));
  t.same(kinds(check(list, [greeting, server('vm1'), server('ro'), codec.encodeOptionReply(C.NBD_OPT_LIST, C.NBD_REP_ACK)]).v), ['bad-list']);
  const unknown = Buffer.concat([clientFlags(3).bytes, option(0x4242, Buffer.alloc(3)).bytes]);
  t.same(kinds(check(unknown, [greeting, codec.encodeOptionReply(0x4242, C.NBD_REP_ACK)]).v), ['option-accepted']);
  t.same(kinds(check(unknown, [greeting, codec.encodeOptionReply(0x4242, C.NBD_REP_ERR_INVALID)]).v), ['bad-option-reply']);
  const badFlags = Buffer.concat([clientFlags(0x80).bytes, option(C.NBD_OPT_LIST).bytes]);
  t.same(kinds(check(badFlags, [greeting, codec.encodeOptionReply(C.NBD_OPT_LIST, C.NBD_REP_ACK)]).v), ['data-after-close-expected']);
  const stalled = Buffer.concat([clientFlags(3).bytes, option(C.NBD_OPT_LIST).bytes.subarray(0, 10)]);
  t.same(kinds(check(stalled, [greeting], 'server', 200).v), ['early-close'], 'closing a stalled handshake before the timeout');
  t.same(check(stalled, [greeting], 'server', 1000).v, [], 'closing it at the timeout');
  // Options pipelined before a request with a bad magic: a hard close may lose the replies.
  const pipelined = Buffer.concat([srHandshake, Buffer.alloc(28, 0xee)]);
  t.same(check(pipelined, [greeting], 'server').v, []);
});

t.test('a bad request magic right after GO may take the GO replies with it', async (t) => {
  // Fuzz case 353 (seed 20261122): GO, then an option header where the first request belongs.
  const client = Buffer.from('0000000349484156454f5054000000070000000b00000003766d310001000149484156454f50540000000a000100006aa79cd8bdffd6613c8cbfdd', 'hex');
  t.same(check(client, [greeting], 'server').v, []);
});
