/**
 * When the mirror gives up on plain sweeps (issue 14): from the measured guest
 * dirty rate against the copy rate after one sweep, not only after two sweeps
 * that fail to shrink.
 */
import t from 'tap';
import { guestOutpaces, StallDetector } from '../../../src/migration/convergence.js';

const MiB = 1024 * 1024;

t.test('one sweep is enough when the guest dirties at least a quarter of the copy rate', async (t) => {
  // 5 s sweep at 200 MiB/s; 4 KiB random writes left 600 MiB dirty (120 MiB/s).
  t.ok(guestOutpaces(600 * MiB, 5, 200 * MiB));
  const s = new StallDetector();
  t.ok(s.observe(600 * MiB, 5, 200 * MiB), 'the first sweep already says so (the old rule needed three)');
  t.same(s.reason, { guestDirtyRate: 120 * MiB, copyRate: 200 * MiB, rule: 'rates' });
});

t.test('a guest well below the copy rate converges by sweeps', async (t) => {
  t.notOk(guestOutpaces(20 * MiB, 5, 200 * MiB), '4 MiB/s against 200 MiB/s');
  const s = new StallDetector();
  t.notOk(s.observe(20 * MiB, 5, 200 * MiB));
  t.equal(s.reason, undefined);
  t.notOk(guestOutpaces(20 * MiB, 0, 200 * MiB), 'no rate from a sweep that took no time');
  t.notOk(guestOutpaces(20 * MiB, 5, 0), 'nor without a copy rate');
});

t.test('without rates, two sweeps that do not shrink still count', async (t) => {
  const s = new StallDetector();
  t.notOk(s.observe(100 * MiB));
  t.notOk(s.observe(100 * MiB));
  t.ok(s.observe(100 * MiB));
  t.equal(s.reason?.rule, 'two-sweeps');
});

t.test('why a due cutover waits', async (t) => {
  const { waitingReason } = await import('../../../src/migration/convergence.js');
  t.match(waitingReason(12 * MiB, 48 * MiB, 50), /about 250 ms \(12\.0 MiB dirty at 48 MiB\/s\), over --max-downtime 50 ms: copying on/);
  t.match(waitingReason(12 * MiB, 0, 50), /no copy rate measured yet/);
});
