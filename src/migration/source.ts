/** The export side of a migration: what a job copies from and switches. */
import type { DirtyBitmap } from '../dirty/bitmap.js';
import type { DirtyTrackingDevice } from '../dirty/tracking-device.js';
import type { GateDevice } from './gate-device.js';

export interface MirrorSource {
  name: string;
  image: string;
  size: number;
  gate: GateDevice;
  tracking: DirtyTrackingDevice;
  bitmap: DirtyBitmap;
  /** The export's identity (its `nbd-migrate:export-id:` context): a mirror onto it is a mirror onto itself. */
  exportId: string;
  /** Closes the export's guest connections (handoff=disconnect). */
  disconnectClients(): void;
}
