/**
 * Received chunks, consumed incrementally without joining them: a header that
 * sits inside one chunk is read in place, and a WRITE payload is handed on as
 * slices of the chunks it arrived in (the device writes them with writev).
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Offset already consumed inside chunks[0]. */
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /**
   * The next `n` bytes as one Buffer: a view into the first chunk when it holds
   * them all (the common case for headers), else a copy. Does not consume.
   */
  peek(n: number): Buffer {
    if (n > this.total) throw new RangeError(`peek(${n}) with ${this.total} buffered`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    for (let i = 0; copied < n; i++) {
      const c = this.chunks[i]!;
      const from = i === 0 ? this.head : 0;
      const take = Math.min(c.length - from, n - copied);
      c.copy(out, copied, from, from + take);
      copied += take;
    }
    return out;
  }

  /** Consumes `n` bytes and returns them as one Buffer (a view when possible). */
  take(n: number): Buffer {
    const b = this.peek(n);
    this.drop(n);
    return b;
  }

  /** Consumes `n` bytes and returns them as slices of the received chunks: no copy. */
  takeSlices(n: number): Buffer[] {
    if (n > this.total) throw new RangeError(`takeSlices(${n}) with ${this.total} buffered`);
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        out.push(this.head === 0 ? c : c.subarray(this.head));
        left -= avail;
        this.chunks.shift();
        this.head = 0;
      } else {
        out.push(c.subarray(this.head, this.head + left));
        this.head += left;
        left = 0;
      }
    }
    this.total -= n;
    return out;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  drop(n: number): number {
    let left = Math.min(n, this.total);
    const done = left;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        left -= avail;
        this.chunks.shift();
        this.head = 0;
      } else {
        this.head += left;
        left = 0;
      }
    }
    this.total -= done;
    return done;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }
}
