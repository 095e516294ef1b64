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
import { adminRequest } from '../helpers/admin.js';
import { serve } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli } from '../migration/harness.js';
import type { NbdDisk } from './qemu.js';
import { migrateAndVerify, migrationSetup as setup, waitJob } from './migration.js';

/** Source and `serve --incoming` destination servers, and a guest running the workload on the source. */
async function migrationSetup(t: Test, disk: Partial<NbdDisk> = {}) {
  const m = await setup(t, { disk });
  const dstSrv = await serve(t, [m.dst, '--name', 'vm1', '--incoming']);
  return { ...m, dstSrv };
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
    await adminRequest(adminSock, { cmd: 'set-speed', export: 'vm1', rate: '0' });

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
