/** The post-copy background fill: the copy engine turned round (remote to local, holes not read, under a rate limit, yielding to guest reads). */
import type { FetchFilter } from '../storage/filters/fetch.js';
import type { Logger } from '../util/log.js';
import type { TokenBucket } from '../util/token-bucket.js';

export interface FillOptions {
  /** Bytes a fill read asks at most (default 2 MiB). */
  chunkBytes?: number;
  /** Fill reads in flight at most (default 4). */
  inflight?: number;
  /** The destination was closed: stop. */
  stopped: () => boolean;
  /** The rate limit as it is now (ctl set-speed changes it); undefined: unlimited. */
  limiter: () => TokenBucket | undefined;
  log: Logger;
}

/** Every absent block, in chunks, holes not read; guest reads go first. */
export async function fillAbsent(filter: FetchFilter, o: FillOptions): Promise<void> {
  const chunkBlocks = Math.max(1, Math.floor((o.chunkBytes ?? 2 * 1024 * 1024) / filter.granularity));
  const maxInflight = o.inflight ?? 4;
  const inflight = new Set<Promise<void>>();
  const t0 = performance.now();
  let cursor = 0;
  let failures = 0;
  o.log.info('fill-start', { absentBytes: filter.absent.dirtyBytes(), maxBandwidth: o.limiter()?.rate ?? null });
  while (!o.stopped() && filter.attached) {
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
      .fill(run.block, run.count, (n) => o.limiter()?.take(n, o.stopped) ?? Promise.resolve())
      .then(
        () => void (failures = 0),
        async (e) => {
          if (o.stopped()) return;
          failures++;
          o.log.warn('fill-chunk-failed', { offset: run!.block * filter.granularity, cause: e, effect: 'tried again later' });
          await new Promise((r) => setTimeout(r, Math.min(200 * failures, 5000)));
        },
      );
    const tracked = p.finally(() => inflight.delete(tracked));
    inflight.add(tracked);
    if (inflight.size >= maxInflight) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  if (!o.stopped()) {
    const secs = (performance.now() - t0) / 1000;
    o.log.info('fill-done', { seconds: Math.round(secs * 1000) / 1000, fillBytes: filter.counters.fillBytes, rate: Math.round(filter.counters.fillBytes / Math.max(secs, 0.001)) });
  }
}
