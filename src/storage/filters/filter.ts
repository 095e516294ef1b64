/**
 * The pass-through filter every storage filter extends: each method forwards
 * to `next`, the device below, so a filter overrides only the calls it
 * changes (nbdkit's server/filters.c falls through to the next backend the
 * same way wherever a filter leaves a callback unset). A filter knows only
 * what is below it; buildStack (../stack.ts) puts the layers in order.
 */
import type { Capabilities, Device, Extent, FileRange, WriteOptions, ZeroOptions } from '../device.js';

export class Filter<Next extends Device = Device> implements Device {
  constructor(protected next: Next) {}

  /** Asked of the layer below every time: a layer that switches devices changes it. */
  get size(): number {
    return this.next.size;
  }

  /** Asked of the layer below every time, never cached: what is below may change. */
  capabilities(): Capabilities {
    return this.next.capabilities();
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.next.read(offset, length, into, at);
  }

  /** Passed on only by a layer that leaves reads as they are (does not override read()). */
  readNow(offset: number, length: number, into: Buffer, at: number): boolean {
    return this.read === Filter.prototype.read && this.next.readNow?.(offset, length, into, at) === true;
  }

  /** Passed on, as readNow, only by a layer that leaves reads as they are. */
  fileRange(offset: number, length: number): FileRange | undefined {
    return this.read === Filter.prototype.read ? this.next.fileRange?.(offset, length) : undefined;
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.next.write(offset, data, opts);
  }

  /**
   * Passed on only by a layer that leaves writes as they are (does not override write()):
   * a layer that changes writes and has no writeNow of its own is never skipped.
   */
  writeNow(offset: number, data: readonly Buffer[]): boolean {
    return this.write === Filter.prototype.write && this.next.writeNow?.(offset, data) === true;
  }

  flush(): Promise<void> {
    return this.next.flush();
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.next.trim(offset, length, opts);
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.next.zero(offset, length, opts);
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.next.extents(offset, length, maxExtents);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }

  close(): Promise<void> {
    return this.next.close();
  }
}

export { byteLength } from '../device.js';
