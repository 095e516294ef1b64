/**
 * Owns the mirror jobs of one server process: at most one per export. The
 * admin socket and the metrics read it; it never touches sockets itself.
 */
import { EventEmitter } from 'node:events';
import { CheckpointError, type CheckpointInfo } from '../dirty/checkpoints.js';
import { DEFAULT_MIRROR_OPTIONS, JobError, type JobStatus, MirrorJob, type MirrorOptions, type MirrorSource } from './job.js';
import { type EvacuationExportStatus, type EvacuationStatus, Evacuations } from './evacuation.js';
import type { ActivityLogStatus } from '../dirty/activity-log.js';

export interface ExportStatus {
  name: string;
  image: string;
  size: number;
  connections: number;
  dirtyBytes: number;
  dirtyBlocks: number;
  granularity: number;
  bitmapBytes: number;
  /** Where the export's I/O goes now. */
  backend: 'local' | 'target';
  /** The export's activity log (crash-safe dirty tracking); null without one (--no-activity-log, read-only, --incoming). */
  activityLog: ActivityLogStatus | null;
}

export class MigrationController extends EventEmitter {
  private readonly jobs = new Map<string, MirrorJob>();
  /** Host evacuations (`ctl evacuate`): queues of mirrors of this controller's exports under one budget. */
  readonly evacuations: Evacuations = new Evacuations(this);

  constructor(
    private readonly sources: ReadonlyMap<string, MirrorSource>,
    private readonly connections: () => Map<string, number>,
  ) {
    super();
  }

  private source(name: string): MirrorSource {
    const s = this.sources.get(name);
    if (!s) throw new JobError('ENOENT', `no export named "${name}"`);
    return s;
  }

  private job(name: string): MirrorJob {
    this.source(name);
    const j = this.jobs.get(name);
    if (!j) throw new JobError('ENOENT', `no mirror job for export "${name}"`);
    return j;
  }

  /** Starts a mirror; rejects before anything changes when the target is unfit or a job already runs. */
  async mirror(exportName: string, opts: Partial<MirrorOptions> & { target: string }): Promise<JobStatus> {
    const src = this.source(exportName);
    const existing = this.jobs.get(exportName);
    if (existing && !existing.isFinal) throw new JobError('EBUSY', `a mirror of "${exportName}" is already ${existing.state}`);
    if (existing?.state === 'completed') throw new JobError('EINVAL', `export "${exportName}" was already migrated to ${existing.status().target}`);
    const job = new MirrorJob(src, {
      ...DEFAULT_MIRROR_OPTIONS,
      localExportIds: () => new Set([...this.sources.values()].map((s) => s.exportId)),
      ...opts,
    });
    job.on('state', (to: string, from: string) => this.emit('job-state', exportName, to, from));
    job.on('progress', (s: JobStatus) => this.emit('job-progress', s));
    this.jobs.set(exportName, job); // claimed before the await: a concurrent mirror is refused
    try {
      await job.start();
    } catch (e) {
      this.jobs.delete(exportName);
      if (existing) this.jobs.set(exportName, existing);
      throw e;
    }
    return job.status();
  }

  status(): { exports: ExportStatus[]; jobs: JobStatus[]; evacuations: EvacuationStatus[] } {
    const conns = this.connections();
    const exports = [...this.sources.values()].map((s) => ({
      name: s.name,
      image: s.image,
      size: s.size,
      connections: conns.get(s.name) ?? 0,
      dirtyBytes: s.stack.bitmap.dirtyBytes(),
      dirtyBlocks: s.stack.bitmap.dirtyBlocks(),
      granularity: s.stack.bitmap.granularity,
      bitmapBytes: s.stack.bitmap.memoryBytes(),
      backend: (s.stack.switch.switched ? 'target' : 'local') as ExportStatus['backend'],
      activityLog: s.state?.log.status() ?? null,
    }));
    return { exports, jobs: [...this.jobs.values()].map((j) => j.status()), evacuations: this.evacuations.status() };
  }

  jobStatus(exportName: string): JobStatus {
    return this.job(exportName).status();
  }

  cutover(exportName: string): JobStatus {
    const j = this.job(exportName);
    j.requestCutover();
    return j.status();
  }

  async abort(exportName: string): Promise<JobStatus | EvacuationExportStatus> {
    // An export still queued in an evacuation has no job yet: it leaves the queue.
    const queued = this.evacuations.abortQueued(exportName);
    if (queued) return queued;
    const j = this.job(exportName);
    await j.abort();
    return j.status();
  }

  setSpeed(exportName: string, bytesPerSecond: number | undefined): JobStatus {
    const j = this.job(exportName);
    j.setSpeed(bytesPerSecond);
    return j.status();
  }

  /**
   * `ctl checkpoint create|list|delete EXPORT [NAME]`: creates a checkpoint (from now on it
   * records every change), lists them, or deletes one. Create and delete answer with the
   * checkpoint, list with all of them.
   */
  checkpoint(action: 'create' | 'list' | 'delete', exportName: string, name: string | undefined): CheckpointInfo | CheckpointInfo[] {
    const src = this.source(exportName);
    const set = src.checkpoints;
    if (!set) throw new JobError('EINVAL', `export "${exportName}" keeps no checkpoints`);
    if (action === 'list') return set.list();
    if (name === undefined) throw new JobError('EINVAL', `checkpoint ${action} needs a checkpoint name`);
    // After cutover the export's I/O goes to the target: a checkpoint made now would never see a change.
    if (action === 'create' && src.stack.switch.switched)
      throw new JobError('EINVAL', `export "${exportName}" was migrated (its I/O goes to ${this.jobs.get(exportName)?.status().target ?? 'the target'}): create the checkpoint on the destination`);
    try {
      return action === 'create' ? set.create(name) : set.delete(name);
    } catch (e) {
      if (e instanceof CheckpointError) throw new JobError(e.code, e.message, { cause: e });
      throw e;
    }
  }

  /** Jobs that have not reached a final state. */
  running(): MirrorJob[] {
    return [...this.jobs.values()].filter((j) => !j.isFinal);
  }
}
