// The activity log's counters per export in `ctl status --json` and in the
// metrics: extents logged, syncs (slot writes), checkpoints. With a 64 KiB
// extent and a log of 1018 extents (--activity-log-extents), one write into each
// of 1,100 extents overflows the log, so it checkpoints; writes into extents
// already logged cost nothing.
import t from 'tap';
import * as path from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { SLOT_CAPACITY, type ActivityLogStatus as LogStatus } from '../../src/dirty/activity-log.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { cli } from '../migration/harness.js';
import { describeRun } from '../helpers/tools.js';

const KiB = 1024;
const EXTENT = 64 * KiB;
const EXTENTS = 1100;

async function status(admin: string): Promise<{ exports: Array<{ name: string; activityLog: LogStatus | null }> }> {
  const r = await cli(['ctl', '--socket', admin, 'status', '--json']);
  if (r.code !== 0) throw new Error(describeRun(r));
  return JSON.parse(r.stdout) as { exports: Array<{ name: string; activityLog: LogStatus | null }> };
}

function value(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

t.test('ctl status --json and the metrics show the activity log counters', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'disk.img'), EXTENTS * EXTENT);
  const ro = await makeImage(path.join(dir, 'ro.img'), MiB);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [img, '--name', 'vm1', '--activity-extent', '64K', '--activity-log-extents', String(SLOT_CAPACITY), '--export', `ro=${ro},read-only`, '--metrics', '127.0.0.1:0', '--admin-socket', admin]);
  const m = await s.waitForLog((e) => e.event === 'listening' && e.listener === 'metrics');

  const first = await status(admin);
  t.match(first.exports.find((e) => e.name === 'vm1')?.activityLog, { extentBytes: EXTENT, activeExtents: 0, extentsLogged: 0, checkpoints: 0, failed: false }, 'a fresh log');
  t.equal(first.exports.find((e) => e.name === 'ro')?.activityLog, null, 'a read-only export has no log');

  const c = await NbdClient.connect(s.uri('vm1'));
  t.teardown(() => c.close().catch(() => undefined));
  const block = Buffer.alloc(4 * KiB, 0x5a);
  // Ten writes into the same extent: one extent logged.
  for (let i = 0; i < 10; i++) await c.write(i * 4 * KiB, [block], { fua: false });
  const one = (await status(admin)).exports.find((e) => e.name === 'vm1')!.activityLog!;
  t.equal(one.extentsLogged, 1, 'ten writes into one extent log it once');
  t.equal(one.activeExtents, 1);
  t.ok(one.syncs >= 1, `synced (${one.syncs})`);
  // One write into each of the other extents: more than a slot holds.
  for (let e = 1; e < EXTENTS; e++) await c.write(e * EXTENT, [block], { fua: false });
  const all = (await status(admin)).exports.find((e) => e.name === 'vm1')!.activityLog!;
  t.ok(all.checkpoints >= 1, `the full log checkpointed (${all.checkpoints})`);
  t.ok(all.extentsLogged >= EXTENTS, `every extent was logged (${all.extentsLogged})`);
  t.ok(all.activeExtents <= SLOT_CAPACITY, `the log holds at most its capacity (${all.activeExtents})`);
  t.equal(all.capacity, SLOT_CAPACITY, 'its capacity, as asked');
  t.ok(all.syncs >= all.checkpoints + 1 && all.syncs <= all.waits + all.checkpoints + 1, `syncs ${all.syncs}: batched, at most one per waiting change`);

  const text = await (await fetch(`http://127.0.0.1:${m.port as number}/metrics`)).text();
  t.equal(value(text, 'nbd_migrate_activity_log_extents_logged_total{export="vm1"}'), all.extentsLogged, 'metrics: extents logged');
  t.equal(value(text, 'nbd_migrate_activity_log_syncs_total{export="vm1"}'), all.syncs, 'metrics: syncs');
  t.equal(value(text, 'nbd_migrate_activity_log_checkpoints_total{export="vm1"}'), all.checkpoints, 'metrics: checkpoints');
  t.equal(value(text, 'nbd_migrate_activity_log_active_extents{export="vm1"}'), all.activeExtents, 'metrics: extents in the log');
  t.notMatch(text, /activity_log_[a-z_]+\{export="ro"\}/, 'no series for an export without a log');

  // The plain table says the same in its ACTIVITY LOG column.
  const plain = await cli(['ctl', '--socket', admin, 'status']);
  t.equal(plain.code, 0, describeRun(plain));
  const row = (name: string) => plain.stdout.split('\n').find((l) => l.startsWith(name + ' ')) ?? '';
  t.match(plain.stdout, /^EXPORT\s.*\sACTIVITY LOG\s+IMAGE$/m, `the exports table has the column\n${plain.stdout}`);
  t.match(row('vm1'), new RegExp(`\\s${all.activeExtents} x 64 KiB, ${all.checkpoints} checkpoints?\\s`), `vm1: extents in the log and checkpoints\n${plain.stdout}`);
  t.match(row('ro'), /\soff\s/, 'ro: no log');
});
