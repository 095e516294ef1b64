/**
 * One byte-rate budget shared fairly by several consumers (the jobs of a host
 * evacuation): a single token bucket (the whole budget, with up to a quarter
 * second of burst, as TokenBucket) whose tokens are handed out by fair
 * queueing. Each consumer holds a `BandwidthShare`; of the shares that are
 * waiting, the one that has been granted the fewest bytes goes next (bytes,
 * not requests, so a share asking in small pieces is not starved by one asking
 * in large ones). A share that was idle rejoins at the level of the others,
 * not with a credit for the time it asked for nothing.
 *
 * The scheduler is work-conserving: tokens a share does not ask for go to the
 * shares that do, so when a job finishes (its share `leave`s) or stops
 * copying, the others split the whole budget. The total never exceeds the
 * budget's rate (plus one burst): every grant is paid from the one bucket.
 *
 * A rate of Infinity is no limit (an evacuation started without a budget):
 * every request passes at once, still counted, so that `setRate` can put a
 * limit on the same shares later (`ctl set-speed --evacuation`).
 */
import { EventEmitter } from 'node:events';
import type { RateLimiter } from './token-bucket.js';

interface Waiter {
  n: number;
  resolve: () => void;
  cancelled: (() => boolean) | undefined;
}

/** Emits 'grant' (share, bytes) for each request let through. */
export class SharedBandwidth extends EventEmitter {
  private tokens: number;
  private last = performance.now();
  private readonly members = new Set<BandwidthShare>();
  private timer: NodeJS.Timeout | undefined;
  private immediate: NodeJS.Immediate | undefined;
  /** Bytes granted in total (for tests and status). */
  granted = 0;

  constructor(private budget: number) {
    super();
    if (!(budget > 0)) throw new RangeError(`shared bandwidth: the rate must be more than 0, got ${budget}`);
    this.tokens = this.burst;
  }

  /** No limit (the rate is Infinity). */
  get unlimited(): boolean {
    return this.budget === Infinity;
  }

  /** The whole budget, bytes/s (Infinity: unlimited). */
  get rate(): number {
    return this.budget;
  }

  get burst(): number {
    return Math.max(this.budget / 4, 64 * 1024);
  }

  /** Shares that have joined and not left. */
  get size(): number {
    return this.members.size;
  }

  /** A new consumer of the budget; `leave()` it when done. */
  share(name: string): BandwidthShare {
    const s = new BandwidthShare(this, name);
    s.served = this.levelOfOthers(s);
    this.members.add(s);
    return s;
  }

  /** A new budget for the shares from now on (Infinity lifts it); what waits is granted at the new rate. */
  setRate(rate: number): void {
    if (!(rate > 0)) throw new RangeError(`shared bandwidth: the rate must be more than 0, got ${rate}`);
    this.refill();
    const wasUnlimited = this.unlimited;
    this.budget = rate;
    // From unlimited, the bucket starts full at the new rate; to unlimited, no debt is kept.
    this.tokens = wasUnlimited || this.unlimited ? this.burst : Math.min(this.tokens, this.burst);
    this.last = performance.now();
    this.pump();
  }

  /** @internal */
  leave(s: BandwidthShare): void {
    if (!this.members.delete(s)) return;
    // Whatever it still waits for passes at once (its job is ending: the copy loop checks its stop flag).
    for (const w of s.queue.splice(0)) w.resolve();
    this.pump();
  }

  /** @internal */
  enqueue(s: BandwidthShare, w: Waiter): void {
    if (!this.members.has(s)) return w.resolve();
    if (this.unlimited && s.queue.length === 0) {
      s.served += w.n;
      s.granted += w.n;
      this.granted += w.n;
      w.resolve();
      this.emit('grant', s, w.n);
      return;
    }
    // Back from idle: it starts level with the shares that are waiting now, without credit for its idle time.
    if (s.queue.length === 0) s.served = Math.max(s.served, this.levelOfOthers(s));
    s.queue.push(w);
    this.pump();
  }

  /** The fewest bytes granted to any other waiting share (or to any other share, when none waits). */
  private levelOfOthers(s: BandwidthShare): number {
    let waiting = Infinity;
    let any = Infinity;
    for (const m of this.members) {
      if (m === s) continue;
      any = Math.min(any, m.served);
      if (m.queue.length > 0) waiting = Math.min(waiting, m.served);
    }
    const level = waiting !== Infinity ? waiting : any;
    return level === Infinity ? 0 : level;
  }

  private refill(): void {
    const now = performance.now();
    // Unlimited: always full (Infinity times no time elapsed would be NaN).
    this.tokens = this.unlimited ? Infinity : Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.budget);
    this.last = now;
  }

  /**
   * Grants one request if the bucket allows, fewest-served share first, and
   * comes back on the next turn (so a consumer whose request was just granted
   * can ask again before the next grant, instead of losing its turn); sleeps
   * until the next grant is due otherwise.
   */
  private pump(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (this.immediate) {
      clearImmediate(this.immediate);
      this.immediate = undefined;
    }
    {
      let next: BandwidthShare | undefined;
      for (const m of this.members) {
        while (m.queue.length > 0 && m.queue[0]!.cancelled?.()) m.queue.shift()!.resolve();
        if (m.queue.length > 0 && (next === undefined || m.served < next.served)) next = m;
      }
      if (!next) return;
      this.refill();
      const w = next.queue[0]!;
      const need = Math.min(w.n, this.burst);
      if (this.tokens >= need) {
        this.tokens -= w.n; // may go negative: a large request's debt delays the next
        next.served += w.n;
        next.granted += w.n;
        this.granted += w.n;
        next.queue.shift();
        w.resolve();
        this.emit('grant', next, w.n);
        this.immediate = setImmediate(() => {
          this.immediate = undefined;
          this.pump();
        });
        return;
      }
      const ms = ((need - this.tokens) / this.budget) * 1000;
      // At most 50 ms: waiters' cancel flags are polled, as TokenBucket does.
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.pump();
      }, Math.min(50, Math.max(1, Math.ceil(ms))));
      return;
    }
  }
}

/** One consumer's view of a SharedBandwidth: what the copy engine takes from. */
export class BandwidthShare implements RateLimiter {
  /** @internal Waiting requests, FIFO. */
  readonly queue: Waiter[] = [];
  /** @internal Fair-queueing level: bytes granted, raised to the others' level after idling. */
  served = 0;
  /** Bytes granted to this share. */
  granted = 0;

  constructor(
    private readonly parent: SharedBandwidth,
    readonly name: string,
  ) {}

  /** Its nominal fair share: the budget over the shares now in it (it gets more while others ask for less). */
  get rate(): number {
    return this.parent.rate / Math.max(1, this.parent.size);
  }

  get burstBytes(): number {
    return Math.max(64 * 1024, this.parent.burst / Math.max(1, this.parent.size));
  }

  take(n: number, cancelled?: () => boolean): Promise<void> {
    if (cancelled?.()) return Promise.resolve();
    return new Promise<void>((resolve) => this.parent.enqueue(this, { n, resolve, cancelled }));
  }

  /** Leaves the budget: the others split its part from now on. */
  leave(): void {
    this.parent.leave(this);
  }
}
