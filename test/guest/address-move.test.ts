// An address per volume that moves with the disk (issue 11.3), end to end in
// network namespaces this test creates:
//
//   hypervisor (nbdm<pid>-hv)  bridge br0, fd00::100/64; QEMU (TCG) with its
//                              disk on nbd://[fd00::11]:10809/vm1, reconnect-delay
//   storage1   (nbdm<pid>-s1)  eth0 fd00::1/64, and the volume's fd00::11/128;
//                              nbd-migrate serve --export vm1=SRC,listen=[fd00::11]:10809
//   storage2   (nbdm<pid>-s2)  eth0 fd00::2/64;
//                              nbd-migrate serve --export vm1=DST,incoming,listen=[fd00::11]:10809
//
// The volume address is added with preferred_lft 0, so that the storage host
// never uses it as the source of its own connections (the mirror's connection
// to storage2 would otherwise leave from it and break when it moves).
// The hypervisor reaches the volume address through a host route
// (fd00::11/128 via the storage host that has it), as a routed per-volume
// address is announced. The guest writes and verifies its disk continuously
// while the disk migrates from storage1 to storage2 (cutover once in sync,
// handoff disconnect). storage1's --on-cutover moves the address: `ip addr del` on
// storage1, `ip addr add` on storage2, the route to storage2, each through
// `ip netns exec`. storage2 binds the address when it appears; QEMU
// reconnects to it; storage1's nbd-migrate is stopped; the guest goes on for
// 10 more seconds with no I/O error, and storage2's image holds its last data.
// Everything the test creates is removed in teardown, also on failure.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { NetLab } from '../helpers/netns.js';
import { makeImage, REPO_ROOT, serve, tmpDir, writeAt } from '../helpers/server.js';
import { SECTOR, md5, patternSectors, runTag } from './workload.js';
import { DEFAULT_LAYOUT, migrateAndVerify, ready, waitJob, workloadScript, type Setup } from './migration.js';
import { libvirtDiskXml, type NbdDisk, startGuest } from './qemu.js';

const VOLUME = 'fd00::11';
const PORT = 10809;

t.test('the volume address moves with the disk; storage1 is stopped; the guest never sees an I/O error', async (t) => {
  await ready;
  const lab = await NetLab.create(t);
  const hv = await lab.ns('hv');
  const s1 = await lab.ns('s1');
  const s2 = await lab.ns('s2');
  await lab.bridge(hv, 'br0');
  await lab.ip('-n', hv, 'addr', 'add', 'fd00::100/64', 'dev', 'br0', 'nodad');
  await lab.plug(s1, 'eth0', hv, 'br0', ['fd00::1/64']);
  // preferred_lft 0: the volume address takes connections but is never the source of the host's own
  // (the mirror's connection to storage2 would otherwise leave from it, and break when it moves).
  await lab.ip('-n', s1, 'addr', 'add', `${VOLUME}/128`, 'dev', 'eth0', 'nodad', 'preferred_lft', '0');
  await lab.plug(s2, 'eth0', hv, 'br0', ['fd00::2/64']);
  await lab.ip('-n', hv, '-6', 'route', 'add', `${VOLUME}/128`, 'via', 'fd00::1', 'dev', 'br0');

  const layout = DEFAULT_LAYOUT;
  const dir = await tmpDir(t, 'nbdm-addr-');
  const src = await makeImage(join(dir, 'src.img'), layout.imageSize);
  const dst = await makeImage(join(dir, 'dst.img'), layout.imageSize);
  const base = patternSectors(runTag('base'), layout.bFirst, layout.bCount);
  await writeAt(src, layout.bFirst * SECTOR, base);
  const adminSock = join(dir, 'admin.sock');

  // The operator's command: the address leaves storage1, appears on storage2, and the route follows it.
  const ip = lab.ipBin;
  const host = '"$NBD_MIGRATE_LISTEN_HOST"';
  const move = [
    `${ip} netns exec ${s1} ${ip} addr del ${host}/128 dev eth0`,
    `${ip} netns exec ${s2} ${ip} addr add ${host}/128 dev eth0 nodad preferred_lft 0`,
    `${ip} netns exec ${hv} ${ip} -6 route replace ${host}/128 via fd00::2 dev br0`,
  ].join(' && ');
  const volume = `listen=[${VOLUME}]:${PORT}`;
  const dstSrv = await serve(t, ['--listen', 'fd00::2', '--port', String(PORT), '--export', `vm1=${dst},incoming,${volume}`], {
    prefix: lab.execArgs(s2),
  });
  await dstSrv.waitForLog((e) => e.event === 'listen-pending' && e.export === 'vm1');
  const srcSrv = await serve(
    t,
    ['--listen', 'fd00::1', '--port', String(PORT), '--export', `vm1=${src},${volume}`, '--admin-socket', adminSock, '--on-cutover', move],
    { prefix: lab.execArgs(s1) },
  );
  await srcSrv.waitForLog((e) => e.event === 'listening' && e.listener === 'export' && e.address === VOLUME);

  const tag = runTag('addr');
  const disk: NbdDisk = { server: { type: 'inet', host: VOLUME, port: PORT }, export: 'vm1', reconnectDelay: 30 };
  const example = readFileSync(join(REPO_ROOT, 'config', 'libvirt-disk-volume-address.xml'), 'utf8').replace(/<!--[^]*?-->\s*/, '');
  t.equal(example.trim(), libvirtDiskXml(disk), "config/libvirt-disk-volume-address.xml is the disk this guest gets (QEMU's arguments as libvirt makes them)");
  const vm = await startGuest(t, {
    disks: [disk],
    script: workloadScript(tag, md5(base), layout),
    timeoutMs: 300_000,
    prefix: lab.execArgs(hv),
  });
  const lastRound = () => Number(vm.markers.filter((m) => m.kind === 'PROGRESS').at(-1)?.args[0] ?? 0);
  const progress = (n: number) => vm.waitFor('PROGRESS', (m) => Number(m.args[0]) >= n, 120_000);
  const m: Setup = { dir, layout, src, dst, base, adminSock, srcSrv, tag, vm, lastRound, progress };

  const r = await migrateAndVerify(t, m, async () => {
    const p = await progress(2);
    t.comment(`guest workload running on [${VOLUME}]:${PORT}: round ${p.args[0]} at ${(p.atMs / 1000).toFixed(1)} s`);
    await adminRequest(adminSock, {
      cmd: 'mirror', export: 'vm1', target: `nbd://[fd00::2]:${PORT}/vm1`, cutover: 'manual', handoff: 'disconnect', maxBandwidth: '8M',
    });
    await waitJob(adminSock, (j) => j.state === 'ready', 'the job to be ready', 120_000);
    // The guest goes on writing while the disk is in sync on both hosts, then the switch.
    const atReady = await progress(lastRound() + 1);
    await adminRequest(adminSock, { cmd: 'cutover', export: 'vm1' });
    const done = await waitJob(adminSock, (j) => j.state === 'completed', 'the cutover', 120_000);
    const atCut = lastRound();
    t.comment(`cutover at guest round ${atCut}, guests held ${done.pauseMs} ms`);
    t.ok(Number(atReady.args[0]) > Number(p.args[0]), 'the guest wrote while its disk migrated');

    const closed = await srcSrv.waitForLog((e) => e.event === 'listener-closed' && e.export === 'vm1');
    t.equal(closed.reason, 'handoff', "storage1 closed the volume's listener at the handoff");
    const hook = await srcSrv.waitForLog((e) => e.event === 'on-cutover-done' || e.event === 'on-cutover-failed', 30_000);
    t.equal(hook.event, 'on-cutover-done', 'the --on-cutover command moved the address', { diag: hook });
    const bound = await dstSrv.waitForLog((e) => e.event === 'listening' && e.listener === 'export' && e.address === VOLUME, 30_000);
    t.ok(bound, 'storage2 bound the volume address once it appeared');
    const attached = await dstSrv.waitForLog((e) => e.event === 'transmission' && e.export === 'vm1' && e.metaContexts !== undefined &&
      !(e.metaContexts as string[]).some((c) => c.startsWith('nbd-migrate:incoming')), 60_000);
    const opened = dstSrv.logs.find((e) => e.event === 'connection-open' && e.conn === attached.conn);
    t.match(opened, { listener: 'export', remote: /^fd00::100:/ }, 'QEMU reconnected to storage2 on the volume address');
    t.notOk(dstSrv.logs.some((e) => e.event === 'connection-refused' && e.listener === 'export'), 'storage2 never had to refuse the guest (it came after MIGRATE_COMPLETE)');

    const atMove = await progress(lastRound() + 1);
    const t0 = Date.now();
    await srcSrv.stop();
    t.equal(srcSrv.exited()?.code, 0, `storage1's nbd-migrate stopped cleanly (${Date.now() - t0} ms)`, {
      diag: { exited: srcSrv.exited(), log: srcSrv.logs.slice(-15) },
    });
    const stoppedAt = vm.markers.at(-1)?.atMs ?? atMove.atMs;
    const after = await vm.waitFor('PROGRESS', (x) => x.atMs >= stoppedAt + 10_000, 120_000);
    t.comment(`guest rounds ${atMove.args[0]}..${after.args[0]} after the move, ${((after.atMs - stoppedAt) / 1000).toFixed(1)} s after storage1 stopped`);
    vm.send('stop');
    return lastRound() - atCut;
  });
  t.notMatch(r.transcript, /I\/O error|Buffer I\/O|blk_update_request/, 'the guest kernel logged no I/O error');
});
