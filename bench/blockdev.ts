/**
 * Suite "blockdev" (issue 11, block devices): the fio rows again, with the
 * servers serving a block device instead of a file. A random-filled file on
 * tmpfs (BENCH_IMAGE_SIZE, 1 GiB by default) is attached to a loop device
 * (`losetup --find --show`), and nbd-migrate (`serve /dev/loopN`, its state
 * folder in a temporary --state-dir) and nbdkit's file plugin
 * (`file=/dev/loopN`) serve that same device in turn, one fresh server per
 * sample, interleaved job by job with the order rotating each round, exactly
 * as the fio suite does (same jobs, BENCH_JOBS, BENCH_REPEAT, iodepth, runtime).
 * The table is the fio suite's (report.ts): medians, and nbd-migrate's ratio
 * to nbdkit.
 *
 * The loop device is always detached: in a finally when the suite ends or
 * fails, and synchronously on process exit (a second Ctrl-C, a crash) for as
 * long as it is attached. Needs root (/dev/loop-control), `losetup` (Debian
 * package mount), nbdkit and fio.
 *
 * Also runnable alone: `node dist/bench/blockdev.js` (the same BENCH_* settings).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { makeImage } from '../test/helpers/server.js';
import { run, which } from '../test/helpers/tools.js';
import type { BenchConfig } from './config.js';
import { runSuiteAlone, sampleRounds, startImageServer, type RoundsContext } from './fio-sample.js';
import { benchPath } from './image.js';
import type { JobName } from './jobs.js';
import { formatResults, summarise, type Row, type Sample } from './report.js';
import type { ServerName } from './servers.js';

export const BLOCKDEV_SERVERS: readonly ServerName[] = ['nbd-migrate', 'nbdkit'];

export interface BlockdevResults {
  settings: { size: number; device: string; backing: string; jobs: JobName[]; repeat: number; iodepth: number; runtimeSec: number; rampSec: number };
  rows: Row[];
  samples: Sample[];
}

/** Seconds the suite takes, for run.ts's estimate (image, attach, and a second per sample besides fio). */
export function estimateBlockdevSec(cfg: BenchConfig): number {
  return 5 + cfg.repeat * cfg.jobs.length * BLOCKDEV_SERVERS.length * (cfg.runtimeSec + cfg.rampSec + 1);
}

/** Attached loop devices, detached synchronously if the process exits with them still attached. */
const attached = new Set<string>();
let exitHook = false;
function detachAllSync(): void {
  for (const dev of attached) {
    const r = spawnSync('losetup', ['-d', dev], { stdio: 'ignore', timeout: 30_000 });
    if (r.status === 0) attached.delete(dev);
    else process.stderr.write(`bench blockdev: could not detach ${dev} (losetup -d exited ${r.status ?? r.signal}); detach it by hand\n`);
  }
}

async function attachLoop(file: string): Promise<string> {
  const r = await run('losetup', ['--find', '--show', file], { timeoutMs: 30_000 });
  const dev = r.stdout.trim();
  if (r.code !== 0 || !dev.startsWith('/dev/loop'))
    throw new Error(`losetup --find --show ${file} failed (needs root and /dev/loop-control): exit ${r.code ?? r.signal}: ${r.stderr.trim()}`);
  attached.add(dev);
  if (!exitHook) {
    exitHook = true;
    process.on('exit', detachAllSync);
  }
  return dev;
}

async function detachLoop(dev: string): Promise<void> {
  const r = await run('losetup', ['-d', dev], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`losetup -d ${dev} failed: exit ${r.code ?? r.signal}: ${r.stderr.trim()}`);
  attached.delete(dev);
}

/** Runs the suite; `results` is filled as samples come in (partial results survive an interruption). */
export async function runBlockdevSuite(ctx: RoundsContext, results: { blockdev?: BlockdevResults }): Promise<void> {
  const { cfg } = ctx;
  for (const [cmd, pkg] of [['losetup', 'mount'], ['nbdkit', 'nbdkit'], ['fio', 'fio']] as const)
    if ((await which(cmd)) === null) throw new Error(`blockdev suite: ${cmd} not found on PATH; install the Debian package "${pkg}" (apt-get install ${pkg}), or leave the suite out with BENCH_SUITES=...`);
  const backing = benchPath('blockdev');
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-migrate-bench-blockdev-state-'));
  let dev: string | undefined;
  try {
    await makeImage(backing, cfg.imageSize, { fill: 'random' });
    dev = await attachLoop(backing);
    ctx.progress(`[blockdev] ${dev} attached over ${backing} (${cfg.imageSize / 1024 ** 2} MiB of random data on tmpfs)`);
    const bd: BlockdevResults = {
      settings: { size: cfg.imageSize, device: dev, backing, jobs: cfg.jobs, repeat: cfg.repeat, iodepth: cfg.iodepth, runtimeSec: cfg.runtimeSec, rampSec: cfg.rampSec },
      rows: [],
      samples: [],
    };
    results.blockdev = bd;
    const device = dev;
    await sampleRounds(ctx, 'blockdev', BLOCKDEV_SERVERS, (server) => startImageServer(server, device, stateDir, cfg.nbdMigrateBin), (samples) => {
      bd.samples = [...samples];
      bd.rows = summarise(samples, cfg.jobs, [...BLOCKDEV_SERVERS]);
    });
  } finally {
    // Always detached, whatever happened above (the exit hook covers a process that dies first).
    if (dev) await detachLoop(dev).catch((e: unknown) => (ctx.progress(`[blockdev] ${(e as Error).message}; retrying at exit`), undefined));
    fs.rmSync(backing, { force: true });
    fs.rmSync(stateDir, { recursive: true, force: true });
  }
}

export function formatBlockdev(r: BlockdevResults): string {
  const s = r.settings;
  return [
    `block-device rows: fio through each server serving ${s.device}, a loop device over ${s.size / 1024 ** 2} MiB of random data on tmpfs` +
      ` (nbd-migrate serve ${s.device} against nbdkit file=${s.device}; iodepth ${s.iodepth}, ${s.runtimeSec} s + ${s.rampSec} s ramp);` +
      ` ratio = nbd-migrate's median over nbdkit's`,
    formatResults(r.rows, r.samples, [...BLOCKDEV_SERVERS], s.repeat),
  ].join('\n');
}

if (process.argv[1] && /blockdev\.[jt]s$/.test(process.argv[1])) {
  const results: { blockdev?: BlockdevResults } = {};
  runSuiteAlone('blockdev', (ctx) => runBlockdevSuite(ctx, results), () => results.blockdev && formatBlockdev(results.blockdev), {
    afterInterrupt: 'the loop device is detached',
    onForcedExit: detachAllSync,
  });
}
