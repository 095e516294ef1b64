/**
 * The cutover gate. It counts the guest operations that change data (write,
 * trim, zero, flush) while they run. `hold()` makes new ones wait (never
 * fail) and resolves once the running ones have drained; `release()` lets the
 * waiting ones through, in order. Reads, extents and cache pass a hold.
 */
import type { Device, WriteOptions, ZeroOptions } from '../device.js';
import { Filter } from './filter.js';

export class GateFilter extends Filter {
  private running = 0;
  private drained: Array<() => void> = [];
  private held: Promise<void> | undefined;
  private open: (() => void) | undefined;

  constructor(next: Device) {
    super(next);
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

  /** Resolves once no hold is in force (a hold may follow another). */
  async whenOpen(): Promise<void> {
    while (this.held) await this.held;
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.pass(() => this.next.write(offset, data, opts));
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.pass(() => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.pass(() => this.next.zero(offset, length, opts));
  }

  override flush(): Promise<void> {
    return this.pass(() => this.next.flush());
  }

  /** Made at once only with no hold in force; counted while it runs, like any other. */
  override writeNow(offset: number, data: readonly Buffer[]): boolean {
    if (this.held) return false;
    this.running++;
    try {
      return this.next.writeNow?.(offset, data) === true;
    } finally {
      if (--this.running === 0) for (const fn of this.drained.splice(0)) fn();
    }
  }

  /** Waits out a hold, then runs `op` counted (no await between the check and the count). */
  private async pass(op: () => Promise<void>): Promise<void> {
    while (this.held) await this.held;
    this.running++;
    try {
      await op();
    } finally {
      if (--this.running === 0) for (const fn of this.drained.splice(0)) fn();
    }
  }
}
