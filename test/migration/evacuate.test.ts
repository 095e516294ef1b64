// Host evacuation (issue 11.2): `ctl evacuate` moves several exports to one destination,
// N at a time, under one bandwidth budget shared fairly; --wait's progress and summary,
// a failing export that does not stop the others, `cutover --all`, the status table, metrics.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import type { EvacuationStatus } from '../../src/migration/evacuation.js';
import { cli, compare } from './harness.js';

type Tap = typeof t;

interface Status {
  exports: Array<{ name: string; backend: string }>;
  jobs: Array<{ export: string; state: string }>;
  evacuations: EvacuationStatus[];
}

async function scrape(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  return res.text();
}

function metric(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

/** Source images full of random data (every byte pays the budget), empty destination images, and both servers. */
async function setup(t: Tap, sizes: Record<string, number>, opts: { destExports?: string[]; metrics?: boolean } = {}) {
  const dir = await tmpDir(t, 'nbd-migrate-evacuate-');
  const names = Object.keys(sizes);
  const src: Record<string, string> = {};
  const dst: Record<string, string> = {};
  for (const n of names) {
    src[n] = await makeImage(path.join(dir, `${n}.img`), sizes[n]!, { fill: 'random' });
    dst[n] = await makeImage(path.join(dir, `${n}.dst.img`), sizes[n]!);
  }
  const destNames = opts.destExports ?? names;
  const d = await serve(t, [...destNames.map((n) => dst[n]!), ...destNames.flatMap((n) => ['--name', n]), '--incoming']);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [
    ...names.map((n) => src[n]!),
    ...names.flatMap((n) => ['--name', n]),
    '--admin-socket',
    admin,
    ...(opts.metrics ? ['--metrics', '127.0.0.1:0'] : []),
  ]);
  const metricsPort = opts.metrics ? ((await s.waitForLog((e) => e.event === 'listening' && e.listener === 'metrics')).port as number) : 0;
  return { dir, src, dst, s, d, admin, metricsPort, to: `nbd://127.0.0.1:${d.newstylePort}/{name}` };
}

interface Sample {
  t: number;
  ev: EvacuationStatus;
}

/** Asks for the status every `everyMs` until the evacuation is done; `each` sees every sample. */
async function follow(admin: string, each: (s: Sample) => Promise<void> | void, everyMs = 100, timeoutMs = 90_000): Promise<Sample[]> {
  const samples: Sample[] = [];
  const end = Date.now() + timeoutMs;
  for (;;) {
    const st = (await adminRequest(admin, { cmd: 'status' })) as Status;
    const ev = st.evacuations.at(-1);
    if (ev) {
      const s = { t: performance.now() / 1000, ev };
      samples.push(s);
      await each(s);
      if (ev.state === 'done' || ev.state === 'ready') return samples;
    }
    if (Date.now() > end) throw new Error(`the evacuation did not end; last ${JSON.stringify(samples.at(-1)?.ev)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

const exp = (s: Sample, name: string) => s.ev.exports.find((e) => e.export === name)!;

/**
 * Rate of `name` (data bytes per second) over the samples `pick` accepts. The job counts a
 * chunk (4 MiB) when its write completes, so its bytes grow in steps: the rate is taken
 * between the first and the last sample that saw a step, which bounds the error by the
 * sampling interval rather than by the chunk size.
 */
function rateOver(samples: Sample[], name: string, pick: (s: Sample) => boolean): { rate: number; secs: number } {
  const sel = samples.filter(pick);
  const steps = sel.filter((x, i) => i > 0 && exp(x, name).dataBytes > exp(sel[i - 1]!, name).dataBytes);
  if (steps.length < 2) return { rate: NaN, secs: 0 };
  const a = steps[0]!;
  const b = steps.at(-1)!;
  const secs = b.t - a.t;
  return { rate: (exp(b, name).dataBytes - exp(a, name).dataBytes) / secs, secs };
}

const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB/s`;

t.test('3 exports, --parallel 2, one 16M budget: a queue, fair shares, the share handed on, the total at the cap', async (t) => {
  const CAP = 16 * MiB;
  // a and b share the budget until a is done (~4 s), then b and c (~4 s), then b runs alone (~2 s).
  const sizes = { a: 32 * MiB, b: 96 * MiB, c: 32 * MiB };
  const total = 160 * MiB;
  const { s, admin, to, src, dst, metricsPort } = await setup(t, sizes, { metrics: true });
  const run = cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--parallel', '2', '--max-bandwidth', '16M', '--cutover', 'auto', '--wait']);
  await s.waitForLog((e) => e.event === 'evacuation-started', 30_000);

  // While a and b copy and c waits: the status table (ctl) and the metrics. Each is kept only if the
  // status asked for after it still shows that phase (the CLI takes a while to start on a busy machine).
  let table: string | undefined;
  let metricsWhileRunning: string | undefined;
  const phase1 = (ev: EvacuationStatus) => ev.exports.map((e) => e.state).join(',') === 'copying,copying,queued';
  const stillPhase1 = async () => phase1(((await adminRequest(admin, { cmd: 'status' })) as Status).evacuations.at(-1)!);
  let probing: Promise<void> | undefined;
  const probe = async () => {
    if (metricsWhileRunning === undefined) {
      const m = await scrape(metricsPort);
      if (await stillPhase1()) metricsWhileRunning = m;
    }
    if (table === undefined) {
      const r = await cli(['ctl', '--socket', admin, 'status']);
      t.equal(r.code, 0, describeRun(r));
      if (await stillPhase1()) table = r.stdout;
    }
  };
  const samples = await follow(admin, (x) => {
    // Not awaited: sampling goes on while the probe runs.
    if (phase1(x.ev) && (table === undefined || metricsWhileRunning === undefined) && probing === undefined)
      probing = probe().finally(() => (probing = undefined));
  });
  await probing;
  const r = await run;
  t.equal(r.code, 0, `every export completed: exit 0\n${describeRun(r)}`);
  const last = samples.at(-1)!.ev;
  t.equal(last.state, 'done');
  t.same(last.counts, { queued: 0, running: 0, ready: 0, completed: 3, failed: 0, aborted: 0 });

  // The queue: never more than 2 copying; c waited, shown as queued in the status table and the metrics.
  t.ok(samples.every((x) => x.ev.exports.filter((e) => e.state === 'copying' || e.state === 'starting').length <= 2), 'at most 2 jobs copy at once');
  t.ok(table, 'the status table was taken while a and b copied and c was queued');
  t.match(table, /^EXPORT\s+SIZE\s+CONNS\s+DIRTY\s+BACKEND/m, `status prints the exports as a table\n${table}`);
  t.match(table, /^MIRROR\s+TARGET\s+STATE/m, 'and the mirror jobs');
  t.match(table, /^evacuation evac-\d+ to nbd:\/\/127\.0\.0\.1:\d+\/\{name\}: running, parallel 2, max-bandwidth 16\.0 MiB\/s/m, 'and the evacuation');
  t.match(table, /^\s+c\s+queued\s/m, 'with c queued');
  t.match(table, /^\s+a\s+copying\s/m, 'and a copying');
  const id = last.id;
  t.ok(metricsWhileRunning, 'the metrics were scraped while a and b copied and c was queued');
  t.equal(metric(metricsWhileRunning!, `nbd_migrate_evacuation_exports{evacuation="${id}",state="queued"}`), 1, 'metrics: 1 queued');
  t.equal(metric(metricsWhileRunning!, `nbd_migrate_evacuation_exports{evacuation="${id}",state="running"}`), 2, 'metrics: 2 running');
  t.equal(metric(metricsWhileRunning!, `nbd_migrate_evacuation_bytes{evacuation="${id}"}`), total, 'metrics: bytes to move');
  t.equal(metric(metricsWhileRunning!, `nbd_migrate_evacuation_max_bandwidth_bytes_per_second{evacuation="${id}"}`), CAP, 'metrics: the budget');
  const after = await scrape(metricsPort);
  t.equal(metric(after, `nbd_migrate_evacuation_exports{evacuation="${id}",state="completed"}`), 3, 'metrics: 3 completed');
  t.equal(metric(after, `nbd_migrate_evacuation_copied_bytes_total{evacuation="${id}"}`), total, 'metrics: every byte copied');

  // Fairness while a and b share the budget (past the starting burst: both have copied 4 MiB).
  const both = (x: Sample) => exp(x, 'a').state === 'copying' && exp(x, 'b').state === 'copying' && exp(x, 'a').dataBytes >= 4 * MiB && exp(x, 'b').dataBytes >= 4 * MiB;
  const ra = rateOver(samples, 'a', both);
  const rb = rateOver(samples, 'b', both);
  t.ok(ra.secs >= 1.5, `a window of a and b copying together was seen (${ra.secs.toFixed(2)} s)`);
  t.ok(Math.abs(ra.rate - rb.rate) <= 0.25 * Math.max(ra.rate, rb.rate), `a and b got fair shares: ${mib(ra.rate)} and ${mib(rb.rate)}`);
  t.ok(ra.rate + rb.rate <= CAP * 1.15, `together under the cap: ${mib(ra.rate + rb.rate)} of ${mib(CAP)}`);
  // b alone at the end (a and c done): it has the whole budget.
  const alone = (x: Sample) => exp(x, 'a').state === 'completed' && exp(x, 'c').state === 'completed' && exp(x, 'b').state === 'copying';
  const rAlone = rateOver(samples, 'b', alone);
  t.ok(rAlone.secs >= 0.8, `a window of b copying alone was seen (${rAlone.secs.toFixed(2)} s)`);
  t.ok(rAlone.rate > 1.5 * rb.rate && rAlone.rate <= CAP * 1.15, `alone, b took the shares handed on: ${mib(rb.rate)} -> ${mib(rAlone.rate)} (cap ${mib(CAP)})`);
  // The whole evacuation: data over time at most the cap, and not far below it (the budget was kept busy).
  const secs = samples.at(-1)!.t - samples[0]!.t;
  const rateAll = total / secs;
  t.ok(rateAll <= CAP * 1.1, `total ${mib(rateAll)} over ${secs.toFixed(1)} s, at most the cap`);
  t.ok(rateAll >= CAP * 0.7, `and near it: ${secs.toFixed(1)} s against ${(total / CAP).toFixed(1)} s for data/cap`);

  // --wait: a progress block (a line per export and a total line), then the summary.
  t.match(r.stderr, /^a\s+completed\s+\[#+\]\s+100\.0%\s+32\.0 MiB\/32\.0 MiB/m, `a progress line per export\n${r.stderr.slice(-3000)}`);
  t.match(r.stderr, /^c\s+\w+/m);
  t.match(r.stderr, /^total\s+\d\/3 done\s+\[[#.]+\]\s+[\d.]+%\s+[\d.]+ MiB\/160\.0 MiB\s+\S+\s+ETA \S+/m, 'and a total line (bytes, rate, ETA)');
  t.match(r.stderr, /^total\s+\d\/3 done.*MiB\/s\s+ETA \d+s/m, 'the total line shows a rate and an ETA while copying');
  t.match(r.stdout, /evacuation evac-\d+ to .*: 3 completed, 0 failed, 0 aborted \(of 3\)/, describeRun(r));
  for (const n of ['a', 'b', 'c']) t.match(r.stdout, new RegExp(`^  ${n}:\\s+completed\\s+nbd://127\\.0\\.0\\.1:\\d+/${n}\\s`, 'm'), `the summary lists ${n}`);
  for (const n of ['a', 'b', 'c']) {
    const cmp = await compare(src[n]!, dst[n]!);
    t.equal(cmp.code, 0, `${n}: the destination holds the source\n${describeRun(cmp)}`);
  }
  const st = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.same(st.exports.map((e) => e.backend), ['target', 'target', 'target'], 'every export now goes to its target');
});

t.test('one export failing does not stop the others; --wait exits 1 and the summary lists each outcome', async (t) => {
  // The destination has no export "c": its mirror fails at the start; a and b go on (one at a time).
  const { s, admin, to, src, dst } = await setup(t, { c: 8 * MiB, a: 8 * MiB, b: 8 * MiB }, { destExports: ['a', 'b'] });
  const r = await cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--exports', 'c,a,b', '--parallel', '1', '--cutover', 'auto', '--wait']);
  t.equal(r.code, 1, `exit 1: an export failed\n${describeRun(r)}`);
  t.match(r.stdout, /: 2 completed, 1 failed, 0 aborted \(of 3\)/, 'the summary counts');
  t.match(r.stdout, /^  c:\s+failed\s+nbd:\/\/127\.0\.0\.1:\d+\/c\s+.*error: \S.*$/m, 'c failed, with the reason');
  t.match(r.stdout, /^  a:\s+completed\s/m, 'a completed');
  t.match(r.stdout, /^  b:\s+completed\s/m, 'b completed');
  t.match(r.stderr, /^c\s+failed\s/m, 'the progress block shows c failed');
  const failed = await s.waitForLog((e) => e.event === 'evacuation-export' && e.export === 'c' && e.state === 'failed');
  t.ok(failed.error, `the source logged why: ${String(failed.error)}`);
  for (const n of ['a', 'b']) {
    const cmp = await compare(src[n]!, dst[n]!);
    t.equal(cmp.code, 0, `${n}: the destination holds the source\n${describeRun(cmp)}`);
  }
  // --json is the admin reply as before (exports, jobs), with the evacuations beside them.
  const j = await cli(['ctl', '--socket', admin, 'status', '--json']);
  t.equal(j.code, 0, describeRun(j));
  const parsed = JSON.parse(j.stdout) as Status;
  t.same(parsed.exports.map((e) => e.name), ['c', 'a', 'b']);
  t.same(parsed.jobs.map((x) => [x.export, x.state]), [['a', 'completed'], ['b', 'completed']], 'c never had a job');
  t.same(parsed.evacuations[0]!.exports.map((e) => [e.export, e.state]), [['c', 'failed'], ['a', 'completed'], ['b', 'completed']]);
  // What is left (c) may be evacuated again; the migrated ones are refused by name.
  const again = await cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--exports', 'a']);
  t.not(again.code, 0, 'a migrated export is refused');
  t.match(again.stderr, /already migrated: a/, describeRun(again));
});

t.test('manual evacuation: --wait stops at ready, `cutover --all` switches every ready job', async (t) => {
  const { admin, to, src, dst } = await setup(t, { a: 8 * MiB, b: 8 * MiB });
  const none = await cli(['ctl', '--socket', admin, 'cutover', '--all']);
  t.not(none.code, 0, 'cutover --all with no manual evacuation is refused');
  t.match(none.stderr, /no manual evacuation/, describeRun(none));
  const neither = await cli(['ctl', '--socket', admin, 'cutover']);
  t.not(neither.code, 0, 'cutover needs an export or --all');
  t.match(neither.stderr, /"export" must be a non-empty string/, describeRun(neither));

  // --parallel 1: a ready job gives its slot to the next export, so both get ready.
  const r = await cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--parallel', '1', '--wait']);
  t.equal(r.code, 0, describeRun(r));
  t.match(r.stdout, /: 0 completed, 0 failed, 0 aborted, 2 ready for `ctl cutover --all` \(of 2\)/, 'the summary says both are ready');
  let st = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.same(st.jobs.map((j) => [j.export, j.state]), [['a', 'ready'], ['b', 'ready']], 'both jobs wait, synchronised');
  t.equal(st.evacuations[0]!.state, 'ready');
  t.same(st.exports.map((e) => e.backend), ['local', 'local'], 'nothing switched before cutover --all');

  const cut = await cli(['ctl', '--socket', admin, 'cutover', '--all']);
  t.equal(cut.code, 0, describeRun(cut));
  t.match(cut.stdout, /cutover requested for a, b/);
  t.match(cut.stdout, /^a: completed, cutover pause [\d.]+ ms$/m);
  t.match(cut.stdout, /^b: completed, cutover pause [\d.]+ ms$/m);
  st = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.same(st.exports.map((e) => e.backend), ['target', 'target'], 'both exports switched');
  t.equal(st.evacuations[0]!.state, 'done');
  t.same(st.evacuations[0]!.counts, { queued: 0, running: 0, ready: 0, completed: 2, failed: 0, aborted: 0 });
  for (const n of ['a', 'b']) {
    const cmp = await compare(src[n]!, dst[n]!);
    t.equal(cmp.code, 0, `${n}: the destination holds the source\n${describeRun(cmp)}`);
  }
});

t.test('ctl abort takes a queued export out of the queue; the others go on', async (t) => {
  const { s, admin, to, src, dst } = await setup(t, { a: 8 * MiB, b: 8 * MiB, c: 8 * MiB });
  // 4 MiB/s, one at a time: a copies for about 2 s while b and c wait.
  const run = cli(['ctl', '--socket', admin, 'evacuate', '--to', to, '--parallel', '1', '--max-bandwidth', '4M', '--cutover', 'auto', '--wait']);
  await s.waitForLog((e) => e.event === 'evacuation-export' && e.export === 'a' && e.state === 'starting', 30_000);
  const ab = await cli(['ctl', '--socket', admin, 'abort', 'c']);
  t.equal(ab.code, 0, describeRun(ab));
  const st = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.equal(st.evacuations[0]!.exports.find((e) => e.export === 'c')!.state, 'aborted', 'c left the queue');
  t.notOk(st.jobs.some((j) => j.export === 'c'), 'and never had a job');
  const r = await run;
  t.equal(r.code, 1, `exit 1: an export was aborted\n${describeRun(r)}`);
  t.match(r.stdout, /: 2 completed, 0 failed, 1 aborted \(of 3\)/);
  t.match(r.stdout, /^  c:\s+aborted\s.*error: aborted before it started$/m);
  for (const n of ['a', 'b']) {
    const cmp = await compare(src[n]!, dst[n]!);
    t.equal(cmp.code, 0, `${n}: the destination holds the source\n${describeRun(cmp)}`);
  }
  const after = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.same(after.exports.map((e) => [e.name, e.backend]), [['a', 'target'], ['b', 'target'], ['c', 'local']], 'c stays here');
});

t.test('the mirror options go to every job; set-speed --evacuation changes the shared budget while it runs', async (t) => {
  const { s, admin, to, src, dst } = await setup(t, { a: 16 * MiB, b: 16 * MiB });
  const total = 32 * MiB;
  const run = cli([
    'ctl', '--socket', admin, 'evacuate', '--to', to, '--parallel', '2', '--max-bandwidth', '2M', '--cutover', 'auto',
    '--max-downtime', '2s', '--handoff', 'disconnect', '--target-timeout', '10s', '--cutover-timeout', '7s', '--wait',
  ]);
  for (const n of ['a', 'b']) await s.waitForLog((e) => e.event === 'mirror-state' && e.export === n && e.to === 'copying', 30_000);
  let st = (await adminRequest(admin, { cmd: 'status' })) as Status & { jobs: Array<{ export: string; maxDowntimeMs: number; maxBandwidth: number | null }> };
  const ev = st.evacuations.at(-1)!;
  t.same(ev.job, { maxDowntimeMs: 2000, handoff: 'disconnect', targetTimeoutMs: 10_000, cutoverTimeoutMs: 7000 }, 'the evacuation shows the job options');
  t.equal(ev.maxBandwidth, 2 * MiB);
  t.same(st.jobs.map((j) => [j.export, j.maxDowntimeMs, j.maxBandwidth]), [['a', 2000, MiB], ['b', 2000, MiB]], 'each job: --max-downtime, half the budget');

  const table = await cli(['ctl', '--socket', admin, 'status']);
  t.match(table.stdout, /^evacuation evac-\d+ .*max-bandwidth 2\.0 MiB\/s.*; each job: maxDowntimeMs 2000, handoff disconnect, targetTimeoutMs 10000, cutoverTimeoutMs 7000$/m, `ctl status names the job options\n${describeRun(table)}`);
  const bad = await cli(['ctl', '--socket', admin, 'set-speed', '--evacuation', 'evac-999', '1M']);
  t.not(bad.code, 0, 'an unknown evacuation is refused');
  t.match(bad.stderr, /ENOENT: no evacuation "evac-999" \(running: evac-\d+\)/, describeRun(bad));

  // At 2M the 32 MiB take 16 s; lifted to 64M, what is left takes well under a second.
  st = (await adminRequest(admin, { cmd: 'status' })) as typeof st;
  const left = total - st.evacuations.at(-1)!.bytesDone;
  t.ok(left > 16 * MiB, `most of it is left at 2M (${(left / MiB).toFixed(1)} MiB)`);
  const t0 = performance.now();
  const sp = await cli(['ctl', '--socket', admin, 'set-speed', '--evacuation', ev.id, '64M']);
  t.equal(sp.code, 0, describeRun(sp));
  t.match(sp.stdout, new RegExp(`^budget of evacuation ${ev.id} set to 64\\.0 MiB/s \\(shared by 2 running jobs, 0 queued\\)$`, 'm'));
  const logged = await s.waitForLog((e) => e.event === 'evacuation-speed');
  t.match(logged, { evacuation: ev.id, from: 2 * MiB, maxBandwidth: 64 * MiB, sharedBy: 2 });
  const r = await run;
  const secs = (performance.now() - t0) / 1000;
  t.equal(r.code, 0, describeRun(r));
  t.ok(secs < (left / (2 * MiB)) / 2, `done ${secs.toFixed(1)} s after the new budget, against ${(left / (2 * MiB)).toFixed(1)} s at the old one`);
  t.match(r.stderr, /budget 64\.0 MiB\/s/, 'the progress block shows the new budget');
  for (const n of ['a', 'b']) {
    const cut = await s.waitForLog((e) => e.event === 'cutover' && e.export === n);
    t.equal(cut.handoff, 'disconnect', `${n} cut over with --handoff disconnect`);
    const cmp = await compare(src[n]!, dst[n]!);
    t.equal(cmp.code, 0, `${n}: the destination holds the source\n${describeRun(cmp)}`);
  }
  const after = (await adminRequest(admin, { cmd: 'status' })) as Status;
  t.equal(after.evacuations.at(-1)!.maxBandwidth, 64 * MiB);
  const done = await cli(['ctl', '--socket', admin, 'set-speed', '--evacuation', ev.id, '0']);
  t.not(done.code, 0, 'a done evacuation is refused');
  t.match(done.stderr, /is done/, describeRun(done));
});
