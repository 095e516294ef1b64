/**
 * The fetch filter (post-copy destination, xnbd's proxy idea): the local
 * image below it holds only the blocks marked present; every other block
 * still lives on the migration source and is fetched on first touch.
 *
 * - A read of absent blocks fetches them from the source, writes them into
 *   the local image, marks them present, then reads locally. Concurrent
 *   reads of one block share one fetch; blocks asked for in the same turn of
 *   the event loop are coalesced into runs (up to `maxFetchBytes`); a read
 *   that starts where the last one ended also fetches the next
 *   `readAheadBytes` (not waited for).
 * - A write goes to the local image and marks its blocks present; a block it
 *   covers only in part is fetched first, so no stale or zero bytes appear.
 *   WRITE_ZEROES likewise; TRIM marks the blocks it covers whole present.
 * - BLOCK_STATUS: the local map for present blocks, the source's for absent ones.
 * - A fetched block is installed under a range lock shared with guest
 *   changes, and only where it is still absent: data fetched before a guest
 *   write can never land over it.
 *
 * Present is never undone. The absent map is a DirtyBitmap (a set bit is an
 * absent block). Durability: `flush()` (and FUA) make the image durable and
 * then persist the map (`persist`), so the persisted map never claims a block
 * whose data is not on disk; the owner (migration/postcopy.ts) also persists
 * it now and then. Once nothing is absent, `detach()` drops the source and the
 * filter passes everything through.
 */
import type { DirtyBitmap } from '../../dirty/bitmap.js';
import { NBD_STATE_ZERO } from '../../protocol/constants.js';
import { BufferPool, isAllZero } from '../../util/buffers.js';
import { RangeLock } from '../../util/range-lock.js';
import { type Device, DeviceError, type Extent, type FileRange, type WriteOptions, type ZeroOptions } from '../device.js';
import { byteLength, Filter } from './filter.js';

/** Where absent blocks come from (migration/source-link.ts: the source connection, with its retries and timeout). */
export interface FetchSource {
  read(offset: number, length: number, into: Buffer, at: number): Promise<void>;
  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]>;
}

export type FetchKind = 'guest' | 'readahead' | 'fill';

export interface FetchOptions {
  /** Largest coalesced fetch (default 1 MiB). */
  maxFetchBytes?: number;
  /** Bytes fetched ahead of a sequential read (default 1 MiB; 0: none). */
  readAheadBytes?: number;
  /** Makes the image durable and then saves the absent map (flush, FUA). */
  persist?: () => Promise<void>;
  /** How much of the source's map the fill asks for at a time (default FILL_MAP_WINDOW, 64 MiB). */
  fillMapBytes?: number;
  /** Told after each run fetched and installed. */
  onFetched?: (kind: FetchKind, bytes: number, ms: number) => void;
  /** Told when blocks became present (the owner persists the map later, completes when none is absent). */
  onPresent?: () => void;
}

interface Pending {
  block: number;
  resolve: () => void;
  reject: (e: unknown) => void;
}

const EXTENT_BATCH = 1024;
/** How much of the source's map the fill asks for at a time, by default (fillData). */
const FILL_MAP_WINDOW = 64 * 1024 * 1024;

interface FillMapWindow {
  start: number;
  end: number;
  /** Data (not zero) ranges within [start, end). */
  data: Array<[number, number]>;
}
/**
 * Fetch buffers are reused (a fresh zeroed 2 MiB buffer per fill chunk was a
 * fifth of the fill's CPU with its garbage collection); runs up to this size
 * are pooled, larger ones allocated. A buffer goes back only after its data is
 * installed; after a failed read it is left to the GC (other reads of the run
 * may still be writing into it).
 */
const FETCH_BUFFER_BYTES = 2 * 1024 * 1024;
const FETCH_BUFFERS_KEPT = 8;

export class FetchFilter extends Filter {
  private source: FetchSource | undefined;
  private readonly locks = new RangeLock();
  /** Absent blocks being fetched: the promise every reader of the block waits on. */
  private readonly inflight = new Map<number, Promise<void>>();
  private pending: Pending[] = [];
  private pendingAhead: Pending[] = [];
  private scheduled = false;
  private lastReadEnd = -1;
  /** Guest reads waiting for fetches right now (the fill yields to them). */
  private waitingGuests = 0;
  private guestsIdle: Array<() => void> = [];
  private readonly maxFetchBlocks: number;
  private readonly readAheadBytes: number;
  private readonly buffers = new BufferPool(FETCH_BUFFER_BYTES, FETCH_BUFFERS_KEPT);
  /** The fill's kept window of the source's map, and the query for the next one (fillData). */
  private fillMap: FillMapWindow | undefined;
  private fillMapLoading: Promise<FillMapWindow> | undefined;
  /**
   * Pre-copy phase (the source is live and a mirror may be writing here): writes
   * never fetch, blocks they cover in part stay absent (the source's data wins
   * there later), and block status of absent blocks is the local image's.
   */
  precopy = false;
  /** Fetch counters: runs and bytes read from the source, by kind (fillHoleBytes: holes the fill zeroed without reading). */
  readonly counters = { guestRuns: 0, guestBytes: 0, readAheadRuns: 0, readAheadBytes: 0, fillRuns: 0, fillBytes: 0, fillHoleBytes: 0, sourceReads: 0 };

  constructor(
    local: Device,
    readonly absent: DirtyBitmap,
    source: FetchSource | undefined,
    private readonly o: FetchOptions = {},
    /** The fill's own way to the source (a second connection), so guest fetches never queue behind fill reads. */
    private readonly fillSource?: FetchSource,
  ) {
    super(local);
    if (absent.size !== local.size) throw new RangeError(`absent map covers ${absent.size} bytes, the image ${local.size}`);
    this.source = absent.dirtyBlocks() > 0 ? source : undefined;
    this.maxFetchBlocks = Math.max(1, Math.floor((o.maxFetchBytes ?? 1024 * 1024) / absent.granularity));
    this.readAheadBytes = o.readAheadBytes ?? 1024 * 1024;
  }

  get granularity(): number {
    return this.absent.granularity;
  }

  /** Still fetching from the source. */
  get attached(): boolean {
    return this.source !== undefined;
  }

  /** Nothing is absent any more (or never was): stop asking the source. */
  detach(): void {
    if (this.absent.dirtyBlocks() !== 0) throw new Error('detach with absent blocks left');
    this.source = undefined;
  }

  isPresent(block: number): boolean {
    return !this.absent.isDirty(block);
  }

  /** Guest reads are waiting on the source: the fill should hold back. */
  get guestsWaiting(): boolean {
    return this.waitingGuests > 0;
  }

  /** Resolves once no guest read waits on a fetch. */
  whenGuestsIdle(): Promise<void> {
    if (this.waitingGuests === 0) return Promise.resolve();
    return new Promise((r) => this.guestsIdle.push(r));
  }

  // ---- the Device calls

  override async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    if (this.source && length > 0) {
      const sequential = offset === this.lastReadEnd;
      this.lastReadEnd = offset + length;
      const [first, last] = this.blocksOf(offset, length);
      if (sequential && this.readAheadBytes > 0) {
        const [, aheadLast] = this.blocksOf(offset + length, Math.min(this.readAheadBytes, this.size - offset - length));
        // In batches: only once half the window is neither present nor asked for, so read-ahead goes out in large runs.
        if (offset + length < this.size && this.unrequested(last + 1, aheadLast) * 2 >= aheadLast - last)
          this.ensure(last + 1, aheadLast, 'readahead')?.catch(() => undefined);
      }
      const need = this.ensure(first, last, 'guest');
      if (need) {
        this.waitingGuests++;
        try {
          await need;
        } finally {
          if (--this.waitingGuests === 0) for (const r of this.guestsIdle.splice(0)) r();
        }
      }
    }
    return this.next.read(offset, length, into, at);
  }

  /** Once detached (every block present) reads pass straight through, so they may be sent from the image's file. */
  override fileRange(offset: number, length: number): FileRange | undefined {
    return this.source ? undefined : this.next.fileRange?.(offset, length);
  }

  override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.change(offset, byteLength(data), opts.fua, false, () => this.next.write(offset, data, opts));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.change(offset, length, opts.fua, false, () => this.next.zero(offset, length, opts));
  }

  override async trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    if (!this.source) return this.next.trim(offset, length, opts);
    // An absent block trimmed only in part keeps its source data there (TRIM's content is unspecified anyway).
    const g = this.granularity;
    let start = offset;
    let end = Math.min(offset + length, this.size);
    if (start % g !== 0 && !this.isPresent(Math.floor(start / g))) start = Math.ceil(start / g) * g;
    if (end % g !== 0 && end !== this.size && !this.isPresent(Math.floor(end / g))) end = Math.floor(end / g) * g;
    if (end <= start) return;
    return this.change(start, end - start, opts.fua, true, () => this.next.trim(start, end - start, opts));
  }

  override async flush(): Promise<void> {
    if (this.o.persist) return this.o.persist();
    return this.next.flush();
  }

  override async extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    const source = this.source;
    if (!source) return this.next.extents(offset, length, maxExtents);
    const end = Math.min(offset + length, this.size);
    const g = this.granularity;
    // The homogeneous run (all present or all absent) that starts at offset, answered by its side.
    const b = Math.floor(offset / g);
    const present = this.isPresent(b) || this.precopy;
    if (this.precopy) return this.next.extents(offset, end - offset, maxExtents);
    let e = b + 1;
    while (e * g < end && this.isPresent(e) === present) e++;
    const runEnd = Math.min(e * g, end);
    return (present ? this.next : source).extents(offset, runEnd - offset, maxExtents);
  }

  override async cache(offset: number, length: number): Promise<void> {
    if (this.source && length > 0) {
      const [first, last] = this.blocksOf(offset, length);
      await this.ensure(first, last, 'readahead');
    }
    return this.next.cache(offset, length);
  }

  // ---- the background fill (migration/postcopy-fill.ts)

  /**
   * Fetches the absent blocks of [block, block + count) that no one fetches
   * yet, by the source's allocation map: holes are not read over the wire
   * (they are zeroed locally); `beforeData` is awaited with the data bytes
   * about to be read (the fill's rate limit). Resolves when every block of
   * the range is present (waiting for fetches others started).
   */
  async fill(block: number, count: number, beforeData?: (bytes: number) => Promise<void>): Promise<void> {
    if (!this.source) return;
    const source = this.fillSource ?? this.source;
    const g = this.granularity;
    count = Math.min(count, this.absent.blocks - block);
    if (count <= 0) return;
    // 1. The source's map of the range and the rate limit for its data, before any block is claimed:
    //    a guest read meanwhile fetches its blocks itself, at once, never behind the limit.
    const offset = block * g;
    const end = Math.min((block + count) * g, this.size);
    let data: Array<[number, number]>;
    try {
      data = await this.fillData(source, offset, end);
    } catch (e) {
      this.fillMap = undefined;
      throw e;
    }
    const dataBytes = data.reduce((n, [, l]) => n + l, 0);
    if (dataBytes > 0) await beforeData?.(dataBytes);
    // 2. Claim what is still absent and not being fetched.
    const waits: Promise<void>[] = [];
    const mine: number[] = [];
    const settle: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
    for (let b = block; b < block + count; b++) {
      if (this.isPresent(b)) continue;
      const running = this.inflight.get(b);
      if (running) {
        waits.push(running);
        continue;
      }
      const p = new Promise<void>((resolve, reject) => settle.push({ resolve, reject }));
      p.catch(() => undefined);
      this.inflight.set(b, p);
      mine.push(b);
    }
    const done = (e?: unknown) => {
      for (const b of mine) this.inflight.delete(b);
      for (const s of settle) e === undefined ? s.resolve() : s.reject(e);
    };
    try {
      // 3. My blocks, in contiguous runs: only their data crosses the wire.
      for (let i = 0; i < mine.length; ) {
        let j = i + 1;
        while (j < mine.length && mine[j] === mine[j - 1]! + 1) j++;
        await this.fetchRun(source, mine[i]!, j - i, 'fill', data);
        i = j;
      }
      done();
    } catch (e) {
      done(e);
      throw e;
    }
    await Promise.all(waits);
  }

  // ---- internals

  /**
   * The data (not zero) ranges of the source in [offset, end), for fill(): from the
   * source's map, asked a FILL_MAP_WINDOW at a time and kept, instead of one BLOCK_STATUS
   * per fill chunk (512 of them for 1 GiB; each waited ~1 ms behind the chunks' data on
   * the same connection, a quarter of the fill's time). The map stays true while it is
   * kept: the source does not change under a destination that fetches from it (a
   * handed-over supplier is fenced read-only; any other source on the operator's word,
   * README Post-copy). The window is dropped after any failure, and asked again.
   */
  private async fillData(source: FetchSource, offset: number, end: number): Promise<Array<[number, number]>> {
    const out: Array<[number, number]> = [];
    for (let pos = offset; pos < end; ) {
      const w = await this.fillMapAt(source, pos);
      const stop = Math.min(end, w.end);
      for (const [a, n] of w.data) {
        const from = Math.max(a, pos);
        const to = Math.min(a + n, stop);
        if (to > from) out.push([from, to - from]);
      }
      pos = stop;
    }
    return out;
  }

  /** The kept window of the source's map holding `pos`, asked for when it is not (chunks of one window share its query). */
  private async fillMapAt(source: FetchSource, pos: number): Promise<FillMapWindow> {
    const holds = (w: FillMapWindow | undefined): w is FillMapWindow => w !== undefined && w.start <= pos && pos < w.end;
    if (holds(this.fillMap)) return this.fillMap;
    if (this.fillMapLoading) {
      const w = await this.fillMapLoading.catch(() => undefined);
      if (holds(w)) return w;
      if (holds(this.fillMap)) return this.fillMap;
    }
    return this.loadFillMap(source, pos);
  }

  private loadFillMap(source: FetchSource, start: number): Promise<FillMapWindow> {
    const p = (async () => {
      const want = Math.min(this.o.fillMapBytes ?? FILL_MAP_WINDOW, this.size - start);
      const extents = await source.extents(start, want, EXTENT_BATCH);
      if (extents.length === 0) throw new DeviceError('EIO', `the source returned no extents at ${start}`);
      const data: Array<[number, number]> = [];
      let pos = start;
      for (const e of extents) {
        const n = Math.min(e.length, start + want - pos);
        if (n <= 0) break;
        if (!(e.flags & NBD_STATE_ZERO)) data.push([pos, n]);
        pos += n;
      }
      const w = { start, end: pos, data };
      this.fillMap = w;
      return w;
    })();
    this.fillMapLoading = p;
    const done = () => void (this.fillMapLoading === p && (this.fillMapLoading = undefined));
    p.then(done, done);
    return p;
  }

  /** First and last block touching [offset, offset + length) (length > 0). */
  private blocksOf(offset: number, length: number): [number, number] {
    const g = this.granularity;
    return [Math.floor(offset / g), Math.floor((offset + Math.max(1, length) - 1) / g)];
  }

  /** Blocks of [first, last] absent and not being fetched. */
  private unrequested(first: number, last: number): number {
    let n = 0;
    for (let b = first; b <= Math.min(last, this.absent.blocks - 1); b++) if (!this.isPresent(b) && !this.inflight.has(b)) n++;
    return n;
  }

  /** Makes blocks [first, last] present; undefined when they already are. */
  private ensure(first: number, last: number, kind: 'guest' | 'readahead'): Promise<void> | undefined {
    const waits: Promise<void>[] = [];
    last = Math.min(last, this.absent.blocks - 1);
    for (let b = first; b <= last; b++) {
      if (this.isPresent(b)) continue;
      waits.push(this.inflight.get(b) ?? this.enqueue(b, kind));
    }
    if (waits.length === 0) return undefined;
    return Promise.all(waits).then(() => undefined);
  }

  private enqueue(block: number, kind: 'guest' | 'readahead'): Promise<void> {
    let entry!: Pending;
    const p = new Promise<void>((resolve, reject) => (entry = { block, resolve, reject }));
    p.catch(() => undefined);
    this.inflight.set(block, p);
    (kind === 'guest' ? this.pending : this.pendingAhead).push(entry);
    if (!this.scheduled) {
      this.scheduled = true;
      // Everything asked for in this turn goes out together, in runs.
      setImmediate(() => this.dispatch());
    }
    return p;
  }

  private dispatch(): void {
    this.scheduled = false;
    const source = this.source;
    for (const [list, kind] of [[this.pending, 'guest'], [this.pendingAhead, 'readahead']] as const) {
      if (list.length === 0) continue;
      list.sort((a, b) => a.block - b.block);
      for (let i = 0; i < list.length; ) {
        let j = i + 1;
        while (j < list.length && list[j]!.block === list[j - 1]!.block + 1 && j - i < this.maxFetchBlocks) j++;
        const run = list.slice(i, j);
        const settle = (e?: unknown) => {
          for (const p of run) {
            this.inflight.delete(p.block);
            e === undefined ? p.resolve() : p.reject(e);
          }
        };
        if (!source) settle();
        else this.fetchRun(source, run[0]!.block, run.length, kind).then(() => settle(), settle);
        i = j;
      }
    }
    this.pending = [];
    this.pendingAhead = [];
  }

  /** Fetches blocks [block, block + count) and installs them where still absent; `data`: read only these ranges (the rest is a hole). */
  private async fetchRun(source: FetchSource, block: number, count: number, kind: FetchKind, data?: ReadonlyArray<readonly [number, number]>): Promise<void> {
    const g = this.granularity;
    const offset = block * g;
    const length = Math.min(count * g, this.size - offset);
    const t0 = performance.now();
    let wire = length;
    if (data) {
      const ranges: Array<[number, number]> = [];
      wire = 0;
      for (const [pos, n] of data) {
        const a = Math.max(pos, offset);
        const b = Math.min(pos + n, offset + length);
        if (b <= a) continue;
        ranges.push([a, b - a]);
        wire += b - a;
      }
      if (wire === 0) {
        // All zero in the source's map: nothing to read, the image is zeroed there.
        await this.install(block, count, length, undefined);
      } else {
        const whole = this.buffers.get(length);
        const buf = whole.subarray(0, length);
        // What the source's map calls zero is not read: it must read as zeros here.
        if (wire < length) buf.fill(0);
        this.counters.sourceReads += ranges.length;
        await Promise.all(ranges.map(([a, n]) => source.read(a, n, buf, a - offset)));
        await this.install(block, count, length, buf);
        this.buffers.put(whole);
      }
    } else {
      const whole = this.buffers.get(length);
      const buf = whole.subarray(0, length);
      await source.read(offset, length, buf, 0);
      this.counters.sourceReads++;
      await this.install(block, count, length, buf);
      this.buffers.put(whole);
    }
    const c = this.counters;
    if (kind === 'guest') (c.guestRuns++, (c.guestBytes += length));
    else if (kind === 'readahead') (c.readAheadRuns++, (c.readAheadBytes += length));
    else (c.fillRuns++, (c.fillBytes += wire), (c.fillHoleBytes += length - wire));
    this.o.onFetched?.(kind, length, performance.now() - t0);
  }

  /**
   * Writes fetched data (`length` bytes from block `block`; no `buf`: all
   * zero) into the image where blocks are still absent, then marks them present.
   */
  private async install(block: number, count: number, length: number, buf: Buffer | undefined): Promise<void> {
    const g = this.granularity;
    const offset = block * g;
    const release = await this.locks.acquire(offset, length);
    try {
      for (let b = block; b < block + count; ) {
        if (this.isPresent(b)) {
          b++;
          continue;
        }
        let e = b + 1;
        while (e < block + count && !this.isPresent(e)) e++;
        const at = (b - block) * g;
        const end = Math.min((e - block) * g, length);
        const piece = buf?.subarray(at, end);
        if (!piece || isAllZero(piece)) await this.next.zero(offset + at, end - at, { fua: false, noHole: false, fast: false });
        else await this.next.write(offset + at, [piece], { fua: false });
        this.absent.clearBlocks(b, e - b);
        b = e;
      }
    } finally {
      release();
    }
    this.o.onPresent?.();
  }

  /**
   * A change (write, zero, trim) of [offset, offset + length): the blocks it
   * covers only in part are fetched first (not for trim, which the caller
   * aligned), then it runs under the lock and its blocks become present.
   */
  private async change(offset: number, length: number, fua: boolean, aligned: boolean, op: () => Promise<void>): Promise<void> {
    if (!this.source || length <= 0) return op();
    const g = this.granularity;
    const [first, last] = this.blocksOf(offset, length);
    const end = offset + length;
    if (this.precopy && !aligned) {
      // Only blocks covered whole become present; the rest keeps waiting for the source's final data.
      const release = await this.locks.acquire(first * g, (last + 1) * g - first * g);
      try {
        await op();
        const whole0 = Math.ceil(offset / g);
        const whole1 = end === this.size ? last + 1 : Math.floor(end / g);
        if (whole1 > whole0) this.absent.clearBlocks(whole0, whole1 - whole0);
      } finally {
        release();
      }
      this.o.onPresent?.();
      if (fua && this.o.persist) await this.o.persist();
      return;
    }
    if (!aligned) {
      const edges: Promise<void>[] = [];
      const head = offset % g !== 0 ? this.ensure(first, first, 'guest') : undefined;
      const tail = end % g !== 0 && end < this.size ? this.ensure(last, last, 'guest') : undefined;
      if (head) edges.push(head);
      if (tail) edges.push(tail);
      if (edges.length) await Promise.all(edges);
    }
    const release = await this.locks.acquire(first * g, (last + 1) * g - first * g);
    try {
      await op();
      // Covered whole, or present already (edges fetched above): present now.
      this.absent.clearBlocks(first, last - first + 1);
    } finally {
      release();
    }
    this.o.onPresent?.();
    if (fua && this.o.persist) await this.o.persist();
  }
}

