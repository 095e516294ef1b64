/** The export side of a migration: what a job copies from and switches. */
import type { ExportState } from '../dirty/export-state.js';
import type { Checkpoints } from '../dirty/checkpoints.js';
import type { Device } from '../storage/device.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import type { Stack } from '../storage/stack.js';
import type { CutoverHook } from './on-cutover.js';

export interface MirrorSource {
  name: string;
  image: string;
  size: number;
  /** The export's device stack: the job reads below the switch, drives the gate, throttle, write-through and switch. */
  stack: Stack;
  /** Wraps the remote device the export switches to at cutover (the read cache of --read-cache). */
  wrapRemote?: (remote: Device) => Device;
  /** Post-copy hand-over (`ctl postcopy`; a mirror's `--converge postcopy` switch gives its dirty bitmap), when the server offers it. */
  handOver?: (o: { target: string; handoff: 'forward' | 'disconnect'; dirty?: DirtyBitmap; cutoverTimeoutMs?: number }) => Promise<{ pauseMs: number }>;
  /** The export's identity (its `nbd-migrate:export-id:` context): a mirror onto it is a mirror onto itself. */
  exportId: string;
  /** The export's checkpoints (`ctl checkpoint`; a mirror `--since` one starts from its bits). */
  checkpoints?: Checkpoints;
  /** The export's persistent state (crash-safe bitmap, activity log, the mirror job's record), when it has one. */
  state?: ExportState;
  /**
   * Closes the export's guest connections (handoff=disconnect), and its own
   * listeners: requests already read are answered first. Resolves once closed.
   */
  disconnectClients(): void | Promise<void>;
  /** serve --on-cutover: run after a cutover that switched this export (after the handoff). */
  cutoverHook?: CutoverHook;
}
