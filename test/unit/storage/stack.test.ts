// buildStack (src/storage/stack.ts): the layers are in order (throttle, gate,
// switch, write-through, dirty tracking, the image), each reached by its role,
// and capabilities and size are asked of the stack whenever needed, so an
// export follows the switch at cutover.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import { Export } from '../../../src/server/export.js';
import type { Capabilities } from '../../../src/storage/device.js';
import { buildStack } from '../../../src/storage/stack.js';
import { RangeLock } from '../../../src/util/range-lock.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const KiB = 1024;
const G = 4 * KiB; // bitmap granularity in these tests

const bytes = async (d: { read(o: number, l: number, b: Buffer, a: number): Promise<void> }, o: number, l: number) => {
  const b = Buffer.alloc(l);
  await d.read(o, l, b, 0);
  return b;
};

t.test('a write goes through to the image and marks the bitmap; reads of the top see the image', async (t) => {
  const local = new MemoryDevice(64 * KiB);
  const s = buildStack({ local, dirtyGranularity: G });
  t.equal(s.local, local, 'the bottom is the image given');
  await s.device.write(G, [Buffer.alloc(10, 7)], { fua: false });
  await s.device.zero(3 * G, 10, { fua: false, noHole: false, fast: false });
  t.same([s.bitmap.isDirty(0), s.bitmap.isDirty(1), s.bitmap.isDirty(2), s.bitmap.isDirty(3)], [false, true, false, true]);
  t.equal((await bytes(local, G, 10)).toString('hex'), '07'.repeat(10));
  t.equal((await bytes(s.device, G, 10)).toString('hex'), '07'.repeat(10));
  const before = s.bitmap.dirtyBlocks();
  await bytes(s.local, 0, 64 * KiB);
  t.equal(s.bitmap.dirtyBlocks(), before, 'reading the image below (the copy engine) marks nothing');
});

t.test('write-through sits above the tracking: a change the target takes leaves its block clean', async (t) => {
  const local = new MemoryDevice(64 * KiB);
  const target = new MemoryDevice(64 * KiB);
  const s = buildStack({ local, dirtyGranularity: G });
  const errors: unknown[] = [];
  s.writeThrough.setWriteThrough({ target, locks: new RangeLock(), onError: (e) => errors.push(e) });
  t.ok(s.writeThrough.writeThroughActive);
  await s.device.write(2 * G, [Buffer.alloc(G, 9)], { fua: false });
  t.equal(s.bitmap.dirtyBlocks(), 0, 'not marked');
  t.ok((await bytes(local, 2 * G, G)).every((b) => b === 9), 'the image has it');
  t.ok((await bytes(target, 2 * G, G)).every((b) => b === 9), 'the target has it');
  s.writeThrough.setWriteThrough(undefined);
  await s.device.write(0, [Buffer.alloc(1, 1)], { fua: false });
  t.ok(s.bitmap.isDirty(0), 'off again: the tracking marks');
  t.equal(target.ops.write, 1, 'and the target is left alone');
  t.same(errors, []);
});

t.test('the gate is above the switch: a write held over the swap lands on the target, unmarked', async (t) => {
  const local = new MemoryDevice(64 * KiB);
  const target = new MemoryDevice(64 * KiB);
  const s = buildStack({ local, dirtyGranularity: G });
  await s.gate.hold();
  t.ok(s.gate.isHeld);
  let done = false;
  const w = s.device.write(0, [Buffer.alloc(G, 5)], { fua: false }).then(() => (done = true));
  t.equal((await bytes(s.device, 0, 1))[0], 0, 'reads pass the hold');
  t.notOk(done, 'the write waits');
  t.notOk(s.switch.switched);
  s.switch.swap(target);
  t.ok(s.switch.switched, 'the switch says where the I/O goes');
  t.equal(s.switch.target, target);
  s.gate.release();
  await w;
  t.ok((await bytes(target, 0, G)).every((b) => b === 5), 'the held write went to the target');
  t.equal(local.ops.write, 0, 'not to the image');
  t.equal(s.bitmap.dirtyBlocks(), 0, 'and the bitmap is not marked (tracking is below the switch)');
});

t.test('the throttle is above the gate: a hold does not wait for writes still waiting on the rate', async (t) => {
  const local = new MemoryDevice(256 * KiB);
  const s = buildStack({ local, dirtyGranularity: G });
  s.throttle.setRate(64 * KiB); // burst 64 KiB: the first write passes at once, the second waits about a second
  t.equal(s.throttle.rate, 64 * KiB);
  const first = s.device.write(0, [Buffer.alloc(64 * KiB, 1)], { fua: false });
  let secondDone = false;
  const second = s.device.write(64 * KiB, [Buffer.alloc(64 * KiB, 2)], { fua: false }).then(() => (secondDone = true));
  await first;
  await s.gate.hold();
  t.notOk(secondDone, 'held while the second write still waits for the rate');
  s.throttle.setRate(undefined);
  s.gate.release();
  await second;
  t.equal(s.throttle.rate, undefined);
  t.ok((await bytes(local, 64 * KiB, 64 * KiB)).every((b) => b === 2));
});

t.test('unthrottled, changes held by the gate reach the image in request order after the release', async (t) => {
  const order: string[] = [];
  const local = new MemoryDevice(64 * KiB, { delay: (op) => void order.push(op) });
  const s = buildStack({ local, dirtyGranularity: G });
  await s.gate.hold();
  const done = Promise.all([
    s.device.write(0, [Buffer.alloc(G, 1)], { fua: false }),
    s.device.flush(),
    s.device.trim(G, G, { fua: false }),
    s.device.write(2 * G, [Buffer.alloc(G, 2)], { fua: false }),
  ]);
  t.same(order, [], 'nothing passes the hold');
  s.gate.release();
  await done;
  t.same(order, ['write', 'flush', 'trim', 'write']);
});

/** A memory device whose capabilities a test changes. */
class Changing extends MemoryDevice {
  caps: Partial<Capabilities> = {};
  override capabilities(): Capabilities {
    return { ...super.capabilities(), ...this.caps };
  }
}

t.test('capabilities and size are asked live, of whatever is below the switch now', async (t) => {
  const local = new Changing(64 * KiB);
  const s = buildStack({ local, dirtyGranularity: G });
  const exp = new Export({ name: 'vm', device: s.device });
  t.equal(s.device.capabilities().canTrim, true);
  t.notOk(exp.readOnly);
  t.ok(exp.transmissionFlags(false) & C.NBD_FLAG_SEND_TRIM);
  local.caps = { canTrim: false };
  t.equal(s.device.capabilities().canTrim, false, 'a change below shows at the top');
  t.notOk(exp.transmissionFlags(false) & C.NBD_FLAG_SEND_TRIM, 'and in the flags the next connection gets');

  const target = new MemoryDevice(128 * KiB, { readOnly: true });
  s.switch.swap(target);
  t.ok(exp.readOnly, 'after the switch the export answers for the target');
  t.ok(exp.transmissionFlags(false) & C.NBD_FLAG_READ_ONLY);
  t.equal(exp.size, 128 * KiB, 'size follows the switch too');
});
