/**
 * The copy engine: one sweep over the dirty bitmap, copying each dirty run
 * from a source Device to a target Device, sparse-aware (holes become
 * WRITE_ZEROES, or nothing at all where the target already reads as zero).
 *
 * Ordering rule: a chunk's bits are cleared *before* its data is read, under a
 * range lock. A guest write that lands during the copy marks the bits again
 * (after its local write), so the next sweep copies the block again; the lock
 * keeps two copies of one block, or a copy and a write-through, from racing
 * on the target, so stale data can never land last.
 *
 * Bounds: `maxInflight` chunks are in flight, and of them at most
 * `maxInflightBytes` of data between its read and the target's answer. The
 * two are apart so that holes (a block-status round trip to the target each,
 * and no data) never stall the data behind them: across a WAN a round trip is
 * 80 ms, and the byte window must cover the bandwidth-delay product (1 Gbit/s
 * x 80 ms = 10 MB; the default 32 MiB covers 3 Gbit/s, or 1 Gbit/s at 250 ms).
 *
 * Buffers: a sweep reads into buffers it reuses (one per chunk in flight), not a
 * fresh one per chunk: fresh memory costs a page fault per 4 KiB and GC work
 * (about a third of the mirror's CPU). Data that reads as all zeros is sent
 * as WRITE_ZEROES (or skipped where the target reads as zero already), as
 * qemu-img's -S does: across a WAN every byte sent costs.
 */
import { NBD_STATE_ZERO } from '../protocol/constants.js';
import type { Device, Extent } from '../storage/device.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import { BufferPool, isAllZero } from '../util/buffers.js';
import type { RangeLock } from '../util/range-lock.js';
import { targetErrorKind } from './target-errors.js';
import type { RateLimiter } from '../util/token-bucket.js';

export interface CopyOptions {
  chunkBytes: number;
  maxInflight: number;
  locks?: RangeLock;
  limiter?: RateLimiter;
  /** Ask the target which ranges already read as zero and skip zeroing them (the first sweep). */
  skipTargetZeros: boolean;
  /** Checked between chunks: stop the sweep early. */
  shouldStop?: () => boolean;
  /**
   * A target request that fails with an error that may pass (EIO; see
   * target-errors.ts) is sent again on the same connection, up to this many
   * times with a short backoff (default 0). Lost connections and permanent
   * errors are never retried here.
   */
  retries?: number;
  /** Told about each retried request. */
  onRetry?: (e: unknown, attempt: number) => void;
  /** Read buffers to reuse; a sweep makes its own when none is given. */
  buffers?: BufferPool;
  /** Data bytes in flight (read, not yet acknowledged by the target); default DEFAULT_WINDOW_BYTES. */
  maxInflightBytes?: number;
  /** The sweep's byte window (made from maxInflightBytes). */
  window?: ByteWindow;
  /** Window bytes a chunk took before its range lock (copyRun); copyRange draws on them first. */
  reserve?: { left: number };
  /** Before each new chunk: a promise to wait for first, if any (a background sweep yields to another job's cutover). */
  pauseBefore?: () => Promise<void> | undefined;
  /** The source's data runs learned so far (a sweep makes its own when none is given). */
  hints?: SourceHints;
  /**
   * Nothing but this sweep writes the source or the target while it runs (`nbd-migrate copy`):
   * hole claims are reused too, the source's and, with skipTargetZeros, the target's (each
   * range is written by one chunk only, so what the target said of a hole stays true).
   */
  exclusive?: boolean;
  /** The target's runs learned so far (made by the sweep when `exclusive` and skipTargetZeros). */
  targetHints?: SourceHints;
}

/** Default bound on data in flight: covers the bandwidth-delay product of 1 Gbit/s at 250 ms. */
export const DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024;

/** A byte budget handed out first come, first served; a request larger than the whole budget goes alone. */
export class ByteWindow {
  private used = 0;
  private readonly waiting: Array<{ n: number; go: () => void }> = [];
  constructor(readonly limit: number) {}

  async acquire(n: number): Promise<void> {
    if (this.waiting.length === 0 && (this.used === 0 || this.used + n <= this.limit)) {
      this.used += n;
      return;
    }
    await new Promise<void>((go) => this.waiting.push({ n, go }));
  }

  /**
   * Takes `n` bytes at once, past the limit if need be: for a chunk that already holds
   * window bytes (its share, sized from the map before its range lock) and finds more data
   * than that share. Waiting in the queue would deadlock: the chunks ahead of it wait for
   * bytes that the holders, themselves waiting for more, never give back. The overshoot is
   * bounded by what guests wrote into ranges being copied.
   */
  take(n: number): void {
    this.used += n;
  }

  release(n: number): void {
    this.used -= n;
    while (this.waiting.length > 0) {
      const next = this.waiting[0]!;
      if (this.used !== 0 && this.used + next.n > this.limit) break;
      this.waiting.shift();
      this.used += next.n;
      next.go();
    }
  }
}

// Reused read buffers (one per chunk in flight, returned once the target has the data) and the zero test.
export { BufferPool, isAllZero };

export const DEFAULT_COPY_OPTIONS: CopyOptions = { chunkBytes: 4 * 1024 * 1024, maxInflight: 64, skipTargetZeros: false, retries: 0 };

type TargetOpts = Pick<
  CopyOptions,
  'limiter' | 'skipTargetZeros' | 'shouldStop' | 'retries' | 'onRetry' | 'buffers' | 'window' | 'reserve' | 'hints' | 'targetHints'
>;

/** Runs one target request, retrying transient target errors (bounded). */
async function onTarget<T>(opts: TargetOpts, op: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await op();
    } catch (e) {
      if (attempt > (opts.retries ?? 0) || targetErrorKind(e) !== 'transient' || opts.shouldStop?.()) throw e;
      opts.onRetry?.(e, attempt);
      await new Promise((r) => setTimeout(r, Math.min(20 * 2 ** (attempt - 1), 1000)));
    }
  }
}

export interface CopyStats {
  /** Bytes of data read and written. */
  dataBytes: number;
  /** Bytes zeroed on the target. */
  zeroBytes: number;
  /** Bytes of holes skipped because the target already read as zero. */
  skippedBytes: number;
}

export function newCopyStats(): CopyStats {
  return { dataBytes: 0, zeroBytes: 0, skippedBytes: 0 };
}

/** A chunk given up because the sweep is stopping; its blocks are marked dirty again. */
export class CopyStopped extends Error {
  override readonly name = 'CopyStopped';
  constructor() {
    super('copy stopped');
  }
}

/** Max extents asked for at once from either side. */
const EXTENT_BATCH = 1024;

/**
 * What a sweep has learned of the source's allocation, one run at a time: a run is asked
 * for once, as one extent from where a chunk starts to the device's end, and chunks inside
 * a data run read without asking again. A data claim stays safe however old it is (a range
 * trimmed since reads as zeros, and zeros go out as WRITE_ZEROES); a hole claim is never
 * used, a chunk there asks afresh, after its bits were cleared (a guest may have written).
 *
 * Why: tmpfs answers SEEK_HOLE by walking every cached page up to the hole, so asking per
 * 4 MiB chunk walked a 64 MiB data run 16 times (perf: 7.5 % of `copy`'s samples in
 * mapping_seek_hole_data); an NBD source answers one question per run instead of per chunk.
 */
export class SourceHints {
  /** The runs learned last, newest first (chunks in flight span a few). */
  private runs: Array<{ start: number; end: number; data: boolean }> = [];
  private pending: { start: number; done: Promise<void> } | undefined;
  /** Questions asked (for tests). */
  probes = 0;
  /** `trustHoles`: nothing else writes the device (an exclusive sweep): hole claims hold too. */
  constructor(
    private readonly source: Device,
    private readonly trustHoles = false,
  ) {}

  /** Bytes from `pos` known to be data (0: not known; ask the source). */
  async dataAt(pos: number): Promise<number> {
    const r = await this.runAt(pos);
    return r && !(r.flags & NBD_STATE_ZERO) ? r.length : 0;
  }

  /** The run from `pos` as far as it is known (data always; a hole only when holes are trusted), else undefined: ask. */
  async runAt(pos: number): Promise<Extent | undefined> {
    // A few rounds: chunks launched together wait for the question on its way from before
    // them, and the first one past its answer asks the next (one question per run).
    for (let round = 0; round < 4; round++) {
      const r = this.runs.find((x) => pos >= x.start && pos < x.end);
      if (r)
        return r.data ? { length: r.end - pos, flags: 0 } : this.trustHoles ? { length: r.end - pos, flags: NBD_STATE_ZERO } : undefined;
      const p = this.pending ?? this.probe(pos);
      if (p.start > pos) return undefined;
      await p.done;
    }
    return undefined;
  }

  private probe(pos: number): { start: number; done: Promise<void> } {
    this.probes++;
    const p = {
      start: pos,
      done: this.source.extents(pos, this.source.size - pos, 1).then(
        (e) => {
          const first = e[0];
          if (first && first.length > 0) {
            this.runs.unshift({ start: pos, end: pos + first.length, data: !(first.flags & NBD_STATE_ZERO) });
            if (this.runs.length > 16) this.runs.pop();
          }
        },
        () => undefined, // the chunk asks again and sees the error itself
      ),
    };
    this.pending = p;
    void p.done.then(() => {
      if (this.pending === p) this.pending = undefined;
    });
    return p;
  }
}

/**
 * Copies every block dirty at the time the sweep reaches it. Rejects with the
 * first failure once in-flight chunks settle; failed chunks are marked dirty again.
 */
export async function copySweep(
  source: Device,
  target: Device,
  bitmap: DirtyBitmap,
  opts: CopyOptions,
  stats: CopyStats,
): Promise<void> {
  const chunkBlocks = Math.max(1, Math.floor(opts.chunkBytes / bitmap.granularity));
  const inflight = new Set<Promise<void>>();
  let failure: unknown;
  let cursor = 0;
  // Once one chunk fails (the target is likely gone), the others stop at their next step.
  const stopped = () => failure !== undefined || (opts.shouldStop?.() ?? false);
  const windowBytes = opts.maxInflightBytes ?? DEFAULT_WINDOW_BYTES;
  const runOpts = {
    ...opts,
    shouldStop: stopped,
    window: opts.window ?? new ByteWindow(windowBytes),
    buffers: opts.buffers ?? new BufferPool(opts.chunkBytes, Math.min(opts.maxInflight, Math.ceil(windowBytes / opts.chunkBytes) + 1)),
    hints: opts.hints ?? new SourceHints(source, opts.exclusive),
    targetHints: opts.targetHints ?? (opts.exclusive && opts.skipTargetZeros ? new SourceHints(target, true) : undefined),
  };
  while (!stopped()) {
    const pause = opts.pauseBefore?.();
    if (pause) {
      await pause;
      if (stopped()) break;
    }
    const run = bitmap.nextRun(cursor, chunkBlocks);
    if (!run) break;
    cursor = run.block + run.count;
    const p = copyRun(source, target, bitmap, run.block, run.count, runOpts, stats).catch((e) => {
      if (!(e instanceof CopyStopped)) failure ??= e;
    });
    const tracked = p.finally(() => inflight.delete(tracked));
    inflight.add(tracked);
    if (inflight.size >= opts.maxInflight) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  if (failure !== undefined) throw failure;
}

async function copyRun(
  source: Device,
  target: Device,
  bitmap: DirtyBitmap,
  block: number,
  count: number,
  opts: CopyOptions,
  stats: CopyStats,
): Promise<void> {
  const offset = block * bitmap.granularity;
  const length = Math.min(count * bitmap.granularity, source.size - offset);
  // With range locks (a mirror: write-through shares them), the chunk waits for the byte
  // window before it takes its lock, for the data the source's map shows now (a hint: what
  // a guest adds meanwhile is charged inside): a chunk waiting for the window must not hold
  // up guest writes to its range. Holes take nothing from the window.
  let reserved = 0;
  if (opts.locks && opts.window) {
    if (((await opts.hints?.dataAt(offset)) ?? 0) >= length) reserved = length;
    else for (const e of await source.extents(offset, length, EXTENT_BATCH)) if (!(e.flags & NBD_STATE_ZERO)) reserved += e.length;
    reserved = Math.min(reserved, length);
    await opts.window.acquire(reserved);
  }
  try {
    const release = opts.locks ? await opts.locks.acquire(offset, length) : undefined;
    bitmap.clearBlocks(block, count);
    try {
      await copyRange(source, target, offset, length, reserved ? { ...opts, reserve: { left: reserved } } : opts, stats);
    } catch (e) {
      bitmap.markBlocks(block, count);
      throw e;
    } finally {
      release?.();
    }
  } finally {
    if (reserved) opts.window!.release(reserved);
  }
}

/** Copies [offset, offset + length) by the source's allocation map. */
export async function copyRange(
  source: Device,
  target: Device,
  offset: number,
  length: number,
  opts: TargetOpts,
  stats: CopyStats,
): Promise<void> {
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    if (opts.shouldStop?.()) throw new CopyStopped();
    const known = await opts.hints?.runAt(pos);
    const extents = known ? [{ length: Math.min(known.length, end - pos), flags: known.flags }] : await source.extents(pos, end - pos, EXTENT_BATCH);
    for (const e of extents) {
      const n = Math.min(e.length, end - pos);
      if (n <= 0) break;
      if (e.flags & NBD_STATE_ZERO) await zeroRange(target, pos, n, opts, stats);
      else {
        if (opts.limiter) await opts.limiter.take(n, opts.shouldStop);
        if (opts.shouldStop?.()) throw new CopyStopped();
        const reserved = opts.reserve ? Math.min(n, opts.reserve.left) : 0;
        if (opts.reserve) opts.reserve.left -= reserved;
        const extra = n - reserved;
        // A chunk holding a share never queues for more (ByteWindow.take).
        if (extra > 0) {
          if (opts.reserve) opts.window?.take(extra);
          else await opts.window?.acquire(extra);
        }
        let zeros = false;
        try {
          if (opts.shouldStop?.()) throw new CopyStopped();
          const whole = opts.buffers ? opts.buffers.get(n) : Buffer.allocUnsafe(n);
          const buf = whole.length === n ? whole : whole.subarray(0, n);
          await source.read(pos, n, buf, 0);
          zeros = isAllZero(buf);
          if (zeros) opts.buffers?.put(whole);
          else {
            await onTarget(opts, () => target.write(pos, [buf], { fua: false }));
            // Only once the target has answered: until then the bytes may still be on their way.
            opts.buffers?.put(whole);
            stats.dataBytes += n;
          }
        } finally {
          if (extra > 0) opts.window?.release(extra);
        }
        if (zeros) await zeroRange(target, pos, n, { ...opts, limiter: undefined }, stats);
      }
      pos += n;
    }
  }
}

/**
 * Zeroes a hole on the target. Zeroing costs the target as much as data does,
 * so it pays the rate limit like data, in pieces no larger than the limiter's
 * burst; where the target already reads as zero (first sweep) nothing is sent.
 */
async function zeroRange(target: Device, offset: number, length: number, opts: TargetOpts, stats: CopyStats): Promise<void> {
  const zero = async (pos: number, n: number) => {
    const piece = opts.limiter ? Math.max(64 * 1024, Math.floor(opts.limiter.burstBytes)) : n;
    for (let at = pos; at < pos + n; at += piece) {
      const len = Math.min(piece, pos + n - at);
      if (opts.limiter) await opts.limiter.take(len, opts.shouldStop);
      if (opts.shouldStop?.()) throw new CopyStopped();
      await onTarget(opts, () => target.zero(at, len, { fua: false, noHole: false, fast: false }));
      stats.zeroBytes += len;
    }
  };
  if (!opts.skipTargetZeros) return zero(offset, length);
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    const known = await opts.targetHints?.runAt(pos);
    const extents = known
      ? [{ length: Math.min(known.length, end - pos), flags: known.flags }]
      : await onTarget(opts, () => target.extents(pos, end - pos, EXTENT_BATCH));
    for (const e of extents) {
      const n = Math.min(e.length, end - pos);
      if (n <= 0) break;
      if (e.flags & NBD_STATE_ZERO) stats.skippedBytes += n;
      else await zero(pos, n);
      pos += n;
    }
  }
}
