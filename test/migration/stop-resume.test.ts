// A clean stop of the source (SIGTERM: an upgrade, a service restart) leaves a
// running mirror resumable, as a crash does: the job stops, the target is
// flushed, the bitmap and the record (state "stopped") are stored, and the
// --incoming destination stays bound to the job (no MIGRATE_RELEASE). The
// restarted source logs mirror-resumable; `ctl mirror vm1 URI` picks the job
// up and copies only what is left. `ctl abort` is the way that releases.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { adminRequest, jobStatus, waitForJob, type JobStatus } from '../helpers/admin.js';
import { describeRun } from '../helpers/tools.js';
import { makeImage, MiB, patternBuffer, startServer, tmpDir, writeAt, type ServerHandle } from '../helpers/server.js';
import { compare, freePort } from './harness.js';

const SIZE = 64 * MiB;

async function setup(t: Tap.Test) {
  const dir = await tmpDir(t, 'nbd-migrate-stop-');
  const src = await makeImage(path.join(dir, 'src.img'), SIZE);
  for (let off = 0; off < SIZE; off += 4 * MiB) await writeAt(src, off, patternBuffer(4 * MiB, off + 1));
  const shadow = path.join(dir, 'shadow.img');
  fs.copyFileSync(src, shadow);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const servers = new Set<ServerHandle>();
  t.teardown(async () => {
    for (const s of servers) await s.stop();
  });
  let seq = 0;
  const source = async () => {
    const admin = path.join(dir, `admin${seq++}.sock`);
    const s = await startServer([src, '--name', 'vm1', '--admin-socket', admin, '--log-level', 'debug']);
    servers.add(s);
    return { s, admin };
  };
  const destination = async () => {
    const s = await startServer([dst, '--name', 'vm1', '--incoming', '--port', String(port)]);
    servers.add(s);
    return s;
  };
  const stop = async (s: ServerHandle) => {
    await s.stop(); // SIGTERM, and waits for the exit
    servers.delete(s);
  };
  return { dir, src, shadow, dst, target: `nbd://127.0.0.1:${port}/vm1`, source, destination, stop, record: path.join(`${src}.nbd-migrate.d`, 'mirror.json') };
}

const copied = (j: JobStatus) => j.dataBytes + j.zeroBytes;

t.test('SIGTERM stops a mirror resumably; the restarted source resumes it and copies only what is left', async (t) => {
  const e = await setup(t);
  const dst = await e.destination();
  const a = await e.source();
  const st = (await adminRequest(a.admin, { cmd: 'mirror', export: 'vm1', target: e.target, cutover: 'manual', maxBandwidth: '8M' })) as JobStatus;
  await a.s.waitForLog((l) => l.event === 'mirror-progress-saved' && (l.bytesCopied as number) >= 0.3 * SIZE, 60_000);
  // A guest change into the part already copied: it must be copied again after the restart.
  const c = await NbdClient.connect(a.s.uri('vm1'));
  const data = patternBuffer(MiB, 91);
  await c.write(0, [data], { fua: false });
  await c.flush();
  await c.close();
  await writeAt(e.shadow, 0, data);
  const before = await jobStatus(a.admin, 'vm1');

  await e.stop(a.s);
  t.equal(a.s.exited()?.code, 0, 'clean exit');
  const stopped = a.s.logs.find((l) => l.event === 'mirror-resumable');
  t.ok(stopped, 'the stopping source logged mirror-resumable');
  t.match(stopped?.effect, `nbd-migrate ctl mirror vm1 ${e.target}`, 'with the command that resumes it');
  t.equal(stopped?.targetFlushed, true, 'the target was flushed before the bitmap was stored');
  t.notOk(a.s.logs.some((l) => l.event === 'destination-released'), 'the destination was not released');
  t.notOk(dst.logs.some((l) => l.event === 'incoming-released'), 'the destination is still bound to the job');
  const rec = JSON.parse(fs.readFileSync(e.record, 'utf8')) as { jobId: string; state: string };
  t.match(rec, { jobId: st.jobId, state: 'stopped' }, 'the record is kept, marked stopped');

  const b = await e.source();
  const resumable = await b.s.waitForLog((l) => l.event === 'mirror-resumable');
  t.match(resumable, { job: st.jobId, target: e.target, state: 'stopped' }, 'the restarted source knows the stopped job');
  const recovered = await b.s.waitForLog((l) => l.event === 'dirty-recovered');
  t.equal(recovered.clean, true, 'a clean stop: the exact bitmap, nothing from the log');
  t.ok((recovered.dirtyBytes as number) < SIZE - 0.25 * SIZE, `the stored bitmap keeps the progress (${recovered.dirtyBytes} bytes dirty)`);
  const again = (await adminRequest(b.admin, { cmd: 'mirror', export: 'vm1', target: e.target, cutover: 'auto' })) as JobStatus;
  t.equal(again.jobId, st.jobId, 'ctl mirror with the same URI resumes the job');
  await b.s.waitForLog((l) => l.event === 'mirror-resumed');
  const done = await waitForJob(b.admin, 'vm1', (j) => j.state === 'completed', { what: 'the resumed job' });
  t.ok(copied(done) <= SIZE - copied(before) + 2 * MiB, `copied ${copied(done)} after the restart, ${copied(before)} before the stop`);
  t.ok(copied(done) >= MiB, 'at least the changed MiB');
  const cmp = await compare(e.shadow, e.target);
  t.equal(cmp.code, 0, `the destination holds the disk, the change included\n${describeRun(cmp)}`);
  t.notOk(fs.existsSync(e.record), 'a completed job leaves no record');
});

t.test('ctl abort still releases the destination and drops the record; a restart has nothing to resume', async (t) => {
  const e = await setup(t);
  const dst = await e.destination();
  const a = await e.source();
  await adminRequest(a.admin, { cmd: 'mirror', export: 'vm1', target: e.target, cutover: 'manual', maxBandwidth: '8M' });
  await a.s.waitForLog((l) => l.event === 'mirror-progress-saved' && (l.bytesCopied as number) > 0, 60_000);
  await adminRequest(a.admin, { cmd: 'abort', export: 'vm1' });
  await dst.waitForLog((l) => l.event === 'incoming-released', 10_000);
  t.notOk(fs.existsSync(e.record), 'the record is removed');
  await e.stop(a.s);
  t.notOk(a.s.logs.some((l) => l.event === 'mirror-resumable'), 'nothing resumable at the stop');
  const b = await e.source();
  await b.s.waitForLog((l) => l.event === 'dirty-recovered');
  t.notOk(b.s.logs.some((l) => l.event === 'mirror-resumable'), 'nor after the restart');
});
