/**
 * The destination side of a migration (`serve --incoming`): which job owns
 * the half-copied image, and what happens when that job completes or lets go.
 *
 * Rules:
 * - the first job that attaches (selecting `nbd-migrate:incoming:<job id>`)
 *   binds the destination, durably, in the incoming marker;
 * - while bound, every other job is refused, unless it asks to take over
 *   (the source's `--force`), which disconnects the old job's connections;
 * - NBD_CMD_MIGRATE_COMPLETE from the bound job records completion in the
 *   received marker (so a restart with the same command line serves the
 *   image as the live disk it now is) and opens the export to everyone;
 * - NBD_CMD_MIGRATE_RELEASE from the bound job (its abort) unbinds it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExportExtension, ExtraCommand, MetaContext } from '../server/export.js';
import { logger } from '../util/log.js';
import { clearIncoming, type IncomingMarker, writeIncoming, writeReceived } from './markers.js';

const log = logger({ component: 'incoming' });

// ---- the wire: nbd-migrate's own contexts and commands, used only between nbd-migrate peers ----
/**
 * Listed on an export that is receiving a migration (`serve --incoming`).
 * The migration source selects `nbd-migrate:incoming:<job id>`: the first job
 * to attach binds the destination, and until that job completes or releases
 * it every other job is refused (ERR_POLICY), as is every other client.
 * Its block status is always 0.
 */
export const MIGRATE_INCOMING_CONTEXT = 'nbd-migrate:incoming';
export const MIGRATE_INCOMING_JOB_PREFIX = 'nbd-migrate:incoming:';
/** Selected with the incoming context: take a destination bound to another job over (the source's --force). */
export const MIGRATE_TAKEOVER_CONTEXT = 'nbd-migrate:takeover';
/**
 * Selected with the incoming context by a source that resumes a job after a
 * restart (it copies only what is dirty): admitted only if this destination
 * is bound to that very job, i.e. holds its earlier copy (not a fresh or
 * reused destination, nor one another job took over).
 */
export const MIGRATE_RESUME_CONTEXT = 'nbd-migrate:resume';
/** The words of the refusal a resuming source recognises. */
export const RESUME_REFUSAL = 'holds no earlier copy from migration job';
/** Listed on an incoming export: `nbd-migrate:free-bytes:<n>`, free space on the destination's filesystem. */
export const FREE_BYTES_CONTEXT_PREFIX = 'nbd-migrate:free-bytes:';
/** Listed on an incoming export: `nbd-migrate:allocated-bytes:<n>`, space the destination image already occupies. */
export const ALLOCATED_BYTES_CONTEXT_PREFIX = 'nbd-migrate:allocated-bytes:';
/**
 * Sent by the migration source after its final copy and flush, on a connection
 * bound to the destination: the destination flushes, records completion (a
 * marker that survives restarts), and starts accepting every client.
 * Offset and length are 0.
 */
export const NBD_CMD_MIGRATE_COMPLETE = 0x4e4d;
/** Sent by a source whose job was aborted: the destination is unbound and may be taken by another job. */
export const NBD_CMD_MIGRATE_RELEASE = 0x4e4e;

/** Job ids: what a source may put after `nbd-migrate:incoming:`. */
const JOB_ID = /^[0-9a-f]{8,64}$/;

/** The migration job a connection's chosen contexts name (`nbd-migrate:incoming:<job>`), and whether it takes over. */
export function incomingJobOf(contexts: readonly MetaContext[]): { jobId: string; takeover: boolean } | undefined {
  const m = contexts.find((c) => c.name.startsWith(MIGRATE_INCOMING_JOB_PREFIX));
  if (!m) return undefined;
  return { jobId: m.name.slice(MIGRATE_INCOMING_JOB_PREFIX.length), takeover: contexts.some((c) => c.name === MIGRATE_TAKEOVER_CONTEXT) };
}

/** A context that only names something: block status says 0 for all of it. */
const flat = (name: string, id: number): MetaContext => ({ id, name, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });

export class IncomingMigration implements ExportExtension {
  private marker: IncomingMarker;
  /** Until the bound job completes: then the export is a normal one, and this offers nothing. */
  private receiving = true;
  readonly commands: ReadonlyMap<number, ExtraCommand>;

  constructor(
    readonly image: string,
    marker: IncomingMarker & { exportId: string },
    private readonly hooks: {
      /** Drops the export's connections (a takeover ends the old job's). */
      disconnectAll(): void;
      /** Flushes the export's device (before completion is recorded). */
      flush(): Promise<void>;
    },
  ) {
    this.marker = marker;
    // The commands exist for a connection that named its job; after completion they change nothing.
    const permitted = (contexts: readonly MetaContext[]) => incomingJobOf(contexts) !== undefined;
    this.commands = new Map<number, ExtraCommand>([
      [NBD_CMD_MIGRATE_COMPLETE, { name: 'migrate_complete', permitted, run: (c) => this.completeBy(incomingJobOf(c)!.jobId) }],
      [NBD_CMD_MIGRATE_RELEASE, { name: 'migrate_release', permitted, run: async (c) => this.release(incomingJobOf(c)!.jobId) }],
    ]);
  }

  // ---- ExportExtension: what the server asks

  contexts(): MetaContext[] {
    if (!this.receiving) return [];
    const all = [flat(MIGRATE_INCOMING_CONTEXT, 2), flat(MIGRATE_TAKEOVER_CONTEXT, 4), flat(MIGRATE_RESUME_CONTEXT, 7)];
    // Facts for the source's pre-checks; read when listed, so they are current.
    try {
      all.push(flat(FREE_BYTES_CONTEXT_PREFIX + this.freeBytes(), 5), flat(ALLOCATED_BYTES_CONTEXT_PREFIX + this.allocatedBytes(), 6));
    } catch {
      /* statfs failed: the source then cannot check space and says so */
    }
    return all;
  }

  matchSet(query: string): MetaContext | undefined {
    if (!this.receiving || !query.startsWith(MIGRATE_INCOMING_JOB_PREFIX)) return undefined;
    return JOB_ID.test(query.slice(MIGRATE_INCOMING_JOB_PREFIX.length)) ? flat(query, 2) : undefined;
  }

  admission(contexts: readonly MetaContext[]): string | undefined {
    if (!this.receiving) return undefined;
    const job = incomingJobOf(contexts);
    if (!job)
      return `export "${this.marker.export}" is receiving a migration and holds a half-copied disk; it opens to clients when the migration completes`;
    if (contexts.some((c) => c.name === MIGRATE_RESUME_CONTEXT) && this.marker.job?.id !== job.jobId) {
      const bound = this.marker.job;
      return (
        `export "${this.marker.export}" ${RESUME_REFUSAL} ${job.jobId} (${bound ? `it is bound to job ${bound.id} since ${bound.since}` : 'no job is bound to it'}): ` +
        `resuming would copy only what changed into a disk that lacks the rest; start a fresh mirror (ctl mirror --force)`
      );
    }
    return this.refusal(job.jobId, job.takeover);
  }

  attached(contexts: readonly MetaContext[], peer: string): void {
    const job = incomingJobOf(contexts);
    if (job && this.receiving) this.bind(job.jobId, job.takeover, peer);
  }

  /** The bound migration source says the copy is complete and flushed: open the export to everyone. */
  private async completeBy(jobId: string): Promise<void> {
    if (!this.receiving) return; // already complete: the same job repeating itself after a failed cutover
    if (this.boundJob !== jobId) throw new Error(`job ${jobId} is not the job bound to export "${this.marker.export}"`);
    await this.hooks.flush();
    this.complete(jobId);
    this.receiving = false;
  }

  // ---- the rules

  get exportId(): string {
    return this.marker.exportId!;
  }

  /** The job bound to this destination now, if any. */
  get boundJob(): string | undefined {
    return this.marker.job?.id;
  }

  /** Why job `jobId` may not attach now (undefined: it may). */
  refusal(jobId: string, takeover: boolean): string | undefined {
    const bound = this.marker.job;
    if (!bound || bound.id === jobId || takeover) return undefined;
    return (
      `export "${this.marker.export}" is bound to migration job ${bound.id}` +
      (bound.peer ? ` from ${bound.peer}` : '') +
      ` since ${bound.since}; another source may not write into it. ` +
      `Abort that job first, or take the destination over with --force on the source (the copy then starts again)`
    );
  }

  /** Job `jobId` attached: bind it (durably) if it is not bound yet. */
  bind(jobId: string, takeover: boolean, peer: string): void {
    const bound = this.marker.job;
    if (bound?.id === jobId) return;
    const next: IncomingMarker = { ...this.marker, job: { id: jobId, since: new Date().toISOString(), peer } };
    writeIncoming(this.image, next);
    this.marker = next;
    if (bound) {
      log.warn('incoming-taken-over', { export: this.marker.export, from: bound.id, to: jobId, peer, takeover });
      this.hooks.disconnectAll();
    } else log.info('incoming-bound', { export: this.marker.export, job: jobId, peer });
  }

  /** The bound job finished its copy and flushed: the image is the live disk from now on. */
  complete(jobId: string): void {
    writeReceived(this.image, { export: this.marker.export, exportId: this.exportId, job: jobId, time: new Date().toISOString() });
    clearIncoming(this.image);
    log.info('incoming-complete', { export: this.marker.export, image: this.image, job: jobId });
  }

  /** The bound job was aborted: another may bind. */
  release(jobId: string): void {
    if (!this.receiving || this.marker.job?.id !== jobId) return;
    const { job: _gone, ...rest } = this.marker;
    writeIncoming(this.image, rest);
    this.marker = rest;
    log.info('incoming-released', { export: this.marker.export, job: jobId });
  }

  /** Free bytes on the destination's filesystem (what the source can still add). */
  freeBytes(): number {
    // A block device's room is its size, fixed and already there; statfs would describe /dev.
    if (fs.statSync(this.image).isBlockDevice()) throw new Error(`${this.image} is a block device: no free space to report`);
    const st = fs.statfsSync(path.dirname(this.image));
    return st.bavail * st.bsize;
  }

  /** Bytes the destination image occupies now (rewritten in place, so they count as room). */
  allocatedBytes(): number {
    return fs.statSync(this.image).blocks * 512;
  }
}
