/**
 * One fio run through the nbd engine, and the figures we keep from its JSON.
 */
import { run } from '../test/helpers/tools.js';
import type { JobSpec } from './jobs.js';
import { track } from './proc.js';

export interface FioSettings {
  runtimeSec: number;
  rampSec: number;
  iodepth: number;
}

export interface FioResult {
  /** Bytes per second in the job's direction. */
  bwBytes: number;
  iops: number;
  /** Mean and 99th-percentile completion latency, microseconds. */
  clatMeanUs: number;
  clatP99Us: number | null;
  /** fio's own CPU use, % of one core (usr + sys). */
  fioCpuPct: number;
}

export function fioArgs(job: JobSpec, uri: string, s: FioSettings): string[] {
  return [
    `--name=${job.name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth ?? s.iodepth}`,
    ...(job.fsync ? ['--fsync=1'] : []),
    '--numjobs=1',
    '--time_based',
    `--runtime=${s.runtimeSec}`,
    `--ramp_time=${s.rampSec}`,
    // Random jobs: no map of blocks already touched (less fio CPU on a 2-core box; repeats are fine).
    '--norandommap',
    '--randrepeat=0',
    '--output-format=json',
  ];
}

interface FioDirectionJson {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  clat_ns?: { mean?: number; percentile?: Record<string, number> };
}

interface FioJobJson {
  jobname: string;
  error: number;
  read: FioDirectionJson;
  write: FioDirectionJson;
  usr_cpu: number;
  sys_cpu: number;
}

/** The JSON document in fio's stdout (the nbd engine prints "fio: connected to NBD server" before it). */
export function parseFioJson(stdout: string): FioJobJson[] {
  const start = stdout.startsWith('{') ? 0 : stdout.indexOf('\n{') + 1;
  if (stdout[start] !== '{') throw new Error('no JSON in fio output');
  const doc = JSON.parse(stdout.slice(start)) as { jobs?: FioJobJson[] };
  if (!Array.isArray(doc.jobs)) throw new Error('fio JSON has no "jobs" array');
  return doc.jobs;
}

export class FioError extends Error {
  override readonly name = 'FioError';
}

/** Runs one job; throws FioError (with fio's stderr) if fio fails or moves no data. */
export async function runFio(fio: string, job: JobSpec, uri: string, s: FioSettings, cwd: string): Promise<FioResult> {
  const args = fioArgs(job, uri, s);
  const r = await run(fio, args, { timeoutMs: (s.runtimeSec + s.rampSec + 60) * 1000, cwd, onSpawn: track });
  const why = (msg: string) =>
    new FioError(`${msg}\n  command: ${fio} ${args.join(' ')}\n  stderr: ${r.stderr.trim().slice(-2000) || '(empty)'}`);
  if (r.timedOut) throw why('fio timed out (killed)');
  if (r.code !== 0) throw why(`fio exited ${r.code ?? r.signal}`);
  let jobs: FioJobJson[];
  try {
    jobs = parseFioJson(r.stdout);
  } catch (e) {
    throw why(`cannot parse fio output: ${(e as Error).message}`);
  }
  const j = jobs[0];
  if (!j) throw why('fio reported no job');
  if (j.error !== 0) throw why(`fio job error ${j.error}`);
  const d = j[job.direction];
  if (!(d.io_bytes > 0)) throw why(`fio moved no data (${job.direction} io_bytes=${d.io_bytes})`);
  const p99 = d.clat_ns?.percentile?.['99.000000'];
  return {
    bwBytes: d.bw_bytes,
    iops: d.iops,
    clatMeanUs: (d.clat_ns?.mean ?? 0) / 1000,
    clatP99Us: p99 === undefined ? null : p99 / 1000,
    fioCpuPct: j.usr_cpu + j.sys_cpu,
  };
}
