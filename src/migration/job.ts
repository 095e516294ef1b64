/**
 * A mirror job: copies a live export to a remote NBD target in sweeps over the
 * dirty bitmap until what is left fits in the allowed downtime, then (auto, or
 * on the operator's word) cuts over: hold guest writes, drain, copy the rest,
 * flush the target, switch the export to the target, fence the local image.
 *
 * States: created -> copying -> ready -> cutting-over -> completed,
 *         or aborted / failed. Every transition is an event.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { logger, type Logger } from '../util/log.js';
import { allocatedBytes, TargetConnector } from './connector.js';
import { fitsDowntime, RateMeter, StallDetector, waitingReason } from './convergence.js';
import { type CopyOptions, type CopyStats, copySweep, newCopyStats } from './copy.js';
import { background, cutover, whileCuttingOver } from './cutover.js';
import { type HookStatus, hookEnv, runCutoverHook } from './on-cutover.js';
import { JobError } from './errors.js';
import type { Checkpoint } from '../dirty/checkpoints.js';
import type { MirrorRecord } from '../dirty/export-state.js';
import { HeldRangeLock } from '../dirty/held-ranges.js';
import { disengage, engage } from './job-converge.js';
import { JobProgress, notResumable, resumable } from './job-progress.js';
import { initialBitmap, seedMismatch, sinceCheckpoint } from './job-since.js';
import type { MirrorSource } from './source.js';
import type { MirrorOptions } from './options.js';
import { type ConvergeMode, type JobState, type JobStatus, TRANSITIONS } from './states.js';
import type { Target } from './target.js';
import { targetErrorKind } from './target-errors.js';
import { type RateLimiter, TokenBucket } from '../util/token-bucket.js';

export { JobError } from './errors.js';
export { targetFacts, type TargetFacts } from './connector.js';
export type { MirrorSource } from './source.js';
/** The target connection as the job sees it (kept under its old name for callers). */
export type MirrorTarget = Target;

export { TRANSITIONS, type ConvergeMode, type JobState, type JobStatus } from './states.js';
export { DEFAULT_MIRROR_OPTIONS, type MirrorOptions } from './options.js';

/** Chunks in flight while write-through is on (see run()). */
const WRITE_THROUGH_INFLIGHT = 8;

export class MirrorJob extends EventEmitter {
  state: JobState = 'created';
  readonly jobId: string;
  private pass = 0;
  private readonly stats: CopyStats = newCopyStats();
  private readonly meter = new RateMeter();
  private retries = 0;
  private retrying = false;
  private pauseMs: number | null = null;
  /** Why the job is not cutting over yet though it would (auto, or asked): the estimated final sweep does not fit. */
  private cutoverWaiting: string | null = null;
  /** Set when --converge postcopy hands the export over (status switchedToPostcopy). */
  private switchedToPostcopy: JobStatus['switchedToPostcopy'] = null;
  private hookStatus: HookStatus | null = null;
  private error: string | null = null;
  private readonly startedAt = new Date();
  private finishedAt: Date | null = null;
  private target: Target | undefined;
  private readonly connector: TargetConnector;
  private sourceDataBytes: number | null = null;
  /** Copies and write-through hold ranges here; the activity log's checkpoints cover what is held (job-progress.ts). */
  private readonly locks = new HeldRangeLock((offset, length) => this.progress.markUnflushed(offset, length));
  /** The state folder's side of the job: stored bitmap, unflushed ranges, mirror.json. */
  private readonly progress: JobProgress;
  private limiter: RateLimiter | undefined;
  private cutoverRequested = false;
  private abortRequested = false;
  /** Server shutdown: the job ends here but stays resumable (stop()). */
  private stopRequested = false;
  private stopped = false;
  private readonly aborter = new AbortController();
  private wake: (() => void) | undefined;
  private firstSweepDone = false;
  /** Start of the sweep in progress and the bytes moved before it, for a live rate. */
  private sweepStart = { t: 0, bytes: 0 };
  private readonly log: Logger;
  private readonly opts: MirrorOptions;
  private done: Promise<void> | undefined;
  /** mirror --since: the checkpoint whose bits are the first sweep's bitmap. */
  private sinceCheckpoint: Checkpoint | undefined;
  /** The unfinished job of a previous process that this one resumes (same id, same destination, the recovered bitmap). */
  private readonly resume: MirrorRecord | undefined;

  constructor(
    readonly source: MirrorSource,
    opts: MirrorOptions,
  ) {
    super();
    this.opts = opts;
    const { resume, skipped } = resumable(source, opts);
    this.resume = resume;
    this.jobId = resume?.jobId ?? opts.jobId ?? randomBytes(8).toString('hex');
    this.log = logger({ export: source.name, target: opts.target, job: this.jobId });
    if (skipped) this.log.warn('mirror-resume-skipped', skipped);
    if (opts.limiter) this.limiter = opts.limiter;
    else if (opts.maxBandwidth) this.limiter = new TokenBucket(opts.maxBandwidth);
    this.connector = new TargetConnector({
      uri: opts.target,
      jobId: this.jobId,
      force: opts.force,
      requireSpace: opts.requireSpace,
      postcopyDestination: opts.converge === 'postcopy',
      requestTimeoutMs: opts.targetTimeoutMs,
      source: { name: source.name, exportId: source.exportId, size: source.size, dataBytes: () => this.sourceDataBytes },
      localExportIds: opts.localExportIds,
      connect: opts.connect,
      log: this.log,
      resume: resume ? { destExportId: resume.destExportId! } : undefined,
    });
    this.progress = new JobProgress({
      source,
      jobId: this.jobId,
      targetUri: opts.target,
      connector: this.connector,
      resume,
      startedAt: this.startedAt,
      stats: this.stats,
      locks: this.locks,
      target: () => this.target,
      log: this.log,
    });
  }

  /** Connects and checks the target; rejects (and the job never starts) when it is unfit. */
  async start(): Promise<void> {
    if (this.opts.since !== undefined) this.sinceCheckpoint = sinceCheckpoint(this.source, this.opts.since);
    this.sourceDataBytes = await allocatedBytes(this.source.stack.local);
    this.target = this.watch(await this.connector.connect(true, this.aborter.signal));
    if (this.sinceCheckpoint) await this.checkSeeded(this.target, this.sinceCheckpoint);
    this.setState('copying');
    this.done = this.run();
  }

  /** Resolves when the job has reached a final state. */
  finished(): Promise<void> {
    return this.done ?? Promise.resolve();
  }

  status(): JobStatus {
    const dirtyBytes = this.source.stack.bitmap.dirtyBytes();
    const copied = this.stats.dataBytes + this.stats.zeroBytes + this.stats.skippedBytes;
    const rate = this.liveRate();
    return {
      export: this.source.name,
      target: this.opts.target,
      jobId: this.jobId,
      targetKind: this.connector.kind,
      targetDataBytes: this.connector.targetDataBytes,
      targetFreeBytes: this.connector.freeBytes,
      sourceDataBytes: this.sourceDataBytes,
      since: this.opts.since ?? null,
      state: this.state,
      pass: this.pass,
      size: this.source.size,
      bytesCopied: copied,
      dataBytes: this.stats.dataBytes,
      zeroBytes: this.stats.zeroBytes,
      skippedBytes: this.stats.skippedBytes,
      dirtyBytes,
      dirtyBlocks: this.source.stack.bitmap.dirtyBlocks(),
      granularity: this.source.stack.bitmap.granularity,
      rate: Math.round(rate),
      // What is left is what the bitmap holds (every block starts dirty); unknown while the target is away.
      etaSeconds: rate > 0 && !this.isFinal && !this.retrying ? Math.round((dirtyBytes / rate) * 10) / 10 : null,
      maxBandwidth: this.limiter?.rate ?? null,
      cutover: this.opts.cutover,
      maxDowntimeMs: this.opts.maxDowntimeMs,
      convergence: this.switchedToPostcopy
        ? 'postcopy'
        : this.source.stack.writeThrough.writeThroughActive
          ? 'active'
          : this.source.stack.throttle.rate
            ? 'throttle'
            : 'none',
      throttleRate: this.source.stack.throttle.rate ?? null,
      switchedToPostcopy: this.switchedToPostcopy && { ...this.switchedToPostcopy },
      retries: this.retries,
      retrying: this.retrying,
      pauseMs: this.pauseMs,
      cutoverWaiting: this.cutoverWaiting,
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt?.toISOString() ?? null,
      error: this.error,
      onCutover: this.hookStatus,
    };
  }

  /** The measured rate; during the first sweep, what this sweep has done so far. */
  private liveRate(): number {
    if (this.firstSweepDone || this.state !== 'copying') return this.meter.rate;
    const secs = (performance.now() - this.sweepStart.t) / 1000;
    return this.meter.live(this.stats.dataBytes + this.stats.zeroBytes - this.sweepStart.bytes, secs);
  }

  get isFinal(): boolean {
    return TRANSITIONS[this.state].length === 0;
  }

  setSpeed(bytesPerSecond: number | undefined): void {
    // A job on a shared budget (an evacuation's) that is given its own speed leaves that budget's scheduling.
    if (!bytesPerSecond) this.limiter = undefined;
    else if (this.limiter instanceof TokenBucket) this.limiter.setRate(bytesPerSecond);
    else this.limiter = new TokenBucket(bytesPerSecond);
    this.opts.maxBandwidth = bytesPerSecond;
    this.log.info('mirror-speed', { maxBandwidth: bytesPerSecond ?? null });
  }

  /** Asks for cutover; it happens as soon as the job is ready. */
  requestCutover(): void {
    if (this.isFinal) throw new JobError('EINVAL', `job is ${this.state}`);
    this.cutoverRequested = true;
    this.poke();
  }

  /**
   * Stops the job before the switch, in any state (a frozen target, a cutover
   * in progress): the target connection is dropped at once, held guests go on
   * with the local image, and nothing is lost. Once the export has switched,
   * it is too late: the job completes.
   */
  async abort(): Promise<void> {
    if (this.isFinal) throw new JobError('EINVAL', `job is ${this.state}`);
    this.abortRequested = true;
    this.aborter.abort();
    this.poke();
    // Requests stuck on a frozen target fail now instead of at the request timeout.
    this.target?.destroy();
    await this.finished();
    if (this.state === 'completed') throw new JobError('EINVAL', 'the cutover had already switched the export to the target; the job completed');
  }

  /**
   * Server shutdown (SIGTERM), not the operator's abort: the job ends in this
   * process but stays resumable. Copies stop, the target is flushed, the bitmap
   * and the record (state stopped) are stored, and the destination stays bound
   * to the job (no MIGRATE_RELEASE): after the restart, `ctl mirror NAME URI`
   * picks it up. A job that could not be resumed (no state folder, a target
   * whose identity cannot be checked) is aborted as before. A target that does
   * not answer within `timeoutMs` is dropped: what it had not flushed stays dirty.
   */
  async stop(timeoutMs = 5000): Promise<void> {
    if (this.isFinal) return;
    const why = notResumable(this.source, this.connector);
    if (why) {
      this.log.info('mirror-stop-aborts', { cause: `the job cannot be resumed after the restart: ${why}`, effect: 'aborted; the next mirror starts afresh' });
      await this.abort().catch(() => undefined);
      return;
    }
    this.stopRequested = true;
    this.abortRequested = true;
    this.aborter.abort();
    this.poke();
    const timer = setTimeout(() => this.target?.destroy(), timeoutMs);
    try {
      await this.finished();
    } finally {
      clearTimeout(timer);
    }
  }

  // ------------------------------------------------------------------ internals

  private setState(s: JobState): void {
    const from = this.state;
    if (!TRANSITIONS[from].includes(s)) throw new JobError('EINVAL', `mirror job: no transition from ${from} to ${s}`);
    this.state = s;
    this.log.info('mirror-state', { from, to: s, pass: this.pass });
    this.emit('state', s, from);
    if (this.isFinal) this.progress.end(s, { stopped: this.stopped, error: this.error });
  }

  private poke(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private idle(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  /** An idle, synchronised job notices a dropped target connection at once, not at its next write. */
  private watch(target: Target): Target {
    target.on('close', (err?: Error) => {
      if (!err) return;
      this.log.warn('target-connection-lost', { cause: err });
      this.poke();
    });
    return target;
  }

  private copyOptions(extra: { maxInflight?: number; skipTargetZeros: boolean; shouldStop: () => boolean; limited: boolean }): CopyOptions {
    return {
      chunkBytes: this.opts.chunkBytes,
      maxInflight: extra.maxInflight ?? this.opts.maxInflight,
      locks: this.locks,
      limiter: extra.limited ? this.limiter : undefined,
      skipTargetZeros: extra.skipTargetZeros,
      shouldStop: extra.shouldStop,
      retries: this.opts.requestRetries,
      onRetry: (e: unknown, attempt: number) => this.log.warn('target-request-retry', { attempt, cause: e }),
    };
  }

  private async run(): Promise<void> {
    try {
      if (this.resume) this.log.info('mirror-resumed', { from: this.resume.state, since: this.resume.since, dirtyBytes: this.source.stack.bitmap.dirtyBytes(), size: this.source.size });
      else initialBitmap(this.source, this.sinceCheckpoint, this.log);
      await this.progress.start();
      const stall = new StallDetector();
      /** The sweep before a cutover ran with write-through on (see below); cleared by each cutover attempt. */
      let synced = false;
      for (;;) {
        if (this.abortRequested) return await this.finishAborted();
        const target = this.target!;
        if (target.closed) {
          await this.recover(new JobError('ECONNRESET', `the connection to ${this.opts.target} was closed`));
          continue;
        }
        // A sweep is a pass only when there is something to copy (a synchronised job idles here).
        if (this.pass === 0 || this.source.stack.bitmap.dirtyBlocks() > 0) this.pass++;
        const before = this.stats.dataBytes + this.stats.zeroBytes;
        const t0 = performance.now();
        this.sweepStart = { t: t0, bytes: before };
        try {
          await copySweep(
            this.source.stack.local,
            // Counted, so that another job's cutover can let this sweep's requests in flight finish first (cutover.ts quiet).
            background(target),
            this.source.stack.bitmap,
            {
              ...this.copyOptions({
                skipTargetZeros: this.pass === 1,
                shouldStop: () => this.abortRequested,
                limited: true,
                // With write-through on, guest writes wait on the copy's range locks and queue behind its data on the
                // target connection: a shallow pipeline keeps their latency down (64 chunks in flight: 2.7 s worst, 8: 0.4 s).
                maxInflight: this.source.stack.writeThrough.writeThroughActive ? Math.min(this.opts.maxInflight, WRITE_THROUGH_INFLIGHT) : undefined,
              }),
              // Another job's cutover (its guests held) goes first: no new chunks while one runs (cutover.ts whileCuttingOver).
              pauseBefore: whileCuttingOver,
            },
            this.stats,
          );
        } catch (e) {
          if (this.abortRequested) return await this.finishAborted();
          await this.recover(e);
          continue;
        }
        this.retries = 0;
        const seconds = (performance.now() - t0) / 1000;
        const moved = this.stats.dataBytes + this.stats.zeroBytes - before;
        this.meter.sweep(moved, seconds);
        this.firstSweepDone = true;
        if (this.abortRequested) return await this.finishAborted();

        const dirty = this.source.stack.bitmap.dirtyBytes();
        this.log.debug('mirror-sweep', { pass: this.pass, seconds, moved, dirty, rate: this.meter.rate });
        this.emit('progress', this.status());
        const fits = fitsDowntime(dirty, this.meter.rate, this.opts.maxDowntimeMs);
        this.cutoverWaiting =
          fits || (this.opts.cutover !== 'auto' && !this.cutoverRequested)
            ? null
            : waitingReason(dirty, this.meter.rate, this.opts.maxDowntimeMs);
        if (fits) {
          stall.reset(dirty);
          if (this.state === 'copying') this.setState('ready');
          // Stay synchronised until cutover: guest writes go to both sides (again, after a slow target dropped it).
          if (this.opts.cutover === 'manual') this.engage('active');
          if (this.opts.cutover === 'auto' || this.cutoverRequested) {
            // What the guest dirtied during the last sweep is copied while guests run, not while they are held:
            // write-through on and one more sweep first, so the final sweep under the hold finds next to nothing
            // (bench cutover4: 0.2-1.2 MiB of scattered blocks took 8-215 ms there, beside other jobs' chunks).
            if (dirty > 0 && !synced && !this.source.stack.writeThrough.writeThroughActive) {
              synced = true;
              this.engage('active', 'cutover');
              if (this.source.stack.writeThrough.writeThroughActive) {
                this.log.info('mirror-cutover-sync', { pass: this.pass, dirty, effect: 'write-through on; one more sweep before guests are held' });
                continue;
              }
            }
            synced = false;
            if (await this.cutover()) return;
            if (this.abortRequested) return await this.finishAborted();
            continue;
          }
        } else if (stall.observe(dirty, seconds, this.meter.rate) && this.status().convergence === 'none') {
          // Not shrinking: the guest dirties data as fast as we copy it (decided from the rates after one sweep).
          this.log.info('mirror-not-converging', { pass: this.pass, dirty, ...stall.reason });
          if (this.opts.converge === 'postcopy') return await this.switchToPostcopy(dirty);
          this.engage(this.opts.converge);
        }
        if (dirty === 0) await this.idle(100);
      }
    } catch (e) {
      if (this.abortRequested) return await this.finishAborted();
      this.finishFailed(e);
    }
  }

  /** mirror --since: a target whose seed does not match the source is let go (job-since.ts). */
  private async checkSeeded(target: Target, cp: Checkpoint): Promise<void> {
    const mismatch = await seedMismatch(this.source, target, cp, this.log);
    if (mismatch === undefined) return;
    target.destroy();
    this.target = undefined;
    await this.connector.release();
    throw new JobError(
      'EINVAL',
      `--since ${cp.name}: target ${this.opts.target} differs from the source at offset ${mismatch}, in a block that has not changed since the checkpoint: ` +
        `it is not a copy of this export as of ${cp.name} (seed it with copy and copy --changed-since, or mirror without --since)`,
      { permanent: true },
    );
  }

  /**
   * --converge postcopy: the copy cannot catch up, so instead of slowing the
   * guest the export is handed over (migration/postcopy-handover.ts handOver) between
   * sweeps, with nothing in flight: the destination marks the blocks still
   * dirty absent again and fetches them, and the guest moves now.
   */
  private async switchToPostcopy(dirtyBytes: number): Promise<void> {
    const handOver = this.source.handOver;
    if (!handOver) throw new JobError('EINVAL', 'this export cannot be handed over (post-copy)', { permanent: true });
    this.log.info('mirror-postcopy-switch', { pass: this.pass, dirtyBytes, rate: Math.round(this.meter.rate), effect: 'the guest moves to the destination now; it fetches what is left' });
    this.switchedToPostcopy = { at: new Date().toISOString(), pass: this.pass, dirtyBytes, pauseMs: null };
    if (this.state === 'copying') this.setState('ready');
    this.setState('cutting-over');
    this.disengage();
    this.target?.destroy();
    this.target = undefined;
    try {
      const r = await handOver({ target: this.opts.target, handoff: this.opts.handoff, dirty: this.source.stack.bitmap, cutoverTimeoutMs: this.opts.cutoverTimeoutMs });
      this.pauseMs = r.pauseMs;
      this.switchedToPostcopy.pauseMs = r.pauseMs;
    } catch (e) {
      this.switchedToPostcopy = null;
      this.setState('ready');
      throw e;
    }
    this.finishedAt = new Date();
    this.setState('completed');
    this.log.info('mirror-postcopy-done', { pauseMs: this.pauseMs, dirtyBytes });
  }

  /** Switches convergence on (job-converge.ts); `reason` 'cutover': only until the switch, for its final sweep. */
  private engage(mode: ConvergeMode, reason?: 'cutover'): void {
    engage(mode, {
      reason,
      stack: this.source.stack,
      target: this.target,
      locks: this.locks,
      writeThroughTimeoutMs: this.opts.writeThroughTimeoutMs,
      copyRate: this.meter.rate,
      log: this.log,
    });
  }

  private disengage(): void {
    disengage(this.source.stack);
  }

  /** The switch (cutover.ts). Resolves true when completed; false when it failed and copying goes on. */
  private async cutover(): Promise<boolean> {
    this.setState('cutting-over');
    const outcome = await cutover({
      source: this.source,
      target: this.target!,
      connector: this.connector,
      limitMs: this.opts.cutoverTimeoutMs,
      signal: this.aborter.signal,
      copyOptions: (shouldStop) =>
        this.copyOptions({ maxInflight: Math.max(this.opts.maxInflight, 16), skipTargetZeros: false, shouldStop, limited: false }),
      stats: this.stats,
      log: this.log,
    });
    this.pauseMs = outcome.pauseMs;
    if (!outcome.switched) {
      this.setState('ready');
      if (this.abortRequested) return false;
      const failure = outcome.failure;
      if (failure instanceof JobError && failure.permanent) throw failure;
      await this.recover(failure ?? new JobError('EIO', 'cutover failed'));
      return false;
    }
    this.log.info('cutover', { pauseMs: this.pauseMs, handoff: this.opts.handoff, ...outcome.phases });
    if (this.opts.handoff === 'disconnect') {
      try {
        await this.source.disconnectClients();
      } catch (e) {
        this.log.error('handoff-failed', { cause: e, effect: 'the export is switched; some guest connections may stay on the source' });
      }
    }
    this.finishedAt = new Date();
    this.setState('completed');
    // The operator's --on-cutover (moving the export's address, say): reported in the log and the status, bounded.
    const hook = this.source.cutoverHook;
    if (hook) {
      const env = hookEnv(hook, { target: this.opts.target, jobId: this.jobId, handoff: this.opts.handoff, pauseMs: this.pauseMs });
      await runCutoverHook(hook, env, this.log, (s) => (this.hookStatus = s));
    }
    return true;
  }

  /**
   * After a target failure: re-marked ranges wait in the bitmap; reconnect with
   * backoff or give up. Permanent errors (no space, read-only, a target that
   * is no longer the same disk or now belongs to another job) fail at once.
   */
  private async recover(cause: unknown): Promise<void> {
    const hadWriteThrough = this.source.stack.writeThrough.writeThroughActive;
    this.source.stack.writeThrough.setWriteThrough(undefined);
    this.target?.destroy();
    this.target = undefined;
    this.progress.remarkUnflushed();
    this.retrying = true;
    try {
      for (;;) {
        if (targetErrorKind(cause) === 'permanent')
          throw new JobError('EIO', `target ${this.opts.target} failed: ${(cause as Error)?.message ?? cause}`, { cause, permanent: true });
        this.retries++;
        this.log.warn('mirror-retry', { attempt: this.retries, maxRetries: this.opts.maxRetries, cause });
        if (this.retries > this.opts.maxRetries) throw new JobError('EIO', `target failed ${this.retries} times in a row: ${(cause as Error)?.message ?? cause}`, { cause });
        await this.idle(Math.min(100 * 2 ** (this.retries - 1), 5000));
        if (this.abortRequested) return;
        try {
          this.target = this.watch(await this.connector.connect(false, this.aborter.signal));
          if (hadWriteThrough) this.engage('active');
          return;
        } catch (e) {
          if (this.abortRequested) return;
          cause = e;
        }
      }
    } finally {
      this.retrying = false;
    }
  }

  private async finishAborted(): Promise<void> {
    this.disengage();
    if (this.stopRequested) return this.finishStopped();
    this.target?.destroy();
    this.target = undefined;
    await this.connector.release();
    this.finishedAt = new Date();
    this.setState('aborted');
  }

  /** stop(): flush the target, store the bitmap, keep the record and the destination's binding. */
  private async finishStopped(): Promise<void> {
    const flushed = await this.progress.storeStopped(() => {
      this.target?.destroy();
      this.target = undefined;
    });
    this.stopped = true;
    this.finishedAt = new Date();
    this.setState('aborted');
    this.log.warn('mirror-resumable', {
      state: 'stopped',
      targetFlushed: flushed,
      dirtyBytes: this.source.stack.bitmap.dirtyBytes(),
      effect: `stopped with the server; the destination stays bound to this job: nbd-migrate ctl mirror ${this.source.name} ${this.opts.target} resumes it after the restart (ctl abort releases it)`,
    });
  }

  private finishFailed(e: unknown): void {
    this.disengage();
    this.target?.destroy();
    this.target = undefined;
    this.error = (e as Error)?.message ?? String(e);
    this.finishedAt = new Date();
    this.log.error('mirror-failed', { cause: e });
    this.setState('failed');
  }
}
