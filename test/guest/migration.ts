// Shared pieces of the guest migration tests (migrate.test.ts,
// migrate-faults.test.ts): the wait for the mirror job, a source
// nbd-migrate with a guest attached running the `workload` loop of
// rootfs/lib/nbdm.sh, and the final check of guest verdict and destination
// image.
//
// The disk layout (in 512-byte sectors; the guest's dd helpers want multiples
// of 128): the workload region at W_FIRST (4 MiB, rewritten every round),
// host-written data at B_FIRST that the guest never writes but checks at the
// end, zeros elsewhere (plus any regions a test adds, see `extra` below).

import type { Test } from 'tap';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { waitForJob, type JobStatus } from '../helpers/admin.js';
import { MiB, allBytes, makeImage, readAt, serve, tmpDir, writeAt } from '../helpers/server.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, requireQemu, startGuest, type GuestResult, type NbdDisk } from './qemu.js';
import { SECTOR, fileMd5, firstBadSector, md5, patternSectors, runTag, shq } from './workload.js';

export const ready = Promise.all([requireQemu(), buildGuest()]);
ready.catch(() => {});

export interface Layout {
  imageSize: number;
  /** The workload region (sectors). */
  wFirst: number;
  wCount: number;
  /** The host-written data (sectors). */
  bFirst: number;
  bCount: number;
}

/** 32 MiB: the workload over 0..4 MiB, host data over 16..24 MiB. */
export const DEFAULT_LAYOUT: Layout = { imageSize: 32 * MiB, wFirst: 0, wCount: 8192, bFirst: 32768, bCount: 16384 };

/** waitForJob on the export vm1 as the guest tests wait: every 200 ms, 60 s at most; a failed or aborted job ends it. */
export function waitJob(socket: string, pred: (j: JobStatus) => boolean, what: string, timeoutMs = 60_000, everyMs = 200): Promise<JobStatus> {
  return waitForJob(socket, 'vm1', pred, { what, timeoutMs, everyMs, failOn: ['failed', 'aborted'] });
}

/**
 * The default guest scenario: the workload until the host says "stop" (at
 * most 400 rounds), then the check of the host-written data.
 */
export function workloadScript(tag: string, baseMd5: string, l: Layout): string {
  return `
workload /dev/vda ${l.wFirst} ${l.wCount} 400 ${shq(tag)} || exit 1
${checkBaseScript(baseMd5, l)}
ok migrated
`;
}

/** Guest shell lines: the host-written data must read back unchanged. */
export function checkBaseScript(baseMd5: string, l: Layout): string {
  return `drop_caches
got=$(read_md5 /dev/vda ${l.bFirst} ${l.bCount}) || exit 1
marker SUM base "$got"
[ "$got" = ${shq(baseMd5)} ] || { fail "the data the host wrote before boot reads back as md5 $got"; exit 1; }`;
}

export interface SetupOptions {
  /** Extra <disk> settings for the guest's disk. */
  disk?: Partial<NbdDisk>;
  layout?: Layout;
  /** The guest's scenario; default workloadScript. */
  script?: (tag: string, baseMd5: string, layout: Layout) => string;
  /** Every console line, as it arrives. */
  onLine?: (line: string) => void;
}

/**
 * Source and destination images, the source server (with an admin socket)
 * and a guest attached to it running `script`. The destination image is
 * only created: each test serves it as it needs.
 */
export async function migrationSetup(t: Test, opts: SetupOptions = {}) {
  await ready;
  const layout = opts.layout ?? DEFAULT_LAYOUT;
  const dir = await tmpDir(t, 'nbdm-guest-');
  const src = await makeImage(join(dir, 'src.img'), layout.imageSize);
  const dst = await makeImage(join(dir, 'dst.img'), layout.imageSize);
  const base = patternSectors(runTag('base'), layout.bFirst, layout.bCount);
  await writeAt(src, layout.bFirst * SECTOR, base);

  const adminSock = join(dir, 'admin.sock');
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', adminSock]);

  const tag = runTag('mig');
  const vm = await startGuest(t, {
    disks: [{ server: { type: 'inet', host: '127.0.0.1', port: srcSrv.newstylePort }, export: 'vm1', ...opts.disk }],
    script: (opts.script ?? workloadScript)(tag, md5(base), layout),
    timeoutMs: 240_000,
    onLine: opts.onLine,
  });
  const lastRound = () => Number(vm.markers.filter((m) => m.kind === 'PROGRESS').at(-1)?.args[0] ?? 0);
  const progress = (n: number) => vm.waitFor('PROGRESS', (m) => Number(m.args[0]) >= n, 120_000);
  return { dir, layout, src, dst, base, adminSock, srcSrv, tag, vm, lastRound, progress };
}

export type Setup = Awaited<ReturnType<typeof migrationSetup>>;

/** A region the destination must hold at the end, besides the workload's and the host's. */
export interface Expected {
  first: number;
  count: number;
  data: Buffer;
  what: string;
}

/**
 * Drive the run with `steps` (which ends by sending "stop" and returns how
 * many rounds the guest finished after the cutover), then check the guest's
 * verdict and the destination image. `extra` names further regions the
 * destination must hold, from the guest's markers.
 */
export async function migrateAndVerify(
  t: Test,
  m: Setup,
  steps: () => Promise<number>,
  extra: (r: GuestResult) => Expected[] = () => [],
): Promise<GuestResult> {
  const { vm, dst, src, base, tag, layout: l } = m;
  let afterCutover = 0;
  try {
    afterCutover = await steps();
  } catch (e) {
    await vm.kill();
    throw e;
  }

  // The guest polls its console between rounds with a short `read -t`; under load a
  // line arriving a character at a time can be cut by that timeout, so "stop" is
  // repeated until the guest has finished.
  const repeat = setInterval(() => vm.send('stop'), 1000);
  const r = await vm.result.finally(() => clearInterval(repeat));
  t.comment(`guest run took ${(r.durationMs / 1000).toFixed(1)} s`);
  t.ok(r.ok, 'the guest never read back anything but what it wrote, before, during and after the migration', {
    diag: describeGuest(r),
  });
  const wl = r.markers.find((x) => x.kind === 'WORKLOAD');
  const rounds = Number(wl?.args[1]);
  t.ok(rounds >= 4 && afterCutover >= 2, `the guest wrote ${rounds} rounds, ${afterCutover}+ after the cutover`);

  // The destination holds the last round, the pre-boot data, any extra regions and zeros elsewhere.
  const last = patternSectors(`${tag}.${rounds}`, l.wFirst, l.wCount);
  t.equal(wl?.args[2], md5(last), "the guest's last round is the pattern the host expects");
  const regions: Expected[] = [
    { first: l.wFirst, count: l.wCount, data: last, what: "the guest's last round" },
    { first: l.bFirst, count: l.bCount, data: base, what: 'the data written before boot' },
    ...(r.ok ? extra(r) : []),
  ].sort((a, b) => a.first - b.first);
  for (const x of regions) {
    const got = await fileMd5(dst, x.first * SECTOR, x.count * SECTOR);
    t.equal(got, md5(x.data), `the destination image holds ${x.what}`, {
      firstBadSector: got === md5(x.data) ? undefined : await firstBadSector(dst, x.first * SECTOR, x.data),
    });
  }
  let zeros = true;
  for (let i = 0, pos = 0; i <= regions.length; i++) {
    const next = i < regions.length ? regions[i]!.first * SECTOR : l.imageSize;
    for (let off = pos; off < next && zeros; off += 4 * MiB) {
      zeros = allBytes(await readAt(dst, off, Math.min(4 * MiB, next - off)), 0);
    }
    if (i < regions.length) pos = (regions[i]!.first + regions[i]!.count) * SECTOR;
  }
  t.ok(zeros, 'the rest of the destination is zeros');
  t.ok(existsSync(`${src}.nbd-migrate-fenced`), 'the source image is fenced');
  t.notOk(existsSync(`${dst}.nbd-migrate-incoming`), 'the destination is no longer receiving');
  return r;
}
