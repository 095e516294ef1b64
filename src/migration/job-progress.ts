/**
 * A mirror job's persistence in the export's state folder, so that a restart
 * resumes it: the job's bitmap (the export's persistent one) stored while
 * copies clear bits, what the target acknowledged but has not flushed kept
 * dirty in every stored bitmap, and the record (mirror.json) that lets
 * `ctl mirror NAME URI` pick the job up again (resumable()).
 */
import type { Logger } from '../util/log.js';
import { DirtyBitmap } from '../dirty/bitmap.js';
import type { MirrorRecord } from '../dirty/export-state.js';
import type { HeldRangeLock } from '../dirty/held-ranges.js';
import type { TargetConnector } from './connector.js';
import type { CopyStats } from './copy.js';
import type { MirrorOptions } from './options.js';
import type { MirrorSource } from './source.js';
import type { JobState } from './states.js';
import type { Target } from './target.js';

/** How often a copying job stores its bitmap (when copies cleared bits). */
const PROGRESS_SAVE_MS = 2000;

export interface ProgressContext {
  source: MirrorSource;
  jobId: string;
  /** The target URI (the record's). */
  targetUri: string;
  connector: TargetConnector;
  /** The unfinished job of a previous process this one resumes. */
  resume: MirrorRecord | undefined;
  startedAt: Date;
  stats: CopyStats;
  /** The job's copies and write-through hold ranges here (covered while held). */
  locks: HeldRangeLock;
  /** The target connection now (flushed before a store). */
  target: () => Target | undefined;
  log: Logger;
}

export class JobProgress {
  /**
   * Ranges the target acknowledged (copies, write-through) since the last
   * NBD_CMD_FLUSH sent: a destination that loses power may not hold them, so
   * every stored bitmap covers them (dirty) until a flush sent after them has
   * completed. `flushing` is the part a flush in progress will make durable.
   */
  private unflushed: DirtyBitmap;
  private flushing: DirtyBitmap | undefined;
  private saving: Promise<void> | undefined;
  private targetFlushes = 0;
  /** What the export's state folder says of this job (mirror.json), once it runs. */
  private record: MirrorRecord | undefined;
  private progressTimer: NodeJS.Timeout | undefined;
  private uncover: (() => void) | undefined;
  private savedClears = -1;

  constructor(private readonly ctx: ProgressContext) {
    this.unflushed = new DirtyBitmap(ctx.source.size, ctx.source.stack.bitmap.granularity);
  }

  /** A range the target acknowledged (its lock was released): dirty in stored bitmaps until flushed. */
  markUnflushed(offset: number, length: number): void {
    this.unflushed.mark(offset, length);
  }

  /**
   * The job's bitmap is the export's persistent one: stored now (a fresh job:
   * every block dirty), then every PROGRESS_SAVE_MS while copies clear bits, so
   * a restart resumes with what was never copied plus what changed since.
   * Then the record that lets `ctl mirror NAME URI` resume it.
   */
  async start(): Promise<void> {
    const { source, connector } = this.ctx;
    const state = source.state;
    if (!state) return;
    this.uncover = state.log.cover(() => this.coveredRanges());
    await state.log.checkpoint();
    this.record = {
      jobId: this.ctx.jobId,
      target: this.ctx.targetUri,
      destExportId: connector.destExportId,
      destKind: connector.kind,
      state: 'copying',
      since: this.ctx.resume?.since ?? this.ctx.startedAt.toISOString(),
    };
    state.setMirror(this.record);
    this.savedClears = source.stack.bitmap.clears;
    this.progressTimer = setInterval(() => void this.save(), PROGRESS_SAVE_MS);
    this.progressTimer.unref();
  }

  /**
   * What every stored bitmap must count as dirty while the job runs: the
   * chunks being copied (cleared, not acknowledged yet), and what the target
   * acknowledged but has not flushed.
   */
  private *coveredRanges(): Iterable<readonly [number, number]> {
    yield* this.ctx.locks.heldRanges();
    for (const b of [this.unflushed, this.flushing]) {
      if (!b) continue;
      const g = b.granularity;
      for (let run = b.nextRun(0, b.blocks); run; run = b.nextRun(run.block + run.count, b.blocks)) yield [run.block * g, run.count * g] as const;
    }
  }

  /**
   * NBD_CMD_FLUSH on the target, so that what it acknowledged so far may be
   * stored as copied. True when everything acknowledged before the flush was
   * sent is durable there (or nothing was pending); false when the flush could
   * not be sent or failed (those ranges stay covered).
   */
  async flushTarget(): Promise<boolean> {
    if (this.unflushed.dirtyBlocks() === 0) return true;
    const target = this.ctx.target();
    if (!target || target.closed) return false;
    const pending = this.unflushed;
    this.unflushed = new DirtyBitmap(pending.size, pending.granularity);
    this.flushing = pending;
    try {
      await target.flush();
      this.targetFlushes++;
      return true;
    } catch (e) {
      this.unflushed.orWords(pending.copyWords());
      this.ctx.log.warn('target-flush-failed', { cause: e, effect: 'what the target acknowledged since its last flush stays dirty in the stored bitmap' });
      return false;
    } finally {
      this.flushing = undefined;
    }
  }

  /**
   * The target connection is gone (or the job ends without completing): what it
   * acknowledged but never flushed may be lost with it (a destination that lost
   * power and came back), so it is copied again.
   */
  remarkUnflushed(): void {
    const lost = [this.unflushed, this.flushing];
    for (const b of lost) if (b && b.dirtyBlocks() > 0) this.ctx.source.stack.bitmap.orWords(b.copyWords());
    this.unflushed = new DirtyBitmap(this.unflushed.size, this.unflushed.granularity);
  }

  /**
   * stop() (server shutdown): flush the target, then `dropTarget`, then store
   * the bitmap: what the flush covered is stored as copied, anything else
   * (the flush failed) dirty. Resolves whether the flush succeeded.
   */
  async storeStopped(dropTarget: () => void): Promise<boolean> {
    const flushed = await this.flushTarget();
    dropTarget();
    this.remarkUnflushed(); // nothing left unless the flush failed: then that is copied again
    try {
      await this.ctx.source.state?.log.checkpoint();
    } catch (e) {
      this.ctx.log.error('mirror-progress-save-failed', { cause: e, effect: 'a restart resumes from the last stored bitmap and the activity log' });
    }
    return flushed;
  }

  /**
   * Stores the bitmap if copies cleared bits, or the target acknowledged writes,
   * since it was last stored, after a flush of the target: only what a completed
   * flush covers is stored as copied. (Acknowledgements count on their own: the
   * copy engine clears many chunks before their copies are answered, so a store
   * triggered by clears alone would keep them dirty until the sweep ends.)
   */
  save(): Promise<void> {
    // One at a time: a save asked for while one runs waits for it and then runs again.
    const prev = this.saving;
    const { source, stats, log } = this.ctx;
    const run = (async () => {
      await prev;
      const state = source.state;
      const clears = source.stack.bitmap.clears;
      if (!state || (clears === this.savedClears && this.unflushed.dirtyBlocks() === 0)) return;
      try {
        const t0 = performance.now();
        const flushed = await this.flushTarget();
        const flushMs = Math.round(performance.now() - t0);
        await state.log.checkpoint();
        if (flushed) this.savedClears = clears;
        log.debug('mirror-progress-saved', {
          dirtyBytes: source.stack.bitmap.dirtyBytes(),
          bytesCopied: stats.dataBytes + stats.zeroBytes + stats.skippedBytes,
          targetFlushed: flushed,
          targetFlushes: this.targetFlushes,
          flushMs,
        });
      } catch (e) {
        log.error('mirror-progress-save-failed', { cause: e, effect: 'a restart resumes from the last stored bitmap and the activity log' });
      }
    })();
    this.saving = run;
    void run.finally(() => {
      if (this.saving === run) this.saving = undefined;
    });
    return run;
  }

  /**
   * The job reached a final state. Completed or aborted: nothing to resume.
   * Failed, or stopped by a server shutdown: the record says so and the bitmap
   * is stored, to resume after a restart.
   */
  end(s: JobState, how: { stopped: boolean; error: string | null }): void {
    clearInterval(this.progressTimer);
    if (s !== 'completed') this.remarkUnflushed();
    const state = this.ctx.source.state;
    if (!state || !this.record) return this.uncover?.();
    try {
      if (s === 'aborted' && how.stopped) {
        state.setMirror({ ...this.record, state: 'stopped' });
        this.uncover?.();
        return;
      }
      if (s === 'failed') {
        state.setMirror({ ...this.record, state: 'failed', error: how.error ?? undefined });
        void this.save().finally(() => this.uncover?.());
        return;
      }
      state.setMirror(undefined);
    } catch (e) {
      this.ctx.log.error('mirror-record-failed', { cause: e, file: state.folder.file('mirror.json') });
    }
    this.uncover?.();
  }
}

/**
 * Why a running job could not be resumed after a restart (stop() aborts it
 * then): no state folder, or a target whose identity cannot be checked.
 */
export function notResumable(source: MirrorSource, connector: TargetConnector): string | undefined {
  return !source.state
    ? 'the export keeps no state folder'
    : connector.kind !== 'nbd-migrate-incoming' || !connector.destExportId
      ? `its target (${connector.kind ?? 'unknown'}) is not an nbd-migrate destination whose identity can be checked`
      : undefined;
}

/**
 * Whether `ctl mirror NAME URI` picks up the job a previous process left
 * (mirror.json): the same target URI, an nbd-migrate destination (whose
 * identity can be checked), and no --force or --since (those start afresh).
 */
export function resumable(source: MirrorSource, opts: MirrorOptions): { resume?: MirrorRecord; skipped?: Record<string, unknown> } {
  let rec: MirrorRecord | undefined;
  try {
    rec = source.state?.mirror();
  } catch (e) {
    return { skipped: { cause: e, effect: 'starting a fresh mirror' } };
  }
  if (!rec) return {};
  const why =
    rec.target !== opts.target
      ? `it went to ${rec.target}`
      : opts.force
        ? '--force starts afresh'
        : opts.since !== undefined
          ? '--since starts from the checkpoint'
          : rec.destKind !== 'nbd-migrate-incoming' || !rec.destExportId
            ? `its target (${rec.destKind ?? 'unknown'}) is not an nbd-migrate destination whose identity can be checked`
            : undefined;
  if (why) return { skipped: { previousJob: rec.jobId, cause: `the unfinished job ${rec.jobId} is not resumed: ${why}`, effect: 'starting a fresh mirror (every block is copied)' } };
  return { resume: rec };
}
