/**
 * An export's device stack, built in one place. Top to bottom:
 *   throttle       guest write rate limit (waits for the gate before taking tokens)
 *   gate           cutover hold: new changes wait, running ones drain
 *   switch         the local stack until cutover, the mirror target after
 *   change marks   the export's checkpoints mark every change (when it has them)
 *   write-through  active mirroring: changes also go to the target, under the range lock
 *   dirty tracking marks the bitmap after each change
 *   local          the image
 * Callers reach a layer by its role (stack.gate, stack.switch, ...), never by
 * comparing layers; every question (size, capabilities) is asked of the top,
 * live, so it follows the switch.
 */
import { DirtyBitmap } from '../dirty/bitmap.js';
import type { Device } from './device.js';
import { ChangeMarkFilter, type ChangeListener } from './filters/change-marks.js';
import { DirtyTrackingFilter } from './filters/dirty-tracking.js';
import { GateFilter } from './filters/gate.js';
import { SwitchFilter } from './filters/switch.js';
import { ThrottleFilter } from './filters/throttle.js';
import { WriteThroughFilter } from './filters/write-through.js';

export interface StackOptions {
  /** The bottom of the stack: the export's image. */
  local: Device;
  /** Bytes per dirty-bitmap bit (default: the bitmap's). */
  dirtyGranularity?: number;
  /** Told of every change clients make before cutover, whether or not write-through sends it on (the export's checkpoints). */
  changes?: ChangeListener;
}

export interface Stack {
  /** The top: what the export serves. */
  readonly device: Device;
  readonly throttle: ThrottleFilter;
  readonly gate: GateFilter;
  readonly switch: SwitchFilter;
  readonly writeThrough: WriteThroughFilter;
  readonly tracking: DirtyTrackingFilter;
  /** The image below every filter: what the copy engine reads (unmarked). */
  readonly local: Device;
  readonly bitmap: DirtyBitmap;
}

export function buildStack(opts: StackOptions): Stack {
  const local = opts.local;
  const bitmap = new DirtyBitmap(local.size, opts.dirtyGranularity);
  const tracking = new DirtyTrackingFilter(local, bitmap);
  const writeThrough = new WriteThroughFilter(tracking);
  const sw = new SwitchFilter(opts.changes ? new ChangeMarkFilter(writeThrough, opts.changes) : writeThrough);
  const gate = new GateFilter(sw);
  const throttle = new ThrottleFilter(gate, gate);
  return { device: throttle, throttle, gate, switch: sw, writeThrough, tracking, local, bitmap };
}
