/**
 * Suite "disk" (real hosts): the fio rows with the image on a disk file system
 * instead of tmpfs, where the bench's other rows hide what a disk costs
 * (fdatasync is free on tmpfs, its writes never refuse RWF_NOWAIT, nothing is
 * read from a device). A random-filled file of BENCH_DISK_SIZE (4 GiB) in
 * BENCH_DISK_DIR (/var/tmp; refused if that is tmpfs or ramfs) is served by
 * nbd-migrate (`serve FILE` as an operator runs it: activity log on, its state
 * folder on the same file system) and by nbdkit's file plugin, one fresh
 * server per sample, interleaved as in the fio suite. The page cache is
 * dropped (`sync`, then 3 into /proc/sys/vm/drop_caches; root) before every
 * sample, so reads start cold. The jobs are BENCH_JOBS (syncwrite: one 4 KiB
 * write at a time, each followed by a FLUSH). The table is the fio suite's:
 * medians, and nbd-migrate's ratio to nbdkit.
 *
 * The figures depend on the machine's disk (here a virtio disk whose host may
 * cache); the ratios, measured side by side, are what the row is for.
 *
 * Also runnable alone: `node dist/bench/disk.js` (the same BENCH_* settings).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeImage } from '../test/helpers/server.js';
import { run, which } from '../test/helpers/tools.js';
import { parseSize } from '../src/util/units.js';
import type { BenchConfig } from './config.js';
import { runSuiteAlone, sampleRounds, startImageServer, type RoundsContext } from './fio-sample.js';
import type { JobName } from './jobs.js';
import { formatResults, summarise, type Row, type Sample } from './report.js';
import type { ServerName } from './servers.js';

export const DISK_SERVERS: readonly ServerName[] = ['nbd-migrate', 'nbdkit'];
const MEMORY_FS: Record<number, string> = { 0x01021994: 'tmpfs', 0x858458f6: 'ramfs' };

export interface DiskResults {
  settings: { size: number; dir: string; image: string; jobs: JobName[]; repeat: number; iodepth: number; runtimeSec: number; rampSec: number; cacheDropped: true };
  rows: Row[];
  samples: Sample[];
}

/** BENCH_DISK_DIR (default /var/tmp) and BENCH_DISK_SIZE (default 4G). */
export function diskSettings(env: NodeJS.ProcessEnv = process.env): { dir: string; size: number } {
  const dir = path.resolve(env.BENCH_DISK_DIR ?? '/var/tmp');
  const size = env.BENCH_DISK_SIZE === undefined ? 4 * 1024 ** 3 : parseSize(env.BENCH_DISK_SIZE, 'BENCH_DISK_SIZE');
  if (!(size >= 64 * 1024 ** 2) || size % 4096 !== 0) throw new RangeError(`BENCH_DISK_SIZE: a multiple of 4 KiB and at least 64M, got ${env.BENCH_DISK_SIZE}`);
  return { dir, size };
}

/** Seconds the suite takes, for run.ts's estimate (the image at ~200 MB/s, then a second per sample besides fio and the cache drop). */
export function estimateDiskSec(cfg: BenchConfig): number {
  return diskSettings().size / 200e6 + cfg.repeat * cfg.jobs.length * DISK_SERVERS.length * (cfg.runtimeSec + cfg.rampSec + 2);
}

/** Writes back and drops the page cache, so the next sample reads from the disk. */
async function dropCaches(): Promise<void> {
  const r = await run('sync', [], { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`sync failed: exit ${r.code ?? r.signal}: ${r.stderr.trim()}`);
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch (e) {
    throw new Error(`disk suite: cannot drop the page cache (/proc/sys/vm/drop_caches: ${(e as Error).message}); it needs root, or leave the suite out with BENCH_SUITES=...`);
  }
}

/** Runs the suite; `results` is filled as samples come in (partial results survive an interruption). */
export async function runDiskSuite(ctx: RoundsContext, results: { disk?: DiskResults }): Promise<void> {
  const { cfg } = ctx;
  for (const [cmd, pkg] of [['nbdkit', 'nbdkit'], ['fio', 'fio'], ['sync', 'coreutils']] as const)
    if ((await which(cmd)) === null) throw new Error(`disk suite: ${cmd} not found on PATH; install the Debian package "${pkg}" (apt-get install ${pkg}), or leave the suite out with BENCH_SUITES=...`);
  const { dir, size } = diskSettings();
  const fsType = MEMORY_FS[Number(fs.statfsSync(dir).type)];
  if (fsType) throw new Error(`disk suite: BENCH_DISK_DIR ${dir} is ${fsType}, not a disk; set BENCH_DISK_DIR to a directory on a disk file system`);
  const work = fs.mkdtempSync(path.join(dir, 'nbd-migrate-bench-disk-'));
  try {
    const image = path.join(work, 'disk.img');
    const stateDir = path.join(work, 'state');
    const t0 = Date.now();
    await makeImage(image, size, { fill: 'random' });
    ctx.progress(`[disk] ${image}: ${size / 1024 ** 2} MiB of random data written in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const d: DiskResults = {
      settings: { size, dir, image, jobs: cfg.jobs, repeat: cfg.repeat, iodepth: cfg.iodepth, runtimeSec: cfg.runtimeSec, rampSec: cfg.rampSec, cacheDropped: true },
      rows: [],
      samples: [],
    };
    results.disk = d;
    await sampleRounds(
      ctx,
      'disk',
      DISK_SERVERS,
      (server) => startImageServer(server, image, stateDir, cfg.nbdMigrateBin),
      (samples) => {
        d.samples = [...samples];
        d.rows = summarise(samples, cfg.jobs, [...DISK_SERVERS]);
      },
      dropCaches,
    );
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

export function formatDisk(r: DiskResults): string {
  const s = r.settings;
  return [
    `disk rows: fio through each server serving ${s.size / 1024 ** 2} MiB of random data in a file on the disk file system of ${s.dir}` +
      ` (nbd-migrate serve FILE, activity log on, against nbdkit file=FILE; page cache dropped before each sample; iodepth ${s.iodepth}` +
      ` (syncwrite 1), ${s.runtimeSec} s + ${s.rampSec} s ramp); ratio = nbd-migrate's median over nbdkit's`,
    formatResults(r.rows, r.samples, [...DISK_SERVERS], s.repeat),
  ].join('\n');
}

if (process.argv[1] && /disk\.[jt]s$/.test(process.argv[1])) {
  const results: { disk?: DiskResults } = {};
  runSuiteAlone('disk', (ctx) => runDiskSuite(ctx, results), () => results.disk && formatDisk(results.disk), { afterInterrupt: 'the image is removed' });
}
