// TCP_QUICKACK on mirror target connections (src/client/quickack.ts): armed
// at connect and after every read, from the addon's tcpQuickAck; the mirror's
// connector asks for it on every target connection. (What it buys, the
// cutover pause against qemu-nbd, is measured in bench cutover4, not here.)
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { once } from 'node:events';
import { armQuickAck, nativeQuickAck, tcpFd } from '../../../src/client/quickack.js';
import { TargetConnector } from '../../../src/migration/connector.js';
import type { NbdClientOptions } from '../../../src/client/nbd-client.js';
import { logger } from '../../../src/util/log.js';
import { tcpPair } from '../../helpers/net.js';


t.test('the addon has tcpQuickAck: 0 on a TCP socket, an errno on anything else', async (t) => {
  const set = nativeQuickAck();
  t.type(set, 'function', 'native/nbd_native.cc exports tcpQuickAck (npm ci builds it with node-gyp)');
  const { client } = await tcpPair(t);
  const fd = tcpFd(client);
  t.type(fd, 'number', 'a plain TCP socket has an fd');
  t.equal(set!(fd!), 0, 'setsockopt(TCP_QUICKACK) succeeds');
  const file = fs.openSync(os.devNull, 'r');
  t.teardown(() => fs.closeSync(file));
  t.equal(set!(file), 88, 'ENOTSOCK on a file');
});

t.test('armQuickAck sets it at once and again after every read', async (t) => {
  const { client, peer } = await tcpPair(t);
  const calls: number[] = [];
  t.ok(armQuickAck(client, (fd) => (calls.push(fd), 0)), 'armed');
  t.same(calls, [tcpFd(client)], 'set once when armed');
  for (let i = 1; i <= 3; i++) {
    const got = once(client, 'data');
    peer.write(Buffer.alloc(16, i));
    await got;
    await new Promise((r) => setImmediate(r));
    t.equal(calls.length, 1 + i, `set again after read ${i}`);
  }
});

t.test('armQuickAck: a failing set disarms it; no setter or no TCP fd arms nothing', async (t) => {
  const { client, peer } = await tcpPair(t);
  let calls = 0;
  let fail = false;
  t.ok(armQuickAck(client, () => (calls++, fail ? 9 : 0)));
  fail = true;
  for (let i = 0; i < 2; i++) {
    const got = once(client, 'data');
    peer.write(Buffer.alloc(16));
    await got;
    await new Promise((r) => setImmediate(r));
  }
  t.equal(calls, 2, 'the first failure (EBADF) took the listener off');
  t.notOk(armQuickAck(client, null), 'no addon: not armed');

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'quickack-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 's');
  const server = net.createServer((s) => s.end());
  server.listen(sock);
  await once(server, 'listening');
  t.teardown(() => server.close());
  const unix = net.connect(sock);
  await once(unix, 'connect');
  t.teardown(() => unix.destroy());
  let unixCalls = 0;
  t.notOk(armQuickAck(unix, () => (unixCalls++, 0)), 'a Unix socket: not armed');
  t.equal(unixCalls, 0);
});

t.test("the mirror's connector asks for quickAck on its target connections", async (t) => {
  const seen: NbdClientOptions[] = [];
  const connector = new TargetConnector({
    uri: 'nbd://127.0.0.1:1/x',
    jobId: 'j1',
    force: false,
    requireSpace: false,
    requestTimeoutMs: 1000,
    source: { name: 'x', exportId: 'id', size: 1 << 20, dataBytes: () => 0 },
    connect: async (_uri, o) => {
      seen.push(o);
      throw new Error('refused (test)');
    },
    log: logger({ test: 'quickack' }),
  });
  await t.rejects(connector.connect(true));
  await t.rejects(connector.connect(false));
  t.equal(seen.length, 2);
  for (const o of seen) t.equal(o.quickAck, true, 'quickAck: true');
});
