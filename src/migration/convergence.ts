/**
 * Convergence and rate maths of a mirror job, kept apart from its loop:
 * when the dirty data left fits the allowed downtime, the measured copy
 * rate, when the guest outpaces the copy, and how hard to throttle it.
 */

/** Ready when what is left can be copied within the allowed downtime at the measured rate. */
export function fitsDowntime(dirtyBytes: number, rate: number, maxDowntimeMs: number): boolean {
  return dirtyBytes === 0 || (rate > 0 && (dirtyBytes / rate) * 1000 <= maxDowntimeMs);
}

/** Why a due cutover waits: the final sweep it would need, against the allowed downtime. */
export function waitingReason(dirtyBytes: number, rate: number, maxDowntimeMs: number): string {
  const mib = (dirtyBytes / 1048576).toFixed(1);
  if (!(rate > 0)) return `${mib} MiB dirty and no copy rate measured yet: copying on`;
  const ms = Math.round((dirtyBytes / rate) * 1000);
  return `the final sweep would take about ${ms} ms (${mib} MiB dirty at ${(rate / 1048576).toFixed(0)} MiB/s), over --max-downtime ${maxDowntimeMs} ms: copying on`;
}

/** The copy rate: an even blend of the last sweep with the ones before; small sweeps say nothing. */
export class RateMeter {
  rate = 0;

  sweep(movedBytes: number, seconds: number): void {
    if (movedBytes <= 1024 * 1024 || seconds <= 0.01) return;
    const r = movedBytes / seconds;
    this.rate = this.rate ? 0.5 * this.rate + 0.5 * r : r;
  }

  /** During a long sweep, what it has done so far (after half a second), else the last measure. */
  live(movedBytes: number, seconds: number): number {
    return seconds >= 0.5 ? movedBytes / seconds : this.rate;
  }
}

/**
 * A guest dirtying faster than a quarter of the copy rate: what a sweep leaves
 * dirty over the sweep's time is the guest's rate (an underestimate: blocks
 * written before the sweep reached them were copied by it). At that rate each
 * sweep at best quarters what is left, and under random writes at 64 KiB
 * granularity it never shrinks at all.
 */
export function guestOutpaces(dirtyBytes: number, sweepSeconds: number, copyRate: number): boolean {
  return sweepSeconds > 0 && copyRate > 0 && dirtyBytes / sweepSeconds >= copyRate / 4;
}

/**
 * Notices a guest that dirties data as fast as it is copied: from the measured rates
 * after one sweep (guestOutpaces), or else two sweeps in a row that shrink it by less than 10 %.
 */
export class StallDetector {
  private previous = Infinity;
  private stalled = 0;
  /** Why the last observe() returned true. */
  reason: { guestDirtyRate: number; copyRate: number; rule: 'rates' | 'two-sweeps' } | undefined;

  /** Records a sweep's dirty bytes (and, when known, its duration and the copy rate); true when the mirror is not converging. */
  observe(dirtyBytes: number, sweepSeconds = 0, copyRate = 0): boolean {
    this.stalled = dirtyBytes >= this.previous * 0.9 ? this.stalled + 1 : 0;
    this.previous = dirtyBytes;
    const guestDirtyRate = sweepSeconds > 0 ? Math.round(dirtyBytes / sweepSeconds) : 0;
    if (guestOutpaces(dirtyBytes, sweepSeconds, copyRate)) this.reason = { guestDirtyRate, copyRate: Math.round(copyRate), rule: 'rates' };
    else if (this.stalled >= 2) this.reason = { guestDirtyRate, copyRate: Math.round(copyRate), rule: 'two-sweeps' };
    else this.reason = undefined;
    return this.reason !== undefined;
  }

  /** A sweep that fitted: start again. */
  reset(dirtyBytes: number): void {
    this.previous = dirtyBytes;
  }
}

/** The guest write limit that lets the copy catch up: half the copy rate, at least 1 MiB/s. */
export function guestThrottleRate(copyRate: number): number {
  return Math.max(1024 * 1024, Math.floor((copyRate || 8 * 1024 * 1024) / 2));
}
