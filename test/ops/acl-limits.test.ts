// Access control and resource limits, against real clients and raw sockets.
import t from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { NbdClient } from '../../src/client/nbd-client.js';
import * as C from '../../src/protocol/constants.js';
import * as codec from '../../src/protocol/codec.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

/** Opens a TCP connection and resolves with what the server sent within `ms` and whether it closed. */
function probe(port: number, ms = 500): Promise<{ bytes: number; closed: boolean }> {
  return new Promise((resolve) => {
    let bytes = 0;
    const s = net.connect(port, '127.0.0.1');
    s.on('data', (d) => (bytes += d.length));
    s.on('error', () => undefined);
    const timer = setTimeout(() => {
      s.destroy();
      resolve({ bytes, closed: false });
    }, ms);
    s.on('close', () => {
      clearTimeout(timer);
      resolve({ bytes, closed: true });
    });
  });
}

t.test('allow-lists: newstyle refuses with ERR_POLICY and hides the export, oldstyle closes, Unix socket is exempt', async (t) => {
  await requireTool('qemu-img', 'qemu-utils');
  await requireTool('nbdinfo', 'libnbd-bin');
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const open = await makeImage(path.join(dir, 'b.img'), 4 * MiB);
  const sock = path.join(dir, 'nbd.sock');
  const s = await serve(t, [img, '--name', 'locked', '--allow', '10.0.0.0/8', '--allow', 'fd00::/8', '--oldstyle-port', '0', '--socket', sock, '--export', `open=${open}`]);

  const info = await run('qemu-img', ['info', '-f', 'raw', s.uri('locked')]);
  t.not(info.code, 0, 'qemu-img is refused');
  t.match(info.stderr, /not allowed/, describeRun(info));
  const list = await run('nbdinfo', ['--list', '--json', s.uri('')]);
  t.match(list.stdout, /"export-name": "open"/);
  t.notMatch(list.stdout, /"export-name": "locked"/, 'an export the client may not use is not listed');
  const old = await probe(s.oldstylePort('locked'));
  t.ok(old.closed && old.bytes === 0, 'oldstyle: closed before any greeting');
  const viaUnix = await run('qemu-img', ['info', '-f', 'raw', s.unixUri('locked')]);
  t.equal(viaUnix.code, 0, `local Unix-socket clients are not subject to address lists\n${describeRun(viaUnix)}`);
  t.ok(await s.waitForLog((e) => e.event === 'handshake-failed' || e.event === 'option-refused', 5000), 'refusals are logged');
});

t.test('the allow-list changes at runtime; clients it no longer allows are disconnected', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [img, '--name', 'vm1', '--admin-socket', admin]);
  const c = await NbdClient.connect(s.uri('vm1'));
  const closed = new Promise<void>((r) => c.on('close', () => r()));
  await c.write(0, [Buffer.alloc(4096, 1)], { fua: false });
  const r = (await adminRequest(admin, { cmd: 'set-acl', export: 'vm1', allow: ['10.0.0.0/8'] })) as { disconnected: number };
  t.equal(r.disconnected, 1, 'one client disconnected');
  await closed;
  await t.rejects(c.read(0, 4096, Buffer.alloc(4096), 0), 'its next request fails');
  await t.rejects(NbdClient.connect(s.uri('vm1')), /not allowed/, 'new connections refused');
  await t.rejects(adminRequest(admin, { cmd: 'set-acl', export: 'vm1', allow: ['bogus'] }), { code: 'EINVAL' });
  await adminRequest(admin, { cmd: 'set-acl', export: 'vm1', allow: null });
  const again = await NbdClient.connect(s.uri('vm1'));
  t.equal(again.size, 4 * MiB, 'allowed again');
  await again.close();
});

t.test('connection limits, idle timeout', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const s = await serve(t, [img, '--name', 'vm1', '--max-connections', '2', '--max-connections-per-export', '1', '--idle-timeout', '1']);
  const a = await NbdClient.connect(s.uri('vm1'));
  await t.rejects(NbdClient.connect(s.uri('vm1')), /already has 1 connections/, 'per-export limit: GO refused');
  await s.waitForLog((e) => e.event === 'connection-closed'); // the refused client has gone
  const held = net.connect(s.newstylePort, '127.0.0.1'); // sits in the handshake: the second connection
  held.on('error', () => undefined);
  const greeted = await new Promise<boolean>((r) => {
    held.once('data', () => r(true));
    held.once('close', () => r(false));
  });
  t.ok(greeted, 'a second connection is within the limit');
  const third = await probe(s.newstylePort);
  t.ok(third.closed && third.bytes === 0, 'total limit: the third connection is closed at once');
  held.destroy();
  const aClosed = new Promise<number>((r) => {
    const t0 = Date.now();
    a.on('close', () => r(Date.now() - t0));
  });
  const ms = await aClosed;
  t.ok(ms >= 800 && ms < 5000, `an idle connection is closed after the idle timeout (${ms} ms)`);
  t.ok(await s.waitForLog((e) => e.event === 'idle-timeout', 5000), 'idle timeouts are logged');
});

t.test('a flood of pipelined 32 MiB writes: memory stays bounded, another client keeps being served', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 256 * MiB);
  const s = await serve(t, [img, '--name', 'vm1']);
  const pid = s.proc.pid!;
  const rssMiB = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
  const baseline = rssMiB();

  // Flooders: fixed newstyle by hand, then WRITE headers + 32 MiB payloads as fast as the socket takes them, never reading replies.
  const payload = Buffer.alloc(32 * MiB, 0x5a);
  const flooders: net.Socket[] = [];
  let stop = false;
  /** WRITEs the flooders have sent so far (they block while the server reads nothing from them). */
  let flooded = 0;
  let floodWaiter: { n: number; resolve: () => void } | undefined;
  /** Resolves once the flooders have sent `n` WRITEs in all. */
  const floodReached = (n: number) => (flooded >= n ? Promise.resolve() : new Promise<void>((resolve) => (floodWaiter = { n, resolve })));
  for (let i = 0; i < 4; i++) {
    const f = net.connect(s.newstylePort, '127.0.0.1');
    f.on('error', () => undefined);
    flooders.push(f);
    f.once('data', () => {
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);
      f.write(flags);
      f.write(codec.encodeOptionRequest(C.NBD_OPT_EXPORT_NAME, Buffer.from('vm1')));
      let n = 0;
      const pump = () => {
        while (!stop) {
          flooded++;
          if (floodWaiter && flooded >= floodWaiter.n) {
            floodWaiter.resolve();
            floodWaiter = undefined;
          }
          const h = codec.encodeRequestHeader(0, C.NBD_CMD_WRITE, { hi: i, lo: n++ }, ((n * 32) % 224) * MiB, payload.length);
          f.write(h);
          if (!f.write(payload)) return void f.once('drain', pump);
        }
      };
      setTimeout(pump, 50);
    });
  }
  let peak = baseline;
  const sampler = setInterval(() => (peak = Math.max(peak, rssMiB())), 50);
  const good = await NbdClient.connect(s.uri('vm1'));
  const lat: number[] = [];
  const buf = Buffer.alloc(4096);
  // Served during the flood: a count of round trips, not a rate (the machine may be busy with
  // other tests). The rounds begin once every flooder is under way (8 writes sent in all) and go on
  // until the flood has sent more meanwhile, so the server is seen serving both.
  const ROUNDS = 30;
  const MORE = 4;
  const underWay = await Promise.race([floodReached(8).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 60_000).unref())]);
  t.ok(underWay, `the flood got under way (${flooded} writes sent)`);
  const t0 = performance.now();
  const floodedBefore = flooded;
  const deadline = Date.now() + 60_000;
  let i = 0;
  while ((lat.length < ROUNDS || flooded - floodedBefore <= MORE) && Date.now() < deadline) {
    const off = 250 * MiB + (i++ % 256) * 4096;
    const t0 = performance.now();
    await good.write(off, [Buffer.alloc(4096, i & 0xff)], { fua: false });
    await good.read(off, 4096, buf, 0);
    lat.push(performance.now() - t0);
    if (buf[0] !== (i & 0xff)) t.fail('the good client read back wrong data');
  }
  const servedMs = performance.now() - t0;
  const floodedDuring = flooded - floodedBefore;
  stop = true;
  clearInterval(sampler);
  for (const f of flooders) f.destroy();
  await good.close();
  lat.sort((a, b) => a - b);
  const p99 = lat[Math.floor(lat.length * 0.99)]!;
  t.comment(`flood: RSS ${baseline.toFixed(0)} MiB -> peak ${peak.toFixed(0)} MiB; good client ${lat.length} write+read pairs, median ${lat[lat.length >> 1]!.toFixed(1)} ms, p99 ${p99.toFixed(1)} ms`);
  t.ok(peak < baseline + 700, `peak RSS ${peak.toFixed(0)} MiB stays bounded (4 flooders x (64 MiB in flight + 32 MiB payload being read))`);
  t.ok(lat.length >= ROUNDS, `the well-behaved client kept being served (${lat.length} round trips in ${Math.round(servedMs)} ms)`);
  t.ok(floodedDuring > MORE, `while the flood went on (${floodedDuring} more 32 MiB writes sent meanwhile)`);
  t.equal(s.exited(), undefined, 'server still running');
});

t.test('a flood of connections stalling in the handshake: refused past the limit, dropped at the timeout, memory bounded', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const s = await serve(t, [img, '--name', 'vm1', '--max-connections', '200', '--handshake-timeout', '2']);
  const pid = s.proc.pid!;
  const rssMiB = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
  const baseline = rssMiB();
  const socks: net.Socket[] = [];
  let closedByServer = 0;
  for (let i = 0; i < 400; i++) {
    const c = net.connect(s.newstylePort, '127.0.0.1');
    c.on('error', () => undefined);
    c.on('close', () => closedByServer++);
    c.on('data', () => undefined); // read the greeting (and so see the server's close)
    c.on('connect', () => c.write(Buffer.alloc(3))); // a partial client-flags field, then silence
    socks.push(c);
  }
  await new Promise((r) => setTimeout(r, 800));
  const peak = rssMiB();
  t.ok(closedByServer >= 150, `connections past --max-connections are closed at once (${closedByServer} of 400)`);
  // A well-behaved client still gets through once the stalled ones time out.
  await new Promise((r) => setTimeout(r, 2500));
  t.equal(closedByServer, 400, 'every stalled connection was dropped by the handshake timeout');
  const good = await NbdClient.connect(s.uri('vm1'));
  await good.write(0, [Buffer.alloc(4096, 7)], { fua: false });
  const b = Buffer.alloc(4096);
  await good.read(0, 4096, b, 0);
  t.equal(b[4095], 7, 'a client after the storm is served');
  await good.close();
  for (const c of socks) c.destroy();
  t.comment(`connection flood: RSS ${baseline.toFixed(0)} -> ${peak.toFixed(0)} MiB`);
  t.ok(peak < baseline + 100, `RSS stays bounded (${peak.toFixed(0)} MiB)`);
  t.ok((s.logs.filter((e) => e.event === 'handshake-timeout').length) >= 150, 'timeouts are logged');
});
