// A running guest's disk moves to another nbd-migrate while the guest keeps
// writing and verifying it.
//
// The guest (QEMU/TCG, attached to the source as libvirt would) runs the
// `workload` loop of rootfs/lib/nbdm.sh over 4 MiB of its disk: each round
// checks the region still holds the previous round's pattern, writes a new
// one with O_DIRECT and reads it back, then prints `@@NBDM PROGRESS n`. The
// host follows those markers and acts mid-run through the operator's CLI
// (`nbd-migrate ctl mirror/cutover`) and the admin socket, towards a
// `serve --incoming` destination, then tells the guest to stop; the guest
// finally checks data the host put on the disk before it booted. The
// destination image must then hold exactly what the guest last wrote plus
// that data, the source be fenced and the destination open to everyone.
//   1. manual cutover, handoff forward (the default): the guest writes while
//      the first sweep runs (rate-limited), while the job is ready, and after
//      the switch, through the source;
//   2. auto cutover, handoff disconnect, with <reconnect delay='5'/>.

import t, { type Test } from 'tap';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { CLI, MiB, REPO_ROOT, allBytes, makeImage, readAt, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun, run, type RunResult } from '../helpers/tools.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, requireQemu, startGuest, type NbdDisk } from './qemu.js';
import { SECTOR, fileMd5, firstBadSector, md5, patternSectors, runTag, shq } from './workload.js';

const ready = Promise.all([requireQemu(), buildGuest()]);
ready.catch(() => {});

const IMAGE_SIZE = 32 * MiB;
const W_FIRST = 0; // workload region: sectors 0..8191 (4 MiB)
const W_COUNT = 8192;
const B_FIRST = 32768; // host-written data: 16 MiB..24 MiB, never written by the guest
const B_COUNT = 16384;

/** `nbd-migrate ARGS` as the operator runs it (no test-runner loader in NODE_OPTIONS). */
function cli(args: string[]): Promise<RunResult> {
  return run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { cwd: REPO_ROOT, timeoutMs: 60_000 });
}

interface Job {
  state: string;
  pass: number;
  convergence: string;
  pauseMs: number | null;
  error: string | null;
  [k: string]: unknown;
}

/** One request on the admin socket (README, "Admin socket protocol"). */
function admin(socket: string, req: Record<string, unknown>): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const c = connect(socket);
    let buf = '';
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error(`no reply to ${JSON.stringify(req)} within 10 s`));
    }, 10_000);
    c.setEncoding('utf8');
    c.on('connect', () => c.write(JSON.stringify(req) + '\n'));
    c.on('data', (d: string) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      c.end();
      const reply = JSON.parse(buf.slice(0, nl)) as { ok: boolean; result?: unknown; error?: { code: string; message: string } };
      if (reply.ok) resolve(reply.result);
      else reject(new Error(`admin ${JSON.stringify(req)}: ${reply.error?.code} ${reply.error?.message}`));
    });
    c.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

async function waitJob(socket: string, pred: (j: Job) => boolean, what: string, timeoutMs = 60_000): Promise<Job> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const j = (await admin(socket, { cmd: 'status', export: 'vm1' })) as Job;
    if (pred(j)) return j;
    if (j.state === 'failed' || j.state === 'aborted') throw new Error(`mirror job ${j.state} while waiting for ${what}: ${JSON.stringify(j)}`);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; last status ${JSON.stringify(j)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function script(tag: string, baseMd5: string): string {
  return `
workload /dev/vda ${W_FIRST} ${W_COUNT} 400 ${shq(tag)} || exit 1
drop_caches
got=$(read_md5 /dev/vda ${B_FIRST} ${B_COUNT}) || exit 1
marker SUM base "$got"
[ "$got" = ${shq(baseMd5)} ] || { fail "the data the host wrote before boot reads back as md5 $got"; exit 1; }
ok migrated
`;
}

/** Source and destination servers, and a guest running the workload on the source. */
async function migrationSetup(t: Test, disk: Partial<NbdDisk> = {}) {
  await ready;
  const dir = await tmpDir(t, 'nbdm-guest-');
  const src = await makeImage(join(dir, 'src.img'), IMAGE_SIZE);
  const dst = await makeImage(join(dir, 'dst.img'), IMAGE_SIZE);
  const base = patternSectors(runTag('base'), B_FIRST, B_COUNT);
  await writeAt(src, B_FIRST * SECTOR, base);

  const adminSock = join(dir, 'admin.sock');
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', adminSock]);

  const tag = runTag('mig');
  const vm = await startGuest(t, {
    disks: [{ server: { type: 'inet', host: '127.0.0.1', port: srcSrv.newstylePort }, export: 'vm1', ...disk }],
    script: script(tag, md5(base)),
    timeoutMs: 240_000,
  });
  const lastRound = () => Number(vm.markers.filter((m) => m.kind === 'PROGRESS').at(-1)?.args[0] ?? 0);
  const progress = (n: number) => vm.waitFor('PROGRESS', (m) => Number(m.args[0]) >= n, 120_000);
  return { src, dst, base, adminSock, dstSrv, srcSrv, tag, vm, lastRound, progress };
}

type Setup = Awaited<ReturnType<typeof migrationSetup>>;

/**
 * Drive the run with `steps` (which ends by sending "stop"), then check the
 * guest's verdict and the destination image.
 */
async function migrateAndVerify(t: Test, m: Setup, steps: () => Promise<number>): Promise<void> {
  const { vm, dst, src, base, tag } = m;
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

  // The destination holds the last round, the pre-boot data and zeros elsewhere.
  const last = patternSectors(`${tag}.${rounds}`, W_FIRST, W_COUNT);
  t.equal(wl?.args[2], md5(last), "the guest's last round is the pattern the host expects");
  const got = await fileMd5(dst, W_FIRST * SECTOR, W_COUNT * SECTOR);
  t.equal(got, md5(last), "the destination image holds the guest's last round", {
    firstBadSector: got === md5(last) ? undefined : await firstBadSector(dst, W_FIRST * SECTOR, last),
  });
  t.equal(await fileMd5(dst, B_FIRST * SECTOR, B_COUNT * SECTOR), md5(base), 'the destination holds the data written before boot');
  const gapA = (W_FIRST + W_COUNT) * SECTOR;
  const gapB = (B_FIRST + B_COUNT) * SECTOR;
  t.ok(
    allBytes(await readAt(dst, gapA, B_FIRST * SECTOR - gapA), 0) && allBytes(await readAt(dst, gapB, IMAGE_SIZE - gapB), 0),
    'the rest of the destination is zeros',
  );
  t.ok(existsSync(`${src}.nbd-migrate-fenced`), 'the source image is fenced');
  t.notOk(existsSync(`${dst}.nbd-migrate-incoming`), 'the destination is no longer receiving');
}

t.test('mirror and manual cutover under a running guest (handoff forward)', async (t) => {
  const m = await migrationSetup(t);
  const { vm, adminSock, dstSrv, lastRound, progress } = m;
  await migrateAndVerify(t, m, async () => {
    const p = await progress(2);
    t.comment(`guest workload running: round ${p.args[0]} at ${(p.atMs / 1000).toFixed(1)} s`);

    // The first sweep copies the 12 MiB allocated; at 4 MiB/s the guest
    // writes for a few rounds while it runs, dirtying blocks already copied.
    const started = await cli([
      'ctl', '--socket', adminSock, 'mirror', 'vm1', dstSrv.uri('vm1'), '--cutover', 'manual', '--max-bandwidth', '4M',
    ]);
    t.equal(started.code, 0, 'ctl mirror started the job', { diag: describeRun(started) });
    const atStart = lastRound();
    const rd = await waitJob(adminSock, (j) => j.state === 'ready', 'the job to be ready');
    const atReady = lastRound();
    t.comment(`job ready (pass ${rd.pass}, convergence ${rd.convergence}) at guest round ${atReady}`);
    t.ok(atReady > atStart, `the guest wrote while the job was copying (rounds ${atStart + 1}..${atReady})`);
    await admin(adminSock, { cmd: 'set-speed', export: 'vm1', rate: '0' });

    await progress(atReady + 2); // the guest writes while the job is ready (write-through)
    const cut = await cli(['ctl', '--socket', adminSock, 'cutover', 'vm1']);
    t.equal(cut.code, 0, 'ctl cutover succeeded', { diag: describeRun(cut) });
    const done = await waitJob(adminSock, (j) => j.state === 'completed', 'the cutover to complete');
    const atCut = lastRound();
    t.comment(`cutover completed at guest round ${atCut}, pause ${done.pauseMs} ms`);

    await progress(atCut + 2); // and goes on after the switch, through the source to the destination
    vm.send('stop');
    return lastRound() - atCut;
  });
});

// With --handoff disconnect the source closes the guest's connection at the
// switch. QEMU reconnects only with <reconnect delay='N'/> (reconnect-delay;
// without it the guest's next I/O fails with EIO), and it reconnects to the
// address it was given, i.e. the source, which from then on forwards to the
// destination.
t.test('auto cutover with handoff disconnect: QEMU reconnects and the guest goes on', async (t) => {
  const m = await migrationSetup(t, { reconnectDelay: 5 });
  const { vm, adminSock, dstSrv, srcSrv, lastRound, progress } = m;
  await migrateAndVerify(t, m, async () => {
    await progress(2);
    const started = await cli([
      'ctl', '--socket', adminSock, 'mirror', 'vm1', dstSrv.uri('vm1'), '--cutover', 'auto', '--handoff', 'disconnect',
    ]);
    t.equal(started.code, 0, 'ctl mirror started the job', { diag: describeRun(started) });
    const done = await waitJob(adminSock, (j) => j.state === 'completed', 'the cutover to complete');
    const atCut = lastRound();
    t.comment(`cutover completed at guest round ${atCut}, pause ${done.pauseMs} ms`);
    await progress(atCut + 2);
    vm.send('stop');
    const dropped = srcSrv.logs.findIndex((e) => e.event === 'connection-dropped' && e.reason === 'handoff');
    t.ok(dropped >= 0, "the source dropped the guest's connection at the switch");
    t.ok(
      srcSrv.logs.slice(dropped + 1).some((e) => e.event === 'connection-open'),
      'QEMU reconnected (to the source, the address it was given)',
    );
    return lastRound() - atCut;
  });
});
