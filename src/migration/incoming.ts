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
import { logger } from '../util/log.js';
import { clearIncoming, type IncomingMarker, writeIncoming, writeReceived } from './markers.js';

const log = logger({ component: 'incoming' });

export class IncomingMigration {
  private marker: IncomingMarker;

  constructor(
    readonly image: string,
    marker: IncomingMarker & { exportId: string },
    /** Drops the export's connections (a takeover ends the old job's). */
    private readonly disconnectAll: () => void,
  ) {
    this.marker = marker;
  }

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
      this.disconnectAll();
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
    if (this.marker.job?.id !== jobId) return;
    const { job: _gone, ...rest } = this.marker;
    writeIncoming(this.image, rest);
    this.marker = rest;
    log.info('incoming-released', { export: this.marker.export, job: jobId });
  }

  /** Free bytes on the destination's filesystem (what the source can still add). */
  freeBytes(): number {
    const st = fs.statfsSync(path.dirname(this.image));
    return st.bavail * st.bsize;
  }

  /** Bytes the destination image occupies now (rewritten in place, so they count as room). */
  allocatedBytes(): number {
    return fs.statSync(this.image).blocks * 512;
  }
}
