/**
 * The cutover gate, the top of an export's device stack. It counts guest
 * operations that change data (write, trim, zero, flush) while they run.
 * `hold()` makes new ones wait (never fail) and resolves once the running ones
 * have drained; `release()` lets the waiting ones through, in order.
 * It can also throttle guest writes to a byte rate, one way to make a mirror
 * converge when the guest dirties data faster than the link carries it.
 *
 * Below the gate sits a switch: `swap()` changes the device everything goes
 * to (the local stack before cutover, the target after).
 */
import type { Capabilities, Device, Extent, WriteOptions, ZeroOptions } from '../storage/device.js';
import { TokenBucket } from './token-bucket.js';

export class GateDevice implements Device {
  private running = 0;
  private drained: Array<() => void> = [];
  private held: Promise<void> | undefined;
  private open: (() => void) | undefined;
  private throttle: TokenBucket | undefined;

  constructor(private current: Device) {}

  get size(): number {
    return this.current.size;
  }

  /** The device below the gate. */
  get inner(): Device {
    return this.current;
  }

  /** Sends all later I/O to `next`; only safe while held (or for reads-only changes). */
  swap(next: Device): void {
    this.current = next;
  }

  /** Holds new modifying operations and resolves once those already running are done. */
  async hold(): Promise<void> {
    if (!this.held) this.held = new Promise<void>((r) => (this.open = r));
    if (this.running > 0) await new Promise<void>((r) => this.drained.push(r));
  }

  release(): void {
    const open = this.open;
    this.held = undefined;
    this.open = undefined;
    open?.();
  }

  get isHeld(): boolean {
    return this.held !== undefined;
  }

  /** Limits guest writes to `bytesPerSecond` (undefined lifts the limit). */
  setThrottle(bytesPerSecond: number | undefined): void {
    this.throttle = bytesPerSecond ? new TokenBucket(bytesPerSecond) : undefined;
  }

  get throttleRate(): number | undefined {
    return this.throttle?.rate;
  }

  capabilities(): Capabilities {
    return this.current.capabilities();
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.current.read(offset, length, into, at);
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    let n = 0;
    for (const b of data) n += b.length;
    return this.modify(n, () => this.current.write(offset, data, opts));
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.modify(0, () => this.current.trim(offset, length, opts));
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.modify(0, () => this.current.zero(offset, length, opts));
  }

  flush(): Promise<void> {
    return this.modify(0, () => this.current.flush());
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.current.extents(offset, length, maxExtents);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.current.cache(offset, length);
  }

  close(): Promise<void> {
    return this.current.close();
  }

  private async modify(bytes: number, op: () => Promise<void>): Promise<void> {
    while (this.held) await this.held;
    if (this.throttle && bytes > 0) await this.throttle.take(bytes);
    while (this.held) await this.held; // a hold may have begun while throttled
    this.running++;
    try {
      await op();
    } finally {
      if (--this.running === 0) for (const fn of this.drained.splice(0)) fn();
    }
  }
}
