// --read-cache SIZE (src/storage/filters/read-cache.ts) on a source whose
// export was cut over to a target across a slow link (nbdkit's delay filter:
// every read takes 150 ms): a block read again is answered from memory, a
// write invalidates it, and reads go on returning what the target holds.
import t from 'tap';
import { join } from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { MiB, makeImage, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun } from '../helpers/tools.js';
import { cli, freePort, nbdkit, waitForJob } from './harness.js';

t.test('after cutover, re-reads of a remote block come from the read cache; writes invalidate it', async (t) => {
  const dir = await tmpDir(t, 'nbdm-readcache-');
  const src = await makeImage(join(dir, 'src.img'), 16 * MiB);
  const data = patternBuffer(4 * MiB, 3);
  await writeAt(src, 0, data);
  const port = await freePort();
  const target = await nbdkit(port, ['--filter=delay', 'memory', '16M', 'rdelay=150ms']);
  t.teardown(() => target.stop());
  const sock = join(dir, 'src.sock');
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', sock, '--read-cache', '8M']);
  const m = await cli(['ctl', '--socket', sock, 'mirror', 'vm1', `nbd://127.0.0.1:${port}/`, '--cutover', 'auto']);
  t.equal(m.code, 0, 'mirror started', { diag: describeRun(m) });
  await waitForJob(sock, 'vm1', (j) => j.state === 'completed', { what: 'the cutover', timeoutMs: 60_000 });

  const c = await NbdClient.connect(srcSrv.uri('vm1'));
  t.teardown(() => c.close());
  const timed = async (o: number, l: number) => {
    const b = Buffer.alloc(l);
    const t0 = performance.now();
    await c.read(o, l, b, 0);
    return { b, ms: performance.now() - t0 };
  };
  const first = await timed(MiB, 64 * 1024);
  const again = await timed(MiB + 4096, 8192);
  t.ok(first.b.equals(data.subarray(MiB, MiB + 64 * 1024)), 'the first read returns the data, from the target');
  t.ok(first.ms >= 140, `it paid the link's delay (${first.ms.toFixed(1)} ms)`);
  t.ok(again.b.equals(data.subarray(MiB + 4096, MiB + 12288)), 'the re-read returns the same data');
  t.ok(again.ms < 100, `from memory (${again.ms.toFixed(1)} ms)`);
  t.comment(`FIGURE read over a 150 ms link: miss ${first.ms.toFixed(1)} ms, hit ${again.ms.toFixed(2)} ms`);

  const w = Buffer.alloc(4096, 0xd7);
  await c.write(MiB + 4096, [w], { fua: false });
  const after = await timed(MiB, 64 * 1024);
  const want = Buffer.from(data.subarray(MiB, MiB + 64 * 1024));
  w.copy(want, 4096);
  t.ok(after.b.equals(want), 'after a write the block reads back with the write in it');
  t.ok(after.ms >= 140, `it was read from the target again, the cached copy dropped (${after.ms.toFixed(1)} ms)`);
});
