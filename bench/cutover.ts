/**
 * Mirror row "cutover": the pause a guest sees when the mirror switches over
 * under write load.
 *
 * The source image (half data, half holes, on tmpfs) is served by
 * `nbd-migrate serve --admin-socket`; fio (nbd engine, one connection) writes
 * 4 KiB blocks at random offsets to it, time-based, with no ramp (so its
 * latency figures cover the whole run) and --continue_on_error=all (so an I/O
 * error is counted instead of ending the job). A "baseline" sample is
 * BENCH_CUTOVER_RUNTIME seconds of that with no mirror. In a "migrate" sample,
 * at MIRROR_AT_SEC into the run the bench starts a mirror with cutover
 * "manual" to a fresh sparse target (qemu-nbd; or `nbd-migrate serve
 * --incoming`, or nbdkit's file plugin), waits for "ready", and asks for the cutover at mid-run (or as
 * soon as ready, if later); fio keeps writing through the source, which
 * forwards to the target after the switch (handoff "forward"), and is stopped
 * (SIGINT: it still reports) at the run time or AFTER_CUTOVER_SEC after the
 * switch, whichever is later. A mirror that is not ready READY_GRACE_SEC past
 * the run time fails the sample: how long "ready" takes under this load
 * varies a lot (the first sweeps compete with fio for two cores).
 *
 * Reported: the job's pauseMs (measured by the server around its hold, final
 * sweep, flush and switch), fio's largest write completion latency over the
 * run (what a guest feels as the pause), the same for the baseline, fio's
 * error count, and, from fio's latency log (max per 10 ms window), where in
 * the run the worst latency fell: near the cutover, during the copy, or
 * elsewhere.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { makeImage, type ServerHandle } from '../test/helpers/server.js';
import { run, type RunResult } from '../test/helpers/tools.js';
import type { BenchConfig } from './config.js';
import { parseFioJson } from './fio.js';
import { benchPath } from './image.js';
import { abortMirror, adminSocketPath, MIRROR_EXPORT, MirrorBenchError, removeImageAndMarkers, removeMarkers, requestCutover, startMirror, startNbdMigrate, startTarget, stopPair, waitForState, type MirrorTarget } from './mirrorjob.js';
import { Interrupted, sleep, track } from './proc.js';

/** When the mirror starts, seconds after fio was started. */
export const MIRROR_AT_SEC = 3;
/** fio keeps writing at least this long after the switch (through the source's forwarding). */
export const AFTER_CUTOVER_SEC = 5;
/** How much longer than the run time a migrate sample may wait for "ready". */
export const READY_GRACE_SEC = 60;
/** fio's latency log: the max of each window of this many ms. */
const LOG_WINDOW_MS = 10;
/** Slack around the cutover when attributing latency to it (fio's clock starts a little after its spawn). */
const NEAR_BEFORE_MS = 500;
const NEAR_AFTER_MS = 1000;

export type CutoverKind = 'baseline' | 'migrate';

export interface FioLoadResult {
  iops: number;
  /** Write completion latency, ms. */
  clatMaxMs: number;
  clatP99Ms: number | null;
  clatP999Ms: number | null;
  /** I/O errors fio counted (total_err) plus the job's own error status. */
  errors: number;
  /** Largest 10 ms-window latency max and when it happened, ms after fio's job clock started (from the log). */
  logMaxMs: number | null;
  logMaxAtMs: number | null;
  /**
   * fio's job clock (its log's time 0) started this many ms after the bench
   * spawned fio: fio's report time minus its job run time, minus the spawn
   * time (a few ms late at most: the report comes after fio's teardown).
   */
  clockOffsetMs: number;
}

interface CutoverSampleBase {
  round: number;
  kind: CutoverKind;
}

export interface GoodCutoverSample extends CutoverSampleBase {
  ok: true;
  fio: FioLoadResult;
  /** Migrate samples only. */
  mirror?: {
    pauseMs: number | null;
    /** Seconds from the mirror command to "ready". */
    readySec: number;
    /** Seconds from the cutover command to "completed". */
    cutoverSec: number;
    passes: number;
    convergence: string;
    dataBytes: number;
    /** Times relative to fio's start, ms. */
    mirrorAtMs: number;
    readyAtMs: number;
    cutoverAtMs: number;
    completedAtMs: number;
    /** fio's run time, s (the baseline's is BENCH_CUTOVER_RUNTIME). */
    fioSec: number;
    /** When write-through (convergence "active") began, ms after fio's start; null if never before cutover. */
    activeAtMs: number | null;
    /**
     * Worst write latency (10 ms-window maxima from fio's log) by phase: before
     * the mirror; copying in sweeps (guest writes only marked dirty); copying
     * with write-through (guest writes go to both sides under the copy's range
     * locks); near the cutover; after the switch (forwarded to the target).
     */
    beforeMaxMs: number | null;
    copyPhaseMaxMs: number | null;
    writeThroughMaxMs: number | null;
    nearCutoverMaxMs: number | null;
    afterMaxMs: number | null;
    sourceHungOnSigterm: boolean;
  };
}

export interface FailedCutoverSample extends CutoverSampleBase {
  ok: false;
  error: string;
}

export type CutoverSample = GoodCutoverSample | FailedCutoverSample;

export interface CutoverContext {
  cfg: BenchConfig;
  fio: string;
  stopRequested: () => boolean;
  progress: (line: string) => void;
}

export function cutoverFioArgs(uri: string, runtimeSec: number, iodepth: number, logPrefix: string): string[] {
  return [
    '--name=cutover',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    `--iodepth=${iodepth}`,
    '--numjobs=1',
    '--time_based',
    `--runtime=${runtimeSec}`,
    '--norandommap',
    '--randrepeat=0',
    '--continue_on_error=all',
    `--write_lat_log=${logPrefix}`,
    `--log_avg_msec=${LOG_WINDOW_MS}`,
    '--log_max_value=1',
    '--output-format=json',
  ];
}

/** (time ms, latency ns) pairs of a fio latency log ("time, value, ddir, bs, offset[, prio]"). */
export function readLatLog(file: string): Array<[number, number]> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: Array<[number, number]> = [];
  for (const line of text.split('\n')) {
    const f = line.split(',');
    if (f.length < 2) continue;
    const t = Number(f[0]);
    const v = Number(f[1]);
    if (Number.isFinite(t) && Number.isFinite(v)) out.push([t, v]);
  }
  return out;
}

function maxIn(log: Array<[number, number]>, keep: (t: number) => boolean): number | null {
  let m: number | null = null;
  for (const [t, v] of log) if (keep(t) && (m === null || v > m)) m = v;
  return m === null ? null : m / 1e6;
}

function parseFioLoad(r: RunResult, args: string[], log: Array<[number, number]>, stoppedByUs: boolean, spawnedAtEpochMs: number): FioLoadResult {
  const why = (msg: string) => new MirrorBenchError(`${msg}\n  command: fio ${args.join(' ')}\n  stderr: ${r.stderr.trim().slice(-2000) || '(empty)'}`);
  if (r.timedOut) throw why('fio timed out (killed)');
  // Stopped with SIGINT, fio still prints its report but may exit non-zero.
  if (r.code !== 0 && !stoppedByUs) throw why(`fio exited ${r.code ?? r.signal}`);
  const start = r.stdout.startsWith('{') ? 0 : r.stdout.indexOf('\n{') + 1;
  const report = JSON.parse(r.stdout.slice(start)) as { timestamp_ms?: number };
  const j = parseFioJson(r.stdout)[0] as unknown as {
    error: number;
    total_err?: number;
    job_runtime?: number;
    write: { iops: number; io_bytes: number; clat_ns?: { max?: number; percentile?: Record<string, number> } };
  };
  if (!j) throw why('fio reported no job');
  if (!(j.write.io_bytes > 0)) throw why('fio wrote nothing');
  const pct = j.write.clat_ns?.percentile ?? {};
  const ms = (ns: number | undefined) => (ns === undefined ? null : ns / 1e6);
  let logMax: [number, number] | undefined;
  for (const e of log) if (!logMax || e[1] > logMax[1]) logMax = e;
  return {
    iops: j.write.iops,
    clatMaxMs: (j.write.clat_ns?.max ?? 0) / 1e6,
    clatP99Ms: ms(pct['99.000000']),
    clatP999Ms: ms(pct['99.900000']),
    errors: (j.total_err ?? 0) + (j.error !== 0 ? 1 : 0),
    logMaxMs: logMax ? logMax[1] / 1e6 : null,
    logMaxAtMs: logMax ? logMax[0] : null,
    clockOffsetMs:
      report.timestamp_ms !== undefined && j.job_runtime !== undefined
        ? Math.min(5000, Math.max(0, report.timestamp_ms - j.job_runtime - spawnedAtEpochMs))
        : 0,
  };
}

/** One baseline or migrate sample with a freshly started source server (and target). */
export async function measureCutover(ctx: CutoverContext, src: string, kind: CutoverKind, round: number): Promise<CutoverSample> {
  const { cfg } = ctx;
  const m = cfg.mirror;
  const logDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-bench-lat-'));
  const dst = benchPath('cutover-dst');
  let source: ServerHandle | undefined;
  let target: MirrorTarget | undefined;
  let sourceHung = false;
  try {
    removeMarkers(src);
    const sock = adminSocketPath('cutover-src');
    source = await startNbdMigrate(cfg.nbdMigrateBin, src, { adminSocket: sock });
    // When write-through (convergence "active") began: the first such log line's arrival.
    let activeAt: number | undefined;
    source.onLog((e) => {
      if (activeAt === undefined && e.event === 'mirror-converge' && e.mode === 'active') activeAt = performance.now();
    });
    if (kind === 'migrate') {
      removeImageAndMarkers(dst);
      await makeImage(dst, m.cutoverSize);
      target = await startTarget(m.cutoverTarget, dst, cfg.nbdMigrateBin);
    }
    if (ctx.stopRequested()) throw new Interrupted();

    const prefix = path.join(logDir, 'cut');
    const maxSec = kind === 'migrate' ? m.cutoverRuntimeSec + READY_GRACE_SEC + AFTER_CUTOVER_SEC : m.cutoverRuntimeSec;
    const args = cutoverFioArgs(source.uri(MIRROR_EXPORT), maxSec, m.cutoverIodepth, prefix);
    let fioChild: ChildProcess | undefined;
    let stoppedByUs = false;
    const fioStart = performance.now();
    const fioSpawnEpoch = Date.now();
    const fioDone = run(ctx.fio, args, {
      timeoutMs: (maxSec + 60) * 1000,
      cwd: cfg.repoRoot,
      onSpawn: (c) => {
        track(c);
        fioChild = c;
      },
    });
    const rel = (t: number) => Math.round(t - fioStart);
    const stopFio = () => {
      stoppedByUs = true;
      fioChild?.kill('SIGINT');
    };

    let mirror: GoodCutoverSample['mirror'];
    let mirrorError: unknown;
    if (kind === 'migrate') {
      try {
        await Promise.race([sleep(MIRROR_AT_SEC * 1000), fioDone]);
        const tMirror = performance.now();
        await startMirror(sock, target!.uri, 'manual');
        const readyDeadline = fioStart + (m.cutoverRuntimeSec + READY_GRACE_SEC) * 1000;
        const ready = await waitForState(source, sock, ['ready'], readyDeadline, ctx.stopRequested);
        const mid = fioStart + (m.cutoverRuntimeSec * 1000) / 2;
        if (performance.now() < mid) await sleep(mid - performance.now());
        if (ctx.stopRequested()) throw new Interrupted();
        const tCut = performance.now();
        await requestCutover(sock);
        const done = await waitForState(source, sock, ['completed'], tCut + 30_000, ctx.stopRequested, 10);
        const stopAt = Math.max(fioStart + m.cutoverRuntimeSec * 1000, done.at + AFTER_CUTOVER_SEC * 1000);
        await Promise.race([sleep(stopAt - performance.now()), fioDone]);
        const fioSec = (performance.now() - fioStart) / 1000;
        stopFio();
        mirror = {
          fioSec,
          pauseMs: done.status.pauseMs,
          readySec: (ready.at - tMirror) / 1000,
          cutoverSec: (done.at - tCut) / 1000,
          passes: done.status.pass,
          convergence: ready.status.convergence,
          dataBytes: done.status.dataBytes,
          mirrorAtMs: rel(tMirror),
          readyAtMs: rel(ready.at),
          cutoverAtMs: rel(tCut),
          completedAtMs: rel(done.at),
          activeAtMs: null,
          beforeMaxMs: null,
          copyPhaseMaxMs: null,
          writeThroughMaxMs: null,
          nearCutoverMaxMs: null,
          afterMaxMs: null,
          sourceHungOnSigterm: false,
        };
        if (activeAt !== undefined && activeAt < tCut) mirror.activeAtMs = rel(activeAt);
      } catch (e) {
        stopFio();
        if (e instanceof Interrupted) throw e;
        mirrorError = e;
        await abortMirror(sock);
      }
    }
    const r = await fioDone;
    if (ctx.stopRequested()) throw new Interrupted();
    const log = readLatLog(`${prefix}_clat.1.log`);
    const fio = parseFioLoad(r, args, log, stoppedByUs, fioSpawnEpoch);
    ({ sourceHung } = await stopPair(source, target));
    source = undefined;
    target = undefined;
    if (mirrorError) throw mirrorError;
    if (mirror) {
      mirror.sourceHungOnSigterm = sourceHung;
      const x = mirror;
      // Our times are from fio's spawn; its log's from its job start, clockOffsetMs later.
      const k = fio.clockOffsetMs;
      for (const e of log) e[0] += k;
      const nearFrom = x.cutoverAtMs - NEAR_BEFORE_MS;
      const nearTo = x.completedAtMs + NEAR_AFTER_MS;
      const activeFrom = Math.min(x.activeAtMs ?? nearFrom, nearFrom);
      x.beforeMaxMs = maxIn(log, (t) => t < x.mirrorAtMs);
      x.copyPhaseMaxMs = maxIn(log, (t) => t >= x.mirrorAtMs && t < activeFrom);
      x.writeThroughMaxMs = maxIn(log, (t) => t >= activeFrom && t < nearFrom);
      x.nearCutoverMaxMs = maxIn(log, (t) => t >= nearFrom && t <= nearTo);
      x.afterMaxMs = maxIn(log, (t) => t > nearTo);
    }
    return { round, kind, ok: true, fio, mirror };
  } catch (e) {
    if (e instanceof Interrupted || ctx.stopRequested()) throw e;
    if (!(e instanceof Error)) throw e;
    return { round, kind, ok: false, error: e.message };
  } finally {
    await stopPair(source, target);
    removeImageAndMarkers(dst);
    removeMarkers(src);
    fs.rmSync(logDir, { recursive: true, force: true });
  }
}
