/**
 * Convergence and rate maths of a mirror job, kept apart from its loop:
 * when the dirty data left fits the allowed downtime, the measured copy
 * rate, when the guest outpaces the copy, and how hard to throttle it.
 */

/** Ready when what is left can be copied within the allowed downtime at the measured rate. */
export function fitsDowntime(dirtyBytes: number, rate: number, maxDowntimeMs: number): boolean {
  return dirtyBytes === 0 || (rate > 0 && (dirtyBytes / rate) * 1000 <= maxDowntimeMs);
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

/** Notices a guest that dirties data as fast as it is copied: two sweeps in a row that shrink it by less than 10 %. */
export class StallDetector {
  private previous = Infinity;
  private stalled = 0;

  /** Records a sweep's dirty bytes; true when the mirror is not converging. */
  observe(dirtyBytes: number): boolean {
    this.stalled = dirtyBytes >= this.previous * 0.9 ? this.stalled + 1 : 0;
    this.previous = dirtyBytes;
    return this.stalled >= 2;
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
