// Fixed newstyle over a Unix domain socket (--socket PATH), with the
// nbd+unix:///NAME?socket=PATH URIs of qemu and libnbd.

import t from 'tap';
import { join } from 'node:path';
import { readFile, stat } from 'node:fs/promises';
import { KiB, MiB, allBytes, makeImage, readAt, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const qemuIo = await requireTool('qemu-io', 'qemu-utils');
const qemuImg = await requireTool('qemu-img', 'qemu-utils');
const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');
const nbdcopy = await requireTool('nbdcopy', 'libnbd-bin');

t.test('unix socket listener', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 16 * MiB);
  const other = await makeImage(join(dir, 'other.img'), 2 * MiB, { fill: 0x5e });
  const sock = join(dir, 'nbd.sock');
  const srv = await serve(t, [img, '--name', 'vm1', '--socket', sock, '--export', `other=${other}`]);
  t.equal(srv.socketPath, sock, 'the server logs the unix listener with its path');
  t.ok((await stat(sock)).isSocket(), 'the socket exists');

  const vm1 = `nbd+unix:///vm1?socket=${sock}`;
  const otherUri = `nbd+unix:///other?socket=${sock}`;

  t.test('qemu-io over the socket', async (t) => {
    const r = await run(
      qemuIo,
      ['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 5M 12345', '-c', 'read -P 0xab 0 1M', vm1],
      { timeoutMs: 60_000 },
    );
    t.equal(r.code, 0, 'qemu-io write/read', { output: describeRun(r) });
    t.ok(allBytes(await readAt(img, 0, MiB), 0xab), 'first write in the file');
    t.ok(allBytes(await readAt(img, 5 * MiB, 12345), 0xcd), 'second write in the file');
    const o = await run(qemuIo, ['-f', 'raw', '-c', 'read -P 0x5e 0 2M', otherUri], { timeoutMs: 60_000 });
    t.equal(o.code, 0, 'second export over the same socket', { output: describeRun(o) });
    const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', vm1, img], { timeoutMs: 60_000 });
    t.equal(cmp.code, 0, 'qemu-img compare over the socket', { output: describeRun(cmp) });
  });

  t.test('nbdinfo over the socket', async (t) => {
    const r = await run(nbdinfo, ['--json', vm1], { timeoutMs: 30_000 });
    t.equal(r.code, 0, 'nbdinfo exits 0', { output: describeRun(r) });
    const info = JSON.parse(r.stdout || '{}') as {
      protocol?: string;
      exports?: { 'export-name': string; 'export-size': number; can_multi_conn: boolean }[];
    };
    t.equal(info.protocol, 'newstyle-fixed');
    t.equal(info.exports?.[0]?.['export-name'], 'vm1');
    t.equal(info.exports?.[0]?.['export-size'], 16 * MiB, 'size over the socket');
    const list = await run(nbdinfo, ['--list', '--json', `nbd+unix:///?socket=${sock}`], { timeoutMs: 30_000 });
    t.equal(list.code, 0, 'nbdinfo --list exits 0', { output: describeRun(list) });
    const names = (JSON.parse(list.stdout || '{}') as { exports?: { 'export-name': string }[] }).exports?.map(
      (e) => e['export-name'],
    );
    t.same(names?.sort(), ['other', 'vm1'], 'both exports listed over the socket');
    const map = await run(nbdinfo, ['--map', '--json', vm1], { timeoutMs: 30_000 });
    t.equal(map.code, 0, 'nbdinfo --map exits 0', { output: describeRun(map) });
    const ext = JSON.parse(map.stdout || '[]') as { offset: number; length: number; type: number }[];
    t.equal(ext[0]?.type, 0, 'written start is data');
    t.ok(
      ext.some((e) => e.offset <= 8 * MiB && 8 * MiB < e.offset + e.length && e.type === 3),
      'unwritten middle is a hole',
      { ext },
    );
  });

  t.test('nbdcopy round trip over the socket', async (t) => {
    const src = await makeImage(join(dir, 'src.raw'), 16 * MiB, { fill: 'random' });
    const up = await run(nbdcopy, [src, vm1], { timeoutMs: 60_000 });
    t.equal(up.code, 0, 'upload', { output: describeRun(up) });
    const out = join(dir, 'out.raw');
    const down = await run(nbdcopy, [vm1, out], { timeoutMs: 60_000 });
    t.equal(down.code, 0, 'download', { output: describeRun(down) });
    const data = await readFile(src);
    t.ok((await readFile(img)).equals(data), 'server image equals the source');
    t.ok((await readFile(out)).equals(data), 'downloaded copy equals the source');
    t.equal((await readAt(out, 16 * MiB - KiB, KiB)).length, KiB, 'full length copied');
  });

  t.test('TCP keeps working next to the socket', async (t) => {
    const r = await run(nbdinfo, ['--size', srv.uri('vm1')], { timeoutMs: 30_000 });
    t.equal(r.stdout.trim(), String(16 * MiB), 'nbdinfo --size over TCP', { output: describeRun(r) });
  });
});
