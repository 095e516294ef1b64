/**
 * Mirror row "wan": the copy row across a simulated long-distance link. A
 * delay proxy (test/helpers/delay-proxy.ts) sits between the copier and the
 * qemu-nbd target: a fixed one-way delay each direction (40 ms), one bandwidth
 * cap per direction shared by all connections (1 Gbit/s), bytes in order.
 * The source is a half-allocated image (random data in 64 MiB runs, holes
 * between: 512 MiB of data in 1 GiB), so the link's limit is data / bandwidth.
 *
 * Reported per copier: median seconds, the ratio to the best peer (nbdcopy,
 * qemu-img) and to the link's limit (1.00x = the link is full the whole time).
 */
import { formatBytes } from '../src/util/units.js';
import type { CopyMethodName, MirrorConfig } from './config.js';
import { COPY_METHOD_LABELS, measureCopy, type CopyContext, type CopySample, type GoodCopySample } from './copyspeed.js';
import { benchPath, createHalfAllocatedImage } from './image.js';
import { removeImageAndMarkers } from './mirrorjob.js';
import { Interrupted } from './proc.js';
import { median, table } from './report.js';

const RUN = 64 * 1024 * 1024;
const PEERS: readonly CopyMethodName[] = ['nbdcopy', 'qemu-img', 'nbdcopy-tiz', 'qemu-img-tiz'];

export interface WanRow {
  method: CopyMethodName;
  label: string;
  samples: number[];
  failures: number;
  medianSec: number | null;
  bestSec: number | null;
  /** Median over the best peer's median (lower is better); null for the peers or without one. */
  vsPeer: number | null;
  /** Median over the link's limit (data / bandwidth). */
  vsLink: number | null;
  verified: boolean | null;
}

export interface WanResults {
  settings: { size: number; dataBytes: number; delayMs: number; bandwidth: number; repeat: number; methods: CopyMethodName[]; linkLimitSec: number };
  rows: WanRow[];
  samples: CopySample[];
}

function dataBytesOf(size: number): number {
  let data = 0;
  for (let at = 0; at < size; at += 2 * RUN) data += Math.min(RUN, size - at);
  return data;
}

export function summariseWan(samples: readonly CopySample[], settings: WanResults['settings']): WanRow[] {
  const rows: WanRow[] = settings.methods.map((method) => {
    const mine = samples.filter((s) => s.method === method);
    const good = mine.filter((s): s is GoodCopySample => s.ok);
    const secs = good.map((s) => s.seconds);
    const checks = good.filter((s) => s.verified !== null);
    const medianSec = secs.length ? median(secs) : null;
    return {
      method,
      label: COPY_METHOD_LABELS[method],
      samples: secs,
      failures: mine.length - good.length,
      medianSec,
      bestSec: secs.length ? Math.min(...secs) : null,
      vsPeer: null,
      vsLink: medianSec === null ? null : medianSec / settings.linkLimitSec,
      verified: checks.length === 0 ? null : checks.every((s) => s.verified === true),
    };
  });
  const peers = rows.filter((r) => PEERS.includes(r.method) && r.medianSec !== null);
  const best = peers.length ? Math.min(...peers.map((r) => r.medianSec!)) : null;
  for (const r of rows) if (!PEERS.includes(r.method) && r.medianSec !== null && best) r.vsPeer = r.medianSec / best;
  return rows;
}

/** Runs the row; `onSample` sees every sample as it comes (for progress and partial results). */
export async function runWan(ctx: CopyContext, m: MirrorConfig, onSample: (r: WanResults, s: CopySample) => void): Promise<WanResults> {
  const w = m.wan;
  const dataBytes = dataBytesOf(w.size);
  const settings = { size: w.size, dataBytes, delayMs: w.delayMs, bandwidth: w.bandwidth, repeat: w.repeat, methods: w.methods, linkLimitSec: dataBytes / w.bandwidth };
  const results: WanResults = { settings, rows: [], samples: [] };
  const src = createHalfAllocatedImage(benchPath('wan-src'), w.size, RUN);
  try {
    for (let round = 1; round <= w.repeat; round++) {
      const order = w.methods.map((_, i) => w.methods[(i + round - 1) % w.methods.length]!);
      for (const method of order) {
        if (ctx.stopRequested()) throw new Interrupted();
        const verify = !results.samples.some((s) => s.method === method && s.ok && s.verified !== null);
        const s = await measureCopy(ctx, src, method, round, verify, { size: w.size, link: { delayMs: w.delayMs, bandwidth: w.bandwidth } });
        results.samples.push(s);
        results.rows = summariseWan(results.samples, settings);
        onSample(results, s);
      }
    }
  } finally {
    removeImageAndMarkers(src);
  }
  return results;
}

const x = (v: number | null) => (v === null ? '-' : `${v.toFixed(2)}x`);

export function formatWan(r: WanResults): string {
  const s = r.settings;
  const out: string[] = [];
  out.push(
    `mirror rows: wan: copy ${formatBytes(s.size)} (${formatBytes(s.dataBytes)} of random data in 64 MiB runs, the rest holes) to qemu-nbd ` +
      `through a delay proxy: ${s.delayMs} ms one way, ${((s.bandwidth * 8) / 1e9).toFixed(2)} Gbit/s each way shared by all connections; ` +
      `link limit ${s.linkLimitSec.toFixed(2)} s (data / bandwidth)`,
  );
  out.push(`median of ${s.repeat}; x peer = median / the best peer's median; x link = median / the link limit (goal: <= 1.00x peer, <= 1.10x link)`);
  out.push('');
  const head = ['method', 'seconds', 'best', 'x peer', 'x link', 'verified', 'samples'];
  const body = r.rows.map((row) => [
    row.label,
    (row.medianSec === null ? '-' : row.medianSec.toFixed(2)) + (row.failures ? ` (${row.failures} failed)` : ''),
    row.bestSec === null ? '-' : row.bestSec.toFixed(2),
    x(row.vsPeer),
    x(row.vsLink),
    row.verified === null ? '-' : row.verified ? 'yes' : 'MISMATCH',
    row.samples.map((v) => v.toFixed(2)).join(' '),
  ]);
  out.push(table([head, ...body]));
  for (const f of r.samples) if (!f.ok) out.push(`  round ${f.round} ${COPY_METHOD_LABELS[f.method]} failed: ${f.error.split('\n')[0]}`);
  return out.join('\n');
}
