/**
 * Mirror row "actlog": what crash-safe dirty tracking costs (issue 12.1, goal
 * at most 5 %). fio's 4 KiB random writes (BENCH_IODEPTH, BENCH_RUNTIME after
 * BENCH_RAMP, as the fio suite's randwrite) against `nbd-migrate serve` on the
 * same image, with the activity log (the default: state folder beside the
 * image on tmpfs, so the syncs cost what the code costs, not a disk) and with
 * `--no-activity-log` (the bitmap in memory only). The two alternate within a
 * round and their order rotates; each run starts with a fresh state folder,
 * so every 4 MiB extent is logged once during the ramp and the measured window
 * sees the steady state of a VM writing over a working set (1 GiB = 256
 * extents: no checkpoints; BENCH_IMAGE_SIZE above 4 GiB makes it checkpoint).
 * The row's figure is log IOPS ÷ memory-only IOPS, per round and as the median.
 *
 * A third mode, "checkpoint", is the log plus one checkpoint created (through
 * the admin socket) before fio starts: every write is then also marked in the
 * checkpoint's bits by the change-marks layer (issue 12.3, qemu:dirty-bitmap).
 * Its figure is checkpoint IOPS ÷ log IOPS, the cost of that layer alone.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { adminRequest } from '../test/helpers/admin.js';
import { startServer, type ServerHandle } from '../test/helpers/server.js';
import { freePort } from '../test/helpers/net.js';
import type { BenchConfig } from './config.js';
import { FioError, runFio, type FioResult } from './fio.js';
import { jobByName } from './jobs.js';
import { Interrupted } from './proc.js';
import { median } from './stats.js';

export type ActlogMode = 'log' | 'memory' | 'checkpoint';
export const ACTLOG_MODES: readonly ActlogMode[] = ['log', 'memory', 'checkpoint'];

export interface ActlogSample {
  round: number;
  mode: ActlogMode;
  ok: boolean;
  iops?: number;
  clatP99Us?: number | null;
  error?: string;
}

export interface ActlogContext {
  cfg: BenchConfig;
  fio: string;
  stopRequested: () => boolean;
}

export const stateDirOf = (image: string) => `${image}.nbd-migrate.d`;

export async function measureActlog(ctx: ActlogContext, image: string, mode: ActlogMode, round: number): Promise<ActlogSample> {
  const { cfg } = ctx;
  fs.rmSync(stateDirOf(image), { recursive: true, force: true });
  const port = await freePort();
  const admin = path.join(os.tmpdir(), `nbd-migrate-bench-${process.pid}-actlog.sock`);
  let srv: ServerHandle | undefined;
  try {
    const args = [image, '--name', 'bench', '--listen', '127.0.0.1', '--port', String(port), '--log-format', 'json', '--log-level', 'warn'];
    if (mode === 'memory') args.push('--no-activity-log');
    if (mode === 'checkpoint') args.push('--admin-socket', admin);
    srv = await startServer(args, { cli: cfg.nbdMigrateBin, readyPort: port });
    if (ctx.stopRequested()) throw new Interrupted();
    if (mode === 'checkpoint') await adminRequest(admin, { cmd: 'checkpoint', action: 'create', export: 'bench', name: 'bench' }, 10_000);
    let r: FioResult;
    try {
      r = await runFio(ctx.fio, jobByName('randwrite'), `nbd://127.0.0.1:${port}/bench`, { runtimeSec: cfg.runtimeSec, rampSec: cfg.rampSec, iodepth: cfg.iodepth }, cfg.repoRoot);
    } catch (e) {
      if (ctx.stopRequested()) throw new Interrupted();
      if (!(e instanceof FioError)) throw e;
      return { round, mode, ok: false, error: e.message };
    }
    if (ctx.stopRequested()) throw new Interrupted();
    return { round, mode, ok: true, iops: r.iops, clatP99Us: r.clatP99Us };
  } finally {
    await srv?.stop();
    fs.rmSync(stateDirOf(image), { recursive: true, force: true });
    fs.rmSync(admin, { force: true });
  }
}

export interface ActlogRow {
  logIops: number | null;
  memoryIops: number | null;
  checkpointIops: number | null;
  /** Median log IOPS ÷ median memory-only IOPS. */
  ratio: number | null;
  /** log ÷ memory within each round (the two ran back to back). */
  roundRatios: number[];
  /** Median checkpoint IOPS ÷ median log IOPS: the change-marks layer's cost. */
  checkpointRatio: number | null;
  /** checkpoint ÷ log within each round. */
  checkpointRoundRatios: number[];
}


export function summariseActlog(samples: readonly ActlogSample[]): ActlogRow {
  const iops = (mode: ActlogMode) => samples.filter((s) => s.ok && s.mode === mode).map((s) => s.iops!);
  const logIops = median(iops('log'));
  const memoryIops = median(iops('memory'));
  const checkpointIops = median(iops('checkpoint'));
  const rounds = [...new Set(samples.map((s) => s.round))];
  /** a ÷ b within each round where both ran. */
  const perRound = (a: ActlogMode, b: ActlogMode): number[] => {
    const out: number[] = [];
    for (const r of rounds) {
      const x = samples.find((s) => s.round === r && s.mode === a && s.ok);
      const y = samples.find((s) => s.round === r && s.mode === b && s.ok);
      if (x && y && y.iops) out.push(x.iops! / y.iops);
    }
    return out;
  };
  const over = (a: number | null, b: number | null) => (a !== null && b ? a / b : null);
  return {
    logIops,
    memoryIops,
    checkpointIops,
    ratio: over(logIops, memoryIops),
    roundRatios: perRound('log', 'memory'),
    checkpointRatio: over(checkpointIops, logIops),
    checkpointRoundRatios: perRound('checkpoint', 'log'),
  };
}

export function formatActlog(row: ActlogRow, samples: readonly ActlogSample[], cfg: { iodepth: number; runtimeSec: number; rampSec: number }): string {
  const f = (n: number | null) => (n === null ? '-' : String(Math.round(n)));
  const out = [
    `mirror rows: activity-log cost: fio randwrite bs=4k iodepth=${cfg.iodepth}, ${cfg.runtimeSec} s after a ${cfg.rampSec} s ramp, nbd-migrate with the activity log vs --no-activity-log (goal: ratio >= 0.95)`,
    `  with log ${f(row.logIops)} IOPS, memory only ${f(row.memoryIops)} IOPS (medians): ratio ${row.ratio === null ? '-' : row.ratio.toFixed(3)}x;` +
      ` per round ${row.roundRatios.map((r) => r.toFixed(3)).join(' ') || '-'}; median of rounds ${median(row.roundRatios)?.toFixed(3) ?? '-'}`,
    `  with the log and one checkpoint (every write also marked in its bits) ${f(row.checkpointIops)} IOPS: ÷ log ${row.checkpointRatio === null ? '-' : row.checkpointRatio.toFixed(3)}x;` +
      ` per round ${row.checkpointRoundRatios.map((r) => r.toFixed(3)).join(' ') || '-'}; median of rounds ${median(row.checkpointRoundRatios)?.toFixed(3) ?? '-'}`,
  ];
  for (const s of samples) if (!s.ok) out.push(`  round ${s.round} ${s.mode} failed: ${(s.error ?? '').split('\n')[0]}`);
  return out.join('\n');
}
