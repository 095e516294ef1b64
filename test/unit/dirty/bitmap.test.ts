import t from 'tap';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';

const K = 1024;

t.test('mark covers every block a range touches', async (t) => {
  const b = new DirtyBitmap(1024 * K, 64 * K);
  t.equal(b.blocks, 16);
  b.mark(64 * K - 1, 2); // straddles blocks 0 and 1
  t.ok(b.isDirty(0) && b.isDirty(1) && !b.isDirty(2));
  t.equal(b.dirtyBlocks(), 2);
  t.equal(b.dirtyBytes(), 128 * K);
  b.mark(0, 0);
  t.equal(b.dirtyBlocks(), 2, 'zero length marks nothing');
  b.mark(2048 * K, 10);
  t.equal(b.dirtyBlocks(), 2, 'past the end marks nothing');
});

t.test('runs are found by word scans, bounded by maxCount', async (t) => {
  const b = new DirtyBitmap(200 * 64 * K, 64 * K);
  b.markBlocks(3, 2);
  b.markBlocks(31, 40); // crosses word boundaries
  b.markBlocks(199, 1);
  t.same(b.nextRun(0, 100), { block: 3, count: 2 });
  t.same(b.nextRun(5, 100), { block: 31, count: 40 });
  t.same(b.nextRun(5, 10), { block: 31, count: 10 }, 'capped');
  t.same(b.nextRun(40, 100), { block: 40, count: 31 }, 'starting inside a run');
  t.same(b.nextRun(71, 100), { block: 199, count: 1 }, 'last block');
  t.equal(b.nextRun(200, 100), undefined);
  b.clearBlocks(31, 40);
  t.same(b.nextRun(5, 100), { block: 199, count: 1 });
  b.clearAll();
  t.equal(b.nextRun(0, 100), undefined);
  t.equal(b.dirtyBytes(), 0);
});

t.test('a partial last block counts only its bytes', async (t) => {
  const b = new DirtyBitmap(64 * K * 3 + 512, 64 * K);
  t.equal(b.blocks, 4);
  b.markAll();
  t.equal(b.dirtyBlocks(), 4);
  t.equal(b.dirtyBytes(), 64 * K * 3 + 512);
  t.same(b.nextRun(0, 1000), { block: 0, count: 4 });
});

t.test('matches a reference model on random operations', async (t) => {
  const blocks = 1000;
  const g = 4096;
  const b = new DirtyBitmap(blocks * g, g);
  const model = new Array<boolean>(blocks).fill(false);
  let seed = 42;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  for (let i = 0; i < 2000; i++) {
    if (rnd(3) === 0) {
      const start = rnd(blocks);
      const count = 1 + rnd(Math.min(80, blocks - start));
      b.clearBlocks(start, count);
      for (let j = start; j < start + count; j++) model[j] = false;
    } else {
      const offset = rnd(blocks * g);
      const length = 1 + rnd(Math.min(80 * g, blocks * g - offset));
      b.mark(offset, length);
      for (let j = Math.floor(offset / g); j <= Math.floor((offset + length - 1) / g); j++) model[j] = true;
    }
  }
  t.same(Array.from({ length: blocks }, (_, j) => b.isDirty(j)), model, 'bits match the model');
  const fromRuns = new Array<boolean>(blocks).fill(false);
  for (let run = b.nextRun(0, 37); run; run = b.nextRun(run.block + run.count, 37)) {
    t.ok(run.count >= 1 && run.count <= 37, 'run length within bounds');
    for (let j = run.block; j < run.block + run.count; j++) fromRuns[j] = true;
  }
  t.same(fromRuns, model, 'runs enumerate exactly the dirty blocks');
  t.equal(b.dirtyBlocks(), model.filter(Boolean).length, 'count matches');
});

t.test('bitmap for a 1 TiB export at 64 KiB: 16 Mi bits in 2 MiB (issue 14: at most 2 MiB per TiB)', async (t) => {
  const b = new DirtyBitmap(2 ** 40);
  t.equal(b.blocks, 16 * 1024 * 1024);
  t.equal(b.memoryBytes(), 2 * 1024 * 1024, 'one bit per block, nothing more');
  b.markAll();
  t.equal(b.dirtyBytes(), 2 ** 40);
  t.throws(() => new DirtyBitmap(4096, 3000), RangeError);
});

t.test('ranges ending on bit 31 of a word are marked and cleared (bitset setRange edge)', async (t) => {
  const b = new DirtyBitmap(128 * 4096, 4096);
  b.markBlocks(0, 32); // 0..31: ends on bit 31 of word 0
  t.equal(b.dirtyBlocks(), 32);
  b.markBlocks(40, 24); // 40..63: ends on bit 31 of word 1
  t.ok(b.isDirty(63) && b.isDirty(40));
  t.equal(b.dirtyBlocks(), 56);
  b.clearBlocks(5, 59); // 5..63
  t.equal(b.dirtyBlocks(), 5);
  b.markBlocks(95, 1);
  t.ok(b.isDirty(95), 'a single bit 31');
  b.clearBlocks(95, 1);
  t.notOk(b.isDirty(95));
});
