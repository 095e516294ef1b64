// The read cache (src/storage/filters/read-cache.ts) over an in-memory device:
// a block read twice is read below once, the cache stays within its byte
// bound (least recently used out first), a write drops what it covers, and a
// read that raced a write keeps nothing stale.
import t from 'tap';
import { ReadCacheFilter } from '../../../../src/storage/filters/read-cache.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';

const G = 64 * 1024;

function setup(maxBytes = 4 * G) {
  const content = Buffer.alloc(32 * G);
  for (let i = 0; i < content.length; i++) content[i] = (i * 13 + (i >> 16)) & 0xff;
  let hold: Promise<void> | undefined;
  const below = MemoryDevice.from(content, { delay: (op) => (op === 'read' ? hold : undefined) });
  const f = new ReadCacheFilter(below, maxBytes, G);
  return { content, below, f, setHold: (p: Promise<void> | undefined) => (hold = p) };
}

const rd = async (f: ReadCacheFilter, o: number, l: number) => {
  const b = Buffer.alloc(l);
  await f.read(o, l, b, 0);
  return b;
};

t.test('hits, bound, invalidation', async (t) => {
  const { content, below, f } = setup();
  const a = await rd(f, G + 100, 5000);
  t.ok(a.equals(content.subarray(G + 100, G + 5100)), 'a miss answers right');
  const reads = below.ops.read;
  const b = await rd(f, G + 3000, 9000);
  t.ok(b.equals(content.subarray(G + 3000, G + 12000)), 'a hit answers right');
  t.equal(below.ops.read, reads, 'the second read of the block did not go below');
  t.equal(f.stats.hits, 1, 'one hit counted');

  for (let i = 2; i < 10; i++) await rd(f, i * G, 512);
  t.ok(f.stats.bytes <= 4 * G, `the cache stays within its bound (${f.stats.bytes} bytes)`);
  const before = below.ops.read;
  await rd(f, G, 512);
  t.equal(below.ops.read, before + 1, 'the least recently used block was evicted');

  await rd(f, 9 * G, 512);
  const w = Buffer.alloc(100, 0xee);
  await f.write(9 * G + 50, [w], { fua: false });
  const c = await rd(f, 9 * G, 512);
  const want = Buffer.from(content.subarray(9 * G, 9 * G + 512));
  w.copy(want, 50);
  t.ok(c.equals(want), 'a write drops the cached block: the next read sees the new data');
});

t.test('a read racing a write keeps nothing stale', async (t) => {
  const { f, setHold } = setup();
  let open!: () => void;
  setHold(new Promise<void>((r) => (open = r)));
  const racing = rd(f, 3 * G, 512); // reads old data below, held
  await new Promise((r) => setImmediate(r));
  setHold(undefined);
  const w = Buffer.alloc(512, 0x77);
  const writing = f.write(3 * G, [w], { fua: false });
  open();
  await Promise.all([racing, writing]);
  const after = await rd(f, 3 * G, 512);
  t.ok(after.equals(w), 'after the write completes, reads return the written data');
});
