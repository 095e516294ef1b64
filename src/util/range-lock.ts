/**
 * Exclusive locks over byte ranges. The copy engine holds one over each chunk
 * it copies and active (write-through) guest writes hold one over what they
 * write, so a copy that read old data can never land on the target after a
 * guest write to the same blocks. The set of held ranges is small (bounded by
 * copies plus guest requests in flight), so a linear scan is enough.
 */
interface Held {
  start: number;
  end: number;
  released: Promise<void>;
}

export class RangeLock {
  /** Holders and waiters, in request order. */
  private held: Held[] = [];

  /**
   * Waits until [offset, offset + length) overlaps no range requested before
   * it, takes it, and returns its release. Overlapping requests are granted in
   * the order they were made: a waiter is never overtaken by a later request
   * for an overlapping range (a copy chunk cannot be starved by guest writes
   * that overlap it but not each other).
   */
  async acquire(offset: number, length: number): Promise<() => void> {
    const start = offset;
    const end = offset + Math.max(length, 1);
    const ahead = this.held.filter((h) => h.start < end && start < h.end);
    let release!: () => void;
    const entry: Held = { start, end, released: new Promise<void>((r) => (release = r)) };
    this.held.push(entry);
    await Promise.all(ahead.map((h) => h.released));
    return () => {
      const i = this.held.indexOf(entry);
      if (i >= 0) this.held.splice(i, 1);
      release();
    };
  }

  /** Ranges held or waited for. */
  get size(): number {
    return this.held.length;
  }
}
