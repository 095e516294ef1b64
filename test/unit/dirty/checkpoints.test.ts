// Checkpoints (src/dirty/checkpoints.ts): what marks them (every change, write-through
// or not), the block status of their qemu:dirty-bitmap:NAME contexts, and how they
// persist: exact across a clean shutdown, over-reporting after a crash.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { bitmapExtents, Checkpoints, decodeBits, encodeBits, FileCheckpointStore, NBD_STATE_DIRTY } from '../../../src/dirty/checkpoints.js';
import { Export } from '../../../src/server/export.js';
import { buildStack } from '../../../src/storage/stack.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { MemoryDevice } from '../../helpers/memory-device.js';
import { ActivityLog, loggedRanges } from '../../../src/dirty/activity-log.js';
import { StateFolder } from '../../../src/dirty/state.js';

const KiB = 1024;
const G = 4 * KiB;
const SIZE = 64 * KiB + 512; // a short last block

function tmp(t: Tap): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-migrate-ckpt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}
type Tap = typeof t;

/** The dirty [offset, length] ranges of a context's extents from 0. */
async function dirtyRanges(ctx: { extents(o: number, l: number, m: number): Promise<{ length: number; flags: number }[]> }, size: number): Promise<number[][]> {
  const out: number[][] = [];
  for (let pos = 0; pos < size; ) {
    const ex = await ctx.extents(pos, size - pos, 3); // few per call: the walk resumes mid-map
    for (const e of ex) {
      if (e.length <= 0) throw new Error('an empty extent');
      if (e.flags & NBD_STATE_DIRTY) {
        const last = out[out.length - 1];
        if (last && last[0]! + last[1]! === pos) last[1]! += e.length;
        else out.push([pos, e.length]);
      }
      pos += e.length;
    }
  }
  return out;
}

t.test('every change marks every checkpoint, also one write-through sends on (which the mirror bitmap leaves clean)', async (t) => {
  const cps = new Checkpoints({ size: SIZE, granularity: G });
  const local = new MemoryDevice(SIZE);
  const s = buildStack({ local, dirtyGranularity: G, changes: cps });
  await s.device.write(0, [Buffer.alloc(10, 1)], { fua: false }); // before the checkpoint: not in it
  cps.create('a');
  await s.device.write(G + 100, [Buffer.alloc(G, 1)], { fua: false }); // blocks 1 and 2
  s.writeThrough.setWriteThrough({ target: new MemoryDevice(SIZE), locks: new RangeLock(), onError: () => undefined });
  await s.device.trim(5 * G, G, { fua: false });
  s.bitmap.clearAll();
  await s.device.zero(8 * G, 1, { fua: false, noHole: false, fast: false });
  t.equal(s.bitmap.dirtyBlocks(), 0, 'write-through left the mirror bitmap clean');
  cps.create('b');
  await s.device.write(SIZE - 10, [Buffer.alloc(10, 2)], { fua: false }); // the short last block
  const ctx = Object.fromEntries(cps.contexts().map((c) => [c.name, c]));
  t.same(Object.keys(ctx), ['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b']);
  t.same(await dirtyRanges(ctx['qemu:dirty-bitmap:a']!, SIZE), [
    [G, 2 * G],
    [5 * G, G],
    [8 * G, G],
    [16 * G, 512],
  ]);
  t.same(await dirtyRanges(ctx['qemu:dirty-bitmap:b']!, SIZE), [[16 * G, 512]], 'b holds only what came after it');
  t.equal(cps.get('a').info().dirtyBytes, 4 * G + 512);
  // A server listing shows them, and finds them by the qemu: namespaces as qemu-nbd does.
  const exp = new Export({ name: 'vm1', device: s.device, contexts: () => cps.contexts() });
  t.same(exp.matchContexts('qemu:', true).map((m) => m.name), ['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b']);
  t.same(exp.matchContexts('qemu:dirty-bitmap:', true).map((m) => m.name), ['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b']);
  t.same(exp.matchContexts('qemu:dirty-bitmap:', false), [], 'SET of the bare namespace selects nothing');
  t.same(exp.matchContexts('qemu:dirty-bitmap:b', false).map((m) => m.name), ['qemu:dirty-bitmap:b']);
  t.ok(exp.matchContexts('', true).some((m) => m.name === 'qemu:dirty-bitmap:a'), 'listed with everything');
  t.equal(new Set(exp.metaContexts.map((m) => m.id)).size, exp.metaContexts.length, 'context ids are distinct');
});

t.test('block status: bounded by length, the end and max; starts mid-block; deleted reads all dirty', async (t) => {
  const bm = new DirtyBitmap(SIZE, G);
  bm.mark(2 * G, 3 * G);
  t.same(bitmapExtents(bm, 100, G, 10), [{ length: G, flags: 0 }], 'clipped to the request');
  t.same(bitmapExtents(bm, 3 * G + 7, 100 * G, 10), [
    { length: 2 * G - 7, flags: 1 },
    { length: SIZE - 5 * G, flags: 0 },
  ], 'from mid-run to the end of the export, not past it');
  t.same(bitmapExtents(bm, 0, SIZE, 1), [{ length: 2 * G, flags: 0 }], 'max 1 (REQ_ONE)');
  const cps = new Checkpoints({ size: SIZE, granularity: G });
  cps.create('x');
  const [ctx] = cps.contexts();
  cps.delete('x');
  t.same(await ctx!.extents(0, SIZE, 10), [{ length: SIZE, flags: 1 }], 'a client that had it selected is told everything changed');
  t.throws(() => cps.get('x'), { code: 'ENOENT' });
  t.throws(() => cps.create('../etc'), { code: 'EINVAL' });
  cps.create('y');
  t.throws(() => cps.create('y'), { code: 'EEXIST' });
});

t.test('bits round-trip, also into another granularity (over-reporting, never under)', async (t) => {
  const bm = new DirtyBitmap(SIZE, G);
  for (const b of [0, 7, 8, 9, 15, 16]) bm.markBlocks(b, 1);
  const bits = encodeBits(bm);
  const same = new DirtyBitmap(SIZE, G);
  decodeBits(bits, G, same);
  t.same(bitmapExtents(same, 0, SIZE, 100), bitmapExtents(bm, 0, SIZE, 100));
  const coarse = new DirtyBitmap(SIZE, 4 * G);
  decodeBits(bits, G, coarse);
  for (const b of [0, 7, 8, 9, 15, 16]) t.ok(coarse.isDirty(Math.floor(b / 4)), `block ${b} dirty at 4x granularity`);
});

t.test('persistence: exact after a clean close, everything after a crash, deletions stay deleted', async (t) => {
  const dir = path.join(tmp(t), 'img.nbd-migrate.d');
  const open = () => {
    const events: string[] = [];
    const c = new Checkpoints({ size: SIZE, granularity: G, store: new FileCheckpointStore(dir), log: (_l, e, f) => events.push(`${e}:${f.how ?? ''}`) });
    c.open();
    return { c, events };
  };
  const first = open().c;
  t.notOk(fs.existsSync(dir), 'no folder until there is a checkpoint');
  first.create('keep');
  first.create('gone');
  first.mark(3 * G, 10);
  first.delete('gone');
  first.close();
  t.same(fs.readdirSync(dir).sort(), ['checkpoint.keep.bits', 'checkpoints.json']);

  const second = open();
  t.same(second.c.list().map((c) => [c.name, c.dirtyBytes, c.recovered]), [['keep', G, false]], 'exact after a clean close');
  t.match(second.events, ['checkpoint-restored:exact']);
  second.c.mark(10 * G, 1);
  // No close(): the process died. The store says "not clean" since the open.
  const third = open();
  const info = third.c.list()[0]!;
  t.equal(info.recovered, true);
  t.equal(info.dirtyBytes, SIZE, 'every block taken as changed: more than was written, never less');
  t.match(third.events, [/unclean shutdown/]);

  // With an activity log: the stored bits plus its extents.
  third.c.close();
  const c4 = new Checkpoints({ size: SIZE, granularity: G, store: new FileCheckpointStore(dir) });
  c4.open();
  c4.mark(12 * G, 1); // crash again
  const c5 = new Checkpoints({ size: SIZE, granularity: G, store: new FileCheckpointStore(dir), recoveredRanges: () => [[12 * G, 1]] });
  c5.open();
  t.equal(c5.list()[0]!.dirtyBytes, SIZE, 'no log kept them (attachLog) in the run that crashed: a log file there proves nothing, every block');
  c5.delete('keep');
  c5.create('fresh');
  c5.close();
  const c6 = new Checkpoints({ size: SIZE, granularity: G, store: new FileCheckpointStore(dir) });
  c6.open();
  // An activity log keeps them: at its checkpoints the bits are stored before extents leave it.
  let hook: (() => void) | undefined;
  c6.attachLog({ beforeExtentsLeave: (fn) => ((hook = fn), () => (hook = undefined)) });
  c6.mark(3 * G, 1);
  hook!();
  c6.mark(G, 1); // after the last store: the log (below, the recovered ranges) must name it
  const c7 = new Checkpoints({ size: SIZE, granularity: G, store: new FileCheckpointStore(dir), recoveredRanges: () => [[12 * G, 1]] });
  c7.open();
  t.same(c7.list().map((c) => [c.name, c.dirtyBytes]), [['fresh', 2 * G]], 'the bits stored at the log\'s checkpoint plus its extents after a crash');
  t.ok(c7.get('fresh').bitmap.isDirty(3) && c7.get('fresh').bitmap.isDirty(12), 'blocks 3 (stored) and 12 (logged)');
  t.notOk(fs.existsSync(path.join(dir, 'checkpoint.keep.bits')), 'a deleted checkpoint leaves no file');
  // A resized image: every block changed.
  c7.close();
  const c8 = new Checkpoints({ size: SIZE * 2, granularity: G, store: new FileCheckpointStore(dir) });
  c8.open();
  t.equal(c8.list()[0]!.dirtyBytes, SIZE * 2);
});

t.test('with the real activity log: a change whose extent left the log at a log checkpoint survives a crash in the stored bits', async (t) => {
  const dir = path.join(tmp(t), 'img.nbd-migrate.d');
  const E = 16 * KiB; // activity-log extent
  const size = 256 * KiB;
  const local = new MemoryDevice(size);
  const store = new FileCheckpointStore(dir);
  const cps = new Checkpoints({ size, granularity: G, store });
  cps.open();
  const s = buildStack({ local, dirtyGranularity: G, changes: cps });
  const { log } = ActivityLog.open(StateFolder.open(dir), s.bitmap, { extentBytes: E });
  s.tracking.activityLog = log;
  cps.attachLog(log);
  cps.create('ck');
  await s.device.write(E + 100, [Buffer.alloc(10, 1)], { fua: false }); // extent 1
  await log.checkpoint(); // extent 1 leaves the log: only the checkpoint's stored bits hold it now
  await s.device.write(5 * E, [Buffer.alloc(10, 2)], { fua: false }); // extent 5, in the log
  t.same(loggedRanges(StateFolder.open(dir)), [[5 * E, E]], 'the log names only the later write');
  // Crash: nothing is closed. The next start reads the log before opening it.
  const after = new Checkpoints({ size, granularity: G, store: new FileCheckpointStore(dir), recoveredRanges: () => loggedRanges(StateFolder.open(dir)) });
  after.open();
  const bm = after.get('ck').bitmap;
  t.ok(bm.isDirty(Math.floor((E + 100) / G)), 'the write before the log checkpoint: from the bits stored at it');
  t.ok(bm.isDirty(Math.floor((5 * E) / G)), 'the write after it: from the log');
  t.ok(after.get('ck').info().dirtyBytes <= 2 * E, `no more than the two extents (${after.get('ck').info().dirtyBytes} bytes)`);
  t.equal(after.get('ck').info().recovered, true);
  await log.close();
});
