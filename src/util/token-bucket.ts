/**
 * A byte-rate limiter: `take(n)` resolves when n bytes may pass at `rate`
 * bytes per second, with up to a quarter second of burst. Requests larger than
 * the burst are let through once the bucket has been full, paying their debt
 * by making later requests wait.
 */
/** What the copy engine takes bytes from: a TokenBucket, or one job's share of a SharedBandwidth. */
export interface RateLimiter {
  /** Waits until `n` bytes may pass; returns at once, taking nothing, once `cancelled` says yes. */
  take(n: number, cancelled?: () => boolean): Promise<void>;
  /** Largest amount let through without waiting (callers split big operations to this). */
  readonly burstBytes: number;
  /** Bytes per second this limiter stands for (shown in status as maxBandwidth). */
  readonly rate: number;
}

export class TokenBucket implements RateLimiter {
  private tokens: number;
  private last = performance.now();
  private queue: Promise<void> = Promise.resolve();

  constructor(public rate: number) {
    this.tokens = this.burst;
  }

  /** Largest amount let through without waiting (callers split big operations to this). */
  get burstBytes(): number {
    return this.burst;
  }

  private get burst(): number {
    return Math.max(this.rate / 4, 64 * 1024);
  }

  setRate(rate: number): void {
    this.refill();
    this.rate = rate;
    this.tokens = Math.min(this.tokens, this.burst);
  }

  /**
   * Waits in FIFO order until `n` bytes may pass. `cancelled` is polled while
   * waiting: once it says yes the wait ends at once, taking nothing (so an
   * abort is not held up by the rate limit).
   */
  take(n: number, cancelled?: () => boolean): Promise<void> {
    const turn = this.queue.then(() => this.wait(n, cancelled));
    this.queue = turn;
    return turn;
  }

  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
  }

  private async wait(n: number, cancelled?: () => boolean): Promise<void> {
    for (;;) {
      if (cancelled?.()) return;
      this.refill();
      const need = Math.min(n, this.burst);
      if (this.tokens >= need) {
        this.tokens -= n; // may go negative: a large request's debt delays the next
        return;
      }
      const ms = ((need - this.tokens) / this.rate) * 1000;
      await new Promise((r) => setTimeout(r, Math.min(50, Math.max(1, Math.ceil(ms)))));
    }
  }
}
