/**
 * Marker files beside an image that outlive the process:
 * - fenced: the image was migrated away; serving it read-write again would
 *   fork the disk, so `serve` refuses without --force.
 * - incoming: the image is the destination of a migration that has not
 *   completed; it holds a half-copied disk, so no guest may attach to it.
 *   It records the export's identity and the job bound to it.
 * - received: the migration into this image completed; it is a live disk and
 *   is never marked incoming again.
 * All are JSON, written atomically and durably (write, fsync, rename, fsync the folder).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface FencedMarker {
  export: string;
  target: string;
  time: string;
}

export interface IncomingMarker {
  export: string;
  since: string;
  /** The export's identity (kept across restarts, so a source can tell it is the same disk). */
  exportId?: string;
  /** The job bound to this destination, if any. */
  job?: { id: string; since: string; peer?: string };
}

export interface ReceivedMarker {
  export: string;
  exportId: string;
  job: string;
  time: string;
}

export const fencedMarkerPath = (image: string) => `${image}.nbd-migrate-fenced`;
export const incomingMarkerPath = (image: string) => `${image}.nbd-migrate-incoming`;
export const receivedMarkerPath = (image: string) => `${image}.nbd-migrate-received`;

function writeAtomic(file: string, value: unknown): void {
  const tmp = `${file}.tmp${process.pid}`;
  const fd = fs.openSync(tmp, 'w', 0o644);
  try {
    fs.writeSync(fd, JSON.stringify(value) + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  syncDir(path.dirname(file));
}

/** Makes a rename or unlink in `dir` durable. */
function syncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function readJson<T>(file: string): T | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch (e) {
    if ((e as { code?: string }).code === 'ENOENT') return undefined;
    // A marker we cannot parse still means "do not serve this blindly".
    return { unreadable: String(e) } as T;
  }
}

export function writeFenced(image: string, m: FencedMarker): void {
  writeAtomic(fencedMarkerPath(image), m);
}

export function readFenced(image: string): FencedMarker | undefined {
  return readJson<FencedMarker>(fencedMarkerPath(image));
}

export function writeIncoming(image: string, m: IncomingMarker): void {
  writeAtomic(incomingMarkerPath(image), m);
}

export function readIncoming(image: string): IncomingMarker | undefined {
  return readJson<IncomingMarker>(incomingMarkerPath(image));
}

export function clearIncoming(image: string): void {
  fs.rmSync(incomingMarkerPath(image), { force: true });
  syncDir(path.dirname(image));
}

export function clearFenced(image: string): void {
  fs.rmSync(fencedMarkerPath(image), { force: true });
  syncDir(path.dirname(image));
}

export function writeReceived(image: string, m: ReceivedMarker): void {
  writeAtomic(receivedMarkerPath(image), m);
}

export function readReceived(image: string): ReceivedMarker | undefined {
  return readJson<ReceivedMarker>(receivedMarkerPath(image));
}
