// The pass-through filter base (src/storage/filters/filter.ts): a filter that
// overrides one call changes only that call; every other call, its arguments,
// its result and its failure reach the device below unchanged, and size and
// capabilities are asked of the device below each time.
import t from 'tap';
import type { Capabilities, Device, Extent, WriteOptions, ZeroOptions } from '../../../../src/storage/device.js';
import { DeviceError } from '../../../../src/storage/device.js';
import { Filter } from '../../../../src/storage/filters/filter.js';

/** Records every call; answers extents with a fixed list; fails what `failing` names. */
class Recorder implements Device {
  calls: Array<[string, ...unknown[]]> = [];
  size = 1 << 20;
  canTrim = true;
  failing = new Set<string>();
  readonly extentsAnswer: Extent[] = [{ length: 4096, flags: 3 }];
  capabilities(): Capabilities {
    this.calls.push(['capabilities']);
    const c = this.canTrim;
    return { canWrite: true, canFlush: true, canFua: true, canTrim: c, canZero: true, canFastZero: false, canExtents: true, canCache: true, canMultiConn: true };
  }
  private async did(name: string, ...args: unknown[]): Promise<void> {
    this.calls.push([name, ...args]);
    if (this.failing.has(name)) throw new DeviceError('EIO', `${name} failed below`);
  }
  read(o: number, l: number, into: Buffer, at: number) {
    into.fill(0x11, at, at + l);
    return this.did('read', o, l, at);
  }
  write(o: number, data: readonly Buffer[], opts: WriteOptions) {
    return this.did('write', o, data, opts);
  }
  flush() {
    return this.did('flush');
  }
  trim(o: number, l: number, opts: WriteOptions) {
    return this.did('trim', o, l, opts);
  }
  zero(o: number, l: number, opts: ZeroOptions) {
    return this.did('zero', o, l, opts);
  }
  async extents(o: number, l: number, m: number) {
    await this.did('extents', o, l, m);
    return this.extentsAnswer;
  }
  cache(o: number, l: number) {
    return this.did('cache', o, l);
  }
  close() {
    return this.did('close');
  }
}

/** Overrides read only: answers 0xee without asking the device below. */
class ReadFiller extends Filter {
  override async read(_o: number, l: number, into: Buffer, at: number): Promise<void> {
    into.fill(0xee, at, at + l);
  }
}

t.test('a filter that overrides read passes every other call through unchanged', async (t) => {
  const below = new Recorder();
  const f = new ReadFiller(below);
  const buf = Buffer.alloc(8);
  await f.read(0, 4, buf, 2);
  t.same([...buf], [0, 0, 0xee, 0xee, 0xee, 0xee, 0, 0], 'the overridden call does what the filter says');
  t.same(below.calls, [], 'and never reaches the device below');

  const data = [Buffer.from('ab'), Buffer.from('cd')];
  const fua = { fua: true };
  const z = { fua: false, noHole: true, fast: true };
  await f.write(512, data, fua);
  await f.flush();
  await f.trim(1024, 100, fua);
  await f.zero(2048, 200, z);
  const ex = await f.extents(4096, 8192, 7);
  await f.cache(8192, 300);
  await f.close();
  t.same(below.calls, [['write', 512, data, fua], ['flush'], ['trim', 1024, 100, fua], ['zero', 2048, 200, z], ['extents', 4096, 8192, 7], ['cache', 8192, 300], ['close']]);
  t.equal(below.calls[0]![2], data, 'the write buffers are handed down as they are, not joined or copied');
  t.equal(ex, below.extentsAnswer, "the device's extents come back unchanged");
});

t.test('failures below come through; size and capabilities are asked each time', async (t) => {
  const below = new Recorder();
  const f = new ReadFiller(below);
  for (const op of ['write', 'flush', 'trim', 'zero', 'extents', 'cache'] as const) below.failing.add(op);
  await t.rejects(f.write(0, [Buffer.alloc(1)], { fua: false }), { code: 'EIO', message: 'write failed below' });
  await t.rejects(f.flush(), { code: 'EIO' });
  await t.rejects(f.trim(0, 1, { fua: false }), { code: 'EIO' });
  await t.rejects(f.zero(0, 1, { fua: false, noHole: false, fast: false }), { code: 'EIO' });
  await t.rejects(f.extents(0, 1, 1), { code: 'EIO' });
  await t.rejects(f.cache(0, 1), { code: 'EIO' });

  t.equal(f.size, 1 << 20);
  below.size = 2 << 20;
  t.equal(f.size, 2 << 20, 'size follows the device below');
  t.equal(f.capabilities().canTrim, true);
  below.canTrim = false;
  t.equal(f.capabilities().canTrim, false, 'capabilities are not cached');
});

t.test('a filter over a filter: each overrides only its own call', async (t) => {
  const below = new Recorder();
  class FlushCounter extends Filter {
    flushes = 0;
    override flush(): Promise<void> {
      this.flushes++;
      return super.flush();
    }
  }
  const counter = new FlushCounter(below);
  const top = new ReadFiller(counter);
  await top.flush();
  await top.flush();
  const buf = Buffer.alloc(2);
  await top.read(0, 2, buf, 0);
  t.equal(counter.flushes, 2, 'the middle filter sees the calls the top one passes');
  t.same(below.calls, [['flush'], ['flush']], 'and passes them on; the read stopped at the top');
});
