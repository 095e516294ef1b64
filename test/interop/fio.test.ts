// fio (Debian fio) with its nbd ioengine (libnbd) against nbd-migrate:
// verified random and sequential writes, several connections at once, and a
// separate verify-only pass that must also catch corruption made behind the
// server's back (proving the verification really reads through NBD).

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const fio = await requireTool('fio', 'fio');

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

/** Run fio in `cwd` (it may leave *-verify.state files there). */
async function runFio(cwd: string, args: string[]): Promise<{ code: number | null; jobs: FioJob[]; output: string }> {
  const r = await run(fio, ['--output-format=json', '--verify_state_save=0', ...args], { timeoutMs: 180_000, cwd });
  // The nbd engine prints "fio: connected to NBD server" before the JSON.
  const start = r.stdout.indexOf('\n{');
  const text = r.stdout.startsWith('{') ? r.stdout : start >= 0 ? r.stdout.slice(start + 1) : '';
  let jobs: FioJob[] = [];
  try {
    jobs = (JSON.parse(text) as { jobs: FioJob[] }).jobs;
  } catch {
    /* left empty: the assertions below fail with the output attached */
  }
  return { code: r.timedOut ? null : r.code, jobs, output: describeRun(r) };
}

t.test('fio nbd engine with verification', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 96 * MiB);
  const srv = await serve(t, [img, '--name', 'vm1']);
  const uri = srv.uri('vm1');
  const common = ['--ioengine=nbd', `--uri=${uri}`, '--verify_fatal=1', '--exitall_on_error=1'];

  t.test('random 4k writes, iodepth 16, crc32c verify', async (t) => {
    const r = await runFio(dir, [
      '--name=v',
      ...common,
      '--rw=randwrite',
      '--bs=4k',
      '--size=16M',
      '--iodepth=16',
      '--verify=crc32c',
      '--do_verify=1',
    ]);
    t.equal(r.code, 0, 'fio exits 0', { output: r.output });
    t.equal(r.jobs.length, 1, 'one job reported', { output: r.output });
    t.equal(r.jobs[0]?.error, 0, 'no job error');
    t.equal(r.jobs[0]?.write.io_bytes, 16 * MiB, '16 MiB written');
    t.equal(r.jobs[0]?.read.io_bytes, 16 * MiB, '16 MiB read back and verified');
    t.notMatch(r.output, /verify failed|bad magic|crc32c: verify/i, 'no verify errors');
  });

  t.test('sequential 1M writes (md5 verify) in the second 32 MiB', async (t) => {
    const r = await runFio(dir, [
      '--name=seq',
      ...common,
      '--rw=write',
      '--bs=1M',
      '--offset=32M',
      '--size=32M',
      '--iodepth=4',
      '--verify=md5',
      '--do_verify=1',
    ]);
    t.equal(r.code, 0, 'fio exits 0', { output: r.output });
    t.equal(r.jobs[0]?.error, 0, 'no job error');
    t.equal(r.jobs[0]?.write.io_bytes, 32 * MiB, '32 MiB written');
    t.equal(r.jobs[0]?.read.io_bytes, 32 * MiB, '32 MiB verified');
  });

  t.test('two jobs (two connections) on disjoint ranges, mixed block sizes', async (t) => {
    const r = await runFio(dir, [
      '--name=multi',
      ...common,
      '--numjobs=2',
      '--offset=64M',
      '--offset_increment=16M',
      '--size=16M',
      '--rw=randwrite',
      '--bsrange=512-64k',
      '--iodepth=8',
      '--verify=crc32c',
      '--do_verify=1',
      '--group_reporting=0',
    ]);
    t.equal(r.code, 0, 'fio exits 0', { output: r.output });
    t.equal(r.jobs.length, 2, 'two jobs', { output: r.output });
    for (const j of r.jobs) {
      t.equal(j.error, 0, `job ${j.jobname}: no error`);
      t.equal(j.write.io_bytes, 16 * MiB, `job ${j.jobname}: 16 MiB written`);
    }
  });

  t.test('write, then verify in a separate run over a new connection; corruption is detected', async (t) => {
    const job = [
      '--name=w',
      ...common,
      '--rw=randwrite',
      '--bs=64k',
      '--offset=16M',
      '--size=16M',
      '--iodepth=8',
      '--verify=crc32c',
    ];
    const w = await runFio(dir, [...job, '--do_verify=0']);
    t.equal(w.code, 0, 'write pass exits 0', { output: w.output });
    t.equal(w.jobs[0]?.write.io_bytes, 16 * MiB);
    const v = await runFio(dir, [...job, '--verify_only=1']);
    t.equal(v.code, 0, 'verify-only pass exits 0', { output: v.output });
    t.equal(v.jobs[0]?.error, 0, 'no verify error');
    t.equal(v.jobs[0]?.read.io_bytes, 16 * MiB, '16 MiB verified');

    // Corrupt one block in the image file; the next verify pass must fail.
    await writeAt(img, 20 * MiB + 100, Buffer.from('garbage!'));
    const bad = await runFio(dir, [...job, '--verify_only=1']);
    t.not(bad.code, 0, 'verify-only pass fails after corruption', { output: bad.output });
    t.match(bad.output, /verify failed at file .* offset 20971520/, 'fio names the corrupted block');
  });
});
