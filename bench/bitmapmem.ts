/**
 * Mirror row "bitmap": what the dirty bitmap costs for a big disk. A sparse
 * file (a truncate: metadata only) of BENCH_BITMAP_SIZE (1 TiB) and one of
 * 1 GiB are each served by `nbd-migrate serve --admin-socket`; about a second
 * after "ready" the bench reads the export's `bitmapBytes` from the admin
 * socket's status and the server's VmRSS / VmHWM (peak) from /proc/PID/status.
 * The RSS difference between the two is what the big image really costs the
 * process, to set beside what the server says its bitmap takes.
 *
 * Then the same server is put under I/O: fio's nbd engine writes 4 KiB blocks
 * at random offsets over the whole export for IO_SEC seconds (QD16), so dirty
 * bits land all over the bitmap and the activity log keeps logging new
 * extents and storing snapshots; RSS and peak RSS are read again after it, with
 * the export's dirty bytes (what the writes marked).
 */
import { adminRequest } from '../test/helpers/admin.js';
import { makeImage, type ServerHandle } from '../test/helpers/server.js';
import type { BenchConfig } from './config.js';
import { runFio } from './fio.js';
import { benchPath } from './image.js';
import { jobByName } from './jobs.js';
import { adminSocketPath, MIRROR_EXPORT, MirrorBenchError, removeImageAndMarkers, startNbdMigrate, stopPair } from './mirrorjob.js';
import { Interrupted, processMemory, sleep } from './proc.js';

/** The small image the big one is compared with. */
export const BITMAP_SMALL_SIZE = 1024 ** 3;
/** Wait after "ready" before reading memory (start-up garbage collected, heap settled). */
const SETTLE_MS = 1000;
/** Seconds of random 4 KiB writes before the memory is read again. */
export const BITMAP_IO_SEC = 3;
const BITMAP_IO_DEPTH = 16;

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
  /** After BITMAP_IO_SEC s of random 4 KiB writes: RSS, peak RSS, write IOPS and the dirty bytes they marked. */
  io: { rssBytes: number; hwmBytes: number; writeIops: number; dirtyBytes: number };
}

export interface FailedBitmapSample extends BitmapSampleBase {
  ok: false;
  error: string;
}

export type BitmapSample = GoodBitmapSample | FailedBitmapSample;

export interface BitmapContext {
  cfg: BenchConfig;
  fio: string;
  stopRequested: () => boolean;
}

interface StatusAll {
  exports: Array<{ name: string; size: number; bitmapBytes: number; granularity: number; dirtyBytes: number }>;
}

export async function measureBitmap(ctx: BitmapContext, size: number, round: number): Promise<BitmapSample> {
  const { cfg } = ctx;
  const image = benchPath(`bitmap-${size}`);
  let server: ServerHandle | undefined;
  try {
    removeImageAndMarkers(image);
    await makeImage(image, size);
    const sock = adminSocketPath('bitmap');
    const t0 = performance.now();
    server = await startNbdMigrate(cfg.nbdMigrateBin, image, { adminSocket: sock });
    const readySec = (performance.now() - t0) / 1000;
    await sleep(SETTLE_MS);
    if (ctx.stopRequested()) throw new Interrupted();
    const exportStatus = async () => {
      const status = (await adminRequest(sock, { cmd: 'status' }, 10_000)) as StatusAll;
      const e = status.exports.find((x) => x.name === MIRROR_EXPORT) ?? status.exports[0];
      if (!e) throw new MirrorBenchError('status lists no export');
      return e;
    };
    const pid = server.proc.pid ?? -1;
    const memory = () => {
      const mem = processMemory(pid);
      if (!mem) throw new MirrorBenchError(`cannot read /proc/${pid}/status`);
      return mem;
    };
    const e = await exportStatus();
    const mem = memory();
    const fio = await runFio(ctx.fio, jobByName('randwrite'), server.uri(MIRROR_EXPORT), { runtimeSec: BITMAP_IO_SEC, rampSec: 0, iodepth: BITMAP_IO_DEPTH }, cfg.repoRoot);
    if (ctx.stopRequested()) throw new Interrupted();
    const after = await exportStatus();
    const ioMem = memory();
    return {
      round,
      size,
      ok: true,
      bitmapBytes: e.bitmapBytes,
      granularity: e.granularity,
      rssBytes: mem.rss,
      hwmBytes: mem.hwm,
      readySec,
      io: { rssBytes: ioMem.rss, hwmBytes: ioMem.hwm, writeIops: fio.iops, dirtyBytes: after.dirtyBytes },
    };
  } catch (e) {
    if (e instanceof Interrupted || ctx.stopRequested()) throw e;
    if (!(e instanceof Error)) throw e;
    return { round, size, ok: false, error: e.message };
  } finally {
    await stopPair(server, undefined);
    removeImageAndMarkers(image);
  }
}
