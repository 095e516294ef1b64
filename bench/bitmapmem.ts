/**
 * Mirror row "bitmap": what the dirty bitmap costs for a big disk. A sparse
 * file (a truncate: metadata only) of BENCH_BITMAP_SIZE (1 TiB) and one of
 * 1 GiB are each served by `nbd-migrate serve --admin-socket`; about a second
 * after "ready" the bench reads the export's `bitmapBytes` from the admin
 * socket's status and the server's VmRSS / VmHWM (peak) from /proc/PID/status.
 * The RSS difference between the two is what the big image really costs the
 * process, to set beside what the server says its bitmap takes.
 */
import type { BenchConfig } from './config.js';
import { adminRequest } from '../src/admin/server.js';
import { adminSocketPath, processMemory, startNbdMigrate, type NbdMigrateServer } from './daemon.js';
import { benchPath, createSparseFile } from './image.js';
import { MIRROR_EXPORT, MirrorBenchError, removeImageAndMarkers, stopPair } from './mirrorjob.js';
import { Interrupted, sleep } from './proc.js';

/** The small image the big one is compared with. */
export const BITMAP_SMALL_SIZE = 1024 ** 3;
/** Wait after "ready" before reading memory (start-up garbage collected, heap settled). */
const SETTLE_MS = 1000;

interface BitmapSampleBase {
  round: number;
  size: number;
}

export interface GoodBitmapSample extends BitmapSampleBase {
  ok: true;
  bitmapBytes: number;
  granularity: number;
  rssBytes: number;
  hwmBytes: number;
  /** Spawn to the "ready" log line. */
  readySec: number;
}

export interface FailedBitmapSample extends BitmapSampleBase {
  ok: false;
  error: string;
}

export type BitmapSample = GoodBitmapSample | FailedBitmapSample;

export interface BitmapContext {
  cfg: BenchConfig;
  stopRequested: () => boolean;
}

interface StatusAll {
  exports: Array<{ name: string; size: number; bitmapBytes: number; granularity: number }>;
}

export async function measureBitmap(ctx: BitmapContext, size: number, round: number): Promise<BitmapSample> {
  const { cfg } = ctx;
  const image = benchPath(`bitmap-${size}`);
  let server: NbdMigrateServer | undefined;
  try {
    removeImageAndMarkers(image);
    createSparseFile(image, size);
    const sock = adminSocketPath('bitmap');
    const t0 = performance.now();
    server = await startNbdMigrate({ bin: cfg.nbdMigrateBin, repoRoot: cfg.repoRoot, image, name: MIRROR_EXPORT, adminSocket: sock, label: 'nbd-migrate serve' });
    const readySec = (performance.now() - t0) / 1000;
    await sleep(SETTLE_MS);
    if (ctx.stopRequested()) throw new Interrupted();
    const status = (await adminRequest(sock, { cmd: 'status' }, 10_000)) as StatusAll;
    const e = status.exports.find((x) => x.name === MIRROR_EXPORT) ?? status.exports[0];
    if (!e) throw new MirrorBenchError('status lists no export');
    const mem = processMemory(server.daemon.pid);
    if (!mem) throw new MirrorBenchError(`cannot read /proc/${server.daemon.pid}/status`);
    return { round, size, ok: true, bitmapBytes: e.bitmapBytes, granularity: e.granularity, rssBytes: mem.rss, hwmBytes: mem.hwm, readySec };
  } catch (e) {
    if (e instanceof Interrupted || ctx.stopRequested()) throw e;
    if (!(e instanceof Error)) throw e;
    return { round, size, ok: false, error: e.message };
  } finally {
    await stopPair(server?.daemon, undefined);
    removeImageAndMarkers(image);
  }
}
