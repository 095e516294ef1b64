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
