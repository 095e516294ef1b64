// A real guest's `sync` and `blkdiscard` reach the served image while the
// guest is still running:
//   - it writes 8 MiB through its page cache (no O_DIRECT, the disk held open
//     so that closing it does not write back) and runs `sync`; the host then
//     finds every byte in the image file, before the guest powers off; then
//     the guest fsyncs the disk (an NBD_CMD_FLUSH), which must succeed;
//   - it discards 4 MiB of that with blkdiscard; QEMU turns it into
//     NBD_CMD_TRIM, the server punches a hole, and `qemu-img map` of the file
//     on the host reports the range as "data": false; the guest then reads the
//     range back as zeros and the rest as its pattern.
// The disk is attached as libvirt does with <driver ... discard='unmap'/>;
// without that attribute (as in the README's XML) QEMU drops the guest's
// discards, which a second disk, vdb, attached exactly as the README says,
// shows (reported as a comment, not asserted: that is QEMU's policy, not the
// server's).

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, readAt, serve, tmpDir } from '../helpers/server.js';
import { requireTool } from '../helpers/tools.js';
import { buildGuest } from './build-guest.js';
import { describeGuest, requireQemu, startGuest, type NbdDisk } from './qemu.js';
import {
  SECTOR,
  extentsIn,
  fileMd5,
  firstBadSector,
  md5,
  patternSectors,
  qemuImgMap,
  runTag,
  shq,
  type MapExtent,
} from './workload.js';

const ready = Promise.all([requireQemu(), buildGuest(), requireTool('qemu-img', 'qemu-utils')]);
ready.catch(() => {});

const IMAGE_SIZE = 32 * MiB;
const COUNT = 16384; // sectors 0..16383: 8 MiB of pattern
const DISCARD_OFF = 1 * MiB;
const DISCARD_LEN = 4 * MiB;

function script(tag: string): string {
  const dFirst = DISCARD_OFF / SECTOR;
  const dCount = DISCARD_LEN / SECTOR;
  const tailFirst = dFirst + dCount;
  return `
tag=${shq(tag)}
go_on() { r=$(host_says "$1"); [ "$r" = continue ] || { fail "host stopped the run at $1: $r"; exit 1; }; }

pattern "$tag" 0 ${COUNT} >/tmp/p
marker SUM pattern "$(md5 /tmp/p)"
# Hold the disks open: the last close of a block device writes its dirty
# pages back, and then the data would reach the server without any sync.
exec 3</dev/vda 4</dev/vdb
write_file /dev/vda /tmp/p 0 buffered || exit 1
write_file /dev/vdb /tmp/p 0 buffered || exit 1
rm -f /tmp/p
go_on written
sync || { fail "sync failed"; exit 1; }
go_on synced
sync /dev/vda /dev/vdb || { fail "fsync of the disks (NBD_CMD_FLUSH) failed"; exit 1; }
exec 3<&- 4<&-

blkdiscard -o ${DISCARD_OFF} -l ${DISCARD_LEN} /dev/vda 2>/tmp/bd.err ||
  { fail "blkdiscard /dev/vda failed: $(cat /tmp/bd.err)"; exit 1; }
blkdiscard -o ${DISCARD_OFF} -l ${DISCARD_LEN} /dev/vdb 2>/tmp/bd.err
marker INFO vdb-blkdiscard "rc=$?" "$(cat /tmp/bd.err)"
sync /dev/vda /dev/vdb
go_on discarded

drop_caches
zero=$(dd if=/dev/zero bs=64k count=${dCount / 128} 2>/dev/null | md5)
got=$(read_md5 /dev/vda ${dFirst} ${dCount}) || exit 1
[ "$got" = "$zero" ] || { fail "the discarded range does not read as zeros (md5 $got)"; exit 1; }
got=$(read_md5 /dev/vda 0 ${dFirst}) || exit 1
[ "$got" = "$(pattern "$tag" 0 ${dFirst} | md5)" ] || { fail "the data before the discarded range changed"; exit 1; }
got=$(read_md5 /dev/vda ${tailFirst} ${COUNT - tailFirst}) || exit 1
[ "$got" = "$(pattern "$tag" ${tailFirst} ${COUNT - tailFirst} | md5)" ] || { fail "the data after the discarded range changed"; exit 1; }
ok trim-flush
`;
}

function fmt(extents: MapExtent[]): string {
  return extents.map((e) => `[${e.start / MiB}M+${e.length / MiB}M ${e.data ? 'data' : 'hole'}]`).join(' ');
}

t.test('guest sync reaches the image; guest discard punches a hole', async (t) => {
  const [, , qemuImg] = await ready;
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), IMAGE_SIZE);
  const img2 = await makeImage(join(dir, 'vm2.img'), IMAGE_SIZE);
  const srv = await serve(t, [img, img2, '--name', 'vm1', '--name', 'vm2']);
  const server = { type: 'inet', host: '127.0.0.1', port: srv.newstylePort } as const;
  const disks: NbdDisk[] = [
    { server, export: 'vm1', discard: 'unmap' }, // vda: <driver name='qemu' type='raw' cache='none' discard='unmap'/>
    { server, export: 'vm2' }, // vdb: the README's XML, verbatim
  ];

  const tag = runTag('trim');
  const expected = patternSectors(tag, 0, COUNT);
  const expectedMd5 = md5(expected);
  const vm = await startGuest(t, { disks, script: script(tag), timeoutMs: 120_000 });
  const step = async (name: string, check: () => Promise<boolean>) => {
    await vm.waitFor('WAIT', (m) => m.args[0] === name, 90_000);
    const good = await check();
    vm.send(good ? 'continue' : `abort-after-failed-host-check-${name}`);
  };

  try {
    await step('written', async () => {
      const buf = expected;
      const file = await readAt(img, 0, COUNT * SECTOR);
      let present = 0;
      for (let s = 0; s < COUNT; s++) {
        if (file.subarray(s * SECTOR, (s + 1) * SECTOR).equals(buf.subarray(s * SECTOR, (s + 1) * SECTOR))) present++;
      }
      t.comment(`before the guest's sync, ${present} of ${COUNT} written sectors had reached the image`);
      return true;
    });

    await step('synced', async () => {
      const got = await fileMd5(img, 0, COUNT * SECTOR);
      return t.equal(got, expectedMd5, 'after the guest ran sync, the image file holds all it wrote (guest still running)', {
        firstBadSector: got === expectedMd5 ? undefined : await firstBadSector(img, 0, expected),
      });
    });

    await step('discarded', async () => {
      const map = await qemuImgMap(qemuImg, img);
      const hole = extentsIn(map, DISCARD_OFF, DISCARD_LEN);
      const head = extentsIn(map, 0, DISCARD_OFF);
      const tail = extentsIn(map, DISCARD_OFF + DISCARD_LEN, COUNT * SECTOR - DISCARD_OFF - DISCARD_LEN);
      let good = t.ok(
        hole.length > 0 && hole.every((e) => !e.data),
        `qemu-img map: the discarded ${DISCARD_LEN / MiB} MiB at ${DISCARD_OFF / MiB} MiB report "data": false`,
        { map: fmt(map) },
      );
      good = t.ok(head.every((e) => e.data) && tail.every((e) => e.data), 'the data around it stays allocated', { map: fmt(map) }) && good;
      const map2 = extentsIn(await qemuImgMap(qemuImg, img2), DISCARD_OFF, DISCARD_LEN);
      const dropped = map2.every((e) => e.data);
      const info = vm.markers.find((m) => m.kind === 'INFO' && m.args[0] === 'vdb-blkdiscard');
      t.comment(
        `README XML (no discard='unmap'): guest blkdiscard on vdb: ${info?.args.slice(1).join(' ') ?? '?'}; ` +
          (dropped ? 'QEMU dropped it, the image stayed allocated' : `it reached the server: ${fmt(map2)}`),
      );
      return good;
    });
  } catch (e) {
    await vm.kill();
    throw e;
  }

  const r = await vm.result;
  t.comment(`guest run took ${(r.durationMs / 1000).toFixed(1)} s`);
  t.ok(r.ok, 'the guest read zeros from the discarded range and its pattern around it', { diag: describeGuest(r) });
  const sum = r.markers.find((m) => m.kind === 'SUM' && m.args[0] === 'pattern');
  t.equal(sum?.args[1], expectedMd5, 'the guest generated the same pattern as the host');
});
