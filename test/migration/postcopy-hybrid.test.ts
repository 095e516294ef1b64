// Hybrid migration (`ctl mirror --converge postcopy`): a writer faster than
// the copy's bandwidth cap keeps the dirty set from shrinking; instead of
// throttling the writer, the job hands the export over to the post-copy
// destination it was pre-copying into. The destination takes the source's
// dirty list (those blocks are fetched again), the writer goes on through the
// forwarding source without an error or a throttle, and once the destination
// has filled, it equals everything the writer had acknowledged.
import t from 'tap';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import type { PostcopyStatus } from '../../src/migration/postcopy.js';
import { adminRequest } from '../helpers/admin.js';
import { MiB, makeImage, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli, compare, startWriter, waitForJob } from './harness.js';

const SIZE = 16 * MiB;

t.test('a writer faster than the link: the mirror switches to post-copy instead of throttling', async (t) => {
  const dir = await tmpDir(t, 'nbdm-hybrid-');
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  await writeAt(src, 0, patternBuffer(8 * MiB, 9));
  const shadow = join(dir, 'shadow.img');
  copyFileSync(src, shadow);
  const srcSock = join(dir, 'src.sock');
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', srcSock]);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const dstSock = join(dir, 'dst.sock');
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1'), '--admin-socket', dstSock]);

  // The writer keeps to the first 4 MiB: the rest of the disk is pre-copied once and stays clean.
  const writer = await startWriter(srcSrv.uri('vm1'), shadow, dir, { region: 4 * MiB });
  let stopped = false;
  t.teardown(() => (stopped ? undefined : writer.stop().catch(() => undefined)));

  const m = await cli(['ctl', '--socket', srcSock, 'mirror', 'vm1', dstSrv.uri('vm1'), '--converge', 'postcopy', '--cutover', 'auto', '--max-bandwidth', '2M']);
  t.equal(m.code, 0, 'ctl mirror --converge postcopy started', { diag: describeRun(m) });
  const done = await waitForJob(srcSock, 'vm1', (j) => j.state === 'completed', { what: 'the switch to post-copy', timeoutMs: 90_000, failOn: ['failed', 'aborted'] });
  const sw = srcSrv.logs.find((e) => e.event === 'mirror-postcopy-switch');
  t.ok(sw, 'the job switched to post-copy when the dirty data stopped shrinking', { diag: { sw } });
  t.equal(done.convergence, 'postcopy', "status says the job converged by switching to post-copy");
  const st0 = done.switchedToPostcopy;
  t.ok(st0, 'status records the switch (switchedToPostcopy)', { diag: { done } });
  t.equal(st0?.pass, sw?.pass, `at the pass the log names (${sw?.pass})`);
  t.equal(st0?.dirtyBytes, sw?.dirtyBytes, `with the dirty bytes left then (${sw?.dirtyBytes})`);
  t.ok((st0?.dirtyBytes ?? 0) > 0, 'which the destination had still to fetch');
  t.equal(st0?.pauseMs, done.pauseMs, "and the guests' pause at the hand-over");
  const at = Date.parse(st0?.at ?? '');
  t.ok(at >= Date.parse(done.startedAt) && at <= Date.parse(done.finishedAt ?? ''), `switched at ${st0?.at}, between the job's start and its end`);
  const plain = await cli(['ctl', '--socket', srcSock, 'status']);
  t.match(plain.stdout, new RegExp(`vm1 .* completed .* postcopy .* switched to post-copy at pass ${st0?.pass}, `), 'plain ctl status shows the switch in the mirror table', { diag: plain.stdout });
  t.equal(done.throttleRate, null, 'the writer was never throttled');
  t.notOk(srcSrv.logs.some((e) => e.event === 'mirror-converge'), 'no other convergence was engaged');
  const applied = await dstSrv.waitForLog((e) => e.event === 'postcopy-dirty-applied');
  t.ok((applied.absentBytes as number) < SIZE, `the destination already held part of the disk from the pre-copy (${SIZE - (applied.absentBytes as number)} bytes present)`);
  t.comment(`FIGURE hybrid: pre-copy passes ${done.pass}, dirty at the switch ${sw?.dirtyBytes} bytes, hand-over pause ${done.pauseMs} ms`);

  // The writer goes on, now forwarded to the destination.
  const before = (srcSrv.logs.filter((e) => e.event === 'postcopy-handover').length);
  t.equal(before, 1, 'the source handed over once');
  await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 90_000);
  const w = await writer.stop();
  stopped = true;
  t.equal(w.errors, 0, `the writer saw no error (${w.writes} writes, longest ${w.maxLatencyMs} ms)`, { diag: w });
  const st = (await adminRequest(dstSock, { cmd: 'status', export: 'vm1' })) as PostcopyStatus;
  t.equal(st.state, 'completed', 'the destination completed');
  const cmp = await compare(shadow, dst);
  if (cmp.code !== 0) {
    const { readFileSync } = await import('node:fs');
    const [a, b, c] = [readFileSync(shadow), readFileSync(dst), readFileSync(src)];
    let bad = 0;
    const sample: string[] = [];
    for (let off = 0; off < SIZE; off += 4096) {
      const x = a.subarray(off, off + 4096), y = b.subarray(off, off + 4096), z = c.subarray(off, off + 4096);
      if (!x.equals(y)) {
        bad++;
        if (sample.length < 8) sample.push(`${off}: dst==src ${y.equals(z)} dstZero ${y.every((v) => v === 0)} shadow==src ${x.equals(z)}`);
      }
    }
    t.comment(`DEBUG ${bad} bad 4K blocks; ${sample.join(' | ')}`);
  }
  t.equal(cmp.code, 0, 'the destination equals every write the writer had acknowledged, before and after the switch', { diag: describeRun(cmp) });
});
