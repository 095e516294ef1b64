// A running guest's disk migrates while things go wrong or get tight; the
// guest keeps writing and verifying (the `workload` loop of rootfs/lib/nbdm.sh,
// see migrate.test.ts) and must never notice anything but, at most, a pause.
//   1. The mirror target dies mid-copy (qemu-nbd, SIGKILL) and comes back on
//      the same port: the job retries, resumes where it was and completes.
//   2. Auto cutover while the guest writes hard: the guest times its own
//      writes (latency_probe) and the pause it sees at the switch is reported
//      next to the server's pauseMs and the guest's gaps without migration.

import t from 'tap';
import { adminRequest } from '../helpers/admin.js';
import { MiB, serve } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli, freePort, qemuNbd, type Proc } from '../migration/harness.js';
import { parseMarker, type Marker } from './qemu.js';
import {
  DEFAULT_LAYOUT,
  checkBaseScript,
  migrateAndVerify,
  migrationSetup,
  waitJob,
  type Layout,
} from './migration.js';
import { SECTOR, patternSectors, runTag, shq } from './workload.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// 1. Target failure mid-copy

// 64 MiB: the workload over 0..4 MiB, 32 MiB of host data over 16..48 MiB, so
// that most of what the first sweep copies is data the guest never rewrites
// and a job that started over after the failure would copy it all again.
const FAULT_LAYOUT: Layout = { imageSize: 64 * MiB, wFirst: 0, wCount: 8192, bFirst: 32768, bCount: 65536 };

t.test('the mirror target dies mid-copy and comes back: the job retries, resumes and completes', async (t) => {
  const m = await migrationSetup(t, { layout: FAULT_LAYOUT });
  const { vm, adminSock, dst, srcSrv, lastRound, progress, layout: l } = m;
  const allocated = (l.wCount + l.bCount) * SECTOR;

  // A plain qemu-nbd target, --persistent, on a port of its own that it gets back after the kill.
  const port = await freePort();
  const targets: Proc[] = [];
  t.teardown(() => Promise.all(targets.map((p) => p.stop())));
  targets.push(await qemuNbd(dst, 'vm1', port));
  const uri = `nbd://127.0.0.1:${port}/vm1`;

  await migrateAndVerify(t, m, async () => {
    await progress(2);
    // 8 MiB/s: the first sweep of the 36 MiB allocated takes some 4.5 s.
    const started = await cli(['ctl', '--socket', adminSock, 'mirror', 'vm1', uri, '--cutover', 'manual', '--max-bandwidth', '8M']);
    t.equal(started.code, 0, 'ctl mirror started the job', { diag: describeRun(started) });

    // Kill the target once the workload region and 3/4 of the host data are on it.
    const killAt = l.wCount * SECTOR + (l.bCount * SECTOR * 3) / 4;
    const before = await waitJob(adminSock, (j) => j.dataBytes >= killAt, '3/4 of the host data to be copied', 60_000, 50);
    t.equal(before.state, 'copying', `the job is still in its first sweep (${before.dataBytes} bytes copied)`);
    const atKill = lastRound();
    await targets[0]!.stop(); // SIGKILL
    const killedAt = Date.now();

    // retries 1: the job saw the target go; 2: its first reconnect was refused
    // too, so the restarted target is found by a later attempt, after a backoff.
    const failed = await waitJob(adminSock, (j) => j.retries >= 2, 'the job to notice the dead target and retry', 30_000, 50);
    t.equal(failed.state, 'copying', `the job retries (retries ${failed.retries} after ${Date.now() - killedAt} ms), still copying`);
    const copiedBefore = failed.dataBytes;

    const logsBefore = srcSrv.logs.length;
    targets.push(await qemuNbd(dst, 'vm1', port));
    const restartedAt = Date.now();
    await srcSrv.waitForLog((e) => e.event === 'target-connected' && srcSrv.logs.indexOf(e) >= logsBefore, 30_000);
    const retries = srcSrv.logs.filter((e) => e.event === 'mirror-retry').length;
    t.comment(
      `target killed at guest round ${atKill} with ${(copiedBefore / MiB).toFixed(1)} MiB copied; down ` +
        `${restartedAt - killedAt} ms; the job reconnected ${Date.now() - restartedAt} ms after the restart, after ${retries} attempts`,
    );
    // Lift the rate limit: the rest goes at full speed, so that the guest
    // dirties the workload region only a few times more before the job is ready.
    await adminRequest(adminSock, { cmd: 'set-speed', export: 'vm1', rate: '0' });

    const rd = await waitJob(adminSock, (j) => j.state === 'ready', 'the job to be ready');
    const atReady = lastRound();
    t.comment(`job ready (pass ${rd.pass}) at guest round ${atReady}`);
    await progress(atReady + 1); // the guest writes while the job is ready (write-through)
    const cut = await cli(['ctl', '--socket', adminSock, 'cutover', 'vm1']);
    t.equal(cut.code, 0, 'ctl cutover succeeded', { diag: describeRun(cut) });
    const done = await waitJob(adminSock, (j) => j.state === 'completed', 'the cutover to complete');
    const atCut = lastRound();
    t.equal(done.error, null, 'the job completed without error');

    const after = done.dataBytes - copiedBefore;
    t.comment(
      `data copied: ${(copiedBefore / MiB).toFixed(1)} MiB before the failure, ${(after / MiB).toFixed(1)} MiB after, ` +
        `${(done.dataBytes / MiB).toFixed(1)} MiB in all, for ${(allocated / MiB).toFixed(1)} MiB allocated; ` +
        `cutover at guest round ${atCut}, pause ${done.pauseMs} ms`,
    );
    // After the failure the job copies what was left of the first sweep and what
    // the guest dirtied since (the 4 MiB workload region, a few times): less than
    // everything. Starting over would copy all `allocated` bytes again on top.
    t.ok(after < allocated, 'after the failure the job copied less than all the data: it resumed, it did not start over');
    t.ok(done.dataBytes < 2 * allocated, 'in all it copied well under twice the allocated data');

    await progress(atCut + 2); // and goes on after the switch, through the source to the restarted target
    vm.send('stop');
    return lastRound() - atCut;
  }).then((r) => {
    t.notMatch(r.transcript, /I\/O error|blk_update_request|critical medium error/, 'the guest kernel logged no I/O error');
  });
});

// ---------------------------------------------------------------------------
// 2. Auto cutover under a hard-writing guest: the pause as the guest sees it

const P_FIRST = 12288; // the probe's region: 6 MiB, 128 KiB long
const P_COUNT = 256;
const SLOW_MS = 40; // the probe reports each gap this long or longer

/**
 * The workload (4 MiB rounds) in the background, reading its "stop" from a
 * fifo; latency_probe next to it, timing single 4 KiB O_DIRECT writes; the
 * foreground passes the host's lines on as the probe's phase until "stop".
 */
function latencyScript(probeTag: string) {
  return (tag: string, baseMd5: string, l: Layout) => `
echo warm >/tmp/probe.phase
rm -f /tmp/wl.ctl
mkfifo /tmp/wl.ctl && exec 3<>/tmp/wl.ctl || { fail "cannot make the workload's fifo"; exit 1; }
workload /dev/vda ${l.wFirst} ${l.wCount} 1000 ${shq(tag)} <&3 &
wl=$!
latency_probe /dev/vda ${P_FIRST} ${P_COUNT} ${shq(probeTag)} ${SLOW_MS} 0.01 &
pr=$!
while line=$(host_says phase); do
  [ "$line" = stop ] && break
  echo "$line" >/tmp/probe.phase
done
echo stop >&3
wait $wl || exit 1
echo stop >/tmp/probe.phase
wait $pr || exit 1
${checkBaseScript(baseMd5, l)}
ok latency
`;
}

interface Gaps {
  writes: number;
  maxMs: number;
  maxEndNs: number;
  startNs: number;
  endNs: number;
}

t.test('auto cutover under a hard-writing guest: the pause the guest sees', async (t) => {
  // Probe markers with the host's wall clock on arrival, to place guest times on the server's log.
  const arrivals: { m: Marker; wall: number }[] = [];
  const onLine = (line: string) => {
    const m = parseMarker(line);
    if (m && (m.kind === 'GAP' || m.kind === 'GAPS')) arrivals.push({ m, wall: Date.now() });
  };
  const probeTag = runTag('probe');
  const m = await migrationSetup(t, { layout: DEFAULT_LAYOUT, script: latencyScript(probeTag), onLine });
  const { vm, adminSock, dst, srcSrv, lastRound, progress } = m;
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  let pauseMs: number | null = null;

  const r = await migrateAndVerify(
    t,
    m,
    async () => {
      await progress(1);
      vm.send('base'); // the baseline: the same guest load, no migration
      await sleep(5000);
      vm.send('mig');
      const started = await cli(['ctl', '--socket', adminSock, 'mirror', 'vm1', dstSrv.uri('vm1'), '--cutover', 'auto']);
      t.equal(started.code, 0, 'ctl mirror started the job', { diag: describeRun(started) });
      const done = await waitJob(adminSock, (j) => j.state === 'completed', 'the auto cutover to complete', 60_000, 100);
      pauseMs = done.pauseMs;
      await sleep(1000);
      vm.send('post');
      const atCut = lastRound();
      t.comment(`auto cutover completed (pass ${done.pass}, convergence ${done.convergence}) at guest round ${atCut}, server pauseMs ${done.pauseMs}`);
      await progress(atCut + 2);
      vm.send('stop');
      return lastRound() - atCut;
    },
    (r) => {
      const done = r.markers.find((x) => x.kind === 'PROBE');
      const tag = done?.args[3] ?? '';
      return [{ first: P_FIRST, count: P_COUNT, data: patternSectors(tag, P_FIRST, P_COUNT), what: `the probe's last lap (${tag})` }];
    },
  );
  t.notMatch(r.transcript, /I\/O error|blk_update_request|critical medium error/, 'the guest kernel logged no I/O error');
  if (!r.ok) return;

  const phases = new Map<string, Gaps>();
  for (const x of r.markers.filter((x) => x.kind === 'GAPS')) {
    const [phase, writes, maxUs, maxEndNs, startNs, endNs] = x.args;
    phases.set(phase!, { writes: Number(writes), maxMs: Number(maxUs) / 1000, maxEndNs: Number(maxEndNs), startNs: Number(startNs), endNs: Number(endNs) });
  }
  const base = phases.get('base');
  const mig = phases.get('mig');
  const post = phases.get('post');
  const probe = r.markers.find((x) => x.kind === 'PROBE');
  t.ok(base && mig && post && probe, 'the probe summed up the baseline, the migration and after it, and checked its region', {
    phases: [...phases.keys()],
  });
  if (!base || !mig || !post) return;
  t.ok(base.writes >= 10 && mig.writes >= 10 && post.writes >= 10, `the probe kept writing (${base.writes}, ${mig.writes}, ${post.writes} writes)`);

  // Guest monotonic time to host wall clock: a marker goes out right after the
  // now_ns it carries, so the smallest (arrival - guest time) is the offset
  // plus the least console latency.
  let offset = Infinity;
  for (const { m: x, wall } of arrivals) {
    const ns = Number(x.kind === 'GAP' ? x.args[1] : x.args[5]);
    offset = Math.min(offset, wall - ns / 1e6);
  }
  const toWall = (ns: number) => ns / 1e6 + offset;

  // The switch on the host's clock: the job holds guest writes from right after
  // it logs entering cutting-over, for pauseMs. (Its "cutover" event comes a
  // little later: the fence marker is written after the guest is let go.)
  const cutStart = Date.parse(String(srcSrv.logs.find((e) => e.event === 'mirror-state' && e.to === 'cutting-over')?.time));
  const cutLogged = Date.parse(String(srcSrv.logs.find((e) => e.event === 'cutover')?.time));
  const cutEnd = cutStart + (pauseMs ?? 0);
  // The guest's gaps (of SLOW_MS or more) that overlap it, with a margin for the
  // clock mapping (console latency, the log's millisecond times). A write in
  // flight when the hold begins completes inside it (the hold drains them first).
  const margin = 20;
  const slow = r.markers
    .filter((x) => x.kind === 'GAP' && x.args[2] === 'mig')
    .map((x) => ({ ms: Number(x.args[0]) / 1000, end: toWall(Number(x.args[1])) }));
  const atCut = slow.filter((g) => g.end - g.ms <= cutEnd + margin && g.end >= cutStart - margin);
  const cutGap = atCut.length ? Math.max(...atCut.map((g) => g.ms)) : null;
  const migMaxWall = toWall(mig.maxEndNs);

  t.comment(`server pauseMs ${pauseMs} (its log: cutting-over to the cutover event ${cutLogged - cutStart} ms)`);
  t.comment(
    `guest write gaps, largest: baseline ${base.maxMs.toFixed(0)} ms (${base.writes} writes in ${((base.endNs - base.startNs) / 1e9).toFixed(1)} s); ` +
      `migration window ${mig.maxMs.toFixed(0)} ms (${mig.writes} writes, the largest ending ${(migMaxWall - cutEnd).toFixed(0)} ms from the switch's end); ` +
      `after ${post.maxMs.toFixed(0)} ms (${post.writes} writes)`,
  );
  t.comment(
    `gaps of ${SLOW_MS} ms or more during the migration window (ms @ ms from the switch's end): ` +
      (slow.map((g) => `${g.ms.toFixed(0)}@${(g.end - cutEnd).toFixed(0)}`).join(' ') || 'none'),
  );
  t.comment(
    cutGap !== null
      ? `the guest's largest gap overlapping the switch (±${margin} ms): ${cutGap.toFixed(0)} ms ` +
          `(one probe turn, ~${((base.endNs - base.startNs) / base.writes / 1e6).toFixed(0)} ms at baseline, included)`
      : `the guest's gaps overlapping the switch (±${margin} ms): all under ${SLOW_MS} ms (the probe reports no smaller gaps)`,
  );
  t.comment(`probe ${probe?.args.slice(1, 3).join(' writes, ')} laps; resolution one probe turn; TCG makes guest timings coarse (fork/exec alone takes ~8 ms)`);
  t.ok(typeof pauseMs === 'number' && pauseMs >= 0, 'the job reports the pause it imposed');
  // Generous: TCG on a loaded 2-core box stretches everything in the guest.
  t.ok(mig.maxMs < 5000, `the longest write gap the guest saw during the migration (${mig.maxMs.toFixed(0)} ms) is under 5 s`);
  if (cutGap !== null) t.ok(cutGap < 5000, `the guest's largest gap at the switch (${cutGap.toFixed(0)} ms) is under 5 s`);
});
