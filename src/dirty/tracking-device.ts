/**
 * Transitional (issue 10): dirty tracking and write-through are filters now
 * (src/storage/filters/dirty-tracking.ts and write-through.ts). This is the
 * shape MirrorSource.tracking still names; src/migration/gate-device.ts
 * builds it over a Stack. It goes once the job takes the Stack.
 */
import type { Device } from '../storage/device.js';
import type { WriteThrough } from '../storage/filters/write-through.js';

export type { WriteThrough };

export interface DirtyTrackingDevice {
  /** The local image below every filter: what the copy engine reads (unmarked). */
  readonly inner: Device;
  readonly writeThroughActive: boolean;
  setWriteThrough(wt: WriteThrough | undefined): void;
}
