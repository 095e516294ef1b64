// One budget shared by several consumers (src/util/shared-bandwidth.ts): fair by bytes,
// never above the budget, and a consumer that leaves hands its part to the others.
import t from 'tap';
import { type BandwidthShare, SharedBandwidth } from '../../../src/util/shared-bandwidth.js';

const MiB = 1024 * 1024;

/** Keeps `depth` requests of `piece` bytes waiting on `share` until stopped (a copy loop's demand). */
function demand(share: BandwidthShare, piece: number, depth = 4): { stop(): void } {
  let stopped = false;
  const loop = async () => {
    while (!stopped) await share.take(piece, () => stopped);
  };
  for (let i = 0; i < depth; i++) void loop();
  return { stop: () => (stopped = true) };
}

/** Resolves, with the seconds it took, once the budget has granted `bytes` more than now (on its 'grant' events). */
function untilGranted(budget: SharedBandwidth, bytes: number): Promise<number> {
  const target = budget.granted + bytes;
  const t0 = performance.now();
  return new Promise((resolve) => {
    const check = () => {
      if (budget.granted < target) return;
      budget.off('grant', check);
      resolve((performance.now() - t0) / 1000);
    };
    budget.on('grant', check);
  });
}

const within = (a: number, b: number, tol: number) => Math.abs(a - b) <= tol * Math.max(a, b);

t.test('equal demand: equal bytes, the total at the budget; one leaves and the others split its part', async (t) => {
  const rate = 32 * MiB;
  const budget = new SharedBandwidth(rate);
  const shares = ['a', 'b', 'c'].map((n) => budget.share(n));
  t.equal(shares[0]!.rate, rate / 3, 'the nominal share is the budget over the members');
  const loads = shares.map((s) => demand(s, 256 * 1024));
  t.teardown(() => loads.forEach((l) => l.stop()));

  await untilGranted(budget, budget.burst); // the burst the bucket starts with is spent: measure the steady rate
  const start = shares.map((s) => s.granted);
  const secs = await untilGranted(budget, 24 * MiB);
  const got = shares.map((s, i) => s.granted - start[i]!);
  const total = got.reduce((x, y) => x + y, 0);
  t.ok(got.every((g) => within(g, total / 3, 0.1)), `each got a third within 10%: ${got.map((g) => (g / MiB).toFixed(2)).join(', ')} MiB`);
  // At most the budget over the time it took (plus the requests granted at the start of the window).
  t.ok(total <= rate * secs + 4 * 256 * 1024, `total ${(total / MiB).toFixed(1)} MiB in ${secs.toFixed(2)} s at most the budget (${(total / MiB / secs).toFixed(1)} MiB/s)`);
  t.ok(total / secs > 0.8 * rate, `and near it (${(total / MiB / secs).toFixed(1)} MiB/s of ${rate / MiB})`);

  loads[0]!.stop();
  shares[0]!.leave();
  t.equal(shares[1]!.rate, rate / 2, 'two members: half each');
  const mid = shares.map((s) => s.granted);
  const secs2 = await untilGranted(budget, 16 * MiB);
  const got2 = shares.map((s, i) => s.granted - mid[i]!);
  t.equal(got2[0], 0, 'the share that left gets nothing');
  t.ok(within(got2[1]!, got2[2]!, 0.1), `the two others split it: ${got2.map((g) => (g / MiB).toFixed(2)).join(', ')} MiB`);
  const perShare2 = got2[1]! / secs2;
  const perShare1 = got[1]! / secs;
  t.ok(perShare2 > 1.3 * perShare1, `each of them now runs faster (${(perShare1 / MiB).toFixed(1)} -> ${(perShare2 / MiB).toFixed(1)} MiB/s)`);
});

t.test('fair by bytes: small requests are not starved by large ones; an idle share rejoins without credit', async (t) => {
  const rate = 32 * MiB;
  const budget = new SharedBandwidth(rate);
  const small = budget.share('small');
  const large = budget.share('large');
  const idle = budget.share('idle');
  const l1 = demand(small, 64 * 1024, 2);
  const l2 = demand(large, 2 * MiB, 2);
  t.teardown(() => [l1, l2].forEach((l) => l.stop()));
  // While the starting burst lasts every request passes at once (nobody waits, nothing to share): measure after it.
  await untilGranted(budget, budget.burst);
  let s0 = small.granted;
  let g0 = large.granted;
  await untilGranted(budget, 16 * MiB);
  const gs = small.granted - s0;
  const gl = large.granted - g0;
  t.ok(within(gs, gl, 0.15), `64 KiB requests got as many bytes as 2 MiB ones: ${(gs / MiB).toFixed(2)} vs ${(gl / MiB).toFixed(2)} MiB`);
  t.equal(idle.granted, 0, 'a share that asks nothing gets nothing');

  // The idle share starts asking: it gets a third from now on, not a catch-up of everything it skipped.
  s0 = small.granted;
  g0 = large.granted;
  const l3 = demand(idle, 256 * 1024);
  t.teardown(() => l3.stop());
  await untilGranted(budget, 12 * MiB);
  const got = [small.granted - s0, large.granted - g0, idle.granted];
  const total = got.reduce((x, y) => x + y, 0);
  t.ok(got[2]! < 0.45 * total, `the rejoined share took ${(got[2]! / MiB).toFixed(2)} of ${(total / MiB).toFixed(2)} MiB`);
  t.ok(got[2]! > 0.2 * total, 'but its part');
});

t.test('a cancelled wait ends at once and takes nothing; leave lets waiters through', async (t) => {
  const budget = new SharedBandwidth(64 * 1024); // 64 KiB/s: the burst (64 KiB) is gone after one request
  const a = budget.share('a');
  await a.take(64 * 1024);
  let cancel = false;
  const t0 = performance.now();
  const waiting = a.take(64 * 1024, () => cancel);
  setImmediate(() => (cancel = true));
  await waiting;
  t.ok(performance.now() - t0 < 500, 'the cancelled wait ended within its poll interval');
  const before = budget.granted;
  const stuck = a.take(64 * 1024);
  a.leave();
  await stuck;
  t.equal(budget.granted, before, 'leaving let its waiter through without a grant');
  await a.take(1 * MiB); // a share that left is no longer limited
  t.pass('a share that left passes at once');
});

t.test('unlimited (Infinity): every request passes at once, counted; setRate limits the same shares, and lifts the limit again', async (t) => {
  const budget = new SharedBandwidth(Infinity);
  t.ok(budget.unlimited);
  const [a, b] = ['a', 'b'].map((n) => budget.share(n)) as [BandwidthShare, BandwidthShare];
  const t0 = performance.now();
  for (let i = 0; i < 64; i++) await Promise.all([a.take(4 * MiB), b.take(4 * MiB)]);
  t.ok(performance.now() - t0 < 500, `512 MiB granted without waiting (${(performance.now() - t0).toFixed(0)} ms)`);
  t.equal(budget.granted, 512 * MiB, 'and counted');
  t.equal(a.rate, Infinity);

  const rate = 8 * MiB;
  budget.setRate(rate);
  t.notOk(budget.unlimited);
  t.equal(a.rate, rate / 2, 'limited: each share is half of the new budget');
  const la = demand(a, 256 * 1024);
  const lb = demand(b, 256 * 1024);
  t.teardown(() => [la, lb].forEach((l) => l.stop()));
  await untilGranted(budget, budget.burst);
  const a0 = a.granted;
  const b0 = b.granted;
  const secs = await untilGranted(budget, 8 * MiB);
  const got = [a.granted - a0, b.granted - b0];
  const total = got[0]! + got[1]!;
  t.ok(total <= rate * secs + 8 * 256 * 1024, `at most the new budget: ${(total / MiB / secs).toFixed(1)} MiB/s of ${rate / MiB}`);
  t.ok(total / secs > 0.8 * rate, `and near it (${(total / MiB / secs).toFixed(1)} MiB/s)`);
  t.ok(within(got[0]!, got[1]!, 0.15), `shared fairly: ${got.map((g) => (g / MiB).toFixed(2)).join(', ')} MiB`);

  budget.setRate(Infinity);
  const t1 = performance.now();
  await untilGranted(budget, 64 * MiB);
  t.ok(performance.now() - t1 < 1000, `lifted: 64 MiB more in ${(performance.now() - t1).toFixed(0)} ms`);
  t.throws(() => budget.setRate(0), RangeError, '0 is not a rate (unlimited is Infinity)');
});
