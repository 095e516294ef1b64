// Post-copy destination (serve --fetch-from, src/migration/postcopy.ts) between
// two real nbd-migrate servers: the destination serves at once over an empty
// image, fetches what clients read, fills the rest in the background under
// --max-bandwidth (ctl set-speed), completes and detaches; a restart mid-fill
// (SIGKILL) resumes from the persisted present-map; a source killed mid-fill
// makes reads wait, and a source that stays away fails them with EIO after
// --fetch-timeout only.
import t from 'tap';
import { join } from 'node:path';
import { existsSync, readFileSync } from 'node:fs';
import { NbdClient } from '../../src/client/nbd-client.js';
import type { PostcopyStatus } from '../../src/migration/postcopy.js';
import { adminRequest } from '../helpers/admin.js';
import { MiB, makeImage, patternBuffer, serve, startServer, tmpDir, writeAt, type ServerHandle } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli, compare, freePort } from './harness.js';

const SIZE = 32 * MiB;

/** A source image: data over 0..24 MiB, a hole over 24..32 MiB. */
async function sourceImage(dir: string): Promise<{ src: string; data: Buffer }> {
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  const data = patternBuffer(24 * MiB, 7);
  await writeAt(src, 0, data);
  return { src, data };
}

const status = (sock: string) => adminRequest(sock, { cmd: 'status', export: 'vm1' }) as Promise<PostcopyStatus>;

async function waitStatus(sock: string, pred: (s: PostcopyStatus) => boolean, what: string, timeoutMs = 60_000): Promise<PostcopyStatus> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const s = await status(sock);
    if (pred(s)) return s;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function readVia(uri: string, offset: number, length: number): Promise<Buffer> {
  const c = await NbdClient.connect(uri);
  try {
    const b = Buffer.alloc(length);
    await c.read(offset, length, b, 0);
    return b;
  } finally {
    await c.close();
  }
}

function killHard(s: ServerHandle): Promise<void> {
  if (s.exited()) return Promise.resolve();
  return new Promise((r) => {
    s.proc.once('exit', () => r());
    s.proc.kill('SIGKILL');
  });
}

t.test('serves at once, fetches on read, fills under --max-bandwidth, completes and detaches', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-');
  const { src, data } = await sourceImage(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--read-only']);
  const sock = join(dir, 'dst.sock');
  const dstArgs = [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '2M', '--admin-socket', sock];
  const t0 = performance.now();
  let dstSrv = await startServer(dstArgs);
  t.teardown(() => dstSrv.stop());
  const got = await readVia(dstSrv.uri('vm1'), 20 * MiB + 4096, 8192);
  const firstReadMs = performance.now() - t0;
  t.ok(got.equals(data.subarray(20 * MiB + 4096, 20 * MiB + 12288)), 'a read far ahead of the fill returns the source data at once');
  t.comment(`FIGURE time from destination start to the first read answered: ${firstReadMs.toFixed(0)} ms`);

  const s1 = await status(sock);
  t.equal(s1.state, 'filling', 'status says filling');
  t.ok(s1.absentBytes > 0 && s1.presentBytes > 0 && s1.presentBytes + s1.absentBytes === SIZE, 'present and absent bytes add up to the size', { diag: s1 });
  t.equal(s1.maxBandwidth, 2 * MiB, 'the fill runs under --max-bandwidth');
  const all = (await adminRequest(sock, { cmd: 'status' })) as { postcopy: PostcopyStatus[] };
  t.equal(all.postcopy?.[0]?.export, 'vm1', 'the full status lists the post-copy destination');
  const s2 = await waitStatus(sock, (s) => s.sourceRate > 0 && s.etaSeconds !== null, 'a rate and ETA');
  t.ok(s2.sourceRate < 4 * MiB, `the fill reads the source near its limit (${s2.sourceRate} B/s; ${s2.rate} B/s made present, holes included)`);

  const table = await cli(['ctl', '--socket', sock, 'status']);
  t.match(table.stdout, /post-copy vm1 from nbd:\/\/.*: filling; present .* of 32(\.0)? MiB, absent .*ETA/, 'plain ctl status prints a line for the post-copy destination', { diag: describeRun(table) });
  const speed = await cli(['ctl', '--socket', sock, 'set-speed', 'vm1', '0']);
  t.equal(speed.code, 0, 'ctl set-speed lifts the limit', { diag: describeRun(speed) });
  const done = await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 60_000);
  t.ok(done, 'the destination logged completion');
  const fillDone = dstSrv.logs.find((e) => e.event === 'fill-done');
  t.comment(`FIGURE fill: ${JSON.stringify(fillDone)}`);
  const s3 = await status(sock);
  t.equal(s3.state, 'completed', 'status says completed');
  t.equal(s3.absentBytes, 0, 'nothing absent');
  t.ok(s3.fetched.fillBytes <= 24 * MiB + 2 * MiB, `the fill did not read the 8 MiB hole over the wire (fill brought ${s3.fetched.fillBytes} bytes)`);
  const metrics = dstSrv.logs.some((e) => e.event === 'fill-start');
  t.ok(metrics, 'fill-start logged');

  await srcSrv.stop();
  const after = await readVia(dstSrv.uri('vm1'), 0, 1 * MiB);
  t.ok(after.equals(data.subarray(0, MiB)), 'with the source stopped the destination still serves every block');
  const cmp = await compare(src, dstSrv.uri('vm1'));
  t.equal(cmp.code, 0, 'the destination export equals the source image', { diag: describeRun(cmp) });
  const state = JSON.parse(readFileSync(join(`${dst}.nbd-migrate.d`, 'postcopy.json'), 'utf8'));
  t.ok(state.completedAt, 'completion is recorded in the state folder');

  await dstSrv.stop();
  dstSrv = await startServer(dstArgs);
  await dstSrv.waitForLog((e) => e.event === 'postcopy-already-complete');
  t.equal((await status(sock)).state, 'completed', 'after a restart: completed, without the source');
  const cmp2 = await compare(src, dst);
  t.equal(cmp2.code, 0, 'the destination image file equals the source', { diag: describeRun(cmp2) });
});

t.test('a destination killed mid-fill resumes from its present-map', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-');
  const { src } = await sourceImage(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--read-only']);
  const sock = join(dir, 'dst.sock');
  const args = [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--admin-socket', sock];
  let dstSrv = await startServer([...args, '--max-bandwidth', '4M']);
  t.teardown(() => dstSrv.stop());
  // A client writes over the first 64 KiB, unaligned, and flushes: that must survive the crash.
  const c = await NbdClient.connect(dstSrv.uri('vm1'));
  const mine = Buffer.alloc(70_000, 0x5c);
  await c.write(1000, [mine], { fua: false });
  await c.flush();
  await c.close();
  await waitStatus(sock, (s) => s.presentBytes >= 8 * MiB, '8 MiB present');
  // A FLUSH makes the image durable and then saves the map: what is present now survives the kill.
  const f = await NbdClient.connect(dstSrv.uri('vm1'));
  await f.flush();
  await f.close();
  const mapFile = join(`${dst}.nbd-migrate.d`, 'present-map');
  t.ok(existsSync(mapFile), 'a present-map was saved');
  await killHard(dstSrv);
  dstSrv = await startServer(args);
  const start = await dstSrv.waitForLog((e) => e.event === 'postcopy-start');
  t.equal(start.resumed, true, 'the restarted destination resumed from its map');
  t.ok((start.absentBytes as number) <= SIZE - 8 * MiB, `it still knows what it had at the flush (${start.absentBytes} bytes absent)`);
  await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 60_000);
  const s = await status(sock);
  t.ok(s.fetched.fillBytes <= 16 * MiB, `after the restart it fetched less than the whole data (${s.fetched.fillBytes} bytes)`);
  const head = await readVia(dstSrv.uri('vm1'), 0, 80_000);
  const want = Buffer.from((await import('node:fs')).readFileSync(src).subarray(0, 80_000));
  mine.copy(want, 1000);
  t.ok(head.equals(want), 'the flushed unaligned write survived the crash, with source data around it');
  await writeAt(src, 1000, mine); // the source as the client changed it
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, 'the destination holds the source plus the client write', { diag: describeRun(cmp) });
});

t.test('a source killed mid-fill: reads wait and recover; a source that stays away gives EIO after --fetch-timeout', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-');
  const { src, data } = await sourceImage(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const srcArgs = [src, '--name', 'vm1', '--read-only', '--port', String(port)];
  let srcSrv = await startServer(srcArgs);
  t.teardown(() => srcSrv.stop());
  const sock = join(dir, 'dst.sock');
  // Two destinations of the same source: one that waits up to 60 s, one that gives up after 3 s.
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '1M', '--fetch-timeout', '60', '--admin-socket', sock]);
  const dst2 = await makeImage(join(dir, 'dst2.img'), SIZE);
  const shortSrv = await serve(t, [dst2, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '1M', '--fetch-timeout', '3']);
  await dstSrv.waitForLog((e) => e.event === 'source-connected');
  await shortSrv.waitForLog((e) => e.event === 'source-connected');
  await killHard(srcSrv);

  // A read of an absent block waits while the source is away, then fails with EIO after --fetch-timeout.
  const short = await NbdClient.connect(shortSrv.uri('vm1'));
  t.teardown(() => short.destroy());
  const c = await NbdClient.connect(dstSrv.uri('vm1'));
  t.teardown(() => c.destroy());
  const t0 = performance.now();
  const err = await short.read(22 * MiB, 4096, Buffer.alloc(4096), 0).then(
    () => undefined,
    (e: Error & { code?: string }) => e,
  );
  const waited = performance.now() - t0;
  t.equal(err?.code, 'EIO', 'the read failed with EIO', { diag: { err: String(err) } });
  t.ok(waited >= 2900, `only after --fetch-timeout (${waited.toFixed(0)} ms)`);
  t.ok(shortSrv.logs.some((e) => e.event === 'fetch-retry'), 'the destination retried meanwhile (fetch-retry)');
  t.ok(shortSrv.logs.some((e) => e.event === 'fetch-failed'), 'and logged the failure (fetch-failed)');

  // A read issued while the source is away, and the source comes back within the timeout: it just waits.
  const pending = c.read(23 * MiB, 4096, Buffer.alloc(4096), 0).then(() => 'ok', (e: Error) => e);
  await dstSrv.waitForLog((e) => e.event === 'fetch-retry' && typeof e.what === 'string' && e.what.includes(`at ${23 * MiB}`));
  srcSrv = await startServer(srcArgs);
  const buf = Buffer.alloc(4096);
  const r = await pending;
  t.equal(r, 'ok', 'the read that waited through the outage succeeded');
  await c.read(23 * MiB, 4096, buf, 0);
  t.ok(buf.equals(data.subarray(23 * MiB, 23 * MiB + 4096)), 'with the source data');
  const recovered = await dstSrv.waitForLog((e) => e.event === 'fetch-recovered');
  t.ok(recovered, 'the destination logged the recovery');

  await adminRequest(sock, { cmd: 'set-speed', export: 'vm1', rate: '0' });
  await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 60_000);
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, 'the fill completed after the outage and the destination equals the source', { diag: describeRun(cmp) });
});

t.test('a half-filled destination is refused without --fetch-from', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-');
  const { src } = await sourceImage(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--read-only']);
  const dstSrv = await startServer([dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '1M']);
  await dstSrv.waitForLog((e) => e.event === 'fill-start');
  await dstSrv.stop();
  const r = await cli(['serve', dst, '--name', 'vm1', '--port', '0', '--listen', '127.0.0.1'], 20_000);
  t.not(r.code, 0, 'serve refuses it');
  t.match(r.stderr, /post-copy destination still filling from .*--fetch-from/, 'naming the source and the way on', { diag: describeRun(r) });
});
