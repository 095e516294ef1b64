/**
 * Change marks: tells a listener (the export's checkpoints) of every WRITE,
 * TRIM and WRITE_ZEROES, before the change starts below and again when it is
 * done, before it is answered (failed or not: a failed write may have changed
 * part of the range). Marking first means any change that has reached the
 * activity log below is already in the checkpoints' bits when the log stores
 * them at its checkpoint (their crash safety rests on that). It sits above
 * write-through, so a change mirrored to the target (which the dirty tracking
 * below leaves unmarked) is still a change of the disk.
 */
import type { Device, WriteOptions, ZeroOptions } from '../device.js';
import { byteLength, Filter } from './filter.js';

export interface ChangeListener {
  mark(offset: number, length: number): void;
}

export class ChangeMarkFilter extends Filter {
  constructor(
    next: Device,
    private readonly listener: ChangeListener,
  ) {
    super(next);
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.marked(offset, byteLength(data), () => this.next.write(offset, data, opts));
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.marked(offset, length, () => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.marked(offset, length, () => this.next.zero(offset, length, opts));
  }

  /** Marked before and after, as write() is; a write not made here is marked again by write(). */
  override writeNow(offset: number, data: readonly Buffer[]): boolean {
    const length = byteLength(data);
    this.listener.mark(offset, length);
    if (this.next.writeNow?.(offset, data) !== true) return false;
    this.listener.mark(offset, length);
    return true;
  }

  private async marked(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    this.listener.mark(offset, length);
    try {
      await op();
    } finally {
      this.listener.mark(offset, length);
    }
  }
}
