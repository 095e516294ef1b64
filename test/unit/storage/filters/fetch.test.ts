// The post-copy fetch filter (src/storage/filters/fetch.ts) over in-memory
// devices: the local image starts empty, the source holds the disk. Reads of
// absent blocks are fetched once however many readers wait, neighbouring
// blocks asked in one turn go out as one request, sequential reads fetch
// ahead, writes that cover a block in part fetch it first, and the fill skips
// the source's holes.
import t from 'tap';
import { DirtyBitmap } from '../../../../src/dirty/bitmap.js';
import type { Extent } from '../../../../src/storage/device.js';
import { FetchFilter, type FetchSource } from '../../../../src/storage/filters/fetch.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';

const G = 64 * 1024;
const SIZE = 64 * G;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff || 1;
  return b;
}

/** The source disk: data everywhere but blocks 40..47 (a hole); every request recorded; reads can be held. */
function setup(opts: { readAheadBytes?: number } = {}) {
  const content = pattern(SIZE, 3);
  content.fill(0, 40 * G, 48 * G);
  const srcDev = MemoryDevice.from(content);
  const reads: Array<[number, number]> = [];
  let gate: Promise<void> | undefined;
  let open: (() => void) | undefined;
  const source: FetchSource & { hold(): void; release(): void } = {
    async read(o, l, into, at) {
      reads.push([o, l]);
      if (gate) await gate;
      return srcDev.read(o, l, into, at);
    },
    extents(o, l, m): Promise<Extent[]> {
      return srcDev.extents(o, l, m);
    },
    hold() {
      gate = new Promise((r) => (open = r));
    },
    release() {
      gate = undefined;
      open?.();
    },
  };
  const local = new MemoryDevice(SIZE);
  const absent = new DirtyBitmap(SIZE, G);
  absent.markAll();
  let persisted = 0;
  const f = new FetchFilter(local, absent, source, { readAheadBytes: opts.readAheadBytes ?? 0, persist: async () => void persisted++ });
  return { content, source, reads, local, absent, f, persisted: () => persisted };
}

const readF = async (f: FetchFilter, o: number, l: number) => {
  const b = Buffer.alloc(l);
  await f.read(o, l, b, 0);
  return b;
};

t.test('concurrent reads of one absent block share one fetch', async (t) => {
  const { f, reads, source, content, absent } = setup();
  source.hold();
  const all = Array.from({ length: 8 }, (_, i) => readF(f, 5 * G + i * 512, 512));
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setImmediate(r));
  t.same(reads, [[5 * G, G]], 'eight readers of block 5, one request to the source');
  source.release();
  const got = await Promise.all(all);
  got.forEach((b, i) => t.ok(b.equals(content.subarray(5 * G + i * 512, 5 * G + i * 512 + 512)), `reader ${i} got the source's bytes`));
  t.notOk(absent.isDirty(5), 'block 5 is present');
  await readF(f, 5 * G, G);
  t.equal(reads.length, 1, 'a later read of it does not go to the source');
});

t.test('neighbouring fetches coalesce; a sequential read fetches ahead', async (t) => {
  const { f, reads, content } = setup();
  const [a, b] = await Promise.all([readF(f, 10 * G, G), readF(f, 11 * G + 100, 4096)]);
  t.same(reads, [[10 * G, 2 * G]], 'blocks 10 and 11 asked in one turn: one request');
  t.ok(a.equals(content.subarray(10 * G, 11 * G)) && b.equals(content.subarray(11 * G + 100, 11 * G + 4196)), 'both answered right');

  const ra = setup({ readAheadBytes: 4 * G });
  await readF(ra.f, 0, G);
  await readF(ra.f, G, G); // sequential: blocks 2..5 fetched ahead
  await new Promise((r) => setImmediate(r));
  t.ok(ra.reads.some(([o, l]) => o === 2 * G && l === 4 * G), 'a sequential read fetched the next 4 blocks ahead', { diag: { reads: ra.reads } });
  const before = ra.reads.length;
  await ra.f.whenGuestsIdle();
  await new Promise((r) => setTimeout(r, 0));
  const c = await readF(ra.f, 3 * G, G);
  t.ok(c.equals(ra.content.subarray(3 * G, 4 * G)), 'read-ahead data is right');
  t.ok(ra.reads.length <= before + 1, 'the read of a block fetched ahead did not go to the source again (or joined it)');
});

t.test('unaligned writes fetch the partial blocks first: no stale or zero bytes', async (t) => {
  const { f, content, reads, local } = setup();
  // From the middle of block 20 to the middle of block 22.
  const off = 20 * G + 1000;
  const data = Buffer.alloc(2 * G, 0xab);
  await f.write(off, [data], { fua: false });
  t.same(
    reads.map(([o]) => o / G).sort((x, y) => x - y),
    [20, 22],
    'the head and tail blocks were fetched; the block covered whole (21) was not',
  );
  const got = await readF(f, 20 * G, 3 * G);
  const want = Buffer.from(content.subarray(20 * G, 23 * G));
  data.copy(want, 1000);
  t.ok(got.equals(want), 'the three blocks read back as source data around the write');
  const raw = Buffer.alloc(3 * G);
  await local.read(20 * G, 3 * G, raw, 0);
  t.ok(raw.equals(want), 'and the local image holds exactly that');

  // A write covering block 30 whole needs nothing from the source, and a late fetch never lands over it.
  const r2 = setup();
  r2.source.hold();
  const pending = readF(r2.f, 30 * G, 512); // fetch of block 30 in flight, holding old data
  await new Promise((r) => setImmediate(r));
  const mine = Buffer.alloc(G, 0x5a);
  await r2.f.write(30 * G, [mine], { fua: true });
  t.equal(r2.persisted(), 1, 'FUA persisted the map');
  r2.source.release();
  await pending;
  const after = await readF(r2.f, 30 * G, G);
  t.ok(after.equals(mine), 'the write survives the fetch that was in flight before it');
});

t.test('trim and write zeroes mark present; block status per side; fill skips holes', async (t) => {
  const { f, absent, reads, content } = setup();
  await f.zero(2 * G + 10, 100, { fua: false, noHole: false, fast: false });
  const z = await readF(f, 2 * G, G);
  const want = Buffer.from(content.subarray(2 * G, 3 * G));
  want.fill(0, 10, 110);
  t.ok(z.equals(want), 'a partial WRITE_ZEROES kept the rest of the block');
  await f.trim(6 * G, 2 * G, { fua: false });
  t.notOk(absent.isDirty(6) || absent.isDirty(7), 'TRIM of whole blocks marks them present');
  t.notOk(reads.some(([o]) => o === 6 * G), 'without fetching them');
  await f.trim(9 * G + 5, 100, { fua: false });
  t.ok(absent.isDirty(9), 'a TRIM of part of an absent block leaves it absent');

  const ext = await f.extents(40 * G, 8 * G, 16);
  t.ok(ext.every((e) => e.flags & 2), 'absent blocks answered from the source map (a hole there)', { diag: { ext } });

  const n = reads.length;
  await f.fill(36, 12);
  const filled = reads.slice(n);
  t.ok(filled.every(([o, l]) => o + l <= 40 * G), 'the fill did not read the hole over the wire', { diag: { filled } });
  for (let b = 36; b < 48; b++) t.notOk(absent.isDirty(b), `block ${b} present`);
  const h = await readF(f, 36 * G, 12 * G);
  t.ok(h.equals(content.subarray(36 * G, 48 * G)), 'filled blocks read as the source');
  t.equal(reads.length, n + filled.length, 'reading them after the fill asks the source nothing');
});

t.test('the fill asks the source\'s map a window at a time, not per chunk; a failed query is asked again', async (t) => {
  const content = pattern(SIZE, 9);
  content.fill(0, 16 * G, 24 * G); // a hole in the second window
  const srcDev = MemoryDevice.from(content);
  const queries: Array<[number, number]> = [];
  const reads: Array<[number, number]> = [];
  let failNext = false;
  const source: FetchSource = {
    read: (o, l, into, at) => (reads.push([o, l]), srcDev.read(o, l, into, at)),
    async extents(o, l, m) {
      queries.push([o, l]);
      if (failNext) {
        failNext = false;
        throw new Error('the source went away');
      }
      return srcDev.extents(o, l, m);
    },
  };
  const local = new MemoryDevice(SIZE);
  const absent = new DirtyBitmap(SIZE, G);
  absent.markAll();
  const f = new FetchFilter(local, absent, source, { readAheadBytes: 0, fillMapBytes: 16 * G });
  // Chunks of 2 blocks, 4 at a time (as postcopy-fill.ts does), over the first half.
  for (let b = 0; b < 32; b += 8) await Promise.all([0, 2, 4, 6].map((d) => f.fill(b + d, 2)));
  t.same(queries, [[0, 16 * G], [16 * G, 16 * G]], 'two map queries for 16 chunks: one per window, shared by concurrent chunks');
  t.notOk(reads.some(([o, l]) => o < 24 * G && o + l > 16 * G), 'the hole the map showed was not read');
  // A failed query fails its chunk and drops the window; the next chunk asks again.
  failNext = true;
  const before = queries.length;
  await t.rejects(f.fill(32, 2), /went away/);
  await f.fill(32, 2);
  t.same(queries.slice(before), [[32 * G, 16 * G], [32 * G, 16 * G]], 'asked again after the failure');
  for (let b = 34; b < 64; b += 2) await f.fill(b, 2);
  t.equal(absent.dirtyBlocks(), 0, 'everything present');
  const whole = Buffer.alloc(SIZE);
  await local.read(0, SIZE, whole, 0);
  t.ok(whole.equals(content), 'the local image is the source');
  t.equal(queries.length, before + 3, 'one more query for the last window');
});

t.test('fileRange: never while fetching (reads drive read-ahead), passed on once detached', async (t) => {
  const content = pattern(SIZE, 5);
  const source: FetchSource = { read: (o, l, into, at) => MemoryDevice.from(content).read(o, l, into, at), extents: (o, l, m) => MemoryDevice.from(content).extents(o, l, m) };
  class FileBacked extends MemoryDevice {
    fileRange(offset: number): { fd: number; position: number } {
      return { fd: 99, position: offset };
    }
  }
  const local = new FileBacked(SIZE);
  const absent = new DirtyBitmap(SIZE, G);
  absent.markAll();
  const f = new FetchFilter(local, absent, source, { readAheadBytes: 0, persist: async () => {} });
  t.equal(f.fileRange(0, G), undefined, 'absent: the read must fetch');
  await f.fill(0, SIZE / G);
  t.equal(absent.dirtyBlocks(), 0, 'filled');
  t.equal(f.fileRange(0, G), undefined, 'present but not yet detached');
  f.detach();
  t.same(f.fileRange(3 * G, G), { fd: 99, position: 3 * G }, 'detached: the image file below');
});
