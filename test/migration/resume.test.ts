// Resume after a restart (issue 12.2): a mirror whose source is killed with
// SIGKILL half-way is picked up by `ctl mirror vm1 URI` after the restart
// (same job id, so the --incoming destination, still bound to it, admits it)
// and copies only what was never copied plus what the guest changed: the
// bytes it copies are compared with a fresh mirror's. Resuming into another
// disk behind the same address is refused; --force starts afresh. A job that
// failed on the target side keeps its bitmap across a clean source restart.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { adminRequest, jobStatus, waitForJob, type JobStatus } from '../helpers/admin.js';
import { describeRun } from '../helpers/tools.js';
import { makeImage, MiB, patternBuffer, startServer, tmpDir, writeAt, type ServerHandle } from '../helpers/server.js';
import { compare, freePort } from './harness.js';

const SIZE = 64 * MiB;
const BANDWIDTH = '8M';

interface Pair {
  dir: string;
  src: string;
  shadow: string;
  dst: string;
  dstPort: number;
  target: string;
  servers: Set<ServerHandle>;
}

async function pair(t: Tap.Test): Promise<Pair> {
  const dir = await tmpDir(t, 'nbd-migrate-resume-');
  const src = await makeImage(path.join(dir, 'src.img'), SIZE);
  for (let off = 0; off < SIZE; off += 4 * MiB) await writeAt(src, off, patternBuffer(4 * MiB, off + 1));
  const shadow = path.join(dir, 'shadow.img');
  fs.copyFileSync(src, shadow);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const dstPort = await freePort();
  const servers = new Set<ServerHandle>();
  t.teardown(async () => {
    for (const s of servers) await s.stop();
  });
  return { dir, src, shadow, dst, dstPort, target: `nbd://127.0.0.1:${dstPort}/vm1`, servers };
}

let adminSeq = 0;
async function source(p: Pair): Promise<{ s: ServerHandle; admin: string }> {
  const admin = path.join(p.dir, `admin${adminSeq++}.sock`);
  const s = await startServer([p.src, '--name', 'vm1', '--admin-socket', admin, '--log-level', 'debug']);
  p.servers.add(s);
  return { s, admin };
}

async function destination(p: Pair, image = p.dst): Promise<ServerHandle> {
  const s = await startServer([image, '--name', 'vm1', '--incoming', '--port', String(p.dstPort)]);
  p.servers.add(s);
  return s;
}

async function kill9(p: Pair, s: ServerHandle): Promise<void> {
  const gone = new Promise<void>((r) => (s.exited() ? r() : s.proc.once('exit', () => r())));
  s.proc.kill('SIGKILL');
  await gone;
  p.servers.delete(s);
}

async function stop(p: Pair, s: ServerHandle): Promise<void> {
  await s.stop();
  p.servers.delete(s);
}

/** The guest changes 1 MiB at `offset` through the export (and in the shadow). */
async function guestWrite(p: Pair, s: ServerHandle, offset: number, seed: number): Promise<void> {
  const c = await NbdClient.connect(s.uri('vm1'));
  const data = patternBuffer(MiB, seed);
  await c.write(offset, [data], { fua: false });
  await c.flush();
  await c.close();
  await writeAt(p.shadow, offset, data);
}

/** Starts a rate-limited mirror and waits until a stored bitmap shows at least `fraction` of the disk copied. */
async function mirrorUntil(s: ServerHandle, admin: string, target: string, fraction: number): Promise<string> {
  const st = (await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target, cutover: 'manual', maxBandwidth: BANDWIDTH })) as JobStatus;
  await s.waitForLog((e) => e.event === 'mirror-progress-saved' && (e.bytesCopied as number) >= fraction * SIZE, 60_000);
  return st.jobId;
}

const copied = (j: JobStatus) => j.dataBytes + j.zeroBytes;

t.test('a mirror killed half-way resumes after the restart and copies only what is left', async (t) => {
  const p = await pair(t);
  const dst = await destination(p);
  const a = await source(p);
  const jobId = await mirrorUntil(a.s, a.admin, p.target, 0.4);
  await guestWrite(p, a.s, 0, 77); // into the part already copied: must be copied again
  const before = await jobStatus(a.admin, 'vm1');
  t.ok(before.state === 'copying' && copied(before) < SIZE, `killed while copying (${copied(before)} of ${SIZE} bytes copied)`);
  await kill9(p, a.s);

  const b = await source(p);
  const resumable = await b.s.waitForLog((e) => e.event === 'mirror-resumable');
  t.equal(resumable.job, jobId, 'the restarted source knows the unfinished job');
  t.equal(resumable.target, p.target);
  const recovered = await b.s.waitForLog((e) => e.event === 'dirty-recovered');
  t.equal(recovered.clean, false, 'recovered after a crash');
  t.ok((recovered.dirtyBytes as number) < SIZE, `the recovered bitmap is not the whole disk (${recovered.dirtyBytes} bytes dirty)`);
  await guestWrite(p, b.s, 60 * MiB, 78); // a change after the restart, in a part maybe not copied yet

  const started = (await adminRequest(b.admin, { cmd: 'mirror', export: 'vm1', target: p.target, cutover: 'auto' })) as JobStatus;
  t.equal(started.jobId, jobId, 'ctl mirror with the same URI resumes the job (same id)');
  await b.s.waitForLog((e) => e.event === 'mirror-resumed');
  const done = await waitForJob(b.admin, 'vm1', (j) => j.state === 'completed', { what: 'the resumed job to complete' });
  const resumedBytes = copied(done);
  const cmp = await compare(p.shadow, p.target);
  t.equal(cmp.code, 0, `the destination holds the disk, changes included\n${describeRun(cmp)}`);
  t.notOk(fs.existsSync(path.join(`${p.src}.nbd-migrate.d`, 'mirror.json')), 'a completed job leaves no record');
  await stop(p, dst);

  // A fresh mirror of the same disk, for comparison.
  const q = await pair(t);
  fs.copyFileSync(p.shadow, q.src);
  await destination(q);
  const c = await source(q);
  await adminRequest(c.admin, { cmd: 'mirror', export: 'vm1', target: q.target, cutover: 'auto' });
  const fresh = await waitForJob(c.admin, 'vm1', (j) => j.state === 'completed', { what: 'the fresh job to complete' });
  const freshBytes = copied(fresh);
  t.comment(`bytes copied: resumed mirror ${resumedBytes}, fresh mirror ${freshBytes} (${((100 * resumedBytes) / freshBytes).toFixed(0)} %); ${copied(before)} copied before the kill`);
  t.ok(resumedBytes < freshBytes * 0.75, `the resumed mirror copied less (${resumedBytes}) than a fresh one (${freshBytes})`);
  t.ok(resumedBytes >= 2 * MiB, 'and at least the two changed MiB');
});

t.test('resuming into another disk behind the same address is refused; --force starts afresh', async (t) => {
  const p = await pair(t);
  const dst = await destination(p);
  const a = await source(p);
  await mirrorUntil(a.s, a.admin, p.target, 0.2);
  await kill9(p, a.s);
  await stop(p, dst);
  // Another, empty destination on the same port: a resumed job would leave it without the copied part.
  const other = await makeImage(path.join(p.dir, 'other.img'), SIZE);
  await destination(p, other);
  const b = await source(p);
  await b.s.waitForLog((e) => e.event === 'mirror-resumable');
  const refused = await adminRequest(b.admin, { cmd: 'mirror', export: 'vm1', target: p.target, cutover: 'auto' }).then(
    () => undefined,
    (e: Error) => e,
  );
  t.ok(refused, 'ctl mirror is refused');
  t.match(refused?.message, /not the destination this job was copying to|holds no earlier copy/, 'naming why');
  t.match(refused?.message, /--force/, 'and what to do');
  await adminRequest(b.admin, { cmd: 'mirror', export: 'vm1', target: p.target, cutover: 'auto', force: true });
  const done = await waitForJob(b.admin, 'vm1', (j) => j.state === 'completed', { what: 'the forced fresh job' });
  t.equal(copied(done), SIZE, '--force copied the whole disk again');
  const cmp = await compare(p.shadow, p.target);
  t.equal(cmp.code, 0, describeRun(cmp));
});

t.test('a job that failed on the target side keeps its bitmap across a clean source restart', async (t) => {
  const p = await pair(t);
  const dst = await destination(p);
  const a = await source(p);
  const st = (await adminRequest(a.admin, { cmd: 'mirror', export: 'vm1', target: p.target, cutover: 'manual', maxBandwidth: BANDWIDTH, maxRetries: 1 })) as JobStatus;
  await a.s.waitForLog((e) => e.event === 'mirror-progress-saved' && (e.bytesCopied as number) >= 0.3 * SIZE, 60_000);
  await kill9(p, dst); // the target side dies; the job gives up after one retry
  const failed = await waitForJob(a.admin, 'vm1', (j) => j.state === 'failed', { failOn: [], what: 'the job to fail' });
  await stop(p, a.s); // a clean restart of the source
  await destination(p); // the destination comes back, still bound to the job
  const b = await source(p);
  const resumable = await b.s.waitForLog((e) => e.event === 'mirror-resumable');
  t.equal(resumable.state, 'failed');
  t.equal(resumable.job, st.jobId);
  const again = (await adminRequest(b.admin, { cmd: 'mirror', export: 'vm1', target: p.target, cutover: 'auto' })) as JobStatus;
  t.equal(again.jobId, st.jobId, 'resumed under the same id');
  const done = await waitForJob(b.admin, 'vm1', (j) => j.state === 'completed', { what: 'the resumed job' });
  t.ok(copied(done) <= SIZE - copied(failed) + 8 * MiB, `copied ${copied(done)} after the restart, ${copied(failed)} before the failure`);
  const cmp = await compare(p.shadow, p.target);
  t.equal(cmp.code, 0, describeRun(cmp));
});
