/**
 * The raw image every server serves: on tmpfs (/dev/shm) so the disk is out of
 * the picture and the numbers compare the servers' own overhead, fully written
 * with random bytes so reads hit allocated, non-zero data (no holes for a
 * server to short-cut, nothing compressible) and overwrites never allocate.
 *
 * The mirror suite's half-allocated images are made here too (its empty
 * sparse targets with the tests' makeImage); every file's name carries the
 * benchmark's pid, so an interrupted run can find and remove them all.
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { makeImage } from '../test/helpers/server.js';

const CHUNK = 16 * 1024 * 1024;

export function imageDir(): string {
  try {
    if (fs.statSync('/dev/shm').isDirectory()) return '/dev/shm';
  } catch {
    /* fall through */
  }
  return os.tmpdir();
}

/** Creates `size` bytes of random data at this run's path and returns the path. */
export async function createImage(size: number): Promise<string> {
  const file = path.join(imageDir(), `nbd-migrate-bench-${process.pid}.img`);
  try {
    return await makeImage(file, size, { fill: 'random' });
  } catch (e) {
    fs.rmSync(file, { force: true });
    throw e;
  }
}

export function removeImage(file: string): void {
  fs.rmSync(file, { force: true });
  fs.rmSync(`${file}.nbd-migrate.d`, { recursive: true, force: true }); // nbd-migrate's state folder
}

/** A fresh path on tmpfs for a benchmark file; `tag` tells the files of one run apart. */
export function benchPath(tag: string): string {
  return path.join(imageDir(), `nbd-migrate-bench-${process.pid}-${tag}.img`);
}

/**
 * A half-allocated image, like a real VM disk: runs of `run` bytes alternate
 * between incompressible data and holes (data first). The data is an AES-CTR
 * keystream under a random key: as random as randomFillSync for every copier
 * here, and about ten times faster to produce, so a 2 GiB image costs ~1 s.
 */
export function createHalfAllocatedImage(file: string, size: number, run = 64 * 1024 * 1024): string {
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    fs.ftruncateSync(fd, size);
    const cipher = createCipheriv('aes-128-ctr', randomBytes(16), randomBytes(16));
    const zeros = Buffer.alloc(CHUNK);
    for (let start = 0; start < size; start += 2 * run) {
      const end = Math.min(start + run, size);
      for (let off = start; off < end; off += CHUNK) {
        const n = Math.min(CHUNK, end - off);
        const buf = cipher.update(zeros.subarray(0, n));
        let done = 0;
        while (done < n) done += fs.writeSync(fd, buf, done, n - done, off + done);
      }
    }
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    throw e;
  }
  fs.closeSync(fd);
  return file;
}

/**
 * Removes every file this benchmark process created on tmpfs (they all carry
 * its pid, and nbd-migrate's markers sit beside them), except copies kept on
 * purpose because they failed verification. For interrupts and exits.
 */
export function removeBenchFiles(): void {
  const dir = imageDir();
  const prefix = `nbd-migrate-bench-${process.pid}-`;
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const n of names) if (n.startsWith(prefix) && !n.startsWith(`${prefix}MISMATCH`)) fs.rmSync(path.join(dir, n), { recursive: true, force: true });
}
