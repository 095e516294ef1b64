// Golden bytes: every encoder checked against hand-written wire images from proto.md.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const cookie = { hi: 0x01020304, lo: 0x05060708 };

t.test('oldstyle greeting is 152 bytes: magic, cliserv magic, size, flags, zeros', async (t) => {
  const g = codec.encodeOldstyleGreeting(0x12345678, C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH);
  t.equal(g.length, 152);
  t.same(g.subarray(0, 28), hex('4e42444d41474943 0000420281861253 0000000012345678 00000005'));
  t.ok(g.subarray(28).every((b) => b === 0), '124 zero bytes');
});

t.test('newstyle greeting', async (t) => {
  t.same(codec.encodeNewstyleGreeting(3), hex('4e42444d41474943 49484156454f5054 0003'));
});

t.test('option reply and error', async (t) => {
  t.same(codec.encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_ACK), hex('0003e889045565a9 00000007 00000001 00000000'));
  t.same(codec.encodeOptionError(C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_UNSUP, 'no'), hex('0003e889045565a9 00000005 80000001 00000002 6e6f'));
});

t.test('export name reply with and without zero padding', async (t) => {
  t.same(codec.encodeExportNameReply(4096, 0x0103, true), hex('0000000000001000 0103'));
  const padded = codec.encodeExportNameReply(4096, 0x0103, false);
  t.equal(padded.length, 134);
  t.ok(padded.subarray(10).every((b) => b === 0));
});

t.test('NBD_REP_SERVER entry and info replies', async (t) => {
  t.same(codec.encodeServerEntry('vm1', 'disk'), hex('00000003 766d31 6469736b'));
  t.same(codec.encodeInfoExport(2 ** 40, 0x0d6f), hex('0000 0000010000000000 0d6f'));
  t.same(codec.encodeInfoString(C.NBD_INFO_NAME, 'a'), hex('0001 61'));
  t.same(codec.encodeInfoBlockSize(1, 4096, 32 << 20), hex('0003 00000001 00001000 02000000'));
  t.same(codec.encodeMetaContextReply(1, 'base:allocation'), Buffer.concat([hex('00000001'), Buffer.from('base:allocation')]));
});

t.test('INFO/GO request round trip and bad payloads', async (t) => {
  const p = codec.encodeInfoRequest('vm1', [C.NBD_INFO_NAME, C.NBD_INFO_BLOCK_SIZE]);
  t.same(p, hex('00000003 766d31 0002 0001 0003'));
  t.same(codec.decodeInfoRequest(p), { name: 'vm1', infos: [1, 3] });
  t.throws(() => codec.decodeInfoRequest(hex('00000009 766d31')), codec.OptionPayloadError, 'truncated name');
  t.throws(() => codec.decodeInfoRequest(Buffer.concat([p, hex('00')])), codec.OptionPayloadError, 'trailing byte');
  t.throws(() => codec.decodeInfoRequest(hex('00002000')), /over 4096/, 'name longer than 4096 bytes');
});

t.test('meta context request round trip', async (t) => {
  const p = codec.encodeMetaContextRequest('', ['base:allocation']);
  t.same(p, Buffer.concat([hex('00000000 00000001 0000000f'), Buffer.from('base:allocation')]));
  t.same(codec.decodeMetaContextRequest(p), { name: '', queries: ['base:allocation'] });
  t.throws(() => codec.decodeMetaContextRequest(hex('00000000 00000002 00000001 61')), codec.OptionPayloadError);
});

t.test('request header decode/encode', async (t) => {
  const wire = hex('25609513 0001 0001 0102030405060708 0000000100000000 00001000');
  const h = codec.decodeRequestHeader(wire);
  t.same(h, { magic: C.NBD_REQUEST_MAGIC, flags: 1, type: 1, cookie, offset: 2 ** 32, length: 4096 });
  t.same(codec.encodeRequestHeader(1, 1, cookie, 2 ** 32, 4096), wire);
  const huge = codec.decodeRequestHeader(hex('25609513 0000 0000 0000000000000000 ffffffffffffffff 00000001'));
  t.equal(huge.offset, Number.POSITIVE_INFINITY, 'offsets past 2^53 decode as Infinity so range checks fail');
  t.equal(codec.cookieToBigInt(cookie), 0x0102030405060708n);
});

t.test('simple and structured replies', async (t) => {
  t.same(codec.encodeSimpleReply(C.NBD_EINVAL, cookie), hex('67446698 00000016 0102030405060708'));
  t.same(codec.encodeStructuredNone(cookie), hex('668e33ef 0001 0000 0102030405060708 00000000'));
  t.same(codec.encodeStructuredError(cookie, C.NBD_EPERM, 'ro'), hex('668e33ef 0001 8001 0102030405060708 00000008 00000001 0002 726f'));
  const long = codec.encodeStructuredError(cookie, C.NBD_EIO, 'x'.repeat(5000));
  t.ok(long.length - 20 <= C.MAX_NON_DATA_PAYLOAD, 'error payload stays within QEMU 1000-byte limit');
  const bs = codec.encodeBlockStatusChunk(cookie, true, 1, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }]);
  t.same(bs, hex('668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000003 00000200 00000000'));
});

t.test('OFFSET_DATA prefix is written in front of data already in place', async (t) => {
  const b = Buffer.alloc(codec.OFFSET_DATA_PREFIX + 2);
  b[28] = 0xaa;
  b[29] = 0xbb;
  codec.writeOffsetDataPrefix(b, C.NBD_REPLY_FLAG_DONE, cookie, 512, 2);
  t.same(b, hex('668e33ef 0001 0001 0102030405060708 0000000a 0000000000000200 aabb'));
});

t.test('truncateUtf8 never splits a code point', async (t) => {
  t.equal(codec.truncateUtf8('ééé', 3), 'é');
  t.equal(codec.truncateUtf8('abc', 10), 'abc');
});
