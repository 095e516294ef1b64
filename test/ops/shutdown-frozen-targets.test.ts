// SIGTERM after cutover, with every target frozen: each switched export's final flush is bounded,
// the bounds run side by side (not one after another), and the process stops by itself, exit 0.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest, waitForJob } from '../helpers/admin.js';
import { freePort } from '../helpers/net.js';
import { qemuNbd } from '../helpers/peers.js';
import { makeImage, MiB, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';

const SIZE = 8 * MiB;
const EXPORTS = ['vm1', 'vm2', 'vm3'];

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
  const exit = await new Promise<number | null>((resolve) => (s.exited() ? resolve(s.exited()!.code) : s.proc.once('exit', (code) => resolve(code))));
  t.equal(exit, 0, 'exit 0');
  t.same(s.logs.filter((l) => /-failed$/.test(String(l.event))).map((l) => l.event), [], 'nothing else failed on the way out');
});
