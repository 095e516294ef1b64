// Post-copy destinations set up without --fetch-from: one export from a
// --config file's `fetchFrom`, one from `--export NAME=PATH,fetch-from=URI`,
// in one server, both filling from one source under the shared
// --max-bandwidth, both completing with the source's bytes. A config file
// whose fetchFrom is no NBD URI is refused at startup in one line naming the field.
import t from 'tap';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { PostcopyStatus } from '../../src/migration/postcopy.js';
import { adminRequest } from '../helpers/admin.js';
import { MiB, makeImage, patternBuffer, readAt, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli } from './harness.js';

const SIZE = 8 * MiB;

t.test('a config file fetchFrom and an --export fetch-from= each make a post-copy destination', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-config-');
  const data1 = patternBuffer(6 * MiB, 11);
  const data2 = patternBuffer(3 * MiB, 12);
  const src1 = await makeImage(join(dir, 'src1.img'), SIZE);
  const src2 = await makeImage(join(dir, 'src2.img'), SIZE);
  await writeAt(src1, 0, data1);
  await writeAt(src2, 2 * MiB, data2);
  await makeImage(join(dir, 'dst1.img'), SIZE);
  const dst2 = await makeImage(join(dir, 'dst2.img'), SIZE);
  const source = await serve(t, [src1, src2, '--name', 'vm1', '--name', 'vm2', '--read-only']);

  const sock = join(dir, 'dst.sock');
  const cfg = join(dir, 'dst.json');
  // A relative path: taken from the config file's folder.
  await writeFile(cfg, JSON.stringify({ adminSocket: sock, exports: [{ name: 'vm1', path: 'dst1.img', fetchFrom: source.uri('vm1') }] }));
  const dst = await serve(t, ['--config', cfg, '--export', `vm2=${dst2},fetch-from=${source.uri('vm2')}`, '--max-bandwidth', '8M']);
  for (const name of ['vm1', 'vm2']) {
    const start = await dst.waitForLog((e) => e.event === 'postcopy-start' && e.export === name);
    t.ok(Number(start.absentBytes) > 0, `${name}: a post-copy destination with ${start.absentBytes} bytes absent`);
  }
  await Promise.all(['vm1', 'vm2'].map((name) => dst.waitForLog((e) => e.event === 'postcopy-completed' && e.export === name, 60_000)));
  for (const [name, src, img] of [['vm1', source.uri('vm1'), join(dir, 'dst1.img')], ['vm2', source.uri('vm2'), dst2]] as const) {
    const s = (await adminRequest(sock, { cmd: 'status', export: name })) as PostcopyStatus;
    t.equal(s.role, 'postcopy-destination', `${name}: status says post-copy destination`);
    t.equal(s.source, src, `${name}: fetching from ${src}`);
    t.equal(s.state, 'completed', `${name}: completed`);
    t.equal(s.maxBandwidth, 8 * MiB, `${name}: under the server's --max-bandwidth`);
    t.ok(s.fetched.fillBytes > 0, `${name}: the fill read ${s.fetched.fillBytes} bytes from the source`);
    const want = await readAt(name === 'vm1' ? src1 : src2, 0, SIZE);
    t.ok((await readAt(img, 0, SIZE)).equals(want), `${name}: the destination image equals its source`);
  }
});

t.test('a config file fetchFrom that is not an NBD URI is refused at startup, naming the field', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-config-');
  await makeImage(join(dir, 'dst.img'), SIZE);
  const cfg = join(dir, 'bad.json');
  await writeFile(cfg, JSON.stringify({ exports: [{ name: 'vm1', path: 'dst.img', fetchFrom: 'src.example:10809/vm1' }] }));
  const r = await cli(['serve', '--config', cfg, '--listen', '127.0.0.1', '--port', '0'], 30_000);
  t.not(r.code, 0, 'serve exits with an error', { diag: describeRun(r) });
  const lines = r.stderr.trim().split('\n');
  t.equal(lines.length, 1, 'one line, no stack trace', { diag: r.stderr });
  const fatal = JSON.parse(lines[0]!) as { event?: string; cause?: string };
  t.equal(fatal.event, 'fatal');
  t.match(fatal.cause, /bad\.json\.exports\[0\]\.fetchFrom: invalid NBD URI "src\.example:10809\/vm1"/, 'the message names the file, the field and the URI');
});
