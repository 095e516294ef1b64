/**
 * Marker files beside an image that outlive the process:
 * - fenced: the image was migrated away; serving it read-write again would
 *   fork the disk, so `serve` refuses without --force.
 * - incoming: the image is the destination of a migration that has not
 *   completed; it holds a half-copied disk, so no guest may attach to it.
 * Both are JSON, written atomically (write, fsync, rename).
 */
import * as fs from 'node:fs';

export interface FencedMarker {
  export: string;
  target: string;
  time: string;
}

export interface IncomingMarker {
  export: string;
  since: string;
}

export const fencedMarkerPath = (image: string) => `${image}.nbd-migrate-fenced`;
export const incomingMarkerPath = (image: string) => `${image}.nbd-migrate-incoming`;

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
}
