/**
 * Post-copy, destination side (`serve dst.img --fetch-from nbd://SOURCE/vm1`):
 * the export is served at once, over a fetch filter (storage/filters/fetch.ts)
 * that pulls absent blocks from the source on demand, while a background fill
 * copies the rest (the copy engine turned round: remote to local, holes not
 * read, under a rate limit, yielding to guest reads). When nothing is absent
 * the destination detaches from the source and records completion.
 *
 * Here: the destination controller. Its state (postcopy.json, present-map)
 * is postcopy-store.ts, its source connection source-link.ts, the fill
 * postcopy-fill.ts; the source's side (`ctl postcopy`) postcopy-handover.ts.
 */
import { EventEmitter } from 'node:events';
import { NbdClient } from '../client/nbd-client.js';
import { DirtyBitmap } from '../dirty/bitmap.js';
import type { Device } from '../storage/device.js';
import type { MetaContext } from '../server/export.js';
import { FetchFilter, type FetchKind } from '../storage/filters/fetch.js';
import { type Logger, logger } from '../util/log.js';
import { TokenBucket } from '../util/token-bucket.js';
import { FETCH_CONTEXT_PREFIX, flat, POSTCOPY_APPLIED_CONTEXT, POSTCOPY_DESTINATION_CONTEXT, POSTCOPY_DIRTY_CONTEXT } from './postcopy-contexts.js';
import { fillAbsent } from './postcopy-fill.js';
import { defaultStateDir, type PostcopyState, PostcopyStore } from './postcopy-store.js';
import { SourceLink, type SourceLinkOptions } from './source-link.js';

export interface PostcopyOptions {
  exportName: string;
  image: string;
  source: string;
  local: Device;
  stateDir?: string;
  granularity: number;
  /** This export's identity (a restart keeps the saved one). */
  exportId: string;
  fetchTimeoutMs: number;
  requestTimeoutMs?: number;
  /** Fill rate limit (bytes/s); undefined: unlimited. */
  maxBandwidth?: number;
  /** Start the background fill (default true). */
  fill?: boolean;
  fillChunkBytes?: number;
  fillInflight?: number;
  /** How often the map is saved while blocks arrive (default 1 s). */
  persistIntervalMs?: number;
}

export type PostcopyPhase = 'filling' | 'completed';

export interface PostcopyStatus {
  export: string;
  role: 'postcopy-destination';
  source: string;
  state: PostcopyPhase;
  size: number;
  granularity: number;
  presentBytes: number;
  absentBytes: number;
  /** Bytes per second made present (guest fetches, read-ahead, fill, holes zeroed), last seconds: what the ETA uses. */
  rate: number;
  /** Bytes per second read from the source (what --max-bandwidth limits, plus guest fetches), last seconds. */
  sourceRate: number;
  etaSeconds: number | null;
  maxBandwidth: number | null;
  sourceConnected: boolean;
  sourceRetries: number;
  lastError: string | null;
  fetched: FetchFilter['counters'];
  since: string;
  completedAt: string | null;
}

export class PostcopyDestination extends EventEmitter {
  /** The export's local device: the fetch filter over the image (the image itself once complete). */
  readonly device: Device;
  readonly filter: FetchFilter | undefined;
  readonly exportId: string;
  private readonly store: PostcopyStore;
  private state: PostcopyState;
  private readonly link: SourceLink | undefined;
  private readonly fillLink: SourceLink | undefined;
  private readonly log: Logger;
  private limiter: TokenBucket | undefined;
  private stopped = false;
  private fillDone: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private changed = false;
  private persistChain: Promise<void> = Promise.resolve();
  private persistWaiting: Promise<void> | undefined;
  private completing: Promise<void> | undefined;
  private readonly samples: Array<{ t: number; bytes: number; wire: number }> = [];
  private sampler: NodeJS.Timeout | undefined;

  constructor(private readonly o: PostcopyOptions) {
    super();
    this.log = logger({ export: o.exportName, source: o.source, component: 'postcopy' });
    this.store = new PostcopyStore(o.stateDir ?? defaultStateDir(o.image));
    const saved = this.store.readState();
    if (saved && saved.source !== o.source)
      this.log.warn('postcopy-source-changed', { was: saved.source, now: o.source, effect: 'the new URI is used; it must be the same disk (its identity is checked)' });
    this.state = saved
      ? { ...saved, source: o.source }
      : { export: o.exportName, source: o.source, sourceExportId: null, exportId: o.exportId, size: o.local.size, granularity: o.granularity, since: new Date().toISOString() };
    this.exportId = this.state.exportId;
    if (o.maxBandwidth) this.limiter = new TokenBucket(o.maxBandwidth);
    if (this.state.completedAt) {
      this.device = o.local;
      this.log.info('postcopy-already-complete', { image: o.image, completedAt: this.state.completedAt, effect: 'served as a normal export; the source is not asked' });
      return;
    }
    const absent = new DirtyBitmap(o.local.size, saved?.granularity ?? o.granularity);
    const resumed = this.store.loadAbsent(absent);
    if (!resumed) absent.markAll();
    if (!saved) this.store.writeState(this.state);
    let knownId: string | null | undefined = saved && saved.sourceExportId !== undefined && resumed ? saved.sourceExportId : undefined;
    if (saved && !resumed && saved.sourceExportId) knownId = saved.sourceExportId;
    const linkOptions: SourceLinkOptions = {
      uri: o.source,
      size: o.local.size,
      timeoutMs: o.fetchTimeoutMs,
      requestTimeoutMs: o.requestTimeoutMs ?? Math.min(30_000, o.fetchTimeoutMs),
      exportId: knownId,
      onIdentity: (id) => {
        this.state = { ...this.state, sourceExportId: id };
        this.store.writeState(this.state);
      },
      destExportId: this.exportId,
      onLiveSource: () => {
        if (this.filter && !this.state.dirtyAppliedAt && !this.filter.precopy) {
          this.filter.precopy = true;
          this.log.info('postcopy-precopy-phase', { effect: 'writes are taken without fetching (a pre-copy may be writing here); blocks they cover in part stay absent' });
        }
      },
      onSupplier: (listed) => this.onSupplier(listed),
      log: this.log,
    };
    // Two connections: guest fetches never queue behind the fill's large reads.
    this.link = new SourceLink(linkOptions);
    this.fillLink = new SourceLink({ ...linkOptions, onIdentity: () => undefined });
    this.filter = new FetchFilter(
      o.local,
      absent,
      this.link,
      {
        persist: () => this.persist(),
        onPresent: () => this.onPresent(),
        onFetched: (kind, bytes, ms) => this.onFetched(kind, bytes, ms),
      },
      this.fillLink,
    );
    this.device = this.filter;
    this.log.info('postcopy-start', {
      image: o.image,
      resumed,
      absentBytes: absent.dirtyBytes(),
      presentBytes: o.local.size - absent.dirtyBytes(),
      granularity: absent.granularity,
      fetchTimeoutMs: o.fetchTimeoutMs,
      maxBandwidth: o.maxBandwidth ?? null,
    });
  }

  /** Starts the background fill and the periodic save of the map. */
  start(): void {
    if (!this.filter) return;
    this.timer = setInterval(() => {
      if (this.changed) this.persist().catch((e) => this.log.error('present-map-save-failed', { cause: e, effect: 'retried at the next interval' }));
    }, this.o.persistIntervalMs ?? 1000);
    this.timer.unref();
    this.sampler = setInterval(() => this.sample(), 250);
    this.sampler.unref();
    if (this.filter.absent.dirtyBlocks() === 0) void this.complete();
    else if (this.o.fill !== false) this.fillDone = this.fill();
  }

  get completed(): boolean {
    return this.state.completedAt !== undefined;
  }

  /** Contexts the export lists: it is a post-copy destination until completed. */
  contexts(): MetaContext[] {
    return this.completed ? [] : [flat(POSTCOPY_DESTINATION_CONTEXT, 40)];
  }

  status(): PostcopyStatus {
    const absent = this.filter && !this.completed ? this.filter.absent.dirtyBytes() : 0;
    const rate = this.rate();
    return {
      export: this.o.exportName,
      role: 'postcopy-destination',
      source: this.o.source,
      state: this.completed ? 'completed' : 'filling',
      size: this.o.local.size,
      granularity: this.filter?.granularity ?? this.o.granularity,
      presentBytes: this.o.local.size - absent,
      absentBytes: absent,
      rate: Math.round(rate),
      sourceRate: Math.round(this.rate(true)),
      etaSeconds: !this.completed && rate > 0 ? Math.round((absent / rate) * 10) / 10 : this.completed ? 0 : null,
      maxBandwidth: this.limiter?.rate ?? null,
      sourceConnected: this.link?.connected ?? false,
      sourceRetries: (this.link?.retries ?? 0) + (this.fillLink?.retries ?? 0),
      lastError: this.link?.lastError ?? null,
      fetched: { ...(this.filter?.counters ?? { guestRuns: 0, guestBytes: 0, readAheadRuns: 0, readAheadBytes: 0, fillRuns: 0, fillBytes: 0, fillHoleBytes: 0, sourceReads: 0 }) },
      since: this.state.since,
      completedAt: this.state.completedAt ?? null,
    };
  }

  setSpeed(bytesPerSecond: number | undefined): void {
    if (!bytesPerSecond) this.limiter = undefined;
    else if (this.limiter) this.limiter.setRate(bytesPerSecond);
    else this.limiter = new TokenBucket(bytesPerSecond);
    this.log.info('postcopy-speed', { maxBandwidth: bytesPerSecond ?? null });
  }

  /** Resolves when completed (for tests and callers that wait). */
  whenCompleted(): Promise<void> {
    if (this.completed) return Promise.resolve();
    return new Promise((r) => this.once('completed', () => r()));
  }

  /** Stops the fill, saves the map and lets the source go. */
  async close(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.sampler) clearInterval(this.sampler);
    await this.link?.close();
    await this.fillLink?.close();
    await this.fillDone?.catch(() => undefined);
    await this.completing?.catch(() => undefined);
    if (this.filter && !this.completed) await this.persist().catch((e) => this.log.error('present-map-save-failed', { cause: e }));
  }

  // ---- internals

  private applying: Promise<void> | undefined;

  /**
   * The first supplier connection: its dirty list (if it offers one) marks
   * blocks absent again, once; then the source is told, and moves its guests.
   * Each of the two steps has a connection of its own selecting only its
   * context: BLOCK_STATUS answers for every selected context, so a fetch
   * connection selecting the "applied" one would say so before it is true.
   */
  private onSupplier(listed: readonly string[]): Promise<void> {
    const filter = this.filter!;
    const fetchCtx = FETCH_CONTEXT_PREFIX + this.exportId;
    const open = (ctx: string) => NbdClient.connect(this.o.source, { metaContexts: [fetchCtx, ctx], connectTimeoutMs: 10_000, requestTimeoutMs: 30_000 });
    const run = async () => {
      if (!this.state.dirtyAppliedAt && listed.includes(POSTCOPY_DIRTY_CONTEXT)) {
        const c = await open(POSTCOPY_DIRTY_CONTEXT);
        let marked = 0;
        try {
          for (let pos = 0; pos < c.size; ) {
            const ext = await c.contextExtents(POSTCOPY_DIRTY_CONTEXT, pos, c.size - pos, 4096);
            if (ext.length === 0) break;
            for (const e of ext) {
              if (e.flags & 1) {
                filter.absent.mark(pos, e.length);
                marked += e.length;
              }
              pos += e.length;
            }
          }
        } finally {
          await c.close().catch(() => c.destroy());
        }
        await this.persist();
        this.log.info('postcopy-dirty-applied', { markedAbsentBytes: marked, absentBytes: filter.absent.dirtyBytes() });
      }
      if (!this.state.dirtyAppliedAt) {
        this.state = { ...this.state, dirtyAppliedAt: new Date().toISOString() };
        this.store.writeState(this.state);
      }
      filter.precopy = false;
      if (listed.includes(POSTCOPY_APPLIED_CONTEXT)) {
        const c = await open(POSTCOPY_APPLIED_CONTEXT);
        try {
          await c.contextExtents(POSTCOPY_APPLIED_CONTEXT, 0, Math.min(c.size, 4096), 1);
        } finally {
          await c.close().catch(() => c.destroy());
        }
      }
      this.onPresent();
    };
    this.applying ??= run().catch((e) => {
      this.applying = undefined;
      throw e;
    });
    return this.applying;
  }

  /** Image durable first, then the map as it was before: never a block claimed present before its data is on disk. */
  persist(): Promise<void> {
    if (this.persistWaiting) return this.persistWaiting;
    const p = this.persistChain.then(async () => {
      this.persistWaiting = undefined;
      const filter = this.filter!;
      this.changed = false;
      const snap = PostcopyStore.snapshot(filter.absent);
      await this.o.local.flush();
      await this.store.saveMap(snap);
    });
    this.persistWaiting = p;
    this.persistChain = p.catch(() => undefined);
    return p;
  }

  private onPresent(): void {
    this.changed = true;
    // Never during a pre-copy: the source is live, and its dirty list may make blocks absent again.
    if (this.filter!.absent.dirtyBlocks() === 0 && !this.completed && !this.filter!.precopy) void this.complete();
  }

  private onFetched(kind: FetchKind, bytes: number, ms: number): void {
    if (kind !== 'fill') this.log.debug('fetched', { kind, bytes, ms: Math.round(ms * 100) / 100 });
  }

  private brought(wire = false): number {
    const c = this.filter?.counters;
    return c ? c.guestBytes + c.readAheadBytes + c.fillBytes + (wire ? 0 : c.fillHoleBytes) : 0;
  }

  private sample(): void {
    this.samples.push({ t: performance.now(), bytes: this.brought(), wire: this.brought(true) });
    while (this.samples.length > 20) this.samples.shift();
  }

  private rate(wire = false): number {
    if (this.samples.length < 2) return 0;
    const a = this.samples[0]!;
    const secs = (performance.now() - a.t) / 1000;
    return secs > 0 ? (this.brought(wire) - (wire ? a.wire : a.bytes)) / secs : 0;
  }

  private fill(): Promise<void> {
    return fillAbsent(this.filter!, {
      chunkBytes: this.o.fillChunkBytes,
      inflight: this.o.fillInflight,
      stopped: () => this.stopped,
      limiter: () => this.limiter,
      log: this.log,
    });
  }

  private complete(): Promise<void> {
    this.completing ??= (async () => {
      try {
        await this.persist();
        this.state = { ...this.state, completedAt: new Date().toISOString() };
        this.store.writeState(this.state);
        this.filter!.detach();
        await this.link?.close();
        await this.fillLink?.close();
        if (this.timer) clearInterval(this.timer);
        this.log.info('postcopy-completed', { image: this.o.image, completedAt: this.state.completedAt, fetched: this.filter!.counters, effect: 'detached from the source; it may be stopped' });
        this.emit('completed');
      } catch (e) {
        this.completing = undefined;
        this.log.error('postcopy-complete-failed', { cause: e, effect: 'retried when the next block arrives' });
      }
    })();
    return this.completing;
  }
}
