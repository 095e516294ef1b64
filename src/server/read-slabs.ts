/**
 * Receive slabs: a plain TCP or Unix connection reads straight into large,
 * reused buffers (net.Socket's `onread`) instead of one fresh 64 KiB buffer per
 * read. One read syscall takes all the socket has (up to what is left of the
 * slab), so a 1 MiB WRITE arrives in one or two pieces, and the kernel sends
 * fewer window updates; no buffer is allocated per read, so there is nothing
 * for the GC to collect.
 *
 * A slab is handed out region by region: each read lands after the previous
 * one. The data stays where it landed while anything references it (a header
 * being parsed, a WRITE payload being written: the ByteQueue and the session
 * hold references, see util/byte-queue.ts); once a slab is used up and its last
 * reference is dropped it goes back to a small process-wide free list.
 */
import type { ChunkOwner } from '../util/byte-queue.js';

/** One slab; a connection reads into at most one at a time. */
export const SLAB_BYTES = 2 * 1024 * 1024;
/** A slab with less room than this left is retired, and the next read goes into a fresh one. */
const MIN_READ = 128 * 1024;
/** Free slabs kept for reuse, process-wide (the rest go to the GC). */
const MAX_FREE = 8;

const free: Slab[] = [];

export class Slab implements ChunkOwner {
  /** The reader's own reference while the slab is current, plus one per chunk or payload slice out. */
  private refs = 1;
  constructor(readonly buf: Buffer) {}

  ref(): void {
    this.refs++;
  }

  unref(): void {
    if (--this.refs === 0 && free.length < MAX_FREE) {
      this.refs = 1;
      free.push(this);
    }
  }
}

function takeSlab(): Slab {
  return free.pop() ?? new Slab(Buffer.allocUnsafeSlow(SLAB_BYTES));
}

/** Where one connection's next read goes. */
export class SlabReader {
  private slab: Slab | undefined = takeSlab();
  private pos = 0;

  /** The slab the last region came from: the owner of the bytes just read. */
  get current(): Slab {
    return this.slab!;
  }

  /** The region for the next read: the rest of the current slab, or a fresh slab. */
  next(): Buffer {
    if (!this.slab || SLAB_BYTES - this.pos < MIN_READ) {
      this.slab?.unref();
      this.slab = takeSlab();
      this.pos = 0;
    }
    return this.slab.buf.subarray(this.pos);
  }

  /** `n` bytes landed at the start of the region last returned. */
  advance(n: number): void {
    this.pos += n;
  }

  /** The connection is gone: the current slab is given up (once its chunks are released too). */
  release(): void {
    this.slab?.unref();
    this.slab = undefined;
  }
}
