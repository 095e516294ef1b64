/**
 * One fio sample against a server that is already serving: the fio suite's and the
 * blockdev suite's rows are measured the same way.
 */
import type { BenchConfig } from './config.js';
import { FioError, runFio, type FioResult, type FioSettings } from './fio.js';
import { jobByName, type JobName } from './jobs.js';
import { cpuBetween, cpuSnapshot, Interrupted, type CpuSnapshot } from './proc.js';
import { valueOf, type Sample } from './report.js';
import type { ServerName } from './servers.js';

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
