/**
 * The read cache (`--read-cache SIZE`): recently read blocks of a remote
 * device (the forwarding device after cutover, the post-copy handoff) kept in
 * memory, bounded in bytes (lru-cache with maxSize), so a guest whose disk is
 * across a WAN pays the round trip once per block, not once per read.
 *
 * A miss reads the whole blocks it touches (`blockBytes`, 64 KiB) and keeps
 * them. Every change (write, trim, zero) drops the blocks it touches before
 * and after it runs; a read that overlapped a change in flight, or began
 * before one finished, answers its caller but keeps nothing, so the cache
 * never holds data older than a completed write.
 */
import { LRUCache } from 'lru-cache';
import type { Device, WriteOptions, ZeroOptions } from '../device.js';
import { byteLength, Filter } from './filter.js';

export interface ReadCacheStats {
  hits: number;
  misses: number;
  bytes: number;
  maxBytes: number;
}

export class ReadCacheFilter extends Filter {
  private readonly lru: LRUCache<number, Buffer>;
  /** Changes completed so far, and those running now: a read that saw either move keeps nothing. */
  private changes = 0;
  private running = 0;
  hits = 0;
  misses = 0;

  constructor(
    next: Device,
    readonly maxBytes: number,
    readonly blockBytes = 64 * 1024,
  ) {
    super(next);
    this.lru = new LRUCache<number, Buffer>({ maxSize: Math.max(maxBytes, blockBytes), sizeCalculation: (b) => b.length });
  }

  get stats(): ReadCacheStats {
    return { hits: this.hits, misses: this.misses, bytes: this.lru.calculatedSize ?? 0, maxBytes: this.maxBytes };
  }

  override async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    if (length <= 0) return this.next.read(offset, length, into, at);
    const g = this.blockBytes;
    const first = Math.floor(offset / g);
    const last = Math.floor((offset + length - 1) / g);
    const blocks: Buffer[] = [];
    for (let b = first; b <= last; b++) {
      const hit = this.lru.get(b);
      if (!hit) break;
      blocks.push(hit);
    }
    if (blocks.length === last - first + 1) {
      this.hits++;
      copyOut(blocks, first * g, offset, length, into, at);
      return;
    }
    this.misses++;
    const seen = this.changes;
    const clean = this.running === 0;
    const start = first * g;
    const end = Math.min((last + 1) * g, this.size);
    const buf = Buffer.allocUnsafe(end - start);
    await this.next.read(start, end - start, buf, 0);
    buf.copy(into, at, offset - start, offset - start + length);
    if (!clean || this.running > 0 || this.changes !== seen) return;
    for (let b = first; b <= last; b++) this.lru.set(b, buf.subarray((b - first) * g, Math.min((b - first + 1) * g, buf.length)));
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.change(offset, byteLength(data), () => this.next.write(offset, data, opts));
  }

  override trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.change(offset, length, () => this.next.trim(offset, length, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.change(offset, length, () => this.next.zero(offset, length, opts));
  }

  private async change(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    this.running++;
    this.drop(offset, length);
    try {
      await op();
    } finally {
      this.drop(offset, length);
      this.running--;
      this.changes++;
    }
  }

  private drop(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.blockBytes;
    for (let b = Math.floor(offset / g); b <= Math.floor((offset + length - 1) / g); b++) this.lru.delete(b);
  }
}

/** Copies [offset, offset + length) out of consecutive cached blocks starting at byte `base`. */
function copyOut(blocks: Buffer[], base: number, offset: number, length: number, into: Buffer, at: number): void {
  let pos = offset;
  const end = offset + length;
  let i = 0;
  let blockStart = base;
  while (pos < end) {
    const b = blocks[i]!;
    const from = pos - blockStart;
    const n = Math.min(b.length - from, end - pos);
    b.copy(into, at + (pos - offset), from, from + n);
    pos += n;
    blockStart += b.length;
    i++;
  }
}
