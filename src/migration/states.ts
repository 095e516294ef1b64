/** A mirror job's states, the transitions between them, and what status reports. */
import type { TargetKind } from './connector.js';
import type { HookStatus } from './on-cutover.js';

export type JobState = 'created' | 'copying' | 'ready' | 'cutting-over' | 'completed' | 'aborted' | 'failed';
export type ConvergeMode = 'active' | 'throttle' | 'postcopy';

/**
 * The job's states and the only ways between them (libnbd's state machine as
 * data is the model). `setState` refuses anything else: a bug, not a state.
 */
export const TRANSITIONS: Readonly<Record<JobState, readonly JobState[]>> = {
  created: ['copying'],
  copying: ['ready', 'aborted', 'failed'],
  ready: ['cutting-over', 'aborted', 'failed'],
  'cutting-over': ['completed', 'ready'],
  completed: [],
  aborted: [],
  failed: [],
};

export interface JobStatus {
  export: string;
  target: string;
  /** This job's identity (binds an --incoming destination). */
  jobId: string;
  /** What the target is: an nbd-migrate destination, a live nbd-migrate export (--force), or another server. */
  targetKind: TargetKind | null;
  /** Data the target already held when the job started (other servers; null when unknown). */
  targetDataBytes: number | null;
  /** Free space the destination reported (nbd-migrate --incoming only). */
  targetFreeBytes: number | null;
  /** Allocated data of the source when the job started. */
  sourceDataBytes: number | null;
  /** The checkpoint the destination was pre-seeded as of (mirror --since), or null: a full copy. */
  since: string | null;
  state: JobState;
  pass: number;
  size: number;
  /** Bytes written or zeroed on the target so far (all sweeps). */
  bytesCopied: number;
  dataBytes: number;
  zeroBytes: number;
  skippedBytes: number;
  dirtyBytes: number;
  dirtyBlocks: number;
  granularity: number;
  /** Measured copy rate, bytes/s. */
  rate: number;
  /** Seconds until the first sweep completes (or until dirty data is copied). */
  etaSeconds: number | null;
  maxBandwidth: number | null;
  cutover: 'auto' | 'manual';
  maxDowntimeMs: number;
  /** What keeps the mirror converging now: none yet, write-through, guest throttling, or (--converge postcopy) the switch to post-copy. */
  convergence: 'none' | 'active' | 'throttle' | 'postcopy';
  throttleRate: number | null;
  /**
   * --converge postcopy: when the dirty data stopped shrinking and the job
   * handed the export over instead of throttling the guest (the pass, the
   * dirty bytes left for the destination to fetch, the guests' pause once
   * handed over); null until then, and again if the hand-over failed.
   */
  switchedToPostcopy: { at: string; pass: number; dirtyBytes: number; pauseMs: number | null } | null;
  retries: number;
  /** The target is unreachable and the job is reconnecting. */
  retrying: boolean;
  /** Guest write pause measured at cutover. */
  pauseMs: number | null;
  /** Why a cutover that is due (auto, or asked for) waits: the estimated final sweep would not fit --max-downtime; null otherwise. */
  cutoverWaiting: string | null;
  startedAt: string;
  finishedAt: string | null;
  error: string | null;
  /** The --on-cutover command after the switch: running, ok or failed (exit code, stderr tail); null if none ran. */
  onCutover: HookStatus | null;
}
