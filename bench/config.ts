/**
 * Benchmark settings, all from the environment so `npm run bench` needs no
 * arguments and a developer can narrow a rerun:
 *
 *   BENCH_SERVERS=nbd-migrate,qemu-nbd   which servers (default: all, the two nbd-migrate variants too: servers.ts)
 *   BENCH_JOBS=randread,randwrite        which fio jobs (default: all five; syncwrite = QD1 writes, each FLUSHed)
 *   BENCH_REPEAT=3                       samples per (server, job); the median is reported
 *   BENCH_RUNTIME=5  BENCH_RAMP=1        seconds measured / warm-up seconds per fio run
 *   BENCH_IODEPTH=16                     fio queue depth
 *   BENCH_IMAGE_SIZE=1G                  image size (K/M/G suffixes, binary)
 *   BENCH_OUT=bench/results/latest.json  where the JSON results go
 *   BENCH_NBD_MIGRATE=/path/bin/nbd-migrate  another build of the server (e.g. a baseline checkout)
 *   BENCH_SUITES=fio,mirror,blockdev,disk  which suites (default: all); the rest only matter to one suite
 *   BENCH_DISK_DIR=/var/tmp  BENCH_DISK_SIZE=4G  the disk suite's directory (on a disk, not tmpfs) and image
 *
 * The mirror suite (mirror.ts):
 *   BENCH_MIRROR_ROWS=copy,cutover,bitmap,actlog  which mirror rows (default: all; cutover4 too, see DEFAULT_MIRROR_ROWS)
 *   BENCH_CUTOVER4_REPEAT=3 (and _SIZE, _MAX_DOWNTIME, _TARGETS, _HANDOFFS, _JOBS)  the cutover4 row (cutover4.ts)
 *   BENCH_COPY_METHODS=nbd-migrate-mirror,qemu-img  which copiers (default: all but the *-tiz ones)
 *   BENCH_COPY_REPEAT=5  BENCH_COPY_SIZE=2G  samples per copier / image size (half data, half holes)
 *   BENCH_MIRROR_REPEAT=3                rounds of the cutover and bitmap rows
 *   BENCH_CUTOVER_RUNTIME=20  BENCH_CUTOVER_IODEPTH=16  BENCH_CUTOVER_SIZE=1G  the fio load during cutover
 *   BENCH_CUTOVER_TARGET=qemu-nbd        or nbd-migrate (serve --incoming), or nbdkit (file plugin)
 *   BENCH_BITMAP_SIZE=1T                 the big sparse image of the bitmap row (compared with 1G)
 *   BENCH_WAN_METHODS=nbd-migrate-copy,nbdcopy  copiers of the wan row (default: mirror, copy, nbdcopy; qemu-img takes ~30 s)
 *   BENCH_WAN_REPEAT=2  BENCH_WAN_SIZE=1G  samples per copier / image size (half data, half holes)
 *   BENCH_WAN_DELAY_MS=40  BENCH_WAN_BANDWIDTH=125000000  one-way delay / bytes per second each way (1 Gbit/s), shared
 */
import * as path from 'node:path';
import { parseSize } from '../src/util/units.js';
import { REPO_ROOT } from '../test/helpers/server.js';
import { JOBS, type JobName } from './jobs.js';
import { SERVER_NAMES, type ServerName } from './servers.js';

/** blockdev: the fio rows on a loop device, nbd-migrate against nbdkit (blockdev.ts); disk: on a file on a disk (disk.ts). */
export const SUITE_NAMES = ['fio', 'mirror', 'blockdev', 'disk'] as const;
export type SuiteName = (typeof SUITE_NAMES)[number];
export const MIRROR_ROW_NAMES = ['readcache', 'copy', 'wan', 'cutover', 'cutover4', 'bitmap', 'actlog', 'fill'] as const;
export type MirrorRowName = (typeof MIRROR_ROW_NAMES)[number];
/** The rows a plain `npm run bench` runs. */
export const DEFAULT_MIRROR_ROWS: readonly MirrorRowName[] = MIRROR_ROW_NAMES;
export const CUTOVER_TARGETS = ['qemu-nbd', 'nbd-migrate', 'nbdkit'] as const;
export type CutoverTarget = (typeof CUTOVER_TARGETS)[number];
/** The copiers of the copy row (copyspeed.ts). */
export const COPY_METHOD_NAMES = ['nbd-migrate-mirror', 'nbd-migrate-copy', 'nbdcopy', 'qemu-img', 'nbdcopy-tiz', 'qemu-img-tiz'] as const;
export type CopyMethodName = (typeof COPY_METHOD_NAMES)[number];
/** The --target-is-zero variants are opt-in: measured here they copy no faster (zeroing holes on a sparse qemu-nbd target is cheap). */
export const DEFAULT_COPY_METHODS: readonly CopyMethodName[] = ['nbd-migrate-mirror', 'nbd-migrate-copy', 'nbdcopy', 'qemu-img'];

export class BenchConfigError extends Error {
  override readonly name = 'BenchConfigError';
}

export interface BenchConfig {
  repoRoot: string;
  servers: ServerName[];
  jobs: JobName[];
  repeat: number;
  runtimeSec: number;
  rampSec: number;
  iodepth: number;
  imageSize: number;
  outFile: string;
  nbdMigrateBin: string;
  suites: SuiteName[];
  mirror: MirrorConfig;
}

export interface MirrorConfig {
  rows: MirrorRowName[];
  copyMethods: CopyMethodName[];
  copyRepeat: number;
  copySize: number;
  repeat: number;
  cutoverRuntimeSec: number;
  cutoverIodepth: number;
  cutoverSize: number;
  cutoverTarget: CutoverTarget;
  bitmapSize: number;
  wan: { methods: CopyMethodName[]; repeat: number; size: number; delayMs: number; bandwidth: number };
}

function list<T extends string>(env: string, value: string | undefined, valid: readonly T[], dflt: readonly T[] = valid): T[] {
  if (value === undefined || value.trim() === '') return [...dflt];
  const picked = value.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const p of picked)
    if (!(valid as readonly string[]).includes(p)) throw new BenchConfigError(`${env}: unknown "${p}" (choose from ${valid.join(', ')})`);
  // Keep the canonical order, drop duplicates.
  return valid.filter((v) => picked.includes(v));
}

function oneOf<T extends string>(env: string, value: string | undefined, valid: readonly T[]): T {
  if (value === undefined || value.trim() === '') return valid[0]!;
  const v = value.trim();
  if (!(valid as readonly string[]).includes(v)) throw new BenchConfigError(`${env}: unknown "${v}" (choose one of ${valid.join(', ')})`);
  return v as T;
}

function number(env: string, value: string | undefined, dflt: number, min: number, integer: boolean): number {
  if (value === undefined || value.trim() === '') return dflt;
  const n = Number(value);
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n)))
    throw new BenchConfigError(`${env}: expected ${integer ? 'an integer' : 'a number'} >= ${min}, got "${value}"`);
  return n;
}

/** "1G", "512M", "1T", "4194304" -> bytes (binary units, src/util/units.ts); at least 64 MiB so 1M sequential runs have room. */
function size(env: string, value: string | undefined, dflt: number): number {
  if (value === undefined || value.trim() === '') return dflt;
  let bytes: number;
  try {
    bytes = parseSize(value, env);
  } catch {
    throw new BenchConfigError(`${env}: expected a size like 1G or 512M, got "${value}"`);
  }
  if (bytes < 64 * 1024 ** 2 || bytes % 4096 !== 0) throw new BenchConfigError(`${env}: must be a multiple of 4 KiB and at least 64M, got "${value}"`);
  return bytes;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): BenchConfig {
  const repoRoot = REPO_ROOT;
  const outFile = env.BENCH_OUT ? path.resolve(env.BENCH_OUT) : path.join(repoRoot, 'bench', 'results', 'latest.json');
  const nbdMigrateBin = env.BENCH_NBD_MIGRATE ? path.resolve(env.BENCH_NBD_MIGRATE) : path.join(repoRoot, 'bin', 'nbd-migrate');
  return {
    repoRoot,
    servers: list('BENCH_SERVERS', env.BENCH_SERVERS, SERVER_NAMES),
    jobs: list(
      'BENCH_JOBS',
      env.BENCH_JOBS,
      JOBS.map((j) => j.name),
    ),
    repeat: number('BENCH_REPEAT', env.BENCH_REPEAT, 3, 1, true),
    runtimeSec: number('BENCH_RUNTIME', env.BENCH_RUNTIME, 5, 1, true),
    rampSec: number('BENCH_RAMP', env.BENCH_RAMP, 1, 0, true),
    iodepth: number('BENCH_IODEPTH', env.BENCH_IODEPTH, 16, 1, true),
    imageSize: size('BENCH_IMAGE_SIZE', env.BENCH_IMAGE_SIZE, 1024 ** 3),
    outFile,
    nbdMigrateBin,
    suites: list('BENCH_SUITES', env.BENCH_SUITES, SUITE_NAMES),
    mirror: {
      rows: list('BENCH_MIRROR_ROWS', env.BENCH_MIRROR_ROWS, MIRROR_ROW_NAMES, DEFAULT_MIRROR_ROWS),
      copyMethods: list('BENCH_COPY_METHODS', env.BENCH_COPY_METHODS, COPY_METHOD_NAMES, DEFAULT_COPY_METHODS),
      copyRepeat: number('BENCH_COPY_REPEAT', env.BENCH_COPY_REPEAT, 5, 1, true),
      copySize: size('BENCH_COPY_SIZE', env.BENCH_COPY_SIZE, 2 * 1024 ** 3),
      repeat: number('BENCH_MIRROR_REPEAT', env.BENCH_MIRROR_REPEAT, 3, 1, true),
      cutoverRuntimeSec: number('BENCH_CUTOVER_RUNTIME', env.BENCH_CUTOVER_RUNTIME, 20, 10, true),
      cutoverIodepth: number('BENCH_CUTOVER_IODEPTH', env.BENCH_CUTOVER_IODEPTH, 16, 1, true),
      cutoverSize: size('BENCH_CUTOVER_SIZE', env.BENCH_CUTOVER_SIZE, 1024 ** 3),
      cutoverTarget: oneOf('BENCH_CUTOVER_TARGET', env.BENCH_CUTOVER_TARGET, CUTOVER_TARGETS),
      bitmapSize: size('BENCH_BITMAP_SIZE', env.BENCH_BITMAP_SIZE, 1024 ** 4),
      wan: {
        methods: list('BENCH_WAN_METHODS', env.BENCH_WAN_METHODS, COPY_METHOD_NAMES, ['nbd-migrate-mirror', 'nbd-migrate-copy', 'nbdcopy']),
        repeat: number('BENCH_WAN_REPEAT', env.BENCH_WAN_REPEAT, 2, 1, true),
        size: size('BENCH_WAN_SIZE', env.BENCH_WAN_SIZE, 1024 ** 3),
        delayMs: number('BENCH_WAN_DELAY_MS', env.BENCH_WAN_DELAY_MS, 40, 0, false),
        bandwidth: number('BENCH_WAN_BANDWIDTH', env.BENCH_WAN_BANDWIDTH, 125_000_000, 1_000_000, true),
      },
    },
  };
}
