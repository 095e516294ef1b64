/**
 * Cutover row with 4 concurrent jobs (issue 14's cutover goal): one
 * `nbd-migrate serve --admin-socket` source with 4 exports (vm1..vm4, each a
 * half-allocated image on tmpfs), one writer per export
 * (bench/cutover-writer.py, python3-libnbd: 4 KiB random writes, one at a
 * time), and 4 mirrors started together with cutover "auto" and
 * --max-downtime, to 4 fresh targets: one `nbd-migrate serve` with 4
 * `incoming` exports, or 4 qemu-nbd. Handoff "forward" (writers stay on the
 * source) or "disconnect" (the source drops them; each writer reconnects to
 * its destination and writes the failed block again).
 *
 * Reported per job: pauseMs as measured by the job, and the pause as seen by
 * its writer: the longest gap between two write completions that overlaps the
 * hold [switched - pauseMs, switched] (switched: the time of the server's
 * 'cutover' log line). Also the writer's longest gap in [completed - pauseMs
 * - 500 ms, completed + 1 s], before the mirrors (baseline), over the copy,
 * and for disconnect the writer's time to see the error and to reconnect.
 *
 * A row of `npm run bench` (BENCH_MIRROR_ROWS=cutover4; mirror.ts, report.ts
 * formatCutover4), or standalone: `node dist/bench/cutover4.js` (after tsc),
 * which prints a wider table. Settings (env):
 * BENCH_CUTOVER4_REPEAT (3), BENCH_CUTOVER4_SIZE (MiB per export, 256),
 * BENCH_CUTOVER4_MAX_DOWNTIME (ms, 50), BENCH_CUTOVER4_TARGETS
 * (nbd-migrate,qemu-nbd), BENCH_CUTOVER4_HANDOFFS (forward,disconnect),
 * BENCH_CUTOVER4_JOBS (4). Samples of every (target, handoff) pair are
 * interleaved round by round.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { adminRequest, waitForJob, type JobStatus } from '../test/helpers/admin.js';
import { freePort } from '../test/helpers/net.js';
import { qemuNbd } from '../test/helpers/peers.js';
import { makeImage, startServer, type ServerHandle } from '../test/helpers/server.js';
import { benchPath, createHalfAllocatedImage } from './image.js';
import { adminSocketPath, QEMU_NBD_TARGET_SETTINGS, removeImageAndMarkers, removeMarkers, removeSocketDir } from './mirrorjob.js';
import { BenchConfigError } from './config.js';
import { Interrupted } from './proc.js';
import { median } from './stats.js';

const HOST = '127.0.0.1';
const WRITER = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../bench/cutover-writer.py');
const NEAR_BEFORE_MS = 500;
const NEAR_AFTER_MS = 1000;
const BASELINE_MS = 1500;
const AFTER_MS = 1000;

type Target = 'nbd-migrate' | 'qemu-nbd';
type Handoff = 'forward' | 'disconnect';

interface WriterReport {
  writes: number;
  errors: number;
  reconnects: number;
  gaps: Array<[number, number]>;
  longest: [number, number];
  handoffs: Array<[number, number, number]>;
}

export interface JobFigures {
  name: string;
  pauseMs: number | null;
  writerPauseMs: number | null;
  baselineMaxGapMs: number | null;
  copyMaxGapMs: number | null;
  readyPasses: number;
  errors: number;
  reconnects: number;
  writes: number;
  secToCompleted: number;
  /** disconnect: ms from the writer's last completion to its error, and from the error to its new connection (first reconnection). */
  toErrorMs: number | null;
  reconnectMs: number | null;
  /** The writer's longest gap in [completed - pauseMs - 0.5 s, completed + 1 s] (the hold, the last sweeps, the first writes after). */
  nearMaxGapMs: number | null;
  /** The server's breakdown of pauseMs (its 'cutover' log line): hold, sweep (and KiB sent), flush, fence, complete, ms. */
  phases: Record<string, number> | null;
  /** Where the writer-seen gap began, ms after the job's switch ended (negative: before). */
  writerGapStartMs: number | null;
}

export interface Cutover4Sample {
  round: number;
  target: Target;
  handoff: Handoff;
  ok: boolean;
  error?: string;
  jobs: JobFigures[];
}

interface Writer {
  proc: ChildProcess;
  started: Promise<void>;
  report: Promise<WriterReport>;
}

function startWriter(uri: string, alt: string, size: number): Writer {
  const proc = spawn('/usr/bin/python3', [WRITER, uri, alt, String(size)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  let onStarted: () => void = () => undefined;
  let failStart: (e: Error) => void = () => undefined;
  const started = new Promise<void>((res, rej) => ((onStarted = res), (failStart = rej)));
  proc.stdout!.on('data', (d: Buffer) => {
    out += d.toString();
    if (out.includes('started\n')) onStarted();
  });
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const report = new Promise<WriterReport>((res, rej) => {
    proc.on('exit', (code, sig) => {
      failStart(new Error(`writer exited ${code ?? sig} before it started: ${err.trim().slice(-500)}`));
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (!line) return rej(new Error(`writer ${uri} exited ${code ?? sig} without a report: ${err.trim().slice(-500)}`));
      res(JSON.parse(line) as WriterReport);
    });
  });
  started.catch(() => undefined);
  report.catch(() => undefined);
  return { proc, started, report };
}

function maxGapAt(r: WriterReport, from: number, to: number): [number, number] | null {
  let m: [number, number] | null = null;
  // A gap [s, s+g] overlapping [from, to].
  for (const [s, g] of r.gaps) if (s <= to && s + g >= from && (m === null || g > m[1])) m = [s, g];
  return m;
}
function maxGap(r: WriterReport, from: number, to: number): number | null {
  return maxGapAt(r, from, to)?.[1] ?? null;
}

async function sample(round: number, target: Target, handoff: Handoff, srcs: string[], maxDowntimeMs: number, sizeBytes: number): Promise<Cutover4Sample> {
  const n = srcs.length;
  const names = srcs.map((_, i) => `vm${i + 1}`);
  const dsts = srcs.map((_, i) => benchPath(`cut4-dst${i + 1}`));
  const sock = adminSocketPath(`cut4-${process.pid}`);
  let source: ServerHandle | undefined;
  const targets: Array<{ stop(): Promise<void> }> = [];
  const writers: Writer[] = [];
  const s: Cutover4Sample = { round, target, handoff, ok: false, jobs: [] };
  try {
    for (const f of srcs) removeMarkers(f);
    const srcArgs = [srcs[0]!, '--name', names[0]!, '--admin-socket', sock];
    for (let i = 1; i < n; i++) srcArgs.push('--export', `${names[i]}=${srcs[i]}`);
    source = await startServer(srcArgs, { readyTimeoutMs: 60_000 });
    const targetUris: string[] = [];
    for (const d of dsts) {
      removeImageAndMarkers(d);
      fs.rmSync(`${d}.nbd-migrate-received`, { force: true });
      await makeImage(d, sizeBytes);
    }
    if (target === 'nbd-migrate') {
      const a = [dsts[0]!, '--name', names[0]!, '--incoming'];
      for (let i = 1; i < n; i++) a.push('--export', `${names[i]}=${dsts[i]},incoming`);
      const t = await startServer(a, { readyTimeoutMs: 60_000 });
      targets.push(t);
      for (const nm of names) targetUris.push(t.uri(nm));
    } else {
      for (let i = 0; i < n; i++) {
        const port = await freePort();
        const p = await qemuNbd(dsts[i]!, names[i]!, port, QEMU_NBD_TARGET_SETTINGS);
        targets.push(p);
        targetUris.push(`nbd://${HOST}:${port}/${names[i]}`);
      }
    }
    for (let i = 0; i < n; i++) writers.push(startWriter(source.uri(names[i]), handoff === 'disconnect' ? targetUris[i]! : '', sizeBytes));
    // When each job's switch ended: its 'cutover' log line (logged right after the gate's release), by the server's clock.
    const switchedAt = new Map<string, number>();
    const phasesOf = new Map<string, Record<string, number>>();
    source.onLog((e) => {
      if (e.event === 'cutover' && typeof e.export === 'string' && typeof e.time === 'string') {
        switchedAt.set(e.export, Date.parse(e.time));
        const p = e as unknown as Record<string, unknown>;
        phasesOf.set(e.export, { hold: Number(p.holdMs), sweep: Number(p.sweepMs), sweepKiB: Math.round(Number(p.sweepBytes) / 1024), flush: Number(p.flushMs), fence: Number(p.fenceMs), complete: Number(p.completeMs) });
      }
    });
    await Promise.all(writers.map((w) => w.started));
    const tWriters = Date.now();
    await new Promise((r) => setTimeout(r, BASELINE_MS));
    const tMirror = Date.now();
    await Promise.all(
      names.map((nm, i) => adminRequest(sock, { cmd: 'mirror', export: nm, target: targetUris[i], cutover: 'auto', handoff, maxDowntime: `${maxDowntimeMs}ms` })),
    );
    const completed: Array<{ st: JobStatus; at: number }> = await Promise.all(
      names.map(async (nm) => {
        const st = await waitForJob(sock, nm, (x) => x.state === 'completed', {
          timeoutMs: 180_000,
          everyMs: 10,
          failOn: ['failed', 'aborted'],
          what: `${nm} completed`,
          wakeOn: (wake) => source!.onLog((e) => e.event === 'mirror-state' && wake()),
        });
        return { st, at: Date.now() };
      }),
    );
    await new Promise((r) => setTimeout(r, AFTER_MS));
    for (const w of writers) w.proc.kill('SIGTERM');
    const reports = await Promise.all(writers.map((w) => w.report));
    for (let i = 0; i < n; i++) {
      const { st, at } = completed[i]!;
      const r = reports[i]!;
      const pause = st.pauseMs ?? 0;
      // The pause as the writer saw it: its longest gap overlapping the job's hold [switched - pauseMs, switched]
      // (with the log's 1 ms resolution on both sides); without the log line, the slack window around completion.
      const sw = switchedAt.get(names[i]!);
      const [from, to] = sw !== undefined ? [sw - pause - 1, sw + 1] : [at - pause - NEAR_BEFORE_MS, at + NEAR_AFTER_MS];
      s.jobs.push({
        name: names[i]!,
        pauseMs: st.pauseMs,
        writerPauseMs: maxGap(r, from, to),
        nearMaxGapMs: maxGap(r, at - pause - NEAR_BEFORE_MS, at + NEAR_AFTER_MS),
        phases: phasesOf.get(names[i]!) ?? null,
        baselineMaxGapMs: maxGap(r, tWriters, tMirror),
        copyMaxGapMs: maxGap(r, tMirror, from),
        readyPasses: st.pass,
        errors: r.errors,
        reconnects: r.reconnects,
        writes: r.writes,
        secToCompleted: (at - tMirror) / 1000,
        toErrorMs: r.handoffs[0] ? r.handoffs[0][1] - r.handoffs[0][0] : null,
        reconnectMs: r.handoffs[0] ? r.handoffs[0][2] - r.handoffs[0][1] : null,
        writerGapStartMs: ((g) => (g && sw !== undefined ? Math.round((g[0] - sw) * 10) / 10 : null))(maxGapAt(r, from, to)),
      });
    }
    s.ok = true;
  } catch (e) {
    s.error = e instanceof Error ? e.message : String(e);
  } finally {
    for (const w of writers) if (w.proc.exitCode === null) w.proc.kill('SIGKILL');
    await source?.stop();
    for (const t of targets) await t.stop();
    for (const d of dsts) {
      removeImageAndMarkers(d);
      fs.rmSync(`${d}.nbd-migrate-received`, { force: true }); // a completed migration's: the next sample's --incoming would refuse the image
    }
    for (const f of srcs) removeMarkers(f);
  }
  return s;
}

export interface Cutover4Settings {
  repeat: number;
  sizeMiB: number;
  maxDowntimeMs: number;
  jobs: number;
  targets: Target[];
  handoffs: Handoff[];
}

/** An integer setting from the environment: unset or empty gives the default; anything else must be an integer >= min. */
function intSetting(env: NodeJS.ProcessEnv, name: string, dflt: number, min: number): number {
  const v = env[name];
  if (v === undefined || v.trim() === '') return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new BenchConfigError(`${name}: expected an integer >= ${min}, got "${v}"`);
  return n;
}

/** A comma-separated list from the environment, each item one of `valid` (duplicates dropped, order kept). */
function listSetting<T extends string>(env: NodeJS.ProcessEnv, name: string, valid: readonly T[]): T[] {
  const v = env[name];
  if (v === undefined || v.trim() === '') return [...valid];
  const picked = v.split(',').map((x) => x.trim());
  for (const p of picked)
    if (!(valid as readonly string[]).includes(p)) throw new BenchConfigError(`${name}: unknown "${p}" (choose from ${valid.join(', ')})`);
  return [...new Set(picked)] as T[];
}

/** The row's settings from BENCH_CUTOVER4_* (see the header); a malformed value throws a BenchConfigError naming it. */
export function cutover4Settings(env: NodeJS.ProcessEnv = process.env): Cutover4Settings {
  return {
    repeat: intSetting(env, 'BENCH_CUTOVER4_REPEAT', 3, 1),
    // Each export is half data in 16 MiB runs (createHalfAllocatedImage).
    sizeMiB: intSetting(env, 'BENCH_CUTOVER4_SIZE', 256, 32),
    maxDowntimeMs: intSetting(env, 'BENCH_CUTOVER4_MAX_DOWNTIME', 50, 1),
    jobs: intSetting(env, 'BENCH_CUTOVER4_JOBS', 4, 1),
    targets: listSetting(env, 'BENCH_CUTOVER4_TARGETS', ['nbd-migrate', 'qemu-nbd'] as const),
    handoffs: listSetting(env, 'BENCH_CUTOVER4_HANDOFFS', ['forward', 'disconnect'] as const),
  };
}

/** Runs the row; samples are pushed to `opts.samples` as they arrive (so an interrupt can still print them). */
export async function runCutover4(
  opts: { settings?: Cutover4Settings; samples?: Cutover4Sample[]; progress?: (line: string) => void; stopRequested?: () => boolean; quiet?: boolean } = {},
): Promise<Cutover4Sample[]> {
  const st = opts.settings ?? cutover4Settings();
  const { repeat, sizeMiB, maxDowntimeMs } = st;
  const nJobs = st.jobs;
  const { targets, handoffs } = st;
  const progress = opts.progress ?? ((l: string) => console.log(l));
  const size = sizeMiB * 1024 * 1024;
  const srcs: string[] = [];
  const samples: Cutover4Sample[] = opts.samples ?? [];
  try {
    for (let i = 0; i < nJobs; i++) srcs.push(createHalfAllocatedImage(benchPath(`cut4-src${i + 1}`), size, 16 * 1024 * 1024));
    const combos = targets.flatMap((t) => handoffs.map((h) => [t, h] as const));
    for (let round = 1; round <= repeat; round++) {
      for (let k = 0; k < combos.length; k++) {
        if (opts.stopRequested?.()) throw new Interrupted();
        const [t, h] = combos[(k + round - 1) % combos.length]!;
        const x = await sample(round, t, h, srcs, maxDowntimeMs, size);
        samples.push(x);
        const line = x.ok
          ? x.jobs
              .map((j) => `${j.name} pause ${j.pauseMs} / writer ${j.writerPauseMs?.toFixed(1) ?? '-'} ms at ${j.writerGapStartMs ?? '-'} (near ${j.nearMaxGapMs?.toFixed(1) ?? '-'}, copy ${j.copyMaxGapMs?.toFixed(1) ?? '-'}, base ${j.baselineMaxGapMs?.toFixed(1) ?? '-'}, err ${j.errors}${j.reconnectMs !== null ? `, to error ${j.toErrorMs!.toFixed(1)}, reconnect ${j.reconnectMs.toFixed(1)}` : ''}, ${j.secToCompleted.toFixed(1)} s)`)
              .join('; ')
          : `FAILED: ${x.error?.split('\n')[0]}`;
        progress(`[cutover4 ${samples.length}/${repeat * combos.length}] round ${round} ${t.padEnd(11)} ${h.padEnd(10)} ${line}`);
      }
    }
  } finally {
    for (const f of srcs) removeImageAndMarkers(f);
    removeSocketDir();
  }
  if (opts.quiet) return samples;
  console.log(`\ncutover4: ${nJobs} jobs, ${sizeMiB} MiB each (half data), one 4 KiB QD1 writer each, cutover auto, --max-downtime ${maxDowntimeMs} ms, ${repeat} rounds; medians (max) over all jobs of all rounds`);
  console.log('target       handoff     job pause ms      writer-seen ms    writer/max-downtime  near gap ms    copy gap ms  baseline gap ms  to error ms  reconnect ms  failed');
  for (const t of targets)
    for (const h of handoffs) {
      const xs = samples.filter((x) => x.target === t && x.handoff === h);
      const jobs = xs.filter((x) => x.ok).flatMap((x) => x.jobs);
      const f = (sel: (j: JobFigures) => number | null) => {
        const v = jobs.map(sel).filter((z): z is number => z !== null);
        const m = median(v);
        return m === null ? '-' : `${m.toFixed(1)} (${Math.max(...v).toFixed(1)})`;
      };
      const wm = median(jobs.map((j) => j.writerPauseMs).filter((z): z is number => z !== null));
      console.log(
        `${t.padEnd(12)} ${h.padEnd(11)} ${f((j) => j.pauseMs).padEnd(17)} ${f((j) => j.writerPauseMs).padEnd(17)} ${(wm === null ? '-' : (wm / maxDowntimeMs).toFixed(2) + '×').padEnd(20)} ${f((j) => j.nearMaxGapMs).padEnd(14)} ${f((j) => j.copyMaxGapMs).padEnd(12)} ${f((j) => j.baselineMaxGapMs).padEnd(16)} ${f((j) => j.toErrorMs).padEnd(12)} ${f((j) => j.reconnectMs).padEnd(13)} ${xs.filter((x) => !x.ok).length}`,
      );
    }
  if (process.env.BENCH_CUTOVER4_JSON) fs.writeFileSync(process.env.BENCH_CUTOVER4_JSON, JSON.stringify(samples, null, 1));
  return samples;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  runCutover4().catch((e) => {
    console.error(e instanceof BenchConfigError ? `bench cutover4: ${e.message}` : e);
    process.exit(1);
  });
}
