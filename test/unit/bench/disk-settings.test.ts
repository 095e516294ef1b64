// The disk suite's settings and the syncwrite job's fio arguments.
import t from 'tap';
import { diskSettings } from '../../../bench/disk.js';
import { fioArgs } from '../../../bench/fio.js';
import { jobByName } from '../../../bench/jobs.js';

t.test('BENCH_DISK_DIR and BENCH_DISK_SIZE', async (t) => {
  t.same(diskSettings({}), { dir: '/var/tmp', size: 4 * 1024 ** 3 }, 'defaults');
  t.same(diskSettings({ BENCH_DISK_DIR: '/srv/x/', BENCH_DISK_SIZE: '512M' }), { dir: '/srv/x', size: 512 * 1024 ** 2 });
  t.throws(() => diskSettings({ BENCH_DISK_SIZE: '1M' }), RangeError, 'too small');
  t.throws(() => diskSettings({ BENCH_DISK_SIZE: '100000001' }), RangeError, 'not a multiple of 4 KiB');
});

t.test('syncwrite: QD1 random 4 KiB writes, each followed by a FLUSH; the others as before', async (t) => {
  const s = { runtimeSec: 5, rampSec: 1, iodepth: 16 };
  const sync = fioArgs(jobByName('syncwrite'), 'nbd://h/x', s);
  t.ok(sync.includes('--fsync=1') && sync.includes('--iodepth=1') && sync.includes('--rw=randwrite') && sync.includes('--bs=4k'), sync.join(' '));
  const rand = fioArgs(jobByName('randwrite'), 'nbd://h/x', s);
  t.ok(rand.includes('--iodepth=16') && !rand.some((a) => a.startsWith('--fsync')), rand.join(' '));
});
