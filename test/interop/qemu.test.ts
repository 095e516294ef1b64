// qemu-io and qemu-img (Debian qemu-utils) against nbd-migrate over TCP:
// data patterns, qemu-img compare/convert, and qemu-img map (allocation
// status through NBD_CMD_BLOCK_STATUS / base:allocation) after discards and
// zero writes, with the native storage backend and with the pure-JS fallback.

import t from 'tap';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { MiB, KiB, allBytes, makeImage, readAt, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const qemuIo = await requireTool('qemu-io', 'qemu-utils');
const qemuImg = await requireTool('qemu-img', 'qemu-utils');

const qio = (uri: string, cmds: string[]) =>
  run(qemuIo, ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { timeoutMs: 60_000 });

interface MapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** qemu-img map --output=json, reduced to start/length/zero/data with adjacent equal extents merged. */
async function qemuMap(target: string): Promise<MapEntry[]> {
  const r = await run(qemuImg, ['map', '--output=json', '-f', 'raw', '-U', target], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`qemu-img map failed: ${describeRun(r)}`);
  const raw = JSON.parse(r.stdout) as { start: number; length: number; zero: boolean; data: boolean }[];
  const out: MapEntry[] = [];
  for (const e of raw) {
    const last = out[out.length - 1];
    if (last && last.zero === e.zero && last.data === e.data && last.start + last.length === e.start) {
      last.length += e.length;
    } else {
      out.push({ start: e.start, length: e.length, zero: e.zero, data: e.data });
    }
  }
  return out;
}

/** The map entry covering `offset`. */
function entryAt(map: MapEntry[], offset: number): MapEntry | undefined {
  return map.find((e) => e.start <= offset && offset < e.start + e.length);
}

t.test('qemu-io writes and reads patterns through NBD', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 64 * MiB);
  const srv = await serve(t, [img, '--name', 'vm1']);
  const uri = srv.uri('vm1');

  const w = await qio(uri, ['write -P 0xab 0 1M', 'read -P 0xab 0 1M']);
  t.equal(w.code, 0, 'write -P 0xab / read -P 0xab succeed', { output: describeRun(w) });
  t.match(w.stdout, /wrote 1048576\/1048576 bytes at offset 0/);
  t.match(w.stdout, /read 1048576\/1048576 bytes at offset 0/);
  t.notMatch(w.stdout + w.stderr, /verification failed/i);
  t.ok(allBytes(await readAt(img, 0, MiB), 0xab), 'the image file holds 0xab in [0, 1M)');
  t.ok(allBytes(await readAt(img, MiB, 64 * KiB), 0), 'the bytes after the write are untouched');

  // Unaligned offsets and lengths, and a write that ends exactly at the end of the export.
  const u = await qio(uri, [
    'write -P 0x5a 4097 12345',
    'write -P 0x3c 67108352 512',
    'read -P 0x5a 4097 12345',
    'read -P 0xab 0 4097',
    'read -P 0x3c 67108352 512',
  ]);
  t.equal(u.code, 0, 'unaligned writes and reads succeed', { output: describeRun(u) });
  const file = await readAt(img, 0, 4097 + 12345 + 10);
  t.ok(allBytes(file.subarray(0, 4097), 0xab), 'bytes before the unaligned write keep 0xab');
  t.ok(allBytes(file.subarray(4097, 4097 + 12345), 0x5a), 'unaligned write landed at 4097..16442');
  t.ok(allBytes(file.subarray(4097 + 12345), 0xab), 'bytes after the unaligned write keep 0xab');
  t.ok(allBytes(await readAt(img, 64 * MiB - 512, 512), 0x3c), 'write at the very end landed');

  // Data written to the file behind the server's back is what qemu-io reads.
  await writeAt(img, 8 * MiB, Buffer.alloc(64 * KiB, 0x77));
  const r = await qio(uri, ['read -P 0x77 8M 64k', 'read -P 0 9M 64k']);
  t.equal(r.code, 0, 'qemu-io reads data present in the image file', { output: describeRun(r) });

  // A wrong pattern must be detected (guards against a vacuous qemu-io).
  const bad = await qio(uri, ['read -P 0xcd 0 4k']);
  t.not(bad.code, 0, 'qemu-io reports a pattern mismatch');
  t.match(bad.stdout + bad.stderr, /Pattern verification failed/);
});

t.test('qemu-img compare and convert through NBD', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 32 * MiB);
  // Some data, some holes.
  await writeAt(img, 0, patternBuffer(3 * MiB, 7));
  await writeAt(img, 20 * MiB + 123, patternBuffer(777 * KiB, 8));
  const srv = await serve(t, [img, '--name', 'vm1']);
  const uri = srv.uri('vm1');

  const same = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, img], { timeoutMs: 120_000 });
  t.equal(same.code, 0, 'qemu-img compare NBD vs image file: identical', { output: describeRun(same) });
  t.match(same.stdout, /Images are identical/);

  // After writing through NBD the two still compare equal.
  const w = await qio(uri, ['write -P 0x11 1M 2M', 'write -P 0x22 30M 65537']);
  t.equal(w.code, 0, 'qemu-io writes', { output: describeRun(w) });
  const again = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, img], { timeoutMs: 120_000 });
  t.equal(again.code, 0, 'identical after NBD writes', { output: describeRun(again) });

  // compare must really look at the data: a different file is reported as different.
  const other = await makeImage(join(dir, 'other.img'), 32 * MiB);
  await writeAt(other, 0, await readAt(img, 0, 32 * MiB));
  await writeAt(other, 31 * MiB, Buffer.from([0x99]));
  const diff = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, other], { timeoutMs: 120_000 });
  t.equal(diff.code, 1, 'qemu-img compare detects a one-byte difference', { output: describeRun(diff) });
  t.match(diff.stdout, /Content mismatch at offset 32505856/);

  // qemu-img convert from NBD to a local file gives a byte-identical copy.
  const copy = join(dir, 'copy.raw');
  const c = await run(qemuImg, ['convert', '-U', '-f', 'raw', '-O', 'raw', uri, copy], { timeoutMs: 120_000 });
  t.equal(c.code, 0, 'qemu-img convert NBD -> raw file', { output: describeRun(c) });
  t.ok((await readFile(copy)).equals(await readFile(img)), 'converted copy is byte-identical to the image');
});

t.test('native storage: qemu-img map through NBD equals map of the file after discards and zero writes', async (t) => {
  const dir = await tmpDir(t);
  const size = 64 * MiB;
  const img = await makeImage(join(dir, 'disk.img'), size, { fill: 'random' });
  const srv = await serve(t, [img, '--name', 'vm1']);
  const uri = srv.uri('vm1');

  const fullData = await qemuMap(uri);
  t.same(fullData, [{ start: 0, length: size, zero: false, data: true }], 'fully written image maps as all data');

  const cmds = [
    'discard 4M 4M', // aligned trim -> hole
    'write -z 16M 4M', // zero, no unmap (NBD_CMD_FLAG_NO_HOLE)
    'write -z -u 24M 4M', // zero, may unmap
    'discard 40961k 65k', // unaligned trim
    'write -z -u 49153k 13k', // unaligned zero with unmap
    'write -z 56M 1M', // zero, no unmap
    'write -z -u 63M 1M', // unmap up to the end of the export
  ];
  // Bytes just outside the unaligned ranges must survive.
  const edges = [40960 * KiB, 40961 * KiB + 65 * KiB, 49152 * KiB, 49153 * KiB + 13 * KiB];
  const edgeBytes = await Promise.all(edges.map((off) => readAt(img, off, KiB)));
  const r = await qio(uri, cmds);
  t.equal(r.code, 0, 'discard / write -z / write -z -u succeed', { output: describeRun(r) });

  // Zero writes (with or without unmap) must read back as zeroes, through NBD and in the file.
  const zr = await qio(uri, ['read -P 0 16M 4M', 'read -P 0 24M 4M', 'read -P 0 49153k 13k', 'read -P 0 56M 1M', 'read -P 0 63M 1M']);
  t.equal(zr.code, 0, 'zeroed ranges read back as zeroes', { output: describeRun(zr) });
  for (const [off, len] of [
    [16 * MiB, 4 * MiB],
    [24 * MiB, 4 * MiB],
    [49153 * KiB, 13 * KiB],
    [56 * MiB, MiB],
    [63 * MiB, MiB],
  ] as const) {
    t.ok(allBytes(await readAt(img, off, len), 0), `file bytes [${off}, +${len}) are zero`);
  }
  for (const [i, off] of edges.entries()) {
    t.ok((await readAt(img, off, KiB)).equals(edgeBytes[i]!), `data next to an unaligned range at ${off} is unchanged`);
  }

  const nbdMap = await qemuMap(uri);
  const fileMap = await qemuMap(img);
  t.same(nbdMap, fileMap, 'qemu-img map through NBD equals qemu-img map of the image file');
  t.same(
    nbdMap.reduce((n, e) => n + e.length, 0),
    size,
    'map covers the whole export',
  );
  // Aligned discards and unmapping zero writes leave holes that read as zero.
  for (const off of [4 * MiB, 24 * MiB, 63 * MiB]) {
    const e = entryAt(nbdMap, off);
    t.match(e, { zero: true, data: false }, `offset ${off} is a hole after discard / write -z -u`);
  }
  t.match(entryAt(nbdMap, 0), { zero: false, data: true }, 'untouched start is data');
  t.match(entryAt(nbdMap, 32 * MiB), { zero: false, data: true }, 'untouched middle is data');

  const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, img], { timeoutMs: 120_000 });
  t.equal(cmp.code, 0, 'NBD export and file compare identical', { output: describeRun(cmp) });
});

t.test('pure-JS fallback (NBD_MIGRATE_NATIVE=0): zero writes are zeroes, map reports all data', async (t) => {
  const dir = await tmpDir(t);
  const size = 32 * MiB;
  const img = await makeImage(join(dir, 'disk.img'), size, { fill: 'random' });
  // Also a sparse region: the fallback has no SEEK_HOLE, so it must still say "data".
  await makeImage(join(dir, 'sparse.img'), size);
  const srv = await serve(t, [img, '--name', 'vm1', '--export', `sparse=${join(dir, 'sparse.img')}`], {
    env: { NBD_MIGRATE_NATIVE: '0' },
  });
  const uri = srv.uri('vm1');

  const r = await qio(uri, ['discard 4M 4M', 'write -z 16M 4M', 'write -z -u 24M 4M', 'write -z -u 30001k 7k']);
  t.equal(r.code, 0, 'discard / write -z / write -z -u succeed', { output: describeRun(r) });
  const zr = await qio(uri, ['read -P 0 16M 4M', 'read -P 0 24M 4M', 'read -P 0 30001k 7k']);
  t.equal(zr.code, 0, 'zeroed ranges read back as zeroes', { output: describeRun(zr) });
  t.ok(allBytes(await readAt(img, 16 * MiB, 4 * MiB), 0), 'write -z wrote zeroes into the file');
  t.ok(allBytes(await readAt(img, 24 * MiB, 4 * MiB), 0), 'write -z -u wrote zeroes into the file');
  t.ok(allBytes(await readAt(img, 30001 * KiB, 7 * KiB), 0), 'unaligned write -z -u wrote zeroes into the file');

  const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, img], { timeoutMs: 120_000 });
  t.equal(cmp.code, 0, 'NBD export and file compare identical', { output: describeRun(cmp) });

  t.same(await qemuMap(uri), [{ start: 0, length: size, zero: false, data: true }], 'map: everything is data');
  t.same(
    await qemuMap(srv.uri('sparse')),
    [{ start: 0, length: size, zero: false, data: true }],
    'map of a sparse file: everything is data',
  );
  const cmp2 = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', srv.uri('sparse'), join(dir, 'sparse.img')], {
    timeoutMs: 120_000,
  });
  t.equal(cmp2.code, 0, 'sparse export compares identical to its file', { output: describeRun(cmp2) });
});
