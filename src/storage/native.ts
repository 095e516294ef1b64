/**
 * The sparse-file syscalls Node's fs lacks (fallocate, SEEK_DATA/SEEK_HOLE, flock,
 * OFD byte-range locks), from the native addon when it loads, or a pure-JS fallback
 * with the same shape. NBD_MIGRATE_NATIVE=0 forces the fallback, so both paths can be tested.
 */
import * as fs from 'node:fs';
import { nativeAddon } from '../util/addon.js';
import { DeviceError } from './device.js';

/**
 * QEMU's image locking (block/file-posix.c), which QEMU, qemu-img, qemu-io and qemu-nbd
 * all honour: a block-layer permission is bit i (include/block/block-common.h), and an
 * open image holds a shared OFD lock on byte 100 + i for each permission it holds and on
 * byte 200 + i for each permission it does not share with others. Before it counts as
 * open it tests (F_OFD_GETLK, write lock) byte 200 + i for each permission it holds
 * (someone refuses to share it) and byte 100 + i for each one it does not share
 * (someone holds it). Bits past RESIZE (0x10 was GRAPH_MOD, gone since QEMU 6.2) are unused.
 */
export const QEMU_PERM = { consistentRead: 0x01, write: 0x02, writeUnchanged: 0x04, resize: 0x08 } as const;
const QEMU_PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;
export const QEMU_LOCK_PERM_BASE = 100;
export const QEMU_LOCK_SHARED_BASE = 200;

/**
 * What nbd-migrate holds, in QEMU's terms, as a guest disk with share-rw=off does:
 * read-write holds consistent read and write; read-only holds consistent read. Neither
 * shares write (a served disk changing under its clients is corruption) nor resize (the
 * size is read once at open); consistent read and write-unchanged are shared. The
 * read-write export never resizes, so it does not claim resize.
 */
export function qemuPermissions(exclusive: boolean): { hold: number; unshared: number } {
  return {
    hold: QEMU_PERM.consistentRead | (exclusive ? QEMU_PERM.write : 0),
    unshared: QEMU_PERM.write | QEMU_PERM.resize,
  };
}

/** The bytes to lock and the bytes to test for the permissions `qemuPermissions` gives. */
export function qemuLockBytes(exclusive: boolean): { lock: number[]; test: number[] } {
  const { hold, unshared } = qemuPermissions(exclusive);
  const lock: number[] = [];
  const test: number[] = [];
  for (let i = 0; i < QEMU_PERM_NAMES.length; i++) {
    if (hold & (1 << i)) lock.push(QEMU_LOCK_PERM_BASE + i);
    if (unshared & (1 << i)) lock.push(QEMU_LOCK_SHARED_BASE + i);
  }
  // Someone holding what we do not share first: "holds it for writing" is the clearer
  // report when the other side both writes and refuses to share writing (a QEMU guest).
  for (let i = 0; i < QEMU_PERM_NAMES.length; i++) if (unshared & (1 << i)) test.push(QEMU_LOCK_PERM_BASE + i);
  for (let i = 0; i < QEMU_PERM_NAMES.length; i++) if (hold & (1 << i)) test.push(QEMU_LOCK_SHARED_BASE + i);
  return { lock, test };
}

/** What another process's lock on a QEMU lock byte means, for operators. */
export function qemuLockHolder(byte: number): string {
  if (byte >= QEMU_LOCK_SHARED_BASE) {
    const perm = QEMU_PERM_NAMES[byte - QEMU_LOCK_SHARED_BASE] ?? `permission ${byte - QEMU_LOCK_SHARED_BASE}`;
    return `another process (for example QEMU) has it open and does not share "${perm}" access`;
  }
  const perm = QEMU_PERM_NAMES[byte - QEMU_LOCK_PERM_BASE] ?? `permission ${byte - QEMU_LOCK_PERM_BASE}`;
  if (perm === 'write') return 'another process (for example QEMU) holds it for writing';
  return `another process (for example QEMU) holds it for "${perm}"`;
}

/** Another process holds QEMU image locks that conflict with ours (see qemuLockBytes). */
export class ImageLockConflict extends DeviceError {
  constructor(
    readonly imagePath: string,
    /** The lock byte found held: QEMU_LOCK_PERM_BASE + bit or QEMU_LOCK_SHARED_BASE + bit. */
    readonly byte: number,
  ) {
    super('EBUSY', `${imagePath} is in use: ${qemuLockHolder(byte)} (QEMU image lock byte ${byte})`);
  }

  get holder(): string {
    return qemuLockHolder(this.byte);
  }
}

export interface SparseOps {
  readonly kind: 'native' | 'fallback';
  /** Deallocates the range; the file size stays. Rejects with EOPNOTSUPP where unsupported. */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** Zeroes the range keeping it allocated. Rejects with EOPNOTSUPP where unsupported. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /** Alternating data/hole runs covering [offset, offset+length), at most maxRuns of them. */
  runs(fd: number, offset: number, length: number, maxRuns: number): Promise<Array<{ length: number; hole: boolean }>>;
  /** Takes an advisory whole-file lock or throws DeviceError('EWOULDBLOCK'). Released when the fd closes. */
  lock(fd: number, imagePath: string, exclusive: boolean): void;
  /**
   * Takes QEMU's image locks (OFD byte-range locks, see qemuLockBytes) so QEMU, qemu-img,
   * qemu-io and qemu-nbd see the image in use, or throws ImageLockConflict when one of them
   * already holds it in a way ours conflicts with. The locks go when the fd closes.
   * Returns false (taking nothing) where they cannot be had: the fallback, or a kernel or
   * file system without OFD locks.
   */
  qemuLock(fd: number, imagePath: string, exclusive: boolean): boolean;
  /** Releases what lock() took that does not go away with the fd (the fallback's lock file). */
  unlock(imagePath: string): void;
  /**
   * Reads inline if the data is already in the page cache (preadv2 RWF_NOWAIT):
   * bytes read (possibly short), -1 when it would have to wait for a disk, or
   * -2 when this file system refuses RWF_NOWAIT (stop trying).
   */
  readCached(fd: number, into: Buffer, at: number, length: number, position: number, memoryBacked: boolean): number;
  /**
   * Writes inline when that cannot block (pwritev2 RWF_NOWAIT); results as readCached.
   * `plain`: a plain pwritev instead (tmpfs, block devices and ext4 refuse RWF_NOWAIT for
   * buffered writes; FileDevice watches plain writes to anything but tmpfs for stalls).
   */
  writeCached(fd: number, data: readonly Buffer[], position: number, plain: boolean): number;
  /** The file is on tmpfs/ramfs: its reads never wait on a disk. */
  memoryBacked(fd: number): boolean;
  /** 1 when every page of the range is in the page cache, 0 when not, -1 when the kernel cannot say (cachestat, Linux 6.5). */
  pageCached(fd: number, offset: number, length: number): number;
  /** Block device calls; absent in the fallback, which therefore cannot serve devices (it cannot size them). */
  readonly block?: BlockOps;
  /** A zero-filled buffer starting on an `alignment` boundary (for O_DIRECT); absent in the fallback. */
  readonly alignedBuffer?: (size: number, alignment: number) => Buffer;
}

/** The block-device ioctls: sizing inline (no I/O), the rest on the thread pool. */
export interface BlockOps {
  /** BLKGETSIZE64 and BLKSSZGET. */
  info(fd: number): { size: number; logicalBlockSize: number };
  /** BLKDISCARD; offset and length aligned to the logical block size. */
  discard(fd: number, offset: number, length: number): Promise<void>;
  /** BLKZEROOUT (the kernel writes zeros itself where the device cannot); aligned as discard. */
  zeroOut(fd: number, offset: number, length: number): Promise<void>;
  /**
   * fallocate(PUNCH_HOLE|KEEP_SIZE) on a device: the kernel's zero-out with no fallback
   * (REQ_OP_WRITE_ZEROES, which may unmap); EOPNOTSUPP where the device cannot zero cheaply.
   */
  zeroNoFallback(fd: number, offset: number, length: number): Promise<void>;
}

interface Binding {
  fallocate(fd: number, mode: number, offset: number, length: number, cb: (err: Error | null) => void): void;
  extents(fd: number, offset: number, length: number, maxRuns: number, cb: (err: Error | null, runs?: number[]) => void): void;
  flock(fd: number, exclusive: boolean): void;
  lockBytes(fd: number, bytes: readonly number[], lock: boolean): void;
  checkLockBytes(fd: number, bytes: readonly number[]): number;
  preadNowait(fd: number, buf: Buffer, at: number, length: number, position: number, memoryBacked: boolean): number;
  memoryBacked(fd: number): boolean;
  pwritevNowait(fd: number, bufs: readonly Buffer[], position: number, memoryBacked: boolean): number;
  pageCached(fd: number, offset: number, length: number): number;
  blockRange(fd: number, op: 0 | 1, offset: number, length: number, cb: (err: Error | null) => void): void;
  blockInfo(fd: number): { size: number; logicalBlockSize: number };
  alignedBuffer(size: number, alignment: number): Buffer;
  FALLOC_FL_KEEP_SIZE: number;
  FALLOC_FL_PUNCH_HOLE: number;
  FALLOC_FL_ZERO_RANGE: number;
}

function toDeviceError(err: Error & { code?: string }): DeviceError {
  return new DeviceError(err.code ?? 'EIO', err.message, { cause: err });
}

function nativeOps(b: Binding): SparseOps {
  const falloc = (fd: number, mode: number, offset: number, length: number) =>
    new Promise<void>((resolve, reject) =>
      b.fallocate(fd, mode, offset, length, (err) => (err ? reject(toDeviceError(err)) : resolve())),
    );
  const range = (op: 0 | 1, fd: number, offset: number, length: number) =>
    new Promise<void>((resolve, reject) => b.blockRange(fd, op, offset, length, (err) => (err ? reject(toDeviceError(err)) : resolve())));
  return {
    kind: 'native',
    punchHole: (fd, offset, length) => falloc(fd, b.FALLOC_FL_PUNCH_HOLE | b.FALLOC_FL_KEEP_SIZE, offset, length),
    zeroRange: (fd, offset, length) => falloc(fd, b.FALLOC_FL_ZERO_RANGE | b.FALLOC_FL_KEEP_SIZE, offset, length),
    runs: (fd, offset, length, maxRuns) =>
      new Promise((resolve, reject) =>
        b.extents(fd, offset, length, maxRuns, (err, flat) => {
          if (err) return reject(toDeviceError(err));
          const out: Array<{ length: number; hole: boolean }> = [];
          for (let i = 0; i + 1 < flat!.length; i += 2) out.push({ length: flat![i]!, hole: flat![i + 1] === 1 });
          resolve(out);
        }),
      ),
    lock(fd, imagePath, exclusive) {
      try {
        b.flock(fd, exclusive);
      } catch (e) {
        const err = e as Error & { code?: string };
        // EAGAIN and EWOULDBLOCK are one errno on Linux; name it for what it means here.
        const code = err.code === 'EAGAIN' ? 'EWOULDBLOCK' : (err.code ?? 'EIO');
        throw new DeviceError(code, `cannot lock ${imagePath}: ${err.message}`, { cause: err });
      }
    },
    qemuLock(fd, imagePath, exclusive) {
      const { lock, test } = qemuLockBytes(exclusive);
      // As QEMU does: take ours first, then test theirs. Two openers racing both see
      // the other's locks and both refuse; neither can miss the other.
      try {
        b.lockBytes(fd, lock, true);
      } catch (e) {
        const err = e as Error & { code?: string; byte?: number };
        b.lockBytes(fd, lock, false);
        // Only another open file's write lock conflicts with a read lock (QEMU itself never keeps one).
        if (err.code === 'EAGAIN' || err.code === 'EACCES') throw new ImageLockConflict(imagePath, err.byte ?? lock[0]!);
        // No OFD locks here (EINVAL: kernel before 3.15; ENOLCK/EOPNOTSUPP: some network file systems).
        if (err.code === 'EINVAL' || err.code === 'ENOLCK' || err.code === 'EOPNOTSUPP' || err.code === 'ENOSYS') return false;
        throw new DeviceError(err.code ?? 'EIO', `cannot take the QEMU image locks on ${imagePath}: ${err.message}`, { cause: err });
      }
      const held = b.checkLockBytes(fd, test);
      if (held >= 0) {
        b.lockBytes(fd, lock, false);
        throw new ImageLockConflict(imagePath, held);
      }
      return true;
    },
    unlock() {
      /* flock and the OFD locks go with the fd */
    },
    readCached: (fd, into, at, length, position, memoryBacked) => b.preadNowait(fd, into, at, length, position, memoryBacked),
    memoryBacked: (fd) => b.memoryBacked(fd),
    pageCached: (fd, offset, length) => b.pageCached(fd, offset, length),
    writeCached: (fd, data, position, plain) => b.pwritevNowait(fd, data, position, plain),
    alignedBuffer: (size, alignment) => b.alignedBuffer(size, alignment),
    block: {
      info(fd) {
        try {
          return b.blockInfo(fd);
        } catch (e) {
          throw toDeviceError(e as Error);
        }
      },
      discard: (fd, offset, length) => range(0, fd, offset, length),
      zeroOut: (fd, offset, length) => range(1, fd, offset, length),
      zeroNoFallback: (fd, offset, length) => falloc(fd, b.FALLOC_FL_PUNCH_HOLE | b.FALLOC_FL_KEEP_SIZE, offset, length),
    },
  };
}

const unsupported = () => Promise.reject(new DeviceError('EOPNOTSUPP', 'sparse operations need the native addon'));

/** A lock file next to the image holding our pid; a stale one (dead pid) is replaced. */
function lockFilePath(imagePath: string): string {
  return `${imagePath}.nbd-migrate.lock`;
}

export const fallbackOps: SparseOps = {
  kind: 'fallback',
  punchHole: unsupported,
  zeroRange: unsupported,
  runs: (_fd, _offset, length) => Promise.resolve([{ length, hole: false }]),
  readCached: () => -1,
  memoryBacked: () => false,
  pageCached: () => -1,
  // Node's fs has no fcntl: QEMU's locks need the addon. FileDevice warns once.
  qemuLock: () => false,
  writeCached: () => -2,
  lock(_fd, imagePath, exclusive) {
    // Without flock, only exclusive (read-write) opens are guarded; readers share freely.
    if (!exclusive) return;
    const lf = lockFilePath(imagePath);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        fs.writeFileSync(lf, String(process.pid), { flag: 'wx' });
        return;
      } catch (e) {
        if ((e as { code?: string }).code !== 'EEXIST') throw toDeviceError(e as Error);
        const pid = Number(fs.readFileSync(lf, 'utf8'));
        let alive = Number.isInteger(pid) && pid > 0;
        if (alive) {
          try {
            process.kill(pid, 0);
          } catch (k) {
            alive = (k as { code?: string }).code === 'EPERM';
          }
        }
        if (alive) throw new DeviceError('EWOULDBLOCK', `cannot lock ${imagePath}: held by pid ${pid} (${lf})`);
        fs.rmSync(lf, { force: true });
      }
    }
    throw new DeviceError('EWOULDBLOCK', `cannot lock ${imagePath}: lock file ${lf} keeps reappearing`);
  },
  unlock(imagePath) {
    const lf = lockFilePath(imagePath);
    try {
      if (fs.readFileSync(lf, 'utf8') === String(process.pid)) fs.rmSync(lf, { force: true });
    } catch {
      /* not ours or already gone */
    }
  },
};

let loaded: { ops: SparseOps; reason?: string } | undefined;

/** The ops in force, and why the fallback is used when it is. */
export function sparseOps(): { ops: SparseOps; reason?: string } {
  if (loaded) return loaded;
  const { addon, reason } = nativeAddon();
  loaded = addon ? { ops: nativeOps(addon as unknown as Binding) } : { ops: fallbackOps, reason };
  return loaded;
}
