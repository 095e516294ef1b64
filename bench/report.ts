/**
 * Samples, medians, ratios, and the printed table.
 */
import type { Cutover4Sample, Cutover4Settings, JobFigures } from './cutover4.js';
import type { FioResult } from './fio.js';
import { jobByName, type JobName } from './jobs.js';
import type { ServerName } from './servers.js';
import { median } from './stats.js';

interface SampleBase {
  round: number;
  server: ServerName;
  job: JobName;
}

export interface GoodSample extends SampleBase {
  ok: true;
  /** The row's figure: MB/s (10^6 bytes/s) for sequential jobs, IOPS for random ones. */
  value: number;
  fio: FioResult;
  /** The server process's CPU use during the fio run (ramp included), % of one core. */
  serverCpuPct: number | null;
  /** Server CPU time per request (per fio I/O), microseconds: its cost, less sensitive to contention than throughput. */
  serverCpuUsPerOp: number | null;
  /** The whole machine's CPU use during the run, % of all cores. */
  hostBusyPct: number | null;
}

export interface FailedSample extends SampleBase {
  ok: false;
  error: string;
}

export type Sample = GoodSample | FailedSample;

export interface Cell {
  server: ServerName;
  samples: number[];
  failures: number;
  median: number | null;
  /** median ÷ the best other server's median; null with no peer or no data. */
  ratio: number | null;
  serverCpuPct: number | null;
  serverCpuUsPerOp: number | null;
  fioCpuPct: number | null;
  hostBusyPct: number | null;
  clatP99Us: number | null;
}

export interface Row {
  job: JobName;
  unit: 'MB/s' | 'IOPS';
  cells: Cell[];
}

export { median };

export function unitOf(job: JobName): Row['unit'] {
  return jobByName(job).metric === 'bw' ? 'MB/s' : 'IOPS';
}

export function valueOf(job: JobName, r: FioResult): number {
  return jobByName(job).metric === 'bw' ? r.bwBytes / 1e6 : r.iops;
}

function medianOf(samples: GoodSample[], pick: (s: GoodSample) => number | null): number | null {
  return median(samples.map(pick).filter((v): v is number => v !== null));
}

export function summarise(samples: readonly Sample[], jobs: readonly JobName[], servers: readonly ServerName[]): Row[] {
  return jobs.map((job) => {
    const cells: Cell[] = servers.map((server) => {
      const mine = samples.filter((s) => s.job === job && s.server === server);
      const good = mine.filter((s): s is GoodSample => s.ok);
      return {
        server,
        samples: good.map((s) => s.value),
        failures: mine.length - good.length,
        median: median(good.map((s) => s.value)),
        ratio: null,
        serverCpuPct: medianOf(good, (s) => s.serverCpuPct),
        serverCpuUsPerOp: medianOf(good, (s) => s.serverCpuUsPerOp),
        fioCpuPct: medianOf(good, (s) => s.fio.fioCpuPct),
        hostBusyPct: medianOf(good, (s) => s.hostBusyPct),
        clatP99Us: medianOf(good, (s) => s.fio.clatP99Us),
      };
    });
    for (const c of cells) {
      // nbd-migrate's rows are compared with the peers, not with each other (its variants are the same server: VARIANT_LINES).
      const ours = c.server.startsWith('nbd-migrate');
      const peers = cells.filter((p) => p !== c && p.median !== null && !(ours && p.server.startsWith('nbd-migrate'))).map((p) => p.median!);
      if (c.median !== null && peers.length > 0) {
        const best = Math.max(...peers);
        c.ratio = best > 0 ? c.median / best : null;
      }
    }
    return { job, unit: unitOf(job), cells };
  });
}

export function fmtValue(v: number | null, unit: Row['unit']): string {
  if (v === null) return '-';
  if (unit === 'IOPS') return String(Math.round(v));
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

const fmtPct = (v: number | null): string => (v === null ? '-' : `${Math.round(v)}%`);

/** The first `leftCols` columns left-aligned, the others right-aligned, two spaces apart. */
export function table(rows: string[][], leftCols = 1): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows
    .map((r) => r.map((c, i) => (i < leftCols ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ').trimEnd())
    .join('\n');
}

/** The lines under the table that set a variant of nbd-migrate against the plain server. */
const VARIANT_LINES: ReadonlyArray<{ label: string; numerator: ServerName; denominator: ServerName; reading: string }> = [
  { label: 'with/without --metrics', numerator: 'nbd-migrate-metrics', denominator: 'nbd-migrate', reading: 'goal 1.00x' },
  { label: 'with/without busy polling', numerator: 'nbd-migrate', denominator: 'nbd-migrate-nopoll', reading: '>1.00x: polling pays' },
];

export function formatResults(rows: readonly Row[], samples: readonly Sample[], servers: readonly ServerName[], repeat: number): string {
  const out: string[] = [];
  const ratioHeader = servers.length > 1;
  out.push(`median of ${repeat} run${repeat === 1 ? '' : 's'}` + (ratioHeader ? '; ratio = median / best other server\'s median on the row, nbd-migrate\'s over the best peer (qemu-nbd, nbdkit) (>1.00x: this server is ahead)' : ''));
  out.push('');
  const head = ['job', 'unit', ...servers.flatMap((s) => (ratioHeader ? [s, 'ratio'] : [s]))];
  const body = rows.map((r) => [
    r.job,
    r.unit,
    ...r.cells.flatMap((c) => {
      const v = fmtValue(c.median, r.unit) + (c.failures ? ` (${c.failures} failed)` : '');
      return ratioHeader ? [v, c.ratio === null ? '-' : `${c.ratio.toFixed(2)}x`] : [v];
    }),
  ]);
  out.push(table([head, ...body]));
  for (const v of VARIANT_LINES) {
    const ratios = rows
      .map((r) => {
        const [num, den] = [v.numerator, v.denominator].map((n) => r.cells.find((c) => c.server === n)?.median ?? null);
        return num && den ? `${r.job} ${(num / den).toFixed(2)}x` : undefined;
      })
      .filter((x) => x !== undefined);
    if (ratios.length) out.push(`${v.label} (${v.numerator} median / ${v.denominator} median; ${v.reading}): ${ratios.join(', ')}`);
  }
  out.push('');
  out.push('per server (medians over the measured window): server CPU in % of one core and in CPU-microseconds per request;');
  out.push('fio CPU in % of one core; whole machine busy in % of all cores; completion latency p99 in microseconds');
  const detailHead = ['job', 'server', 'median', 'srv cpu', 'srv us/op', 'fio cpu', 'host', 'p99 us'];
  const detailBody = rows.flatMap((r) =>
    r.cells.map((c) => [
      r.job,
      c.server,
      `${fmtValue(c.median, r.unit)} ${r.unit}`,
      fmtPct(c.serverCpuPct),
      c.serverCpuUsPerOp === null ? '-' : c.serverCpuUsPerOp.toFixed(c.serverCpuUsPerOp >= 100 ? 0 : 1),
      fmtPct(c.fioCpuPct),
      fmtPct(c.hostBusyPct),
      c.clatP99Us === null ? '-' : String(Math.round(c.clatP99Us)),
    ]),
  );
  out.push(table([detailHead, ...detailBody], 2));

  out.push('');
  out.push('raw samples by round: value (server CPU % of one core)');
  const rounds = Math.max(0, ...samples.map((s) => s.round));
  const rawHead = ['job', 'server', ...Array.from({ length: rounds }, (_, i) => `round ${i + 1}`)];
  const rawBody: string[][] = [];
  for (const r of rows)
    for (const server of servers) {
      const mine = samples.filter((s) => s.job === r.job && s.server === server);
      if (!mine.length) continue;
      const byRound = Array.from({ length: rounds }, (_, i) => {
        const s = mine.find((x) => x.round === i + 1);
        return !s ? '' : s.ok ? `${fmtValue(s.value, r.unit)} (${fmtPct(s.serverCpuPct)})` : 'FAILED';
      });
      rawBody.push([r.job, server, ...byRound]);
    }
  if (rawBody.length) out.push(table([rawHead, ...rawBody], 2));

  const failed = samples.filter((s): s is FailedSample => !s.ok);
  if (failed.length) {
    out.push('');
    out.push(`${failed.length} failed run${failed.length === 1 ? '' : 's'}:`);
    for (const f of failed) out.push(`  round ${f.round} ${f.job} ${f.server}: ${f.error.split('\n')[0]}`);
  }
  return out.join('\n');
}

/** The cutover4 row: per (target, handoff), the job-measured and writer-seen pause, median and max over all jobs of all rounds, and their ratio to --max-downtime. */
export function formatCutover4(st: Cutover4Settings, samples: readonly Cutover4Sample[]): string {
  const out: string[] = [];
  const md = st.maxDowntimeMs;
  out.push(
    `cutover4: ${st.jobs} concurrent mirrors, ${st.sizeMiB} MiB each (half data), one 4 KiB QD1 writer each, cutover auto, --max-downtime ${md} ms, ` +
      `${st.repeat} round${st.repeat === 1 ? '' : 's'}; median and max over all jobs of all rounds; ratio = pause / --max-downtime (goal <= 1.00x);`,
    `writer-seen over the jobs whose writer had a gap > 5 ms overlapping the hold (the writer logs no shorter gaps); "<5 ms": jobs whose writer had none`,
  );
  out.push('');
  const ms = (v: number | null): string => (v === null ? '-' : v >= 100 ? v.toFixed(0) : v.toFixed(1));
  const x = (v: number | null): string => (v === null ? '-' : `${(v / md).toFixed(2)}x`);
  const head = ['target', 'handoff', 'jobs', 'job pause med', 'max', 'ratio med', 'max', 'writer-seen med', 'max', 'ratio med', 'max', '<5 ms', 'failed'];
  const body: string[][] = [];
  for (const t of st.targets)
    for (const h of st.handoffs) {
      const mine = samples.filter((s) => s.target === t && s.handoff === h);
      const jobs = mine.filter((s) => s.ok).flatMap((s) => s.jobs);
      const figs = (pick: (j: JobFigures) => number | null): [number | null, number | null] => {
        const v = jobs.map(pick).filter((z): z is number => z !== null);
        return [median(v), v.length ? Math.max(...v) : null];
      };
      const [pm, px] = figs((j) => j.pauseMs);
      const [wm, wx] = figs((j) => j.writerPauseMs);
      body.push([t, h, String(jobs.length), ms(pm), ms(px), x(pm), x(px), ms(wm), ms(wx), x(wm), x(wx), String(jobs.filter((j) => j.writerPauseMs === null).length), String(mine.length - mine.filter((s) => s.ok).length)]);
    }
  out.push(table([head, ...body], 2));
  for (const f of samples) if (!f.ok) out.push(`  round ${f.round} ${f.target} ${f.handoff} failed: ${(f.error ?? '').split('\n')[0]}`);
  return out.join('\n');
}
