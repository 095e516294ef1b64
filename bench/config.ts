/**
 * Benchmark settings, all from the environment so `npm run bench` needs no
 * arguments and a developer can narrow a rerun:
 *
 *   BENCH_SERVERS=nbd-migrate,qemu-nbd   which servers (default: all three)
 *   BENCH_JOBS=randread,randwrite        which fio jobs (default: all four)
 *   BENCH_REPEAT=3                       samples per (server, job); the median is reported
 *   BENCH_RUNTIME=5  BENCH_RAMP=1        seconds measured / warm-up seconds per fio run
 *   BENCH_IODEPTH=16                     fio queue depth
 *   BENCH_IMAGE_SIZE=1G                  image size (K/M/G suffixes, binary)
 *   BENCH_OUT=bench/results/latest.json  where the JSON results go
 *   BENCH_NBD_MIGRATE=/path/bin/nbd-migrate  another build of the server (e.g. a baseline checkout)
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { JOBS, type JobName } from './jobs.js';
import { SERVER_NAMES, type ServerName } from './servers.js';

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
}

/** The checkout root: the nearest directory above this file whose package.json is nbd-migrate's (works from bench/ and dist/bench/). */
export function findRepoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj) && (JSON.parse(fs.readFileSync(pj, 'utf8')) as { name?: unknown }).name === 'nbd-migrate') return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new BenchConfigError('cannot find the nbd-migrate checkout root above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
}

function list<T extends string>(env: string, value: string | undefined, valid: readonly T[]): T[] {
  if (value === undefined || value.trim() === '') return [...valid];
  const picked = value.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const p of picked)
    if (!(valid as readonly string[]).includes(p)) throw new BenchConfigError(`${env}: unknown "${p}" (choose from ${valid.join(', ')})`);
  // Keep the canonical order, drop duplicates.
  return valid.filter((v) => picked.includes(v));
}

function number(env: string, value: string | undefined, dflt: number, min: number, integer: boolean): number {
  if (value === undefined || value.trim() === '') return dflt;
  const n = Number(value);
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n)))
    throw new BenchConfigError(`${env}: expected ${integer ? 'an integer' : 'a number'} >= ${min}, got "${value}"`);
  return n;
}

const SIZE_UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 };

/** "1G", "512M", "4194304" -> bytes (binary units); at least 64 MiB so 1M sequential runs have room. */
export function parseSize(env: string, value: string | undefined, dflt: number): number {
  if (value === undefined || value.trim() === '') return dflt;
  const m = /^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$/i.exec(value);
  const unit = m ? SIZE_UNITS[m[2]!.toUpperCase()] : undefined;
  if (!m || unit === undefined) throw new BenchConfigError(`${env}: expected a size like 1G or 512M, got "${value}"`);
  const bytes = Number(m[1]) * unit;
  if (bytes < 64 * 1024 ** 2 || bytes % 4096 !== 0) throw new BenchConfigError(`${env}: must be a multiple of 4 KiB and at least 64M, got "${value}"`);
  return bytes;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): BenchConfig {
  const repoRoot = findRepoRoot();
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
    imageSize: parseSize('BENCH_IMAGE_SIZE', env.BENCH_IMAGE_SIZE, 1024 ** 3),
    outFile,
    nbdMigrateBin,
  };
}
