// A host evacuation stopped with the server (SIGTERM: an upgrade, a restart)
// goes on after the restart with one command: the stopping server logs
// evacuation-resumable with the exports it had not finished (the one copying
// and the ones still queued) and the `ctl evacuate` line that takes them up
// again with the same budget and per-job options. Run after the restart, that
// line resumes the stopped job where it was (mirror-resumed: only what is left
// is copied) and starts the queued one; both end on the destination intact.
import t from 'tap';
import * as path from 'node:path';
import { makeImage, MiB, serve, startServer, tmpDir, type ServerHandle } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli, compare } from './harness.js';

const SIZE = 24 * MiB;
const NAMES = ['vm1', 'vm2'];

t.test('an evacuation stopped by SIGTERM goes on after the restart with the command it logged', async (t) => {
  const dir = await tmpDir(t, 'nbd-migrate-evac-resume-');
  const src: Record<string, string> = {};
  const dst: Record<string, string> = {};
  for (const n of NAMES) {
    src[n] = await makeImage(path.join(dir, `${n}.img`), SIZE, { fill: 'random' });
    dst[n] = await makeImage(path.join(dir, `${n}.dst.img`), SIZE);
  }
  const d = await serve(t, [...NAMES.map((n) => dst[n]!), ...NAMES.flatMap((n) => ['--name', n]), '--incoming']);
  const admin = path.join(dir, 'admin.sock');
  const servers = new Set<ServerHandle>();
  t.teardown(async () => {
    for (const s of servers) await s.stop();
  });
  const source = async () => {
    const s = await startServer([...NAMES.map((n) => src[n]!), ...NAMES.flatMap((n) => ['--name', n]), '--admin-socket', admin, '--log-level', 'debug']);
    servers.add(s);
    return s;
  };
  const to = `nbd://127.0.0.1:${d.newstylePort}/{name}`;

  const a = await source();
  const start = await cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--parallel', '1', '--max-bandwidth', '8M', '--cutover', 'auto', '--max-downtime', '200ms', '--handoff', 'forward']);
  t.equal(start.code, 0, describeRun(start));
  // vm1 copies (8 MiB/s: about 3 s for 24 MiB), vm2 waits in the queue; stop once a third of vm1 is stored.
  await a.waitForLog((l) => l.event === 'mirror-progress-saved' && l.export === 'vm1' && (l.bytesCopied as number) >= SIZE / 3, 60_000);
  await a.stop();
  servers.delete(a);
  t.equal(a.exited()?.code, 0, 'clean exit');
  const logged = a.logs.find((l) => l.event === 'evacuation-resumable');
  t.ok(logged, 'the stopping server logged evacuation-resumable');
  t.same(logged?.exports, NAMES, 'naming the export that was copying and the one still queued');
  const cmd = /`([^`]+)`/.exec(String(logged?.effect))?.[1] ?? '';
  t.match(cmd, `nbd-migrate ctl evacuate --to ${to} --exports vm1,vm2 --parallel 1 --max-bandwidth ${8 * MiB} --cutover auto --max-downtime 200ms --handoff forward`, 'with the command that takes them up, budget and job options included');
  t.ok(a.logs.some((l) => l.event === 'mirror-resumable' && l.export === 'vm1'), 'vm1 stopped resumably');

  const b = await source();
  // The logged command as the operator runs it (the test's socket added, and --wait).
  const argv = cmd.split(' ').slice(1);
  argv.splice(1, 0, '--socket', admin);
  const r = await cli([...argv, '--wait'], 120_000);
  t.equal(r.code, 0, `the logged command ran to the end\n${describeRun(r)}`);
  const resumed = b.logs.find((l) => l.event === 'mirror-resumed' && l.export === 'vm1');
  t.ok(resumed, 'vm1 resumed its stopped job');
  t.ok((resumed?.dirtyBytes as number) < SIZE * 0.75, `and had only what was left to copy (${resumed?.dirtyBytes as number} of ${SIZE} bytes dirty)`);
  t.notOk(b.logs.some((l) => l.event === 'mirror-resumed' && l.export === 'vm2'), 'vm2 had no job to resume: it started');
  for (const n of NAMES) {
    const c = await compare(src[n]!, dst[n]!);
    t.equal(c.code, 0, `${n} arrived intact\n${describeRun(c)}`);
  }
});
