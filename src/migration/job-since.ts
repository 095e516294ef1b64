/**
 * mirror --since: the operator vouches that the target holds the export as of
 * a checkpoint, so the first sweep copies only the checkpoint's changed blocks.
 * Here: finding the checkpoint, spot-checking the target's seed, and the first
 * sweep's bitmap (every block without --since).
 */
import type { Logger } from '../util/log.js';
import type { Checkpoint } from '../dirty/checkpoints.js';
import { NBD_STATE_ZERO } from '../protocol/constants.js';
import { JobError } from './errors.js';
import type { MirrorSource } from './source.js';
import type { Target } from './target.js';

/** Blocks mirror --since compares between source and target before it trusts the target's seed. */
const SEED_SAMPLES = 32;

export function sinceCheckpoint(source: MirrorSource, name: string): Checkpoint {
  const set = source.checkpoints;
  if (!set) throw new JobError('EINVAL', `export "${source.name}" keeps no checkpoints: --since needs one`);
  try {
    return set.get(name);
  } catch (e) {
    throw new JobError('ENOENT', `--since ${name}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * --since is the operator's word that the target holds the export as of the checkpoint;
 * it cannot be proven, but it can be spot-checked before anything is written: blocks the
 * checkpoint holds unchanged, sampled across the source's data, must read the same on the
 * target. A target never seeded, or seeded from another disk, fails it. Resolves to the
 * offset of the first block that differs, or undefined when the samples agree.
 */
export async function seedMismatch(source: MirrorSource, target: Target, cp: Checkpoint, log: Logger): Promise<number | undefined> {
  const local = source.stack.local;
  const g = cp.bitmap.granularity;
  const data: [number, number][] = [];
  let dataBytes = 0;
  for (let pos = 0; pos < source.size; ) {
    const extents = await local.extents(pos, source.size - pos, 1024);
    if (extents.length === 0) break;
    for (const e of extents) {
      if (!(e.flags & NBD_STATE_ZERO)) data.push([pos, e.length]), (dataBytes += e.length);
      pos += e.length;
    }
  }
  const blocks = new Set<number>();
  for (let i = 0; i < SEED_SAMPLES && dataBytes > 0; i++) {
    let at = Math.floor((dataBytes * (i + 0.5)) / SEED_SAMPLES);
    const run = data.find(([, len]) => (at < len ? true : ((at -= len), false)))!;
    const block = Math.floor((run[0] + at) / g);
    if (!cp.bitmap.isDirty(block)) blocks.add(block);
  }
  let mismatch: number | undefined;
  for (const block of blocks) {
    const offset = block * g;
    const length = Math.min(g, source.size - offset);
    const [mine, theirs] = [Buffer.alloc(length), Buffer.alloc(length)];
    await local.read(offset, length, mine, 0);
    await target.read(offset, length, theirs, 0);
    // A block changed meanwhile (its mark follows its write) is no evidence either way.
    if (!mine.equals(theirs) && !cp.bitmap.isDirty(block)) {
      mismatch = offset;
      break;
    }
  }
  log.info('mirror-since', { checkpoint: cp.name, changedBytes: cp.bitmap.dirtyBytes(), sampled: blocks.size, mismatchAt: mismatch ?? null });
  return mismatch;
}

/** The first sweep's bitmap: every block, or (--since) the checkpoint's changed blocks. */
export function initialBitmap(source: MirrorSource, cp: Checkpoint | undefined, log: Logger): void {
  const bitmap = source.stack.bitmap;
  if (!cp) return bitmap.markAll();
  if (cp.deleted) {
    log.warn('mirror-since-deleted', { checkpoint: cp.name, effect: 'the checkpoint was deleted before the job began: copying everything' });
    return bitmap.markAll();
  }
  // One synchronous step: no change can land between the clear and the copy of the bits.
  bitmap.clearAll();
  const from = cp.bitmap;
  for (let run = from.nextRun(0, from.blocks); run; run = from.nextRun(run.block + run.count, from.blocks))
    bitmap.mark(run.block * from.granularity, run.count * from.granularity);
  log.info('mirror-since-bitmap', { checkpoint: cp.name, dirtyBytes: bitmap.dirtyBytes(), size: source.size });
}
