/** What a mirror job is told to do, and the defaults. */
import { DEFAULT_COPY_OPTIONS } from './copy.js';
import type { ConvergeMode } from './states.js';
import type { ConnectFn } from './target.js';
import type { RateLimiter } from '../util/token-bucket.js';

export interface MirrorOptions {
  target: string;
  /** Copy rate limit in bytes/s; undefined = unlimited. */
  maxBandwidth?: number;
  /** Takes the copy's bytes from this instead of its own maxBandwidth bucket (a host evacuation's shared budget). */
  limiter?: RateLimiter;
  cutover: 'auto' | 'manual';
  maxDowntimeMs: number;
  /** How to converge when the guest dirties faster than the copy: send its writes to both sides, or slow it down. */
  converge: ConvergeMode;
  /** After the switch: keep guest connections and forward to the target, or close them so they reconnect elsewhere. */
  handoff: 'forward' | 'disconnect';
  /** Consecutive target failures tolerated before the job fails. */
  maxRetries: number;
  chunkBytes: number;
  maxInflight: number;
  /** A target connection with requests outstanding and no reply for this long is dropped and re-established. */
  targetTimeoutMs: number;
  /** A write-through slower than this is left to the background copy: the guest is answered after its local write. */
  writeThroughTimeoutMs: number;
  /** Bound on the cutover (hold, final sweep, flush, completion); past it the cutover fails and guests go on locally. */
  cutoverTimeoutMs: number;
  /** Retries on the same connection of a target request that failed with an error that may pass (EIO). */
  requestRetries: number;
  /** Mirror onto a live nbd-migrate export, or take over a destination bound to another job. */
  force: boolean;
  /** Refuse, instead of warning, when the destination cannot hold the source's full virtual size. */
  requireSpace: boolean;
  /**
   * The operator vouches that the target already holds the export as of this checkpoint
   * (pre-seeded by `copy` and `copy --changed-since`): the first sweep copies only the
   * checkpoint's dirty blocks instead of everything.
   */
  since?: string;
  /** This job's identity, which binds an --incoming destination (default: a new random one). */
  jobId?: string;
  /** Identities of every export this server serves (a target among them that is not receiving is refused). */
  localExportIds?: () => ReadonlySet<string>;
  /** Connects to the target (default: NbdClient); tests substitute their own. */
  connect?: ConnectFn;
}

export const DEFAULT_MIRROR_OPTIONS: Omit<MirrorOptions, 'target'> = {
  cutover: 'manual',
  maxDowntimeMs: 50,
  converge: 'active',
  handoff: 'forward',
  maxRetries: 10,
  chunkBytes: DEFAULT_COPY_OPTIONS.chunkBytes,
  maxInflight: DEFAULT_COPY_OPTIONS.maxInflight,
  targetTimeoutMs: 30_000,
  writeThroughTimeoutMs: 1000,
  cutoverTimeoutMs: 5000,
  requestRetries: 4,
  force: false,
  requireSpace: false,
};
