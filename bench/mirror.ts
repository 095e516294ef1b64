/**
 * The mirror suite (BENCH_SUITES=mirror): three rows about live migration,
 * each selectable with BENCH_MIRROR_ROWS.
 *
 *  - copy:    copy speed of nbd-migrate's mirror and copy against nbdcopy and
 *             qemu-img convert, same image, same qemu-nbd target (copyspeed.ts)
 *  - cutover: the guest-visible pause of a cutover under fio write load (cutover.ts)
 *  - bitmap:  the dirty bitmap's size and the server's RSS for a 1 TiB image (bitmapmem.ts)
 *  - actlog:  4 KiB random writes with the activity log against in-memory tracking only (actlog.ts)
 *
 * Samples are interleaved like the fio suite's: methods (or baseline and
 * migrate) alternate within a round and their order rotates each round.
 */
import * as fs from 'node:fs';
import { formatBytes } from '../src/util/units.js';
import { ACTLOG_MODES, formatActlog, measureActlog, summariseActlog, type ActlogRow, type ActlogSample } from './actlog.js';
import { BITMAP_IO_SEC, BITMAP_SMALL_SIZE, measureBitmap, type BitmapSample, type GoodBitmapSample } from './bitmapmem.js';
import type { CopyMethodName, MirrorConfig } from './config.js';
import { COPY_METHOD_LABELS, createCopySource, measureCopy, type CopySample, type GoodCopySample } from './copyspeed.js';
import { cutover4Settings, runCutover4, type Cutover4Sample, type Cutover4Settings } from './cutover4.js';
import { formatCutover4 } from './report.js';
import { AFTER_CUTOVER_SEC, MIRROR_AT_SEC, measureCutover, type CutoverKind, type CutoverSample, type GoodCutoverSample } from './cutover.js';
import { FILL_METHODS, fillSize, formatFill, measureFill, startFillSource, summariseFill, type FillRow, type FillSample } from './fill.js';
import { formatReadCache, measureReadCache, READCACHE_MODES, readCacheSettings, summariseReadCache, type ReadCacheRow, type ReadCacheSample, type ReadCacheSettings } from './readcache.js';
import { benchPath, createHalfAllocatedImage } from './image.js';
import { removeImageAndMarkers, removeSocketDir } from './mirrorjob.js';
import { formatWan, runWan, type WanResults } from './wan.js';
import { Interrupted } from './proc.js';
import { median, table } from './report.js';
import { rotate, type RoundsContext } from './fio-sample.js';

export interface CopyRow {
  method: CopyMethodName;
  label: string;
  samples: number[];
  failures: number;
  medianSec: number | null;
  /** median ÷ the fastest method's median (1.00x = the fastest). */
  ratio: number | null;
  /** Image bytes per second (its full virtual size, holes included), MB/s. */
  imageMBps: number | null;
  copierCpuSec: number | null;
  targetCpuSec: number | null;
  /** true: compared equal; false: MISMATCH; null: never compared (no good sample). */
  verified: boolean | null;
  mirrorPauseMs: number | null;
  sourceHungOnSigterm: number;
}

export interface CutoverColumn {
  kind: CutoverKind;
  runs: number;
  failures: number;
  iops: number | null;
  clatMaxMs: number | null;
  clatP99Ms: number | null;
  clatP999Ms: number | null;
  /** Summed over all runs: fio must see none. */
  fioErrors: number;
  pauseMs: number | null;
  beforeMaxMs: number | null;
  copyPhaseMaxMs: number | null;
  writeThroughMaxMs: number | null;
  nearCutoverMaxMs: number | null;
  afterMaxMs: number | null;
  /** Seconds from the mirror command to write-through ("active") in force. */
  activeSec: number | null;
  /** fio's run time, s (migrate runs last until a few seconds after the switch). */
  fioSec: number | null;
  readySec: number | null;
  cutoverSec: number | null;
  sourceHungOnSigterm: number;
}

export interface BitmapRow {
  size: number;
  runs: number;
  failures: number;
  bitmapBytes: number | null;
  granularity: number | null;
  rssBytes: number | null;
  hwmBytes: number | null;
  readySec: number | null;
  /** The same after BITMAP_IO_SEC s of random 4 KiB writes over the whole export. */
  ioRssBytes: number | null;
  ioHwmBytes: number | null;
  ioWriteIops: number | null;
  ioDirtyBytes: number | null;
}

export interface MirrorResults {
  copy?: { settings: { size: number; allocated: number; repeat: number; methods: CopyMethodName[] }; rows: CopyRow[]; samples: CopySample[] };
  cutover?: {
    settings: { size: number; runtimeSec: number; iodepth: number; target: string; mirrorAtSec: number; repeat: number };
    columns: CutoverColumn[];
    samples: CutoverSample[];
  };
  bitmap?: { settings: { sizes: number[]; repeat: number }; rows: BitmapRow[]; samples: BitmapSample[] };
  actlog?: { settings: { size: number; repeat: number; iodepth: number; runtimeSec: number; rampSec: number }; row: ActlogRow; samples: ActlogSample[] };
  readcache?: { settings: ReadCacheSettings & { repeat: number }; row: ReadCacheRow; samples: ReadCacheSample[] };
  fill?: { settings: { size: number; repeat: number }; row: FillRow; samples: FillSample[] };
  cutover4?: { settings: Cutover4Settings; samples: Cutover4Sample[] };
  wan?: WanResults;
  /** Copies that differed from their source: the run exits non-zero. */
  mismatches: string[];
}

/** What every suite is run with (fio-sample.ts). */
export type MirrorContext = RoundsContext;

const med = <T>(xs: readonly T[], pick: (x: T) => number | null | undefined): number | null =>
  median(xs.map(pick).filter((v): v is number => typeof v === 'number' && Number.isFinite(v)));

/** Seconds per cutover4 sample (4 jobs of 256 MiB, 1.5 s baseline, 1 s after): measured 6-16 s, one round of 4 samples 55 s on 2 cores. */
const CUTOVER4_SAMPLE_SEC = 14;

/** Rough seconds the suite will take, for the start-up estimate. */
export function estimateMirrorSec(m: MirrorConfig): number {
  let s = 0;
  if (m.rows.includes('copy')) s += 3 + m.copyMethods.length * (m.copyRepeat * 5 + 3);
  if (m.rows.includes('wan')) s += 2 + m.wan.repeat * m.wan.methods.reduce((n, x) => n + (x.startsWith('qemu-img') ? 32 : 8), 0);
  if (m.rows.includes('cutover')) s += 1 + m.repeat * (2 * m.cutoverRuntimeSec + 10);
  if (m.rows.includes('bitmap')) s += m.repeat * 2 * 2.5;
  if (m.rows.includes('readcache')) s += m.repeat * 2 * 12;
  if (m.rows.includes('fill')) s += 3 + m.repeat * FILL_METHODS.length * 5;
  if (m.rows.includes('actlog')) s += 2 + m.repeat * ACTLOG_MODES.length * 8;
  if (m.rows.includes('cutover4')) {
    const c = cutover4Settings();
    s += 2 + c.repeat * c.targets.length * c.handoffs.length * CUTOVER4_SAMPLE_SEC;
  }
  return s;
}

export function summariseCopy(samples: readonly CopySample[], methods: readonly CopyMethodName[], size: number): CopyRow[] {
  const rows: CopyRow[] = methods.map((method) => {
    const mine = samples.filter((s) => s.method === method);
    const good = mine.filter((s): s is GoodCopySample => s.ok);
    const medianSec = med(good, (s) => s.seconds);
    const checks = good.filter((s) => s.verified !== null);
    return {
      method,
      label: COPY_METHOD_LABELS[method],
      samples: good.map((s) => s.seconds),
      failures: mine.length - good.length,
      medianSec,
      ratio: null,
      imageMBps: medianSec ? size / 1e6 / medianSec : null,
      copierCpuSec: med(good, (s) => s.copierCpuSec),
      targetCpuSec: med(good, (s) => s.targetCpuSec),
      verified: checks.length === 0 ? null : checks.every((s) => s.verified === true),
      mirrorPauseMs: med(good, (s) => s.mirror?.pauseMs),
      sourceHungOnSigterm: good.filter((s) => s.mirror?.sourceHungOnSigterm).length,
    };
  });
  const fastest = Math.min(...rows.filter((r) => r.medianSec !== null).map((r) => r.medianSec!));
  for (const r of rows) if (r.medianSec !== null && Number.isFinite(fastest) && fastest > 0) r.ratio = r.medianSec / fastest;
  return rows;
}

/** `runtimeSec`: the baseline's fio run time (migrate runs record their own). */
export function summariseCutover(samples: readonly CutoverSample[], runtimeSec: number): CutoverColumn[] {
  return (['baseline', 'migrate'] as const).map((kind) => {
    const mine = samples.filter((s) => s.kind === kind);
    const good = mine.filter((s): s is GoodCutoverSample => s.ok);
    return {
      kind,
      runs: good.length,
      failures: mine.length - good.length,
      iops: med(good, (s) => s.fio.iops),
      clatMaxMs: med(good, (s) => s.fio.clatMaxMs),
      clatP99Ms: med(good, (s) => s.fio.clatP99Ms),
      clatP999Ms: med(good, (s) => s.fio.clatP999Ms),
      fioErrors: good.reduce((a, s) => a + s.fio.errors, 0),
      pauseMs: med(good, (s) => s.mirror?.pauseMs),
      beforeMaxMs: med(good, (s) => s.mirror?.beforeMaxMs),
      copyPhaseMaxMs: med(good, (s) => s.mirror?.copyPhaseMaxMs),
      writeThroughMaxMs: med(good, (s) => s.mirror?.writeThroughMaxMs),
      nearCutoverMaxMs: med(good, (s) => s.mirror?.nearCutoverMaxMs),
      afterMaxMs: med(good, (s) => s.mirror?.afterMaxMs),
      activeSec: med(good, (s) => (s.mirror && s.mirror.activeAtMs !== null ? (s.mirror.activeAtMs - s.mirror.mirrorAtMs) / 1000 : null)),
      fioSec: kind === 'baseline' ? (good.length ? runtimeSec : null) : med(good, (s) => s.mirror?.fioSec),
      readySec: med(good, (s) => s.mirror?.readySec),
      cutoverSec: med(good, (s) => s.mirror?.cutoverSec),
      sourceHungOnSigterm: good.filter((s) => s.mirror?.sourceHungOnSigterm).length,
    };
  });
}

export function summariseBitmap(samples: readonly BitmapSample[], sizes: readonly number[]): BitmapRow[] {
  return sizes.map((size) => {
    const mine = samples.filter((s) => s.size === size);
    const good = mine.filter((s): s is GoodBitmapSample => s.ok);
    return {
      size,
      runs: good.length,
      failures: mine.length - good.length,
      bitmapBytes: med(good, (s) => s.bitmapBytes),
      granularity: med(good, (s) => s.granularity),
      rssBytes: med(good, (s) => s.rssBytes),
      hwmBytes: med(good, (s) => s.hwmBytes),
      readySec: med(good, (s) => s.readySec),
      ioRssBytes: med(good, (s) => s.io.rssBytes),
      ioHwmBytes: med(good, (s) => s.io.hwmBytes),
      ioWriteIops: med(good, (s) => s.io.writeIops),
      ioDirtyBytes: med(good, (s) => s.io.dirtyBytes),
    };
  });
}

/** Runs the selected mirror rows; `results` is filled in as samples arrive, so an interrupt can still print them. */
export async function runMirrorSuite(ctx: MirrorContext, results: MirrorResults): Promise<void> {
  const m = ctx.cfg.mirror;
  const check = () => {
    if (ctx.stopRequested()) throw new Interrupted();
  };
  try {
    if (m.rows.includes('copy')) {
      const samples: CopySample[] = [];
      const t0 = Date.now();
      const src = createCopySource(m.copySize);
      ctx.progress(`copy source ${src} (${fmtBytes(m.copySize)}, half data / half holes) written in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      const allocated = halfAllocated(m.copySize);
      results.copy = { settings: { size: m.copySize, allocated, repeat: m.copyRepeat, methods: m.copyMethods }, rows: [], samples };
      let keepSource = false;
      try {
        const total = m.copyRepeat * m.copyMethods.length;
        for (let round = 1; round <= m.copyRepeat; round++) {
          for (const method of rotate(m.copyMethods, round - 1)) {
            check();
            // Verify each method once: its first good sample.
            const verify = !samples.some((s) => s.method === method && s.ok && s.verified !== null);
            const s = await measureCopy(ctx, src, method, round, verify);
            samples.push(s);
            results.copy.rows = summariseCopy(samples, m.copyMethods, m.copySize);
            if (s.ok && s.verified === false) {
              keepSource = true;
              results.mismatches.push(`${COPY_METHOD_LABELS[method]}: target ${s.keptTarget} differs from source ${src}`);
            }
            const what = s.ok
              ? `${s.seconds.toFixed(2).padStart(6)} s` +
                (s.copierCpuSec === null ? '' : `  copier cpu ${s.copierCpuSec.toFixed(2)} s`) +
                (s.verified === true ? '  (verified)' : s.verified === false ? '  MISMATCH' : '') +
                (s.mirror?.sourceHungOnSigterm ? '  (source ignored SIGTERM)' : '')
              : `FAILED: ${s.error.split('\n')[0]}`;
            ctx.progress(`[copy ${String(samples.length).padStart(String(total).length)}/${total}] round ${round} ${COPY_METHOD_LABELS[method].padEnd(32)} ${what}`);
          }
        }
        // Methods whose every sample failed were never verified; nothing else to do here.
      } finally {
        if (keepSource) {
          const kept = benchPath('MISMATCH-copy-src');
          fs.renameSync(src, kept);
          results.mismatches = results.mismatches.map((x) => x.replace(src, kept));
          ctx.progress(`!!! kept the copy source as ${kept} for inspection`);
        }
        removeImageAndMarkers(src);
      }
    }

    if (m.rows.includes('wan')) {
      check();
      const total = m.wan.repeat * m.wan.methods.length;
      results.wan = await runWan(ctx, m, (r, s) => {
        results.wan = r;
        if (s.ok && s.verified === false) results.mismatches.push(`wan ${COPY_METHOD_LABELS[s.method]}: target ${s.keptTarget} differs from its source`);
        const what = s.ok ? `${s.seconds.toFixed(2).padStart(6)} s${s.verified === true ? '  (verified)' : s.verified === false ? '  MISMATCH' : ''}` : `FAILED: ${s.error.split('\n')[0]}`;
        ctx.progress(`[wan ${String(r.samples.length).padStart(String(total).length)}/${total}] round ${s.round} ${COPY_METHOD_LABELS[s.method].padEnd(32)} ${what}`);
      });
    }

    if (m.rows.includes('cutover')) {
      check();
      const samples: CutoverSample[] = [];
      const t0 = Date.now();
      const src = createHalfAllocatedImage(benchPath('cutover-src'), m.cutoverSize);
      ctx.progress(`cutover source ${src} (${fmtBytes(m.cutoverSize)}, half data / half holes) written in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      results.cutover = {
        settings: { size: m.cutoverSize, runtimeSec: m.cutoverRuntimeSec, iodepth: m.cutoverIodepth, target: m.cutoverTarget, mirrorAtSec: MIRROR_AT_SEC, repeat: m.repeat },
        columns: [],
        samples,
      };
      try {
        const total = m.repeat * 2;
        for (let round = 1; round <= m.repeat; round++) {
          for (const kind of rotate(['baseline', 'migrate'] as const, round - 1)) {
            check();
            const s = await measureCutover(ctx, src, kind, round);
            samples.push(s);
            results.cutover.columns = summariseCutover(samples, m.cutoverRuntimeSec);
            const what = s.ok
              ? `${Math.round(s.fio.iops).toString().padStart(6)} IOPS  max write latency ${s.fio.clatMaxMs.toFixed(1)} ms  fio errors ${s.fio.errors}` +
                (s.mirror
                  ? `  pauseMs ${s.mirror.pauseMs ?? '-'}  ready after ${s.mirror.readySec.toFixed(1)} s (${s.mirror.passes} passes, convergence ${s.mirror.convergence})` +
                    `  worst latency: near cutover ${fmtMs(s.mirror.nearCutoverMaxMs)} ms, copying ${fmtMs(s.mirror.copyPhaseMaxMs)} ms,` +
                    ` write-through ${fmtMs(s.mirror.writeThroughMaxMs)} ms, after ${fmtMs(s.mirror.afterMaxMs)} ms`
                  : '')
              : `FAILED: ${s.error.split('\n')[0]}`;
            ctx.progress(`[cutover ${samples.length}/${total}] round ${round} ${kind.padEnd(8)} ${what}`);
          }
        }
      } finally {
        removeImageAndMarkers(src);
      }
    }

    if (m.rows.includes('bitmap')) {
      check();
      const samples: BitmapSample[] = [];
      const sizes = [BITMAP_SMALL_SIZE, m.bitmapSize];
      results.bitmap = { settings: { sizes, repeat: m.repeat }, rows: [], samples };
      const total = m.repeat * sizes.length;
      for (let round = 1; round <= m.repeat; round++) {
        for (const size of rotate(sizes, round - 1)) {
          check();
          const s = await measureBitmap(ctx, size, round);
          samples.push(s);
          results.bitmap.rows = summariseBitmap(samples, sizes);
          const what = s.ok
            ? `bitmapBytes ${fmtBytes(s.bitmapBytes)}  RSS ${fmtBytes(s.rssBytes)}  peak ${fmtBytes(s.hwmBytes)}  ready in ${s.readySec.toFixed(2)} s; ` +
              `after ${BITMAP_IO_SEC} s of writes (${Math.round(s.io.writeIops)} IOPS, ${fmtBytes(s.io.dirtyBytes)} dirty): RSS ${fmtBytes(s.io.rssBytes)}  peak ${fmtBytes(s.io.hwmBytes)}`
            : `FAILED: ${s.error.split('\n')[0]}`;
          ctx.progress(`[bitmap ${samples.length}/${total}] round ${round} ${fmtBytes(size).padEnd(7)} ${what}`);
        }
      }
    }

    if (m.rows.includes('actlog')) {
      check();
      const samples: ActlogSample[] = [];
      const cfg = ctx.cfg;
      const image = createHalfAllocatedImage(benchPath('actlog'), cfg.imageSize);
      results.actlog = { settings: { size: cfg.imageSize, repeat: m.repeat, iodepth: cfg.iodepth, runtimeSec: cfg.runtimeSec, rampSec: cfg.rampSec }, row: summariseActlog([]), samples };
      try {
        const total = m.repeat * ACTLOG_MODES.length;
        for (let round = 1; round <= m.repeat; round++) {
          for (const mode of rotate(ACTLOG_MODES, round - 1)) {
            check();
            const s = await measureActlog(ctx, image, mode, round);
            samples.push(s);
            results.actlog.row = summariseActlog(samples);
            const what = s.ok ? `${Math.round(s.iops!)} IOPS` : `FAILED: ${(s.error ?? '').split('\n')[0]}`;
            ctx.progress(`[actlog ${samples.length}/${total}] round ${round} ${mode.padEnd(7)} ${what}`);
          }
        }
      } finally {
        removeImageAndMarkers(image);
      }
    }
    if (m.rows.includes('cutover4')) {
      check();
      const settings = cutover4Settings();
      results.cutover4 = { settings, samples: [] };
      await runCutover4({ settings, samples: results.cutover4.samples, progress: ctx.progress, stopRequested: ctx.stopRequested, quiet: true });
    }
    if (m.rows.includes('readcache')) {
      check();
      const settings = readCacheSettings();
      const samples: ReadCacheSample[] = [];
      results.readcache = { settings: { ...settings, repeat: m.repeat }, row: summariseReadCache([]), samples };
      const dir = benchPath('readcache').replace(/\/[^/]*$/, '');
      const total = m.repeat * READCACHE_MODES.length;
      for (let round = 1; round <= m.repeat; round++) {
        for (const mode of rotate(READCACHE_MODES, round - 1)) {
          check();
          const s = await measureReadCache({ bin: ctx.cfg.nbdMigrateBin, dir, settings, stopRequested: ctx.stopRequested }, mode, round);
          samples.push(s);
          results.readcache.row = summariseReadCache(samples);
          const what = s.ok ? `median ${s.medianMs!.toFixed(2)} ms, ${Math.round(s.readsPerSec!)} reads/s` : `FAILED: ${(s.error ?? '').split('\n')[0]}`;
          ctx.progress(`[readcache ${samples.length}/${total}] round ${round} ${mode.padEnd(5)} ${what}`);
        }
      }
    }
    if (m.rows.includes('fill')) {
      check();
      const size = fillSize();
      const samples: FillSample[] = [];
      results.fill = { settings: { size, repeat: m.repeat }, row: summariseFill([]), samples };
      const src = await startFillSource(size);
      try {
        const total = m.repeat * FILL_METHODS.length;
        for (let round = 1; round <= m.repeat; round++) {
          for (const method of rotate(FILL_METHODS, round - 1)) {
            check();
            const s = await measureFill({ bin: ctx.cfg.nbdMigrateBin, stopRequested: ctx.stopRequested }, src, size, method, round);
            samples.push(s);
            results.fill.row = summariseFill(samples);
            const what = s.ok ? `${s.seconds!.toFixed(2)} s` : `FAILED: ${(s.error ?? '').split('\n')[0]}`;
            ctx.progress(`[fill ${samples.length}/${total}] round ${round} ${method.padEnd(16)} ${what}`);
          }
        }
      } finally {
        await src.stop();
      }
    }
  } finally {
    removeSocketDir();
  }
}

/** Bytes of data in a half-allocated image of `size` (64 MiB runs, data first). */
function halfAllocated(size: number, run = 64 * 1024 * 1024): number {
  let n = 0;
  for (let start = 0; start < size; start += 2 * run) n += Math.min(run, size - start);
  return n;
}

const fmtBytes = (n: number | null): string => (n === null ? '-' : formatBytes(n, { compact: true }));

function fmtMs(v: number | null | undefined): string {
  if (v === null || v === undefined) return '-';
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

const fmtSec = (v: number | null): string => (v === null ? '-' : v.toFixed(2));

export function formatMirrorResults(r: MirrorResults): string {
  const out: string[] = [];
  if (r.copy) {
    const c = r.copy;
    out.push(
      `mirror rows: copy ${fmtBytes(c.settings.size)} raw image (${fmtBytes(c.settings.allocated)} of random data in 64 MiB runs, the rest holes) ` +
        `from tmpfs to qemu-nbd (--cache=writeback, fresh sparse file on tmpfs) over 127.0.0.1, wall clock`,
    );
    out.push(`median of ${c.settings.repeat} run${c.settings.repeat === 1 ? '' : 's'}; ratio = median / the fastest method's median (1.00x = fastest; lower is better)`);
    out.push('');
    const head = ['method', 'seconds', 'ratio', 'MB/s', 'copier cpu s', 'target cpu s', 'verified'];
    const body = c.rows.map((row) => [
      row.label,
      fmtSec(row.medianSec) + (row.failures ? ` (${row.failures} failed)` : ''),
      row.ratio === null ? '-' : `${row.ratio.toFixed(2)}x`,
      row.imageMBps === null ? '-' : row.imageMBps.toFixed(0),
      fmtSec(row.copierCpuSec),
      fmtSec(row.targetCpuSec),
      row.verified === null ? '-' : row.verified ? 'yes' : 'MISMATCH',
    ]);
    out.push(table([head, ...body]));
    out.push('MB/s: the image\'s full size (holes included) per second. copier cpu: user+system seconds of the copying process');
    out.push('(for the mirror, the source server); target cpu: the qemu-nbd target\'s. verified: qemu-img compare of source and target, once per method.');
    const mirrorRow = c.rows.find((x) => x.method === 'nbd-migrate-mirror');
    if (mirrorRow && mirrorRow.medianSec !== null) {
      const good = c.samples.filter((s): s is GoodCopySample => s.ok && s.method === 'nbd-migrate-mirror');
      const last = good[good.length - 1]?.mirror;
      out.push(
        `mirror job: cutover pause ${fmtMs(mirrorRow.mirrorPauseMs)} ms (median)` +
          (last ? `; it copied ${fmtBytes(last.dataBytes)} of data, zeroed ${fmtBytes(last.zeroBytes)}, skipped ${fmtBytes(last.skippedBytes)} of holes` : '') +
          (mirrorRow.sourceHungOnSigterm ? `; the source server ignored SIGTERM after the switch in ${mirrorRow.sourceHungOnSigterm}/${good.length} runs` : ''),
      );
    }
    out.push('');
    out.push('raw samples by round: seconds');
    const rounds = Math.max(0, ...c.samples.map((s) => s.round));
    const rawHead = ['method', ...Array.from({ length: rounds }, (_, i) => `round ${i + 1}`)];
    const rawBody = c.rows.map((row) => [
      row.label,
      ...Array.from({ length: rounds }, (_, i) => {
        const s = c.samples.find((x) => x.method === row.method && x.round === i + 1);
        return !s ? '' : s.ok ? s.seconds.toFixed(2) : 'FAILED';
      }),
    ]);
    out.push(table([rawHead, ...rawBody]));
    const failed = c.samples.filter((s) => !s.ok);
    for (const f of failed) if (!f.ok) out.push(`  round ${f.round} ${COPY_METHOD_LABELS[f.method]} failed: ${f.error.split('\n')[0]}`);
  }

  if (r.wan) {
    if (out.length) out.push('');
    out.push(formatWan(r.wan));
  }

  if (r.cutover) {
    const c = r.cutover;
    const s = c.settings;
    if (out.length) out.push('');
    out.push(
      `mirror rows: cutover under load: fio randwrite 4k, iodepth ${s.iodepth}, 1 connection, ${s.runtimeSec} s or more, to the nbd-migrate source ` +
        `(${fmtBytes(s.size)} half-allocated image on tmpfs); migrate runs start a mirror (cutover manual) to ${s.target} at ${s.mirrorAtSec} s ` +
        `and cut over at ${s.runtimeSec / 2} s (or once ready, if later)`,
    );
    out.push(`median of ${s.repeat} run${s.repeat === 1 ? '' : 's'} each; goal: the pause a guest sees under 50 ms`);
    out.push('');
    const [base, mig] = [c.columns.find((x) => x.kind === 'baseline'), c.columns.find((x) => x.kind === 'migrate')];
    const col = (x: CutoverColumn | undefined, f: (x: CutoverColumn) => string) => (x && x.runs > 0 ? f(x) : '-');
    const rows: string[][] = [
      ['', 'baseline', 'migrate'],
      ['runs (failed)', col(base, (x) => `${x.runs}${x.failures ? ` (${x.failures})` : ''}`), col(mig, (x) => `${x.runs}${x.failures ? ` (${x.failures})` : ''}`)],
      ['write IOPS', col(base, (x) => String(Math.round(x.iops ?? 0))), col(mig, (x) => String(Math.round(x.iops ?? 0)))],
      ['max write latency, ms', col(base, (x) => fmtMs(x.clatMaxMs)), col(mig, (x) => fmtMs(x.clatMaxMs))],
      ['p99.9 write latency, ms', col(base, (x) => fmtMs(x.clatP999Ms)), col(mig, (x) => fmtMs(x.clatP999Ms))],
      ['p99 write latency, ms', col(base, (x) => fmtMs(x.clatP99Ms)), col(mig, (x) => fmtMs(x.clatP99Ms))],
      ['fio errors (all runs)', col(base, (x) => String(x.fioErrors)), col(mig, (x) => String(x.fioErrors))],
      ['pauseMs (server)', '-', col(mig, (x) => fmtMs(x.pauseMs))],
      ['worst latency near cutover, ms', '-', col(mig, (x) => fmtMs(x.nearCutoverMaxMs))],
      ['  before the mirror, ms', '-', col(mig, (x) => fmtMs(x.beforeMaxMs))],
      ['  copying (sweeps), ms', '-', col(mig, (x) => fmtMs(x.copyPhaseMaxMs))],
      ['  copying + write-through, ms', '-', col(mig, (x) => fmtMs(x.writeThroughMaxMs))],
      ['  after the switch, ms', '-', col(mig, (x) => fmtMs(x.afterMaxMs))],
      ['fio run time, s', col(base, (x) => fmtSec(x.fioSec)), col(mig, (x) => fmtSec(x.fioSec))],
      ['mirror to write-through, s', '-', col(mig, (x) => fmtSec(x.activeSec))],
      ['mirror to ready, s', '-', col(mig, (x) => fmtSec(x.readySec))],
      ['cutover request to completed, s', '-', col(mig, (x) => fmtSec(x.cutoverSec))],
    ];
    out.push(table(rows));
    out.push('max write latency: fio\'s largest write completion latency over the whole run (what a guest sees as the pause).');
    out.push('worst latency near cutover: the largest 10 ms-window maximum in fio\'s latency log from 0.5 s before the cutover request');
    out.push('to 1 s after completion; the indented rows split the rest of the run by phase: copying in sweeps (guest writes only');
    out.push('marked dirty), copying with write-through (guest writes also sent to the target, under the copy\'s range locks), and after');
    out.push(`the switch (guest I/O forwarded to the target). Migrate runs last until ${AFTER_CUTOVER_SEC} s after the switch (at least as long`);
    out.push('as the baseline), so their maximum covers a longer run.');
    if (mig && mig.sourceHungOnSigterm) out.push(`the source server ignored SIGTERM after the switch in ${mig.sourceHungOnSigterm}/${mig.runs} runs`);
    if (mig && mig.runs > 0) {
      const verdict = (v: number | null) => (v === null ? '-' : v < 50 ? 'met' : 'NOT met');
      out.push(
        `goal (< 50 ms), by the medians: server pause ${fmtMs(mig.pauseMs)} ms: ${verdict(mig.pauseMs)}; ` +
          `worst write latency near the cutover ${fmtMs(mig.nearCutoverMaxMs)} ms: ${verdict(mig.nearCutoverMaxMs)}` +
          (base && base.runs > 0 ? ` (the baseline's worst over its whole run: ${fmtMs(base.clatMaxMs)} ms)` : ''),
      );
    }
    out.push('');
    out.push('raw samples by round: IOPS / max write latency ms / errors [/ pauseMs / worst near cutover ms]');
    const rounds = Math.max(0, ...c.samples.map((x) => x.round));
    const rawHead = ['run', ...Array.from({ length: rounds }, (_, i) => `round ${i + 1}`)];
    const rawBody = (['baseline', 'migrate'] as const).map((kind) => [
      kind,
      ...Array.from({ length: rounds }, (_, i) => {
        const x = c.samples.find((y) => y.kind === kind && y.round === i + 1);
        if (!x) return '';
        if (!x.ok) return 'FAILED';
        const f = `${Math.round(x.fio.iops)} / ${fmtMs(x.fio.clatMaxMs)} / ${x.fio.errors}`;
        return x.mirror ? `${f} / ${fmtMs(x.mirror.pauseMs)} / ${fmtMs(x.mirror.nearCutoverMaxMs)}` : f;
      }),
    ]);
    out.push(table([rawHead, ...rawBody]));
    for (const f of c.samples) if (!f.ok) out.push(`  round ${f.round} ${f.kind} failed: ${f.error.split('\n')[0]}`);
  }

  if (r.bitmap) {
    const b = r.bitmap;
    if (out.length) out.push('');
    out.push('mirror rows: dirty bitmap memory: a sparse image (truncate, no data) served by nbd-migrate with an admin socket;');
    out.push(`bitmapBytes from {"cmd":"status"}, RSS and peak RSS (VmRSS, VmHWM) from /proc/PID/status 1 s after ready,`);
    out.push(`then again after ${BITMAP_IO_SEC} s of fio random 4 KiB writes at QD16 over the whole export (under I/O; dirty = what they marked)`);
    out.push(`median of ${b.settings.repeat} run${b.settings.repeat === 1 ? '' : 's'}`);
    out.push('');
    const head = ['image', 'granularity', 'bitmapBytes', 'RSS', 'peak RSS', 'ready, s', 'write IOPS', 'dirty', 'RSS under I/O', 'peak under I/O'];
    const body = b.rows.map((row) => [
      fmtBytes(row.size) + (row.failures ? ` (${row.failures} failed)` : ''),
      fmtBytes(row.granularity),
      fmtBytes(row.bitmapBytes),
      fmtBytes(row.rssBytes),
      fmtBytes(row.hwmBytes),
      fmtSec(row.readySec),
      row.ioWriteIops === null ? '-' : String(Math.round(row.ioWriteIops)),
      fmtBytes(row.ioDirtyBytes),
      fmtBytes(row.ioRssBytes),
      fmtBytes(row.ioHwmBytes),
    ]);
    const [small, big] = b.rows;
    if (small && big && small.rssBytes !== null && big.rssBytes !== null && small.hwmBytes !== null && big.hwmBytes !== null) {
      body.push([
        'difference',
        '',
        fmtBytes((big.bitmapBytes ?? 0) - (small.bitmapBytes ?? 0)),
        fmtBytes(big.rssBytes - small.rssBytes),
        fmtBytes(big.hwmBytes - small.hwmBytes),
        fmtSec((big.readySec ?? 0) - (small.readySec ?? 0)),
        '',
        '',
        big.ioRssBytes !== null && small.ioRssBytes !== null ? fmtBytes(big.ioRssBytes - small.ioRssBytes) : '-',
        big.ioHwmBytes !== null && small.ioHwmBytes !== null ? fmtBytes(big.ioHwmBytes - small.ioHwmBytes) : '-',
      ]);
    }
    out.push(table([head, ...body]));
    for (const f of b.samples) if (!f.ok) out.push(`  round ${f.round} ${fmtBytes(f.size)} failed: ${f.error.split('\n')[0]}`);
  }

  if (r.actlog) {
    if (out.length) out.push('');
    out.push(formatActlog(r.actlog.row, r.actlog.samples, r.actlog.settings));
  }

  if (r.readcache) {
    out.push('');
    out.push(formatReadCache(r.readcache.row, r.readcache.samples, r.readcache.settings));
  }

  if (r.fill) {
    if (out.length) out.push('');
    out.push(formatFill(r.fill.row, r.fill.samples, r.fill.settings));
  }

  if (r.cutover4) {
    if (out.length) out.push('');
    out.push(formatCutover4(r.cutover4.settings, r.cutover4.samples));
  }

  if (r.mismatches.length) {
    out.push('');
    out.push('!!! COPY VERIFICATION FAILED:');
    for (const x of r.mismatches) out.push(`!!!   ${x}`);
  }
  return out.join('\n');
}

