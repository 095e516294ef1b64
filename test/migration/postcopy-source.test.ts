// The source side of post-copy (`ctl postcopy`, handOver in
// src/migration/postcopy-handover.ts): a destination started with --fetch-from against
// a live, writable source does not fetch until the source hands over; the
// hand-over holds guest writes, flushes, fences the image, serves it read-only
// to that destination's fetcher alone, and forwards the connected guest to
// the destination, whose writes then land there. The destination ends with
// the source's data plus everything the guest wrote, before and after.
import t from 'tap';
import { join } from 'node:path';
import { existsSync, readFileSync } from 'node:fs';
import { NbdClient } from '../../src/client/nbd-client.js';
import { MiB, makeImage, patternBuffer, serve, startServer, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli } from './harness.js';

const SIZE = 16 * MiB;

t.test('ctl postcopy hands a live export over: fence, supplier, guests forwarded', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-src-');
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  const data = patternBuffer(8 * MiB, 5);
  await writeAt(src, 0, data);
  const srcSock = join(dir, 'src.sock');
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', srcSock]);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--fetch-from', srcSrv.uri('vm1')]);

  // The guest runs on the source and writes.
  const guest = await NbdClient.connect(srcSrv.uri('vm1'));
  t.teardown(() => guest.destroy());
  const before = Buffer.alloc(100_000, 0x31);
  await guest.write(3 * MiB + 777, [before], { fua: false });

  await dstSrv.waitForLog((e) => e.event === 'source-not-handed-over');
  t.pass('the destination does not fetch from a live, writable source that has not handed over');

  const r = await cli(['ctl', '--socket', srcSock, 'postcopy', 'vm1', dstSrv.uri('vm1')]);
  // On failure, both sides' logs: the hand-over waits on the destination (it must ask for nbd-migrate:postcopy-applied).
  const logs = (s: { logs: unknown[] }) => s.logs.map((e) => JSON.stringify(e)).join('\n');
  t.equal(r.code, 0, 'ctl postcopy succeeded', { diag: `${describeRun(r)}\n--- destination log ---\n${logs(dstSrv)}\n--- source log ---\n${logs(srcSrv)}` });
  t.match(r.stdout, /handed over to .*forwarded/, 'it says so');
  t.ok(existsSync(`${src}.nbd-migrate-fenced`), 'the source image is fenced');
  const ho = await srcSrv.waitForLog((e) => e.event === 'postcopy-handover');
  t.comment(`FIGURE hand-over pause (writes held): ${ho.pauseMs} ms`);

  // The guest's connection now goes to the destination.
  const after = Buffer.alloc(70_000, 0x62);
  await guest.write(5 * MiB + 100, [after], { fua: false });
  await guest.flush();
  const back = Buffer.alloc(after.length);
  await guest.read(5 * MiB + 100, after.length, back, 0);
  t.ok(back.equals(after), 'the forwarded guest reads back its write');
  t.ok(dstSrv.logs.some((e) => e.event === 'source-connected'), 'the destination fetcher attached to the supplier');

  // Anyone else is refused by the supplier.
  const other = await NbdClient.connect(srcSrv.uri('vm1')).then(
    (c) => (c.destroy(), undefined),
    (e: Error) => e,
  );
  t.match(String(other), /handed over to .*only that destination's fetcher/, 'a new client of the source is refused, naming the destination');

  await dstSrv.waitForLog((e) => e.event === 'postcopy-completed', 60_000);
  const want = Buffer.from(readFileSync(src));
  t.ok(want.subarray(3 * MiB + 777, 3 * MiB + 777 + before.length).equals(before), 'the fenced source holds the write made before the hand-over');
  after.copy(want, 5 * MiB + 100);
  const got = readFileSync(dst);
  t.ok(got.equals(want), 'the destination holds the source (with the early write) plus the write forwarded after the hand-over');
  t.notOk(readFileSync(src).subarray(5 * MiB + 100, 5 * MiB + 200).equals(after.subarray(0, 100)), 'the forwarded write did not touch the fenced source');

  // A restart of the source refuses to serve the fenced image read-write.
  await srcSrv.stop();
  const again = await startServer([src, '--name', 'vm1']).then(
    (s) => (void s.stop(), 'started'),
    (e: Error) => e.message,
  );
  t.match(again, /fenced/, 'the fenced source is not served read-write again');
});
