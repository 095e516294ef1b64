/**
 * A raw image file or a block device as a Device: positional I/O through libuv's thread pool,
 * sparse operations through the native addon (or the fallback), probing and
 * degrading like nbdkit's file plugin: a capability the kernel refuses once is
 * switched off and logged, never retried per request.
 */
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../protocol/constants.js';
import { logger, type Logger } from '../util/log.js';
import { byteLength, type Capabilities, type Device, DeviceError, type Extent, type FileRange, type WriteOptions, type ZeroOptions } from './device.js';
import { RangeLock } from '../util/range-lock.js';
import { ImageLockConflict, sparseOps, type BlockOps, type SparseOps } from './native.js';

/** The fallback's missing QEMU locks are said once per process, not per image. */
let warnedNoQemuLocks = false;

const read = promisify(fs.read);
const writeBuf = (fd: number, buf: Buffer, off: number, len: number, pos: number) =>
  new Promise<number>((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
const writev = promisify(fs.writev);
const fdatasync = promisify(fs.fdatasync);
const fsync = promisify(fs.fsync);
const close = promisify(fs.close);

/**
 * Largest read tried inline from the page cache before going to the thread pool.
 * 128 KiB. A pool read costs more CPU (fio's sequential 1 MiB reads from tmpfs: 416 against
 * 407 us of server CPU each, the hand-off to a worker and back), but the worker's copy runs
 * beside the event loop's socket writes, where inline the loop does both and is the limit
 * (97 % of a core, with the machine a third idle). One connection at QD16, same session,
 * inline against pool: 1 MiB 2504 against 2943 MB/s (nbdkit 3228-3299); 512 KiB 2580 against
 * 2876; 256 KiB 2464 against 2604; 128 KiB 2342 against 2222; 64 KiB 2219 against 1761.
 * Splitting a large read into parallel pool reads, and 2 or 8 pool threads, changed nothing.
 * Writes stay inline up to 1 MiB: the pool was no faster for them at any size (below).
 */
const INLINE_READ_MAX = 128 * 1024;

/**
 * Largest write tried inline (when it cannot block) before going to the thread pool.
 * 1 MiB: fio's sequential 1 MiB writes to tmpfs cost 355-423 us of server CPU each inline
 * against 549 us through the pool (the hand-off to a worker and back, and workers
 * contending for the inode lock, cost more than the copy); nbdkit 359-444 us.
 */
const INLINE_WRITE_MAX = 1024 * 1024;

/**
 * Block devices refuse RWF_NOWAIT for buffered writes (EOPNOTSUPP), and so does ext4 for its
 * files, so their writes are tried inline as plain pwritev: a copy into the page cache,
 * written back by the kernel. On an ext4 file on this machine's virtio disk (fio, one job,
 * 4 KiB random writes each followed by a FLUSH, no activity log) a write took 31-33 us inline
 * against 111-124 us through the pool (nbdkit 47-52 us); 4 KiB random writes at QD16:
 * 52-92k against 24-30k IOPS. Through the pool a 1 MiB write to a loop device cost 708-973 us of server CPU
 * against 439-480 us inline (the pool's workers copy payloads that are no longer in the
 * CPU cache, and contend with each other); nbdkit 325-631 us. A plain write can sleep
 * (dirty-page throttling when the disk falls behind, a folio under writeback), and the
 * event loop with it: one that takes longer than INLINE_STALL_MS sends the device's writes
 * to the pool for a pause, doubled while stalls keep coming (at most INLINE_PAUSE_MAX_MS).
 * Throttling can also come as many short sleeps (a few ms each, none over the limit): inline
 * writes slower than INLINE_SLOW_MS count their time, and more than INLINE_SLOW_BUDGET_MS of
 * it within INLINE_SLOW_WINDOW_MS is a stall too.
 */
const INLINE_STALL_MS = 10;
const INLINE_SLOW_MS = 2;
const INLINE_SLOW_BUDGET_MS = 20;
const INLINE_SLOW_WINDOW_MS = 1000;
const INLINE_PAUSE_MIN_MS = 1000;
const INLINE_PAUSE_MAX_MS = 60_000;

/** The buffers less their first `n` bytes. */
function skipBytes(bufs: readonly Buffer[], n: number): Buffer[] {
  let skip = n;
  const rest: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) skip -= b.length;
    else {
      rest.push(skip ? b.subarray(skip) : b);
      skip = 0;
    }
  }
  return rest;
}

/** Zeros written when the filesystem can neither punch nor zero-range; shared, never written into. */
const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

export interface FileDeviceOptions {
  readOnly: boolean;
  /**
   * Take the image locks: flock (exclusive for read-write, shared for read-only), which
   * keeps other nbd-migrate servers off, and QEMU's OFD byte-range locks, which QEMU,
   * qemu-img, qemu-io and qemu-nbd honour (see qemuLockBytes in native.ts).
   */
  lock?: boolean;
  /** Sparse-file operations to use instead of the process-wide choice (tests run both). */
  ops?: SparseOps;
  /**
   * O_DIRECT (the host page cache bypassed): every read and write goes through an aligned
   * bounce buffer (DIRECT_ALIGN, or the device's logical block size if larger), and a write
   * that does not cover whole blocks reads its edge blocks first. Needs the native addon.
   */
  direct?: boolean;
  /** Milliseconds, for the inline-write stall guard (tests); performance.now by default. */
  clock?: () => number;
}

/** The alignment of O_DIRECT buffers, offsets and lengths. */
export const DIRECT_ALIGN = 4096;

interface Direct {
  align: number;
  alloc: (size: number, alignment: number) => Buffer;
  /** Writes (and zeroes, trims) take the aligned blocks they touch: a read-modify-write must not race another change to its edge blocks. */
  lock: RangeLock;
}

/** A block device served read-write is open O_EXCL and another opener (a mount, LVM, another server) has it. */
export class DeviceInUse extends DeviceError {
  constructor(readonly devicePath: string, options?: { cause?: unknown }) {
    super('EBUSY', `device ${devicePath} is in use (mounted, or held by another program)`, options);
  }
}

/** What a served block device adds: its ioctls and its logical block size. */
interface BlockDev {
  ops: BlockOps;
  sectorSize: number;
  /** fallocate(PUNCH_HOLE) = the kernel's zero-out without fallback: on until the device refuses it. */
  canZeroNoFallback: boolean;
  canDiscard: boolean;
  canZeroOut: boolean;
}

function isUnsupported(e: unknown): boolean {
  const code = (e as { code?: string }).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'EINVAL';
}

export class FileDevice implements Device {
  private canPunch: boolean;
  private canZeroRange: boolean;
  private closed = false;
  /** tmpfs/ramfs: inline reads need no RWF_NOWAIT (which those refuse). */
  private readonly memoryBacked: boolean;
  /** Inline I/O stops being tried once the file system refuses RWF_NOWAIT outright. */
  private inlineReads = true;
  /** Whether the page cache can be asked what it holds (fileRange); cleared once the kernel cannot say. */
  private cacheKnown = true;
  private inlineWrites = true;
  /**
   * Inline writes are plain pwritev, watched for stalls (see INLINE_STALL_MS): block devices,
   * and files whose file system refuses RWF_NOWAIT for buffered writes (found at the first write).
   */
  private plainWrites: boolean;
  /** Until when (clock) a stalled device's writes go to the pool; 0 = inline. */
  private inlinePausedUntil = 0;
  private inlinePauseMs = INLINE_PAUSE_MIN_MS;
  private lastStallAt = Number.NEGATIVE_INFINITY;
  /** Slow (not stalled) inline writes: when their window began, and the milliseconds they took in it. */
  private slowSince = Number.NEGATIVE_INFINITY;
  private slowMs = 0;
  private stalls = 0;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
    private readonly readOnly: boolean,
    private readonly ops: SparseOps,
    private readonly log: Logger,
    /** Set when `path` is a block device (a loop device, an LV, a partition). */
    private readonly block?: BlockDev,
    /** Set when opened O_DIRECT. */
    private readonly direct?: Direct,
    private readonly clock: () => number = () => performance.now(),
  ) {
    if (direct) {
      // RWF_NOWAIT inline I/O is for the page cache, which O_DIRECT bypasses.
      this.inlineReads = false;
      this.inlineWrites = false;
    }
    // A device node lives on devtmpfs, which looks memory-backed; its data does not.
    this.memoryBacked = block ? false : ops.memoryBacked(fd);
    this.plainWrites = block !== undefined;
    this.canPunch = ops.kind === 'native';
    this.canZeroRange = ops.kind === 'native';
  }

  static async open(path: string, opts: FileDeviceOptions): Promise<FileDevice> {
    const { ops, reason } = opts.ops ? { ops: opts.ops, reason: undefined } : sparseOps();
    const log = logger({ image: path });
    if (reason) log.warn('storage-fallback', { reason, effect: 'no hole punching; every block reported as data' });
    const isBlock = (await promisify(fs.stat)(path)).isBlockDevice();
    if (isBlock && !ops.block)
      throw new DeviceError(
        'ENOTSUP',
        `${path} is a block device, which needs the native addon (the pure-JS storage fallback cannot size it${reason ? `; fallback because: ${reason}` : ''})`,
      );
    const { O_RDONLY, O_RDWR, O_EXCL, O_DIRECT } = fs.constants;
    if (opts.direct && !ops.alignedBuffer)
      throw new DeviceError('ENOTSUP', `${path}: --direct needs the native addon (aligned buffers for O_DIRECT)${reason ? `; fallback because: ${reason}` : ''}`);
    // Read-write devices are opened O_EXCL: the kernel refuses one that is mounted or that
    // another program holds exclusively (LVM, md, another server), and keeps them off it.
    const flags = (opts.readOnly ? O_RDONLY : O_RDWR) | (isBlock && !opts.readOnly ? O_EXCL : 0) | (opts.direct ? O_DIRECT : 0);
    let fd: number;
    try {
      fd = await promisify(fs.open)(path, flags);
    } catch (e) {
      if (isBlock && (e as { code?: string }).code === 'EBUSY') {
        const err = new DeviceInUse(path, { cause: e });
        log.warn('device-in-use', { cause: e });
        throw err;
      }
      if (opts.direct && (e as { code?: string }).code === 'EINVAL')
        throw new DeviceError('EINVAL', `${path}: its file system does not support O_DIRECT (--direct)`, { cause: e });
      throw e;
    }
    try {
      const st = await promisify(fs.fstat)(fd);
      let block: BlockDev | undefined;
      let size = st.size;
      if (st.isBlockDevice() && ops.block) {
        const info = ops.block.info(fd);
        size = info.size;
        block = { ops: ops.block, sectorSize: info.logicalBlockSize || 512, canZeroNoFallback: true, canDiscard: true, canZeroOut: true };
      } else if (!st.isFile()) throw new DeviceError('EINVAL', `${path} is neither a regular file nor a block device`);
      let direct: Direct | undefined;
      if (opts.direct) {
        const align = Math.max(DIRECT_ALIGN, block?.sectorSize ?? 0);
        // A partial last block would have to be written whole, growing the file.
        if (size % align !== 0) throw new DeviceError('EINVAL', `${path}: --direct needs a size that is a multiple of ${align} bytes (it is ${size})`);
        direct = { align, alloc: ops.alignedBuffer!, lock: new RangeLock() };
      }
      if (opts.lock !== false) {
        ops.lock(fd, path, !opts.readOnly);
        let qemuLocked: boolean;
        try {
          qemuLocked = ops.qemuLock(fd, path, !opts.readOnly);
        } catch (e) {
          if (e instanceof ImageLockConflict) log.warn('image-lock-conflict', { byte: e.byte, holder: e.holder, readOnly: opts.readOnly });
          ops.unlock(path);
          throw e;
        }
        if (!qemuLocked && !warnedNoQemuLocks) {
          warnedNoQemuLocks = true;
          log.warn('image-lock-degraded', {
            reason: ops.kind === 'native' ? 'no OFD locks on this kernel or file system' : 'QEMU-compatible image locks need the native addon',
            effect: 'QEMU, qemu-img, qemu-io and qemu-nbd are not kept off served images (other nbd-migrate servers still are)',
          });
        }
      }
      return new FileDevice(path, fd, size, opts.readOnly, ops, log, block, direct, opts.clock);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  get sparseKind(): SparseOps['kind'] {
    return this.ops.kind;
  }

  /** A block device (size from BLKGETSIZE64, TRIM and WRITE_ZEROES by ioctl), not an image file. */
  get isBlockDevice(): boolean {
    return this.block !== undefined;
  }

  capabilities(): Capabilities {
    const w = !this.readOnly;
    return {
      canWrite: w,
      canFlush: true,
      canFua: w,
      canTrim: w,
      canZero: w,
      canFastZero: w,
      canExtents: true,
      canCache: true,
      canMultiConn: true, // one fd per export shared by every connection: fdatasync covers them all
    };
  }

  /** Opened O_DIRECT (--direct). */
  get isDirect(): boolean {
    return this.direct !== undefined;
  }

  async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    if (this.direct) return this.directRead(this.direct, offset, length, into, at);
    // Small reads that hit the page cache are copied inline: a thread-pool round
    // trip costs more than the copy. Anything not cached goes to the pool.
    let done = this.readInline(offset, length, into, at);
    if (done === length) return;
    while (done < length) {
      const { bytesRead } = await read(this.fd, into, at + done, length - done, offset + done);
      if (bytesRead === 0) {
        // The file shrank under us: what is past its end reads as zeros.
        into.fill(0, at + done, at + length);
        return;
      }
      done += bytesRead;
    }
  }

  async write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    if (this.direct) {
      const d = this.direct;
      const total = byteLength(data);
      const release = await d.lock.acquire(...this.alignedOut(d, offset, total));
      try {
        await this.directWrite(d, offset, data, total);
      } finally {
        release();
      }
      if (opts.fua) await this.flush();
      return;
    }
    let pos = offset;
    let bufs = data as Buffer[];
    const n = this.writeInline(offset, data);
    if (n > 0) {
      if (n === byteLength(data)) {
        if (opts.fua) await this.flush();
        return;
      }
      // A short inline write: the thread pool writes the rest.
      pos += n;
      bufs = skipBytes(bufs, n);
    }
    for (;;) {
      const total = byteLength(bufs);
      if (total === 0) break;
      const { bytesWritten } = await writev(this.fd, bufs, pos);
      if (bytesWritten === total) break;
      if (bytesWritten === 0) throw new DeviceError('EIO', `short write at ${pos}`);
      // Partial write (rare on regular files): continue with what is left.
      pos += bytesWritten;
      bufs = skipBytes(bufs, bytesWritten);
    }
    if (opts.fua) await this.flush();
  }

  /**
   * Device.fileRange: this file, when reading the range waits on nothing: on tmpfs/ramfs
   * always, elsewhere when the page cache holds every page of it (cachestat). Not with
   * O_DIRECT, whose reads bypass the page cache.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    if (this.direct || this.closed || !this.cacheKnown) return undefined;
    if (!this.memoryBacked) {
      const cached = this.ops.pageCached(this.fd, offset, length);
      if (cached !== 1) {
        if (cached < 0) this.cacheKnown = false; // no cachestat here: never ask again
        return undefined;
      }
    }
    return { fd: this.fd, position: offset };
  }

  /** The data read at once, when it is in the page cache (Device.readNow). */
  readNow(offset: number, length: number, into: Buffer, at: number): boolean {
    if (this.direct) return false;
    try {
      return this.readInline(offset, length, into, at) === length;
    } catch {
      return false; // read() reads it again and reports the error
    }
  }

  /** Reads inline from the page cache (see INLINE_READ_MAX): the bytes read, 0 when not tried or not cached. Throws the read's error. */
  private readInline(offset: number, length: number, into: Buffer, at: number): number {
    if (length > INLINE_READ_MAX || !this.inlineReads) return 0;
    const n = this.ops.readCached(this.fd, into, at, length, offset, this.memoryBacked);
    if (n === -2) this.inlineReads = false;
    return n > 0 ? n : 0;
  }

  /** The write made at once, when the page cache takes it without waiting (Device.writeNow). */
  writeNow(offset: number, data: readonly Buffer[]): boolean {
    if (this.direct) return false;
    try {
      return this.writeInline(offset, data) === byteLength(data);
    } catch {
      return false; // write() makes it again and reports the error
    }
  }

  /**
   * Writes inline when that cannot block (see INLINE_WRITE_MAX): the bytes written, 0 when
   * not tried or the kernel would have waited. Throws the write's error.
   */
  private writeInline(offset: number, data: readonly Buffer[]): number {
    if (!this.inlineWrites || data.length > 64 || (this.inlinePausedUntil !== 0 && !this.inlineResumed())) return 0;
    const total = byteLength(data);
    if (total > INLINE_WRITE_MAX) return 0;
    const plain = this.memoryBacked || this.plainWrites;
    const started = this.plainWrites ? this.clock() : 0;
    const n = this.ops.writeCached(this.fd, data, offset, plain);
    if (this.plainWrites) this.watchInlineWrite(started, total);
    if (n === -2) {
      if (plain) {
        this.inlineWrites = false;
        return 0;
      }
      // This file system refuses RWF_NOWAIT for buffered writes (ext4): plain writes from now on, watched as a device's are.
      this.plainWrites = true;
      this.log.debug('inline-writes-plain', { effect: 'the file system refuses RWF_NOWAIT writes: inline writes are plain pwritev, watched for stalls' });
      return this.writeInline(offset, data);
    }
    return n > 0 ? n : 0;
  }

  /** Whether a pause of inline writes is over (it is ended here once it is). */
  private inlineResumed(): boolean {
    if (this.clock() < this.inlinePausedUntil) return false;
    this.inlinePausedUntil = 0;
    return true;
  }

  /** A plain inline write that slept (INLINE_STALL_MS) pauses inline writes; stalls in a row double the pause. */
  private watchInlineWrite(started: number, bytes: number): void {
    const now = this.clock();
    const took = now - started;
    if (took <= INLINE_SLOW_MS) return;
    if (took <= INLINE_STALL_MS) {
      if (now - this.slowSince > INLINE_SLOW_WINDOW_MS) {
        this.slowSince = now;
        this.slowMs = 0;
      }
      this.slowMs += took;
      if (this.slowMs <= INLINE_SLOW_BUDGET_MS) return;
    }
    this.slowMs = 0;
    this.slowSince = Number.NEGATIVE_INFINITY;
    this.inlinePauseMs = now - this.lastStallAt <= 2 * this.inlinePauseMs + INLINE_PAUSE_MIN_MS ? Math.min(2 * this.inlinePauseMs, INLINE_PAUSE_MAX_MS) : INLINE_PAUSE_MIN_MS;
    this.lastStallAt = now;
    this.inlinePausedUntil = now + this.inlinePauseMs;
    this.stalls++;
    // The first says why; the rest (a disk that keeps falling behind) only at debug level.
    this.log[this.stalls === 1 ? 'info' : 'debug']('inline-write-stalled', {
      tookMs: Math.round(took * 10) / 10,
      slow: took <= INLINE_STALL_MS ? `more than ${INLINE_SLOW_BUDGET_MS} ms in writes over ${INLINE_SLOW_MS} ms within ${INLINE_SLOW_WINDOW_MS} ms` : undefined,
      bytes,
      pauseMs: this.inlinePauseMs,
      stalls: this.stalls,
      effect: 'writes go through the thread pool for the pause, so the event loop does not wait on the device',
    });
  }

  flush(): Promise<void> {
    // On a device fsync also flushes the device's volatile write cache.
    if (this.block) return fsync(this.fd);
    // tmpfs and ramfs have nothing to write back (their fsync returns at once): no hand-off to the
    // pool and back, which cost a QD1 write-and-FLUSH loop 68 us of its 206 us per write (nbdkit 138).
    if (this.memoryBacked) {
      try {
        fs.fdatasyncSync(this.fd);
        return Promise.resolve();
      } catch (e) {
        return Promise.reject(e);
      }
    }
    return fdatasync(this.fd);
  }

  async trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.underDirectLock(offset, length, () => this.trimLocked(offset, length, opts));
  }

  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.underDirectLock(offset, length, () => this.zeroLocked(offset, length, opts));
  }

  /** Under --direct, runs `fn` holding the aligned blocks [offset, offset+length) touches (see Direct.lock). */
  private async underDirectLock(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    if (!this.direct || length === 0) return fn();
    const release = await this.direct.lock.acquire(...this.alignedOut(this.direct, offset, length));
    try {
      await fn();
    } finally {
      release();
    }
  }

  private async trimLocked(offset: number, length: number, opts: WriteOptions): Promise<void> {
    if (this.block) return this.blockTrim(this.block, offset, length, opts);
    // TRIM is a hint: where holes can't be punched it is done by doing nothing.
    if (length === 0 || !this.canPunch) return;
    try {
      await this.ops.punchHole(this.fd, offset, length);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.disablePunch(e);
      return;
    }
    if (opts.fua) await this.flush();
  }

  private async zeroLocked(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    if (length === 0) return;
    if (this.block) return this.blockZero(this.block, offset, length, opts);
    if (!opts.noHole && this.canPunch) {
      try {
        await this.ops.punchHole(this.fd, offset, length);
        if (opts.fua) await this.flush();
        return;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        this.disablePunch(e);
      }
    }
    if (this.canZeroRange) {
      try {
        await this.ops.zeroRange(this.fd, offset, length);
        if (opts.fua) await this.flush();
        return;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        this.canZeroRange = false;
        this.log.info('storage-degraded', { capability: 'zero-range', cause: e });
      }
    }
    if (opts.fast) throw new DeviceError('ENOTSUP', 'no fast way to zero on this file system: zeros would have to be written');
    await this.writeZeros(offset, length);
    if (opts.fua) await this.flush();
  }

  async extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size);
    // A device has no holes we can see: all of it is data.
    if (this.block) return [{ length: end - offset, flags: 0 }];
    const runs = await this.ops.runs(this.fd, offset, end - offset, maxExtents);
    const out: Extent[] = [];
    for (const r of runs) if (r.length > 0) out.push({ length: r.length, flags: r.hole ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0 });
    if (out.length === 0) out.push({ length: end - offset, flags: 0 });
    return out;
  }

  async cache(): Promise<void> {
    // Advisory: the page cache already holds what was read recently.
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await close(this.fd);
    this.ops.unlock(this.path);
  }

  /** The sector-aligned middle of a range (empty when none): the ioctls refuse unaligned ones. */
  private aligned(b: BlockDev, offset: number, length: number): { start: number; end: number } {
    const start = Math.ceil(offset / b.sectorSize) * b.sectorSize;
    const end = Math.floor((offset + length) / b.sectorSize) * b.sectorSize;
    return end > start ? { start, end } : { start, end: start };
  }

  private async blockTrim(b: BlockDev, offset: number, length: number, opts: WriteOptions): Promise<void> {
    // A hint: only whole sectors are discarded, and nothing where the device cannot.
    const { start, end } = this.aligned(b, offset, length);
    if (end === start || !b.canDiscard) return;
    try {
      await b.ops.discard(this.fd, start, end - start);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      b.canDiscard = false;
      this.log.info('storage-degraded', { capability: 'discard', cause: e });
      return;
    }
    if (opts.fua) await this.flush();
  }

  /**
   * WRITE_ZEROES on a device. Whole sectors: fallocate(PUNCH_HOLE) first, which the kernel
   * turns into a zero-out without fallback (the device's WRITE_ZEROES offload, which may
   * unmap; EOPNOTSUPP when there is none); then BLKZEROOUT, which keeps the range mapped but
   * may have the kernel write zeros. FAST_ZERO takes only the first (so it fails with ENOTSUP
   * on a device without the offload, or with NO_HOLE). Partial sectors at the edges are written.
   */
  private async blockZero(b: BlockDev, offset: number, length: number, opts: ZeroOptions): Promise<void> {
    const { start, end } = this.aligned(b, offset, length);
    if (opts.fast && (opts.noHole || !b.canZeroNoFallback))
      throw new DeviceError('ENOTSUP', opts.noHole ? 'no fast zeroing that keeps the range allocated on this device' : 'this device cannot zero without writing zeros');
    let done = false;
    if (end > start && !opts.noHole && b.canZeroNoFallback) {
      try {
        await b.ops.zeroNoFallback(this.fd, start, end - start);
        done = true;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        b.canZeroNoFallback = false;
        this.log.info('storage-degraded', { capability: 'write-zeroes offload (fast zero)', cause: e });
        if (opts.fast) throw new DeviceError('ENOTSUP', 'this device cannot zero without writing zeros', { cause: e });
      }
    }
    if (!done && end > start && b.canZeroOut) {
      try {
        await b.ops.zeroOut(this.fd, start, end - start);
        done = true;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        b.canZeroOut = false;
        this.log.info('storage-degraded', { capability: 'zero-out', cause: e });
      }
    }
    if (done || end === start) {
      // Only the unaligned edges (or the whole small range) are left to write.
      if (end === start) await this.writeZeros(offset, length);
      else {
        if (start > offset) await this.writeZeros(offset, start - offset);
        if (offset + length > end) await this.writeZeros(end, offset + length - end);
      }
    } else await this.writeZeros(offset, length);
    if (opts.fua) await this.flush();
  }

  /** Writes zeros; under --direct the caller (zero) already holds the blocks. */
  private async writeZeros(offset: number, length: number): Promise<void> {
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_CHUNK.length, length - done);
      const chunk = [n === ZERO_CHUNK.length ? ZERO_CHUNK : ZERO_CHUNK.subarray(0, n)];
      if (this.direct) await this.directWrite(this.direct, offset + done, chunk, n);
      else await this.write(offset + done, chunk, { fua: false });
      done += n;
    }
  }

  /** [start, length] of the aligned blocks covering [offset, offset+length). */
  private alignedOut(d: Direct, offset: number, length: number): [number, number] {
    const start = Math.floor(offset / d.align) * d.align;
    const end = Math.ceil((offset + length) / d.align) * d.align;
    return [start, Math.max(end - start, d.align)];
  }

  /** Reads the aligned blocks into `buf` at `at` (zeros past the end of the file). */
  private async directReadInto(buf: Buffer, at: number, pos: number, length: number): Promise<void> {
    for (let done = 0; done < length; ) {
      const { bytesRead } = await read(this.fd, buf, at + done, length - done, pos + done);
      if (bytesRead === 0) return; // past the end: the bounce buffer is zero-filled
      done += bytesRead;
    }
  }

  private async directRead(d: Direct, offset: number, length: number, into: Buffer, at: number): Promise<void> {
    if (length === 0) return;
    const [start, len] = this.alignedOut(d, offset, length);
    const bounce = d.alloc(len, d.align);
    await this.directReadInto(bounce, 0, start, len);
    bounce.copy(into, at, offset - start, offset - start + length);
  }

  /** One aligned write of the blocks `data` touches; edge blocks it covers only in part are read first. The caller holds them. */
  private async directWrite(d: Direct, offset: number, data: readonly Buffer[], total: number): Promise<void> {
    if (total === 0) return;
    const [start, len] = this.alignedOut(d, offset, total);
    const bounce = d.alloc(len, d.align);
    const end = offset + total;
    if (offset > start) await this.directReadInto(bounce, 0, start, d.align);
    const lastBlock = start + len - d.align;
    if (end < start + len && (lastBlock > start || offset === start)) await this.directReadInto(bounce, lastBlock - start, lastBlock, d.align);
    let at = offset - start;
    for (const b of data) at += b.copy(bounce, at);
    for (let done = 0; done < len; ) {
      const n = await writeBuf(this.fd, bounce, done, len - done, start + done);
      if (n === 0) throw new DeviceError('EIO', `short write at ${start + done}`);
      done += n;
    }
  }

  private disablePunch(cause: unknown): void {
    this.canPunch = false;
    this.log.info('storage-degraded', { capability: 'punch-hole', cause });
  }
}
