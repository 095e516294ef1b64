// Post-copy under a running guest whose whole root filesystem is still on the
// source: the source image is an ext4 root filesystem (root-image.ts: busybox,
// /sbin/init, the scenario, data files), the destination (`serve
// --fetch-from`) an empty image. The guest (QEMU/TCG, its disk attached as
// libvirt would) boots from a kernel and an initramfs that only loads the
// modules, mounts /dev/vda, served by the destination, and switch_root's onto
// it: its init, its shell, every command and file are read through the
// destination's fetches. It checks files the host put there, times 4 KiB
// reads of a file's blocks not yet fetched against the same reads once
// present, then runs the write-and-verify workload on a file of its root
// filesystem while the background fill (rate-limited) brings the rest. Once
// the destination says completed the source is stopped; the guest goes on for
// 10 s more with no I/O error, remounts / read-only and powers off. The
// destination image is then a clean ext4 (e2fsck -fn) whose files hold the
// guest's last round and the host's data.

import t from 'tap';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { MiB, makeImage, serve, tmpDir } from '../helpers/server.js';
import type { PostcopyStatus } from '../../src/migration/postcopy.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, requireQemu, startGuest } from './qemu.js';
import { fsckImage, makeRootImage, readRootFile } from './root-image.js';
import { md5, patternSectors, runTag, shq } from './workload.js';

const SIZE = 64 * MiB;
/** Files of the root filesystem, in 512-byte sectors (multiples of 128: the guest's dd helpers move 64 KiB). */
const BASE = 16384; // 8 MiB, read at boot
const WORK = 8192; // 4 MiB, the workload's file
const LATE = 20480; // 10 MiB, read only at the end: the fill brings it meanwhile
const PROBE = 4096; // 2 MiB, the 4 KiB latency probes

t.test('a guest boots its root filesystem from an empty post-copy destination, writes while it fills, and goes on with the source stopped', async (t) => {
  await Promise.all([requireQemu(), buildGuest()]);
  const dir = await tmpDir(t, 'nbdm-guest-postcopy-');
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const tag = runTag('pc');
  const base = patternSectors(runTag('base'), 0, BASE);
  const work0 = patternSectors(`${tag}.0`, 0, WORK);
  const late = patternSectors(runTag('late'), 0, LATE);
  const probe = patternSectors(runTag('probe'), 0, PROBE);
  // 8 reads of 4 KiB, 64 KiB apart (never sequential: no read-ahead), on blocks not yet fetched, then the same again.
  const probes = Array.from({ length: 8 }, (_, i) => i * 16);
  const scenario = `
now_ns; t0=$_now
got=$(read_md5 /data/base.bin 0 ${BASE}) || exit 1
now_ns; marker LAT seq8m-absent $(( (_now - t0) / 1000 ))
[ "$got" = ${shq(md5(base))} ] || { fail "/data/base.bin reads back as md5 $got at boot"; exit 1; }
got=$(read_md5 /data/work.bin 0 ${WORK}) || exit 1
[ "$got" = ${shq(md5(work0))} ] || { fail "/data/work.bin reads back as md5 $got at boot"; exit 1; }
host_says probe-absent >/dev/null
for pass in absent present; do
  total=0
  for blk in ${probes.join(' ')}; do
    now_ns; a=$_now
    dd if=/data/probe.bin of=/dev/null bs=4k count=1 skip=$blk iflag=direct 2>/tmp/dd.err || { fail "probe read failed: $(cat /tmp/dd.err)"; exit 1; }
    now_ns; total=$((total + _now - a))
  done
  marker LAT 4k-$pass $((total / 8000))
  [ $pass = absent ] && host_says probed-absent >/dev/null
done
drop_caches
now_ns; t0=$_now
got=$(read_md5 /data/base.bin 0 ${BASE}) || exit 1
now_ns; marker LAT seq8m-present $(( (_now - t0) / 1000 ))
workload /data/work.bin 0 ${WORK} 2000 ${shq(tag)} || exit 1
drop_caches
got=$(read_md5 /data/base.bin 0 ${BASE}) || exit 1
[ "$got" = ${shq(md5(base))} ] || { fail "/data/base.bin reads back as md5 $got at the end"; exit 1; }
got=$(read_md5 /data/probe.bin 0 ${PROBE}) || exit 1
[ "$got" = ${shq(md5(probe))} ] || { fail "/data/probe.bin reads back as md5 $got at the end"; exit 1; }
got=$(read_md5 /data/late.bin 0 ${LATE}) || exit 1
[ "$got" = ${shq(md5(late))} ] || { fail "/data/late.bin (the fill brought it) reads back as md5 $got"; exit 1; }
ok postcopy
`;
  const root = await makeRootImage(src, {
    scenario,
    files: [
      { path: '/data/base.bin', data: base },
      { path: '/data/work.bin', data: work0 },
      { path: '/data/late.bin', data: late },
      { path: '/data/probe.bin', data: probe },
    ],
  });
  const fsckSrc = await fsckImage(src);
  t.ok(fsckSrc.clean, 'the source holds a clean ext4 root filesystem', { diag: fsckSrc.output });

  const srcSrv = await serve(t, [src, '--name', 'vm1', '--read-only']);
  const sock = join(dir, 'dst.sock');
  const dstSrv = await serve(t, [
    dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '128K', '--admin-socket', sock, '--log-level', 'debug',
  ]);
  const s0 = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
  const brought = s0.fetched.fillBytes + s0.fetched.guestBytes + s0.fetched.readAheadBytes;
  t.ok(brought <= MiB, `the destination starts with (almost) none of the root filesystem (${brought} bytes fetched; holes are zeroed at once)`);

  let firstGuestFetchMs: number | undefined;
  let t0 = 0;
  const unsubscribe = dstSrv.onLog((e) => {
    if (firstGuestFetchMs === undefined && e.event === 'fetched' && e.kind === 'guest') firstGuestFetchMs = Date.now() - t0;
  });
  t.teardown(unsubscribe);
  t0 = Date.now();
  const vm = await startGuest(t, {
    disks: [{ server: { type: 'inet', host: '127.0.0.1', port: dstSrv.newstylePort }, export: 'vm1' }],
    rootDevice: '/dev/vda',
    script: '# unused: the scenario is /scenario.sh on the root filesystem\n',
    timeoutMs: 300_000,
  });
  const lastRound = () => Number(vm.markers.filter((m) => m.kind === 'PROGRESS').at(-1)?.args[0] ?? 0);
  try {
    const boot = await vm.waitFor('BOOT', undefined, 120_000);
    const disks = await vm.waitFor('DISKS', undefined, 120_000);
    const mounted = await vm.waitFor('ROOT', (m) => m.args[0] === '/dev/vda', 120_000);
    const init = await vm.waitFor('INIT', undefined, 120_000);
    const atInit = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
    t.ok(atInit.fetched.guestBytes > 0, `the guest's root filesystem came through post-copy fetches (${atInit.fetched.guestBytes} bytes by guest reads, ${atInit.fetched.readAheadBytes} by read-ahead when its init ran)`);
    t.equal(atInit.state, 'filling', `the root filesystem was mounted and its init ran while the destination still lacked ${atInit.absentBytes} bytes`);
    // insmod virtio_blk returns once the probe's partition scan (the guest's first read) was answered: DISKS bounds it.
    // The fill may have brought block 0 before QEMU started, so the first logged guest fetch can come later.
    t.comment(
      `FIGURE boot (after QEMU started): kernel in its initramfs ${(boot.atMs / 1000).toFixed(2)} s, first read answered (disk seen) by ${(disks.atMs / 1000).toFixed(2)} s, ` +
        `first guest fetch logged ${((firstGuestFetchMs ?? NaN) / 1000).toFixed(2)} s, root filesystem mounted ${(mounted.atMs / 1000).toFixed(2)} s, its /sbin/init running ${(init.atMs / 1000).toFixed(2)} s`,
    );
    // The absent-block latency is only that if every probe fetched: count the guest's fetch runs around the pass.
    await vm.waitFor('WAIT', (m) => m.args[0] === 'probe-absent', 120_000);
    const runs0 = ((await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus).fetched.guestRuns;
    vm.send('go');
    await vm.waitFor('WAIT', (m) => m.args[0] === 'probed-absent', 120_000);
    const runs1 = ((await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus).fetched.guestRuns;
    vm.send('go');
    t.ok(runs1 - runs0 >= probes.length, `each of the ${probes.length} absent-block probes was a fetch from the source (${runs1 - runs0} guest fetch runs)`);
    await vm.waitFor('PROGRESS', (m) => Number(m.args[0]) >= 2, 120_000);
    const during = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
    t.equal(during.state, 'filling', `the guest writes while the destination is still filling (${during.absentBytes} bytes absent)`);
    await adminRequest(sock, { cmd: 'set-speed', export: 'vm1', rate: '0' });
    await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 120_000);
    const atDone = lastRound();
    t.ok(atDone >= 2, `the fill completed at guest round ${atDone}`);
    await srcSrv.stop();
    const stoppedAt = vm.markers.at(-1)?.atMs ?? 0;
    await vm.waitFor('PROGRESS', (m) => m.atMs >= stoppedAt + 10_000, 120_000);
    t.ok(lastRound() > atDone, `with the source stopped the guest went on for 10 s (rounds ${atDone + 1}..${lastRound()})`);
  } catch (e) {
    await vm.kill();
    throw e;
  }
  const repeat = setInterval(() => vm.send('stop'), 1000);
  const r = await vm.result.finally(() => clearInterval(repeat));
  t.ok(r.ok, 'the guest never saw an I/O error nor read back anything but what it wrote', { diag: describeGuest(r) });
  t.ok(r.markers.some((m) => m.kind === 'ROOT' && m.args[0] === 'read-only'), 'the guest remounted its root filesystem read-only before powering off');
  for (const m of r.markers.filter((x) => x.kind === 'LAT')) t.comment(`FIGURE guest read latency ${m.args[0]}: ${m.args[1]} us`);

  const wl = r.markers.find((x) => x.kind === 'WORKLOAD');
  const rounds = Number(wl?.args[1]);
  const last = patternSectors(`${tag}.${rounds}`, 0, WORK);
  t.equal(wl?.args[2], md5(last), "the guest's last round is the pattern the host expects");
  const fsck = await fsckImage(dst);
  t.ok(fsck.clean, 'the destination image is a clean ext4 filesystem (e2fsck -fn)', { diag: fsck.output });
  const files = [
    { path: '/data/work.bin', data: last, what: "the guest's last round" },
    { path: '/data/base.bin', data: base, what: 'the data read at boot' },
    { path: '/data/late.bin', data: late, what: 'the data the fill brought' },
    { path: '/data/probe.bin', data: probe, what: 'the probed data' },
    { path: '/bin/busybox', data: await readFile(root.busybox), what: "the guest's busybox" },
    { path: '/scenario.sh', data: Buffer.from(scenario), what: 'the scenario' },
  ];
  for (const f of files) {
    const got = await readRootFile(dst, f.path);
    t.equal(md5(got), md5(f.data), `the destination's ${f.path} holds ${f.what}`);
  }
  const fin = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
  t.equal(fin.state, 'completed', 'the destination says completed');
  t.comment(`FIGURE fetch counters: ${JSON.stringify(fin.fetched)}`);
});
