/**
 * The post-cutover switch: everything goes to the local stack until `swap()`
 * sends all later I/O to another device (the mirror target, at cutover).
 * Callers ask `switched` where the I/O goes; nothing compares layers.
 */
import type { Device } from '../device.js';
import { Filter } from './filter.js';

export class SwitchFilter extends Filter {
  private to: Device | undefined;

  constructor(local: Device) {
    super(local);
  }

  /** Sends all later I/O to `to`; only safe while the gate above is held (or for read-only changes). */
  swap(to: Device): void {
    this.to = to;
    this.next = to;
  }

  /** The I/O goes to the device given to swap(), no longer to the local stack. */
  get switched(): boolean {
    return this.to !== undefined;
  }

  /** Where the I/O goes now: the local stack, or the device given to swap(). */
  get current(): Device {
    return this.next;
  }

  /** The device given to swap(), if any (the caller closes it). */
  get target(): Device | undefined {
    return this.to;
  }
}
