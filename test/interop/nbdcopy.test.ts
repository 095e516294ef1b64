// nbdcopy (Debian libnbd-bin) round trips through nbd-migrate: random data
// file -> NBD -> file, and a sparse source (holes must come out as zeroes and
// stay sparse on the server, using WRITE_ZEROES/TRIM and base:allocation).

import t from 'tap';
import { join } from 'node:path';
import { readFile, stat } from 'node:fs/promises';
import { KiB, MiB, makeImage, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const nbdcopy = await requireTool('nbdcopy', 'libnbd-bin');
const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');

/** Bytes actually allocated on disk for a file. */
async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

t.test('random data: file -> NBD -> file is byte-identical', async (t) => {
  const dir = await tmpDir(t);
  const size = 48 * MiB + 4097; // odd size: the last request is short
  const src = await makeImage(join(dir, 'src.raw'), size, { fill: 'random' });
  const img = await makeImage(join(dir, 'disk.img'), size, { fill: 0x55 });
  const srv = await serve(t, [img, '--name', 'vm1']);

  const up = await run(nbdcopy, ['--flush', src, srv.uri('vm1')], { timeoutMs: 120_000 });
  t.equal(up.code, 0, 'nbdcopy FILE nbd://... exits 0', { output: describeRun(up) });
  const srcData = await readFile(src);
  t.ok((await readFile(img)).equals(srcData), 'server image equals the source after upload');

  const out = join(dir, 'out.raw');
  const down = await run(nbdcopy, [srv.uri('vm1'), out], { timeoutMs: 120_000 });
  t.equal(down.code, 0, 'nbdcopy nbd://... FILE exits 0', { output: describeRun(down) });
  t.ok((await readFile(out)).equals(srcData), 'downloaded copy equals the source');

  // Again with several connections, small requests and many in flight.
  const img2Data = await makeImage(join(dir, 'src2.raw'), size, { fill: 'random' });
  const up2 = await run(
    nbdcopy,
    ['-C', '4', '--request-size=65536', '--requests=32', '--flush', img2Data, srv.uri('vm1')],
    { timeoutMs: 120_000 },
  );
  t.equal(up2.code, 0, 'nbdcopy with 4 connections exits 0', { output: describeRun(up2) });
  const src2 = await readFile(img2Data);
  t.ok((await readFile(img)).equals(src2), 'server image equals the second source (4 connections)');
  const out2 = join(dir, 'out2.raw');
  const down2 = await run(nbdcopy, ['-C', '4', '--request-size=1048576', srv.uri('vm1'), out2], {
    timeoutMs: 120_000,
  });
  t.equal(down2.code, 0, 'download with 4 connections exits 0', { output: describeRun(down2) });
  t.ok((await readFile(out2)).equals(src2), 'downloaded copy equals the second source');
});

t.test('sparse source: holes become zeroes and stay sparse', async (t) => {
  const dir = await tmpDir(t);
  const size = 64 * MiB;
  const src = await makeImage(join(dir, 'sparse.raw'), size);
  await writeAt(src, 3 * MiB, patternBuffer(2 * MiB, 3));
  await writeAt(src, 20000 * KiB, patternBuffer(12 * KiB, 4));
  await writeAt(src, size - 4 * KiB, patternBuffer(4 * KiB, 5));
  // The destination starts out fully allocated with 0xff everywhere, so the
  // holes of the source must actively be zeroed through NBD.
  const img = await makeImage(join(dir, 'disk.img'), size, { fill: 0xff });
  const srv = await serve(t, [img, '--name', 'vm1']);

  const up = await run(nbdcopy, ['--flush', src, srv.uri('vm1')], { timeoutMs: 120_000 });
  t.equal(up.code, 0, 'nbdcopy sparse FILE nbd://... exits 0', { output: describeRun(up) });
  const srcData = await readFile(src);
  t.ok((await readFile(img)).equals(srcData), 'server image equals the sparse source (holes read as zero)');
  t.ok(
    (await allocated(img)) < 8 * MiB,
    `server image is sparse again (${await allocated(img)} bytes allocated, data is ~2 MiB)`,
  );

  const map = await run(nbdinfo, ['--map', '--json', srv.uri('vm1')], { timeoutMs: 60_000 });
  t.equal(map.code, 0, 'nbdinfo --map', { output: describeRun(map) });
  const extents = JSON.parse(map.stdout) as { offset: number; length: number; type: number }[];
  const dataBytes = extents.filter((e) => (e.type & 1) === 0).reduce((n, e) => n + e.length, 0);
  t.ok(dataBytes <= 4 * MiB, `block status reports little data after the sparse copy (${dataBytes} bytes)`);
  const at = (off: number) => extents.find((e) => e.offset <= off && off < e.offset + e.length);
  t.equal(at(0)?.type, 3, 'start of the export is a hole');
  t.equal(at(3 * MiB)?.type, 0, 'data region reported as data');
  t.equal(at(40 * MiB)?.type, 3, 'middle hole reported as hole,zero');

  // Back to a local file: nbdcopy uses base:allocation to keep it sparse.
  const out = join(dir, 'out.raw');
  const down = await run(nbdcopy, [srv.uri('vm1'), out], { timeoutMs: 120_000 });
  t.equal(down.code, 0, 'nbdcopy nbd://... FILE exits 0', { output: describeRun(down) });
  t.ok((await readFile(out)).equals(srcData), 'round trip of the sparse image is byte-identical');
  t.ok((await allocated(out)) < 8 * MiB, `downloaded copy is sparse (${await allocated(out)} bytes allocated)`);

  // --allocated forces real zero writes (NO_HOLE); data must be the same.
  const img2 = await makeImage(join(dir, 'disk2.img'), size, { fill: 0xee });
  const srv2 = await serve(t, [img2, '--name', 'vm2']);
  const up2 = await run(nbdcopy, ['--allocated', src, srv2.uri('vm2')], { timeoutMs: 120_000 });
  t.equal(up2.code, 0, 'nbdcopy --allocated exits 0', { output: describeRun(up2) });
  t.ok((await readFile(img2)).equals(srcData), 'with --allocated the image equals the sparse source');
});
