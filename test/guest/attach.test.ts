// A real Linux guest (QEMU/TCG, virtio-blk, QEMU's NBD client, attached the
// way libvirt attaches <disk type='network'> with cache='none') writes a
// position-tagged pattern to its disk with O_DIRECT, drops its caches, reads
// it back and checksums it; the checksum must match the one computed on the
// host and the bytes in the served image. Once per way of attaching:
// newstyle by export name, an oldstyle port, and a Unix socket.

import t, { type Test } from 'tap';
import { join } from 'node:path';
import { MiB, allBytes, makeImage, readAt, serve, tmpDir, type ServerHandle } from '../helpers/server.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, libvirtDiskXml, requireQemu, runGuest, type NbdDisk } from './qemu.js';
import { SECTOR, fileMd5, firstBadSector, md5, patternSectors, runTag, shq } from './workload.js';

// Build (or find in the cache) the guest once for the file; a missing Debian
// package fails every test below with its name.
const ready = Promise.all([requireQemu(), buildGuest()]);
ready.catch(() => {});

const IMAGE_SIZE = 32 * MiB;
const FIRST = 2048; // sector 2048 = 1 MiB into the disk
const COUNT = 16384; // 8 MiB

function script(tag: string): string {
  return `
tag=${shq(tag)} first=${FIRST} count=${COUNT}
pattern "$tag" $first $count >/tmp/p
exp=$(md5 /tmp/p)
marker SUM pattern "$exp"
write_file /dev/vda /tmp/p $first direct || exit 1
rm -f /tmp/p
drop_caches
got=$(read_md5 /dev/vda $first $count) || exit 1
marker SUM readback "$got"
[ "$got" = "$exp" ] || { fail "read back md5 $got, wrote $exp"; exit 1; }
ok attached
`;
}

async function attachAndVerify(
  t: Test,
  listener: 'newstyle' | 'oldstyle' | 'unix',
  img: string,
  srv: ServerHandle,
  disk: NbdDisk,
): Promise<void> {
  await ready;
  const tag = runTag(listener);
  const expected = patternSectors(tag, FIRST, COUNT);
  const expectedMd5 = md5(expected);

  const r = await runGuest(t, { disks: [disk], script: script(tag), timeoutMs: 120_000 });
  t.comment(`${listener}: guest run took ${(r.durationMs / 1000).toFixed(1)} s`);
  t.ok(r.ok, `the guest attached over ${listener} and verified its write`, {
    diag: describeGuest(r),
    xml: libvirtDiskXml(disk),
  });
  const sums = Object.fromEntries(r.markers.filter((m) => m.kind === 'SUM').map((m) => [m.args[0], m.args[1]]));
  t.equal(sums.pattern, expectedMd5, 'the guest generated the same pattern as the host');
  t.equal(sums.readback, expectedMd5, 'the guest read back (O_DIRECT, caches dropped) what it wrote');

  const got = await fileMd5(img, FIRST * SECTOR, COUNT * SECTOR);
  t.equal(got, expectedMd5, 'the served image holds the pattern at the same offset', {
    firstBadSector: got === expectedMd5 ? undefined : await firstBadSector(img, FIRST * SECTOR, expected),
  });
  t.ok(allBytes(await readAt(img, 0, FIRST * SECTOR), 0), 'the image before the pattern is untouched');
  const after = (FIRST + COUNT) * SECTOR;
  t.ok(allBytes(await readAt(img, after, IMAGE_SIZE - after), 0), 'the image after the pattern is untouched');

  t.ok(
    srv.logs.some((e) => e.event === 'connection-open' && e.listener === listener),
    `the server saw the guest connect on its ${listener} listener`,
  );
  t.ok(
    srv.logs.some((e) => e.event === 'transmission' && e.export === 'vm1'),
    'the guest reached transmission on export vm1',
  );
}

t.test('newstyle, export by name', async (t) => {
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), IMAGE_SIZE);
  const srv = await serve(t, [img, '--name', 'vm1']);
  await attachAndVerify(t, 'newstyle', img, srv, {
    server: { type: 'inet', host: '127.0.0.1', port: srv.newstylePort },
    export: 'vm1',
  });
});

t.test('oldstyle port, no export name', async (t) => {
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), IMAGE_SIZE);
  const srv = await serve(t, [img, '--name', 'vm1', '--oldstyle-port', '0']);
  await attachAndVerify(t, 'oldstyle', img, srv, {
    server: { type: 'inet', host: '127.0.0.1', port: srv.oldstylePort('vm1') },
  });
});

t.test('Unix socket, export by name', async (t) => {
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), IMAGE_SIZE);
  const sock = join(dir, 'nbd.sock');
  const srv = await serve(t, [img, '--name', 'vm1', '--socket', sock]);
  await attachAndVerify(t, 'unix', img, srv, {
    server: { type: 'unix', path: srv.socketPath ?? sock },
    export: 'vm1',
  });
});
