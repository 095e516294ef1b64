/**
 * Dirty tracking: marks every block a WRITE, TRIM or WRITE_ZEROES touches in
 * the export's dirty bitmap, after the operation below (failed or not: a
 * failed write may have changed part of the range). Marking after the write
 * is what makes the copy engine's "clear, then read" order safe: a copy that
 * read before this write landed is followed by a mark, hence by another copy.
 */
import type { ActivityLog } from '../../dirty/activity-log.js';
import type { DirtyBitmap } from '../../dirty/bitmap.js';
import type { Device, WriteOptions, ZeroOptions } from '../device.js';
import { byteLength, Filter } from './filter.js';

/** What a filter above may ask of the dirty tracking (write-through decides itself when a range is dirty). */
export interface DirtyTracker extends Device {
  /** The device below the tracking: changes made through it are not marked. */
  readonly untracked: Device;
  mark(offset: number, length: number): void;
}

export class DirtyTrackingFilter extends Filter implements DirtyTracker {
  /**
   * The export's activity log (src/dirty/activity-log.ts), when its dirty
   * tracking persists: a change into an extent the log does not name yet
   * waits until the log names it on disk, so a crash never loses a mark.
   */
  activityLog: ActivityLog | undefined;

  constructor(
    next: Device,
    readonly bitmap: DirtyBitmap,
  ) {
    super(next);
  }

  get untracked(): Device {
    // Write-through's local half is not marked (the target has it too), but it is
    // logged: after a crash nobody knows whether the target write was answered.
    if (!this.activityLog) return this.next;
    return (this.loggedUntracked ??= new LoggedUnmarked(this.next, () => this.activityLog));
  }

  private loggedUntracked: Device | undefined;

  mark(offset: number, length: number): void {
    this.bitmap.mark(offset, length);
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.tracked(offset, byteLength(data), () => this.next.write(offset, data, opts));
  }

  /**
   * Marked after it is made, as write() does; with an activity log, only a change into extents
   * the log already names on disk (one that would not wait for the log).
   */
  override writeNow(offset: number, data: readonly Buffer[]): boolean {
    const length = byteLength(data);
    const log = this.activityLog;
    if (log && !log.mayBeginNow(offset, length)) return false;
    log?.begin(offset, length);
    try {
      if (this.next.writeNow?.(offset, data) !== true) return false;
      this.bitmap.mark(offset, length);
      return true;
    } catch (e) {
      this.bitmap.mark(offset, length); // a failed write may have changed part of the range
      throw e;
    } finally {
      log?.end(offset, length);
    }
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.tracked(offset, length, () => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.tracked(offset, length, () => this.next.zero(offset, length, opts));
  }

  private async tracked(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const log = this.activityLog;
    if (!log) {
      try {
        await op();
      } finally {
        this.bitmap.mark(offset, length);
      }
      return;
    }
    const logged = log.begin(offset, length);
    try {
      if (logged) await logged; // the log cannot be written: the change is refused, not made unrecorded
      try {
        await op();
      } finally {
        this.bitmap.mark(offset, length);
      }
    } finally {
      log.end(offset, length);
    }
  }
}

/** Changes logged in the activity log (when there is one) but not marked in the bitmap. */
class LoggedUnmarked extends Filter {
  constructor(
    next: Device,
    private readonly log: () => ActivityLog | undefined,
  ) {
    super(next);
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.logged(offset, byteLength(data), () => this.next.write(offset, data, opts));
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.logged(offset, length, () => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.logged(offset, length, () => this.next.zero(offset, length, opts));
  }

  private async logged(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    const log = this.log();
    if (!log) return op();
    const logged = log.begin(offset, length);
    try {
      if (logged) await logged;
      await op();
    } finally {
      log.end(offset, length);
    }
  }
}
