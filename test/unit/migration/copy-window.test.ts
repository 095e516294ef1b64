/**
 * The sweep's byte window with range locks (a mirror): a chunk takes its window
 * share for the data the source's map shows before it takes its range lock
 * (bd0549f). Data a guest adds to the chunk's range meanwhile is charged
 * inside; a chunk that already holds window bytes must not wait for more in
 * the window's queue (behind chunks waiting for their own share), or chunks
 * that all hold bytes and all need more wait for each other for ever. Seen as
 * a mirror stuck at the end of pass 1 with 4 jobs and a writer each (bench
 * cutover4).
 */
import t from 'tap';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { copySweep, newCopyStats } from '../../../src/migration/copy.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const MiB = 1024 * 1024;
const HALF = MiB / 2;

t.test('chunks whose ranges gain data after their window share was sized do not deadlock', async (t) => {
  const chunks = 6;
  const src = new MemoryDevice(chunks * MiB);
  for (let c = 0; c < chunks; c++) await src.write(c * MiB, [Buffer.alloc(HALF, 0x11 + c)], { fua: false });
  // A "guest" fills each chunk's hole right after the copy sized its share from the map
  // (the map it got shows half a MiB of data; the chunk then copies a whole MiB).
  const filled = new Set<number>();
  const extents = src.extents.bind(src);
  src.extents = async (offset, length, max) => {
    const r = await extents(offset, length, max);
    if (offset % MiB === 0 && length === MiB && !filled.has(offset)) {
      filled.add(offset);
      await src.write(offset + HALF, [Buffer.alloc(HALF, 0x77)], { fua: false });
    }
    return r;
  };
  const dst = new MemoryDevice(chunks * MiB);
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  const stats = newCopyStats();
  // 4 chunks in flight, a 2 MiB window: four half-MiB shares fill it, and each chunk needs half a MiB more.
  const sweep = copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 4, maxInflightBytes: 2 * MiB, skipTargetZeros: false, locks: new RangeLock() }, stats);
  let timer: NodeJS.Timeout | undefined;
  const stuck = new Promise<'stuck'>((r) => (timer = setTimeout(() => r('stuck'), 5000)));
  const outcome = await Promise.race([sweep.then(() => 'done' as const), stuck]);
  clearTimeout(timer);
  t.equal(outcome, 'done', 'the sweep finishes (on the old code every chunk waited for window bytes the others held)');
  t.equal(filled.size, chunks, 'every chunk gained data after its share was sized');
  t.ok(dst.snapshot().equals(src.snapshot()), 'the target holds the source, guest data included');
  t.equal(bitmap.dirtyBytes(), 0, 'nothing left dirty');
});

t.test('a sweep given pauseBefore starts no new chunk while it returns a promise (another job cutting over)', async (t) => {
  const src = MemoryDevice.from(Buffer.alloc(4 * MiB, 0x5c));
  const dst = new MemoryDevice(4 * MiB);
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  let held: Promise<void> | undefined;
  let release!: () => void;
  held = new Promise<void>((r) => (release = r));
  let pausedAsks = 0;
  const reads: number[] = [];
  const read = src.read.bind(src);
  src.read = async (offset, length, into, at) => {
    reads.push(offset);
    return read(offset, length, into, at);
  };
  const sweep = copySweep(src, dst, bitmap, {
    chunkBytes: MiB,
    maxInflight: 4,
    skipTargetZeros: false,
    pauseBefore: () => {
      if (held) pausedAsks++;
      return held;
    },
  }, newCopyStats());
  // Let the sweep run up to its first wait.
  await new Promise((r) => setImmediate(r));
  t.equal(reads.length, 0, 'no chunk read while the pause holds');
  t.equal(pausedAsks, 1, 'the sweep asked once and waits');
  held = undefined;
  release();
  await sweep;
  t.equal(reads.length, 4, 'all four chunks copied after the release');
  t.ok(dst.snapshot().equals(src.snapshot()));
});
