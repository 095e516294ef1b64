/**
 * Mirror row "fill": how fast a post-copy destination fills itself in the
 * background (issue 13), against one-shot copies of the same disk. The source
 * is nbdkit's file plugin serving a half-allocated image (BENCH_FILL_SIZE,
 * default 1 GiB; data runs and holes as in the copy row) on 127.0.0.1; each
 * method makes a fresh sparse local file on tmpfs hold the same bytes:
 *
 *  - fill: `nbd-migrate serve DST --fetch-from nbd://SRC` with no guest
 *    attached, timed from spawn until its `postcopy-completed` log line (every
 *    block present, the present-map stored, the image fsynced);
 *  - nbd-migrate copy: `nbd-migrate copy nbd://SRC DST --no-progress`;
 *  - nbdcopy: `nbdcopy --flush nbd://SRC DST`;
 *  - qemu-img: `qemu-img convert -n -f raw -O raw nbd://SRC DST`.
 *
 * Every result is compared with the source (`qemu-img compare`) outside the
 * timing. The figure is fill ÷ the fastest one-shot copier, per round and of
 * the medians: how much slower a guest's disk becomes whole after a post-copy
 * switch than a plain copy would take.
 */
import * as fs from 'node:fs';
import { nbdkit, compare } from '../test/helpers/peers.js';
import { freePort } from '../test/helpers/net.js';
import { makeImage, startServer, type ServerHandle } from '../test/helpers/server.js';
import { run } from '../test/helpers/tools.js';
import { parseSize } from '../src/util/units.js';
import { benchPath, createHalfAllocatedImage } from './image.js';
import { Interrupted, track } from './proc.js';
import { median } from './stats.js';

export const FILL_METHODS = ['fill', 'nbd-migrate-copy', 'nbdcopy', 'qemu-img'] as const;
export type FillMethod = (typeof FILL_METHODS)[number];
const LABEL: Record<FillMethod, string> = { fill: 'post-copy fill', 'nbd-migrate-copy': 'nbd-migrate copy', nbdcopy: 'nbdcopy', 'qemu-img': 'qemu-img convert' };

export interface FillSample {
  round: number;
  method: FillMethod;
  ok: boolean;
  seconds?: number;
  error?: string;
}

/** BENCH_FILL_SIZE (default 1G): the source image. */
export function fillSize(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.BENCH_FILL_SIZE;
  if (v === undefined) return 1024 ** 3;
  const n = parseSize(v, 'BENCH_FILL_SIZE');
  if (!(n >= 1024 * 1024)) throw new RangeError(`BENCH_FILL_SIZE: at least 1M, got ${v}`);
  return n;
}

export interface FillContext {
  bin: string;
  stopRequested: () => boolean;
}

/** The source: nbdkit serving a half-allocated image. Stop it with `stop()`; the image is removed too. */
export async function startFillSource(size: number): Promise<{ uri: string; image: string; stop: () => Promise<void> }> {
  const image = createHalfAllocatedImage(benchPath('fill-src'), size);
  try {
    const port = await freePort();
    const p = await nbdkit(port, ['file', image]);
    return {
      uri: `nbd://127.0.0.1:${port}/`,
      image,
      stop: async () => {
        await p.stop();
        fs.rmSync(image, { force: true });
      },
    };
  } catch (e) {
    fs.rmSync(image, { force: true });
    throw e;
  }
}

async function oneShot(method: Exclude<FillMethod, 'fill'>, ctx: FillContext, uri: string, dst: string): Promise<void> {
  const [cmd, args] =
    method === 'nbd-migrate-copy'
      ? [process.execPath, [ctx.bin, 'copy', uri, dst, '--no-progress']]
      : method === 'nbdcopy'
        ? ['nbdcopy', ['--flush', uri, dst]]
        : ['qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', uri, dst]];
  const r = await run(cmd, args, { timeoutMs: 300_000, onSpawn: track });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}: ${r.stderr.trim().slice(-500)}`);
}

async function fill(ctx: FillContext, uri: string, dst: string): Promise<void> {
  const port = await freePort();
  let srv: ServerHandle | undefined;
  try {
    srv = await startServer([dst, '--name', 'vm1', '--listen', '127.0.0.1', '--port', String(port), '--fetch-from', uri, '--log-format', 'json'], { cli: ctx.bin, readyPort: port });
    await srv.waitForLog((l) => l.event === 'postcopy-completed', 300_000);
  } finally {
    await srv?.stop();
  }
}

export async function measureFill(ctx: FillContext, src: { uri: string; image: string }, size: number, method: FillMethod, round: number): Promise<FillSample> {
  const dst = benchPath(`fill-dst-${method}`);
  const clean = () => {
    fs.rmSync(dst, { force: true });
    fs.rmSync(`${dst}.nbd-migrate.d`, { recursive: true, force: true });
  };
  clean();
  try {
    await makeImage(dst, size);
    const t0 = performance.now();
    if (method === 'fill') await fill(ctx, src.uri, dst);
    else await oneShot(method, ctx, src.uri, dst);
    const seconds = (performance.now() - t0) / 1000;
    if (ctx.stopRequested()) throw new Interrupted();
    const c = await compare(src.image, dst);
    if (c.code !== 0) return { round, method, ok: false, error: `the result differs from the source: qemu-img compare exited ${c.code}: ${c.stdout.trim()}` };
    return { round, method, ok: true, seconds };
  } catch (e) {
    if (e instanceof Interrupted || ctx.stopRequested()) throw e;
    return { round, method, ok: false, error: (e as Error).message };
  } finally {
    clean();
  }
}

export interface FillRow {
  /** Median seconds per method (null when none succeeded). */
  seconds: Record<FillMethod, number | null>;
  /** Median fill ÷ the fastest median of the one-shot copiers. */
  ratio: number | null;
  fastest: FillMethod | null;
  /** fill ÷ the fastest one-shot copier of the same round. */
  roundRatios: number[];
}


export function summariseFill(samples: readonly FillSample[]): FillRow {
  const seconds = Object.fromEntries(FILL_METHODS.map((m) => [m, median(samples.filter((s) => s.ok && s.method === m).map((s) => s.seconds!))])) as Record<FillMethod, number | null>;
  const others = FILL_METHODS.filter((m) => m !== 'fill' && seconds[m] !== null);
  const fastest = others.length ? others.reduce((a, b) => (seconds[a]! <= seconds[b]! ? a : b)) : null;
  const roundRatios: number[] = [];
  for (const r of new Set(samples.map((s) => s.round))) {
    const f = samples.find((s) => s.round === r && s.method === 'fill' && s.ok);
    const best = Math.min(...samples.filter((s) => s.round === r && s.method !== 'fill' && s.ok).map((s) => s.seconds!));
    if (f && Number.isFinite(best) && best > 0) roundRatios.push(f.seconds! / best);
  }
  return { seconds, fastest, ratio: fastest && seconds.fill !== null ? seconds.fill / seconds[fastest]! : null, roundRatios };
}

export function formatFill(row: FillRow, samples: readonly FillSample[], settings: { size: number; repeat: number }): string {
  const gib = (settings.size / 1024 ** 3).toFixed(settings.size % 1024 ** 3 ? 2 : 0);
  const out = [
    `mirror rows: post-copy background fill: a ${gib} GiB half-allocated image from nbdkit (file plugin) into a fresh local file on tmpfs,`,
    `\`serve --fetch-from\` until postcopy-completed against one-shot copiers (each result compared with the source); medians of ${settings.repeat}`,
  ];
  for (const m of FILL_METHODS) out.push(`  ${LABEL[m].padEnd(18)} ${row.seconds[m] === null ? '-' : `${row.seconds[m]!.toFixed(2)} s`}`);
  out.push(
    `  fill ÷ fastest copier (${row.fastest ? LABEL[row.fastest] : '-'}): ${row.ratio === null ? '-' : `${row.ratio.toFixed(2)}x`}; per round ${row.roundRatios.map((r) => r.toFixed(2)).join(' ') || '-'}`,
  );
  for (const s of samples) if (!s.ok) out.push(`  round ${s.round} ${LABEL[s.method]} failed: ${(s.error ?? '').split('\n')[0]}`);
  return out.join('\n');
}
