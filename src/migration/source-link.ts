/** The destination's connection to the post-copy source (what the fetch filter reads through). */
import { NbdClient } from '../client/nbd-client.js';
import { isConnectionLost } from '../client/errors.js';
import * as C from '../protocol/constants.js';
import { DeviceError, type Extent } from '../storage/device.js';
import type { FetchSource } from '../storage/filters/fetch.js';
import type { Logger } from '../util/log.js';
import { targetFacts } from './connector.js';
import { FETCH_CONTEXT_PREFIX, POSTCOPY_SUPPLIER_CONTEXT } from './postcopy-contexts.js';

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

/** How long close() lets fetches in flight finish. */
const CLOSE_WAIT_MS = 2000;

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
    // Fetches still unanswered after CLOSE_WAIT_MS are given up (a frozen source must not hold up a
    // shutdown): blocks not yet installed stay absent, and are fetched again after a restart.
    await c?.close(CLOSE_WAIT_MS).catch(() => c.destroy());
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
