/**
 * Transitional (issue 10): the cutover gate, the guest throttle and the
 * post-cutover switch are filters now (src/storage/filters/), assembled by
 * buildStack (src/storage/stack.ts). GateDevice is the shape MirrorSource.gate
 * still has: the stack's top device plus the controls of the layers the job
 * drives, each forwarded to its filter. It goes once the job takes the Stack.
 */
import type { Device } from '../storage/device.js';
import { Filter } from '../storage/filters/filter.js';
import type { Stack } from '../storage/stack.js';
import type { DirtyTrackingDevice } from '../dirty/tracking-device.js';

export class GateDevice extends Filter {
  constructor(private readonly stack: Stack) {
    super(stack.device);
  }

  /** Where the export's I/O goes now, below the gate: the local stack, or the target after swap(). */
  get inner(): Device {
    return this.stack.switch.current;
  }

  /** The export's I/O goes to the target now (swap() was called). */
  get switched(): boolean {
    return this.stack.switch.switched;
  }

  swap(to: Device): void {
    this.stack.switch.swap(to);
  }

  hold(): Promise<void> {
    return this.stack.gate.hold();
  }

  release(): void {
    this.stack.gate.release();
  }

  get isHeld(): boolean {
    return this.stack.gate.isHeld;
  }

  setThrottle(bytesPerSecond: number | undefined): void {
    this.stack.throttle.setRate(bytesPerSecond);
  }

  get throttleRate(): number | undefined {
    return this.stack.throttle.rate;
  }
}

/** MirrorSource.tracking over a stack: write-through's switch, and the local image the copy engine reads. */
export function trackingView(stack: Stack): DirtyTrackingDevice {
  return {
    get inner() {
      return stack.local;
    },
    get writeThroughActive() {
      return stack.writeThrough.writeThroughActive;
    },
    setWriteThrough: (wt) => stack.writeThrough.setWriteThrough(wt),
  };
}
