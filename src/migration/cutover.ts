/**
 * The switch, bounded by `limitMs` and escapable by an abort. While guests
 * are held: copy the rest, flush the target, write the fence marker (synced),
 * tell an nbd-migrate destination it is complete, and only then swap the
 * export to the target. Any failure (or the bound, or an abort) releases
 * guests to the local image, unfenced: no guest ever writes to the target
 * while the source could still be served read-write.
 */
import type { Logger } from '../util/log.js';
import { abortion, type TargetConnector } from './connector.js';
import { type CopyOptions, type CopyStats, copySweep } from './copy.js';
import { JobError } from './errors.js';
import { NBD_CMD_MIGRATE_COMPLETE } from './incoming.js';
import { clearFenced, writeFenced } from './markers.js';
import { ReconnectingDevice } from './reconnecting-device.js';
import type { MirrorSource } from './source.js';
import type { Target } from './target.js';

export interface CutoverContext {
  source: MirrorSource;
  target: Target;
  connector: TargetConnector;
  limitMs: number;
  signal: AbortSignal;
  /** Copy options for the final sweep; `shouldStop` is the cutover's. */
  copyOptions: (shouldStop: () => boolean) => CopyOptions;
  stats: CopyStats;
  log: Logger;
}

export interface CutoverOutcome {
  switched: boolean;
  /** Why it did not switch. */
  failure?: unknown;
  /** How long guest writes were held, ms. */
  pauseMs: number;
  /** Where the pause went, ms: draining guest writes in flight (hold), the final sweep (and the bytes it sent), the target's flush, the fence marker, MIGRATE_COMPLETE and the swap. */
  phases: { holdMs: number; sweepMs: number; sweepBytes: number; flushMs: number; fenceMs: number; completeMs: number };
}

const noPhases = (): CutoverOutcome['phases'] => ({ holdMs: 0, sweepMs: 0, sweepBytes: 0, flushMs: 0, fenceMs: 0, completeMs: 0 });

/** Cutovers running in this process, and the background sweeps waiting for them to end. */
let cuttingOver = 0;
let sweepsWaiting: Array<() => void> = [];

/**
 * For a background sweep, before each new chunk: while any job in this process is cutting
 * over, a promise that resolves when none is. With several jobs on one server, a job's
 * final sweep (guests held) otherwise queues behind the others' bulk chunks for the event
 * loop, the thread pool and the CPU (bench cutover4: 512 KiB-1.5 MiB taking 72-382 ms).
 */
export function whileCuttingOver(): Promise<void> | undefined {
  return cuttingOver > 0 ? new Promise<void>((r) => sweepsWaiting.push(r)) : undefined;
}

/** Longest a cutover waits for the other jobs' chunks in flight before it holds guests anyway. */
export const QUIET_BOUND_MS = 1000;

/** Target requests of background sweeps in flight in this process (background()), and who waits for none. */
let backgroundRequests = 0;
let quietWaiters: Array<() => void> = [];

/**
 * The target as a background sweep uses it: its reads, writes, zeroes and trims
 * are counted, so that a cutover can let them finish before it holds guests (quiet()).
 */
export function background(target: Target): Target {
  return new Proxy(target, {
    get(t, p) {
      const v = Reflect.get(t, p, t) as unknown;
      if (typeof v !== 'function') return v;
      if (p !== 'write' && p !== 'zero' && p !== 'trim' && p !== 'read') return v.bind(t);
      return (...args: unknown[]) => {
        backgroundRequests++;
        return (v.apply(t, args) as Promise<unknown>).finally(() => {
          if (--backgroundRequests === 0) {
            const wake = quietWaiters;
            quietWaiters = [];
            for (const w of wake) w();
          }
        });
      };
    },
  });
}

/** Resolves once no background request is in flight in this process, or after `boundMs`. */
export function quiet(boundMs: number): Promise<void> {
  if (backgroundRequests === 0) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const t = setTimeout(resolve, boundMs);
    quietWaiters.push(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

/**
 * Cutovers in this process run one at a time, in the order they were asked for. Two at
 * once held their guests while each one's final sweep, flush and MIGRATE_COMPLETE queued
 * behind the other's, on the event loop, the thread pool and a shared destination (bench
 * cutover4, 4 jobs to one nbd-migrate destination: 3 jobs switching together paused
 * 30, 77 and 24 ms, one 64 KiB final sweep taking 57 ms). A job waiting here holds no
 * guests (they keep writing through); each switch is bounded (--cutover-timeout), so the
 * wait is too, and an abort ends it.
 */
let cutoverQueue: Promise<void> = Promise.resolve();

export async function cutover(ctx: CutoverContext): Promise<CutoverOutcome> {
  cuttingOver++;
  const before = cutoverQueue;
  let done!: () => void;
  const mine = new Promise<void>((r) => (done = r));
  // The next one waits for this one and for everything before it (this one may leave early, aborted).
  cutoverQueue = before.then(() => mine);
  try {
    await Promise.race([before, abortion(ctx.signal).catch(() => undefined)]);
    if (ctx.signal.aborted)
      return { switched: false, failure: new JobError('ECANCELED', 'the job was aborted while another cutover ran'), pauseMs: 0, phases: noPhases() };
    // Other jobs start no new chunks now (whileCuttingOver); the ones in flight finish before guests are
    // held, so the final sweep, flush and completion do not queue behind them (guests still run meanwhile).
    await Promise.race([quiet(QUIET_BOUND_MS), abortion(ctx.signal).catch(() => undefined)]);
    return await switchOver(ctx);
  } finally {
    done();
    if (--cuttingOver === 0) {
      const wake = sweepsWaiting;
      sweepsWaiting = [];
      for (const w of wake) w();
    }
  }
}

async function switchOver(ctx: CutoverContext): Promise<CutoverOutcome> {
  const { source, target, connector } = ctx;
  const stack = source.stack;
  const t0 = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new JobError('ETIMEDOUT', `the cutover did not finish within ${ctx.limitMs} ms (--cutover-timeout)`)), ctx.limitMs);
  });
  const escape = Promise.race([expired, abortion(ctx.signal)]);
  escape.catch(() => undefined);
  const bounded = <T>(p: Promise<T>): Promise<T> => Promise.race([p, escape]);
  let stop = false;
  let switched = false;
  let fenced = false;
  let failure: unknown;
  const phases = noPhases();
  let mark = t0;
  const lap = (): number => {
    const now = performance.now();
    const ms = Math.round((now - mark) * 100) / 100;
    mark = now;
    return ms;
  };
  try {
    await bounded(stack.gate.hold());
    phases.holdMs = lap();
    const sentBefore = ctx.stats.dataBytes + ctx.stats.zeroBytes;
    // No guest write runs now: write-through is moot, and one sweep empties the bitmap.
    stack.writeThrough.setWriteThrough(undefined);
    await bounded(copySweep(stack.local, target, stack.bitmap, ctx.copyOptions(() => stop), ctx.stats));
    phases.sweepMs = lap();
    phases.sweepBytes = ctx.stats.dataBytes + ctx.stats.zeroBytes - sentBefore;
    if (stack.bitmap.dirtyBytes() !== 0) throw new JobError('EIO', 'dirty blocks remain after the final sweep');
    await bounded(target.flush());
    phases.flushMs = lap();
    // Fenced before any guest can reach the target: a restart must never serve this image read-write again.
    writeFenced(source.image, { export: source.name, target: connector.uri, time: new Date().toISOString() });
    fenced = true;
    phases.fenceMs = lap();
    if (connector.boundOn(target)) await bounded(target.request(NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0));
    // Guests now talk to the target; a dropped connection is re-established under them.
    const forward = new ReconnectingDevice(target, () => connector.connect(false), connector.uri);
    stack.switch.swap(source.wrapRemote?.(forward) ?? forward);
    switched = true;
    phases.completeMs = lap();
    stack.throttle.setRate(undefined);
  } catch (e) {
    failure = e;
    stop = true;
    // Requests still out to a slow or frozen target fail now; their ranges are dirty again.
    target.destroy();
    if (fenced) {
      try {
        clearFenced(source.image);
      } catch (err) {
        ctx.log.error('unfence-failed', { image: source.image, cause: err, effect: 'the image is still served; a restart will refuse it without --force' });
      }
    }
    ctx.log.warn('cutover-failed', { cause: e, effect: 'guests stay on the local image; copying resumes' });
  } finally {
    clearTimeout(timer);
    stack.gate.release();
  }
  return { switched, failure, pauseMs: Math.round((performance.now() - t0) * 100) / 100, phases };
}
