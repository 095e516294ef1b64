// A cutover lets the other jobs' background requests in flight finish before it
// holds guests (cutover.ts background() and quiet()): checked with requests the
// test completes by hand, not with time.
import t from 'tap';
import { EventEmitter } from 'node:events';
import { background, quiet } from '../../../src/migration/cutover.js';
import type { Target } from '../../../src/migration/target.js';

/** A target whose writes wait until the test finishes them. */
function handTarget() {
  const pending: Array<() => void> = [];
  const t = Object.assign(new EventEmitter(), {
    size: 1 << 20,
    readOnly: false,
    structuredReplies: true,
    contexts: new Map<string, number>(),
    closed: false,
    write: () => new Promise<void>((r) => pending.push(r)),
    flush: async () => undefined,
    request: async () => undefined,
    destroy: () => undefined,
  });
  return { target: t as unknown as Target, pending };
}

const settled = async (p: Promise<unknown>): Promise<boolean> => {
  let done = false;
  void p.then(() => (done = true));
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  return done;
};

t.test('quiet() waits for background requests in flight, and only for those', async (t) => {
  const { target, pending } = handTarget();
  t.ok(await settled(quiet(60_000)), 'nothing in flight: at once');
  const bg = background(target);
  t.equal(bg.size, target.size, 'the counted target reads as the target');
  t.equal(bg.closed, false);
  const w1 = bg.write(0, [Buffer.alloc(512)], { fua: false });
  const w2 = bg.write(512, [Buffer.alloc(512)], { fua: false });
  const direct = target.write(1024, [Buffer.alloc(512)], { fua: false }); // a guest's write-through: not counted
  const q = quiet(60_000);
  t.notOk(await settled(q), 'two background writes in flight: waits');
  pending[0]!();
  await w1;
  t.notOk(await settled(q), 'one still in flight: waits');
  pending[1]!();
  await w2;
  t.ok(await settled(q), 'none in flight: resolves');
  pending[2]!();
  await direct;
  t.ok(await settled(quiet(60_000)), 'the uncounted write did not count');
});

t.test('quiet() gives up at its bound when a background request never ends', async (t) => {
  const { target, pending } = handTarget();
  const w = background(target).write(0, [Buffer.alloc(512)], { fua: false });
  await quiet(1); // a frozen target must not keep a cutover from starting
  t.pass('resolved at the bound');
  pending[0]!();
  await w;
});

t.test('cutovers in one process run one at a time: the second holds no guests until the first is over', async (t) => {
  const { mkdtemp, rm } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const path = await import('node:path');
  const { cutover } = await import('../../../src/migration/cutover.js');
  const { DEFAULT_COPY_OPTIONS, newCopyStats } = await import('../../../src/migration/copy.js');
  const { buildStack } = await import('../../../src/storage/stack.js');
  const { MemoryDevice } = await import('../../helpers/memory-device.js');
  const { logger } = await import('../../../src/util/log.js');
  const dir = await mkdtemp(path.join(tmpdir(), 'nbdm-cutover-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  /** A job's pieces: its export stack and a target whose flush the test answers. */
  const job = (name: string) => {
    const { target } = handTarget();
    const flushes: Array<() => void> = [];
    (target as unknown as { flush: () => Promise<void> }).flush = () => new Promise<void>((r) => flushes.push(r));
    const stack = buildStack({ local: new MemoryDevice(1 << 20), dirtyGranularity: 65536 });
    const aborter = new AbortController();
    const run = () =>
      cutover({
        source: { name, image: path.join(dir, `${name}.img`), size: 1 << 20, stack, exportId: name, disconnectClients: () => undefined },
        target,
        connector: { uri: `nbd://dst/${name}`, boundOn: () => false, connect: async () => target } as never,
        limitMs: 60_000,
        signal: aborter.signal,
        copyOptions: (shouldStop) => ({ ...DEFAULT_COPY_OPTIONS, shouldStop }),
        stats: newCopyStats(),
        log: logger({ test: name }),
      });
    return { stack, flushes, aborter, run };
  };
  const a = job('a');
  const b = job('b');
  const c = job('c');
  const ra = a.run();
  const rb = b.run();
  const rc = c.run();
  for (let i = 0; i < 500 && a.flushes.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
  t.equal(a.flushes.length, 1, 'the first cutover holds its guests and flushes its target');
  t.ok(a.stack.gate.isHeld, 'the first holds its guests');
  t.notOk(b.stack.gate.isHeld, 'the second does not hold its guests meanwhile');
  t.equal(b.flushes.length, 0, 'and the second has not started its switch');
  c.aborter.abort();
  a.flushes[0]!();
  const oa = await ra;
  t.ok(oa.switched, 'the first switched');
  for (let i = 0; i < 500 && b.flushes.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
  t.equal(b.flushes.length, 1, 'then the second cutover runs');
  b.flushes[0]!();
  t.ok((await rb).switched, 'and switches');
  const oc = await rc;
  t.notOk(oc.switched, 'the third, aborted while it waited, never switched');
  t.equal(oc.pauseMs, 0, 'and never held its guests');
  t.equal(c.flushes.length, 0);
});
