/**
 * The copy engine's read buffers and its all-zero detection (issue 14): a sweep
 * reuses one buffer per chunk in flight, and allocated data that reads as zeros
 * is zeroed on the target (or skipped where the target reads as zero) instead
 * of being sent as data.
 */
import t from 'tap';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { copySweep, isAllZero, newCopyStats } from '../../../src/migration/copy.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const MiB = 1024 * 1024;

t.test('isAllZero', async (t) => {
  t.ok(isAllZero(Buffer.alloc(3 * MiB + 17)));
  const b = Buffer.alloc(3 * MiB + 17);
  b[b.length - 1] = 1;
  t.notOk(isAllZero(b), 'a non-zero last byte past the first MiB is seen');
  t.ok(isAllZero(Buffer.alloc(0)));
});

t.test('allocated zeros are not sent as data', async (t) => {
  const src = new MemoryDevice(8 * MiB);
  await src.write(0, [Buffer.alloc(2 * MiB, 0x5a)], { fua: false });
  await src.write(2 * MiB, [Buffer.alloc(4 * MiB)], { fua: false }); // allocated, all zeros
  t.ok(src.allocated.some((a, i) => a === 1 && i * 4096 >= 2 * MiB), 'the zeros are allocated on the source');
  const dst = new MemoryDevice(8 * MiB);
  await dst.write(3 * MiB, [Buffer.alloc(MiB, 0x77)], { fua: false }); // stale data where the source has zeros
  const writesBefore = dst.ops.write;
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  const stats = newCopyStats();
  await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 4, skipTargetZeros: true }, stats);
  t.equal(stats.dataBytes, 2 * MiB, 'only the non-zero data travels as data');
  t.equal(dst.ops.write - writesBefore, 2, 'two 1 MiB data writes, none for the zeros');
  t.equal(stats.zeroBytes, MiB, 'the stale MiB is zeroed');
  t.equal(stats.skippedBytes, 5 * MiB, 'zeros where the target reads as zero already are skipped');
  t.ok(dst.snapshot().equals(src.snapshot()), 'the target holds the source');
});

t.test('a sweep reuses its read buffers: one per chunk in flight', async (t) => {
  const content = Buffer.alloc(32 * MiB, 0x33);
  const seen = new Set<ArrayBufferLike>();
  const src = MemoryDevice.from(content);
  const read = src.read.bind(src);
  src.read = async (offset, length, into, at) => {
    seen.add(into.buffer);
    return read(offset, length, into, at);
  };
  const dst = new MemoryDevice(32 * MiB);
  const bitmap = new DirtyBitmap(src.size, 64 * 1024);
  bitmap.markAll();
  await copySweep(src, dst, bitmap, { chunkBytes: MiB, maxInflight: 2, skipTargetZeros: false }, newCopyStats());
  t.ok(dst.snapshot().equals(content), 'copied');
  t.ok(seen.size <= 2, `32 chunks read into ${seen.size} distinct buffers (at most 2 in flight)`);
});
