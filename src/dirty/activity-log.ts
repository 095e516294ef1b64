/**
 * Crash-safe dirty tracking, DRBD's activity-log idea over the in-memory
 * DirtyBitmap. Two files in the export's state folder (state.ts):
 *
 * - `dirty.bitmap`: a stored copy of the bitmap (header + words), replaced
 *   atomically. Written at open (what was recovered), at every checkpoint,
 *   and at a clean close (the exact bitmap).
 * - `activity.log`: two slots of equal size (the file's half, a multiple of
 *   4 KiB) rewritten in place, alternately; each holds a sequence number, the
 *   extent size, the set of "active" extents (coarse, 4 MiB by default) and a
 *   CRC. The valid slot with the highest sequence number is the log.
 *
 * The rule: a write (or trim, or zero) into an extent that is not active
 * waits until a slot naming that extent is on disk (fdatasync); first writes
 * that arrive together share one slot write and one sync. Writes into active
 * extents go straight through. So after a crash,
 *     recovered = stored bitmap ∪ every extent in the log
 * covers every acknowledged change: never less than what was written.
 *
 * Bounding the log (it names at most its capacity, logCapacity), and making
 * the stored copy current (a mirror clears bits as it copies), is one step,
 * the checkpoint:
 *   1. the active set becomes empty (from now on every write waits for a slot);
 *   2. snapshot = bitmap ∪ the extents of writes in flight ∪ ranges a caller
 *      says are in flight elsewhere (the mirror's chunks whose bits it cleared
 *      but whose copy is not acknowledged yet);
 *   3. the snapshot replaces dirty.bitmap (atomic, durable);
 *   4. a slot with the extents that asked meanwhile is written and synced.
 * An extent leaves the log only in step 4, after its bits are durably in the
 * stored bitmap (step 3): a write acknowledged before step 1 is in the
 * bitmap or in flight at step 2, and one that starts after step 1 waits for
 * a slot naming its extent. A crash anywhere in between recovers with the
 * old slot or the new one, and the old stored copy or the new, each pair a
 * superset of what was acknowledged.
 */
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import { crc32 } from 'node:zlib';
import { DirtyBitmap } from './bitmap.js';
import type { StateFolder } from './state.js';

export const BITMAP_FILE = 'dirty.bitmap';
export const LOG_FILE = 'activity.log';
export const DEFAULT_EXTENT_BYTES = 4 * 1024 * 1024;

/** Slots are whole multiples of this; logs written before capacities grew have slots of exactly this. */
const SLOT_UNIT = 4096;
const SLOT_HEADER = 24;
/** Extents a 4 KiB slot names: the capacity of logs before it could grow. */
export const SLOT_CAPACITY = (SLOT_UNIT - SLOT_HEADER) / 4;
/**
 * The default capacity names every extent of the export, up to this (a 64 KiB slot:
 * 64 GiB of disk at 4 MiB extents). A log smaller than the set of extents a guest keeps
 * writing to fills and checkpoints over and over, and after each checkpoint every first
 * write into an extent waits for a slot's fdatasync again. On an ext4 file on this
 * machine's virtio disk, 4 KiB random writes at QD16 over 8 GiB (2048 extents): 21-31k IOPS
 * with 1018 extents, 78-104k once the log holds them all (no log: 101-104k; nbdkit 84-98k).
 * The price: after a crash every extent the log names is recovered as dirty (at most the
 * capacity's worth of disk, copied again by a resumed mirror).
 */
export const DEFAULT_MAX_CAPACITY = (16 * SLOT_UNIT - SLOT_HEADER) / 4;
/** The largest capacity that may be asked for (a 256 KiB slot, rewritten whole at each sync). */
export const MAX_CAPACITY = (64 * SLOT_UNIT - SLOT_HEADER) / 4;

/** Bytes of a slot that names up to `capacity` extents. */
function slotBytesFor(capacity: number): number {
  return Math.ceil((SLOT_HEADER + 4 * capacity) / SLOT_UNIT) * SLOT_UNIT;
}

/**
 * The log's capacity for an export of `extents` extents: `asked` if given (1 to
 * MAX_CAPACITY), else every extent up to DEFAULT_MAX_CAPACITY, and never less than
 * a 4 KiB slot holds.
 */
export function logCapacity(extents: number, asked?: number): number {
  if (asked !== undefined) {
    if (!Number.isInteger(asked) || asked < 1 || asked > MAX_CAPACITY) throw new RangeError(`activity-log capacity must be 1 to ${MAX_CAPACITY} extents, got ${asked}`);
    return asked;
  }
  return (slotBytesFor(Math.min(Math.max(extents, 1), DEFAULT_MAX_CAPACITY)) - SLOT_HEADER) / 4;
}
const SLOT_MAGIC = 0x4c41424e; // "NBAL"
const BITMAP_MAGIC = 'NBDMDBM1';
const BITMAP_HEADER = 64;

const write = promisify(fs.write);
const fdatasync = promisify(fs.fdatasync);

// ---------------------------------------------------------------- file formats

/**
 * dirty.bitmap: magic "NBDMDBM1", then little-endian u32 version (1 or 2),
 * granularity, word count, CRC-32 of the words, u64 size, u32 generation;
 * zero padding to 64 bytes; then the words (u32 LE).
 */
export function encodeBitmap(size: number, granularity: number, words: Uint32Array, generation: number): Buffer {
  return encodeBitmapWith(size, granularity, words.length, generation, (body) => body.set(words));
}

/**
 * Version 2 is version 1's layout, written while the log has slots bigger than 4 KiB.
 * Releases before those could exist read only 4 KiB slots and version 1: such a
 * release refuses the stored bitmap and marks the whole export dirty, where it would
 * otherwise recover the bitmap without the log it cannot read (and miss changes).
 */
const BITMAP_VERSION_BIG_SLOTS = 2;

/** The file buffer for `count` words: unpooled, so the words after the 64-byte header are 4-byte aligned. */
function bitmapFileBuffer(count: number): Buffer {
  return Buffer.allocUnsafeSlow(BITMAP_HEADER + count * 4);
}

/**
 * encodeBitmap with the words written by `fill` straight into the file buffer
 * (no copy of the bitmap on the side); `into` (from bitmapFileBuffer) is reused.
 */
function encodeBitmapWith(
  size: number,
  granularity: number,
  count: number,
  generation: number,
  fill: (words: Uint32Array) => void,
  into: Buffer = bitmapFileBuffer(count),
  version = 1,
): Buffer {
  const b = into;
  if (b.length !== BITMAP_HEADER + count * 4 || b.byteOffset % 4 !== 0) throw new RangeError('bitmap file buffer of the wrong size or alignment');
  b.fill(0, 0, BITMAP_HEADER);
  const body = b.subarray(BITMAP_HEADER);
  body.fill(0);
  fill(new Uint32Array(b.buffer, b.byteOffset + BITMAP_HEADER, count));
  b.write(BITMAP_MAGIC, 0, 'latin1');
  b.writeUInt32LE(version, 8);
  b.writeUInt32LE(granularity, 12);
  b.writeUInt32LE(count, 16);
  b.writeUInt32LE(crc32(body), 20);
  b.writeBigUInt64LE(BigInt(size), 24);
  b.writeUInt32LE(generation >>> 0, 32);
  return b;
}

export interface StoredBitmap {
  size: number;
  granularity: number;
  words: Uint32Array;
  generation: number;
}

/** Decodes dirty.bitmap; throws (saying why) when it is not a whole, valid file. */
export function decodeBitmap(b: Buffer): StoredBitmap {
  if (b.length < BITMAP_HEADER || b.toString('latin1', 0, 8) !== BITMAP_MAGIC) throw new Error('not an nbd-migrate dirty bitmap');
  const version = b.readUInt32LE(8);
  if (version !== 1 && version !== BITMAP_VERSION_BIG_SLOTS) throw new Error(`dirty bitmap version ${version} is not known`);
  const n = b.readUInt32LE(16);
  if (b.length !== BITMAP_HEADER + n * 4) throw new Error(`dirty bitmap is ${b.length} bytes, expected ${BITMAP_HEADER + n * 4}`);
  const body = b.subarray(BITMAP_HEADER);
  if (crc32(body) !== b.readUInt32LE(20)) throw new Error('dirty bitmap checksum mismatch');
  const words = new Uint32Array(n);
  Buffer.from(words.buffer).set(body);
  return { granularity: b.readUInt32LE(12), words, size: Number(b.readBigUInt64LE(24)), generation: b.readUInt32LE(32) };
}

const CRC_AT = 20;
const ZERO_CRC_FIELD = Buffer.alloc(4);

/** A slot's CRC-32: of the whole slot, its CRC field taken as 0 (the slot is not changed). */
function slotCrc(b: Buffer): number {
  return crc32(b.subarray(CRC_AT + 4), crc32(ZERO_CRC_FIELD, crc32(b.subarray(0, CRC_AT))));
}

/**
 * One activity-log slot: u32 magic, u64 sequence, u32 extent bytes, u32 count, u32 CRC (slotCrc), extents.
 * Written into `b` (the slot's size, reused by the log: slots are written one at a time); the extents of every list, in order.
 */
function encodeSlot(b: Buffer, seq: number, extentBytes: number, ...lists: Iterable<number>[]): Buffer {
  if (b.length < SLOT_UNIT || b.length % SLOT_UNIT !== 0) throw new RangeError('activity log slot buffer of the wrong size');
  const capacity = (b.length - SLOT_HEADER) / 4;
  b.fill(0);
  let n = 0;
  for (const extents of lists)
    for (const e of extents) {
      if (n === capacity) throw new RangeError('activity log slot overflow');
      b.writeUInt32LE(e, SLOT_HEADER + 4 * n++);
    }
  b.writeUInt32LE(SLOT_MAGIC, 0);
  b.writeBigUInt64LE(BigInt(seq), 4);
  b.writeUInt32LE(extentBytes, 12);
  b.writeUInt32LE(n, 16);
  b.writeUInt32LE(slotCrc(b), CRC_AT);
  return b;
}

/**
 * The slot in `b` (as encodeSlot left it) with `added` appended and sequence `seq`: only the new
 * extents are encoded. At 16,378 extents a whole encode took 162 us, and the log writes a slot
 * for every batch of first writes.
 */
function extendSlot(b: Buffer, seq: number, added: readonly number[]): Buffer {
  let n = b.readUInt32LE(16);
  if (n + added.length > (b.length - SLOT_HEADER) / 4) throw new RangeError('activity log slot overflow');
  for (const e of added) b.writeUInt32LE(e, SLOT_HEADER + 4 * n++);
  b.writeBigUInt64LE(BigInt(seq), 4);
  b.writeUInt32LE(n, 16);
  b.writeUInt32LE(slotCrc(b), CRC_AT);
  return b;
}

interface Slot {
  seq: number;
  extentBytes: number;
  extents: number[];
}

/** One slot (the whole of `b`, a multiple of 4 KiB); undefined when torn, never written or not a slot. */
function decodeSlot(b: Buffer): Slot | undefined {
  if (b.length < SLOT_UNIT || b.length % SLOT_UNIT !== 0 || b.readUInt32LE(0) !== SLOT_MAGIC) return undefined;
  const n = b.readUInt32LE(16);
  if (n > (b.length - SLOT_HEADER) / 4) return undefined;
  if (slotCrc(b) !== b.readUInt32LE(CRC_AT)) return undefined; // torn or never written
  const extents: number[] = [];
  for (let i = 0; i < n; i++) extents.push(b.readUInt32LE(SLOT_HEADER + 4 * i));
  return { seq: Number(b.readBigUInt64LE(4)), extentBytes: b.readUInt32LE(12), extents };
}

/**
 * The byte ranges of the extents the log names now (undefined: no log): read it
 * before ActivityLog.open, which empties it. Checkpoints add these after a crash.
 */
export function loggedRanges(folder: StateFolder): [offset: number, length: number][] | undefined {
  const log = readLog(folder);
  return log?.extents.map((e) => [e * log.extentBytes, log.extentBytes]);
}

/**
 * The log: the valid slot with the highest sequence number (undefined: empty or missing).
 * Each slot is half the file (the log sets its size before it writes a slot); a file that
 * is not two whole slots long is read as 4 KiB slots.
 */
function readLog(folder: StateFolder): Slot | undefined {
  const b = folder.read(LOG_FILE);
  if (!b) return undefined;
  const half = b.length / 2;
  const slotBytes = b.length >= 2 * SLOT_UNIT && half % SLOT_UNIT === 0 ? half : SLOT_UNIT;
  const slots = [decodeSlot(b.subarray(0, slotBytes)), decodeSlot(b.subarray(slotBytes, 2 * slotBytes))];
  return slots.reduce<Slot | undefined>((best, s) => (s && (!best || s.seq > best.seq) ? s : best), undefined);
}

// ---------------------------------------------------------------- recovery

export interface Recovery {
  /** A stored bitmap was found and used. */
  stored: boolean;
  /** Extents the log named (0 after a clean close). */
  logExtents: number;
  /** Bytes per extent of that log. */
  extentBytes: number;
  /** Why the whole export was marked dirty instead (the stored copy unusable), if it was. */
  markedAll?: string;
  /** The log's sequence number (the next slot continues from it). */
  seq: number;
  generation: number;
}

/**
 * Reads the state folder's bitmap and log into `bitmap` (marks only; call it
 * on a fresh bitmap): stored bits ∪ every extent in the log. A stored copy of
 * another size, or one that does not decode, marks everything; one of another
 * granularity is converted (every block touching a stored dirty block).
 */
export function recoverInto(folder: StateFolder, bitmap: DirtyBitmap): Recovery {
  const log = readLog(folder);
  const r: Recovery = { stored: false, logExtents: log?.extents.length ?? 0, extentBytes: log?.extentBytes ?? 0, seq: log?.seq ?? 0, generation: 0 };
  let raw: Buffer | undefined;
  try {
    raw = folder.read(BITMAP_FILE);
  } catch (e) {
    r.markedAll = `cannot read ${folder.file(BITMAP_FILE)}: ${(e as Error).message}`;
  }
  if (raw) {
    try {
      const s = decodeBitmap(raw);
      r.generation = s.generation;
      r.stored = true;
      if (s.size !== bitmap.size) r.markedAll = `the stored bitmap is for ${s.size} bytes, the image has ${bitmap.size}`;
      else if (s.granularity === bitmap.granularity) bitmap.orWords(s.words);
      else {
        const old = new DirtyBitmap(s.size, s.granularity);
        old.orWords(s.words);
        for (let run = old.nextRun(0, old.blocks); run; run = old.nextRun(run.block + run.count, old.blocks))
          bitmap.mark(run.block * s.granularity, run.count * s.granularity);
      }
    } catch (e) {
      r.markedAll = `${folder.file(BITMAP_FILE)}: ${(e as Error).message}`;
    }
  } else if (log && log.extents.length > 0 && !r.markedAll) {
    // A log without its stored bitmap: the bitmap was lost, not merely never written (open writes both).
    r.markedAll = `${folder.file(BITMAP_FILE)} is missing but the activity log is not empty`;
  }
  if (r.markedAll) bitmap.markAll();
  if (log) for (const e of log.extents) bitmap.mark(e * log.extentBytes, log.extentBytes);
  return r;
}

/** Reads what a restart would recover, without opening the log (tests, tools). */
export function readRecovered(folder: StateFolder, size: number, granularity: number): { bitmap: DirtyBitmap; recovery: Recovery } {
  const bitmap = new DirtyBitmap(size, granularity);
  return { bitmap, recovery: recoverInto(folder, bitmap) };
}

// ---------------------------------------------------------------- the log

export interface ActivityLogOptions {
  /** Bytes per activity-log extent (a power of two, at least the bitmap's granularity). */
  extentBytes?: number;
  /** Extents the log names at most before it checkpoints (default: logCapacity). */
  capacity?: number;
  /** Told when the log cannot be written (each failing write is refused with the error too). */
  onError?: (e: unknown) => void;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Waiters attach their own handlers; an unobserved rejection is not an unhandled one.
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

/** An export's activity log in `ctl status` (counters since the export was opened). */
export interface ActivityLogStatus {
  extentBytes: number;
  /** Extents the log can name before it checkpoints. */
  capacity: number;
  /** Extents the log names now. */
  activeExtents: number;
  /** Extents written into the log (a first change into an extent not logged). */
  extentsLogged: number;
  /** Slot writes, each followed by an fdatasync of the log. */
  syncs: number;
  /** Checkpoints: the bitmap stored and the log started again (a full log, a mirror's progress save). */
  checkpoints: number;
  /** Changes that waited for a slot to be synced. */
  waits: number;
  /** The log cannot be written (changes into extents not logged fail with EIO). */
  failed: boolean;
}

/** Ranges [offset, length] a caller has in flight outside the write path, covered by every snapshot. */
export type CoverFn = () => Iterable<readonly [number, number]>;

export class ActivityLog {
  readonly extentBytes: number;
  /** Extents the log names at most (a full log checkpoints). */
  readonly capacity: number;
  /** Extents named by the slot on disk (or by both the old and the slot being written). */
  private active = new Set<number>();
  /** The buffer every slot is encoded in (slots are written one at a time): one slot's size. */
  private readonly slotFile: Buffer;
  /** The same as flags, one byte per extent: the data path's test. */
  private readonly activeFlags: Uint8Array;
  /** Extents asked for since the last slot write started, and the promise of the slot that will name them. */
  private batch = new Set<number>();
  private next: Deferred | undefined;
  /** Writes in flight per extent (begin .. end). */
  private readonly inflight: Uint32Array;
  private running = false;
  /** The buffer every snapshot of dirty.bitmap is built in (encodeSnapshot). */
  private snapshotFile: Buffer | undefined;
  private checkpointWanted: Deferred | undefined;
  private seq: number;
  private generation: number;
  private fd: number;
  private failure: Error | undefined;
  private closed = false;
  private readonly covers = new Set<CoverFn>();
  /** Run at each checkpoint after the snapshot is stored and before extents leave the log (checkpoints store their bits). */
  private readonly beforeDrop = new Set<() => void | Promise<void>>();
  /** Counters, for status and the bench: slot writes (each one fdatasync), checkpoints, changes that waited, extents newly logged. */
  readonly stats = { slotWrites: 0, checkpoints: 0, waits: 0, extentsLogged: 0 };

  private constructor(
    private readonly folder: StateFolder,
    readonly bitmap: DirtyBitmap,
    recovery: Recovery,
    private readonly opts: ActivityLogOptions,
  ) {
    this.extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
    if (!Number.isInteger(this.extentBytes) || (this.extentBytes & (this.extentBytes - 1)) !== 0 || this.extentBytes < bitmap.granularity)
      throw new RangeError(`activity-log extent must be a power of two of at least the dirty granularity (${bitmap.granularity}), got ${this.extentBytes}`);
    const extents = Math.max(1, Math.ceil(bitmap.size / this.extentBytes));
    this.capacity = logCapacity(extents, opts.capacity);
    this.slotFile = Buffer.alloc(slotBytesFor(this.capacity));
    this.activeFlags = new Uint8Array(extents);
    this.inflight = new Uint32Array(extents);
    this.seq = recovery.seq;
    this.generation = recovery.generation;
    this.fd = folder.openFd(LOG_FILE);
  }

  /**
   * Recovers the folder's state into `bitmap`, then stores the result and
   * empties the log (durably, before anything is served), and returns the log.
   */
  static open(folder: StateFolder, bitmap: DirtyBitmap, opts: ActivityLogOptions = {}): { log: ActivityLog; recovery: Recovery } {
    const recovery = recoverInto(folder, bitmap);
    const log = new ActivityLog(folder, bitmap, recovery, opts);
    try {
      log.storeSync();
    } catch (e) {
      fs.closeSync(log.fd);
      throw e;
    }
    return { log, recovery };
  }

  /** Adds ranges every snapshot must cover while they are in flight (a mirror's copies); returns the removal. */
  cover(fn: CoverFn): () => void {
    this.covers.add(fn);
    return () => this.covers.delete(fn);
  }

  /**
   * Runs `fn` at every checkpoint, once the snapshot is stored and before the new
   * slot lets extents leave the log: whoever keeps bits of its own (checkpoints)
   * stores them there, so stored bits ∪ the log covers every change. Returns the removal.
   */
  beforeExtentsLeave(fn: () => void | Promise<void>): () => void {
    this.beforeDrop.add(fn);
    return () => this.beforeDrop.delete(fn);
  }

  /**
   * A change to [offset, offset + length) is about to be made. Returns
   * undefined when its extents are all in the log already (go on at once), or
   * a promise that resolves once they are on disk (rejects if the log cannot
   * be written). Every begin is paired with an end, whatever happens.
   */
  begin(offset: number, length: number): Promise<void> | undefined {
    const n = this.inflight.length;
    const first = Math.min(Math.floor(offset / this.extentBytes), n - 1);
    const last = length > 0 ? Math.min(Math.floor((offset + length - 1) / this.extentBytes), n - 1) : first;
    let missing = false;
    for (let e = first; e <= last; e++) {
      this.inflight[e]!++;
      if (this.activeFlags[e] === 0) {
        missing = true;
        this.batch.add(e);
      }
    }
    if (this.failure) return Promise.reject(this.failure);
    if (!missing) return undefined;
    this.stats.waits++;
    const d = (this.next ??= deferred());
    this.kick();
    return d.promise;
  }

  /** Whether a change to [offset, offset + length) may begin at once: the log names all its extents on disk and has not failed. */
  mayBeginNow(offset: number, length: number): boolean {
    if (this.failure) return false;
    const n = this.inflight.length;
    const first = Math.min(Math.floor(offset / this.extentBytes), n - 1);
    const last = length > 0 ? Math.min(Math.floor((offset + length - 1) / this.extentBytes), n - 1) : first;
    for (let e = first; e <= last; e++) if (this.activeFlags[e] === 0) return false;
    return true;
  }

  /** The change begun at [offset, offset + length) is done (and marked in the bitmap). */
  end(offset: number, length: number): void {
    const n = this.inflight.length;
    const first = Math.min(Math.floor(offset / this.extentBytes), n - 1);
    const last = length > 0 ? Math.min(Math.floor((offset + length - 1) / this.extentBytes), n - 1) : first;
    for (let e = first; e <= last; e++) if (this.inflight[e]! > 0) this.inflight[e]!--;
  }

  /** Makes the stored bitmap current and empties the log (see the file comment); resolves when durable. */
  checkpoint(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const d = (this.checkpointWanted ??= deferred());
    this.kick();
    return d.promise;
  }

  /** Replaces the active set (and its flags). */
  private setActive(next: Set<number>): void {
    for (const e of this.active) this.activeFlags[e] = 0;
    this.active = next;
    for (const e of next) this.activeFlags[e] = 1;
  }

  /** Extents in the log now. */
  get activeExtents(): number {
    return this.active.size;
  }

  /** The counters as `ctl status` shows them per export (since the export was opened). */
  status(): ActivityLogStatus {
    return {
      extentBytes: this.extentBytes,
      capacity: this.capacity,
      activeExtents: this.active.size,
      extentsLogged: this.stats.extentsLogged,
      syncs: this.stats.slotWrites,
      checkpoints: this.stats.checkpoints,
      waits: this.stats.waits,
      failed: this.failure !== undefined,
    };
  }

  private kick(): void {
    if (this.running || this.closed) return;
    this.running = true;
    // One turn of the event loop: first writes that arrive together share the slot.
    setImmediate(() => void this.drive());
  }

  private async drive(): Promise<void> {
    try {
      while (!this.failure && (this.batch.size > 0 || this.checkpointWanted)) {
        const batch = this.batch;
        const waiters = this.next;
        const cp = this.checkpointWanted;
        this.batch = new Set();
        this.next = undefined;
        this.checkpointWanted = undefined;
        try {
          // The log grows by the batch's new extents while they fit in a slot.
          const added = cp ? [] : [...batch].filter((e) => this.activeFlags[e] === 0);
          if (!cp && this.active.size + added.length <= this.capacity) {
            // The buffer holds the slot last written, which names the active set (in its order):
            // only the new extents are added to it. Should it not (its count says), it is encoded whole.
            if (this.slotFile.readUInt32LE(16) === this.active.size) await this.writeSlot((seq) => extendSlot(this.slotFile, seq, added));
            else await this.writeSlot((seq) => encodeSlot(this.slotFile, seq, this.extentBytes, this.active, added));
            this.stats.extentsLogged += added.length;
            for (const e of added) {
              this.active.add(e);
              this.activeFlags[e] = 1;
            }
          } else {
            await this.checkpointNow(batch);
            this.stats.checkpoints++;
          }
          waiters?.resolve();
          cp?.resolve();
        } catch (e) {
          this.fail(e);
          waiters?.reject(this.failure);
          cp?.reject(this.failure);
        }
      }
      if (this.failure) {
        this.next?.reject(this.failure);
        this.checkpointWanted?.reject(this.failure);
        this.next = this.checkpointWanted = undefined;
      }
    } finally {
      this.running = false;
    }
  }

  private fail(e: unknown): void {
    if (this.failure) return;
    this.failure = new Error(`the activity log in ${this.folder.dir} cannot be written: ${(e as Error)?.message ?? e}`, { cause: e });
    this.opts.onError?.(this.failure);
  }

  /**
   * The snapshot as dirty.bitmap's bytes: bitmap ∪ extents with changes in
   * flight ∪ covered ranges, built in one file buffer kept for the purpose:
   * under random writes over a big disk the log checkpoints many times a
   * second, and a fresh bitmap-sized buffer (or three, before) each time kept
   * tens of MiB of garbage alive at 1 TiB. Reusing it is safe: checkpoints run
   * one at a time (`running`), and storeSync runs only when none is.
   */
  private encodeSnapshot(): Buffer {
    const { size, granularity } = this.bitmap;
    const count = DirtyBitmap.wordsFor(size, granularity);
    this.snapshotFile ??= bitmapFileBuffer(count);
    const fill = (words: Uint32Array) => {
      this.bitmap.copyWordsInto(words);
      const snap = new DirtyBitmap(size, granularity, words);
      for (let e = 0; e < this.inflight.length; e++) if (this.inflight[e]! > 0) snap.mark(e * this.extentBytes, this.extentBytes);
      for (const fn of this.covers) for (const [o, l] of fn()) snap.mark(o, l);
    };
    const version = this.slotFile.length > SLOT_UNIT ? BITMAP_VERSION_BIG_SLOTS : 1;
    return encodeBitmapWith(size, granularity, count, this.generation, fill, this.snapshotFile, version);
  }

  private async checkpointNow(batch: Set<number>): Promise<void> {
    this.setActive(new Set()); // step 1: every write from now on waits for a slot
    this.generation++;
    await this.folder.writeAtomicAsync(BITMAP_FILE, this.encodeSnapshot()); // steps 2 and 3
    for (const fn of this.beforeDrop) await fn(); // the checkpoints' bits, before the old slot goes
    // Step 4: the extents that asked (covered by the snapshot already: naming them spares their next writes a wait).
    const next = new Set<number>();
    for (const e of batch) if (next.size < this.capacity) next.add(e);
    for (const e of this.batch) if (next.size < this.capacity && this.inflight[e]! > 0) next.add(e);
    await this.writeSlot((seq) => encodeSlot(this.slotFile, seq, this.extentBytes, next));
    this.stats.extentsLogged += next.size;
    // Writes that asked during this checkpoint wait for the next slot, unless this one named their extents.
    for (const e of next) this.batch.delete(e);
    this.setActive(next);
    if (this.batch.size === 0 && this.next) {
      this.next.resolve();
      this.next = undefined;
    }
  }

  /** Writes the slot `encode` makes (given the next sequence number) into its place, and syncs it. */
  private async writeSlot(encode: (seq: number) => Buffer): Promise<void> {
    this.seq++;
    const buf = encode(this.seq);
    await write(this.fd, buf, 0, buf.length, (this.seq % 2) * buf.length);
    await fdatasync(this.fd);
    this.stats.slotWrites++;
  }

  /**
   * Startup and clean close: the exact bitmap stored, the log emptied, synchronously.
   * The file takes this log's size (two slots) only once the bitmap is stored: until
   * then the old log, read with its old slot size, is what a crash would recover.
   */
  private storeSync(): void {
    this.generation++;
    this.folder.writeAtomic(BITMAP_FILE, this.encodeSnapshot());
    this.seq++;
    const slot = this.slotFile.length;
    if (fs.fstatSync(this.fd).size !== 2 * slot) fs.ftruncateSync(this.fd, 2 * slot);
    fs.writeSync(this.fd, encodeSlot(this.slotFile, this.seq, this.extentBytes), 0, slot, (this.seq % 2) * slot);
    fs.fdatasyncSync(this.fd);
    this.setActive(new Set());
  }

  /** Clean close: waits for the slot being written, stores the exact bitmap, empties the log. */
  async close(): Promise<void> {
    if (this.closed) return;
    while (this.running) await new Promise((r) => setImmediate(r));
    this.closed = true;
    try {
      if (!this.failure) this.storeSync();
    } finally {
      fs.closeSync(this.fd);
    }
  }
}
