// An in-memory Device (src/storage/device.ts) for tests: the bytes in 64 KiB
// pieces (allocated on first write) and an allocation map of 4 KiB pages, so
// base:allocation has holes and data to report the way a sparse file does (a
// page is a hole until written; TRIM and WRITE_ZEROES without NO_HOLE punch
// the pages they cover whole).
//
// It behaves like FileDevice where the protocol can see it: the same
// capabilities (read-only devices refuse every change with EROFS), extents
// clipped to the device and never empty. Hooks let a test slow it down
// (`delay`, awaited before every operation: interleavings) or make it fail
// (`fail`, asked before every operation: a DeviceError to throw, or nothing).

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../src/protocol/constants.js';
import { type Capabilities, type Device, DeviceError, type Extent, type WriteOptions, type ZeroOptions } from '../../src/storage/device.js';

export const PAGE = 4096;
/** Bytes are stored in pieces this large (fewer, larger allocations than one per page). */
const PIECE = 64 * 1024;

export type DeviceOp = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'extents' | 'cache';

export interface MemoryDeviceOptions {
  readOnly?: boolean;
  /** Awaited before every operation (e.g. a random number of event-loop turns). */
  delay?: (op: DeviceOp, offset: number, length: number) => Promise<void> | undefined;
  /** Asked before every operation (after `delay`): an error to fail it with. */
  fail?: (op: DeviceOp, offset: number, length: number) => Error | undefined;
}

export class MemoryDevice implements Device {
  /** The bytes, one Buffer per 64 KiB piece; undefined reads as zeros (so zeroing and trimming cost no memory traffic). */
  private readonly pieces: Array<Buffer | undefined>;
  /** 1 where the page holds data, 0 where it is a hole (base:allocation). */
  readonly allocated: Uint8Array;
  /** Operations done, by kind (what reached the device, failed or not). */
  readonly ops: Record<DeviceOp, number> = { read: 0, write: 0, flush: 0, trim: 0, zero: 0, extents: 0, cache: 0 };
  /** Bytes changed through write/trim/zero (a read-only device must keep this at 0). */
  modified = 0;
  closed = false;

  constructor(
    readonly size: number,
    private readonly opts: MemoryDeviceOptions = {},
  ) {
    this.pieces = new Array<Buffer | undefined>(Math.ceil(size / PIECE));
    this.allocated = new Uint8Array(Math.ceil(size / PAGE));
  }

  /** A device holding `content` (every page that is not all zeros allocated). */
  static from(content: Buffer, opts: MemoryDeviceOptions = {}): MemoryDevice {
    const d = new MemoryDevice(content.length, opts);
    for (let p = 0; p < d.allocated.length; p++) {
      const s = content.subarray(p * PAGE, Math.min(d.size, (p + 1) * PAGE));
      if (s.some((b) => b !== 0)) {
        d.piece(Math.floor((p * PAGE) / PIECE)).set(s, (p * PAGE) % PIECE);
        d.allocated[p] = 1;
      }
    }
    return d;
  }

  /** A copy of the whole content. */
  snapshot(): Buffer {
    const out = Buffer.alloc(this.size);
    this.copyOut(0, this.size, out, 0);
    return out;
  }

  /** Bytes [offset, offset + length) as a new Buffer (no operation counted, no hooks). */
  peek(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    this.copyOut(offset, length, out, 0);
    return out;
  }

  capabilities(): Capabilities {
    const w = !this.opts.readOnly;
    return { canWrite: w, canFlush: true, canFua: w, canTrim: w, canZero: w, canFastZero: w, canExtents: true, canCache: true, canMultiConn: true };
  }

  private async enter(op: DeviceOp, offset: number, length: number): Promise<void> {
    this.ops[op]++;
    const d = this.opts.delay?.(op, offset, length);
    if (d) await d;
    if (this.closed) throw new DeviceError('EBADF', 'device is closed');
    const e = this.opts.fail?.(op, offset, length);
    if (e) throw e;
    if (offset < 0 || length < 0 || offset + length > this.size) throw new DeviceError('EINVAL', `range ${offset}+${length} outside the ${this.size}-byte device`);
    if (this.opts.readOnly && (op === 'write' || op === 'trim' || op === 'zero')) throw new DeviceError('EROFS', 'read-only device');
  }

  async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    await this.enter('read', offset, length);
    this.copyOut(offset, length, into, at);
  }

  async write(offset: number, data: readonly Buffer[], _opts: WriteOptions): Promise<void> {
    let length = 0;
    for (const b of data) length += b.length;
    await this.enter('write', offset, length);
    let pos = offset;
    for (const b of data) {
      for (let done = 0; done < b.length; ) {
        const p = Math.floor(pos / PIECE);
        const inPiece = pos - p * PIECE;
        const n = Math.min(PIECE - inPiece, b.length - done);
        b.copy(this.piece(p), inPiece, done, done + n);
        done += n;
        pos += n;
      }
    }
    this.allocate(offset, length);
    this.modified += length;
  }

  async flush(): Promise<void> {
    await this.enter('flush', 0, 0);
  }

  async trim(offset: number, length: number, _opts: WriteOptions): Promise<void> {
    await this.enter('trim', offset, length);
    // Like a punched hole: whole pages become holes; partial pages read as zeros in the range.
    this.clear(offset, length);
    this.punch(offset, length);
    this.modified += length;
  }

  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    await this.enter('zero', offset, length);
    this.clear(offset, length);
    if (opts.noHole) this.allocate(offset, length);
    else this.punch(offset, length);
    this.modified += length;
  }

  async extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    await this.enter('extents', offset, Math.max(0, Math.min(length, this.size - offset)));
    const end = Math.min(offset + length, this.size);
    const out: Extent[] = [];
    let pos = offset;
    while (pos < end && out.length < Math.max(1, maxExtents)) {
      const a = this.allocated[Math.floor(pos / PAGE)]!;
      let next = (Math.floor(pos / PAGE) + 1) * PAGE;
      while (next < end && this.allocated[next / PAGE] === a) next += PAGE;
      next = Math.min(next, end);
      out.push({ length: next - pos, flags: a ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO });
      pos = next;
    }
    if (out.length === 0) out.push({ length: end - offset, flags: 0 });
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.enter('cache', offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** Pages the allocation map calls holes hold no bytes (a consistency check for tests). */
  holesAreZero(): boolean {
    for (let p = 0; p < this.allocated.length; p++) {
      if (this.allocated[p]) continue;
      const b = this.pieces[Math.floor((p * PAGE) / PIECE)];
      const at = (p * PAGE) % PIECE;
      if (b && b.subarray(at, at + PAGE).some((x) => x !== 0)) return false;
    }
    return true;
  }

  private piece(p: number): Buffer {
    let b = this.pieces[p];
    if (!b) {
      b = Buffer.alloc(Math.min(PIECE, this.size - p * PIECE));
      this.pieces[p] = b;
    }
    return b;
  }

  private copyOut(offset: number, length: number, into: Buffer, at: number): void {
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const p = Math.floor(pos / PIECE);
      const inPiece = pos - p * PIECE;
      const n = Math.min(PIECE - inPiece, length - done);
      const b = this.pieces[p];
      if (b) b.copy(into, at + done, inPiece, inPiece + n);
      else into.fill(0, at + done, at + done + n);
      done += n;
    }
  }

  /** Reads as zeros from now on: whole pieces are dropped, partial ones zeroed. */
  private clear(offset: number, length: number): void {
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const p = Math.floor(pos / PIECE);
      const inPiece = pos - p * PIECE;
      const n = Math.min(PIECE - inPiece, length - done);
      const b = this.pieces[p];
      if (b) {
        if (n === b.length) this.pieces[p] = undefined;
        else b.fill(0, inPiece, inPiece + n);
      }
      done += n;
    }
  }

  private allocate(offset: number, length: number): void {
    if (length <= 0) return;
    this.allocated.fill(1, Math.floor(offset / PAGE), Math.ceil((offset + length) / PAGE));
  }

  private punch(offset: number, length: number): void {
    // Whole pages inside the range; the last page of the device counts as whole up to the end.
    const first = Math.ceil(offset / PAGE);
    const end = offset + length >= this.size ? this.allocated.length : Math.floor((offset + length) / PAGE);
    if (end > first) this.allocated.fill(0, first, end);
  }
}
