// Live migration end to end: real servers, a concurrent writer, the operator's CLI.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { makeImage, MiB, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { cli, compare, freePort, jobStatus, nbdkit, qemuNbd, startWriter, waitForJob } from './harness.js';

const SIZE = 64 * MiB;

/** A half-allocated source image and its shadow copy (what the "guest" believes). */
async function sourceImage(dir: string): Promise<{ src: string; shadow: string }> {
  const src = await makeImage(path.join(dir, 'src.img'), SIZE);
  for (let off = 0; off < SIZE; off += 8 * MiB) await writeAt(src, off, patternBuffer(4 * MiB, off));
  const shadow = path.join(dir, 'shadow.img');
  fs.copyFileSync(src, shadow);
  return { src, shadow };
}

async function sourceServer(t: Tap, dir: string, src: string) {
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  return { s, admin };
}
type Tap = typeof t;

for (const kind of ['qemu-nbd', 'nbd-migrate'] as const) {
  t.test(`manual cutover to a ${kind} target under a concurrent writer`, async (t) => {
    const dir = await tmpDir(t);
    const { src, shadow } = await sourceImage(dir);
    const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
    let targetUri: string;
    let dstServer: Awaited<ReturnType<typeof serve>> | undefined;
    if (kind === 'qemu-nbd') {
      const port = await freePort();
      const q = await qemuNbd(dst, 'vm1', port);
      t.teardown(() => q.stop());
      targetUri = `nbd://127.0.0.1:${port}/vm1`;
    } else {
      dstServer = await serve(t, [dst, '--name', 'vm1', '--incoming']);
      targetUri = dstServer.uri('vm1');
    }
    const { s, admin } = await sourceServer(t, dir, src);
    const writer = await startWriter(s.uri('vm1'), shadow, dir);

    const started = await cli(['ctl', '--socket', admin, 'mirror', 'vm1', targetUri, '--cutover', 'manual', '--max-downtime', '200ms']);
    t.equal(started.code, 0, describeRun(started));
    const ready = await waitForJob(admin, 'vm1', (j) => j.state === 'ready');
    t.equal(ready.convergence, 'active', 'ready and kept in sync by write-through');
    if (dstServer) {
      const refused = await compare(shadow, targetUri);
      t.not(refused.code, 0, 'the destination refuses other clients while the migration is incoming');
      t.match(refused.stderr, /receiving a migration|half-copied/, describeRun(refused));
    }
    await new Promise((r) => setTimeout(r, 500)); // the guest keeps writing while ready
    const cut = await cli(['ctl', '--socket', admin, 'cutover', 'vm1']);
    t.equal(cut.code, 0, describeRun(cut));
    const done = await jobStatus(admin, 'vm1');
    t.equal(done.state, 'completed');
    t.ok(done.pauseMs !== null && done.pauseMs < 5000, `cutover pause ${done.pauseMs} ms`);
    await new Promise((r) => setTimeout(r, 300)); // writes after cutover go to the target through the source
    const w = await writer.stop();
    t.equal(w.errors, 0, `writer saw no errors (${w.writes} writes; first error: ${w.firstError})`);
    t.ok(w.writes > 50, `writer wrote through the whole job (${w.writes} writes)`);
    const cmp = await compare(shadow, kind === 'qemu-nbd' ? dst : targetUri);
    t.equal(cmp.code, 0, `destination equals what the writer wrote\n${describeRun(cmp)}`);
    const status = (await adminRequest(admin, { cmd: 'status' })) as { exports: Array<{ backend: string }> };
    t.equal(status.exports[0]!.backend, 'target', 'the export now forwards to the target');
  });
}

// "The target dies mid-copy and comes back: the job resumes" is one test, with
// a guest: test/guest/migrate-faults.test.ts.

t.test('pre-checks refuse bad targets before anything starts', async (t) => {
  const dir = await tmpDir(t);
  const { src } = await sourceImage(dir);
  const { admin } = await sourceServer(t, dir, src);
  const deadPort = await freePort();
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${deadPort}/vm1` }), {
    code: 'EUNREACHABLE',
    message: /unreachable/,
  });
  const small = await makeImage(path.join(dir, 'small.img'), SIZE / 2);
  const p1 = await freePort();
  const q1 = await qemuNbd(small, 'vm1', p1);
  t.teardown(() => q1.stop());
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${p1}/vm1` }), { code: 'ETOOSMALL', message: /smaller/ });
  const ro = await makeImage(path.join(dir, 'ro.img'), SIZE);
  const p2 = await freePort();
  const q2 = await qemuNbd(ro, 'vm1', p2, ['--read-only']);
  t.teardown(() => q2.stop());
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${p2}/vm1` }), { code: 'EROFS', message: /read-only/ });
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'nope', target: `nbd://127.0.0.1:${p2}/vm1` }), { code: 'ENOENT' });

  const good = await makeImage(path.join(dir, 'good.img'), SIZE);
  const p3 = await freePort();
  const q3 = await qemuNbd(good, 'vm1', p3);
  t.teardown(() => q3.stop());
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${p3}/vm1`, maxBandwidth: '2M' });
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${p3}/vm1` }), { code: 'EBUSY', message: /already/ });
  // Garbage on the admin socket harms nothing.
  await t.rejects(adminRequest(admin, { cmd: 'explode' }), { code: 'ENOSYS' });
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1' }), { code: 'EINVAL' });
  t.equal((await jobStatus(admin, 'vm1')).state, 'copying', 'the running job is unharmed');
  const mode = fs.statSync(admin).mode & 0o777;
  t.equal(mode, 0o600, 'admin socket is 0600');

  // Abort leaves the source as it was.
  const ab = await cli(['ctl', '--socket', admin, 'abort', 'vm1']);
  t.equal(ab.code, 0, describeRun(ab));
  t.equal((await jobStatus(admin, 'vm1')).state, 'aborted');
  const st = (await adminRequest(admin, { cmd: 'status' })) as { exports: Array<{ backend: string }> };
  t.equal(st.exports[0]!.backend, 'local');
  t.notOk(fs.existsSync(`${src}.nbd-migrate-fenced`), 'an aborted source is not fenced');
});

for (const mode of ['active', 'throttle'] as const) {
  t.test(`converges when the guest writes faster than the copy (${mode})`, async (t) => {
    const dir = await tmpDir(t);
    const { src, shadow } = await sourceImage(dir);
    const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
    const port = await freePort();
    const q = await qemuNbd(dst, 'vm1', port);
    t.teardown(() => q.stop());
    const { s, admin } = await sourceServer(t, dir, src);
    // The guest rewrites an 8 MiB region in 64 KiB blocks: even on a busy machine it re-dirties that
    // region faster than a 2 MiB/s copy can send it, so the job must engage its convergence mode.
    const writer = await startWriter(s.uri('vm1'), shadow, dir, { block: 64 * 1024, region: 8 * MiB });
    await adminRequest(admin, {
      cmd: 'mirror',
      export: 'vm1',
      target: `nbd://127.0.0.1:${port}/vm1`,
      cutover: 'auto',
      maxBandwidth: '2M',
      maxDowntime: '100ms',
      converge: mode,
    });
    const engaged = await s.waitForLog((e) => e.event === 'mirror-converge' && e.mode === mode, 240_000);
    const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed', 240_000);
    const w = await writer.stop();
    t.ok(engaged, `convergence mode ${mode} was engaged (log: ${JSON.stringify(engaged)})`);
    t.equal(w.errors, 0, `writer saw no errors (${w.writes} writes)`);
    t.equal(done.state, 'completed');
    await q.stop();
    const cmp = await compare(shadow, dst);
    t.equal(cmp.code, 0, describeRun(cmp));
  });
}

t.test('a fenced source refuses to be served read-write again', async (t) => {
  const dir = await tmpDir(t);
  const { src } = await sourceImage(dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  const { s, admin } = await sourceServer(t, dir, src);
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${port}/vm1`, cutover: 'auto' });
  await waitForJob(admin, 'vm1', (j) => j.state === 'completed');
  await s.stop();
  const again = await cli(['serve', src, '--name', 'vm1', '--listen', '127.0.0.1', '--port', '0'], 20_000);
  t.not(again.code, 0, 'serve refuses');
  t.match(again.stderr, /fenced/, describeRun(again));
  const ro = await serve(t, [src, '--name', 'vm1', '--read-only']);
  t.ok(ro.newstylePort > 0, 'read-only serving of a fenced image is allowed');
});

t.test('after cutover, the target restarting is latency, not an error, for guests forwarded through the source', async (t) => {
  const dir = await tmpDir(t);
  const { src, shadow } = await sourceImage(dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  let q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  const { s, admin } = await sourceServer(t, dir, src);
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${port}/vm1`, cutover: 'auto' });
  await waitForJob(admin, 'vm1', (j) => j.state === 'completed');
  const writer = await startWriter(s.uri('vm1'), shadow, dir);
  await new Promise((r) => setTimeout(r, 300));
  await q.stop();
  await new Promise((r) => setTimeout(r, 500));
  q = await qemuNbd(dst, 'vm1', port);
  await s.waitForLog((e) => e.event === 'target-reconnected', 15_000);
  await new Promise((r) => setTimeout(r, 300));
  const w = await writer.stop();
  t.equal(w.errors, 0, `the writer saw no errors across the target restart (${w.writes} writes, max latency ${w.maxLatencyMs} ms)`);
  t.ok(w.maxLatencyMs >= 400, 'it saw the outage as latency');
  const through = await compare(shadow, s.uri('vm1'));
  t.equal(through.code, 0, `reads forwarded on the new connection return what was written\n${describeRun(through)}`);
  const reconnects = () => s.logs.filter((e) => e.event === 'target-reconnected').length;
  const before = reconnects();
  await q.stop();
  const cmp = await compare(shadow, dst);
  t.equal(cmp.code, 0, describeRun(cmp));

  // An error the target itself returns is not a lost connection: it reaches the guest, without a retry.
  const full = await nbdkit(port, ['--filter=error', 'file', dst, 'error=ENOSPC', 'error-pwrite-rate=100%']);
  t.teardown(() => full.stop());
  const qemuIo = await requireTool('qemu-io', 'qemu-utils');
  const wr = await run(qemuIo, ['-f', 'raw', s.uri('vm1'), '-c', 'write -P 0x55 0 4k'], { timeoutMs: 60_000 });
  t.match(wr.stdout + wr.stderr, /No space left on device/, `the guest's write fails with the target's ENOSPC\n${describeRun(wr)}`);
  t.equal(reconnects(), before + 1, 'the source reconnected once (to the new target) and did not retry the ENOSPC');
});

t.test('SIGTERM during a mirror aborts it cleanly: the source stays authoritative and unfenced', async (t) => {
  const dir = await tmpDir(t);
  const { src } = await sourceImage(dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  const { s, admin } = await sourceServer(t, dir, src);
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${port}/vm1`, maxBandwidth: '4M' });
  await waitForJob(admin, 'vm1', (j) => j.dataBytes > 0);
  await s.stop();
  t.equal(s.exited()?.code, 0, 'clean exit');
  t.ok(await s.waitForLog((e) => e.event === 'mirror-state' && e.to === 'aborted', 5000), 'the job was aborted');
  t.notOk(fs.existsSync(`${src}.nbd-migrate-fenced`), 'not fenced');
  const again = await serve(t, [src, '--name', 'vm1']);
  t.ok(again.newstylePort > 0, 'the source can be served read-write again');
});

t.test('cold copy: nbd-migrate copy between a file and an NBD target, sparse-aware', async (t) => {
  const dir = await tmpDir(t);
  const { src } = await sourceImage(dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  const r = await cli(['copy', src, `nbd://127.0.0.1:${port}/vm1`]);
  t.equal(r.code, 0, describeRun(r));
  t.match(r.stderr, /copied 32\.0 MiB of data/, 'only the allocated half was copied');
  const back = path.join(dir, 'back.img');
  const r2 = await cli(['copy', `nbd://127.0.0.1:${port}/vm1`, back]);
  t.equal(r2.code, 0, describeRun(r2));
  const cmp = await compare(src, back);
  t.equal(cmp.code, 0, describeRun(cmp));
});
