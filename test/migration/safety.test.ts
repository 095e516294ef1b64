// Never harm a disk: wrong targets are refused, a destination belongs to one job, a frozen or
// failing target never hangs guests, abort or cutover, and the fence is written under the hold.
import t from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import type { JobStatus } from '../../src/migration/job.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { makeImage, MiB, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { compare, freePort, jobStatus, nbdkit, qemuNbd, waitForJob } from './harness.js';

type Tap = typeof t;
const SIZE = 32 * MiB;

/** A source image with data in every other 4 MiB, and its server with an admin socket. */
async function source(t: Tap, dir: string, name = 'src', extra: string[] = []) {
  const img = await makeImage(path.join(dir, `${name}.img`), SIZE);
  for (let off = 0; off < SIZE; off += 8 * MiB) await writeAt(img, off, patternBuffer(4 * MiB, off + name.length));
  const admin = path.join(dir, `${name}.sock`);
  const s = await serve(t, [img, '--name', 'vm1', '--admin-socket', admin, ...extra]);
  return { img, admin, s };
}

const mirror = (admin: string, target: string, extra: Record<string, unknown> = {}) =>
  adminRequest(admin, { cmd: 'mirror', export: 'vm1', target, ...extra }) as Promise<JobStatus>;

/** A qemu-nbd target on an empty image; the teardown thaws it first, should a test have frozen it. */
async function qemuTarget(t: Tap, dir: string) {
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(async () => {
    q.proc.kill('SIGCONT');
    await q.stop();
  });
  return { dst, port, q };
}

/** Resolves with how long `p` took, in ms. */
async function timed<T>(p: Promise<T>): Promise<{ ms: number; value: T }> {
  const t0 = performance.now();
  const value = await p;
  return { ms: performance.now() - t0, value };
}

/** A guest write through qemu-io (a real client), with its duration. */
async function guestWrite(uri: string, pattern: number, offset: number) {
  await requireTool('qemu-io', 'qemu-utils');
  return timed(run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} 64k`, uri], { timeoutMs: 60_000 }));
}

const sha = (file: string): string => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

t.test('a mirror onto its own export is refused, and nothing hangs', async (t) => {
  const dir = await tmpDir(t);
  const { admin, s, img } = await source(t, dir);
  const before = sha(img);
  await t.rejects(mirror(admin, s.uri('vm1')), { code: 'ESELF', message: /itself/ }, 'refused with ESELF');
  const w = await guestWrite(s.uri('vm1'), 0x11, 0);
  t.equal(w.value.code, 0, describeRun(w.value));
  t.ok(w.ms < 20_000, `guest writes still flow (${Math.round(w.ms)} ms)`);
  t.not(sha(img), before, 'the write landed locally');
  const st = (await adminRequest(admin, { cmd: 'status' })) as { jobs: unknown[] };
  t.same(st.jobs, [], 'no job was left behind');
});

t.test('a live nbd-migrate export that is not --incoming is refused unless --force', async (t) => {
  const dir = await tmpDir(t);
  const { admin } = await source(t, dir);
  const live = await makeImage(path.join(dir, 'live.img'), SIZE, { fill: 'random' });
  const other = await serve(t, [live, '--name', 'live']);
  const before = sha(live);
  await t.rejects(mirror(admin, other.uri('live'), { maxBandwidth: '1M' }), { code: 'ELIVE', message: /live nbd-migrate export.*--incoming.*--force/ });
  t.equal(sha(live), before, 'not one byte of the live disk changed');
  // With --force the operator takes responsibility: the job runs.
  const st = await mirror(admin, other.uri('live'), { force: true, cutover: 'manual' });
  t.equal(st.targetKind, 'nbd-migrate-live');
  await waitForJob(admin, 'vm1', (j) => j.state === 'ready');
  await adminRequest(admin, { cmd: 'abort', export: 'vm1' });
});

t.test('an --incoming destination belongs to the first job; abort releases it; --force takes it over', async (t) => {
  const dir = await tmpDir(t);
  const a = await source(t, dir, 'a');
  const b = await source(t, dir, 'b');
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const d = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  const uri = d.uri('vm1');

  const ja = await mirror(a.admin, uri, { cutover: 'manual' });
  t.equal(ja.targetKind, 'nbd-migrate-incoming');
  await waitForJob(a.admin, 'vm1', (j) => j.state === 'ready');
  await t.rejects(mirror(b.admin, uri), { code: 'EBUSY', message: new RegExp(`bound to migration job ${ja.jobId}`) }, 'a second source is refused');
  const marker = JSON.parse(fs.readFileSync(`${dst}.nbd-migrate-incoming`, 'utf8'));
  t.equal(marker.job.id, ja.jobId, 'the binding is durable in the incoming marker');

  // A aborts: the destination is released, and B may bind it without --force.
  await adminRequest(a.admin, { cmd: 'abort', export: 'vm1' });
  await d.waitForLog((e) => e.event === 'incoming-released');
  const jb = await mirror(b.admin, uri, { cutover: 'manual' });
  await waitForJob(b.admin, 'vm1', (j) => j.state === 'ready');

  // A comes back (a restarted source knows no job): refused, then takes over with --force.
  await t.rejects(mirror(a.admin, uri), { code: 'EBUSY' });
  const ja2 = await mirror(a.admin, uri, { cutover: 'manual', force: true });
  await d.waitForLog((e) => e.event === 'incoming-taken-over' && e.to === ja2.jobId);
  const failed = await waitForJob(b.admin, 'vm1', (j) => j.state === 'failed' || j.state === 'aborted', 60_000).catch((e: Error) => ({ state: 'failed', error: e.message }) as JobStatus);
  t.equal(failed.state, 'failed', 'the job that lost the destination stops instead of writing into it');
  t.match(String(failed.error), /bound to migration job|refused/, `B stopped: ${failed.error}`);
  t.not(jb.jobId, ja2.jobId);

  // A cuts over; the destination holds exactly A's disk.
  await waitForJob(a.admin, 'vm1', (j) => j.state === 'ready');
  await adminRequest(a.admin, { cmd: 'cutover', export: 'vm1' });
  await waitForJob(a.admin, 'vm1', (j) => j.state === 'completed');
  await d.stop();
  const cmp = await compare(a.img, dst);
  t.equal(cmp.code, 0, describeRun(cmp));
});

t.test('a completed destination restarted with --incoming serves as the live disk it is', async (t) => {
  const dir = await tmpDir(t);
  const a = await source(t, dir, 'a');
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  let d = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  await mirror(a.admin, d.uri('vm1'), { cutover: 'auto' });
  await waitForJob(a.admin, 'vm1', (j) => j.state === 'completed');
  t.notOk(fs.existsSync(`${dst}.nbd-migrate-incoming`), 'no incoming marker after completion');
  t.ok(fs.existsSync(`${dst}.nbd-migrate-received`), 'completion is recorded');
  await d.stop();
  d = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  t.ok(await d.waitForLog((e) => e.event === 'incoming-already-complete'), 'the restart says why --incoming is ignored');
  t.notOk(fs.existsSync(`${dst}.nbd-migrate-incoming`), 'not re-marked half-copied');
  const w = await guestWrite(d.uri('vm1'), 0x22, 0);
  t.equal(w.value.code, 0, `guests may attach: ${describeRun(w.value)}`);
});

t.test('a foreign target: its data is reported, and zeroing pays the rate limit', async (t) => {
  const dir = await tmpDir(t);
  const { admin } = await source(t, dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE, { fill: 'random' });
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  const st = await mirror(admin, `nbd://127.0.0.1:${port}/vm1`, { maxBandwidth: '1M' });
  t.equal(st.targetKind, 'foreign');
  t.equal(st.targetDataBytes, SIZE, 'status says the target already holds 32 MiB of data');
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, 1500));
  const s = await jobStatus(admin, 'vm1');
  const secs = (performance.now() - t0) / 1000 + 0.5;
  const moved = s.dataBytes + s.zeroBytes;
  // 1 MiB/s, a quarter second of burst, one 4 MiB data chunk of debt at most.
  t.ok(moved <= 1 * MiB * secs + 4.25 * MiB, `${moved} bytes written or zeroed in ${secs.toFixed(1)} s at 1 MiB/s (zeroed ${s.zeroBytes})`);
  await adminRequest(admin, { cmd: 'abort', export: 'vm1' });
});

t.test('a frozen target: guest writes and a cutover stay bounded, guests go back to the local image', async (t) => {
  const dir = await tmpDir(t);
  const { admin, s, img } = await source(t, dir);
  const { dst, port, q } = await qemuTarget(t, dir);
  await mirror(admin, `nbd://127.0.0.1:${port}/vm1`, { cutover: 'manual', cutoverTimeout: '2s' });
  await waitForJob(admin, 'vm1', (j) => j.state === 'ready' && j.convergence === 'active');
  q.proc.kill('SIGSTOP');

  // A cutover against the frozen target fails within its bound and gives guests back the local image.
  const t0 = performance.now();
  await adminRequest(admin, { cmd: 'cutover', export: 'vm1' });
  const failed = await s.waitForLog((e) => e.event === 'cutover-failed', 30_000);
  t.match(String(failed.cause), /2000 ms|--cutover-timeout/, `the cutover failed on its bound: ${failed.cause}`);
  t.ok(performance.now() - t0 < 15_000, 'within the bound (plus a busy machine)');
  const st = (await adminRequest(admin, { cmd: 'status' })) as { exports: Array<{ backend: string }> };
  t.equal(st.exports[0]!.backend, 'local', 'still on the local image');
  t.notOk(fs.existsSync(`${img}.nbd-migrate-fenced`), 'not fenced');

  // Write-through to the frozen target does not hold the guest: answered after the local write.
  const w = await guestWrite(s.uri('vm1'), 0x33, 1 * MiB);
  t.equal(w.value.code, 0, describeRun(w.value));
  t.ok(w.ms < 10_000, `guest write took ${Math.round(w.ms)} ms with the target frozen`);

  // And abort escapes whatever the job is doing now (reconnecting to the frozen target).
  const a = await timed(adminRequest(admin, { cmd: 'abort', export: 'vm1' }) as Promise<JobStatus>);
  t.equal(a.value.state, 'aborted');
  t.ok(a.ms < 5000, `abort took ${Math.round(a.ms)} ms`);
  const w2 = await guestWrite(s.uri('vm1'), 0x44, 2 * MiB);
  t.equal(w2.value.code, 0, describeRun(w2.value));
});

t.test('--target-timeout turns a frozen target into a reconnect; the job resumes on thaw', async (t) => {
  const dir = await tmpDir(t);
  const { admin, img } = await source(t, dir);
  const { dst, port, q } = await qemuTarget(t, dir);
  await mirror(admin, `nbd://127.0.0.1:${port}/vm1`, { cutover: 'auto', targetTimeout: '2s', maxBandwidth: '8M' });
  await waitForJob(admin, 'vm1', (j) => j.dataBytes > 0);
  q.proc.kill('SIGSTOP');
  const retrying = await waitForJob(admin, 'vm1', (j) => j.retrying, 60_000);
  t.equal(retrying.etaSeconds, null, 'no ETA while the target is away');
  t.equal(retrying.state, 'copying', 'retrying, not failed');
  q.proc.kill('SIGCONT');
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed', 120_000);
  t.ok(done.retries >= 0);
  await q.stop();
  const cmp = await compare(img, dst);
  t.equal(cmp.code, 0, describeRun(cmp));
});

t.test('abort returns within 5 s with the target frozen mid-copy', async (t) => {
  const dir = await tmpDir(t);
  const { admin, img } = await source(t, dir);
  const before = sha(img);
  const { dst, port, q } = await qemuTarget(t, dir);
  // Frozen as soon as the job has started: its first sweep's requests stay on the wire, unanswered.
  await mirror(admin, `nbd://127.0.0.1:${port}/vm1`);
  q.proc.kill('SIGSTOP');
  const a = await timed(adminRequest(admin, { cmd: 'abort', export: 'vm1' }) as Promise<JobStatus>);
  t.equal(a.value.state, 'aborted');
  t.ok(a.ms < 5000, `abort took ${Math.round(a.ms)} ms`);
  t.equal(sha(img), before, 'the source is exactly as it was');
  t.notOk(fs.existsSync(`${img}.nbd-migrate-fenced`));
});

t.test('transient target errors are retried; permanent ones fail the job at once with the reason', async (t) => {
  await requireTool('nbdkit', 'nbdkit');
  const dir = await tmpDir(t);
  const { admin, img } = await source(t, dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  // 5 % EIO on writes and zeroes: the job converges and completes.
  const port = await freePort();
  const flaky = await nbdkit(port, ['--filter=error', 'file', dst, 'error=EIO', 'error-pwrite-rate=5%', 'error-zero-rate=5%']);
  t.teardown(() => flaky.stop());
  await mirror(admin, `nbd://127.0.0.1:${port}/`, { cutover: 'auto' });
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed' || j.state === 'failed', 120_000);
  t.equal(done.state, 'completed', `completed despite EIO (error: ${done.error})`);
  await flaky.stop();
  const cmp = await compare(img, dst);
  t.equal(cmp.code, 0, describeRun(cmp));
});

t.test('ENOSPC from the target fails the job fast, naming the error', async (t) => {
  await requireTool('nbdkit', 'nbdkit');
  const dir = await tmpDir(t);
  const { admin } = await source(t, dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const full = await nbdkit(port, ['--filter=error', 'file', dst, 'error=ENOSPC', 'error-pwrite-rate=100%', 'error-zero-rate=100%']);
  t.teardown(() => full.stop());
  const t0 = performance.now();
  await mirror(admin, `nbd://127.0.0.1:${port}/`);
  const failed = await waitForJob(admin, 'vm1', (j) => j.state === 'failed', 60_000).catch((e: Error) => ({ state: 'failed', error: e.message, retries: 0 }) as JobStatus);
  const ms = performance.now() - t0;
  t.match(String(failed.error), /ENOSPC/, `the reason is given: ${failed.error}`);
  t.ok(ms < 10_000, `failed in ${Math.round(ms)} ms, without the reconnect backoff`);
});

t.test('the destination reports its free space; the job refuses a destination too small for the data', async (t) => {
  const dir = await tmpDir(t);
  const mnt = path.join(dir, 'small');
  fs.mkdirSync(mnt);
  const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=20m', 'tmpfs', mnt]);
  t.equal(m.code, 0, `a 20 MiB tmpfs for the destination: ${describeRun(m)}`);
  if (m.code !== 0) return;
  t.teardown(() => run('umount', ['-l', mnt]).then(() => undefined));
  const { admin } = await source(t, dir); // 16 MiB of data in 32 MiB
  const dst = await makeImage(path.join(mnt, 'dst.img'), SIZE);
  const d = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  // Fill the small filesystem first: 8 MiB of room, and the source holds 16 MiB of data.
  const filler = path.join(mnt, 'filler');
  fs.writeFileSync(filler, Buffer.alloc(12 * MiB, 1));
  await t.rejects(mirror(admin, d.uri('vm1')), { code: 'ENOSPC', message: /holds \d+ bytes of data/ });
  fs.rmSync(filler);
  // 20 MiB of room: the 16 MiB of data fit, the 32 MiB virtual size does not.
  await t.rejects(mirror(admin, d.uri('vm1'), { requireSpace: true }), { code: 'ENOSPC', message: /virtual size.*--require-space/ });
  const st = await mirror(admin, d.uri('vm1'));
  t.ok(st.targetFreeBytes !== null && st.targetFreeBytes <= 20 * MiB, `free space reported: ${st.targetFreeBytes}`);
  await adminRequest(admin, { cmd: 'abort', export: 'vm1' });
});

t.test('the fence marker is written while guests are held: if it cannot be, the cutover fails and guests stay', async (t) => {
  const dir = await tmpDir(t);
  const { admin, s, img } = await source(t, dir);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  await mirror(admin, `nbd://127.0.0.1:${port}/vm1`, { cutover: 'manual' });
  await waitForJob(admin, 'vm1', (j) => j.state === 'ready');
  // A directory where the marker goes: the atomic rename onto it fails.
  fs.mkdirSync(`${img}.nbd-migrate-fenced`);
  fs.writeFileSync(path.join(`${img}.nbd-migrate-fenced`, 'block'), '');
  await adminRequest(admin, { cmd: 'cutover', export: 'vm1' });
  await s.waitForLog((e) => e.event === 'cutover-failed', 30_000);
  const st = (await adminRequest(admin, { cmd: 'status' })) as { exports: Array<{ backend: string }>; jobs: JobStatus[] };
  t.equal(st.exports[0]!.backend, 'local', 'guests stay on the source');
  t.not(st.jobs[0]!.state, 'completed', 'the job did not complete unfenced');
  const w = await guestWrite(s.uri('vm1'), 0x55, 0);
  t.equal(w.value.code, 0, describeRun(w.value));
  await adminRequest(admin, { cmd: 'abort', export: 'vm1' });
  fs.rmSync(`${img}.nbd-migrate-fenced`, { recursive: true });
});
