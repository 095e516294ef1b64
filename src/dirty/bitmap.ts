/**
 * Which blocks of an export have changed since they were last copied.
 * One bit per `granularity` bytes (64 KiB by default: 16 Mi bits for 1 TiB,
 * held in a Uint32Array of 2 MiB: exactly one bit per block, no per-word overhead).
 * Marks and clears are whole-range word operations; the copy engine walks
 * dirty runs by scanning 32-bit words, never bit by bit.
 */

export const DEFAULT_GRANULARITY = 64 * 1024;

export interface DirtyRun {
  /** First block of the run. */
  block: number;
  /** Blocks in the run. */
  count: number;
}

export class DirtyBitmap {
  readonly blocks: number;
  /** Bit i of word w is block w * 32 + i; bits past the last block stay 0. */
  private readonly words: Uint32Array;
  /** Counts clears (clearBlocks, clearAll): a persisted copy is stale once this moves. */
  clears = 0;

  /**
   * `storage`, when given, holds the words (wordsFor(size, granularity) of them,
   * all zero or a copy of another bitmap's): a snapshot built straight into a
   * file buffer, with no second copy.
   */
  constructor(
    readonly size: number,
    readonly granularity: number = DEFAULT_GRANULARITY,
    storage?: Uint32Array,
  ) {
    if (!Number.isInteger(granularity) || granularity < 512 || (granularity & (granularity - 1)) !== 0)
      throw new RangeError(`dirty granularity must be a power of two of at least 512 bytes, got ${granularity}`);
    this.blocks = Math.ceil(size / granularity);
    const n = DirtyBitmap.wordsFor(size, granularity);
    if (storage && storage.length !== n) throw new RangeError(`bitmap storage of ${storage.length} words for one of ${n}`);
    // Every word allocated now, so marking never allocates on the data path.
    this.words = storage ?? new Uint32Array(n);
  }

  /** How many 32-bit words a bitmap of `size` bytes at `granularity` holds. */
  static wordsFor(size: number, granularity: number): number {
    return Math.ceil(Math.ceil(size / granularity) / 32);
  }

  /** Sets or clears blocks [from, to] (inclusive, within the bitmap): whole words filled, the two edge words masked. */
  private setRange(from: number, to: number, value: 0 | 1): void {
    const w = this.words;
    const fw = from >>> 5;
    const lw = to >>> 5;
    // Masks as unsigned: bits from `from` up in the first word, up to `to` in the last.
    const fm = (~0 << (from & 31)) >>> 0;
    const lm = ~0 >>> (31 - (to & 31));
    if (fw === lw) {
      const m = fm & lm;
      w[fw] = value ? w[fw]! | m : w[fw]! & ~m;
      return;
    }
    if (value) {
      w[fw] = w[fw]! | fm;
      w.fill(0xffffffff, fw + 1, lw);
      w[lw] = w[lw]! | lm;
    } else {
      w[fw] = w[fw]! & ~fm;
      w.fill(0, fw + 1, lw);
      w[lw] = w[lw]! & ~lm;
    }
  }

  /** Marks every block touching [offset, offset + length). */
  mark(offset: number, length: number): void {
    if (length <= 0 || offset >= this.size) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(Math.ceil(Math.min(offset + length, this.size) / this.granularity), this.blocks) - 1;
    this.setRange(first, last, 1);
  }

  markAll(): void {
    if (this.blocks > 0) this.setRange(0, this.blocks - 1, 1);
  }

  /** Clears whole blocks [block, block + count). */
  clearBlocks(block: number, count: number): void {
    this.clears++;
    this.blockRange(block, count, 0);
  }

  markBlocks(block: number, count: number): void {
    this.blockRange(block, count, 1);
  }

  /** Blocks [block, block + count), clipped to the bitmap. */
  private blockRange(block: number, count: number, value: 0 | 1): void {
    const from = Math.max(0, block);
    const to = Math.min(block + count, this.blocks) - 1;
    if (to >= from) this.setRange(from, to, value);
  }

  clearAll(): void {
    this.clears++;
    if (this.blocks > 0) this.setRange(0, this.blocks - 1, 0);
  }

  /** A copy of the words (for persisting): bit i of word w is block w * 32 + i. */
  copyWords(): Uint32Array {
    return this.words.slice();
  }

  /** Copies the words into `target` (of exactly this bitmap's word count). */
  copyWordsInto(target: Uint32Array): void {
    if (target.length !== this.words.length) throw new RangeError(`bitmap of ${target.length} words for one of ${this.words.length}`);
    target.set(this.words);
  }

  /** Marks every block set in `words` (a copyWords() of a bitmap of the same size and granularity). */
  orWords(words: Uint32Array): void {
    if (words.length !== this.words.length) throw new RangeError(`bitmap of ${words.length} words for one of ${this.words.length}`);
    const w = this.words;
    for (let i = 0; i < w.length; i++) w[i] = w[i]! | words[i]!;
    // Bits past the last block stay 0.
    const tail = this.blocks & 31;
    if (tail !== 0 && w.length > 0) w[w.length - 1] = w[w.length - 1]! & (~0 >>> (32 - tail));
  }

  isDirty(block: number): boolean {
    if (block < 0 || block >= this.blocks) return false;
    return ((this.words[block >>> 5]! >>> (block & 31)) & 1) === 1;
  }

  /** The first dirty run at or after `fromBlock`, at most `maxCount` blocks long; undefined when clean. */
  nextRun(fromBlock: number, maxCount: number): DirtyRun | undefined {
    const start = this.scan(fromBlock, true);
    if (start < 0) return undefined;
    const limit = Math.min(this.blocks, start + maxCount);
    const end = this.scan(start, false, limit);
    return { block: start, count: (end < 0 ? limit : end) - start };
  }

  /** Dirty blocks: a popcount over the words. */
  dirtyBlocks(): number {
    const w = this.words;
    let n = 0;
    for (let i = 0; i < w.length; i++) {
      let v = w[i]!;
      if (v === 0) continue;
      v = v - ((v >>> 1) & 0x55555555);
      v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
      n += (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
    }
    return n;
  }

  /** Dirty bytes (the last block counts only to the end of the export). */
  dirtyBytes(): number {
    const n = this.dirtyBlocks();
    if (n === 0) return 0;
    const tail = this.size - (this.blocks - 1) * this.granularity;
    return n * this.granularity - (this.isDirty(this.blocks - 1) ? this.granularity - tail : 0);
  }

  /** Bytes the bitmap occupies: its words (2 MiB for a 1 TiB export at 64 KiB). */
  memoryBytes(): number {
    return this.words.byteLength;
  }

  /** Index of the first block at or after `from` (below `limit`) whose bit equals `want`, or -1. */
  private scan(from: number, want: boolean, limit = this.blocks): number {
    const data = this.words;
    let i = from;
    while (i < limit) {
      const wi = i >>> 5;
      let w = (data[wi] ?? 0) | 0;
      if (!want) w = ~w;
      w &= ~0 << (i & 31); // ignore bits below i in this word
      if (w !== 0) {
        const found = (wi << 5) + (31 - Math.clz32(w & -w));
        return found < limit ? found : -1;
      }
      i = (wi + 1) << 5;
    }
    return -1;
  }
}
