// Property tests: the copy engine (src/migration/copy.ts copySweep) against
// the plainest model there is, the source itself. A random sparse source
// (data, allocated zeros, holes) behind a DirtyTrackingDevice, a target full
// of garbage (or holes, or both), the bitmap all dirty; sweeps run while
// random guest writes, trims and zeroes go through the export's device stack
// (src/storage/stack.ts: dirty tracking, and in some runs write-through under
// the range lock it shares with the copy), every device
// operation on both sides takes a random number of event-loop steps, and the
// target fails some requests (transient EIO, or a lost connection) with
// retries on or off. Checked:
//   - once the guest has stopped and a sweep leaves the bitmap empty, the
//     target holds exactly what the source holds (holes included: they read
//     as zeros on the target, whatever it held before);
//   - a sweep that fails leaves the blocks of the failed request dirty;
//   - sweeps converge (bounded number of sweeps).
// FC_SEED / FC_RUNS replay or lengthen a run.

import t from 'tap';
import fc from 'fast-check';
import { copySweep, newCopyStats } from '../../../src/migration/copy.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { DeviceError } from '../../../src/storage/device.js';
import { buildStack } from '../../../src/storage/stack.js';
import { MemoryDevice, type DeviceOp } from '../../helpers/memory-device.js';
import { Rng } from '../../fuzz/lib/prng.js';
import { checkProperty, fcParams } from './fc.js';

interface Region {
  offset: number;
  length: number;
  kind: 'data' | 'zeros';
}

interface GuestOp {
  delay: number;
  op: 'write' | 'trim' | 'zero' | 'zero-nohole';
  offset: number;
  length: number;
}

interface Scenario {
  granularity: number;
  size: number;
  regions: Region[];
  target: 'garbage' | 'holes' | 'mixed';
  chunkBlocks: number;
  maxInflight: number;
  skipTargetZerosFirst: boolean;
  locks: boolean;
  writeThrough: boolean;
  retries: number;
  /** Target requests (by their number) that fail, and how. */
  failures: Array<{ at: number; code: 'EIO' | 'ECONNRESET' }>;
  guest: GuestOp[];
  seed: number;
}

const scenario: fc.Arbitrary<Scenario> = fc
  .record({
    granularity: fc.constantFrom(512, 4096, 16384),
    blocks: fc.integer({ min: 1, max: 48 }),
    tail: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 511 })),
  })
  .map(({ granularity, blocks, tail }) => ({ granularity, size: Math.max(1, blocks * granularity - tail) }))
  .chain(({ granularity, size }) => {
    const range = fc.integer({ min: 0, max: size - 1 }).chain((offset) => fc.record({ offset: fc.constant(offset), length: fc.integer({ min: 1, max: Math.min(size - offset, 3 * granularity + 100) }) }));
    return fc.record({
      granularity: fc.constant(granularity),
      size: fc.constant(size),
      regions: fc.array(fc.tuple(range, fc.constantFrom('data' as const, 'data' as const, 'zeros' as const)).map(([r, kind]) => ({ ...r, kind })), { maxLength: 8 }),
      target: fc.constantFrom('garbage' as const, 'holes' as const, 'mixed' as const),
      chunkBlocks: fc.integer({ min: 1, max: 8 }),
      maxInflight: fc.integer({ min: 1, max: 4 }),
      skipTargetZerosFirst: fc.boolean(),
      locks: fc.boolean(),
      writeThrough: fc.boolean(),
      retries: fc.constantFrom(0, 0, 1, 3),
      failures: fc.array(fc.record({ at: fc.integer({ min: 0, max: 60 }), code: fc.constantFrom('EIO' as const, 'ECONNRESET' as const) }), { maxLength: 4 }),
      guest: fc.array(
        fc.tuple(fc.integer({ min: 0, max: 30 }), fc.constantFrom('write' as const, 'write' as const, 'trim' as const, 'zero' as const, 'zero-nohole' as const), range).map(([delay, op, r]) => ({ delay, op, ...r })),
        { maxLength: 16 },
      ),
      seed: fc.integer(),
    });
  })
  .map((s) => ({ ...s, locks: s.locks || s.writeThrough })); // write-through needs the lock it shares with the copy

/** An error a test can trace back to the request that failed. */
class InjectedError extends DeviceError {
  constructor(
    code: string,
    readonly op: DeviceOp,
    readonly offset: number,
    readonly length: number,
  ) {
    super(code, `injected ${code} on target ${op} ${offset}+${length}`);
  }
}

async function run(s: Scenario): Promise<void> {
  const rng = new Rng(s.seed);
  // Every device operation waits 0-3 steps, each a microtask or a macrotask: the interleavings.
  const delay = () => {
    const n = rng.int(4);
    if (n === 0) return undefined;
    return (async () => {
      for (let i = 0; i < n; i++) await (rng.chance(0.5) ? Promise.resolve() : new Promise<void>((r) => setImmediate(r)));
    })();
  };
  const source = new MemoryDevice(s.size, { delay });
  for (const r of s.regions) {
    const data = r.kind === 'data' ? rng.bytes(r.length) : Buffer.alloc(r.length);
    await source.write(r.offset, [data], { fua: false });
  }
  let targetOps = 0;
  let armed = false; // set-up requests are not among those that fail
  const failAt = new Map(s.failures.map((f) => [f.at, f.code]));
  const target = new MemoryDevice(s.size, {
    delay,
    fail: (op, offset, length) => {
      if (!armed || (op !== 'write' && op !== 'zero')) return undefined;
      const code = failAt.get(targetOps++);
      return code ? new InjectedError(code, op, offset, length) : undefined;
    },
  });
  if (s.target !== 'holes') {
    const garbage = Buffer.alloc(s.size, 0xee);
    if (s.target === 'mixed') for (let o = 0; o < s.size; o += 2 * 4096) garbage.fill(0, o, Math.min(s.size, o + 4096));
    await target.write(0, [garbage], { fua: false });
    if (s.target === 'mixed') for (let o = 0; o < s.size; o += 2 * 4096) await target.trim(o, Math.min(4096, s.size - o), { fua: false });
  }
  armed = true;

  // The export's stack over the source: guests write through its top; the copy reads the image below it.
  const stack = buildStack({ local: source, dirtyGranularity: s.granularity });
  const bitmap = stack.bitmap;
  bitmap.markAll();
  const tracking = stack.device;
  const locks = s.locks ? new RangeLock() : undefined;
  if (s.writeThrough) stack.writeThrough.setWriteThrough({ target, locks: locks!, onError: () => undefined });

  let guestDone = false;
  const guest = Promise.all(
    s.guest.map(async (g) => {
      for (let i = 0; i < g.delay; i++) await new Promise<void>((r) => setImmediate(r));
      const write = () => tracking.write(g.offset, [rng.bytes(g.length)], { fua: false });
      const p =
        g.op === 'write'
          ? write()
          : g.op === 'trim'
            ? tracking.trim(g.offset, g.length, { fua: false })
            : tracking.zero(g.offset, g.length, { fua: false, noHole: g.op === 'zero-nohole', fast: false });
      await p; // the source is local and never fails; a failed write-through only marks the range
    }),
  ).then(() => {
    guestDone = true;
  });

  const stats = newCopyStats();
  for (let sweep = 0; ; sweep++) {
    if (sweep > 200) throw new Error(`no convergence after 200 sweeps: ${bitmap.dirtyBlocks()} blocks still dirty`);
    try {
      await copySweep(
        stack.local,
        target,
        bitmap,
        { chunkBytes: s.chunkBlocks * s.granularity, maxInflight: s.maxInflight, locks, skipTargetZeros: sweep === 0 && s.skipTargetZerosFirst, retries: s.retries },
        stats,
      );
    } catch (e) {
      if (!(e instanceof InjectedError)) throw e;
      // The request that failed: its blocks must be dirty again (nothing clears bits between sweeps).
      const first = Math.floor(e.offset / s.granularity);
      const last = Math.floor((e.offset + e.length - 1) / s.granularity);
      for (let b = first; b <= last; b++) if (!bitmap.isDirty(b)) throw new Error(`sweep ${sweep} failed on target ${e.op} ${e.offset}+${e.length} (${e.code}), but block ${b} is not dirty`);
    }
    if (guestDone && bitmap.dirtyBlocks() === 0) break;
    await new Promise<void>((r) => setImmediate(r));
  }
  await guest;
  const want = source.snapshot();
  const got = target.snapshot();
  if (!got.equals(want)) {
    let at = 0;
    while (at < s.size && got[at] === want[at]) at++;
    throw new Error(`the bitmap is empty but the target differs from the source at byte ${at} (block ${Math.floor(at / s.granularity)}): target ${got[at]}, source ${want[at]}`);
  }
  if (!target.holesAreZero()) throw new Error('the target reports holes that hold data');
}

t.test('copy sweeps with interleaved guest writes and target failures converge to the source', async (t) => {
  await checkProperty(t, 'copy engine', fc.asyncProperty(scenario, run), fcParams({ numRuns: 250 }));
});
