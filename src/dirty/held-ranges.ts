/**
 * A RangeLock that can say which ranges are held or waited for. A mirror job
 * uses it for its copies (which clear a chunk's bits before copying it): the
 * activity log's checkpoints cover those ranges, so a chunk whose copy has
 * not been acknowledged yet is never stored as clean (activity-log.ts).
 */
import { RangeLock } from '../util/range-lock.js';

export class HeldRangeLock extends RangeLock {
  private readonly ranges = new Set<readonly [number, number]>();

  /**
   * @param onRelease told of every range when it is released: a copy or a
   *   write-through write holds its range until the target answered it (the
   *   job counts those as acknowledged but not yet flushed).
   */
  constructor(private readonly onRelease?: (offset: number, length: number) => void) {
    super();
  }

  override async acquire(offset: number, length: number): Promise<() => void> {
    const r = [offset, length] as const;
    this.ranges.add(r);
    let release: () => void;
    try {
      release = await super.acquire(offset, length);
    } catch (e) {
      this.ranges.delete(r);
      throw e;
    }
    return () => {
      this.ranges.delete(r);
      this.onRelease?.(offset, length);
      release();
    };
  }

  /** [offset, length] of every range held or waited for now. */
  heldRanges(): Iterable<readonly [number, number]> {
    return [...this.ranges];
  }
}
