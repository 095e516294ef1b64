/**
 * Post-copy, destination side (`serve dst.img --fetch-from nbd://SOURCE/vm1`):
 * the export is served at once, over a fetch filter (storage/filters/fetch.ts)
 * that pulls absent blocks from the source on demand, while a background fill
 * copies the rest (the copy engine turned round: remote to local, holes not
 * read, under a rate limit, yielding to guest reads). When nothing is absent
 * the destination detaches from the source and records completion.
 *
 * State, in the export's state folder (default IMAGE.nbd-migrate.d/):
 * - postcopy.json: the source's URI and identity, since, completedAt;
 * - present-map: the absent blocks, written atomically (tmp, fsync, rename,
 *   fsync the folder) only after the image itself was made durable, so it
 *   never claims a block present whose data could still be lost.
 * A restart continues from the map; a completed destination serves as a
 * normal export and never asks the source again.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../client/nbd-client.js';
import { isConnectionLost } from '../client/errors.js';
import { DirtyBitmap } from '../dirty/bitmap.js';
import { StateFolder } from '../dirty/state.js';
import * as C from '../protocol/constants.js';
import { type Capabilities, type Device, DeviceError, type Extent } from '../storage/device.js';
import type { ExportExtension, ExtraCommand, MetaContext } from '../server/export.js';
import { Filter } from '../storage/filters/filter.js';
import type { Stack } from '../storage/stack.js';
import { clearFenced, writeFenced } from './markers.js';
import { ReconnectingDevice } from './reconnecting-device.js';
import { FetchFilter, type FetchKind, type FetchSource } from '../storage/filters/fetch.js';
import { type Logger, logger } from '../util/log.js';
import { TokenBucket } from '../util/token-bucket.js';
import { targetFacts } from './connector.js';

/** Selected by a destination's fetcher: `nbd-migrate:fetch:<destination export id>` (a post-copy supplier admits only it). */
export const FETCH_CONTEXT_PREFIX = 'nbd-migrate:fetch:';
/** Listed by a destination still filling (`serve --fetch-from`): what `ctl postcopy` on the source checks. */
export const POSTCOPY_DESTINATION_CONTEXT = 'nbd-migrate:postcopy-destination';
/** Listed by a source export handed over (`ctl postcopy`): read-only, and only the destination's fetcher attaches. */
export const POSTCOPY_SUPPLIER_CONTEXT = 'nbd-migrate:postcopy-supplier';
/**
 * On a supplier handed over from a mirror (`ctl mirror --converge postcopy`):
 * block status 1 for every block the pre-copy had not brought over yet (or
 * that changed after it did). The destination marks those absent again before
 * it serves anything, then asks block status of POSTCOPY_APPLIED_CONTEXT,
 * which tells the source it may move its guests.
 */
export const POSTCOPY_DIRTY_CONTEXT = 'nbd-migrate:postcopy-dirty';
export const POSTCOPY_APPLIED_CONTEXT = 'nbd-migrate:postcopy-applied';

/** A context that only names something: block status says 0 for all of it. */
const flat = (name: string, id: number): MetaContext => ({ id, name, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });

// ------------------------------------------------------------------ state

export interface PostcopyState {
  export: string;
  source: string;
  /** The source export's identity at the first connection (null: a server that has none, qemu-nbd, nbdkit). */
  sourceExportId: string | null;
  /** This destination's export identity (kept across restarts). */
  exportId: string;
  size: number;
  granularity: number;
  since: string;
  /** The supplier's dirty list (hybrid) was applied: never again (later guest writes would be undone). */
  dirtyAppliedAt?: string;
  completedAt?: string;
}

/** The state folder when none is named (an image file's: beside it; serve passes the export's, as src/dirty/state.ts places it). */
export const defaultStateDir = (image: string): string => `${path.resolve(image)}.nbd-migrate.d`;

const MAGIC = Buffer.from('NBDMABS1');

/** The post-copy files of one export, in its state folder (src/dirty/state.ts: every write atomic and durable). */
export class PostcopyStore {
  private opened: StateFolder | undefined;
  constructor(readonly dir: string) {}

  /** The folder, created on first write (a check that only reads creates nothing). */
  private get folder(): StateFolder {
    return (this.opened ??= StateFolder.open(this.dir));
  }

  private read(name: string): Buffer | undefined {
    if (!this.opened && !fs.existsSync(this.dir)) return undefined;
    return this.folder.read(name);
  }

  readState(): PostcopyState | undefined {
    const b = this.read(STATE_FILE);
    if (!b) return undefined;
    try {
      return JSON.parse(b.toString('utf8')) as PostcopyState;
    } catch (e) {
      throw new Error(`${path.join(this.dir, STATE_FILE)} is unreadable (${(e as Error).message}); the destination's post-copy state cannot be trusted`, { cause: e });
    }
  }

  writeState(s: PostcopyState): void {
    this.folder.writeAtomic(STATE_FILE, JSON.stringify(s) + '\n');
  }

  /** Sets `absent` from the saved map; false when there is none (everything is absent then). */
  loadAbsent(absent: DirtyBitmap): boolean {
    const buf = this.read(MAP_FILE);
    if (!buf) return false;
    if (buf.length < 32 || !buf.subarray(0, 8).equals(MAGIC) || (buf.length - 8) % 8 !== 0)
      throw new Error(`${path.join(this.dir, MAP_FILE)} is not a present-map`);
    const f = new Float64Array(buf.buffer.slice(buf.byteOffset + 8, buf.byteOffset + buf.length));
    const [size, granularity, runs] = [f[0]!, f[1]!, f[2]!];
    if (size !== absent.size || granularity !== absent.granularity || f.length !== 3 + 2 * runs)
      throw new Error(`${path.join(this.dir, MAP_FILE)} is for ${size} bytes at ${granularity} per block, not ${absent.size} at ${absent.granularity}`);
    absent.clearAll();
    for (let i = 0; i < runs; i++) absent.markBlocks(f[3 + 2 * i]!, f[4 + 2 * i]!);
    return true;
  }

  /** The map as it is now (absent runs), to save after the image is durable. */
  static snapshot(absent: DirtyBitmap): Buffer {
    const runs: number[] = [];
    for (let b = 0; ; ) {
      const r = absent.nextRun(b, absent.blocks);
      if (!r) break;
      runs.push(r.block, r.count);
      b = r.block + r.count;
    }
    const f = new Float64Array(3 + runs.length);
    f[0] = absent.size;
    f[1] = absent.granularity;
    f[2] = runs.length / 2;
    f.set(runs, 3);
    return Buffer.concat([MAGIC, Buffer.from(f.buffer)]);
  }

  saveMap(snapshot: Buffer): Promise<void> {
    return this.folder.writeAtomicAsync(MAP_FILE, snapshot);
  }
}

const STATE_FILE = 'postcopy.json';
const MAP_FILE = 'present-map';


/**
 * Why an export may not be served as configured (undefined: it may): a
 * half-filled post-copy destination served without --fetch-from would show
 * zeros where the source still holds the data.
 */
export function postcopyRefusal(e: { name: string; path: string; fetchFrom?: string; incoming?: boolean; readOnly: boolean }, force: boolean, stateDir = defaultStateDir(e.path)): string | undefined {
  if (e.fetchFrom && e.incoming) return `export "${e.name}": --fetch-from and --incoming exclude each other (post-copy pulls, pre-copy is pushed)`;
  if (e.fetchFrom && e.readOnly) return `export "${e.name}": --fetch-from needs a writable image (fetched blocks are written into it)`;
  if (e.fetchFrom || force) return undefined;
  let st: PostcopyState | undefined;
  try {
    st = new PostcopyStore(stateDir).readState();
  } catch (err) {
    return `export "${e.name}": ${(err as Error).message}`;
  }
  if (st && !st.completedAt)
    return (
      `export "${e.name}": ${e.path} is a post-copy destination still filling from ${st.source}; ` +
      `serve it with --fetch-from ${st.source} to go on (without it the blocks not yet fetched would read as zeros), or --force`
    );
  return undefined;
}

// ------------------------------------------------------------------ the source

export interface SourceLinkOptions {
  uri: string;
  size: number;
  /** A fetch that finds no working source for this long fails with EIO (--fetch-timeout). */
  timeoutMs: number;
  /** A source connection that answers nothing for this long is dropped and reconnected. */
  requestTimeoutMs: number;
  /** The source's identity as first seen (undefined: not known yet). */
  exportId: string | null | undefined;
  /** The source's identity was seen for the first time. */
  onIdentity(exportId: string | null): void;
  /** This destination's identity: the fetcher selects `nbd-migrate:fetch:<it>`. */
  destExportId: string;
  /** The source is a live nbd-migrate export that has not handed over yet (a pre-copy may be writing here). */
  onLiveSource?(): void;
  /** A supplier (its listing): the dirty list, if it offers one, is applied once, before any connection serves anything. */
  onSupplier?(listed: readonly string[]): Promise<void>;
  log: Logger;
}

/**
 * The connection to the source, re-established when it drops. A fetch that
 * fails waits and retries with backoff (the guest sees latency, not an
 * error), and fails with EIO only once no attempt succeeded for `timeoutMs`.
 * A source that is no longer the same disk (another identity or size) fails
 * at once: the destination must never mix two disks.
 */
export class SourceLink implements FetchSource {
  private conn: NbdClient | undefined;
  private connecting: Promise<NbdClient> | undefined;
  private closed = false;
  connected = false;
  lastError: string | null = null;
  retries = 0;
  private exportId: string | null | undefined;
  private waitingLogged = false;

  constructor(private readonly o: SourceLinkOptions) {
    this.exportId = o.exportId;
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.op(`read ${length} bytes at ${offset}`, (c) => c.read(offset, length, into, at));
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.op(`block status at ${offset}`, (c) => c.extents(offset, length, maxExtents));
  }

  async close(): Promise<void> {
    this.closed = true;
    const c = this.conn;
    this.conn = undefined;
    this.connected = false;
    await c?.close().catch(() => c.destroy());
  }

  private async op<T>(what: string, fn: (c: NbdClient) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.o.timeoutMs;
    for (let attempt = 1; ; attempt++) {
      if (this.closed) throw new DeviceError('ESHUTDOWN', `the source ${this.o.uri} was detached`);
      let c: NbdClient | undefined;
      try {
        c = await this.get();
        const r = await fn(c);
        if (attempt > 1) this.o.log.info('fetch-recovered', { source: this.o.uri, what, attempts: attempt });
        return r;
      } catch (e) {
        if (e instanceof DeviceError && e.code === 'EIDENTITY') throw new DeviceError('EIO', e.message, { cause: e });
        if (this.closed) throw new DeviceError('ESHUTDOWN', `the source ${this.o.uri} was detached`, { cause: e });
        this.lastError = (e as Error)?.message ?? String(e);
        if (c && (c.closed || isConnectionLost(e))) this.drop(c);
        const left = deadline - Date.now();
        if (left <= 0) {
          this.o.log.error('fetch-failed', {
            source: this.o.uri,
            what,
            attempts: attempt,
            timeoutMs: this.o.timeoutMs,
            cause: e,
            effect: 'the guest gets EIO for this request (--fetch-timeout); later requests try the source again',
          });
          throw new DeviceError('EIO', `the source ${this.o.uri} did not answer within ${this.o.timeoutMs} ms (--fetch-timeout): ${this.lastError}`, { cause: e });
        }
        this.retries++;
        if (attempt === 1 || attempt % 10 === 0)
          this.o.log.warn('fetch-retry', { source: this.o.uri, what, attempt, cause: e, leftMs: left, effect: 'the request waits; it fails with EIO only after --fetch-timeout' });
        // Waiting for a hand-over: ask often, the source holds its guests until this destination attaches.
        const backoff = (e as { code?: string }).code === 'EAGAIN' ? 100 : Math.min(50 * 2 ** Math.min(attempt - 1, 6), 2000);
        await new Promise((r) => setTimeout(r, Math.min(backoff, left)));
      }
    }
  }

  private drop(c: NbdClient): void {
    if (this.conn !== c) return;
    this.conn = undefined;
    this.connected = false;
    c.destroy();
    this.o.log.warn('source-connection-lost', { source: this.o.uri, cause: this.lastError, effect: 'fetches wait and reconnect' });
  }

  private get(): Promise<NbdClient> {
    if (this.conn && !this.conn.closed) return Promise.resolve(this.conn);
    if (this.conn) this.drop(this.conn);
    this.connecting ??= this.connect().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async connect(): Promise<NbdClient> {
    const c = await NbdClient.connect(this.o.uri, {
      metaContexts: [C.BASE_ALLOCATION, FETCH_CONTEXT_PREFIX + this.o.destExportId],
      listMetaContexts: [C.MIGRATE_NAMESPACE],
      requestTimeoutMs: this.o.requestTimeoutMs,
      connectTimeoutMs: Math.min(10_000, this.o.timeoutMs),
    });
    const id = targetFacts(c.listedContexts).exportId ?? null;
    // A live nbd-migrate export that has not been handed over may still change under its guests: wait for `ctl postcopy`.
    if (id !== null && !c.readOnly && !c.listedContexts.includes(POSTCOPY_SUPPLIER_CONTEXT)) {
      c.destroy();
      this.o.onLiveSource?.();
      if (!this.waitingLogged) this.o.log.warn('source-not-handed-over', { source: this.o.uri, effect: 'fetches wait; run `nbd-migrate ctl postcopy` on the source (it holds its guests, fences its image and supplies this destination)' });
      this.waitingLogged = true;
      throw new DeviceError('EAGAIN', `the source ${this.o.uri} is a live export that has not been handed over yet (ctl postcopy on the source)`);
    }
    const unfit = (msg: string) => {
      c.destroy();
      this.o.log.error('source-refused', { source: this.o.uri, cause: msg });
      return new DeviceError('EIDENTITY', msg);
    };
    if (c.size !== this.o.size) throw unfit(`the source ${this.o.uri} is ${c.size} bytes, this image ${this.o.size}: not the same disk`);
    if (this.exportId === undefined) {
      this.exportId = id;
      this.o.onIdentity(id);
    } else if (this.exportId !== id) {
      // A plain export gets a new identity each time its server starts, so a changed one is not proof of another disk (the size is checked).
      this.o.log.warn('source-identity-changed', {
        source: this.o.uri,
        was: this.exportId,
        now: id,
        effect: 'fetching goes on (a restarted source server names its export anew); make sure the URI still names the same disk',
      });
      this.exportId = id;
      this.o.onIdentity(id);
    }
    if (this.closed) {
      c.destroy();
      throw new DeviceError('ESHUTDOWN', 'detached');
    }
    if (this.o.onSupplier && c.listedContexts.includes(POSTCOPY_SUPPLIER_CONTEXT)) {
      try {
        await this.o.onSupplier(c.listedContexts);
      } catch (e) {
        c.destroy();
        throw e;
      }
    }
    this.conn = c;
    this.connected = true;
    this.o.log.info('source-connected', { source: this.o.uri, exportId: id, size: c.size, structuredReplies: c.structuredReplies });
    return c;
  }
}

// ------------------------------------------------------------------ the destination

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

  /** Every absent block, in chunks, holes not read; guest reads go first. */
  private async fill(): Promise<void> {
    const filter = this.filter!;
    const chunkBlocks = Math.max(1, Math.floor((this.o.fillChunkBytes ?? 2 * 1024 * 1024) / filter.granularity));
    const maxInflight = this.o.fillInflight ?? 4;
    const inflight = new Set<Promise<void>>();
    const t0 = performance.now();
    let cursor = 0;
    let failures = 0;
    this.log.info('fill-start', { absentBytes: filter.absent.dirtyBytes(), maxBandwidth: this.limiter?.rate ?? null });
    while (!this.stopped && filter.attached) {
      if (filter.guestsWaiting) await filter.whenGuestsIdle();
      let run = filter.absent.nextRun(cursor, chunkBlocks);
      if (!run && cursor > 0) {
        // Wrapped round: what is left is in flight or came back after a failure.
        if (inflight.size > 0) {
          await Promise.race(inflight);
          continue;
        }
        cursor = 0;
        run = filter.absent.nextRun(0, chunkBlocks);
      }
      if (!run) break;
      cursor = run.block + run.count;
      const p = filter
        .fill(run.block, run.count, (n) => this.limiter?.take(n, () => this.stopped) ?? Promise.resolve())
        .then(
          () => void (failures = 0),
          async (e) => {
            if (this.stopped) return;
            failures++;
            this.log.warn('fill-chunk-failed', { offset: run!.block * filter.granularity, cause: e, effect: 'tried again later' });
            await new Promise((r) => setTimeout(r, Math.min(200 * failures, 5000)));
          },
        );
      const tracked = p.finally(() => inflight.delete(tracked));
      inflight.add(tracked);
      if (inflight.size >= maxInflight) await Promise.race(inflight);
    }
    await Promise.all(inflight);
    if (!this.stopped) {
      const secs = (performance.now() - t0) / 1000;
      this.log.info('fill-done', { seconds: Math.round(secs * 1000) / 1000, fillBytes: filter.counters.fillBytes, rate: Math.round(filter.counters.fillBytes / Math.max(secs, 0.001)) });
    }
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

// ------------------------------------------------------------------ the source side (ctl postcopy)

/** The handed-over image as the supplier serves it: reads only. */
class ReadOnlyFilter extends Filter {
  override capabilities(): Capabilities {
    return { ...this.next.capabilities(), canWrite: false, canTrim: false, canZero: false, canFastZero: false, canFua: false };
  }
  override async write(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
  override async trim(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
  override async zero(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
}

/** The handed-over export for new connections: only the destination's fetcher attaches. */
export class SupplierExtension implements ExportExtension {
  readonly commands: ReadonlyMap<number, ExtraCommand> = new Map();
  private appliedResolve: (() => void) | undefined;
  /** Resolves once the destination has applied the dirty list (asked block status of POSTCOPY_APPLIED_CONTEXT). */
  readonly applied: Promise<void>;
  constructor(
    readonly exportName: string,
    readonly destination: string,
    readonly destExportId: string,
    /** The blocks the destination must not trust (hybrid: the mirror's dirty bitmap, frozen under the hold). */
    private readonly dirty?: DirtyBitmap,
  ) {
    this.applied = new Promise((r) => (this.appliedResolve = r));
  }
  contexts(): MetaContext[] {
    const all = [flat(POSTCOPY_SUPPLIER_CONTEXT, 41)];
    const dirty = this.dirty;
    if (dirty) {
      all.push({
        id: 43,
        name: POSTCOPY_DIRTY_CONTEXT,
        extents: async (o, l, max) => {
          const out: Extent[] = [];
          const g = dirty.granularity;
          let pos = o;
          const end = Math.min(o + l, dirty.size);
          while (pos < end && out.length < max) {
            const b = Math.floor(pos / g);
            const d = dirty.isDirty(b);
            let e = b + 1;
            while (e * g < end && dirty.isDirty(e) === d) e++;
            const n = Math.min(e * g, end) - pos;
            out.push({ length: n, flags: d ? 1 : 0 });
            pos += n;
          }
          return out;
        },
      });
    }
    // Always: the destination may have taken writes without fetching while the source was live (precopy), and must stop first.
    all.push({ id: 44, name: POSTCOPY_APPLIED_CONTEXT, extents: async (_o, l) => (this.appliedResolve?.(), [{ length: l, flags: 0 }]) });
    return all;
  }
  matchSet(query: string): MetaContext | undefined {
    return query === FETCH_CONTEXT_PREFIX + this.destExportId ? flat(query, 42) : undefined;
  }
  admission(contexts: readonly MetaContext[]): string | undefined {
    if (contexts.some((c) => c.name === FETCH_CONTEXT_PREFIX + this.destExportId)) return undefined;
    return `export "${this.exportName}" was handed over to ${this.destination} (post-copy): only that destination's fetcher may attach here; attach guests to the destination`;
  }
  attached(_contexts: readonly MetaContext[], peer: string): void {
    logger({ export: this.exportName, component: 'postcopy' }).info('supplier-attached', { peer, destination: this.destination });
  }
}

export interface HandOverContext {
  name: string;
  image: string;
  exportId: string;
  stack: Stack;
  destination: string;
  handoff: 'forward' | 'disconnect';
  /** New connections to the export's name get `device` under `extension` from now on; connected guests keep theirs. */
  replaceExport(device: Device, extension: ExportExtension): void;
  /** Undoes replaceExport (a hand-over that failed). */
  restoreExport(): void;
  /** Hybrid: the mirror's dirty bitmap; the destination applies it before the guests move (bounded by appliedTimeoutMs). */
  dirty?: DirtyBitmap;
  appliedTimeoutMs?: number;
  disconnectClients(): void | Promise<void>;
  wrapRemote?: (remote: Device) => Device;
}

export interface HandOverResult {
  export: string;
  destination: string;
  destinationExportId: string;
  handoff: 'forward' | 'disconnect';
  pauseMs: number;
}

/**
 * `ctl postcopy EXPORT nbd://DEST/NAME`: the source hands its export over to a
 * post-copy destination. The destination is checked first (it must list
 * nbd-migrate:postcopy-destination and be the same size); then guest changes
 * are held, the image flushed and fenced (a restart refuses to serve it
 * read-write), the export turned into a read-only supplier that admits only
 * the destination's fetcher (`nbd-migrate:fetch:<its export id>`), and the
 * guests moved: forwarded to the destination, or disconnected.
 */
export async function handOver(ctx: HandOverContext): Promise<HandOverResult> {
  const log = logger({ export: ctx.name, destination: ctx.destination, component: 'postcopy' });
  const refuse = (code: string, msg: string) => new DeviceError(code, msg);
  let c: NbdClient;
  try {
    c = await NbdClient.connect(ctx.destination, { listMetaContexts: [C.MIGRATE_NAMESPACE], connectTimeoutMs: 10_000, requestTimeoutMs: 30_000 });
  } catch (e) {
    throw refuse('EUNREACHABLE', `destination ${ctx.destination} is unreachable: ${(e as Error).message}`);
  }
  const facts = targetFacts(c.listedContexts);
  try {
    if (!c.listedContexts.includes(POSTCOPY_DESTINATION_CONTEXT) || !facts.exportId)
      throw refuse('EINVAL', `destination ${ctx.destination} is not a post-copy destination (it lists ${c.listedContexts.join(', ') || 'nothing of nbd-migrate'}): serve the destination image there with --fetch-from nbd://THIS-HOST/${ctx.name}`);
    if (facts.exportId === ctx.exportId) throw refuse('ESELF', `destination ${ctx.destination} is export "${ctx.name}" itself`);
    if (c.size !== ctx.stack.local.size) throw refuse('ETOOSMALL', `destination ${ctx.destination} is ${c.size} bytes, the export ${ctx.stack.local.size}`);
    if (c.readOnly) throw refuse('EROFS', `destination ${ctx.destination} is read-only`);
  } catch (e) {
    c.destroy();
    throw e;
  }
  const stack = ctx.stack;
  const t0 = performance.now();
  let fenced = false;
  let replaced = false;
  try {
    await stack.gate.hold();
    stack.writeThrough.setWriteThrough(undefined);
    await stack.local.flush();
    writeFenced(ctx.image, { export: ctx.name, target: ctx.destination, time: new Date().toISOString() });
    fenced = true;
    const supplier = new SupplierExtension(ctx.name, ctx.destination, facts.exportId!, ctx.dirty);
    ctx.replaceExport(new ReadOnlyFilter(stack.local), supplier);
    replaced = true;
    {
      // Guests move only once the destination has attached (and no longer trusts the blocks a pre-copy left dirty).
      const limit = ctx.appliedTimeoutMs ?? 30_000;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        supplier.applied,
        new Promise<never>((_r, reject) => (timer = setTimeout(() => reject(new DeviceError('ETIMEDOUT', `destination ${ctx.destination} did not take the dirty list within ${limit} ms`)), limit))),
      ]).finally(() => clearTimeout(timer));
      log.info('postcopy-destination-attached', { dirtyBytes: ctx.dirty?.dirtyBytes() ?? null });
    }
    const forward = new ReconnectingDevice(c, () => NbdClient.connect(ctx.destination, { requestTimeoutMs: 30_000 }), ctx.destination);
    stack.switch.swap(ctx.wrapRemote?.(forward) ?? forward);
    stack.throttle.setRate(undefined);
  } catch (e) {
    c.destroy();
    if (replaced) ctx.restoreExport();
    if (fenced) clearFenced(ctx.image);
    log.error('postcopy-handover-failed', { cause: e, effect: 'guests stay on the local image' });
    throw e;
  } finally {
    stack.gate.release();
  }
  const pauseMs = Math.round((performance.now() - t0) * 100) / 100;
  log.info('postcopy-handover', { destinationExportId: facts.exportId, handoff: ctx.handoff, pauseMs, effect: 'the image is fenced; only the destination fetches from it' });
  if (ctx.handoff === 'disconnect') await ctx.disconnectClients();
  return { export: ctx.name, destination: ctx.destination, destinationExportId: facts.exportId!, handoff: ctx.handoff, pauseMs };
}
