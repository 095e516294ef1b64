// NbdClient against a scripted fake server (node:net on 127.0.0.1): the
// handshake variants and the reply shapes a real server rarely produces.
import t, { type Test } from 'tap';
import * as net from 'node:net';
import { once } from 'node:events';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import { ByteQueue } from '../../../src/util/byte-queue.js';
import { DeviceError } from '../../../src/storage/device.js';
import { NbdClient, NbdHandshakeError, NbdRequestError, type NbdClientOptions } from '../../../src/client/nbd-client.js';
import { NBD_CMD_MIGRATE_COMPLETE } from '../../../src/migration/incoming.js';
import { u64, u32 } from '../../helpers/wire.js';

// ------------------------------------------------------------------ fake server

interface Req {
  type: number;
  flags: number;
  cookie: codec.Cookie;
  offset: number;
  length: number;
  payload?: Buffer;
}

interface FakeOptions {
  size?: number;
  flags?: number;
  /** Answer NBD_OPT_STRUCTURED_REPLY with ACK (default) or ERR_UNSUP. */
  structured?: boolean;
  /** Contexts to grant for SET_META_CONTEXT (default base:allocation=1); null: ERR_UNSUP. */
  contexts?: Array<[string, number]> | null;
  blockSize?: [number, number, number];
  handshakeFlags?: number;
  /** Replace the whole greeting. */
  greeting?: Buffer;
  /** Never send anything. */
  silent?: boolean;
  /** GO: ERR_UNSUP (fall back to EXPORT_NAME). */
  goUnsupported?: boolean;
  /** GO: this error. */
  goError?: { type: number; message: string };
  /** EXPORT_NAME: close the connection instead of answering. */
  exportNameCloses?: boolean;
  /** Every option is answered NBD_REP_ERR_TLS_REQD. */
  tlsRequired?: boolean;
}

const DEFAULT_FLAGS =
  C.NBD_FLAG_HAS_FLAGS |
  C.NBD_FLAG_SEND_FLUSH |
  C.NBD_FLAG_SEND_FUA |
  C.NBD_FLAG_SEND_TRIM |
  C.NBD_FLAG_SEND_WRITE_ZEROES |
  C.NBD_FLAG_SEND_FAST_ZERO |
  C.NBD_FLAG_SEND_CACHE;

class FakeConn {
  readonly options: number[] = [];
  readonly received: Req[] = [];
  private waiting: Req[] = [];
  private waiters: Array<(r: Req) => void> = [];
  private readonly q = new ByteQueue();
  private need: { n: number; resolve: () => void } | undefined;
  closed = false;

  constructor(
    readonly socket: net.Socket,
    readonly opts: FakeOptions,
  ) {
    socket.on('data', (b: Buffer) => {
      this.q.push(b);
      if (this.need && this.q.length >= this.need.n) {
        const w = this.need;
        this.need = undefined;
        w.resolve();
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
    });
    void this.run().catch(() => socket.destroy());
  }

  private async read(n: number): Promise<Buffer> {
    if (this.q.length < n) {
      if (this.closed) throw new Error('closed');
      await new Promise<void>((resolve) => (this.need = { n, resolve }));
    }
    return Buffer.from(this.q.take(n));
  }

  private reply(option: number, type: number, payload?: Buffer): void {
    this.socket.write(codec.encodeOptionReply(option, type, payload));
  }

  private async run(): Promise<void> {
    const o = this.opts;
    if (o.silent) return;
    if (o.greeting) {
      this.socket.write(o.greeting);
      return;
    }
    const hflags = o.handshakeFlags ?? C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES;
    this.socket.write(codec.encodeNewstyleGreeting(hflags));
    const clientFlags = (await this.read(4)).readUInt32BE(0);
    const noZeroes = (clientFlags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
    const size = o.size ?? 1 << 20;
    const flags = o.flags ?? DEFAULT_FLAGS;
    for (;;) {
      const h = codec.decodeOptionHeader(await this.read(16));
      const payload = await this.read(h.length);
      this.options.push(h.option);
      if (h.option === C.NBD_OPT_EXPORT_NAME) {
        if (o.exportNameCloses) {
          this.socket.destroy();
          return;
        }
        this.socket.write(codec.encodeExportNameReply(size, flags, noZeroes));
        break;
      }
      if (o.tlsRequired && h.option !== C.NBD_OPT_ABORT) {
        this.reply(h.option, C.NBD_REP_ERR_TLS_REQD, Buffer.from('TLS required'));
        continue;
      }
      if (h.option === C.NBD_OPT_ABORT) {
        this.reply(h.option, C.NBD_REP_ACK);
        this.socket.end();
        return;
      }
      if (h.option === C.NBD_OPT_STRUCTURED_REPLY) {
        this.reply(h.option, o.structured === false ? C.NBD_REP_ERR_UNSUP : C.NBD_REP_ACK);
        continue;
      }
      if (h.option === C.NBD_OPT_SET_META_CONTEXT) {
        const contexts = o.contexts === undefined ? ([[C.BASE_ALLOCATION, 1]] as Array<[string, number]>) : o.contexts;
        if (contexts === null) {
          this.reply(h.option, C.NBD_REP_ERR_UNSUP, Buffer.from('no contexts here'));
          continue;
        }
        const req = codec.decodeMetaContextRequest(payload);
        for (const [name, id] of contexts) if (req.queries.includes(name)) this.reply(h.option, C.NBD_REP_META_CONTEXT, codec.encodeMetaContextReply(id, name));
        this.reply(h.option, C.NBD_REP_ACK);
        continue;
      }
      if (h.option === C.NBD_OPT_GO) {
        if (o.goUnsupported) {
          this.reply(h.option, C.NBD_REP_ERR_UNSUP);
          continue;
        }
        if (o.goError) {
          this.reply(h.option, o.goError.type, Buffer.from(o.goError.message));
          continue;
        }
        this.reply(h.option, C.NBD_REP_INFO, codec.encodeInfoString(C.NBD_INFO_DESCRIPTION, 'a fake'));
        this.reply(h.option, C.NBD_REP_INFO, codec.encodeInfoExport(size, flags));
        if (o.blockSize) this.reply(h.option, C.NBD_REP_INFO, codec.encodeInfoBlockSize(...o.blockSize));
        this.reply(h.option, C.NBD_REP_ACK);
        break;
      }
      this.reply(h.option, C.NBD_REP_ERR_UNSUP);
    }
    // transmission
    for (;;) {
      const h = codec.decodeRequestHeader(await this.read(C.REQUEST_HEADER_LENGTH));
      const r: Req = { type: h.type, flags: h.flags, cookie: h.cookie, offset: h.offset, length: h.length };
      if (h.type === C.NBD_CMD_WRITE) r.payload = await this.read(h.length);
      this.received.push(r);
      const w = this.waiters.shift();
      if (w) w(r);
      else this.waiting.push(r);
      if (h.type === C.NBD_CMD_DISC) {
        this.socket.end();
        return;
      }
    }
  }

  /** The next request (in arrival order). */
  next(): Promise<Req> {
    const r = this.waiting.shift();
    if (r) return Promise.resolve(r);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Requests received but not yet taken with next(). */
  get pending(): number {
    return this.waiting.length;
  }

  simple(r: Req, error = 0, data?: Buffer): void {
    this.socket.write(codec.encodeSimpleReply(error, r.cookie));
    if (data) this.socket.write(data);
  }

  chunk(r: Req, flags: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
    const b = Buffer.alloc(C.STRUCTURED_REPLY_HEADER_LENGTH + payload.length);
    codec.writeStructuredHeader(b, 0, flags, type, r.cookie, payload.length);
    payload.copy(b, C.STRUCTURED_REPLY_HEADER_LENGTH);
    this.socket.write(b);
    return b;
  }

  none(r: Req): void {
    this.chunk(r, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_NONE);
  }

  data(r: Req, offset: number, data: Buffer, done: boolean): void {
    this.chunk(r, done ? C.NBD_REPLY_FLAG_DONE : 0, C.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(offset), data]));
  }

  hole(r: Req, offset: number, size: number, done: boolean): void {
    this.chunk(r, done ? C.NBD_REPLY_FLAG_DONE : 0, C.NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(offset), u32(size)]));
  }

  error(r: Req, errno: number, message: string, done = true): void {
    this.socket.write(codec.encodeStructuredError(r.cookie, errno, message));
    void done;
  }

  blockStatus(r: Req, id: number, extents: Array<[number, number]>, done = true): void {
    this.chunk(r, done ? C.NBD_REPLY_FLAG_DONE : 0, C.NBD_REPLY_TYPE_BLOCK_STATUS, Buffer.concat([u32(id), ...extents.flatMap(([l, f]) => [u32(l), u32(f)])]));
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Marks a promise as handled now (it is checked later with rejectsWith). */
function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

interface Fake {
  uri: string;
  /** The next accepted connection. */
  conn(): Promise<FakeConn>;
}

async function fakeServer(t: Test, opts: FakeOptions = {}): Promise<Fake> {
  const conns: FakeConn[] = [];
  const waiters: Array<(c: FakeConn) => void> = [];
  const all = new Set<net.Socket>();
  const server = net.createServer((s) => {
    all.add(s);
    const c = new FakeConn(s, opts);
    const w = waiters.shift();
    if (w) w(c);
    else conns.push(c);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(async () => {
    for (const s of all) s.destroy();
    await new Promise((r) => server.close(r));
  });
  const port = (server.address() as net.AddressInfo).port;
  return {
    uri: `nbd://127.0.0.1:${port}/disk`,
    conn: () => {
      const c = conns.shift();
      if (c) return Promise.resolve(c);
      return new Promise((resolve) => waiters.push(resolve));
    },
  };
}

/** Connect a client to a fresh fake server; returns both ends. */
async function setup(t: Test, fo: FakeOptions = {}, co: NbdClientOptions = {}): Promise<{ client: NbdClient; srv: FakeConn; fake: Fake }> {
  const fake = await fakeServer(t, fo);
  const [client, srv] = await Promise.all([NbdClient.connect(fake.uri, co), fake.conn()]);
  t.teardown(() => client.destroy());
  return { client, srv, fake };
}

/** Expect a promise to reject with a DeviceError of `code` within `ms`. */
async function rejectsWith(t: Test, p: Promise<unknown>, code: string, msg: string, re?: RegExp, ms = 2000): Promise<Error | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)));
  const settled = await Promise.race([
    p.then(
      () => ({ ok: true as const }),
      (e: Error) => ({ ok: false as const, e }),
    ),
    timeout,
  ]);
  clearTimeout(timer);
  if (settled === 'timeout') {
    t.fail(`${msg}: still pending after ${ms} ms`);
    return undefined;
  }
  if (settled.ok) {
    t.fail(`${msg}: resolved`);
    return undefined;
  }
  t.ok(settled.e instanceof DeviceError, `${msg}: a DeviceError`, { error: settled.e });
  t.equal((settled.e as DeviceError).code, code, `${msg}: ${code}`);
  if (re) t.match(settled.e.message, re, `${msg}: message`);
  return settled.e;
}

// ------------------------------------------------------------------ handshake

t.test('handshake: structured replies, contexts, block size, flags', async (t) => {
  const { client, srv } = await setup(t, {
    size: 5 << 20,
    blockSize: [512, 4096, 65536],
    contexts: [
      [C.BASE_ALLOCATION, 7],
      ['nbd-migrate:incoming', 0],
    ],
  }, { metaContexts: [C.BASE_ALLOCATION, 'nbd-migrate:incoming'] });
  t.equal(client.size, 5 << 20);
  t.equal(client.exportName, 'disk');
  t.equal(client.structuredReplies, true);
  t.same([...client.contexts], [
    [C.BASE_ALLOCATION, 7],
    ['nbd-migrate:incoming', 0],
  ]);
  t.same(client.blockSize, { minimum: 512, preferred: 4096, maximum: 65536 });
  t.equal(client.transmissionFlags, DEFAULT_FLAGS);
  t.equal(client.readOnly, false);
  t.same(srv.options, [C.NBD_OPT_STRUCTURED_REPLY, C.NBD_OPT_SET_META_CONTEXT, C.NBD_OPT_GO]);
  const caps = client.capabilities();
  t.match(caps, { canWrite: true, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canExtents: true, canCache: true, canMultiConn: false });
});

t.test('handshake: a server without structured replies (nbd-server style)', async (t) => {
  const { client, srv } = await setup(t, { structured: false });
  t.equal(client.structuredReplies, false);
  t.equal(client.contexts.size, 0);
  t.same(srv.options, [C.NBD_OPT_STRUCTURED_REPLY, C.NBD_OPT_GO], 'no SET_META_CONTEXT without structured replies');
  t.same(client.blockSize, { minimum: 1, preferred: 4096, maximum: 32 << 20 }, 'default block sizes');
  t.equal(client.capabilities().canExtents, false);
});

t.test('handshake: structuredReplies false asks for GO alone, and the connection writes and reads with simple replies', async (t) => {
  const { client, srv } = await setup(t, { contexts: [[C.BASE_ALLOCATION, 7]] }, { structuredReplies: false, metaContexts: [] });
  t.same(srv.options, [C.NBD_OPT_GO], 'neither STRUCTURED_REPLY nor SET_META_CONTEXT was sent');
  t.equal(client.structuredReplies, false);
  t.equal(client.capabilities().canExtents, false, 'no block status without a context');
  const w = client.write(4096, [Buffer.alloc(4096, 3)], { fua: false });
  const rw = await srv.next();
  t.match(rw, { type: C.NBD_CMD_WRITE, offset: 4096, length: 4096 });
  srv.simple(rw);
  await w;
  const back = Buffer.alloc(4096);
  const r = client.read(4096, 4096, back, 0);
  srv.simple(await srv.next(), 0, Buffer.alloc(4096, 3));
  await r;
  t.ok(back.every((b) => b === 3), 'a simple read reply is taken');
});

t.test('handshake: SET_META_CONTEXT refused is tolerated', async (t) => {
  const { client } = await setup(t, { contexts: null });
  t.equal(client.structuredReplies, true);
  t.equal(client.contexts.size, 0);
});

t.test('handshake: GO unsupported falls back to EXPORT_NAME', async (t) => {
  for (const hflags of [C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES, C.NBD_FLAG_FIXED_NEWSTYLE]) {
    const { client, srv } = await setup(t, { goUnsupported: true, size: 12345 * 512, handshakeFlags: hflags });
    t.equal(client.size, 12345 * 512, `size (NO_ZEROES ${!!(hflags & C.NBD_FLAG_NO_ZEROES)})`);
    t.equal(srv.options.at(-1), C.NBD_OPT_EXPORT_NAME);
    // The connection is in sync (the 124 zero bytes, if any, were consumed): a request works.
    const p = client.flush();
    const r = await srv.next();
    t.equal(r.type, C.NBD_CMD_FLUSH);
    srv.none(r);
    await p;
  }
});

t.test('handshake failures are clear', async (t) => {
  const cases: Array<[string, FakeOptions, RegExp]> = [
    ['missing export', { goError: { type: C.NBD_REP_ERR_UNKNOWN, message: 'no export named "disk" here' } }, /refused export "disk" \(NBD_REP_ERR_UNKNOWN in reply to NBD_OPT_GO\): no export named "disk" here/],
    ['policy', { goError: { type: C.NBD_REP_ERR_POLICY, message: 'go away' } }, /NBD_REP_ERR_POLICY.*: go away/],
    ['TLS required', { tlsRequired: true }, /requires TLS: use an nbds:\/\/ URI: TLS required/],
    ['oldstyle', { greeting: codec.encodeOldstyleGreeting(1 << 20, C.NBD_FLAG_HAS_FLAGS) }, /oldstyle negotiation, which is not supported/],
    ['not fixed newstyle', { handshakeFlags: 0 }, /does not support fixed newstyle/],
    ['not NBD', { greeting: Buffer.from('SSH-2.0-OpenSSH_9.2p1 Debian\r\n') }, /not an NBD server/],
    ['EXPORT_NAME closes', { goUnsupported: true, exportNameCloses: true }, /closed the connection.*NBD_OPT_EXPORT_NAME/],
  ];
  for (const [name, fo, re] of cases) {
    const fake = await fakeServer(t, fo);
    const err = await NbdClient.connect(fake.uri, { connectTimeoutMs: 3000 }).then(
      () => undefined,
      (e: Error) => e,
    );
    t.ok(err, `${name}: rejected`);
    t.match(err?.message, re, name);
    t.match(err?.message, fake.uri, `${name}: names the URI`);
  }
  const fake = await fakeServer(t, { goError: { type: C.NBD_REP_ERR_UNKNOWN, message: 'nope' } });
  const e = (await NbdClient.connect(fake.uri).catch((x) => x)) as NbdHandshakeError;
  t.ok(e instanceof NbdHandshakeError);
  t.same(e.details, { option: C.NBD_OPT_GO, reply: C.NBD_REP_ERR_UNKNOWN, serverMessage: 'nope' });
  const srv = await fake.conn();
  await sleep(50);
  t.equal(srv.options.at(-1), C.NBD_OPT_ABORT, 'the client sent NBD_OPT_ABORT before leaving');
});

t.test('connect timeout and refused connections', async (t) => {
  const fake = await fakeServer(t, { silent: true });
  const t0 = Date.now();
  const err = (await NbdClient.connect(fake.uri, { connectTimeoutMs: 300 }).catch((e) => e)) as Error;
  t.match(err.message, /timed out after 300 ms/);
  t.ok(Date.now() - t0 < 2000, 'promptly');

  const s = net.createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  const refused = (await NbdClient.connect(`nbd://127.0.0.1:${port}/x`).catch((e) => e)) as Error;
  t.match(refused.message, new RegExp(`nbd://127.0.0.1:${port}/x: cannot connect: .*ECONNREFUSED`));

  const nosock = (await NbdClient.connect('nbd+unix:///x?socket=/nonexistent/nbd.sock').catch((e) => e)) as Error;
  t.match(nosock.message, /cannot connect: .*ENOENT/);
  await t.rejects(NbdClient.connect('nbds://127.0.0.1:1/x?tls-certificates=/nonexistent'), /ca-cert\.pem not found/);
});

// ------------------------------------------------------------------ transmission

t.test('out-of-order replies are matched by cookie', async (t) => {
  const { client, srv } = await setup(t);
  const bufs = [0, 1, 2].map(() => Buffer.alloc(4096));
  const ps = bufs.map((b, i) => client.read(i * 4096, 4096, b, 0));
  const reqs = [await srv.next(), await srv.next(), await srv.next()];
  t.same(new Set(reqs.map((r) => `${r.cookie.hi}:${r.cookie.lo}`)).size, 3, 'distinct cookies');
  for (const r of [reqs[2]!, reqs[0]!, reqs[1]!]) srv.data(r, r.offset, Buffer.alloc(4096, r.offset / 4096 + 1), true);
  await Promise.all(ps);
  bufs.forEach((b, i) => t.ok(b.every((x) => x === i + 1), `read ${i} got its own data`));
});

t.test('structured chunks split across TCP segments, holes zero-filled', async (t) => {
  const { client, srv } = await setup(t);
  const into = Buffer.alloc(65536, 0xee);
  const p = client.read(1 << 16, 65536, into, 0);
  const r = await srv.next();
  srv.socket.setNoDelay(true);
  // Build the whole reply, then dribble it out in odd-sized pieces.
  const parts: Buffer[] = [];
  const capture = (fn: () => void) => {
    const orig = srv.socket.write.bind(srv.socket);
    (srv.socket as { write: unknown }).write = (b: Buffer) => (parts.push(Buffer.from(b)), true);
    fn();
    (srv.socket as { write: unknown }).write = orig;
  };
  const payload = Buffer.alloc(30000);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
  capture(() => {
    srv.hole(r, (1 << 16) + 30000, 35536, false);
    srv.data(r, 1 << 16, payload, false);
    srv.none(r);
  });
  const stream = Buffer.concat(parts);
  for (let i = 0, step = 1; i < stream.length; i += step, step = (step * 3 + 1) % 5000 || 1) {
    srv.socket.write(stream.subarray(i, i + step));
    if (i < 200) await sleep(1);
  }
  await p;
  t.ok(into.subarray(0, 30000).equals(payload), 'data in place');
  t.ok(into.subarray(30000).every((b) => b === 0), 'hole zero-filled');
});

t.test('simple replies (no structured replies): read data and errors', async (t) => {
  const { client, srv } = await setup(t, { structured: false });
  const a = Buffer.alloc(10000);
  const pa = client.read(0, 10000, a, 0);
  const pb = quiet(client.read(1 << 20, 512, Buffer.alloc(512), 0));
  const ra = await srv.next();
  const rb = await srv.next();
  srv.simple(rb, C.NBD_EINVAL);
  const data = Buffer.alloc(10000, 0x5a);
  srv.socket.write(codec.encodeSimpleReply(0, ra.cookie));
  for (let i = 0; i < data.length; i += 999) {
    srv.socket.write(data.subarray(i, i + 999));
    await sleep(1);
  }
  await pa;
  t.ok(a.equals(data));
  const e = await rejectsWith(t, pb, 'EINVAL', 'simple error');
  t.equal((e as NbdRequestError).nbdErrno, C.NBD_EINVAL);
  t.equal((e as NbdRequestError).serverMessage, undefined);
});

t.test('error chunks map to errno names and keep the message', async (t) => {
  const { client, srv } = await setup(t);
  const table: Array<[number, string]> = [
    [C.NBD_EPERM, 'EPERM'],
    [C.NBD_EIO, 'EIO'],
    [C.NBD_ENOMEM, 'ENOMEM'],
    [C.NBD_EINVAL, 'EINVAL'],
    [C.NBD_ENOSPC, 'ENOSPC'],
    [C.NBD_EOVERFLOW, 'EOVERFLOW'],
    [C.NBD_ENOTSUP, 'ENOTSUP'],
    [1234, 'EIO'],
  ];
  for (const [errno, code] of table) {
    const p = client.write(0, [Buffer.alloc(512)], { fua: false });
    const r = await srv.next();
    srv.error(r, errno, `failure ${errno}`);
    const e = (await rejectsWith(t, p, code, `errno ${errno}`, new RegExp(`failure ${errno}`))) as NbdRequestError;
    t.equal(e.nbdErrno, errno);
    t.equal(e.serverMessage, `failure ${errno}`);
  }
  // A READ error after some data, with an offset: still an error, and the connection lives on.
  const p = client.read(0, 8192, Buffer.alloc(8192), 0);
  const r = await srv.next();
  srv.data(r, 0, Buffer.alloc(4096), false);
  srv.socket.write(
    Buffer.concat([
      (() => {
        const m = Buffer.from('bad sector');
        const b = Buffer.alloc(20 + 6 + m.length + 8);
        codec.writeStructuredHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_ERROR_OFFSET, r.cookie, 6 + m.length + 8);
        b.writeUInt32BE(C.NBD_EIO, 20);
        b.writeUInt16BE(m.length, 24);
        m.copy(b, 26);
        b.writeBigUInt64BE(4096n, 26 + m.length);
        return b;
      })(),
    ]),
  );
  await rejectsWith(t, p, 'EIO', 'error offset', /bad sector/);
  const f = client.flush();
  srv.none(await srv.next());
  await f;
  t.pass('connection still usable');
});

t.test('a successful structured read that misses data is EIO (connection kept)', async (t) => {
  const { client, srv } = await setup(t);
  const p = client.read(0, 8192, Buffer.alloc(8192), 0);
  const r = await srv.next();
  srv.data(r, 0, Buffer.alloc(4096), true);
  await rejectsWith(t, p, 'EIO', 'incomplete read', /without sending all the data/);
  const f = client.flush();
  srv.none(await srv.next());
  await f;
});

t.test('unknown cookie: the connection is dead, every pending request rejects', async (t) => {
  const { client, srv } = await setup(t);
  const closed = once(client, 'close');
  const ps = [client.read(0, 512, Buffer.alloc(512), 0), client.write(0, [Buffer.alloc(512)], { fua: false }), client.flush()].map(quiet);
  for (let i = 0; i < 3; i++) await srv.next();
  srv.none({ type: 0, flags: 0, cookie: { hi: 0, lo: 0xdead }, offset: 0, length: 0 });
  for (const [i, p] of ps.entries()) await rejectsWith(t, p, 'ECONNRESET', `pending ${i}`, /unknown cookie 0x000000000000dead/);
  const [err] = (await closed) as [Error];
  t.match(err?.message, /protocol error from the server: reply for unknown cookie/, "'close' carries the reason");
  t.equal(client.closed, true);
  await rejectsWith(t, client.read(0, 512, Buffer.alloc(512), 0), 'ECONNRESET', 'a later call', undefined, 100);
  await rejectsWith(t, client.flush(), 'ECONNRESET', 'a later flush', undefined, 100);
});

t.test('bad magic kills the connection', async (t) => {
  const { client, srv } = await setup(t);
  const p = client.flush();
  await srv.next();
  srv.socket.write(Buffer.from('garbage garbage garbage'));
  await rejectsWith(t, p, 'ECONNRESET', 'pending flush', /bad reply magic/);
});

t.test('server disconnect mid-request: rejections, not hangs', async (t) => {
  {
    const { client, srv } = await setup(t);
    const closed = once(client, 'close');
    const into = Buffer.alloc(65536);
    const p1 = quiet(client.read(0, 65536, into, 0));
    const p2 = quiet(client.write(0, [Buffer.alloc(4096)], { fua: true }));
    const r = await srv.next();
    await srv.next();
    // Half a data chunk, then the server goes away.
    const b = Buffer.alloc(C.STRUCTURED_REPLY_HEADER_LENGTH + 8 + 1000);
    codec.writeStructuredHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + 65536);
    srv.socket.write(b);
    await sleep(20);
    srv.socket.destroy();
    await rejectsWith(t, p1, 'ECONNRESET', 'read in progress', /closed the connection|ECONNRESET/);
    await rejectsWith(t, p2, 'ECONNRESET', 'write in progress');
    const [err] = (await closed) as [Error];
    t.ok(err instanceof Error, "'close' with an Error");
    await rejectsWith(t, client.zero(0, 4096, { fua: false, noHole: false, fast: false }), 'ECONNRESET', 'later zero', undefined, 100);
  }
  {
    // Simple replies: the server dies in the middle of READ data.
    const { client, srv } = await setup(t, { structured: false });
    const p = client.read(0, 65536, Buffer.alloc(65536), 0);
    const r = await srv.next();
    srv.simple(r, 0, Buffer.alloc(100));
    await sleep(20);
    srv.socket.end();
    await rejectsWith(t, p, 'ECONNRESET', 'simple read cut short');
  }
  {
    // Queued requests (beyond the in-flight bound) are rejected too.
    const { client, srv } = await setup(t, {}, { maxInflightRequests: 2 });
    const ps = Array.from({ length: 6 }, (_, i) => quiet(client.read(i * 512, 512, Buffer.alloc(512), 0)));
    await srv.next();
    await srv.next();
    t.equal(client.stats.queuedRequests, 4);
    srv.socket.destroy();
    for (const [i, p] of ps.entries()) await rejectsWith(t, p, 'ECONNRESET', `request ${i}`);
  }
});

t.test('in-flight bounds: requests and bytes', async (t) => {
  {
    const { client, srv } = await setup(t, {}, { maxInflightRequests: 4 });
    const ps = Array.from({ length: 10 }, (_, i) => client.read(i * 512, 512, Buffer.alloc(512), 0));
    await sleep(50);
    t.equal(srv.pending, 4, 'only 4 requests on the wire');
    t.same(client.stats, { inflightRequests: 4, inflightBytes: 2048, queuedRequests: 6 });
    for (let i = 0; i < 10; i++) {
      const r = await srv.next();
      await sleep(5);
      t.ok(srv.pending <= 3, 'never more than 4 outstanding');
      srv.hole(r, r.offset, 512, true);
    }
    await Promise.all(ps);
    const order = srv.received.map((r) => r.offset / 512);
    t.same(order, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'FIFO');
  }
  {
    const { client, srv } = await setup(t, {}, { maxInflightBytes: 100 * 1024 });
    const ps = Array.from({ length: 5 }, (_, i) => client.write(i * 40960, [Buffer.alloc(40960, i)], { fua: false }));
    await sleep(50);
    t.equal(srv.pending, 2, '2 x 40 KiB fit in 100 KiB, a third does not');
    t.equal(client.stats.inflightBytes, 81920);
    const first = await srv.next();
    srv.none(first);
    await sleep(50);
    t.equal(srv.pending, 2, 'one more goes when one completes');
    for (let i = 1; i < 5; i++) srv.none(await srv.next());
    await Promise.all(ps);
    t.same(srv.received.map((r) => r.payload![0]), [0, 1, 2, 3, 4], 'payloads intact and in order');
  }
  {
    // A single request above the byte budget still goes (alone).
    const { client, srv } = await setup(t, {}, { maxInflightBytes: 1000 });
    const p = client.write(0, [Buffer.alloc(4096)], { fua: false });
    const r = await srv.next();
    t.equal(r.length, 4096);
    srv.none(r);
    await p;
  }
});

t.test('the socket write side is respected while the server does not read', async (t) => {
  const { client, srv } = await setup(t, {}, { maxInflightBytes: 256 << 20, maxInflightRequests: 1000 });
  srv.socket.pause();
  const chunk = Buffer.alloc(1 << 20, 1);
  const ps = Array.from({ length: 64 }, (_, i) => client.write(i << 20, [chunk], { fua: false }));
  await sleep(200);
  t.ok(client.stats.inflightRequests < 64, `requests wait for 'drain' (${client.stats.inflightRequests} sent, ${client.stats.queuedRequests} queued)`);
  srv.socket.resume();
  for (let i = 0; i < 64; i++) srv.none(await srv.next());
  await Promise.all(ps);
  t.equal(srv.received.length, 64);
  t.ok(srv.received.every((r) => r.payload!.length === 1 << 20 && r.payload![12345] === 1));
});

t.test('reads and writes above the maximum block size are split', async (t) => {
  const { client, srv } = await setup(t, { blockSize: [512, 4096, 65536], size: 1 << 22 });
  const into = Buffer.alloc(200 * 1024 + 16);
  const p = client.read(4096, 200 * 1024, into, 16);
  const lengths: number[] = [];
  for (let i = 0; i < 4; i++) {
    const r = await srv.next();
    lengths.push(r.length);
    srv.data(r, r.offset, Buffer.alloc(r.length, (r.offset - 4096) / 65536 + 1), true);
  }
  await p;
  t.same(lengths, [65536, 65536, 65536, 8192]);
  for (let i = 0; i < 4; i++) t.equal(into[16 + i * 65536], i + 1, `part ${i} in place`);

  const a = Buffer.alloc(100000, 1);
  const b = Buffer.alloc(100000, 2);
  const w = client.write(0, [a, b], { fua: false });
  const got: Req[] = [];
  for (let i = 0; i < 4; i++) {
    const r = await srv.next();
    got.push(r);
    srv.none(r);
  }
  await w;
  t.same(got.map((r) => [r.offset, r.length]), [
    [0, 65536],
    [65536, 65536],
    [131072, 65536],
    [196608, 3392],
  ]);
  const all = Buffer.concat(got.map((r) => r.payload!));
  t.ok(all.equals(Buffer.concat([a, b])), 'payload reassembles to the original');
});

t.test('servers lacking features', async (t) => {
  const base = C.NBD_FLAG_HAS_FLAGS;
  {
    // No WRITE_ZEROES: zeros are written; fast zero refused without sending.
    const { client, srv } = await setup(t, { flags: base | C.NBD_FLAG_SEND_FLUSH, blockSize: [1, 4096, 1 << 20] });
    t.equal(client.capabilities().canZero, false);
    await rejectsWith(t, client.zero(0, 4096, { fua: false, noHole: false, fast: true }), 'ENOTSUP', 'fast zero');
    const p = client.zero(1000, 3 << 20, { fua: true, noHole: false, fast: false });
    let total = 0;
    for (let i = 0; i < 3; i++) {
      const r = await srv.next();
      t.equal(r.type, C.NBD_CMD_WRITE, 'zero emulated with WRITE');
      t.equal(r.flags, 0, 'no FUA flag (not advertised)');
      t.ok(r.payload!.every((x) => x === 0), 'zeros');
      total += r.length;
      srv.none(r);
    }
    const f = await srv.next();
    t.equal(f.type, C.NBD_CMD_FLUSH, 'FUA emulated with a flush');
    srv.none(f);
    await p;
    t.equal(total, 3 << 20);
    t.equal(srv.received.length, 4, 'nothing was sent for the fast zero');
  }
  {
    // WRITE_ZEROES but no FAST_ZERO, no TRIM, no FLUSH, no FUA.
    const { client, srv } = await setup(t, { flags: base | C.NBD_FLAG_SEND_WRITE_ZEROES });
    await rejectsWith(t, client.zero(0, 4096, { fua: false, noHole: false, fast: true }), 'ENOTSUP', 'fast zero without FAST_ZERO');
    await client.trim(0, 4096, { fua: false });
    await client.flush();
    const p = client.zero(0, 4096, { fua: true, noHole: true, fast: false });
    const r = await srv.next();
    t.equal(r.type, C.NBD_CMD_WRITE_ZEROES);
    t.equal(r.flags, C.NBD_CMD_FLAG_NO_HOLE, 'NO_HOLE sent, FUA not (not advertised)');
    srv.none(r);
    await p;
    const w = client.write(0, [Buffer.alloc(512)], { fua: true });
    srv.none(await srv.next());
    await w;
    t.same(srv.received.map((x) => x.type), [C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_WRITE], 'trim, flush and FUA flushes were no-ops');
  }
  {
    // Everything: flags pass through.
    const { client, srv } = await setup(t);
    const z = client.zero(0, 4096, { fua: true, noHole: false, fast: true });
    const r = await srv.next();
    t.equal(r.flags, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_FAST_ZERO);
    srv.error(r, C.NBD_ENOTSUP, 'cannot zero quickly');
    await rejectsWith(t, z, 'ENOTSUP', 'fast zero refused by the server');
    const tr = client.trim(0, 3 * 2 ** 30, { fua: true });
    const t1 = await srv.next();
    const t2 = await srv.next();
    const t3 = await srv.next();
    t.same([t1, t2, t3].map((x) => [x.type, x.flags, x.offset, x.length]), [
      [C.NBD_CMD_TRIM, C.NBD_CMD_FLAG_FUA, 0, 2 ** 30],
      [C.NBD_CMD_TRIM, C.NBD_CMD_FLAG_FUA, 2 ** 30, 2 ** 30],
      [C.NBD_CMD_TRIM, C.NBD_CMD_FLAG_FUA, 2 ** 31, 2 ** 30],
    ], 'big trims are split at 1 GiB');
    for (const x of [t1, t2, t3]) srv.none(x);
    await tr;
  }
  {
    // Read-only: writes fail EPERM without being sent.
    const { client, srv } = await setup(t, { flags: base | C.NBD_FLAG_READ_ONLY | C.NBD_FLAG_SEND_FLUSH });
    t.equal(client.readOnly, true);
    t.equal(client.capabilities().canWrite, false);
    await rejectsWith(t, client.write(0, [Buffer.alloc(1)], { fua: false }), 'EPERM', 'write');
    await rejectsWith(t, client.zero(0, 1, { fua: false, noHole: false, fast: false }), 'EPERM', 'zero');
    await rejectsWith(t, client.trim(0, 1, { fua: false }), 'EPERM', 'trim');
    const f = client.flush();
    const r = await srv.next();
    t.equal(r.type, C.NBD_CMD_FLUSH, 'the first request the server sees is the flush');
    srv.none(r);
    await f;
  }
});

t.test('extents', async (t) => {
  {
    const { client, srv } = await setup(t, { size: 1 << 20 });
    const p = client.extents(4096, 1 << 30, 100);
    const r = await srv.next();
    t.same([r.type, r.flags, r.offset, r.length], [C.NBD_CMD_BLOCK_STATUS, 0, 4096, (1 << 20) - 4096], 'capped at the export end');
    srv.blockStatus(r, 1, [
      [8192, C.NBD_STATE_HOLE | C.NBD_STATE_ZERO | 0x100],
      [0, 0],
      [65536, 0],
      [(1 << 20) * 4, C.NBD_STATE_ZERO],
    ]);
    t.same(await p, [
      { length: 8192, flags: 3 },
      { length: 65536, flags: 0 },
      { length: (1 << 20) - 4096 - 8192 - 65536, flags: C.NBD_STATE_ZERO },
    ], 'unknown flags masked, zero-length dropped, clipped to the request');

    const p1 = client.extents(0, 1 << 20, 1);
    const r1 = await srv.next();
    t.equal(r1.flags, C.NBD_CMD_FLAG_REQ_ONE, 'REQ_ONE for a single extent');
    srv.blockStatus(r1, 1, [[4096, 3], [4096, 0]]);
    t.same(await p1, [{ length: 4096, flags: 3 }], 'at most maxExtents');

    const p2 = client.extents(0, 65536, 10);
    const r2 = await srv.next();
    srv.blockStatus(r2, 99, [[65536, 3]]); // only some other context
    t.same(await p2, [{ length: 65536, flags: 0 }], 'no descriptors for base:allocation: allocated data');

    await rejectsWith(t, client.extents(2 << 20, 512, 1), 'EINVAL', 'beyond the end');
    t.same(await client.extents(1 << 20, 0, 1), [], 'empty range');
  }
  {
    const { client, srv } = await setup(t, { structured: false, size: 1 << 20 });
    t.same(await client.extents(1000, 1 << 30, 5), [{ length: (1 << 20) - 1000, flags: 0 }], 'no context: one data extent');
    t.equal(srv.received.length, 0, 'nothing sent');
  }
});

t.test('request(): a custom command', async (t) => {
  const { client, srv } = await setup(t);
  const p = client.request(NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0);
  const r = await srv.next();
  t.same([r.type, r.flags, r.offset, r.length], [NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0]);
  srv.simple(r, 0);
  await p;
  const p2 = client.request(NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0);
  srv.error(await srv.next(), C.NBD_EINVAL, 'unknown command 19789');
  await rejectsWith(t, p2, 'EINVAL', 'refused custom command', /unknown command 19789/);
  await rejectsWith(t, client.request(C.NBD_CMD_READ, 0, 0, 512), 'EINVAL', 'READ via request()');
  const p3 = client.request(C.NBD_CMD_WRITE, 0, 512, 3, [Buffer.from('ab'), Buffer.from('c')]);
  const r3 = await srv.next();
  t.equal(r3.payload!.toString(), 'abc', 'payload sent');
  srv.simple(r3);
  await p3;
});

t.test('close(): waits for in-flight requests, then NBD_CMD_DISC', async (t) => {
  const { client, srv } = await setup(t);
  let closeArgs: unknown[] | undefined;
  client.on('close', (...a: unknown[]) => (closeArgs = a));
  const p = client.read(0, 512, Buffer.alloc(512), 0);
  const r = await srv.next();
  const closing = client.close();
  await rejectsWith(t, client.flush(), 'EPIPE', 'a call after close()', /closing/, 100);
  await sleep(30);
  t.equal(srv.received.length, 1, 'no DISC while a request is in flight');
  srv.hole(r, 0, 512, true);
  await p;
  await closing;
  t.equal(srv.received.at(-1)!.type, C.NBD_CMD_DISC, 'DISC sent');
  t.same(closeArgs, [], "'close' without an error");
  await rejectsWith(t, client.read(0, 1, Buffer.alloc(1), 0), 'EPIPE', 'after close', undefined, 100);
  await client.close();
  t.pass('close() twice is fine');
});

t.test('destroy(): everything pending rejects at once', async (t) => {
  const { client, srv } = await setup(t);
  const p = client.read(0, 512, Buffer.alloc(512), 0);
  await srv.next();
  client.destroy();
  await rejectsWith(t, p, 'ECONNRESET', 'pending read', /destroyed/, 100);
  await rejectsWith(t, client.flush(), 'ECONNRESET', 'later call', undefined, 100);
  await client.close();
});

t.test('ESHUTDOWN: the client disconnects softly', async (t) => {
  const { client, srv } = await setup(t, {}, { maxInflightRequests: 2 });
  const closed = once(client, 'close');
  const p1 = quiet(client.flush());
  const p2 = client.read(0, 512, Buffer.alloc(512), 0);
  const p3 = quiet(client.flush());
  const r1 = await srv.next();
  const r2 = await srv.next();
  srv.error(r1, C.NBD_ESHUTDOWN, 'server going down');
  await rejectsWith(t, p1, 'ESHUTDOWN', 'the refused request');
  await rejectsWith(t, p3, 'ESHUTDOWN', 'the queued request (never sent)');
  await rejectsWith(t, client.flush(), 'ESHUTDOWN', 'a new request', undefined, 100);
  srv.hole(r2, 0, 512, true);
  await p2;
  const d = await srv.next();
  t.equal(d.type, C.NBD_CMD_DISC, 'DISC after the in-flight read finished');
  const [err] = (await closed) as [Error];
  t.match(err?.message, /shutting down/);
});
