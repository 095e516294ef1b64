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
  private held: Held[] = [];

  /** Waits until [offset, offset + length) overlaps no held range, takes it, and returns its release. */
  async acquire(offset: number, length: number): Promise<() => void> {
    const start = offset;
    const end = offset + Math.max(length, 1);
    for (;;) {
      const clash = this.held.find((h) => h.start < end && start < h.end);
      if (!clash) break;
      await clash.released;
    }
    let release!: () => void;
    const entry: Held = { start, end, released: new Promise<void>((r) => (release = r)) };
    this.held.push(entry);
    return () => {
      const i = this.held.indexOf(entry);
      if (i >= 0) this.held.splice(i, 1);
      release();
    };
  }

  get size(): number {
    return this.held.length;
  }
}
