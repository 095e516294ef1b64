// serve --on-cutover CMD (issue 11.3): after a cutover that switched an
// export, the operator's command runs with the export, its address and the
// target in its environment; its outcome is in the log and in the job's
// status; a failure (exit code, stderr tail) or a command that runs too long
// (killed at --on-cutover-timeout) is reported, and the cutover stands.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { waitForJob, type JobStatus } from '../helpers/admin.js';
import { freePort } from '../helpers/net.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli } from './harness.js';

async function migrate(t: Tap, hookArgs: string[], listen = true) {
  const dir = await tmpDir(t);
  const src = await makeImage(path.join(dir, 'src.img'), 4 * MiB, { fill: 'random' });
  const dst = await makeImage(path.join(dir, 'dst.img'), 4 * MiB);
  const admin = path.join(dir, 'admin.sock');
  const port = await freePort();
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  const spec = listen ? `vm1=${src},listen=127.0.0.1:${port}` : `vm1=${src}`;
  const srcSrv = await serve(t, ['--export', spec, '--admin-socket', admin, ...hookArgs]);
  const target = dstSrv.uri('vm1');
  // As the operator would: ctl mirror --wait follows the job to its end, the command included.
  const ctl = await cli(['ctl', '--socket', admin, 'mirror', 'vm1', target, '--cutover', 'auto', '--handoff', 'disconnect', '--wait']);
  const ended = await srcSrv.waitForLog((e) => e.event === 'on-cutover-done' || e.event === 'on-cutover-failed', 20_000);
  const status = await waitForJob(admin, 'vm1', (j) => j.onCutover !== null && j.onCutover.state !== 'running');
  return { dir, port, target, srcSrv, ended, status, ctl };
}
type Tap = typeof t;

t.test('the command runs after the handoff with the export, its address and the target in its environment', async (t) => {
  const out = path.join(await tmpDir(t), 'env.txt');
  const m = await migrate(t, ['--on-cutover', `env | grep ^NBD_MIGRATE_ | sort > ${out}; echo moved`]);
  t.equal(m.ended.event, 'on-cutover-done', 'logged as done');
  t.equal(m.ctl.code, 0, 'ctl mirror --wait succeeded', { diag: describeRun(m.ctl) });
  t.match(m.ctl.stdout, /on-cutover: done in \d+ ms/, 'and said the command ran');
  const env = Object.fromEntries(fs.readFileSync(out, 'utf8').trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  t.match(env, {
    NBD_MIGRATE_EXPORT: 'vm1',
    NBD_MIGRATE_LISTEN: `127.0.0.1:${m.port}`,
    NBD_MIGRATE_LISTEN_HOST: '127.0.0.1',
    NBD_MIGRATE_LISTEN_PORT: String(m.port),
    NBD_MIGRATE_TARGET: m.target,
    NBD_MIGRATE_JOB: m.status.jobId,
    NBD_MIGRATE_HANDOFF: 'disconnect',
  }, 'its environment');
  t.ok(env.NBD_MIGRATE_IMAGE?.endsWith('src.img'), 'NBD_MIGRATE_IMAGE is the source image');
  t.match(m.status.onCutover, { state: 'ok', exitCode: 0, timedOut: false }, "the job's status has its outcome");
  t.equal(m.ended.stdoutTail, 'moved', 'its output is in the log');
  const order = m.srcSrv.logs.map((e) => e.event);
  t.ok(order.indexOf('listener-closed') < order.indexOf('on-cutover-started'), "the export's own listener was closed before the command ran");
});

const failures: Array<[string, string[], (t: Tap, s: JobStatus['onCutover'], e: Record<string, unknown>) => void]> = [
  [
    'a command that fails is reported with its exit code and the tail of its stderr',
    ['--on-cutover', 'echo moving the address >&2; echo "RTNETLINK answers: Cannot assign requested address" >&2; exit 3'],
    (t, s, e) => {
      t.match(s, { state: 'failed', exitCode: 3, timedOut: false });
      t.match(s?.stderrTail, /moving the address\nRTNETLINK answers: Cannot assign requested address$/);
      t.match(e, { level: 'error', exitCode: 3, cause: /exited with code 3/ });
    },
  ],
  [
    'a command that runs past --on-cutover-timeout is killed and reported',
    ['--on-cutover', 'echo started >&2; exec sleep 60', '--on-cutover-timeout', '0.5'],
    (t, s, e) => {
      t.match(s, { state: 'failed', exitCode: null, signal: 'SIGTERM', timedOut: true, stderrTail: 'started' });
      t.ok((s?.durationMs ?? Infinity) < 5000, `killed after ${s?.durationMs} ms`);
      t.match(e, { level: 'error', timedOut: true, cause: /did not finish within 500 ms/ });
    },
  ],
];
for (const [name, args, check] of failures) {
  t.test(name, async (t) => {
    const m = await migrate(t, args, false);
    t.equal(m.ended.event, 'on-cutover-failed', 'logged as failed');
    t.equal(m.ctl.code, 1, 'ctl mirror --wait exits 1', { diag: describeRun(m.ctl) });
    t.match(m.ctl.stderr, /^on-cutover failed: (exit code 3: moving the address \/ RTNETLINK|killed after \d+ ms)/m, 'and says why');
    check(t, m.status.onCutover, m.ended);
    t.equal(m.status.state, 'completed', 'the cutover stands');
    t.equal(m.ended.export, 'vm1', 'the log line names the export');
  });
}
