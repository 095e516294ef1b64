// SIGTERM with the other side frozen never needs the shutdown backstop: after cutover, each
// switched export's final flush is bounded and the bounds run side by side; a post-copy
// destination gives up fetches its frozen source does not answer, and loses nothing by it.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest, waitForJob } from '../helpers/admin.js';
import { freePort } from '../helpers/net.js';
import { compare, qemuNbd } from '../helpers/peers.js';
import * as fs from 'node:fs';
import { makeImage, MiB, patternBuffer, serve, tmpDir, writeAt, type ServerHandle } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const SIZE = 8 * MiB;
const EXPORTS = ['vm1', 'vm2', 'vm3'];

const exitCode = (s: ServerHandle) => new Promise<number | null>((resolve) => (s.exited() ? resolve(s.exited()!.code) : s.proc.once('exit', (code) => resolve(code))));

t.test('frozen targets after cutover: the final flushes time out together and shutdown ends cleanly', async (t) => {
  const dir = await tmpDir(t);
  const admin = path.join(dir, 'admin.sock');
  const images: string[] = [];
  for (const name of EXPORTS) {
    const img = await makeImage(path.join(dir, `${name}.img`), SIZE);
    await writeAt(img, 0, patternBuffer(MiB, name.length));
    images.push(img);
  }
  const s = await serve(t, [...images, ...EXPORTS.flatMap((n) => ['--name', n]), '--admin-socket', admin, '--shutdown-timeout', '1']);
  const targets = [];
  for (const name of EXPORTS) {
    const port = await freePort();
    const q = await qemuNbd(await makeImage(path.join(dir, `${name}-dst.img`), SIZE), name, port);
    t.teardown(async () => {
      q.proc.kill('SIGCONT');
      await q.stop();
    });
    targets.push(q);
    await adminRequest(admin, { cmd: 'mirror', export: name, target: `nbd://127.0.0.1:${port}/${name}`, cutover: 'auto' });
  }
  for (const name of EXPORTS) await waitForJob(admin, name, (j) => j.state === 'completed', 60_000);
  for (const q of targets) q.proc.kill('SIGSTOP');

  s.proc.kill('SIGTERM');
  const stopped = await s.waitForLog((l) => l.event === 'stopped' || l.event === 'shutdown-forced', 120_000);
  const tail = stopped.event === 'stopped' ? '' : `\n${s.logs.slice(-25).map((l) => JSON.stringify(l).slice(0, 300)).join('\n')}`;
  t.equal(stopped.event, 'stopped', `the server stopped by itself, not by the shutdown backstop${tail}`);
  const timeouts = s.logs.filter((l) => l.event === 'flush-timeout');
  t.same(timeouts.map((l) => l.export).sort(), EXPORTS, 'each frozen export\'s flush timed out, and was reported');
  const at = timeouts.map((l) => Date.parse(String(l.time)));
  const spread = Math.max(...at) - Math.min(...at);
  // One after another they would be SHUTDOWN_FLUSH_MS (10 s) apart each.
  t.ok(at.length === EXPORTS.length && spread < 5000, `the flush bounds ran side by side: timeouts ${spread} ms apart`);
  t.equal(await exitCode(s), 0, 'exit 0');
  t.same(s.logs.filter((l) => /-failed$/.test(String(l.event))).map((l) => l.event), [], 'nothing else failed on the way out');
});

t.test('a post-copy destination whose source froze mid-fetch stops by itself, and resumes to an exact copy', async (t) => {
  const dir = await tmpDir(t);
  const src = await makeImage(path.join(dir, 'src.img'), 32 * MiB, { fill: 'random' });
  const dst = await makeImage(path.join(dir, 'dst.img'), 32 * MiB);
  const port = await freePort();
  const q = await qemuNbd(src, 'src', port, ['--read-only']);
  t.teardown(async () => {
    q.proc.kill('SIGCONT');
    await q.stop();
  });
  const fetchFrom = `nbd://127.0.0.1:${port}/src`;
  // Rate-limited, so the fill is still running when the source freezes.
  const d = await serve(t, [dst, '--name', 'vm1', '--fetch-from', fetchFrom, '--max-bandwidth', '4M', '--shutdown-timeout', '1']);
  await d.waitForLog((l) => l.event === 'source-connected', 30_000);
  q.proc.kill('SIGSTOP');
  // A guest read of a block not fetched yet: its fetch is on the wire, unanswered, when SIGTERM comes.
  const qemuIo = await requireTool('qemu-io', 'qemu-utils');
  const guest = run(qemuIo, ['-f', 'raw', '-c', `read ${30 * MiB} 64k`, d.uri('vm1')], { timeoutMs: 120_000 });
  // qemu-io sends its read as soon as it is in transmission; the drain (1 s) then waits on it.
  await d.waitForLog((l) => l.event === 'transmission', 30_000);
  d.proc.kill('SIGTERM');
  const stopped = await d.waitForLog((l) => l.event === 'stopped' || l.event === 'shutdown-forced', 120_000);
  t.equal(stopped.event, 'stopped', 'stopped by itself, not by the shutdown backstop');
  t.equal(await exitCode(d), 0, 'exit 0');
  t.not((await guest).code, 0, 'the guest read was not answered with data from nowhere');
  t.ok(fs.existsSync(path.join(`${dst}.nbd-migrate.d`, 'present-map')), 'the present-map was stored on the way out');

  // The source is back: the destination resumes from its map and becomes an exact copy.
  q.proc.kill('SIGCONT');
  const again = await serve(t, [dst, '--name', 'vm1', '--fetch-from', fetchFrom]);
  await again.waitForLog((l) => l.event === 'postcopy-completed', 120_000);
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, `identical to the source\n${describeRun(cmp)}`);
});
