// One owner per state folder (DIR/lock, an exclusive flock): two exports keeping
// their activity logs, bitmaps and mirror records in one folder would corrupt
// each other's crash recovery.
//   - A second server whose export maps to a folder another server holds
//     (same --state-dir, same export name, another image) refuses to start,
//     in one line naming the folder and the holder's pid; once the first has
//     stopped it starts.
//   - A reload that replaces an export (same name, another image, same
//     --state-dir) while the old one still serves a client defers the new one
//     (export-open-deferred) and opens it once the old one has closed and let
//     the folder go (export-open-resumed); nothing is lost from either.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { readRecovered } from '../../src/dirty/activity-log.js';
import { DEFAULT_GRANULARITY } from '../../src/dirty/bitmap.js';
import { StateFolder } from '../../src/dirty/state.js';
import { MiB, makeImage, serve, tmpDir, serveOnce, fatalCause } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';

const SIZE = 4 * MiB;



t.test('a second server on a state folder another one holds is refused, in one line', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), SIZE);
  const b = await makeImage(path.join(dir, 'b.img'), SIZE);
  const states = path.join(dir, 'states');
  const first = await serve(t, [a, '--name', 'vm1', '--state-dir', states]);
  const r = await serveOnce([b, '--name', 'vm1', '--state-dir', states]);
  t.not(r.code, 0, `the second server exits with an error\n${describeRun(r)}`);
  const cause = fatalCause(r.stderr) ?? '';
  t.match(cause, `export "vm1": its state folder ${path.join(states, 'vm1')} is in use by pid ${first.proc.pid} export "vm1" image ${a}`, 'naming the folder and its holder');
  t.match(cause, /--state-dir DIR, or state-dir= on the export/, 'and what to do');
  t.ok(fs.readFileSync(path.join(states, 'vm1', 'lock'), 'utf8').startsWith(`pid ${first.proc.pid} `), 'the lock file names the holder');
  // The first server's folder is untouched: its clean stop stores its bitmap there.
  const c = await NbdClient.connect(first.uri('vm1'));
  await c.write(MiB, [Buffer.alloc(4096, 7)], { fua: false });
  await c.close();
  await first.stop();
  const { bitmap } = readRecovered(StateFolder.open(path.join(states, 'vm1')), SIZE, DEFAULT_GRANULARITY);
  t.ok(bitmap.isDirty(MiB / DEFAULT_GRANULARITY) && bitmap.dirtyBlocks() === 1, 'the first server\'s bitmap is its own');
  const second = await serve(t, [b, '--name', 'vm1', '--state-dir', states]);
  t.ok(await second.waitForLog((e) => e.event === 'export-added'), 'once the first has stopped, the second starts');
});

t.test('a reload that replaces an export still serving a client opens the new one once the old one let the folder go', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), SIZE);
  const b = await makeImage(path.join(dir, 'b.img'), 2 * SIZE);
  const states = path.join(dir, 'states');
  const cfg = path.join(dir, 'config.json');
  fs.writeFileSync(cfg, JSON.stringify({ stateDir: states, exports: [{ name: 'vm1', path: a }] }));
  const s = await serve(t, ['--config', cfg]);
  const old = await NbdClient.connect(s.uri('vm1'));
  t.teardown(() => old.close().catch(() => undefined));
  await old.write(0, [Buffer.alloc(4096, 1)], { fua: false });

  fs.writeFileSync(cfg, JSON.stringify({ stateDir: states, exports: [{ name: 'vm1', path: b }] }));
  s.proc.kill('SIGHUP');
  const deferred = await s.waitForLog((e) => e.event === 'export-open-deferred');
  t.equal(deferred.image, b, 'the new export waits');
  t.match(String(deferred.cause), /in use by this server's previous export of that name/, 'for the retired one\'s folder');
  await s.waitForLog((e) => e.event === 'reloaded');
  t.notOk(s.logs.some((e) => e.event === 'export-added' && e.image === b), 'not opened beside the old one');
  // The old export goes on serving its client, with its activity log.
  await old.write(2 * MiB, [Buffer.alloc(4096, 2)], { fua: false });
  await old.flush();
  await old.close();

  const resumed = await s.waitForLog((e) => e.event === 'export-open-resumed', 10_000);
  t.equal(resumed.image, b, 'the new export opens once the old one has closed');
  const added = await s.waitForLog((e) => e.event === 'export-added' && e.image === b);
  t.equal(added.size, 2 * SIZE);
  const recovered = s.logs.filter((e) => e.event === 'dirty-recovered' && e.stateDir === path.join(states, 'vm1'));
  t.equal(recovered.length, 2, 'each export opened the folder in turn');
  t.equal(recovered[1]?.markedAll, 'the stored bitmap is for 4194304 bytes, the image has 8388608', 'the new one found the old one\'s bitmap stored whole (another size: every block dirty)');
  const c = await NbdClient.connect(s.uri('vm1'));
  t.equal(c.size, 2 * SIZE, 'clients now get the new image');
  await c.close();
});
