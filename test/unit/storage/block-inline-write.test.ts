// Block-device writes go inline as plain pwritev (block devices refuse RWF_NOWAIT for
// buffered writes), watched for stalls: a write that takes longer than 10 ms sends the
// device's writes to the thread pool for a pause (1 s, doubled while stalls keep coming),
// then inline again; so does more than 20 ms spent in writes over 2 ms within 1 s (throttling
// as many short sleeps). Data is the same either way. On a loop device over a tmpfs file; the
// clock is the test's own (no timing), and the addon's writeCached is wrapped to see which
// path each write took and to make chosen writes "take" long.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FileDevice } from '../../../src/storage/file-device.js';
import { sparseOps, type SparseOps } from '../../../src/storage/native.js';
import { describeRun, requireTool, run } from '../../helpers/tools.js';

const losetup = await requireTool('losetup', 'mount');
const native = sparseOps();
const MiB = 1024 * 1024;

t.test('block device: inline writes, paused after a stall, resumed after the pause', async (t) => {
  t.equal(native.ops.kind, 'native', 'the native addon is built');
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'nbd-migrate-blkinline-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, Buffer.alloc(4 * MiB));
  const r = await run(losetup, ['--find', '--show', backing], { timeoutMs: 30_000 });
  const dev = r.stdout.trim();
  if (r.code !== 0 || !dev.startsWith('/dev/loop')) throw new Error(`losetup is not allowed here (needs root and /dev/loop-control): ${describeRun(r)}`);
  t.teardown(async () => {
    const d = await run(losetup, ['-d', dev], { timeoutMs: 30_000 });
    if (d.code !== 0) console.error(`could not detach ${dev}: ${describeRun(d)}`);
  });

  let now = 1000;
  let takes = 0; // what the next inline write "takes", ms
  const inline: boolean[] = []; // the plain flag of each inline attempt
  const ops: SparseOps = {
    ...native.ops,
    writeCached(fd, data, position, plain) {
      inline.push(plain);
      now += takes;
      takes = 0;
      return native.ops.writeCached(fd, data, position, plain);
    },
  };
  const d = await FileDevice.open(dev, { readOnly: false, lock: false, ops, clock: () => now });
  t.teardown(() => d.close());
  t.ok(d.isBlockDevice);

  const expect = Buffer.alloc(4 * MiB);
  let n = 0;
  const write = async (off: number): Promise<boolean> => {
    const before = inline.length;
    const parts = [Buffer.alloc(3000, ++n), Buffer.alloc(5192, n + 100)];
    await d.write(off, parts, { fua: false });
    parts[0]!.copy(expect, off);
    parts[1]!.copy(expect, off + 3000);
    return inline.length > before;
  };

  t.ok(await write(0), 'a write goes inline');
  t.same(inline, [true], 'as a plain pwritev (RWF_NOWAIT would be refused)');
  t.ok(await write(64 * 1024), 'another inline');
  takes = 25;
  t.ok(await write(128 * 1024), 'a write that takes 25 ms went inline');
  t.notOk(await write(192 * 1024), 'the next goes to the thread pool');
  now += 500;
  t.notOk(await write(256 * 1024), 'still paused after 0.5 s');
  now += 501;
  takes = 25;
  t.ok(await write(320 * 1024), 'inline again after the 1 s pause (and it stalls again)');
  now += 1001;
  t.notOk(await write(384 * 1024), 'a stall right after a pause doubles it: still paused after 1 s');
  now += 1000;
  t.ok(await write(448 * 1024), 'inline after 2 s');
  now += 60_000;
  takes = 11;
  t.ok(await write(512 * 1024), 'a stall long after the last one');
  now += 1001;
  t.ok(await write(576 * 1024), 'pauses for 1 s again, not 4 s');
  t.ok(await write(640 * 1024), 'and stays inline');
  // Many short sleeps, none over 10 ms: 3 ms each, more than 20 ms of them within 1 s is a stall.
  now += 60_000;
  for (let i = 0; i < 6; i++) {
    takes = 3;
    t.ok(await write((704 + 64 * i) * 1024), `slow write ${i + 1} (3 ms, ${3 * (i + 1)} ms in all) inline`);
  }
  takes = 3;
  t.ok(await write(1088 * 1024), 'the slow write that takes the sum over 20 ms went inline');
  t.notOk(await write(1152 * 1024), 'and the next goes to the thread pool');
  now += 60_000;
  for (let i = 0; i < 8; i++) {
    takes = 3;
    now += 400; // spread over more than a second: the window restarts, no pause
    t.ok(await write((1216 + 64 * i) * 1024), `spread slow write ${i + 1} inline`);
  }
  takes = 1.5;
  t.ok(await write(1792 * 1024), 'writes under 2 ms do not count');

  await d.flush();
  const back = Buffer.alloc(4 * MiB);
  await d.read(0, 4 * MiB, back, 0);
  t.ok(back.equals(expect), 'the device holds every write, inline or not');
  t.ok(inline.every((p) => p), 'every inline attempt was plain');
});
