/**
 * A mirror job: copies a live export to a remote NBD target in sweeps over the
 * dirty bitmap until what is left fits in the allowed downtime, then (auto, or
 * on the operator's word) cuts over: hold guest writes, drain, copy the rest,
 * flush the target, switch the export to the target, fence the local image.
 *
 * States: created -> copying -> ready -> cutting-over -> completed,
 *         or aborted / failed. Every transition is an event.
 */
import { EventEmitter } from 'node:events';
import * as C from '../protocol/constants.js';
import { NbdClient } from '../client/nbd-client.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import type { DirtyTrackingDevice } from '../dirty/tracking-device.js';
import type { Device } from '../storage/device.js';
import { logger, type Logger } from '../util/log.js';
import { copySweep, type CopyStats, DEFAULT_COPY_OPTIONS, newCopyStats } from './copy.js';
import type { GateDevice } from './gate-device.js';
import { writeFenced } from './markers.js';
import { RangeLock } from './range-lock.js';
import { ReconnectingDevice } from './reconnecting-device.js';
import { TokenBucket } from './token-bucket.js';

export type JobState = 'created' | 'copying' | 'ready' | 'cutting-over' | 'completed' | 'aborted' | 'failed';
export type ConvergeMode = 'active' | 'throttle';

/** What the job needs of its target: a Device plus the NBD connection's facts (NbdClient fits). */
export interface MirrorTarget extends Device {
  readonly readOnly: boolean;
  readonly structuredReplies: boolean;
  readonly contexts: ReadonlyMap<string, number>;
  /** A bare command (used for NBD_CMD_MIGRATE_COMPLETE). */
  request(type: number, flags: number, offset: number, length: number): Promise<void>;
  destroy(): void;
  on(event: 'close', listener: (err?: Error) => void): unknown;
}

/** The export side of a migration: what the job copies from and switches. */
export interface MirrorSource {
  name: string;
  image: string;
  size: number;
  gate: GateDevice;
  tracking: DirtyTrackingDevice;
  bitmap: DirtyBitmap;
  /** Closes the export's guest connections (handoff=disconnect). */
  disconnectClients(): void;
}

export interface MirrorOptions {
  target: string;
  /** Copy rate limit in bytes/s; undefined = unlimited. */
  maxBandwidth?: number;
  cutover: 'auto' | 'manual';
  maxDowntimeMs: number;
  /** How to converge when the guest dirties faster than the copy: send its writes to both sides, or slow it down. */
  converge: ConvergeMode;
  /** After the switch: keep guest connections and forward to the target, or close them so they reconnect elsewhere. */
  handoff: 'forward' | 'disconnect';
  /** Consecutive target failures tolerated before the job fails. */
  maxRetries: number;
  chunkBytes: number;
  maxInflight: number;
  /** Connects to the target (default: NbdClient); tests substitute their own. */
  connect?: (uri: string) => Promise<MirrorTarget>;
}

export const DEFAULT_MIRROR_OPTIONS: Omit<MirrorOptions, 'target'> = {
  cutover: 'manual',
  maxDowntimeMs: 50,
  converge: 'active',
  handoff: 'forward',
  maxRetries: 10,
  chunkBytes: DEFAULT_COPY_OPTIONS.chunkBytes,
  maxInflight: DEFAULT_COPY_OPTIONS.maxInflight,
};

export interface JobStatus {
  export: string;
  target: string;
  state: JobState;
  pass: number;
  size: number;
  /** Bytes written or zeroed on the target so far (all sweeps). */
  bytesCopied: number;
  dataBytes: number;
  zeroBytes: number;
  skippedBytes: number;
  dirtyBytes: number;
  dirtyBlocks: number;
  granularity: number;
  /** Measured copy rate, bytes/s. */
  rate: number;
  /** Seconds until the first sweep completes (or until dirty data is copied). */
  etaSeconds: number | null;
  maxBandwidth: number | null;
  cutover: 'auto' | 'manual';
  maxDowntimeMs: number;
  /** What keeps the mirror converging now: none yet, write-through, or guest throttling. */
  convergence: 'none' | 'active' | 'throttle';
  throttleRate: number | null;
  retries: number;
  /** Guest write pause measured at cutover. */
  pauseMs: number | null;
  startedAt: string;
  finishedAt: string | null;
  error: string | null;
}

export class JobError extends Error {
  override readonly name = 'JobError';
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class MirrorJob extends EventEmitter {
  state: JobState = 'created';
  private pass = 0;
  private readonly stats: CopyStats = newCopyStats();
  private rate = 0;
  private retries = 0;
  private pauseMs: number | null = null;
  private error: string | null = null;
  private readonly startedAt = new Date();
  private finishedAt: Date | null = null;
  private target: MirrorTarget | undefined;
  private readonly locks = new RangeLock();
  private limiter: TokenBucket | undefined;
  private cutoverRequested = false;
  private abortRequested = false;
  private wake: (() => void) | undefined;
  private firstSweepDone = false;
  /** Start of the sweep in progress and the bytes moved before it, for a live rate. */
  private sweepStart = { t: 0, bytes: 0 };
  private readonly log: Logger;
  private readonly opts: MirrorOptions;
  private done: Promise<void> | undefined;

  constructor(
    readonly source: MirrorSource,
    opts: MirrorOptions,
  ) {
    super();
    this.opts = opts;
    this.log = logger({ export: source.name, target: opts.target });
    if (opts.maxBandwidth) this.limiter = new TokenBucket(opts.maxBandwidth);
  }

  /** Connects and checks the target; rejects (and the job never starts) when it is unfit. */
  async start(): Promise<void> {
    this.target = await this.connectChecked();
    this.setState('copying');
    this.done = this.run();
  }

  /** Resolves when the job has reached a final state. */
  finished(): Promise<void> {
    return this.done ?? Promise.resolve();
  }

  status(): JobStatus {
    const dirtyBytes = this.source.bitmap.dirtyBytes();
    const copied = this.stats.dataBytes + this.stats.zeroBytes + this.stats.skippedBytes;
    const left = this.firstSweepDone ? dirtyBytes : Math.max(0, this.source.size - copied);
    return {
      export: this.source.name,
      target: this.opts.target,
      state: this.state,
      pass: this.pass,
      size: this.source.size,
      bytesCopied: copied,
      dataBytes: this.stats.dataBytes,
      zeroBytes: this.stats.zeroBytes,
      skippedBytes: this.stats.skippedBytes,
      dirtyBytes,
      dirtyBlocks: this.source.bitmap.dirtyBlocks(),
      granularity: this.source.bitmap.granularity,
      rate: Math.round(this.liveRate()),
      etaSeconds: this.liveRate() > 0 && !this.isFinal ? Math.round((left / this.liveRate()) * 10) / 10 : null,
      maxBandwidth: this.limiter?.rate ?? null,
      cutover: this.opts.cutover,
      maxDowntimeMs: this.opts.maxDowntimeMs,
      convergence: this.source.tracking.writeThroughActive ? 'active' : this.source.gate.throttleRate ? 'throttle' : 'none',
      throttleRate: this.source.gate.throttleRate ?? null,
      retries: this.retries,
      pauseMs: this.pauseMs,
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt?.toISOString() ?? null,
      error: this.error,
    };
  }

  /** The measured rate; during the first sweep, what this sweep has done so far. */
  private liveRate(): number {
    if (this.firstSweepDone || this.state !== 'copying') return this.rate;
    const secs = (performance.now() - this.sweepStart.t) / 1000;
    const moved = this.stats.dataBytes + this.stats.zeroBytes - this.sweepStart.bytes;
    return secs >= 0.5 ? moved / secs : this.rate;
  }

  get isFinal(): boolean {
    return this.state === 'completed' || this.state === 'aborted' || this.state === 'failed';
  }

  setSpeed(bytesPerSecond: number | undefined): void {
    if (!bytesPerSecond) this.limiter = undefined;
    else if (this.limiter) this.limiter.setRate(bytesPerSecond);
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

  /** Stops the job before the switch; the source stays exactly as it was. */
  async abort(): Promise<void> {
    if (this.isFinal) throw new JobError('EINVAL', `job is ${this.state}`);
    if (this.state === 'cutting-over') throw new JobError('EBUSY', 'cutover is in progress; it cannot be aborted now');
    this.abortRequested = true;
    this.poke();
    await this.finished();
  }

  // ------------------------------------------------------------------ internals

  private setState(s: JobState): void {
    const from = this.state;
    this.state = s;
    this.log.info('mirror-state', { from, to: s, pass: this.pass });
    this.emit('state', s, from);
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

  private async connectChecked(): Promise<MirrorTarget> {
    const connect = this.opts.connect ?? ((u: string) => NbdClient.connect(u, { metaContexts: [C.BASE_ALLOCATION, C.MIGRATE_INCOMING_CONTEXT] }));
    let client: MirrorTarget;
    try {
      client = await connect(this.opts.target);
    } catch (e) {
      throw new JobError('EUNREACHABLE', `target ${this.opts.target} is unreachable: ${(e as Error).message}`, { cause: e });
    }
    const fail = (code: string, msg: string) => {
      client.destroy();
      return new JobError(code, msg);
    };
    if (client.size < this.source.size)
      throw fail('ETOOSMALL', `target is smaller than the source (${client.size} < ${this.source.size} bytes)`);
    if (client.readOnly) throw fail('EROFS', `target ${this.opts.target} is read-only`);
    client.on('close', (err?: Error) => {
      if (err) this.log.warn('target-connection-lost', { cause: err });
    });
    this.log.info('target-connected', { size: client.size, structuredReplies: client.structuredReplies, contexts: [...client.contexts.keys()] });
    return client;
  }

  private async run(): Promise<void> {
    try {
      this.source.bitmap.markAll();
      let previousDirty = Infinity;
      let stalled = 0;
      for (;;) {
        if (this.abortRequested) return this.finishAborted();
        const target = this.target!;
        // A sweep is a pass only when there is something to copy (a synchronised job idles here).
        if (this.pass === 0 || this.source.bitmap.dirtyBlocks() > 0) this.pass++;
        const before = this.stats.dataBytes + this.stats.zeroBytes;
        const t0 = performance.now();
        this.sweepStart = { t: t0, bytes: before };
        try {
          await copySweep(this.source.tracking.inner, target, this.source.bitmap, {
            chunkBytes: this.opts.chunkBytes,
            maxInflight: this.opts.maxInflight,
            locks: this.locks,
            limiter: this.limiter,
            skipTargetZeros: this.pass === 1,
            shouldStop: () => this.abortRequested,
          }, this.stats);
        } catch (e) {
          await this.recover(e);
          continue;
        }
        this.retries = 0;
        const seconds = (performance.now() - t0) / 1000;
        const moved = this.stats.dataBytes + this.stats.zeroBytes - before;
        if (moved > 1024 * 1024 && seconds > 0.01) {
          const r = moved / seconds;
          this.rate = this.rate ? 0.5 * this.rate + 0.5 * r : r;
        }
        this.firstSweepDone = true;
        if (this.abortRequested) return this.finishAborted();

        const dirty = this.source.bitmap.dirtyBytes();
        const fits = dirty === 0 || (this.rate > 0 && (dirty / this.rate) * 1000 <= this.opts.maxDowntimeMs);
        this.log.debug('mirror-sweep', { pass: this.pass, seconds, moved, dirty, rate: this.rate });
        this.emit('progress', this.status());
        if (fits) {
          if (this.state === 'copying') {
            this.setState('ready');
            // Stay synchronised until cutover: guest writes go to both sides from now on.
            if (this.opts.cutover === 'manual') this.engage('active');
          }
          if (this.opts.cutover === 'auto' || this.cutoverRequested) {
            if (await this.cutover()) return;
            continue;
          }
        } else {
          // Not shrinking: the guest dirties data as fast as we copy it.
          stalled = dirty >= previousDirty * 0.9 ? stalled + 1 : 0;
          if (stalled >= 2 && this.status().convergence === 'none') this.engage(this.opts.converge);
        }
        previousDirty = dirty;
        if (dirty === 0) await this.idle(100);
      }
    } catch (e) {
      this.finishFailed(e);
    }
  }

  /** Switches convergence on: write-through (active) or guest throttling. */
  private engage(mode: ConvergeMode): void {
    if (mode === 'active') {
      if (this.source.tracking.writeThroughActive || !this.target) return;
      this.source.tracking.setWriteThrough({
        target: this.target,
        locks: this.locks,
        onError: (e) => this.log.warn('write-through-failed', { cause: e, effect: 'range marked dirty; guest unaffected' }),
      });
      this.log.info('mirror-converge', { mode: 'active' });
    } else {
      const rate = Math.max(1024 * 1024, Math.floor((this.rate || 8 * 1024 * 1024) / 2));
      this.source.gate.setThrottle(rate);
      this.log.info('mirror-converge', { mode: 'throttle', guestWriteLimit: rate });
    }
  }

  private disengage(): void {
    this.source.tracking.setWriteThrough(undefined);
    this.source.gate.setThrottle(undefined);
  }

  /** The switch. Resolves true when completed; false when it failed and copying goes on. */
  private async cutover(): Promise<boolean> {
    const target = this.target!;
    this.setState('cutting-over');
    const t0 = performance.now();
    await this.source.gate.hold();
    let switched = false;
    try {
      // No guest write runs now: write-through is moot, and one sweep empties the bitmap.
      this.source.tracking.setWriteThrough(undefined);
      await copySweep(this.source.tracking.inner, target, this.source.bitmap, {
        chunkBytes: this.opts.chunkBytes,
        maxInflight: Math.max(this.opts.maxInflight, 16),
        locks: this.locks,
        skipTargetZeros: false,
      }, this.stats);
      if (this.source.bitmap.dirtyBytes() !== 0) throw new JobError('EIO', 'dirty blocks remain after the final sweep');
      await target.flush();
      if (target.contexts.has(C.MIGRATE_INCOMING_CONTEXT)) await target.request(C.NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0);
      // Guests now talk to the target; a dropped connection is re-established under them.
      this.source.gate.swap(new ReconnectingDevice(target, () => this.connectChecked(), this.opts.target));
      switched = true;
      this.source.gate.setThrottle(undefined);
    } catch (e) {
      this.log.warn('cutover-failed', { cause: e, effect: 'guests stay on the local image; copying resumes' });
    } finally {
      this.source.gate.release();
    }
    this.pauseMs = Math.round((performance.now() - t0) * 100) / 100;
    if (!switched) {
      this.setState('ready');
      await this.recover(new JobError('EIO', 'cutover failed'));
      return false;
    }
    try {
      writeFenced(this.source.image, { export: this.source.name, target: this.opts.target, time: new Date().toISOString() });
    } catch (e) {
      this.log.error('fence-marker-failed', { image: this.source.image, cause: e });
    }
    this.log.info('cutover', { pauseMs: this.pauseMs, handoff: this.opts.handoff });
    if (this.opts.handoff === 'disconnect') this.source.disconnectClients();
    this.finishedAt = new Date();
    this.setState('completed');
    return true;
  }

  /** After a target failure: re-marked ranges wait in the bitmap; reconnect with backoff or give up. */
  private async recover(cause: unknown): Promise<void> {
    const hadWriteThrough = this.source.tracking.writeThroughActive;
    this.source.tracking.setWriteThrough(undefined);
    this.target?.destroy();
    this.target = undefined;
    for (;;) {
      this.retries++;
      this.log.warn('mirror-retry', { attempt: this.retries, maxRetries: this.opts.maxRetries, cause });
      if (this.retries > this.opts.maxRetries) throw new JobError('EIO', `target failed ${this.retries} times in a row: ${(cause as Error)?.message ?? cause}`, { cause });
      await this.idle(Math.min(100 * 2 ** (this.retries - 1), 5000));
      if (this.abortRequested) return;
      try {
        this.target = await this.connectChecked();
        if (hadWriteThrough) this.engage('active');
        return;
      } catch (e) {
        cause = e;
      }
    }
  }

  private finishAborted(): void {
    this.disengage();
    this.target?.destroy();
    this.target = undefined;
    this.finishedAt = new Date();
    this.setState('aborted');
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

