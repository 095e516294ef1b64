// Protocol corner cases with a hand-rolled client over node:net (no external
// tool can produce them): handshake flags and zero padding, unsupported
// options (STARTTLS, unknown), NBD_OPT_LIST, unknown export names, bad
// request magic, unknown command types and flags, the handshake timeout.

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, readAt, serve, tmpDir } from '../helpers/server.js';
import {
  CMD_DISC,
  CMD_READ,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  OPT_ABORT,
  OPT_LIST,
  OPT_STARTTLS,
  RawNbdClient,
  REP_ACK,
  REP_ERR_UNSUP,
  REP_SERVER,
  TFLAG_HAS_FLAGS,
  TFLAG_READ_ONLY,
} from '../helpers/rawclient.js';

const EINVAL = 22;

// Transmission flags the server must advertise for a writable export.
const SEND_FLUSH = 1 << 2;
const SEND_FUA = 1 << 3;
const SEND_TRIM = 1 << 5;
const SEND_WRITE_ZEROES = 1 << 6;
const SEND_DF = 1 << 7;
const CAN_MULTI_CONN = 1 << 8;
const SEND_CACHE = 1 << 10;
const SEND_FAST_ZERO = 1 << 11;

const SIZE = 4 * MiB;

t.test('raw protocol', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), SIZE, { fill: 'random' });
  const ro = await makeImage(join(dir, 'ro.img'), MiB, { fill: 0x42 });
  const srv = await serve(t, [img, '--name', 'vm1', '--export', `ro=${ro},read-only`, '--handshake-timeout', '1']);
  const port = srv.newstylePort;
  const clients: RawNbdClient[] = [];
  t.teardown(() => clients.forEach((c) => c.destroy()));
  const connect = async () => {
    const c = await RawNbdClient.connect(port);
    clients.push(c);
    return c;
  };
  const expected = await readAt(img, 0, 8192);

  t.test('handshake flags, transmission flags, export size', async (t) => {
    const c = await connect();
    const info = await c.handshake('vm1');
    t.ok(info.handshakeFlags & FLAG_FIXED_NEWSTYLE, 'server sets NBD_FLAG_FIXED_NEWSTYLE');
    t.ok(info.handshakeFlags & FLAG_NO_ZEROES, 'server sets NBD_FLAG_NO_ZEROES');
    t.equal(info.size, BigInt(SIZE), 'export size');
    const want =
      TFLAG_HAS_FLAGS |
      SEND_FLUSH |
      SEND_FUA |
      SEND_TRIM |
      SEND_WRITE_ZEROES |
      CAN_MULTI_CONN |
      SEND_CACHE |
      SEND_FAST_ZERO;
    t.equal(info.flags & want, want, `transmission flags include 0x${want.toString(16)}`, {
      flags: `0x${info.flags.toString(16)}`,
    });
    t.equal(info.flags & TFLAG_READ_ONLY, 0, 'writable export is not flagged read-only');
    // The spec: SEND_DF MUST be clear unless structured replies were negotiated
    // (this client never negotiates them).
    t.equal(info.flags & SEND_DF, 0, 'NBD_FLAG_SEND_DF clear without structured replies');
    const r = await c.readAt(0, 4096);
    t.equal(r.error, 0, 'read works');
    t.ok(r.data.equals(expected.subarray(0, 4096)), 'read returns the file data');

    const c2 = await connect();
    const info2 = await c2.handshake('ro');
    t.ok(info2.flags & TFLAG_READ_ONLY, 'read-only export has NBD_FLAG_READ_ONLY');
    t.equal(info2.size, BigInt(MiB));
    await c.disconnect();
    await c2.disconnect();
  });

  t.test('client without NO_ZEROES gets the 124 zero bytes', async (t) => {
    const c = await connect();
    await c.readGreeting();
    await c.sendClientFlags(FLAG_FIXED_NEWSTYLE);
    const info = await c.exportName('vm1', false); // reads 8 + 2 + 124 bytes
    t.equal(info.size, BigInt(SIZE));
    // If the padding were missing, this read would desynchronise or time out.
    const r = await c.readAt(4096, 4096, 0x77n);
    t.equal(r.error, 0, 'read after the padded export info works');
    t.ok(r.data.equals(expected.subarray(4096, 8192)), 'and returns the right data');
    await c.disconnect();
  });

  t.test('STARTTLS and unknown options -> NBD_REP_ERR_UNSUP, negotiation continues', async (t) => {
    const c = await connect();
    await c.readGreeting();
    await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);

    await c.sendOption(OPT_STARTTLS);
    const tls = await c.readOptionReply();
    t.equal(tls.opt, OPT_STARTTLS, 'reply is for STARTTLS');
    t.equal(tls.type, REP_ERR_UNSUP, 'STARTTLS -> NBD_REP_ERR_UNSUP');

    await c.sendOption(0x7ff0, Buffer.from('some option payload'));
    const unk = await c.readOptionReply();
    t.equal(unk.opt, 0x7ff0, 'reply is for the unknown option');
    t.equal(unk.type, REP_ERR_UNSUP, 'unknown option -> NBD_REP_ERR_UNSUP');

    await c.sendOption(OPT_LIST);
    const names: string[] = [];
    for (;;) {
      const rep = await c.readOptionReply();
      t.equal(rep.opt, OPT_LIST);
      if (rep.type === REP_SERVER) {
        const len = rep.data.readUInt32BE(0);
        names.push(rep.data.subarray(4, 4 + len).toString('utf8'));
      } else {
        t.equal(rep.type, REP_ACK, 'NBD_OPT_LIST ends with NBD_REP_ACK');
        break;
      }
    }
    t.same(names.sort(), ['ro', 'vm1'], 'NBD_OPT_LIST names both exports');

    const info = await c.exportName('vm1', true);
    t.equal(info.size, BigInt(SIZE), 'EXPORT_NAME still works after the refused options');
    const r = await c.readAt(0, 512);
    t.equal(r.error, 0);
    t.ok(r.data.equals(expected.subarray(0, 512)), 'and the connection serves data');
    await c.disconnect();
  });

  t.test('NBD_OPT_ABORT is acknowledged (or the connection closed)', async (t) => {
    const c = await connect();
    await c.readGreeting();
    await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    await c.sendOption(OPT_ABORT);
    try {
      const rep = await c.readOptionReply();
      t.equal(rep.type, REP_ACK, 'NBD_OPT_ABORT -> NBD_REP_ACK');
    } catch {
      t.ok(c.closed, 'server closed the connection instead of replying');
    }
    c.sock.end();
    t.ok(await c.waitClosed(5000), 'connection ends');
  });

  t.test('NBD_OPT_EXPORT_NAME with an unknown name -> disconnect', async (t) => {
    const c = await connect();
    await c.readGreeting();
    await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    await c.sendOption(1, Buffer.from('no-such-export'));
    t.ok(await c.waitClosed(5000), 'server terminates the session');
  });

  t.test('empty export name selects the first export', async (t) => {
    const c = await connect();
    const info = await c.handshake('');
    t.equal(info.size, BigInt(SIZE), 'size of the first export');
    const r = await c.readAt(0, 4096);
    t.ok(r.data.equals(expected.subarray(0, 4096)), 'data of the first export');
    await c.disconnect();
  });

  t.test('bad request magic -> the server closes the connection', async (t) => {
    const c = await connect();
    await c.handshake('vm1');
    await c.sendRequest({ magic: 0xdeadbeef, type: CMD_READ, handle: 1n, offset: 0n, length: 4096 });
    t.ok(await c.waitClosed(5000), 'connection closed after a bad magic');
    // The server itself is fine.
    const c2 = await connect();
    await c2.handshake('vm1');
    const r = await c2.readAt(0, 4096);
    t.equal(r.error, 0, 'a new connection works');
    t.ok(r.data.equals(expected.subarray(0, 4096)));
    await c2.disconnect();
    t.equal(srv.exited(), undefined, 'server still running');
  });

  t.test('unknown command type 99 -> EINVAL, connection still works', async (t) => {
    const c = await connect();
    await c.handshake('vm1');
    await c.sendRequest({ type: 99, handle: 0xabcdef0123456789n, offset: 0n, length: 4096 });
    const rep = await c.readSimpleReply();
    t.equal(rep.handle, 0xabcdef0123456789n, 'reply carries the request handle');
    t.equal(rep.error, EINVAL, 'error is EINVAL (22)');
    const r = await c.readAt(0, 4096, 0x42n);
    t.equal(r.error, 0, 'a read afterwards works');
    t.ok(r.data.equals(expected.subarray(0, 4096)), 'and returns the right data');

    // Pipelined: unknown command between two reads, replies matched by handle.
    await c.sendRequest({ type: CMD_READ, handle: 1n, offset: 0n, length: 512 });
    await c.sendRequest({ type: 99, handle: 2n, offset: 0n, length: 0 });
    await c.sendRequest({ type: CMD_READ, handle: 3n, offset: 512n, length: 512 });
    const seen = new Map<bigint, { error: number; data: Buffer }>();
    for (let i = 0; i < 3; i++) {
      // Simple replies carry no length: we must know which handle has data.
      const h = await c.read(16);
      const handle = h.readBigUInt64BE(8);
      const error = h.readUInt32BE(4);
      const data = handle !== 2n && error === 0 ? await c.read(512) : Buffer.alloc(0);
      seen.set(handle, { error, data });
    }
    t.equal(seen.get(2n)?.error, EINVAL, 'pipelined unknown command -> EINVAL');
    t.ok(seen.get(1n)?.data.equals(expected.subarray(0, 512)), 'pipelined read 1 correct');
    t.ok(seen.get(3n)?.data.equals(expected.subarray(512, 1024)), 'pipelined read 3 correct');
    await c.disconnect();
  });

  t.test('unknown command flag -> EINVAL', async (t) => {
    const c = await connect();
    await c.handshake('vm1');
    const bad = await c.readAt(0, 4096, 5n, 1 << 10);
    t.equal(bad.error, EINVAL, 'READ with flag 1<<10 -> EINVAL');
    const good = await c.readAt(0, 4096, 6n);
    t.equal(good.error, 0, 'the next read works');
    t.ok(good.data.equals(expected.subarray(0, 4096)));
    await c.disconnect();
  });

  t.test('WRITE over 32 MiB -> EINVAL, payload skipped, stream stays in sync', async (t) => {
    const c = await connect();
    await c.handshake('vm1');
    const before = await readAt(img, 0, SIZE);
    // The payload is a train of valid NBD_CMD_WRITE requests: if the server
    // parsed it instead of skipping it, it would overwrite the image.
    const unit = Buffer.concat([
      RawNbdClient.encodeRequest({ type: 1, handle: 0xbadn, offset: 0n, length: 4 }),
      Buffer.from('EVIL'),
    ]);
    const len = 33 * MiB;
    const payload = Buffer.alloc(len);
    for (let off = 0; off + unit.length <= len; off += unit.length) unit.copy(payload, off);
    await c.sendRequest({ type: 1, handle: 0x1111n, offset: 0n, length: len }, payload);
    await c.sendRequest({ type: CMD_READ, handle: 0x2222n, offset: 0n, length: 4096 });
    const replies = new Map<bigint, { error: number; data: Buffer }>();
    for (let i = 0; i < 2; i++) {
      const h = await c.read(16, 30_000);
      const handle = h.readBigUInt64BE(8);
      const error = h.readUInt32BE(4);
      const data = handle === 0x2222n && error === 0 ? await c.read(4096) : Buffer.alloc(0);
      replies.set(handle, { error, data });
    }
    t.same([...replies.keys()].sort(), [0x1111n, 0x2222n], 'exactly one reply per request, matching handles');
    t.equal(replies.get(0x1111n)?.error, EINVAL, 'oversized WRITE -> EINVAL');
    t.equal(replies.get(0x2222n)?.error, 0, 'the following READ succeeds');
    t.ok(replies.get(0x2222n)?.data.equals(before.subarray(0, 4096)), 'and returns the unchanged data');
    t.ok((await readAt(img, 0, SIZE)).equals(before), 'the image was not modified');
    await c.disconnect();
  });

  t.test('NBD_CMD_DISC closes the connection', async (t) => {
    const c = await connect();
    await c.handshake('vm1');
    await c.sendRequest({ type: CMD_DISC, handle: 9n });
    t.ok(await c.waitClosed(5000), 'server closes after NBD_CMD_DISC');
  });

  t.test('--handshake-timeout drops clients that stall in the handshake', async (t) => {
    const timed = async (what: string, stall: (c: RawNbdClient) => Promise<void>) => {
      const c = await connect();
      const start = Date.now();
      await stall(c);
      const closed = await c.waitClosed(6000);
      const elapsed = Date.now() - start;
      t.ok(closed, `${what}: connection dropped`, { elapsed });
      t.ok(elapsed >= 700, `${what}: not dropped before the timeout (${elapsed} ms)`);
    };
    await timed('silent client (never sends its flags)', async () => {});
    await timed('client that stops after its flags', async (c) => {
      await c.readGreeting();
      await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    });
    await timed('client that stops in the middle of an option', async (c) => {
      await c.readGreeting();
      await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
      await c.write(Buffer.from('IHAVEOPT\0\0'));
    });

    // A client that finished the handshake may stay idle.
    const idle = await connect();
    await idle.handshake('vm1');
    await new Promise((r) => setTimeout(r, 2500));
    t.notOk(idle.closed, 'idle client in transmission is not dropped');
    const r = await idle.readAt(0, 4096);
    t.equal(r.error, 0, 'and can still read after 2.5 s');
    t.ok(r.data.equals(expected.subarray(0, 4096)));
    await idle.disconnect();
  });
});
