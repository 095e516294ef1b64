/**
 * Buffers the data paths reuse instead of allocating per request, and the
 * all-zero test they share (copy sweeps and the post-copy fetcher).
 */

/** Reused buffers of `size` bytes: one per request in flight, given back once the data has gone on. */
export class BufferPool {
  private readonly free: Buffer[] = [];
  constructor(
    readonly size: number,
    private readonly keep = 64,
  ) {}

  /** A buffer of at least `n` bytes (of the pool's size when it fits); its bytes are whatever they were. */
  get(n: number): Buffer {
    if (n > this.size) return Buffer.allocUnsafe(n);
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  put(b: Buffer): void {
    if (b.length === this.size && this.free.length < this.keep) this.free.push(b);
  }
}

/** Compared against to find all-zero data. */
const ZEROS = Buffer.alloc(1024 * 1024);

/** True when the bytes are all zero (memcmp against zeros: random data fails on its first bytes). */
export function isAllZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - at);
    if (!ZEROS.subarray(0, n).equals(b.subarray(at, at + n))) return false;
  }
  return true;
}
