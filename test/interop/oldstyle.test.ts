// Oldstyle negotiation: each export with an oldstyle port gets its own TCP
// listener that sends the oldstyle greeting (size + flags, no export name).
// Checked with qemu-io / qemu-img (qemu's NBD client), nbdinfo and nbdcopy
// (libnbd), and a raw look at the greeting.

import t from 'tap';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { KiB, MiB, allBytes, makeImage, readAt, serve, tmpDir } from '../helpers/server.js';
import { NBDMAGIC, OLDSTYLE_MAGIC, RawNbdClient, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY } from '../helpers/rawclient.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const qemuIo = await requireTool('qemu-io', 'qemu-utils');
const qemuImg = await requireTool('qemu-img', 'qemu-utils');
const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');
const nbdcopy = await requireTool('nbdcopy', 'libnbd-bin');

const VM1_SIZE = 8 * MiB;
const SECOND_SIZE = 3 * MiB + 512;
const RO_SIZE = 1 * MiB;

t.test('oldstyle listeners', async (t) => {
  const dir = await tmpDir(t);
  const vm1 = await makeImage(join(dir, 'vm1.img'), VM1_SIZE, { fill: 'random' });
  const second = await makeImage(join(dir, 'second.img'), SECOND_SIZE, { fill: 0x33 });
  const ro = await makeImage(join(dir, 'ro.img'), RO_SIZE, { fill: 0x44 });
  const srv = await serve(t, [
    vm1,
    '--name',
    'vm1',
    '--oldstyle-port',
    '0',
    '--export',
    `second=${second},oldstyle-port=0`,
    '--export',
    `ro=${ro},oldstyle-port=0,read-only`,
  ]);
  const ports = { vm1: srv.oldstylePort('vm1'), second: srv.oldstylePort('second'), ro: srv.oldstylePort('ro') };
  t.ok(new Set([...Object.values(ports), srv.newstylePort]).size === 4, 'each listener has its own port', ports);

  t.test('the oldstyle greeting', async (t) => {
    const c = await RawNbdClient.connect(ports.second);
    t.teardown(() => c.destroy());
    const g = await c.read(8 + 8 + 8 + 4 + 124);
    t.equal(g.readBigUInt64BE(0), NBDMAGIC, 'NBDMAGIC');
    t.equal(g.readBigUInt64BE(8), OLDSTYLE_MAGIC, 'oldstyle magic 0x00420281861253');
    t.equal(g.readBigUInt64BE(16), BigInt(SECOND_SIZE), 'export size');
    const flags = g.readUInt32BE(24);
    t.ok(flags & TFLAG_HAS_FLAGS, 'NBD_FLAG_HAS_FLAGS set');
    t.equal(flags & TFLAG_READ_ONLY, 0, 'writable');
    t.ok(allBytes(g.subarray(28), 0), '124 zero bytes');
    const r = await c.readAt(SECOND_SIZE - 512, 512);
    t.equal(r.error, 0, 'a read over the oldstyle connection works');
    t.ok(allBytes(r.data, 0x33), 'and returns the export data');
    await c.disconnect();

    const c2 = await RawNbdClient.connect(ports.ro);
    t.teardown(() => c2.destroy());
    const g2 = await c2.read(152);
    t.equal(g2.readBigUInt64BE(16), BigInt(RO_SIZE), 'read-only export size');
    t.ok(g2.readUInt32BE(24) & TFLAG_READ_ONLY, 'read-only export has NBD_FLAG_READ_ONLY');
    await c2.disconnect();
  });

  t.test('nbdinfo (libnbd) on the oldstyle ports', async (t) => {
    for (const [name, size, readOnly] of [
      ['vm1', VM1_SIZE, false],
      ['second', SECOND_SIZE, false],
      ['ro', RO_SIZE, true],
    ] as const) {
      const r = await run(nbdinfo, ['--json', srv.oldstyleUri(name)], { timeoutMs: 30_000 });
      t.equal(r.code, 0, `nbdinfo ${name} exits 0`, { output: describeRun(r) });
      const info = JSON.parse(r.stdout || '{}') as {
        protocol?: string;
        exports?: { 'export-size': number; is_read_only: boolean }[];
      };
      t.equal(info.protocol, 'oldstyle', `${name}: protocol is oldstyle`);
      t.equal(info.exports?.[0]?.['export-size'], size, `${name}: size`);
      t.equal(info.exports?.[0]?.is_read_only, readOnly, `${name}: read-only flag`);
    }
    const s = await run(nbdinfo, ['--size', srv.oldstyleUri('second')], { timeoutMs: 30_000 });
    t.equal(s.stdout.trim(), String(SECOND_SIZE), 'nbdinfo --size');
  });

  t.test('nbdcopy from the oldstyle port is byte-identical', async (t) => {
    const out = join(dir, 'copy.raw');
    const r = await run(nbdcopy, [srv.oldstyleUri('vm1'), out], { timeoutMs: 60_000 });
    t.equal(r.code, 0, 'nbdcopy exits 0', { output: describeRun(r) });
    t.ok((await readFile(out)).equals(await readFile(vm1)), 'copy equals the image');
  });

  t.test('qemu-io and qemu-img on the oldstyle ports', async (t) => {
    const uri = `nbd://127.0.0.1:${ports.vm1}`;
    const w = await run(
      qemuIo,
      ['-f', 'raw', '-c', 'write -P 0x61 0 64k', '-c', 'write -P 0x62 1000000 3333', '-c', 'read -P 0x61 0 64k', uri],
      { timeoutMs: 60_000 },
    );
    t.equal(w.code, 0, 'qemu-io write/read via nbd://HOST:PORT', { output: describeRun(w) });
    t.ok(allBytes(await readAt(vm1, 0, 64 * KiB), 0x61), 'the write reached the file');
    t.ok(allBytes(await readAt(vm1, 1000000, 3333), 0x62), 'the unaligned write reached the file');

    const legacy = await run(
      qemuIo,
      ['-f', 'raw', '-c', 'read -P 0x62 1000000 3333', '-c', 'read -P 0x61 0 64k', `nbd:127.0.0.1:${ports.vm1}`],
      { timeoutMs: 60_000 },
    );
    t.equal(legacy.code, 0, 'qemu-io read via nbd:HOST:PORT', { output: describeRun(legacy) });

    const s = await run(qemuIo, ['-f', 'raw', '-c', `read -P 0x33 0 ${SECOND_SIZE}`, srv.oldstyleUri('second')], {
      timeoutMs: 60_000,
    });
    t.equal(s.code, 0, 'the second oldstyle port serves the second export', { output: describeRun(s) });

    const info = await run(qemuImg, ['info', '--output=json', srv.oldstyleUri('second')], { timeoutMs: 30_000 });
    t.equal(info.code, 0, 'qemu-img info', { output: describeRun(info) });
    t.match(info.stdout, new RegExp(`"virtual-size": ${SECOND_SIZE}\\b`), 'qemu sees the right size');

    const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', '-U', uri, vm1], { timeoutMs: 60_000 });
    t.equal(cmp.code, 0, 'qemu-img compare oldstyle export vs file', { output: describeRun(cmp) });

    const rw = await run(qemuIo, ['-f', 'raw', '-c', 'write -P 0x99 0 4k', srv.oldstyleUri('ro')], {
      timeoutMs: 60_000,
    });
    t.not(rw.code, 0, 'writing to the read-only oldstyle export fails', { output: describeRun(rw) });
    t.ok(allBytes(await readAt(ro, 0, RO_SIZE), 0x44), 'read-only image unchanged');
  });
});
