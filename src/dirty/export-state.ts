/**
 * One export's persistent state, as `serve` opens it: the state folder
 * (state.ts), the dirty bitmap recovered from it and kept crash-safe by the
 * activity log (activity-log.ts), and the record of the export's mirror job,
 * which a restarted server resumes (`ctl mirror NAME URI` with the same URI).
 *
 * Files in the folder (README "State folder"):
 *   dirty.bitmap   the stored bitmap (activity-log.ts)
 *   activity.log   the activity log's two slots
 *   mirror.json    the unfinished mirror job: id, target, destination identity
 * Other parts keep their own files here (checkpoints).
 */
import type { DirtyBitmap } from './bitmap.js';
import { ActivityLog, type ActivityLogOptions, type Recovery } from './activity-log.js';
import { StateFolder } from './state.js';

export const MIRROR_FILE = 'mirror.json';

/** What a mirror job leaves behind until it completes or is aborted: enough to resume it. */
export interface MirrorRecord {
  jobId: string;
  target: string;
  /** The destination's export id (nbd-migrate destinations), checked when resuming. */
  destExportId: string | null;
  /** nbd-migrate-incoming, nbd-migrate-live or foreign. */
  destKind: string | null;
  /** copying: the source stopped (crash, kill) while it ran; failed: the target side failed it; stopped: a clean server shutdown (SIGTERM) stopped it. */
  state: 'copying' | 'failed' | 'stopped';
  since: string;
  error?: string;
}

export class ExportState {
  private constructor(
    readonly folder: StateFolder,
    readonly log: ActivityLog,
    readonly recovery: Recovery,
  ) {}

  /** Opens (creating) the folder, recovers the dirty bitmap into `bitmap` (a fresh one), and starts the log. */
  static open(dir: string, bitmap: DirtyBitmap, opts: ActivityLogOptions = {}): ExportState {
    const folder = StateFolder.open(dir);
    const { log, recovery } = ActivityLog.open(folder, bitmap, opts);
    return new ExportState(folder, log, recovery);
  }

  /** The unfinished mirror job, if one was recorded (a record that does not parse is reported, not trusted). */
  mirror(): MirrorRecord | undefined {
    const r = this.folder.readJson<MirrorRecord>(MIRROR_FILE);
    if (!r || typeof r.jobId !== 'string' || typeof r.target !== 'string') return undefined;
    return r;
  }

  setMirror(r: MirrorRecord | undefined): void {
    if (r) this.folder.writeJson(MIRROR_FILE, r);
    else this.folder.remove(MIRROR_FILE);
  }

  /** Clean close: the exact bitmap stored, the log emptied. */
  close(): Promise<void> {
    return this.log.close();
  }
}
