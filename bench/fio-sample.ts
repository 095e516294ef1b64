/**
 * One fio sample against a server that is already serving: the fio suite's and the
 * blockdev suite's rows are measured the same way.
 */
import { nbdkit } from '../test/helpers/peers.js';
import { startServer as startNbdMigrate } from '../test/helpers/server.js';
import type { BenchConfig } from './config.js';
import { FioError, runFio, type FioResult, type FioSettings } from './fio.js';
import { jobByName, type JobName } from './jobs.js';
import { cpuBetween, cpuSnapshot, Interrupted, type CpuSnapshot } from './proc.js';
import { fmtValue, unitOf, valueOf, type Sample } from './report.js';
import { EXPORT_NAME, freePort, HOST, nbdkitFileArgs, type ServerName } from './servers.js';

/** Margin after fio's ramp for its start-up and the NBD handshake, before CPU sampling starts. */
const FIO_STARTUP_MS = 300;

/** What a sample needs of the server under test. */
export interface SampledServer {
  pid: number;
  uri: string;
  alive(): boolean;
  stderr(): string;
}

export async function fioSample(
  cfg: BenchConfig,
  fio: string,
  srv: SampledServer,
  server: ServerName,
  job: JobName,
  round: number,
  stopRequested: () => boolean,
): Promise<Sample> {
  const settings: FioSettings = { runtimeSec: cfg.runtimeSec, rampSec: cfg.rampSec, iodepth: cfg.iodepth };
  if (stopRequested()) throw new Interrupted();
  // CPU is sampled over fio's measured window only: from the end of the ramp
  // (plus a margin for fio's start-up and NBD handshake) to fio's exit.
  let start: CpuSnapshot | undefined;
  const timer = setTimeout(() => (start = cpuSnapshot(srv.pid)), cfg.rampSec * 1000 + FIO_STARTUP_MS);
  let result: FioResult;
  try {
    result = await runFio(fio, jobByName(job), srv.uri, settings, cfg.repoRoot);
  } catch (e) {
    if (stopRequested()) throw new Interrupted();
    if (!(e instanceof FioError)) throw e;
    const died = srv.alive() ? '' : `\n  ${server} died; its stderr: ${srv.stderr().trim() || '(empty)'}`;
    return { round, server, job, ok: false, error: e.message + died };
  } finally {
    clearTimeout(timer);
  }
  // fio stopped by our signal may still exit 0 with a short run: not a sample.
  if (stopRequested()) throw new Interrupted();
  const cpu = start ? cpuBetween(start, cpuSnapshot(srv.pid)) : { procPct: null, hostPct: null };
  return {
    round,
    server,
    job,
    ok: true,
    value: valueOf(job, result),
    fio: result,
    serverCpuPct: cpu.procPct,
    serverCpuUsPerOp: cpu.procPct !== null && result.iops > 0 ? (cpu.procPct / 100) * (1e6 / result.iops) : null,
    hostBusyPct: cpu.hostPct,
  };
}

/** A server started for one sample. */
export interface StartedServer extends SampledServer {
  stop(): Promise<void>;
}

/** What a suite is run with: the settings, fio, whether to stop, and where progress lines go. */
export interface RoundsContext {
  cfg: BenchConfig;
  fio: string;
  stopRequested: () => boolean;
  progress: (line: string) => void;
}

/** `xs` rotated left by `n` places: the server order of round n+1. */
export function rotate<T>(xs: readonly T[], n: number): T[] {
  const k = xs.length ? n % xs.length : 0;
  return [...xs.slice(k), ...xs.slice(0, k)];
}

/**
 * How the fio, blockdev and disk suites measure: every job against every
 * server, a fresh server per sample (`start`), interleaved job by job with the
 * server order rotated every round. `beforeSample` runs before each server
 * starts (the disk suite drops the page cache); `onSample` sees the samples so
 * far (partial results survive an interruption). `label` prefixes the progress
 * lines (none for the fio suite).
 */
export async function sampleRounds(
  ctx: RoundsContext,
  label: string,
  servers: readonly ServerName[],
  start: (server: ServerName) => Promise<StartedServer>,
  onSample: (samples: readonly Sample[]) => void,
  beforeSample?: () => Promise<void>,
): Promise<Sample[]> {
  const { cfg } = ctx;
  const samples: Sample[] = [];
  const total = cfg.repeat * cfg.jobs.length * servers.length;
  for (let round = 1; round <= cfg.repeat; round++) {
    const order = rotate(servers, round - 1);
    for (const job of cfg.jobs)
      for (const server of order) {
        if (ctx.stopRequested()) throw new Interrupted();
        await beforeSample?.();
        const srv = await start(server);
        let s: Sample;
        try {
          s = await fioSample(cfg, ctx.fio, srv, server, job, round, ctx.stopRequested);
        } finally {
          await srv.stop();
        }
        samples.push(s);
        onSample(samples);
        const what = s.ok
          ? `${fmtValue(s.value, unitOf(job)).padStart(7)} ${unitOf(job)}` + (s.serverCpuPct === null ? '' : `  server cpu ${Math.round(s.serverCpuPct)}%`)
          : `FAILED: ${s.error.split('\n')[0]}`;
        ctx.progress(`[${label ? `${label} ` : ''}${String(samples.length).padStart(String(total).length)}/${total}] round ${round} ${job.padEnd(9)} ${server.padEnd(11)} ${what}`);
      }
  }
  return samples;
}

/**
 * nbd-migrate (`serve IMAGE`, its state folder under `stateDir`, activity log on as by
 * default) or nbdkit's file plugin serving `image` (a file or a device) on a free port.
 */
export async function startImageServer(server: ServerName, image: string, stateDir: string, bin: string): Promise<StartedServer> {
  const port = await freePort();
  const h =
    server === 'nbdkit'
      ? await nbdkit(port, nbdkitFileArgs(image, EXPORT_NAME))
      : await startNbdMigrate([image, '--name', EXPORT_NAME, '--listen', HOST, '--port', String(port), '--state-dir', stateDir, '--log-format', 'json', '--log-level', 'warn'], {
          cli: bin,
          readyPort: port,
        });
  return { ...h, pid: h.proc.pid ?? -1, uri: `nbd://${HOST}:${port}/${EXPORT_NAME}`, alive: () => h.proc.exitCode === null && h.proc.signalCode === null };
}

/**
 * `node dist/bench/NAME.js`: one suite alone (the BENCH_* settings apply), its table
 * printed with whatever it measured, also when interrupted. A second Ctrl-C exits at
 * once, after `onForcedExit` (the blockdev suite detaches its loop device there).
 */
export function runSuiteAlone(
  name: string,
  runSuite: (ctx: RoundsContext) => Promise<void>,
  table: () => string | undefined,
  opts: { afterInterrupt: string; onForcedExit?: () => void },
): void {
  let stop = false;
  const onSignal = () => {
    if (stop) {
      opts.onForcedExit?.();
      process.exit(130);
    }
    stop = true;
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const main = async () => {
    const { loadConfig } = await import('./config.js');
    const { which } = await import('../test/helpers/tools.js');
    const cfg = loadConfig();
    try {
      await runSuite({ cfg, fio: (await which('fio')) ?? 'fio', stopRequested: () => stop, progress: (l) => process.stderr.write(l + '\n') });
    } finally {
      const t = table();
      if (t) process.stdout.write(t + '\n');
    }
  };
  void main().catch((e: unknown) => {
    if (e instanceof Interrupted) {
      process.stderr.write(`bench ${name}: interrupted (partial results above; ${opts.afterInterrupt})\n`);
      process.exit(130);
    }
    process.stderr.write(`bench ${name}: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
