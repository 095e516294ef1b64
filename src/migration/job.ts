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
import * as C from '../protocol/constants.js';
import { NbdClient, type NbdClientOptions } from '../client/nbd-client.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import type { DirtyTrackingDevice } from '../dirty/tracking-device.js';
import type { Device } from '../storage/device.js';
import { logger, type Logger } from '../util/log.js';
import { copySweep, type CopyStats, DEFAULT_COPY_OPTIONS, newCopyStats } from './copy.js';
import type { GateDevice } from './gate-device.js';
import { clearFenced, writeFenced } from './markers.js';
import { RangeLock } from './range-lock.js';
import { ReconnectingDevice } from './reconnecting-device.js';
import { targetErrorKind } from './target-errors.js';
import { TokenBucket } from './token-bucket.js';

export type JobState = 'created' | 'copying' | 'ready' | 'cutting-over' | 'completed' | 'aborted' | 'failed';
export type ConvergeMode = 'active' | 'throttle';

/** What the job needs of its target: a Device plus the NBD connection's facts (NbdClient fits). */
export interface MirrorTarget extends Device {
  readonly readOnly: boolean;
  readonly structuredReplies: boolean;
  readonly contexts: ReadonlyMap<string, number>;
  /** What the target listed in the nbd-migrate: namespace (its identity, whether it receives a migration, its space). */
  readonly listedContexts?: readonly string[];
  /** The connection is gone (the server closed it, or it failed). */
  readonly closed?: boolean;
  /** A bare command (used for NBD_CMD_MIGRATE_COMPLETE and _RELEASE). */
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
  /** The export's identity (its `nbd-migrate:export-id:` context): a mirror onto it is a mirror onto itself. */
  exportId: string;
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
  /** A target connection with requests outstanding and no reply for this long is dropped and re-established. */
  targetTimeoutMs: number;
  /** A write-through slower than this is left to the background copy: the guest is answered after its local write. */
  writeThroughTimeoutMs: number;
  /** Bound on the cutover (hold, final sweep, flush, completion); past it the cutover fails and guests go on locally. */
  cutoverTimeoutMs: number;
  /** Retries on the same connection of a target request that failed with an error that may pass (EIO). */
  requestRetries: number;
  /** Mirror onto a live nbd-migrate export, or take over a destination bound to another job. */
  force: boolean;
  /** Refuse, instead of warning, when the destination cannot hold the source's full virtual size. */
  requireSpace: boolean;
  /** This job's identity, which binds an --incoming destination (default: a new random one). */
  jobId?: string;
  /** Identities of every export this server serves (a target among them that is not receiving is refused). */
  localExportIds?: () => ReadonlySet<string>;
  /** Connects to the target (default: NbdClient); tests substitute their own. */
  connect?: (uri: string, options: NbdClientOptions) => Promise<MirrorTarget>;
}

export const DEFAULT_MIRROR_OPTIONS: Omit<MirrorOptions, 'target'> = {
  cutover: 'manual',
  maxDowntimeMs: 50,
  converge: 'active',
  handoff: 'forward',
  maxRetries: 10,
  chunkBytes: DEFAULT_COPY_OPTIONS.chunkBytes,
  maxInflight: DEFAULT_COPY_OPTIONS.maxInflight,
  targetTimeoutMs: 30_000,
  writeThroughTimeoutMs: 1000,
  cutoverTimeoutMs: 5000,
  requestRetries: 4,
  force: false,
  requireSpace: false,
};

/** What an nbd-migrate target says about itself in its listing (nothing for qemu-nbd, nbdkit, ...). */
export interface TargetFacts {
  exportId: string | undefined;
  incoming: boolean;
  freeBytes: number | undefined;
  allocatedBytes: number | undefined;
}

export function targetFacts(listed: readonly string[] | undefined): TargetFacts {
  const num = (prefix: string) => {
    const v = listed?.find((n) => n.startsWith(prefix));
    const n = v === undefined ? NaN : Number(v.slice(prefix.length));
    return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
  };
  return {
    exportId: listed?.find((n) => n.startsWith(C.EXPORT_ID_CONTEXT_PREFIX))?.slice(C.EXPORT_ID_CONTEXT_PREFIX.length),
    incoming: listed?.includes(C.MIGRATE_INCOMING_CONTEXT) ?? false,
    freeBytes: num(C.FREE_BYTES_CONTEXT_PREFIX),
    allocatedBytes: num(C.ALLOCATED_BYTES_CONTEXT_PREFIX),
  };
}

export interface JobStatus {
  export: string;
  target: string;
  /** This job's identity (binds an --incoming destination). */
  jobId: string;
  /** What the target is: an nbd-migrate destination, a live nbd-migrate export (--force), or another server. */
  targetKind: 'nbd-migrate-incoming' | 'nbd-migrate-live' | 'foreign' | null;
  /** Data the target already held when the job started (other servers; null when unknown). */
  targetDataBytes: number | null;
  /** Free space the destination reported (nbd-migrate --incoming only). */
  targetFreeBytes: number | null;
  /** Allocated data of the source when the job started. */
  sourceDataBytes: number | null;
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
  /** The target is unreachable and the job is reconnecting. */
  retrying: boolean;
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
    options?: { cause?: unknown; permanent?: boolean },
  ) {
    super(message, options);
    this.permanent = options?.permanent ?? false;
  }
  /** Retrying will not help (a wrong target, one bound to another job, no space): the job fails at once. */
  readonly permanent: boolean;
}

/** A promise that rejects when `signal` aborts. */
function abortion(signal: AbortSignal): Promise<never> {
  return new Promise<never>((_r, reject) => {
    const fail = () => reject(new JobError('ECANCELED', 'the job was aborted'));
    if (signal.aborted) fail();
    else signal.addEventListener('abort', fail, { once: true });
  });
}

export class MirrorJob extends EventEmitter {
  state: JobState = 'created';
  readonly jobId: string;
  private pass = 0;
  private readonly stats: CopyStats = newCopyStats();
  private rate = 0;
  private retries = 0;
  private retrying = false;
  private pauseMs: number | null = null;
  private error: string | null = null;
  private readonly startedAt = new Date();
  private finishedAt: Date | null = null;
  private target: MirrorTarget | undefined;
  /** What the target said of itself at the first connection; later connections must say the same. */
  private facts: TargetFacts | undefined;
  private targetKind: JobStatus['targetKind'] = null;
  private targetDataBytes: number | null = null;
  private sourceDataBytes: number | null = null;
  private readonly locks = new RangeLock();
  private limiter: TokenBucket | undefined;
  private cutoverRequested = false;
  private abortRequested = false;
  private readonly aborter = new AbortController();
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
    this.jobId = opts.jobId ?? randomBytes(8).toString('hex');
    this.log = logger({ export: source.name, target: opts.target, job: this.jobId });
    if (opts.maxBandwidth) this.limiter = new TokenBucket(opts.maxBandwidth);
  }

  /** Connects and checks the target; rejects (and the job never starts) when it is unfit. */
  async start(): Promise<void> {
    this.sourceDataBytes = await allocatedBytes(this.source.tracking.inner);
    this.target = await this.connectChecked(true);
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
    const rate = this.liveRate();
    return {
      export: this.source.name,
      target: this.opts.target,
      jobId: this.jobId,
      targetKind: this.targetKind,
      targetDataBytes: this.targetDataBytes,
      targetFreeBytes: this.facts?.freeBytes ?? null,
      sourceDataBytes: this.sourceDataBytes,
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
      rate: Math.round(rate),
      // What is left is what the bitmap holds (every block starts dirty); unknown while the target is away.
      etaSeconds: rate > 0 && !this.isFinal && !this.retrying ? Math.round((dirtyBytes / rate) * 10) / 10 : null,
      maxBandwidth: this.limiter?.rate ?? null,
      cutover: this.opts.cutover,
      maxDowntimeMs: this.opts.maxDowntimeMs,
      convergence: this.source.tracking.writeThroughActive ? 'active' : this.source.gate.throttleRate ? 'throttle' : 'none',
      throttleRate: this.source.gate.throttleRate ?? null,
      retries: this.retries,
      retrying: this.retrying,
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

  /**
   * Connects and checks that the target is a fit, and on later connections
   * that it is still the same disk. Unfit targets are refused with a
   * permanent JobError naming the target and what to do.
   */
  private async connectChecked(first: boolean): Promise<MirrorTarget> {
    const uri = this.opts.target;
    const connect = this.opts.connect ?? ((u: string, o: NbdClientOptions) => NbdClient.connect(u, o));
    const metaContexts = [C.BASE_ALLOCATION, C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId];
    // Only the job's first connection may take a destination over; its reconnects must find it still bound to it.
    if (first && this.opts.force) metaContexts.push(C.MIGRATE_TAKEOVER_CONTEXT);
    let client: MirrorTarget;
    try {
      const connecting = connect(uri, { metaContexts, listMetaContexts: [C.MIGRATE_NAMESPACE], requestTimeoutMs: this.opts.targetTimeoutMs });
      connecting.then((c) => this.aborter.signal.aborted && c.destroy(), () => undefined);
      client = await Promise.race([connecting, abortion(this.aborter.signal)]);
    } catch (e) {
      if (e instanceof JobError) throw e;
      const msg = (e as Error).message;
      if (/bound to migration job/.test(msg))
        throw new JobError('EBUSY', `target ${uri} refused this job: ${msg.replace(/^.*?: the server refused export "[^"]*" \([^)]*\): /, '')}`, { cause: e, permanent: true });
      throw new JobError('EUNREACHABLE', `target ${uri} is unreachable: ${msg}`, { cause: e });
    }
    try {
      await this.checkTarget(client, first);
    } catch (e) {
      // Attaching bound an nbd-migrate destination to this job: let it go again, since the job never starts.
      if (first && client.contexts.has(C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId))
        await client.request(C.NBD_CMD_MIGRATE_RELEASE, 0, 0, 0).catch(() => undefined);
      client.destroy();
      throw e;
    }
    client.on('close', (err?: Error) => {
      if (!err) return;
      this.log.warn('target-connection-lost', { cause: err });
      this.poke(); // an idle, synchronised job notices at once, not at its next write
    });
    return client;
  }

  private async checkTarget(client: MirrorTarget, first: boolean): Promise<void> {
    const uri = this.opts.target;
    const unfit = (code: string, msg: string) => new JobError(code, msg, { permanent: true });
    if (client.size < this.source.size)
      throw unfit('ETOOSMALL', `target ${uri} is smaller than the source (${client.size} < ${this.source.size} bytes)`);
    if (client.readOnly) throw unfit('EROFS', `target ${uri} is read-only`);
    const facts = targetFacts(client.listedContexts);
    if (facts.exportId !== undefined && facts.exportId === this.source.exportId)
      throw unfit('ESELF', `target ${uri} is export "${this.source.name}" itself: a mirror onto itself would destroy it. Give the URI of the destination host`);
    if (!first) {
      if (facts.exportId !== this.facts?.exportId)
        throw unfit(
          'EIDENTITY',
          `target ${uri} is no longer the disk this job was copying to (export id ${this.facts?.exportId ?? 'none'} before, ${facts.exportId ?? 'none'} now); the job stops rather than write into another disk`,
        );
      this.log.info('target-connected', { reconnect: true, contexts: [...client.contexts.keys()] });
      return;
    }
    if (facts.exportId !== undefined && !facts.incoming && !this.opts.force) {
      const local = this.opts.localExportIds?.().has(facts.exportId) ? ' (an export of this same server)' : '';
      throw unfit(
        'ELIVE',
        `target ${uri} is a live nbd-migrate export${local}, not a migration destination: mirroring would overwrite a disk that may be in use. ` +
          `Serve the destination image with --incoming, or pass --force if that export really is scratch`,
      );
    }
    if (facts.incoming && !client.contexts.has(C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId))
      throw unfit('EPROTO', `target ${uri} is an nbd-migrate destination but did not accept this job's incoming context`);
    this.facts = facts;
    this.targetKind = facts.exportId === undefined ? 'foreign' : facts.incoming ? 'nbd-migrate-incoming' : 'nbd-migrate-live';
    if (facts.freeBytes !== undefined) this.checkSpace(facts.freeBytes + (facts.allocatedBytes ?? 0));
    // What a foreign target already holds: data there will be overwritten (holes it reads as zero are skipped).
    if (this.targetKind !== 'nbd-migrate-incoming' && client.contexts.has(C.BASE_ALLOCATION))
      this.targetDataBytes = await allocatedBytes(client, this.source.size);
    this.log.info('target-connected', {
      kind: this.targetKind,
      size: client.size,
      exportId: facts.exportId ?? null,
      targetDataBytes: this.targetDataBytes,
      targetFreeBytes: facts.freeBytes ?? null,
      sourceDataBytes: this.sourceDataBytes,
      force: this.opts.force,
      structuredReplies: client.structuredReplies,
      contexts: [...client.contexts.keys()],
    });
  }

  /** The destination must hold the source's data; it should hold the whole virtual size. */
  private checkSpace(room: number): void {
    const uri = this.opts.target;
    const data = this.sourceDataBytes ?? this.source.size;
    if (room < data)
      throw new JobError(
        'ENOSPC',
        `target ${uri} has room for ${room} bytes but the source holds ${data} bytes of data: free space on the destination first`,
        { permanent: true },
      );
    if (room < this.source.size) {
      const msg = `target ${uri} has room for ${room} bytes, less than the ${this.source.size}-byte virtual size: the guest could run out of space after cutover`;
      if (this.opts.requireSpace) throw new JobError('ENOSPC', `${msg} (--require-space)`, { permanent: true });
      this.log.warn('target-space-short', { room, size: this.source.size, sourceDataBytes: data, effect: 'mirroring anyway; --require-space refuses' });
    }
  }

  private copyOptions(extra: { maxInflight?: number; skipTargetZeros: boolean; shouldStop: () => boolean; limited: boolean }) {
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
      this.source.bitmap.markAll();
      let previousDirty = Infinity;
      let stalled = 0;
      for (;;) {
        if (this.abortRequested) return await this.finishAborted();
        const target = this.target!;
        if (target.closed) {
          await this.recover(new JobError('ECONNRESET', `the connection to ${this.opts.target} was closed`));
          continue;
        }
        // A sweep is a pass only when there is something to copy (a synchronised job idles here).
        if (this.pass === 0 || this.source.bitmap.dirtyBlocks() > 0) this.pass++;
        const before = this.stats.dataBytes + this.stats.zeroBytes;
        const t0 = performance.now();
        this.sweepStart = { t: t0, bytes: before };
        try {
          await copySweep(
            this.source.tracking.inner,
            target,
            this.source.bitmap,
            this.copyOptions({ skipTargetZeros: this.pass === 1, shouldStop: () => this.abortRequested, limited: true }),
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
        if (moved > 1024 * 1024 && seconds > 0.01) {
          const r = moved / seconds;
          this.rate = this.rate ? 0.5 * this.rate + 0.5 * r : r;
        }
        this.firstSweepDone = true;
        if (this.abortRequested) return await this.finishAborted();

        const dirty = this.source.bitmap.dirtyBytes();
        const fits = dirty === 0 || (this.rate > 0 && (dirty / this.rate) * 1000 <= this.opts.maxDowntimeMs);
        this.log.debug('mirror-sweep', { pass: this.pass, seconds, moved, dirty, rate: this.rate });
        this.emit('progress', this.status());
        if (fits) {
          if (this.state === 'copying') this.setState('ready');
          // Stay synchronised until cutover: guest writes go to both sides (again, after a slow target dropped it).
          if (this.opts.cutover === 'manual') this.engage('active');
          if (this.opts.cutover === 'auto' || this.cutoverRequested) {
            if (await this.cutover()) return;
            if (this.abortRequested) return await this.finishAborted();
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
      if (this.abortRequested) return await this.finishAborted();
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
        timeoutMs: this.opts.writeThroughTimeoutMs,
        onError: (e) => this.log.warn('write-through-failed', { cause: e, effect: 'range marked dirty; guest unaffected' }),
        onSlow: () => {
          // The target is slow or frozen: guests must not wait on it. The background copy catches up.
          this.source.tracking.setWriteThrough(undefined);
          this.log.warn('write-through-slow', {
            timeoutMs: this.opts.writeThroughTimeoutMs,
            effect: 'range marked dirty; guests are answered after their local write; back to background copying',
          });
        },
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

  /**
   * The switch, bounded by cutoverTimeoutMs and escapable by abort. While
   * guests are held: copy the rest, flush the target, write the fence marker
   * (synced), tell an nbd-migrate destination it is complete, and only then
   * swap the export to the target. Any failure (or the bound, or an abort)
   * releases guests to the local image, unfenced.
   * Resolves true when completed; false when it failed and copying goes on.
   */
  private async cutover(): Promise<boolean> {
    const target = this.target!;
    this.setState('cutting-over');
    const t0 = performance.now();
    const limitMs = this.opts.cutoverTimeoutMs;
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<never>((_r, reject) => {
      timer = setTimeout(() => reject(new JobError('ETIMEDOUT', `the cutover did not finish within ${limitMs} ms (--cutover-timeout)`)), limitMs);
    });
    const escape = Promise.race([expired, abortion(this.aborter.signal)]);
    escape.catch(() => undefined);
    const bounded = <T>(p: Promise<T>): Promise<T> => Promise.race([p, escape]);
    let stop = false;
    let switched = false;
    let fenced = false;
    let failure: unknown;
    try {
      await bounded(this.source.gate.hold());
      // No guest write runs now: write-through is moot, and one sweep empties the bitmap.
      this.source.tracking.setWriteThrough(undefined);
      await bounded(
        copySweep(
          this.source.tracking.inner,
          target,
          this.source.bitmap,
          this.copyOptions({ maxInflight: Math.max(this.opts.maxInflight, 16), skipTargetZeros: false, shouldStop: () => stop, limited: false }),
          this.stats,
        ),
      );
      if (this.source.bitmap.dirtyBytes() !== 0) throw new JobError('EIO', 'dirty blocks remain after the final sweep');
      await bounded(target.flush());
      // Fenced before any guest can reach the target: a restart must never serve this image read-write again.
      writeFenced(this.source.image, { export: this.source.name, target: this.opts.target, time: new Date().toISOString() });
      fenced = true;
      if (target.contexts.has(C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId)) await bounded(target.request(C.NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0));
      // Guests now talk to the target; a dropped connection is re-established under them.
      this.source.gate.swap(new ReconnectingDevice(target, () => this.connectChecked(false), this.opts.target));
      switched = true;
      this.source.gate.setThrottle(undefined);
    } catch (e) {
      failure = e;
      stop = true;
      // Requests still out to a slow or frozen target fail now; their ranges are dirty again.
      target.destroy();
      if (fenced) {
        try {
          clearFenced(this.source.image);
        } catch (err) {
          this.log.error('unfence-failed', { image: this.source.image, cause: err, effect: 'the image is still served; a restart will refuse it without --force' });
        }
      }
      this.log.warn('cutover-failed', { cause: e, effect: 'guests stay on the local image; copying resumes' });
    } finally {
      clearTimeout(timer);
      this.source.gate.release();
    }
    this.pauseMs = Math.round((performance.now() - t0) * 100) / 100;
    if (!switched) {
      this.setState('ready');
      if (this.abortRequested) return false;
      if (failure instanceof JobError && failure.permanent) throw failure;
      await this.recover(failure ?? new JobError('EIO', 'cutover failed'));
      return false;
    }
    this.log.info('cutover', { pauseMs: this.pauseMs, handoff: this.opts.handoff });
    if (this.opts.handoff === 'disconnect') this.source.disconnectClients();
    this.finishedAt = new Date();
    this.setState('completed');
    return true;
  }

  /**
   * After a target failure: re-marked ranges wait in the bitmap; reconnect with
   * backoff or give up. Permanent errors (no space, read-only, a target that
   * is no longer the same disk or now belongs to another job) fail at once.
   */
  private async recover(cause: unknown): Promise<void> {
    const hadWriteThrough = this.source.tracking.writeThroughActive;
    this.source.tracking.setWriteThrough(undefined);
    this.target?.destroy();
    this.target = undefined;
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
          this.target = await this.connectChecked(false);
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

  /** Lets an nbd-migrate destination go, so another job may bind it (best effort, bounded). */
  private async releaseDestination(): Promise<void> {
    if (this.targetKind !== 'nbd-migrate-incoming') return;
    const connect = this.opts.connect ?? ((u: string, o: NbdClientOptions) => NbdClient.connect(u, o));
    let c: MirrorTarget | undefined;
    const t = setTimeout(() => c?.destroy(), 2000);
    try {
      c = await connect(this.opts.target, {
        metaContexts: [C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId],
        connectTimeoutMs: 2000,
        requestTimeoutMs: 2000,
      });
      if (c.contexts.has(C.MIGRATE_INCOMING_JOB_PREFIX + this.jobId)) await c.request(C.NBD_CMD_MIGRATE_RELEASE, 0, 0, 0);
      this.log.info('destination-released', { target: this.opts.target });
    } catch (e) {
      this.log.warn('destination-release-failed', {
        cause: e,
        effect: 'the destination stays bound to this job; another source needs --force to take it over',
      });
    } finally {
      clearTimeout(t);
      c?.destroy();
    }
  }

  private async finishAborted(): Promise<void> {
    this.disengage();
    this.target?.destroy();
    this.target = undefined;
    await this.releaseDestination();
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

/** Bytes a device holds as data (not reading as zero), by its allocation map. */
async function allocatedBytes(dev: Device, size = dev.size): Promise<number> {
  let pos = 0;
  let data = 0;
  while (pos < size) {
    const extents = await dev.extents(pos, size - pos, 1024);
    if (extents.length === 0) break;
    for (const e of extents) {
      if (!(e.flags & C.NBD_STATE_ZERO)) data += e.length;
      pos += e.length;
    }
  }
  return data;
}
