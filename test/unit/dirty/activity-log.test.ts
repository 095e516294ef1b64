// The activity log (src/dirty/activity-log.ts) in process: what waits and what
// does not, batching, what a "crash" (the files read without a close) recovers,
// the bound on the log (checkpoints), a clean close, and the state folder's
// atomic writes (src/dirty/state.ts).
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ActivityLog, BITMAP_FILE, DEFAULT_MAX_CAPACITY, LOG_FILE, logCapacity, MAX_CAPACITY, readRecovered, SLOT_CAPACITY } from '../../../src/dirty/activity-log.js';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { ExportState } from '../../../src/dirty/export-state.js';
import { defaultStateDir, StateFolder } from '../../../src/dirty/state.js';

const K = 1024;
const M = K * K;

function folder(t: Tap.Test): StateFolder {
  return StateFolder.open(path.join(t.testdir(), 'vm1.img.nbd-migrate.d'));
}

/** A write as the tracking filter does it: log first (maybe wait), then the change, then the mark. */
async function write(log: ActivityLog, bitmap: DirtyBitmap, offset: number, length: number): Promise<boolean> {
  const w = log.begin(offset, length);
  try {
    if (w) await w;
    bitmap.mark(offset, length);
  } finally {
    log.end(offset, length);
  }
  return w !== undefined;
}

t.test('state folder: default place, atomic writes, no temporary files left', async (t) => {
  t.equal(defaultStateDir('/srv/vm1.img', 'vm1', false), '/srv/vm1.img.nbd-migrate.d');
  t.equal(defaultStateDir('/dev/sdb', 'vm1', true), '/var/lib/nbd-migrate/vm1');
  const f = folder(t);
  t.equal((fs.statSync(f.dir).mode & 0o777).toString(8), '700');
  f.writeJson('a.json', { x: 1 });
  await f.writeAtomicAsync('b.bin', Buffer.from('hello'));
  t.same(f.readJson('a.json'), { x: 1 });
  t.equal(f.read('b.bin')?.toString(), 'hello');
  t.equal(f.read('missing'), undefined);
  t.same(fs.readdirSync(f.dir).sort(), ['a.json', 'b.bin'], 'no temporary files');
  f.remove('a.json');
  t.same(f.list(), ['b.bin']);
  t.throws(() => f.file('../escape'), RangeError);
});

t.test('first write into an extent waits for the log; later ones do not; concurrent first writes share one slot', async (t) => {
  const f = folder(t);
  const bitmap = new DirtyBitmap(256 * M, 64 * K);
  const { log, recovery } = ActivityLog.open(f, bitmap);
  t.equal(recovery.stored, false, 'a new folder has nothing stored');
  const before = log.stats.slotWrites;
  const waited = await Promise.all([write(log, bitmap, 0, 4 * K), write(log, bitmap, 8 * M, 4 * K), write(log, bitmap, 4 * M - 512, 1024)]);
  t.same(waited, [true, true, true]);
  t.equal(log.stats.slotWrites - before, 1, 'three first writes into three extents: one slot write');
  t.equal(log.activeExtents, 3, 'extents 0, 1 and 2');
  t.equal(await write(log, bitmap, 100 * K, 4 * K), false, 'extent 0 again: no wait');
  t.equal(log.stats.slotWrites - before, 1, 'and no slot write');
  // A crash now: the files alone give stored bits ∪ the log's extents.
  const { bitmap: rec, recovery: r } = readRecovered(f, bitmap.size, bitmap.granularity);
  t.equal(r.logExtents, 3);
  for (const off of [0, 100 * K, 8 * M, 4 * M - 512, 4 * M]) t.ok(rec.isDirty(Math.floor(off / (64 * K))), `block at ${off} recovered dirty`);
  t.equal(rec.dirtyBytes(), 12 * M, 'the three 4 MiB extents, nothing else');
  await log.close();
  const clean = readRecovered(f, bitmap.size, bitmap.granularity);
  t.equal(clean.recovery.logExtents, 0, 'a clean close empties the log');
  t.equal(clean.bitmap.dirtyBlocks(), bitmap.dirtyBlocks(), 'and stores the exact bitmap');
  t.ok(clean.bitmap.isDirty(0) && clean.bitmap.isDirty(1) && !clean.bitmap.isDirty(2));
});

t.test('a full log checkpoints: the stored bitmap takes the bits, the log starts again, nothing is lost', async (t) => {
  const f = folder(t);
  const bitmap = new DirtyBitmap(2 * SLOT_CAPACITY * 64 * K + 123, 4 * K);
  const { log } = ActivityLog.open(f, bitmap, { extentBytes: 64 * K, capacity: SLOT_CAPACITY });
  const written: number[] = [];
  for (let i = 0; i < SLOT_CAPACITY + 50; i++) {
    const off = i * 64 * K + 4 * K;
    written.push(off);
    await write(log, bitmap, off, 512);
  }
  t.ok(log.stats.checkpoints >= 1, `checkpointed ${log.stats.checkpoints} times`);
  t.ok(log.activeExtents <= SLOT_CAPACITY);
  const { bitmap: rec } = readRecovered(f, bitmap.size, bitmap.granularity);
  const lost = written.filter((o) => !rec.isDirty(Math.floor(o / (4 * K))));
  t.same(lost, [], 'every acknowledged write recovered dirty');
  t.ok(rec.dirtyBlocks() <= (SLOT_CAPACITY + 50) * 16, 'at most the written extents');
  await log.close();
});

/** The version field of the stored dirty.bitmap. */
function bitmapVersion(f: StateFolder): number {
  return f.read(BITMAP_FILE)!.readUInt32LE(8);
}

/** One write into each of extents [from, to) of 64 KiB, 200 at a time (they share slots). */
async function writeExtents(log: ActivityLog, bitmap: DirtyBitmap, from: number, to: number): Promise<void> {
  for (let e = from; e < to; e += 200) {
    const batch: Promise<boolean>[] = [];
    for (let i = e; i < Math.min(e + 200, to); i++) batch.push(write(log, bitmap, i * 64 * K + 512, 512));
    await Promise.all(batch);
  }
}

t.test('the default capacity names every extent of the export: no checkpoint, a slot bigger than 4 KiB', async (t) => {
  const f = folder(t);
  const extents = 3000;
  const bitmap = new DirtyBitmap(extents * 64 * K - 100, 4 * K);
  const { log } = ActivityLog.open(f, bitmap, { extentBytes: 64 * K });
  const slot = Math.ceil((24 + 4 * extents) / 4096) * 4096;
  t.equal(log.capacity, (slot - 24) / 4, `every extent and the rest of a ${slot}-byte slot`);
  t.equal(fs.statSync(f.file(LOG_FILE)).size, 2 * slot, 'the log file is two such slots');
  t.equal(bitmapVersion(f), 2, 'and the stored bitmap is version 2, which releases that read only 4 KiB slots refuse (they mark all dirty)');
  await writeExtents(log, bitmap, 0, extents);
  t.equal(log.stats.checkpoints, 0, 'one write into each extent never fills the log');
  t.equal(log.activeExtents, extents);
  t.equal(log.status().capacity, log.capacity, 'status shows the capacity');
  const { bitmap: rec, recovery } = readRecovered(f, bitmap.size, bitmap.granularity);
  t.equal(recovery.logExtents, extents, 'a crash now recovers every extent from the log');
  t.equal(rec.dirtyBlocks(), bitmap.blocks, 'all of the disk, as written');
  await log.close();

  t.equal(logCapacity(20_000), DEFAULT_MAX_CAPACITY, 'an export of more extents gets the default maximum');
  t.equal(DEFAULT_MAX_CAPACITY, (65536 - 24) / 4, 'a 64 KiB slot');
  t.equal(logCapacity(10), SLOT_CAPACITY, 'a small export: a 4 KiB slot');
  t.equal(logCapacity(20_000, 5), 5, 'a capacity asked for is taken as it is');
  for (const bad of [0, MAX_CAPACITY + 1, 1.5]) t.throws(() => logCapacity(10, bad), RangeError, `capacity ${bad} refused`);
});

t.test('a log of 4 KiB slots is recovered by a log with bigger ones (and back); the file takes the new size when the log starts again', async (t) => {
  const f = folder(t);
  const bitmap = new DirtyBitmap(3000 * 64 * K, 4 * K);
  const small = ActivityLog.open(f, bitmap, { extentBytes: 64 * K, capacity: SLOT_CAPACITY }).log;
  t.equal(fs.statSync(f.file(LOG_FILE)).size, 8192, 'two 4 KiB slots, as every log had before capacities grew');
  t.equal(bitmapVersion(f), 1, 'the stored bitmap is version 1, as those releases write');
  await writeExtents(small, bitmap, 100, 110);
  // A crash (no close), then a server with the default capacity.
  const fresh = new DirtyBitmap(bitmap.size, bitmap.granularity);
  const big = ActivityLog.open(f, fresh, { extentBytes: 64 * K });
  t.equal(big.recovery.logExtents, 10, 'the 4 KiB-slot log was read');
  t.equal(fresh.dirtyBytes(), 10 * 64 * K, 'its ten extents are dirty');
  t.equal(fs.statSync(f.file(LOG_FILE)).size, 2 * Math.ceil((24 + 4 * big.log.capacity) / 4096) * 4096, 'the file took the new size (two 12 KiB slots)');
  const stored = readRecovered(f, bitmap.size, bitmap.granularity);
  t.equal(stored.recovery.logExtents, 0, 'after the bitmap was stored and the log emptied');
  t.equal(stored.bitmap.dirtyBytes(), 10 * 64 * K, 'the stored bitmap holds the ten extents');
  await writeExtents(big.log, fresh, 2000, 2100);
  // Another crash, and back to 4 KiB slots.
  const again = new DirtyBitmap(bitmap.size, bitmap.granularity);
  const back = ActivityLog.open(f, again, { extentBytes: 64 * K, capacity: SLOT_CAPACITY });
  t.equal(back.recovery.logExtents, 100, 'the bigger log was read');
  t.equal(again.dirtyBytes(), 110 * 64 * K, 'stored bits and the log: all 110 extents');
  t.equal(fs.statSync(f.file(LOG_FILE)).size, 8192, 'and the file is two 4 KiB slots again');
  t.equal(bitmapVersion(f), 1, 'the stored bitmap version 1 again');
  await back.log.close();
});

t.test('checkpoint: clears reach the stored bitmap, except covered ranges and writes in flight', async (t) => {
  const f = folder(t);
  const bitmap = new DirtyBitmap(64 * M, 64 * K);
  const { log } = ActivityLog.open(f, bitmap);
  bitmap.markAll();
  await log.checkpoint();
  t.equal(readRecovered(f, bitmap.size, bitmap.granularity).bitmap.dirtyBytes(), 64 * M, 'all dirty stored');
  bitmap.clearBlocks(0, 512); // the first 32 MiB "copied"
  bitmap.clearBlocks(512, 64); // being copied: cleared, not yet acknowledged
  const uncover = log.cover(() => [[512 * 64 * K, 64 * 64 * K]]);
  // A write in flight (begun, not ended) into extent 1 at checkpoint time.
  const w = log.begin(4 * M, 4 * K);
  await log.checkpoint();
  await w;
  const rec = readRecovered(f, bitmap.size, bitmap.granularity).bitmap;
  t.notOk(rec.isDirty(0), 'copied block clean in the stored bitmap');
  t.ok(rec.isDirty(512) && rec.isDirty(575), 'covered range still dirty');
  t.ok(rec.isDirty(64), 'extent of the write in flight dirty');
  t.ok(rec.isDirty(1000), 'never-copied block dirty');
  bitmap.mark(4 * M, 4 * K);
  log.end(4 * M, 4 * K);
  uncover();
  await log.close();
});

t.test('a torn slot, a corrupt or mismatched bitmap: recovery over-reports, never under-reports', async (t) => {
  const f = folder(t);
  const bitmap = new DirtyBitmap(64 * M, 64 * K);
  const { log } = ActivityLog.open(f, bitmap);
  await write(log, bitmap, 0, 4 * K);
  await write(log, bitmap, 20 * M, 4 * K);
  // Tear the newest slot, as a crash in the middle of writing it would (its
  // writes were then never answered): the older slot is the log.
  const raw = fs.readFileSync(f.file(LOG_FILE));
  const slots = [raw.readBigUInt64LE(4), raw.readBigUInt64LE(4096 + 4)];
  const newest = slots[0]! > slots[1]! ? 0 : 1;
  raw[newest * 4096 + 30] ^= 0xff;
  fs.writeFileSync(f.file(LOG_FILE), raw);
  t.ok(readRecovered(f, bitmap.size, bitmap.granularity).bitmap.isDirty(0), 'the older slot is used');
  t.match(readRecovered(f, 32 * M, 64 * K).recovery.markedAll, /is for 67108864 bytes/, 'another size marks everything');
  const b = fs.readFileSync(f.file(BITMAP_FILE));
  b[100] ^= 1;
  fs.writeFileSync(f.file(BITMAP_FILE), b);
  const r = readRecovered(f, bitmap.size, bitmap.granularity);
  t.match(r.recovery.markedAll, /checksum/);
  t.equal(r.bitmap.dirtyBytes(), 64 * M, 'a corrupt stored bitmap marks everything');
  await log.close();
  const g = readRecovered(f, bitmap.size, 4 * K);
  t.ok(g.bitmap.isDirty(0) && g.bitmap.isDirty(15) && !g.bitmap.isDirty(16), 'another granularity converts');
});

t.test('export state: the mirror record survives a reopen', async (t) => {
  const dir = path.join(t.testdir(), 'st');
  const bitmap = new DirtyBitmap(8 * M);
  const s = ExportState.open(dir, bitmap);
  t.equal(s.mirror(), undefined);
  s.setMirror({ jobId: 'abcdef0123456789', target: 'nbd://h/vm1', destExportId: 'x', destKind: 'nbd-migrate-incoming', state: 'copying', since: 'now' });
  await s.close();
  const s2 = ExportState.open(dir, new DirtyBitmap(8 * M));
  t.equal(s2.mirror()?.jobId, 'abcdef0123456789');
  s2.setMirror(undefined);
  t.equal(s2.mirror(), undefined);
  await s2.close();
});
