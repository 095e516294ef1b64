/**
 * The copy engine asks the source for its allocation once per run, not once per chunk
 * (issue 14: tmpfs walks every page of a data run on each SEEK_HOLE). Data claims are
 * reused; hole claims never are (a chunk there asks again after its bits were cleared).
 */
import t from 'tap';
import fc from 'fast-check';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { copySweep, newCopyStats, SourceHints } from '../../../src/migration/copy.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { MemoryDevice, PAGE } from '../../helpers/memory-device.js';

const MiB = 1024 * 1024;

/** A source whose extents questions are recorded: [offset, length, maxExtents]. */
function recorded(size: number): { dev: MemoryDevice; asked: Array<[number, number, number]> } {
  const asked: Array<[number, number, number]> = [];
  const dev = new MemoryDevice(size);
  const ext = dev.extents.bind(dev);
  dev.extents = (o: number, l: number, m: number) => {
    asked.push([o, l, m]);
    return ext(o, l, m);
  };
  return { dev, asked };
}

t.test('a long data run is asked about once, not once per chunk', async (t) => {
  const { dev: src, asked } = recorded(64 * MiB);
  await src.write(0, [Buffer.alloc(32 * MiB, 0x5a)], { fua: false });
  const dst = new MemoryDevice(64 * MiB);
  for (const locks of [undefined, new RangeLock()]) {
    asked.length = 0;
    const bitmap = new DirtyBitmap(src.size, 64 * 1024);
    bitmap.markAll();
    const stats = newCopyStats();
    await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 64, skipTargetZeros: true, locks }, stats);
    const inData = asked.filter(([o]) => o < 32 * MiB);
    // Before: one question per 1 MiB chunk of the run (32, and 32 more with locks for the byte window).
    t.equal(inData.length, 1, `one question inside the data run (${locks ? 'with' : 'without'} range locks): ${JSON.stringify(inData)}`);
    t.same(inData[0], [0, 64 * MiB, 1], 'asked as one extent from the chunk to the end');
    t.equal(stats.dataBytes, 32 * MiB);
    t.ok(dst.snapshot().equals(src.snapshot()), 'the target holds the source');
  }
});

t.test('an exclusive sweep (nbd-migrate copy) asks about each hole run once, on both sides', async (t) => {
  const { dev: src, asked } = recorded(64 * MiB);
  await src.write(0, [Buffer.alloc(16 * MiB, 0x5a)], { fua: false });
  await src.write(48 * MiB, [Buffer.alloc(16 * MiB, 0x5b)], { fua: false });
  const { dev: dst, asked: askedTarget } = recorded(64 * MiB);
  await dst.write(40 * MiB, [Buffer.alloc(4 * MiB, 0x77)], { fua: false }); // stale data inside the source's hole
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  const stats = newCopyStats();
  await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 64, skipTargetZeros: true, exclusive: true }, stats);
  // Before: the source was asked once per 1 MiB chunk (64), the target once per hole chunk (32).
  t.ok(asked.length <= 4, `the source asked ${asked.length} times: ${JSON.stringify(asked)}`);
  t.ok(askedTarget.length <= 4, `the target asked ${askedTarget.length} times: ${JSON.stringify(askedTarget)}`);
  t.equal(stats.zeroBytes, 4 * MiB, 'the stale range was zeroed');
  t.equal(stats.skippedBytes, 28 * MiB, 'the rest of the hole was skipped');
  t.ok(dst.snapshot().equals(src.snapshot()), 'the target holds the source');
});

t.test('a hole claim is never trusted: data written there after the question is copied', async (t) => {
  const src = new MemoryDevice(8 * MiB);
  await src.write(0, [Buffer.alloc(MiB, 0x11)], { fua: false });
  const hints = new SourceHints(src);
  t.equal(await hints.dataAt(4 * MiB), 0, 'a hole is not data');
  t.equal(await hints.dataAt(0), MiB, 'the data run from 0');
  t.equal(await hints.dataAt(4 * MiB), 0, 'asked again: still a hole');
  // A guest writes into the hole after the sweep learned of it.
  await src.write(5 * MiB, [Buffer.alloc(MiB, 0x22)], { fua: false });
  const dst = new MemoryDevice(8 * MiB);
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 8, skipTargetZeros: true, hints }, newCopyStats());
  t.ok(dst.snapshot().equals(src.snapshot()), 'the data written into the hole reached the target');
});

t.test('a stale data claim is safe: a range trimmed since reads as zeros and is zeroed', async (t) => {
  const src = new MemoryDevice(8 * MiB);
  await src.write(0, [Buffer.alloc(8 * MiB, 0x33)], { fua: false });
  const hints = new SourceHints(src);
  t.equal(await hints.dataAt(0), 8 * MiB);
  await src.trim(2 * MiB, 2 * MiB, { fua: false });
  const dst = new MemoryDevice(8 * MiB);
  await dst.write(0, [Buffer.alloc(8 * MiB, 0x77)], { fua: false });
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  const stats = newCopyStats();
  await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 8, skipTargetZeros: false, hints }, stats);
  t.ok(dst.snapshot().equals(src.snapshot()), 'the trimmed range is zero on the target');
  t.equal(stats.zeroBytes, 2 * MiB, 'sent as WRITE_ZEROES');
});

t.test('property: any layout, chunk size and depth copies exactly', async () => {
  const pages = 256; // 1 MiB in 4 KiB pages
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.constantFrom<'hole' | 'data' | 'zeros'>('hole', 'data', 'zeros'), { minLength: 1, maxLength: 24 }),
      fc.integer({ min: 1, max: 64 }),
      fc.integer({ min: 1, max: 16 }),
      fc.integer({ min: 1, max: 64 }),
      fc.boolean(),
      fc.boolean(),
      fc.boolean(),
      async (runs, runPages, chunkPages, inflight, skip, locked, exclusive) => {
        const src = new MemoryDevice(pages * PAGE);
        const dst = new MemoryDevice(pages * PAGE);
        await dst.write(0, [Buffer.alloc(pages * PAGE, 0xee)], { fua: false }); // stale bytes everywhere
        await dst.trim(PAGE * ((runPages * 7) % pages), PAGE * Math.min(runPages * 3, pages - ((runPages * 7) % pages)), { fua: false }); // and a hole
        let at = 0;
        for (let i = 0; at < pages; i++, at += runPages) {
          const kind = runs[i % runs.length]!;
          const n = Math.min(runPages, pages - at) * PAGE;
          if (kind === 'data') await src.write(at * PAGE, [Buffer.alloc(n, (i % 250) + 1)], { fua: false });
          if (kind === 'zeros') await src.write(at * PAGE, [Buffer.alloc(n)], { fua: false });
        }
        const bitmap = new DirtyBitmap(src.size, PAGE);
        bitmap.markAll();
        await copySweep(
          src,
          dst,
          bitmap,
          { chunkBytes: chunkPages * PAGE, maxInflight: inflight, skipTargetZeros: skip, locks: locked ? new RangeLock() : undefined, exclusive },
          newCopyStats(),
        );
        return dst.snapshot().equals(src.snapshot()) && bitmap.dirtyBytes() === 0;
      },
    ),
    { numRuns: 150 },
  );
});
