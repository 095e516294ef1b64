// Device.writeNow and readNow, the fast paths (src/storage/device.ts). A write without FUA is
// made within the call only when nothing on the way can wait, and then exactly as write()
// would make it (in the image, marked in the bitmap and by the change listener); otherwise
// nothing is done and the caller writes through write(). A read is made within the call when
// the data is in the page cache. A layer that changes writes or reads is never skipped.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';
import { ActivityLog } from '../../../src/dirty/activity-log.js';
import { StateFolder } from '../../../src/dirty/state.js';
import type { Device, WriteOptions } from '../../../src/storage/device.js';
import { FileDevice } from '../../../src/storage/file-device.js';
import { Filter } from '../../../src/storage/filters/filter.js';
import { fallbackOps } from '../../../src/storage/native.js';
import { buildStack } from '../../../src/storage/stack.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const K = 1024;
const M = 1024 * K;
const G = 4 * K;

async function image(t: Tap.Test, size: number, opts: { fallback?: boolean } = {}): Promise<{ dev: FileDevice; file: string }> {
  const dir = fs.mkdtempSync('/dev/shm/nbd-migrate-writenow-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(size));
  const dev = await FileDevice.open(file, { readOnly: false, ...(opts.fallback ? { ops: fallbackOps } : {}) });
  t.teardown(() => dev.close());
  return { dev, file };
}

const at = (file: string, offset: number, length: number) => {
  const b = Buffer.alloc(length);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, length, offset);
  } finally {
    fs.closeSync(fd);
  }
  return b;
};

t.test('nothing in the way: made at once, in the image, marked in the bitmap and by the change listener', async (t) => {
  const { dev, file } = await image(t, M);
  const marks: Array<[number, number]> = [];
  const s = buildStack({ local: dev, dirtyGranularity: G, changes: { mark: (o, l) => marks.push([o, l]) } });
  t.equal(s.device.writeNow?.(3 * G + 10, [Buffer.alloc(100, 7), Buffer.alloc(50, 8)]), true);
  t.equal(at(file, 3 * G + 10, 150).toString('hex'), '07'.repeat(100) + '08'.repeat(50), 'both buffers, in order, at the offset');
  t.same(s.bitmap.dirtyBlocks(), 1);
  t.ok(s.bitmap.isDirty(3), 'its block is dirty');
  t.same(marks, [[3 * G + 10, 150], [3 * G + 10, 150]], 'marked before and after, as write() marks');
});

t.test('a held gate, a rate limit or write-through: nothing done, write() is used', async (t) => {
  const { dev, file } = await image(t, M);
  const s = buildStack({ local: dev, dirtyGranularity: G });
  const tryAt = (o: number) => s.device.writeNow?.(o, [Buffer.alloc(G, 5)]);

  await s.gate.hold();
  t.equal(tryAt(0), false, 'gate held');
  s.gate.release();

  s.throttle.setRate(10 * M);
  t.equal(tryAt(G), false, 'rate limited');
  s.throttle.setRate(undefined);

  const target = new MemoryDevice(M);
  s.writeThrough.setWriteThrough({ target, locks: new RangeLock(), onError: () => {} });
  t.equal(tryAt(2 * G), false, 'write-through on');
  s.writeThrough.setWriteThrough(undefined);

  t.equal(s.bitmap.dirtyBlocks(), 0, 'none of them marked anything');
  t.ok(at(file, 0, 3 * G).every((b) => b === 0), 'none of them wrote anything');
  t.equal(target.ops.write, 0, 'nor sent anything to the target');
  t.equal(tryAt(3 * G), true, 'with all three lifted it is made at once');
  t.ok(at(file, 3 * G, G).every((b) => b === 5));
});

t.test('the gate counts a write made at once: a hold begun after it finds nothing running', async (t) => {
  const { dev } = await image(t, M);
  const s = buildStack({ local: dev, dirtyGranularity: G });
  t.equal(s.device.writeNow?.(0, [Buffer.alloc(512, 1)]), true);
  let held = false;
  await s.gate.hold().then(() => (held = true));
  t.ok(held, 'the hold resolves: the write was done before it began');
  s.gate.release();
});

t.test('with an activity log: only into extents the log already names', async (t) => {
  const { dev, file } = await image(t, 8 * M);
  const s = buildStack({ local: dev, dirtyGranularity: 64 * K });
  const folder = StateFolder.open(path.join(t.testdir(), 'state'));
  const { log } = ActivityLog.open(folder, s.bitmap, { extentBytes: M });
  t.teardown(() => log.close());
  s.tracking.activityLog = log;
  const before = { ...log.stats };
  t.equal(s.device.writeNow?.(2 * M, [Buffer.alloc(512, 3)]), false, 'extent 2 is not in the log yet');
  t.same(log.stats, before, 'and asking did not begin anything in the log');
  t.equal(s.bitmap.dirtyBlocks(), 0);
  await s.device.write(2 * M + 4 * K, [Buffer.alloc(512, 4)], { fua: false });
  t.equal(log.stats.waits, before.waits + 1, 'write() waited for the log to name extent 2');
  t.equal(s.device.writeNow?.(2 * M + 64 * K, [Buffer.alloc(512, 6)]), true, 'now extent 2 takes a write at once');
  t.ok(s.bitmap.isDirty((2 * M + 64 * K) / (64 * K)), 'and it is marked');
  t.ok(at(file, 2 * M + 64 * K, 512).every((b) => b === 6));
  t.equal(log.stats.waits, before.waits + 1, 'without another wait');
});

t.test('a layer that changes writes and has no writeNow is never skipped', async (t) => {
  const { dev, file } = await image(t, M);
  const seen: number[] = [];
  class Counting extends Filter {
    override write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
      seen.push(offset);
      return this.next.write(offset, data, opts);
    }
  }
  const s = buildStack({ local: dev, dirtyGranularity: G });
  const top: Device = new Counting(s.device);
  t.equal(top.writeNow?.(0, [Buffer.alloc(16, 9)]), false);
  t.ok(at(file, 0, 16).every((b) => b === 0), 'nothing written past it');
  const plain: Device = new Filter(s.device);
  t.equal(plain.writeNow?.(0, [Buffer.alloc(16, 9)]), true, 'a pass-through layer passes it on');
  t.same(seen, []);
});

t.test('devices that cannot: the pure-JS fallback, and a device without writeNow', async (t) => {
  const { dev, file } = await image(t, M, { fallback: true });
  const s = buildStack({ local: dev, dirtyGranularity: G });
  t.equal(s.device.writeNow?.(0, [Buffer.alloc(16, 9)]), false, 'fallback: no inline writes');
  t.ok(at(file, 0, 16).every((b) => b === 0));
  const mem = buildStack({ local: new MemoryDevice(M), dirtyGranularity: G });
  t.equal(mem.device.writeNow?.(0, [Buffer.alloc(16, 9)]), false, 'a device with no writeNow: write() it is');
  t.equal(mem.bitmap.dirtyBlocks(), 0);
});

t.test('readNow: the bytes of the image at once, through every layer that leaves reads alone', async (t) => {
  const { dev, file } = await image(t, M);
  const data = Buffer.alloc(64 * K);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
  fs.writeFileSync(file, data, { flag: 'r+' });
  const s = buildStack({ local: dev, dirtyGranularity: G, changes: { mark: () => {} } });
  await s.gate.hold(); // reads pass a hold
  const into = Buffer.alloc(16 + 5000);
  t.equal(s.device.readNow?.(100, 5000, into, 16), true);
  t.ok(into.subarray(16).equals(data.subarray(100, 5100)), 'the bytes, at `at`');
  s.gate.release();
  t.equal(s.bitmap.dirtyBlocks(), 0, 'a read marks nothing');
  t.equal(s.device.readNow?.(0, 256 * K, Buffer.alloc(256 * K), 0), false, 'larger than the inline limit: read() it is');
});

t.test('readNow: a layer that changes reads is never skipped; devices without it; past the end', async (t) => {
  const { dev } = await image(t, M);
  class Zeroing extends Filter {
    override async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
      into.fill(0, at, at + length);
    }
  }
  const s = buildStack({ local: dev, dirtyGranularity: G });
  t.equal(new Zeroing(s.device).readNow?.(0, 4 * K, Buffer.alloc(4 * K), 0), false, 'its own read() must run');
  t.equal(new Filter(s.device).readNow?.(0, 4 * K, Buffer.alloc(4 * K), 0), true, 'a pass-through layer passes it on');
  const mem = buildStack({ local: new MemoryDevice(M), dirtyGranularity: G });
  t.equal(mem.device.readNow?.(0, 16, Buffer.alloc(16), 0), false, 'a device with no readNow');
  const { dev: fb } = await image(t, M, { fallback: true });
  t.equal(buildStack({ local: fb, dirtyGranularity: G }).device.readNow?.(0, 16, Buffer.alloc(16), 0), false, 'the pure-JS fallback reads through the pool');
  // The file shrank under the server: readNow cannot give the whole range, read() gives zeros past the end.
  const { dev: short, file } = await image(t, M);
  fs.writeFileSync(file, Buffer.alloc(2 * K, 1));
  const into = Buffer.alloc(4 * K, 9);
  t.equal(short.readNow(0, 4 * K, into, 0), false, 'past the end of a shrunk file');
  await short.read(0, 4 * K, into, 0);
  t.ok(into.subarray(0, 2 * K).every((b) => b === 1) && into.subarray(2 * K).every((b) => b === 0), 'read(): data, then zeros');
});

t.test('fileRange: the image file and position, through every layer that leaves reads alone', async (t) => {
  const { dev } = await image(t, M);
  const s = buildStack({ local: dev, dirtyGranularity: G, changes: { mark: () => {} } });
  const r = s.device.fileRange?.(256 * K, 512 * K);
  t.ok(r && r.fd >= 0, 'on tmpfs: always, the data never waits on a disk');
  t.equal(r?.position, 256 * K, 'at the same offset: the image is the whole file');
  class Zeroing extends Filter {
    override async read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
      into.fill(0, at, at + length);
    }
  }
  t.equal(new Zeroing(s.device).fileRange?.(0, 64 * K), undefined, 'a layer that changes reads: its own read() must run');
  t.equal(buildStack({ local: new MemoryDevice(M), dirtyGranularity: G }).device.fileRange?.(0, 64 * K), undefined, 'a device with no file');
  const { dev: fb } = await image(t, M, { fallback: true });
  t.equal(fb.fileRange(0, 64 * K), undefined, 'the pure-JS fallback cannot ask the page cache');
  await dev.close();
  t.equal(dev.fileRange(0, 64 * K), undefined, 'a closed device');
});

t.test('fileRange on a disk file: only what the page cache holds; never with O_DIRECT', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-migrate-filerange-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(M, 1)); // just written: in the page cache
  fs.truncateSync(file, 64 * M); // the rest a hole, never read: not cached
  const dev = await FileDevice.open(file, { readOnly: true });
  t.teardown(() => dev.close());
  t.ok(dev.fileRange(0, M), 'written a moment ago: cached');
  t.equal(dev.fileRange(32 * M, M), undefined, 'never touched: not cached, read() it is');
  t.equal(dev.fileRange(M - 4 * K, 8 * K), undefined, 'partly cached is not cached');
  const direct = await FileDevice.open(file, { readOnly: true, direct: true }).catch((e: Error) => e);
  if (direct instanceof Error) t.match(direct.message, /O_DIRECT|EINVAL/, `this file system refuses O_DIRECT: ${direct.message}`);
  else {
    t.teardown(() => direct.close());
    t.equal(direct.fileRange(0, M), undefined, 'O_DIRECT reads bypass the page cache');
  }
});
