/**
 * Mirror row "copy": how long each copier takes to move a half-allocated raw
 * image (on tmpfs) to a qemu-nbd target serving a fresh sparse file (on
 * tmpfs) over 127.0.0.1, wall clock.
 *
 *  - nbd-migrate-mirror: the source served by `nbd-migrate serve --admin-socket`
 *    (started before the clock), then `{"cmd":"mirror",...,"cutover":"auto"}`;
 *    timed from sending that command until the job's status says completed
 *    (which includes its final flush of the target and the switch).
 *  - nbd-migrate-copy: `nbd-migrate copy SRC URI --no-progress` (same engine, no server).
 *  - nbdcopy: `nbdcopy --flush SRC URI` (--flush: the others all flush the
 *    target at the end, so nbdcopy does too; on tmpfs it costs next to nothing).
 *  - qemu-img: `qemu-img convert -n -f raw -O raw SRC URI` (-n: the target exists).
 *  - nbdcopy-tiz / qemu-img-tiz: the same with --target-is-zero.
 *
 * Holes: the target is fresh and sparse, so it already reads as zeros. Told
 * nothing, nbdcopy and qemu-img write zeros over the source's holes (cheap
 * WRITE_ZEROES requests); nbd-migrate asks the target's block status and
 * skips holes that already read as zero, finding out by itself what
 * --target-is-zero asserts. The plain rows (the default) are each tool's
 * behaviour given the same facts; the opt-in -tiz rows show the other tools
 * when told the target is zero (on this tmpfs target it made no difference). Every copier's output is compared with the source (`qemu-img compare`)
 * once per method, outside the timing; a mismatch is reported loudly.
 */
import * as fs from 'node:fs';
import { makeImage, type ServerHandle } from '../test/helpers/server.js';
import { run } from '../test/helpers/tools.js';
import { compare } from '../test/helpers/peers.js';
import { startDelayProxy, type DelayProxy } from '../test/helpers/delay-proxy.js';
import { benchPath, createHalfAllocatedImage } from './image.js';
import type { BenchConfig, CopyMethodName } from './config.js';
import { adminSocketPath, MirrorBenchError, removeImageAndMarkers, removeMarkers, startMirror, startNbdMigrate, startTarget, stopPair, waitForState, type MirrorTarget } from './mirrorjob.js';
import { Interrupted, processCpuSeconds, reapedChildrenCpuSeconds, track } from './proc.js';

/** Printed names. */
export const COPY_METHOD_LABELS: Record<CopyMethodName, string> = {
  'nbd-migrate-mirror': 'nbd-migrate mirror',
  'nbd-migrate-copy': 'nbd-migrate copy',
  nbdcopy: 'nbdcopy',
  'qemu-img': 'qemu-img convert',
  'nbdcopy-tiz': 'nbdcopy --target-is-zero',
  'qemu-img-tiz': 'qemu-img convert --target-is-zero',
};

/** The external tool each method needs, and its Debian package. */
export const COPY_METHOD_TOOLS: Record<CopyMethodName, { cmd: string; pkg: string } | undefined> = {
  'nbd-migrate-mirror': undefined,
  'nbd-migrate-copy': undefined,
  nbdcopy: { cmd: 'nbdcopy', pkg: 'libnbd-bin' },
  'qemu-img': { cmd: 'qemu-img', pkg: 'qemu-utils' },
  'nbdcopy-tiz': { cmd: 'nbdcopy', pkg: 'libnbd-bin' },
  'qemu-img-tiz': { cmd: 'qemu-img', pkg: 'qemu-utils' },
};

/** The command a one-shot copier runs (undefined for the mirror, which is driven over the admin socket). */
export function copyCommand(method: CopyMethodName, src: string, uri: string, nbdMigrateBin: string): { cmd: string; args: string[] } | undefined {
  switch (method) {
    case 'nbd-migrate-mirror':
      return undefined;
    case 'nbd-migrate-copy':
      return { cmd: process.execPath, args: [nbdMigrateBin, 'copy', src, uri, '--no-progress'] };
    case 'nbdcopy':
      return { cmd: 'nbdcopy', args: ['--flush', src, uri] };
    case 'nbdcopy-tiz':
      return { cmd: 'nbdcopy', args: ['--flush', '--target-is-zero', src, uri] };
    case 'qemu-img':
      return { cmd: 'qemu-img', args: ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri] };
    case 'qemu-img-tiz':
      return { cmd: 'qemu-img', args: ['convert', '-n', '--target-is-zero', '-f', 'raw', '-O', 'raw', src, uri] };
  }
}

interface CopySampleBase {
  round: number;
  method: CopyMethodName;
}

export interface GoodCopySample extends CopySampleBase {
  ok: true;
  seconds: number;
  /** CPU seconds of the copier (the one-shot command, or the source server for the mirror). */
  copierCpuSec: number | null;
  /** CPU seconds of the qemu-nbd target during the copy. */
  targetCpuSec: number | null;
  /** Mirror only: the job's own figures. */
  mirror?: { dataBytes: number; zeroBytes: number; skippedBytes: number; pauseMs: number | null; passes: number; sourceHungOnSigterm: boolean };
  /** true/false once compared with the source; null when not compared this round. */
  verified: boolean | null;
  /** Where a target that differs from the source was kept. */
  keptTarget?: string;
}

export interface FailedCopySample extends CopySampleBase {
  ok: false;
  error: string;
}

export type CopySample = GoodCopySample | FailedCopySample;

export interface CopyContext {
  cfg: BenchConfig;
  stopRequested: () => boolean;
  progress: (line: string) => void;
}

/** Creates the source image of the copy row; the caller removes it. */
export function createCopySource(size: number): string {
  return createHalfAllocatedImage(benchPath('copy-src'), size);
}

/** `qemu-img compare` of the two raw files: true if identical (exit 0), false if they differ (1); throws otherwise. */
export async function compareImages(a: string, b: string): Promise<boolean> {
  const r = await compare(a, b);
  if (r.code === 0) return true;
  if (r.code === 1) return false;
  throw new MirrorBenchError(`qemu-img compare ${a} ${b} exited ${r.code ?? r.signal}: ${r.stderr.trim()}`);
}

/** A simulated WAN between copier and target (test/helpers/delay-proxy.ts). */
export interface LinkSettings {
  delayMs: number;
  /** Bytes per second, each direction, shared by all connections. */
  bandwidth: number;
}

/**
 * One timed copy with a fresh target; verifies the result if `verify`. `opts.size`: the
 * image size (default the copy row's); `opts.link`: copy through a delay proxy.
 */
export async function measureCopy(
  ctx: CopyContext,
  src: string,
  method: CopyMethodName,
  round: number,
  verify: boolean,
  opts: { size?: number; link?: LinkSettings } = {},
): Promise<CopySample> {
  const { cfg } = ctx;
  const dst = benchPath('copy-dst');
  removeImageAndMarkers(dst);
  await makeImage(dst, opts.size ?? cfg.mirror.copySize);
  let proxy: DelayProxy | undefined;
  let target: MirrorTarget | undefined;
  let source: ServerHandle | undefined;
  let sourceHung = false;
  try {
    target = await startTarget('qemu-nbd', dst, cfg.nbdMigrateBin);
    if (ctx.stopRequested()) throw new Interrupted();
    const cpuTarget0 = processCpuSeconds(target.pid);
    let seconds: number;
    let copierCpuSec: number | null = null;
    let mirror: GoodCopySample['mirror'];
    let uri = target.uri;
    if (opts.link) {
      const u = new URL(target.uri);
      proxy = await startDelayProxy({ targetHost: u.hostname, targetPort: Number(u.port), delayMs: opts.link.delayMs, bandwidth: opts.link.bandwidth });
      uri = proxy.uri(u.pathname.slice(1));
    }
    const cmd = copyCommand(method, src, uri, cfg.nbdMigrateBin);
    if (!cmd) {
      removeMarkers(src);
      const sock = adminSocketPath('copy-src');
      source = await startNbdMigrate(cfg.nbdMigrateBin, src, { adminSocket: sock });
      const pid = source.proc.pid ?? -1;
      const cpu0 = processCpuSeconds(pid);
      const t0 = performance.now();
      await startMirror(sock, uri, 'auto');
      const done = await waitForState(source, sock, ['completed'], t0 + 300_000, ctx.stopRequested);
      seconds = (done.at - t0) / 1000;
      const cpu1 = processCpuSeconds(pid);
      copierCpuSec = cpu0 !== undefined && cpu1 !== undefined ? cpu1 - cpu0 : null;
      const s = done.status;
      mirror = { dataBytes: s.dataBytes, zeroBytes: s.zeroBytes, skippedBytes: s.skippedBytes, pauseMs: s.pauseMs, passes: s.pass, sourceHungOnSigterm: false };
    } else {
      const cpu0 = reapedChildrenCpuSeconds();
      const t0 = performance.now();
      const r = await run(cmd.cmd, cmd.args, { timeoutMs: 300_000, cwd: cfg.repoRoot, onSpawn: track });
      seconds = (performance.now() - t0) / 1000;
      const cpu1 = reapedChildrenCpuSeconds();
      if (ctx.stopRequested()) throw new Interrupted();
      if (r.timedOut || r.code !== 0)
        throw new MirrorBenchError(
          `${r.timedOut ? 'timed out' : `exited ${r.code ?? r.signal}`}\n  command: ${cmd.cmd} ${cmd.args.join(' ')}\n  stderr: ${r.stderr.trim().slice(-2000) || '(empty)'}`,
        );
      copierCpuSec = cpu0 !== undefined && cpu1 !== undefined ? cpu1 - cpu0 : null;
    }
    const cpuTarget1 = processCpuSeconds(target.pid);
    const targetCpuSec = cpuTarget0 !== undefined && cpuTarget1 !== undefined ? cpuTarget1 - cpuTarget0 : null;
    ({ sourceHung } = await stopPair(source, target));
    if (mirror) mirror.sourceHungOnSigterm = sourceHung;
    source = undefined;
    target = undefined;
    let verified: boolean | null = null;
    let keptTarget: string | undefined;
    if (verify) {
      verified = await compareImages(src, dst);
      if (!verified) {
        // Kept for inspection (and named in the report), not silently deleted.
        keptTarget = benchPath(`MISMATCH-${method}`);
        fs.renameSync(dst, keptTarget);
        ctx.progress(`!!! ${COPY_METHOD_LABELS[method]}: the copy DIFFERS from the source; kept as ${keptTarget} (qemu-img compare -f raw -F raw ${src} ${keptTarget})`);
      }
    }
    return { round, method, ok: true, seconds, copierCpuSec, targetCpuSec, mirror, verified, keptTarget };
  } catch (e) {
    if (e instanceof Interrupted || ctx.stopRequested()) throw e;
    if (!(e instanceof Error)) throw e;
    return { round, method, ok: false, error: e.message };
  } finally {
    await stopPair(source, target);
    await proxy?.close();
    if (fs.existsSync(dst)) removeImageAndMarkers(dst);
    removeMarkers(src);
  }
}
