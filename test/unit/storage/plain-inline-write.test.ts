// A file whose file system refuses RWF_NOWAIT for buffered writes (ext4 does: EOPNOTSUPP)
// is written inline as plain pwritev from then on, watched for stalls as a block device's
// writes are (block-inline-write.test.ts), instead of sending every write to the thread pool.
// The file is on tmpfs; the addon's ops are wrapped so that the file looks disk-backed and
// its RWF_NOWAIT writes are refused, to see which path each write took. The clock is the
// test's own (no timing).
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FileDevice } from '../../../src/storage/file-device.js';
import { sparseOps, type SparseOps } from '../../../src/storage/native.js';

const native = sparseOps();
const KiB = 1024;

function scratch(t: Test, size: number): string {
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'nbd-migrate-plainwrite-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(size));
  return file;
}

t.test('RWF_NOWAIT refused: plain inline writes, watched for stalls', async (t) => {
  t.equal(native.ops.kind, 'native', 'the native addon is built');
  const file = scratch(t, 1024 * KiB);
  let now = 1000;
  let takes = 0;
  const attempts: boolean[] = []; // the plain flag of each inline attempt
  const ops: SparseOps = {
    ...native.ops,
    memoryBacked: () => false,
    writeCached(fd, data, position, plain) {
      attempts.push(plain);
      if (!plain) return -2; // as ext4 answers pwritev2(RWF_NOWAIT) on a buffered file
      now += takes;
      takes = 0;
      return native.ops.writeCached(fd, data, position, plain);
    },
  };
  const d = await FileDevice.open(file, { readOnly: false, lock: false, ops, clock: () => now });
  t.teardown(() => d.close());
  const expect = Buffer.alloc(1024 * KiB);
  let n = 0;
  const write = async (off: number): Promise<boolean> => {
    const before = attempts.length;
    const parts = [Buffer.alloc(3000, ++n), Buffer.alloc(5192, n + 100)];
    await d.write(off, parts, { fua: false });
    parts[0]!.copy(expect, off);
    parts[1]!.copy(expect, off + 3000);
    return attempts.length > before;
  };

  t.ok(await write(0), 'the first write goes inline');
  t.same(attempts, [false, true], 'RWF_NOWAIT refused, then the same write as a plain pwritev');
  t.ok(await write(64 * KiB), 'the next inline');
  t.same(attempts.slice(2), [true], 'plain at once: RWF_NOWAIT is not tried again');
  t.ok(d.writeNow(128 * KiB, [Buffer.alloc(4096, 7)]), 'writeNow takes a plain inline write too');
  Buffer.alloc(4096, 7).copy(expect, 128 * KiB);
  takes = 25;
  t.ok(await write(192 * KiB), 'a write that takes 25 ms went inline');
  t.notOk(await write(256 * KiB), 'the next goes to the thread pool (a stall pauses inline writes)');
  t.notOk(d.writeNow(320 * KiB, [Buffer.alloc(4096, 8)]), 'and writeNow declines during the pause');
  now += 1001;
  t.ok(await write(384 * KiB), 'inline again after the pause');

  await d.flush();
  const back = Buffer.alloc(1024 * KiB);
  await d.read(0, 1024 * KiB, back, 0);
  t.ok(back.equals(expect), 'the file holds every write, inline or not');
  t.ok(attempts.slice(1).every((p) => p), 'every attempt after the refusal was plain');
});

t.test('a plain write refused too: inline writes stop, the pool writes', async (t) => {
  const file = scratch(t, 256 * KiB);
  const attempts: boolean[] = [];
  const ops: SparseOps = {
    ...native.ops,
    memoryBacked: () => false,
    writeCached(_fd, _data, _position, plain) {
      attempts.push(plain);
      return -2;
    },
  };
  const d = await FileDevice.open(file, { readOnly: false, lock: false, ops });
  t.teardown(() => d.close());
  await d.write(0, [Buffer.alloc(4096, 1)], { fua: false });
  t.same(attempts, [false, true], 'RWF_NOWAIT refused, then the plain write refused: no third try');
  await d.write(8192, [Buffer.alloc(4096, 2)], { fua: false });
  t.same(attempts, [false, true], 'no inline attempt afterwards');
  const back = Buffer.alloc(12 * KiB);
  await d.read(0, 12 * KiB, back, 0);
  t.ok(back.subarray(0, 4096).equals(Buffer.alloc(4096, 1)) && back.subarray(8192).equals(Buffer.alloc(4096, 2)), 'both writes made by the pool');
});
