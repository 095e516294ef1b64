/**
 * Mirror row "readcache": what `--read-cache` does for a guest whose disk is
 * across a WAN (issue 13). An export is mirrored and cut over (auto) to an
 * nbdkit memory target behind the delay filter (every read takes
 * BENCH_READCACHE_DELAY_MS, default 20 ms: a WAN round trip); then a client
 * of the source (which forwards to the target) reads 4 KiB at random offsets
 * of a 4 MiB working set, one at a time, BENCH_READCACHE_READS times (default
 * 300), with `--read-cache 64M` and without. The row gives the median and p99
 * read latency and the reads per second of each, and the speed-up.
 */
import * as fs from 'node:fs';
import { NbdClient } from '../src/client/nbd-client.js';
import { nbdkit } from '../test/helpers/peers.js';
import { freePort } from '../test/helpers/net.js';
import { startServer, type ServerHandle } from '../test/helpers/server.js';
import { adminRequest, waitForJob } from '../test/helpers/admin.js';
import { median } from './stats.js';
import { Interrupted } from './proc.js';

export type ReadCacheMode = 'cache' | 'none';
export const READCACHE_MODES: readonly ReadCacheMode[] = ['cache', 'none'];

export interface ReadCacheSample {
  round: number;
  mode: ReadCacheMode;
  ok: boolean;
  medianMs?: number;
  p99Ms?: number;
  readsPerSec?: number;
  error?: string;
}

export interface ReadCacheSettings {
  delayMs: number;
  reads: number;
  workingSet: number;
  cacheBytes: number;
}

export function readCacheSettings(env: NodeJS.ProcessEnv = process.env): ReadCacheSettings {
  const num = (v: string | undefined, d: number) => (v !== undefined && Number.isFinite(Number(v)) && Number(v) > 0 ? Number(v) : d);
  return { delayMs: num(env.BENCH_READCACHE_DELAY_MS, 20), reads: num(env.BENCH_READCACHE_READS, 300), workingSet: 4 * 1024 * 1024, cacheBytes: 64 * 1024 * 1024 };
}

const SIZE = 64 * 1024 * 1024;

/** One sample: a fresh source and target, mirror + auto cutover, then the reads. */
export async function measureReadCache(o: { bin: string; dir: string; settings: ReadCacheSettings; stopRequested: () => boolean }, mode: ReadCacheMode, round: number): Promise<ReadCacheSample> {
  const { settings: st } = o;
  const image = `${o.dir}/readcache-${process.pid}.img`;
  const sock = `${o.dir}/readcache-${process.pid}.sock`;
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, SIZE);
  const fd = fs.openSync(image, 'r+');
  const chunk = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 7 + 1) & 0xff;
  for (let off = 0; off < 16 * 1024 * 1024; off += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, off);
  fs.closeSync(fd);
  const tport = await freePort();
  const target = await nbdkit(tport, ['--filter=delay', 'memory', String(SIZE), `rdelay=${st.delayMs}ms`]);
  let srv: ServerHandle | undefined;
  let c: NbdClient | undefined;
  try {
    const port = await freePort();
    const args = [image, '--name', 'vm1', '--listen', '127.0.0.1', '--port', String(port), '--admin-socket', sock, '--log-format', 'json'];
    if (mode === 'cache') args.push('--read-cache', String(st.cacheBytes));
    srv = await startServer(args, { cli: o.bin }); // ready once the admin socket listens too
    await adminRequest(sock, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${tport}/`, cutover: 'auto' });
    await waitForJob(sock, 'vm1', (j) => j.state === 'completed', { what: 'the cutover', timeoutMs: 120_000, failOn: ['failed', 'aborted'] });
    if (o.stopRequested()) throw new Interrupted();
    c = await NbdClient.connect(`nbd://127.0.0.1:${port}/vm1`);
    const lat: number[] = [];
    const buf = Buffer.alloc(4096);
    let x = 12345 + round;
    const t0 = performance.now();
    for (let i = 0; i < st.reads; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const off = (x % (st.workingSet / 4096)) * 4096;
      const a = performance.now();
      await c.read(off, 4096, buf, 0);
      lat.push(performance.now() - a);
      if (o.stopRequested()) throw new Interrupted();
    }
    const secs = (performance.now() - t0) / 1000;
    lat.sort((p, q) => p - q);
    return { round, mode, ok: true, medianMs: lat[lat.length >> 1], p99Ms: lat[Math.min(lat.length - 1, Math.floor(lat.length * 0.99))], readsPerSec: st.reads / secs };
  } catch (e) {
    if (e instanceof Interrupted) throw e;
    return { round, mode, ok: false, error: (e as Error).message };
  } finally {
    await c?.close().catch(() => c?.destroy());
    await srv?.stop();
    await target.stop();
    for (const f of [image, sock, `${image}.nbd-migrate-fenced`]) fs.rmSync(f, { force: true });
    fs.rmSync(`${image}.nbd-migrate.d`, { recursive: true, force: true });
  }
}

export interface ReadCacheRow {
  cacheMedianMs: number | null;
  noneMedianMs: number | null;
  cacheReadsPerSec: number | null;
  noneReadsPerSec: number | null;
  speedup: number | null;
}


export function summariseReadCache(samples: readonly ReadCacheSample[]): ReadCacheRow {
  const of = (mode: ReadCacheMode, k: 'medianMs' | 'readsPerSec') => median(samples.filter((s) => s.ok && s.mode === mode).map((s) => s[k]!));
  const cacheReadsPerSec = of('cache', 'readsPerSec');
  const noneReadsPerSec = of('none', 'readsPerSec');
  return {
    cacheMedianMs: of('cache', 'medianMs'),
    noneMedianMs: of('none', 'medianMs'),
    cacheReadsPerSec,
    noneReadsPerSec,
    speedup: cacheReadsPerSec !== null && noneReadsPerSec ? cacheReadsPerSec / noneReadsPerSec : null,
  };
}

export function formatReadCache(row: ReadCacheRow, samples: readonly ReadCacheSample[], st: ReadCacheSettings): string {
  const f = (n: number | null, d = 1) => (n === null ? '-' : n.toFixed(d));
  const out = [
    `mirror rows: read cache after cutover: target behind nbdkit delay rdelay=${st.delayMs}ms; ${st.reads} 4 KiB reads at QD1 over a ${st.workingSet / 1048576} MiB working set, through the source`,
    `  --read-cache ${st.cacheBytes / 1048576}M: median ${f(row.cacheMedianMs, 2)} ms, ${f(row.cacheReadsPerSec, 0)} reads/s;` +
      ` none: median ${f(row.noneMedianMs, 2)} ms, ${f(row.noneReadsPerSec, 0)} reads/s; speed-up ${f(row.speedup, 1)}x`,
  ];
  for (const s of samples) if (!s.ok) out.push(`  round ${s.round} ${s.mode} failed: ${(s.error ?? '').split('\n')[0]}`);
  return out.join('\n');
}

/** `node dist/bench/readcache.js`: the row alone (BENCH_READCACHE_* settings), printed. */
async function main(): Promise<void> {
  const { REPO_ROOT } = await import('../test/helpers/server.js');
  const bin = process.env.BENCH_NBD_MIGRATE ?? `${REPO_ROOT}/bin/nbd-migrate`;
  const dir = fs.mkdtempSync(`${process.env.TMPDIR ?? '/tmp'}/nbdm-bench-readcache-`);
  const st = readCacheSettings();
  const samples: ReadCacheSample[] = [];
  try {
    const rounds = Number(process.env.BENCH_MIRROR_REPEAT ?? 1) || 1;
    for (let round = 1; round <= rounds; round++)
      for (const mode of round % 2 ? READCACHE_MODES : [...READCACHE_MODES].reverse()) {
        const s = await measureReadCache({ bin, dir, settings: st, stopRequested: () => false }, mode, round);
        samples.push(s);
        process.stderr.write(`[readcache] round ${round} ${mode}: ${s.ok ? `${s.readsPerSec!.toFixed(0)} reads/s` : s.error}\n`);
      }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(formatReadCache(summariseReadCache(samples), samples, st) + '\n');
}

if (process.argv[1] && /readcache\.[jt]s$/.test(process.argv[1])) void main();
