/**
 * Guest write throttling: limits the bytes guests write to a rate, one way to
 * make a mirror converge when the guest dirties data faster than the link
 * carries it. Only WRITE is metered (trim and zero carry no payload).
 *
 * It sits above the cutover gate and waits for the gate to be open before it
 * takes tokens: a write that waits on the throttle is not running below it,
 * so a hold never waits for throttled writes, and writes that arrive during a
 * hold see the limit as it is after the release (the cutover lifts it).
 */
import { TokenBucket } from '../../util/token-bucket.js';
import type { Device, WriteOptions } from '../device.js';
import { byteLength, Filter } from './filter.js';

/** The hold the throttle waits out before taking tokens (the gate below it). */
export interface Hold {
  whenOpen(): Promise<void>;
}

export class ThrottleFilter extends Filter {
  private bucket: TokenBucket | undefined;

  constructor(
    next: Device,
    private readonly hold: Hold,
  ) {
    super(next);
  }

  /** Limits guest writes to `bytesPerSecond` (undefined lifts the limit). */
  setRate(bytesPerSecond: number | undefined): void {
    this.bucket = bytesPerSecond ? new TokenBucket(bytesPerSecond) : undefined;
  }

  get rate(): number | undefined {
    return this.bucket?.rate;
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    const bytes = byteLength(data);
    // Unlimited: straight down in the same turn, so the gate sees it (counts it, or holds it) in request order.
    if (bytes === 0 || !this.bucket) return this.next.write(offset, data, opts);
    return this.metered(bytes, () => this.next.write(offset, data, opts));
  }

  override writeNow(offset: number, data: readonly Buffer[]): boolean {
    return !this.bucket && this.next.writeNow?.(offset, data) === true;
  }

  private async metered(bytes: number, op: () => Promise<void>): Promise<void> {
    await this.hold.whenOpen();
    if (this.bucket) await this.bucket.take(bytes);
    return op(); // the gate below waits out a hold that began while throttled
  }
}
