// Post-copy under a running guest: the guest (QEMU/TCG, attached as libvirt
// would) starts on a destination (`serve --fetch-from`) whose image holds
// nothing yet; every byte of its disk is still on the source. At boot it reads
// and checks the data the host put on the source, times 4 KiB reads of blocks
// not yet fetched against the same reads once present, then runs the
// write-and-verify workload while the background fill (rate-limited) brings
// the rest. Once the destination says completed the source is stopped; the
// guest goes on for 10 s more with no I/O error, and the destination image
// holds exactly the guest's last round and the source's data, zeros elsewhere.
//
// The guest boots from its initramfs: the disk stands for its root filesystem
// (host-written data the guest reads first), not a filesystem it mounts.

import t from 'tap';
import { join } from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { MiB, allBytes, makeImage, readAt, serve, tmpDir, writeAt } from '../helpers/server.js';
import type { PostcopyStatus } from '../../src/migration/postcopy.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, requireQemu, startGuest } from './qemu.js';
import { SECTOR, fileMd5, firstBadSector, md5, patternSectors, runTag, shq } from './workload.js';

const SIZE = 32 * MiB;
/**
 * Sectors: workload 0..4 MiB (a hole on the source), late data 4..14 MiB (read
 * only at the end: the fill brings it meanwhile), host data 16..24 MiB (read at
 * boot), probe region 28..30 MiB.
 */
const W = { first: 0, count: 8192 };
const L = { first: 8192, count: 20480 };
const B = { first: 32768, count: 16384 };
const P = { first: 57344, count: 4096 };

t.test('a guest starts on an empty post-copy destination, writes while it fills, and goes on with the source stopped', async (t) => {
  await Promise.all([requireQemu(), buildGuest()]);
  const dir = await tmpDir(t, 'nbdm-guest-postcopy-');
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const base = patternSectors(runTag('base'), B.first, B.count);
  const probe = patternSectors(runTag('probe'), P.first, P.count);
  const late = patternSectors(runTag('late'), L.first, L.count);
  await writeAt(src, L.first * SECTOR, late);
  await writeAt(src, B.first * SECTOR, base);
  await writeAt(src, P.first * SECTOR, probe);

  const srcSrv = await serve(t, [src, '--name', 'vm1', '--read-only']);
  const sock = join(dir, 'dst.sock');
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--max-bandwidth', '512K', '--admin-socket', sock]);
  const s0 = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
  const brought = s0.fetched.fillBytes + s0.fetched.guestBytes + s0.fetched.readAheadBytes;
  t.ok(brought <= MiB, `the destination starts with (almost) none of the source's 20 MiB of data (${brought} bytes fetched; holes are zeroed at once)`);

  const tag = runTag('pc');
  // 8 reads of 4 KiB, 64 KiB apart (never sequential: no read-ahead), on blocks not yet fetched, then the same again.
  const probes = Array.from({ length: 8 }, (_, i) => (P.first / 8) + i * 16);
  const script = `
now_ns; t0=$_now
got=$(read_md5 /dev/vda ${B.first} ${B.count}) || exit 1
now_ns; marker LAT seq8m-absent $(( (_now - t0) / 1000 ))
[ "$got" = ${shq(md5(base))} ] || { fail "the source data reads back as md5 $got at boot"; exit 1; }
for pass in absent present; do
  total=0
  for blk in ${probes.join(' ')}; do
    now_ns; a=$_now
    dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$blk iflag=direct 2>/tmp/dd.err || { fail "probe read failed: $(cat /tmp/dd.err)"; exit 1; }
    now_ns; total=$((total + _now - a))
  done
  marker LAT 4k-$pass $((total / 8000))
done
drop_caches
now_ns; t0=$_now
got=$(read_md5 /dev/vda ${B.first} ${B.count}) || exit 1
now_ns; marker LAT seq8m-present $(( (_now - t0) / 1000 ))
workload /dev/vda ${W.first} ${W.count} 2000 ${shq(tag)} || exit 1
drop_caches
got=$(read_md5 /dev/vda ${B.first} ${B.count}) || exit 1
[ "$got" = ${shq(md5(base))} ] || { fail "the source data reads back as md5 $got at the end"; exit 1; }
got=$(read_md5 /dev/vda ${P.first} ${P.count}) || exit 1
[ "$got" = ${shq(md5(probe))} ] || { fail "the probe region reads back as md5 $got at the end"; exit 1; }
got=$(read_md5 /dev/vda ${L.first} ${L.count}) || exit 1
[ "$got" = ${shq(md5(late))} ] || { fail "the data the fill brought reads back as md5 $got"; exit 1; }
ok postcopy
`;
  const vm = await startGuest(t, {
    disks: [{ server: { type: 'inet', host: '127.0.0.1', port: dstSrv.newstylePort }, export: 'vm1' }],
    script,
    timeoutMs: 300_000,
  });
  const lastRound = () => Number(vm.markers.filter((m) => m.kind === 'PROGRESS').at(-1)?.args[0] ?? 0);
  try {
    const disks = await vm.waitFor('DISKS', undefined, 120_000);
    t.comment(`FIGURE guest saw its disk (first reads answered, fetched from the source) ${(disks.atMs / 1000).toFixed(2)} s after QEMU started`);
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
  for (const m of r.markers.filter((x) => x.kind === 'LAT')) t.comment(`FIGURE guest read latency ${m.args[0]}: ${m.args[1]} us`);

  const wl = r.markers.find((x) => x.kind === 'WORKLOAD');
  const rounds = Number(wl?.args[1]);
  const last = patternSectors(`${tag}.${rounds}`, W.first, W.count);
  t.equal(wl?.args[2], md5(last), "the guest's last round is the pattern the host expects");
  const regions = [
    { ...W, data: last, what: "the guest's last round" },
    { ...L, data: late, what: 'the data the fill brought' },
    { ...B, data: base, what: 'the source data' },
    { ...P, data: probe, what: 'the probe region' },
  ];
  for (const x of regions) {
    const got = await fileMd5(dst, x.first * SECTOR, x.count * SECTOR);
    t.equal(got, md5(x.data), `the destination image holds ${x.what}`, {
      firstBadSector: got === md5(x.data) ? undefined : await firstBadSector(dst, x.first * SECTOR, x.data),
    });
  }
  let zeros = true;
  for (const [a, b] of [[L.first + L.count, B.first], [B.first + B.count, P.first], [P.first + P.count, SIZE / SECTOR]] as const)
    zeros &&= allBytes(await readAt(dst, a * SECTOR, (b - a) * SECTOR), 0);
  t.ok(zeros, 'the rest of the destination image is zeros');
  const fin = (await adminRequest(sock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
  t.equal(fin.state, 'completed', 'the destination says completed');
  t.comment(`FIGURE fetch counters: ${JSON.stringify(fin.fetched)}`);
});
