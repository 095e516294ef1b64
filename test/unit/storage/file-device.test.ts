// The same storage tests run against the native addon and the pure-JS fallback.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../../src/protocol/constants.js';
import { FileDevice } from '../../../src/storage/file-device.js';
import { fallbackOps, sparseOps, type SparseOps } from '../../../src/storage/native.js';

const MiB = 1024 * 1024;
const native = sparseOps();
t.equal(native.ops.kind, 'native', `native addon loads (${native.reason ?? 'ok'}); npm ci builds it with node-gyp`);

function tmpImage(t: Tap, size: number, base = os.tmpdir()): string {
  const dir = fs.mkdtempSync(path.join(base, 'nbdm-fd-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'disk.img');
  fs.writeFileSync(p, '');
  fs.truncateSync(p, size);
  return p;
}
type Tap = typeof t;

const allocatedBytes = (p: string) => fs.statSync(p).blocks * 512;

for (const ops of [native.ops, fallbackOps] as SparseOps[]) {
  t.test(`${ops.kind}: read, write (scattered buffers), flush`, async (t) => {
    const img = tmpImage(t, 8 * MiB);
    const d = await FileDevice.open(img, { readOnly: false, ops });
    t.teardown(() => d.close());
    t.equal(d.size, 8 * MiB);
    await d.write(4096, [Buffer.alloc(100, 1), Buffer.alloc(3996, 2)], { fua: true });
    const out = Buffer.alloc(4200, 9);
    await d.read(4000, 4192, out, 4); // file offsets 4000..8192 land at out[4..4196)
    t.ok(out.subarray(4, 100).every((b) => b === 0), 'before the write: zeros');
    t.ok(out.subarray(100, 200).every((b) => b === 1), 'first buffer');
    t.ok(out.subarray(200, 4196).every((b) => b === 2), 'second buffer');
    t.same(out.subarray(4196), Buffer.alloc(4, 9), 'bytes after the read untouched');
    t.same(out.subarray(0, 4), Buffer.alloc(4, 9), 'bytes before `at` untouched');
    await d.flush();
    const file = fs.readFileSync(img);
    t.equal(file[4096], 1);
    t.equal(file[4196], 2);
  });

  t.test(`${ops.kind}: zero and trim read back as zeros; extents describe the file`, async (t) => {
    const img = tmpImage(t, 8 * MiB);
    const d = await FileDevice.open(img, { readOnly: false, ops });
    t.teardown(() => d.close());
    await d.write(0, [Buffer.alloc(4 * MiB, 0xab)], { fua: false });
    await d.zero(MiB, MiB, { fua: false, noHole: false, fast: false });
    await d.trim(3 * MiB, MiB, { fua: false });
    await d.zero(2 * MiB, 4096, { fua: false, noHole: true, fast: false });
    const back = Buffer.alloc(3 * MiB);
    await d.read(MiB, 3 * MiB, back, 0);
    t.ok(back.subarray(0, MiB).every((b) => b === 0), 'zeroed range reads zero');
    t.ok(back.subarray(MiB, MiB + 4096).every((b) => b === 0), 'NO_HOLE zero reads zero');
    t.ok(back.subarray(MiB + 4096, 2 * MiB).every((b) => b === 0xab), 'data after it intact');
    const ext = await d.extents(0, 8 * MiB, 100);
    t.equal(ext.reduce((n, e) => n + e.length, 0), 8 * MiB, 'extents cover the request');
    if (ops.kind === 'native') {
      t.same(ext, [
        { length: MiB, flags: 0 },
        { length: MiB, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
        { length: MiB, flags: 0 },
        { length: 5 * MiB, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
      ]);
      t.ok(allocatedBytes(img) <= 2 * MiB + 64 * 1024, `punched holes free space (${allocatedBytes(img)} bytes allocated)`);
      t.same(await d.extents(MiB + 512, 1000, 1), [{ length: 1000, flags: 3 }], 'clamped to the request, one extent');
      t.same((await d.extents(0, 8 * MiB, 2)).length, 2, 'maxExtents honoured');
    } else {
      t.same(ext, [{ length: 8 * MiB, flags: 0 }], 'fallback reports everything as data');
      await t.rejects(d.zero(0, 4096, { fua: false, noHole: false, fast: true }), { code: 'ENOTSUP' }, 'no fast zero without the addon');
    }
  });

  t.test(`${ops.kind}: exclusive lock refuses a second read-write open`, async (t) => {
    const img = tmpImage(t, MiB);
    const d = await FileDevice.open(img, { readOnly: false, ops });
    await t.rejects(FileDevice.open(img, { readOnly: false, ops }), { code: 'EWOULDBLOCK' });
    await d.close();
    const again = await FileDevice.open(img, { readOnly: false, ops });
    await again.close();
    t.pass('lock released on close');
  });

  t.test(`${ops.kind}: read-only device reports no write capabilities`, async (t) => {
    const img = tmpImage(t, MiB);
    const d = await FileDevice.open(img, { readOnly: true, ops });
    t.teardown(() => d.close());
    const c = d.capabilities();
    t.notOk(c.canWrite || c.canTrim || c.canZero || c.canFua);
    t.ok(c.canMultiConn && c.canFlush && c.canExtents);
  });
}

// Inline I/O: page-cache hits (RWF_NOWAIT) on a disk file system, plain inline I/O on tmpfs.
for (const base of [os.tmpdir(), '/dev/shm']) {
  t.test(`native inline reads and writes agree with the file (${base})`, async (t) => {
    const img = tmpImage(t, 4 * MiB, base);
    const d = await FileDevice.open(img, { readOnly: false, ops: native.ops });
    t.teardown(() => d.close());
    const expect = Buffer.alloc(4 * MiB);
    let seed = 7;
    for (let i = 0; i < 200; i++) {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      const off = seed % (4 * MiB - 70000);
      const len = 1 + (seed % 65536);
      const parts = [Buffer.alloc(Math.floor(len / 2), i & 0xff), Buffer.alloc(len - Math.floor(len / 2), (i + 1) & 0xff)];
      await d.write(off, parts, { fua: false });
      parts[0]!.copy(expect, off);
      parts[1]!.copy(expect, off + parts[0]!.length);
      const back = Buffer.alloc(len);
      await d.read(off, len, back, 0);
      if (!back.equals(expect.subarray(off, off + len))) {
        t.fail(`read-back mismatch at ${off}+${len}`);
        return;
      }
    }
    await d.flush();
    t.ok(fs.readFileSync(img).equals(expect), 'file holds every write');
  });
}

t.test('native: a read-only open cannot share a read-write image', async (t) => {
  const img = tmpImage(t, MiB);
  const rw = await FileDevice.open(img, { readOnly: false, ops: native.ops });
  t.teardown(() => rw.close());
  await t.rejects(FileDevice.open(img, { readOnly: true, ops: native.ops }), { code: 'EWOULDBLOCK' });
});

t.test('fallback: a stale lock file from a dead process is taken over', async (t) => {
  const img = tmpImage(t, MiB);
  fs.writeFileSync(`${img}.nbd-migrate.lock`, '999999999');
  const d = await FileDevice.open(img, { readOnly: false, ops: fallbackOps });
  t.equal(fs.readFileSync(`${img}.nbd-migrate.lock`, 'utf8'), String(process.pid));
  await d.close();
  t.notOk(fs.existsSync(`${img}.nbd-migrate.lock`), 'lock file removed on close');
});

t.test('native: reads up to 128 KiB from the page cache are served inline, larger ones through the pool', async (t) => {
  const img = tmpImage(t, 4 * MiB, '/dev/shm');
  const data = Buffer.alloc(4 * MiB);
  for (let i = 0; i < data.length; i += 4096) data.fill(i / 4096, i, i + 4096);
  fs.writeFileSync(img, data);
  const inline: number[] = [];
  const ops: SparseOps = {
    ...native.ops,
    readCached(fd, into, at, length, position, memoryBacked) {
      inline.push(length);
      return native.ops.readCached(fd, into, at, length, position, memoryBacked);
    },
  };
  const d = await FileDevice.open(img, { readOnly: true, ops });
  t.teardown(() => d.close());
  for (const [off, len] of [[4096, 128 * 1024], [8192, 128 * 1024 + 4096], [0, 2 * MiB]] as const) {
    const back = Buffer.alloc(len + 16);
    await d.read(off, len, back, 16);
    t.ok(back.subarray(16).equals(data.subarray(off, off + len)), `${len} bytes at ${off} read back`);
  }
  t.same(inline, [128 * 1024], 'the 128 KiB read went inline, the larger ones did not');
});
