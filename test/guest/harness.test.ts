// The guest harness itself: marker parsing, the cpio writer, and that a run
// is judged by its markers (a failing guest powers off with exit code 0) and
// ended with SIGKILL when its NBD server stalls and QEMU ignores SIGTERM.

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, serve, tmpDir } from '../helpers/server.js';
import { buildGuest, newcArchive } from './build-guest.js';
import { describeGuest, parseMarker, requireQemu, runGuest, startGuest } from './qemu.js';

const ready = Promise.all([requireQemu(), buildGuest()]);
ready.catch(() => {});

t.test('markers are found in console lines mixed with kernel output', async (t) => {
  t.same(parseMarker('@@NBDM RESULT ok attached\r'), { kind: 'RESULT', args: ['ok', 'attached'], rest: 'ok attached', atMs: 0 });
  t.same(parseMarker('[    2.591852] virtio_blk virtio0: [vda] 65536 512-byte logical blocks@@NBDM PROGRESS 3 abc')?.args, ['3', 'abc']);
  t.equal(parseMarker('@@NBDM WAIT')?.kind, 'WAIT');
  t.same(parseMarker('@@NBDM WAIT')?.args, []);
  t.equal(parseMarker('[    2.5] reboot: Power down'), undefined);
  t.equal(parseMarker('@@NBDMX RESULT ok'), undefined);
});

t.test('newc archives: headers, padding, device nodes, trailer', async (t) => {
  const a = newcArchive([
    { type: 'dir', path: 'dev' },
    { type: 'chardev', path: '/dev/console', major: 5, minor: 1 },
    { type: 'file', path: 'init', data: 'abc', mode: 0o755 },
  ]);
  t.equal(a.length % 4, 0, 'the archive is 4-byte aligned, so archives can be concatenated');
  const entries: { name: string; mode: number; size: number; rdev: [number, number] }[] = [];
  for (let off = 0; off < a.length; ) {
    t.equal(a.toString('ascii', off, off + 6), '070701', `newc magic at ${off}`);
    const f = (i: number) => parseInt(a.toString('ascii', off + 6 + i * 8, off + 14 + i * 8), 16);
    const namesize = f(11);
    const size = f(6);
    const name = a.toString('utf8', off + 110, off + 110 + namesize - 1);
    entries.push({ name, mode: f(1), size, rdev: [f(9), f(10)] });
    off += 110 + namesize;
    off += (4 - (off % 4)) % 4;
    off += size + ((4 - (size % 4)) % 4);
    if (name === 'TRAILER!!!') {
      t.equal(off, a.length, 'nothing after the trailer');
      break;
    }
  }
  t.same(
    entries.map((e) => e.name),
    ['dev', 'dev/console', 'init', 'TRAILER!!!'],
  );
  t.equal(entries[1]!.mode, 0o20600, '/dev/console is a character device');
  t.same(entries[1]!.rdev, [5, 1], '/dev/console is 5:1');
  t.equal(entries[2]!.mode, 0o100755);
  t.equal(entries[2]!.size, 3);
});

t.test('a failing guest fails the run although QEMU exits 0', async (t) => {
  await ready;
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), 4 * MiB);
  const srv = await serve(t, [img, '--name', 'vm1']);
  const r = await runGuest(t, {
    disks: [{ server: { type: 'inet', port: srv.newstylePort }, export: 'vm1' }],
    script: 'fail deliberately; exit 1',
    timeoutMs: 90_000,
  });
  t.comment(`guest run took ${(r.durationMs / 1000).toFixed(1)} s`);
  t.notOk(r.ok, 'the run failed', { diag: describeGuest(r) });
  t.equal(r.code, 0, 'QEMU exited 0 all the same (poweroff -f)');
  t.match(r.failure, /deliberately/, 'the failure names what the guest reported');
  t.ok(r.markers.some((m) => m.kind === 'EXIT' && m.args[0] === '1'), 'the scenario exit status was reported');
});

t.test('a guest whose server stalls is killed (SIGTERM, then SIGKILL)', async (t) => {
  await ready;
  const dir = await tmpDir(t, 'nbdm-guest-');
  const img = await makeImage(join(dir, 'vm1.img'), 4 * MiB);
  const srv = await serve(t, [img, '--name', 'vm1']);
  const vm = await startGuest(t, {
    disks: [{ server: { type: 'inet', port: srv.newstylePort }, export: 'vm1' }],
    script: 'host_says stall-me >/dev/null; read_md5 /dev/vda 0 128; ok "read through a stopped server"',
    timeoutMs: 90_000,
    killAfterMs: 2000,
  });
  t.teardown(() => {
    srv.proc.kill('SIGCONT');
  });
  await vm.waitFor('WAIT', (m) => m.args[0] === 'stall-me', 80_000);
  srv.proc.kill('SIGSTOP');
  vm.send('go');
  await new Promise((r) => setTimeout(r, 1500)); // the guest's read is now stuck in QEMU's NBD client
  const killedAt = Date.now();
  const r = await vm.kill();
  const tookMs = Date.now() - killedAt;
  srv.proc.kill('SIGCONT');
  t.comment(`QEMU ended by ${r.signal ?? `exit ${r.code}`} ${tookMs} ms after SIGTERM`);
  t.notOk(r.ok, 'the run is not ok', { diag: describeGuest(r) });
  t.match(r.failure, /no RESULT marker/, 'the run failed for want of a RESULT marker');
  t.ok(tookMs < 10_000, 'QEMU was gone within the kill-after delay');
});
