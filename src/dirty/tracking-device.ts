/**
 * Marks every block a WRITE, TRIM or WRITE_ZEROES touches in the export's dirty
 * bitmap, after the local operation (failed or not: a failed write may have
 * changed part of the range). Marking after the write is what makes the copy
 * engine's "clear, then read" order safe: a copy that read before this write
 * landed is followed by a mark, hence by another copy.
 *
 * In active (write-through) mode the guest's change also goes to the mirror
 * target, under a range lock shared with the copy engine; then the block is
 * marked only if the target write fails, so the mirror converges even while
 * the guest keeps writing. A target write slower than `timeoutMs` does not
 * hold the guest: its range is marked dirty, the guest is answered after its
 * local write, and `onSlow` is told (the job then drops write-through). The
 * range stays locked until the late target write settles, so a later copy of
 * the same blocks cannot be overtaken by it.
 */
import type { Capabilities, Device, Extent, WriteOptions, ZeroOptions } from '../storage/device.js';
import type { RangeLock } from '../migration/range-lock.js';
import type { DirtyBitmap } from './bitmap.js';

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

export class DirtyTrackingDevice implements Device {
  private writeThrough: WriteThrough | undefined;

  constructor(
    readonly inner: Device,
    readonly bitmap: DirtyBitmap,
  ) {}

  get size(): number {
    return this.inner.size;
  }

  /** Turns write-through on (a target) or off (undefined). */
  setWriteThrough(wt: WriteThrough | undefined): void {
    this.writeThrough = wt;
  }

  get writeThroughActive(): boolean {
    return this.writeThrough !== undefined;
  }

  capabilities(): Capabilities {
    return this.inner.capabilities();
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.inner.read(offset, length, into, at);
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    let length = 0;
    for (const b of data) length += b.length;
    return this.modify(offset, length, (d) => d.write(offset, data, opts));
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.modify(offset, length, (d) => d.trim(offset, length, opts));
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.modify(offset, length, (d) => d.zero(offset, length, opts));
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.inner.extents(offset, length, maxExtents);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  private async modify(offset: number, length: number, op: (d: Device) => Promise<void>): Promise<void> {
    const wt = this.writeThrough;
    if (!wt) {
      try {
        await op(this.inner);
      } finally {
        this.bitmap.mark(offset, length);
      }
      return;
    }
    const release = await wt.locks.acquire(offset, length);
    try {
      await op(this.inner);
    } catch (e) {
      this.bitmap.mark(offset, length);
      release();
      throw e;
    }
    const remote = op(wt.target).then(
      () => true,
      (e) => {
        // The guest's write is safe locally; the mirror catches up from the bitmap.
        this.bitmap.mark(offset, length);
        wt.onError(e);
        return true;
      },
    );
    if (wt.timeoutMs === undefined) {
      await remote;
      release();
      return;
    }
    let timer: NodeJS.Timeout | undefined;
    const inTime = await Promise.race([remote, new Promise<false>((r) => (timer = setTimeout(() => r(false), wt.timeoutMs)))]);
    clearTimeout(timer);
    if (inTime) {
      release();
      return;
    }
    this.bitmap.mark(offset, length);
    wt.onSlow?.();
    void remote.finally(release);
  }
}
