/**
 * The raw image every server serves: on tmpfs (/dev/shm) so the disk is out of
 * the picture and the numbers compare the servers' own overhead, fully written
 * with random bytes so reads hit allocated, non-zero data (no holes for a
 * server to short-cut, nothing compressible) and overwrites never allocate.
 */
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const CHUNK = 16 * 1024 * 1024;

export function imageDir(): string {
  try {
    if (fs.statSync('/dev/shm').isDirectory()) return '/dev/shm';
  } catch {
    /* fall through */
  }
  return os.tmpdir();
}

/** Creates `size` bytes of random data at a fresh path (exclusive create) and returns the path. */
export function createImage(size: number): string {
  const file = path.join(imageDir(), `nbd-migrate-bench-${process.pid}.img`);
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    const buf = Buffer.allocUnsafe(CHUNK);
    for (let off = 0; off < size; off += CHUNK) {
      const n = Math.min(CHUNK, size - off);
      randomFillSync(buf, 0, n);
      let done = 0;
      while (done < n) done += fs.writeSync(fd, buf, done, n - done, off + done);
    }
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    throw e;
  }
  fs.closeSync(fd);
  return file;
}

export function removeImage(file: string): void {
  fs.rmSync(file, { force: true });
}
