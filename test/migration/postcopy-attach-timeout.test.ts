// A post-copy hand-over whose destination cannot fetch (its --fetch-from no longer reaches this
// source) holds guests only as long as --cutover-timeout says, then is undone: the image is not
// fenced, the export stays writable here, and the guests go on with it.
import t from 'tap';
import * as net from 'node:net';
import { join } from 'node:path';
import { existsSync } from 'node:fs';
import { NbdClient } from '../../src/client/nbd-client.js';
import { MiB, makeImage, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli } from './harness.js';

const SIZE = 16 * MiB;

/** A TCP relay to `port` that can stop admitting new connections (the ones it has keep flowing). */
async function relay(t: Tap, port: number) {
  let admitting = true;
  const server = net.createServer((c) => {
    if (!admitting) return void c.destroy();
    const up = net.connect(port, '127.0.0.1');
    c.pipe(up).pipe(c);
    const end = () => (c.destroy(), up.destroy());
    c.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return { port: (server.address() as net.AddressInfo).port, refuseNew: () => void (admitting = false) };
}
type Tap = typeof t;

t.test('a destination that cannot attach: guests held within --cutover-timeout, then the hand-over is undone', async (t) => {
  const dir = await tmpDir(t, 'nbdm-postcopy-attach-');
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  await writeAt(src, 0, patternBuffer(4 * MiB, 3));
  const srcSock = join(dir, 'src.sock');
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', srcSock]);
  const r = await relay(t, srcSrv.newstylePort);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--fetch-from', `nbd://127.0.0.1:${r.port}/vm1`]);
  await dstSrv.waitForLog((e) => e.event === 'source-not-handed-over', 30_000);
  // From now on the destination cannot reach this source (a firewall, a wrong --fetch-from).
  r.refuseNew();

  const guest = await NbdClient.connect(srcSrv.uri('vm1'));
  t.teardown(() => guest.destroy());
  const t0 = performance.now();
  const ho = await cli(['ctl', '--socket', srcSock, 'postcopy', 'vm1', dstSrv.uri('vm1'), '--cutover-timeout', '1s']);
  const ms = performance.now() - t0;
  t.not(ho.code, 0, `ctl postcopy failed\n${describeRun(ho)}`);
  t.match(ho.stderr, /did not attach within 1000 ms/, 'naming the bound');
  t.ok(ms < 15_000, `it returned after ${Math.round(ms)} ms (the old fixed bound was 30 s)`);
  const failed = await srcSrv.waitForLog((e) => e.event === 'postcopy-handover-failed', 10_000);
  t.equal(failed.effect, 'guests stay on the local image');
  t.notOk(existsSync(`${src}.nbd-migrate-fenced`), 'the source image is not fenced');

  // The guest goes on here: its write lands in the local image and reads back.
  const data = Buffer.alloc(64 * 1024, 0x5c);
  await guest.write(MiB, [data], { fua: true });
  const back = Buffer.alloc(data.length);
  await guest.read(MiB, data.length, back, 0);
  t.ok(back.equals(data), 'the guest reads back its write from the local image');
  // And a new client still attaches to the writable export (it was given back).
  const other = await NbdClient.connect(srcSrv.uri('vm1'));
  t.notOk(other.readOnly, 'the export is writable again for new clients');
  other.destroy();

  // Without the option: the mirror's cutover default (5 s), not 30 s.
  const dflt = await cli(['ctl', '--socket', srcSock, 'postcopy', 'vm1', dstSrv.uri('vm1')]);
  t.not(dflt.code, 0, describeRun(dflt));
  t.match(dflt.stderr, /did not attach within 5000 ms/, 'the default bound is the cutover timeout\'s');
});
