/**
 * Dirty tracking: marks every block a WRITE, TRIM or WRITE_ZEROES touches in
 * the export's dirty bitmap, after the operation below (failed or not: a
 * failed write may have changed part of the range). Marking after the write
 * is what makes the copy engine's "clear, then read" order safe: a copy that
 * read before this write landed is followed by a mark, hence by another copy.
 */
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
  constructor(
    next: Device,
    readonly bitmap: DirtyBitmap,
  ) {
    super(next);
  }

  get untracked(): Device {
    return this.next;
  }

  mark(offset: number, length: number): void {
    this.bitmap.mark(offset, length);
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.tracked(offset, byteLength(data), () => this.next.write(offset, data, opts));
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.tracked(offset, length, () => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.tracked(offset, length, () => this.next.zero(offset, length, opts));
  }

  private async tracked(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } finally {
      this.bitmap.mark(offset, length);
    }
  }
}
