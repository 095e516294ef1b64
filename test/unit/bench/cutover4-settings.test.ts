// bench cutover4's BENCH_CUTOVER4_* settings: defaults, and a malformed value
// refused with a message naming it (it used to become NaN and run anyway).
import t from 'tap';
import { cutover4Settings } from '../../../bench/cutover4.js';
import { BenchConfigError } from '../../../bench/config.js';

t.test('defaults', async (t) => {
  t.same(cutover4Settings({}), { repeat: 3, sizeMiB: 256, maxDowntimeMs: 50, jobs: 4, targets: ['nbd-migrate', 'qemu-nbd'], handoffs: ['forward', 'disconnect'] });
  t.same(cutover4Settings({ BENCH_CUTOVER4_REPEAT: '', BENCH_CUTOVER4_TARGETS: ' ' }).repeat, 3, 'empty is unset');
});

t.test('values given', async (t) => {
  const s = cutover4Settings({
    BENCH_CUTOVER4_REPEAT: '2',
    BENCH_CUTOVER4_SIZE: '64',
    BENCH_CUTOVER4_MAX_DOWNTIME: '30',
    BENCH_CUTOVER4_JOBS: '2',
    BENCH_CUTOVER4_TARGETS: 'qemu-nbd',
    BENCH_CUTOVER4_HANDOFFS: 'disconnect, forward,disconnect',
  });
  t.same(s, { repeat: 2, sizeMiB: 64, maxDowntimeMs: 30, jobs: 2, targets: ['qemu-nbd'], handoffs: ['disconnect', 'forward'] });
});

t.test('malformed values are refused, naming the variable and the value', async (t) => {
  const bad: Array<[string, string, RegExp]> = [
    ['BENCH_CUTOVER4_REPEAT', 'three', /^BENCH_CUTOVER4_REPEAT: expected an integer >= 1, got "three"$/],
    ['BENCH_CUTOVER4_REPEAT', '0', /BENCH_CUTOVER4_REPEAT: expected an integer >= 1/],
    ['BENCH_CUTOVER4_SIZE', '1.5', /BENCH_CUTOVER4_SIZE: expected an integer >= 32, got "1.5"/],
    ['BENCH_CUTOVER4_SIZE', '16', /BENCH_CUTOVER4_SIZE: expected an integer >= 32/],
    ['BENCH_CUTOVER4_MAX_DOWNTIME', '50ms', /BENCH_CUTOVER4_MAX_DOWNTIME: expected an integer >= 1, got "50ms"/],
    ['BENCH_CUTOVER4_JOBS', '-1', /BENCH_CUTOVER4_JOBS: expected an integer >= 1/],
    ['BENCH_CUTOVER4_TARGETS', 'qemu-nbd,nbdkit', /BENCH_CUTOVER4_TARGETS: unknown "nbdkit" \(choose from nbd-migrate, qemu-nbd\)/],
    ['BENCH_CUTOVER4_HANDOFFS', 'forward,', /BENCH_CUTOVER4_HANDOFFS: unknown "" \(choose from forward, disconnect\)/],
  ];
  for (const [name, value, msg] of bad) t.throws(() => cutover4Settings({ [name]: value }), Object.assign(new BenchConfigError(''), { message: msg }), `${name}=${value}`);
});
