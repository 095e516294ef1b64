/**
 * Write-through (active mirroring), mirror policy over the dirty tracking
 * below it: while on, a guest change goes to the local image and then to the
 * mirror target, under a range lock shared with the copy engine, and its
 * blocks are marked dirty only if the target does not take it (the local
 * write failed, the target write failed, or it was too slow). So the mirror
 * converges even while the guest keeps writing. Off, it passes through and
 * the tracking below marks every change.
 *
 * A target write slower than `timeoutMs` does not hold the guest: its range
 * is marked dirty, the guest is answered after its local write, and `onSlow`
 * is told (the job then turns write-through off). The range stays locked
 * until the late target write settles, so a later copy of the same blocks
 * cannot be overtaken by it.
 */
import type { RangeLock } from '../../util/range-lock.js';
import { settledWithin } from '../../util/within.js';
import type { Device, WriteOptions, ZeroOptions } from '../device.js';
import type { DirtyTracker } from './dirty-tracking.js';
import { byteLength, Filter } from './filter.js';

export interface WriteThrough {
  target: Device;
  locks: RangeLock;
  /** Told about each failed target write (the range is already re-marked dirty). */
  onError(e: unknown): void;
  /** How long a guest write waits for the target's answer (default: as long as it takes). */
  timeoutMs?: number;
  /** Told when a target write took longer than timeoutMs (the range is already marked dirty). */
  onSlow?(): void;
}

export class WriteThroughFilter extends Filter<DirtyTracker> {
  private wt: WriteThrough | undefined;

  constructor(tracker: DirtyTracker) {
    super(tracker);
  }

  /** Turns write-through on (a target) or off (undefined). */
  setWriteThrough(wt: WriteThrough | undefined): void {
    this.wt = wt;
  }

  get writeThroughActive(): boolean {
    return this.wt !== undefined;
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    const wt = this.wt;
    if (!wt) return this.next.write(offset, data, opts);
    return this.both(wt, offset, byteLength(data), (d) => d.write(offset, data, opts));
  }

  /** Only with write-through off: a write-through write waits for the target. */
  override writeNow(offset: number, data: readonly Buffer[]): boolean {
    return !this.wt && this.next.writeNow?.(offset, data) === true;
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    const wt = this.wt;
    if (!wt) return this.next.trim(offset, length, opts);
    return this.both(wt, offset, length, (d) => d.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    const wt = this.wt;
    if (!wt) return this.next.zero(offset, length, opts);
    return this.both(wt, offset, length, (d) => d.zero(offset, length, opts));
  }

  /** The change on the local image (unmarked) and on the target, under the range lock. */
  private async both(wt: WriteThrough, offset: number, length: number, op: (d: Device) => Promise<void>): Promise<void> {
    const tracker = this.next;
    const release = await wt.locks.acquire(offset, length);
    try {
      await op(tracker.untracked);
    } catch (e) {
      tracker.mark(offset, length);
      release();
      throw e;
    }
    const remote = op(wt.target).then(
      () => true,
      (e) => {
        // The guest's write is safe locally; the mirror catches up from the bitmap.
        tracker.mark(offset, length);
        wt.onError(e);
        return true;
      },
    );
    if (wt.timeoutMs === undefined) {
      await remote;
      release();
      return;
    }
    if (await settledWithin(remote, wt.timeoutMs)) {
      release();
      return;
    }
    tracker.mark(offset, length);
    wt.onSlow?.();
    void remote.finally(release);
  }
}
