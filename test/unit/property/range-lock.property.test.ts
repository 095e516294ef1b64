// Property tests: RangeLock (src/util/range-lock.ts) under random
// schedules of acquirers, each starting after a random number of event-loop
// steps (microtasks or macrotasks), holding a random range for a random number
// of steps, then releasing. Checked:
//   - exclusion: no two holders ever overlap (a zero-length range counts as one byte);
//   - no lost wakeups: every acquirer gets its range, and the lock ends empty;
//   - FIFO among overlapping requests: of two overlapping requests, the one
//     made first gets its range first (so a waiter cannot be starved by a
//     stream of later requests that each overlap it but not each other).
// FC_SEED / FC_RUNS replay or lengthen a run.

import t from 'tap';
import fc from 'fast-check';
import { RangeLock } from '../../../src/util/range-lock.js';
import { checkProperty, fcParams } from './fc.js';

interface Task {
  /** Steps before the request. */
  delay: number;
  offset: number;
  length: number;
  /** Steps the range is held. */
  hold: number;
  /** Steps are macrotasks (setImmediate) rather than microtasks. */
  macro: boolean;
}

const task: fc.Arbitrary<Task> = fc.record({
  delay: fc.integer({ min: 0, max: 12 }),
  offset: fc.integer({ min: 0, max: 60 }),
  length: fc.oneof({ weight: 1, arbitrary: fc.constant(0) }, { weight: 6, arbitrary: fc.integer({ min: 1, max: 30 }) }),
  hold: fc.integer({ min: 0, max: 12 }),
  macro: fc.boolean(),
});

const step = (macro: boolean) => (macro ? new Promise<void>((r) => setImmediate(r)) : Promise.resolve());
const span = (x: Task) => [x.offset, x.offset + Math.max(x.length, 1)] as const;
const overlap = (a: Task, b: Task) => span(a)[0] < span(b)[1] && span(b)[0] < span(a)[1];

async function runSchedule(tasks: Task[]): Promise<void> {
  const lock = new RangeLock();
  const holders = new Set<number>();
  let seq = 0;
  const requested: number[] = [];
  const granted: number[] = [];
  const done: boolean[] = tasks.map(() => false);
  const run = async (x: Task, i: number) => {
    for (let k = 0; k < x.delay; k++) await step(x.macro);
    requested[i] = seq++;
    const release = await lock.acquire(x.offset, x.length);
    granted[i] = seq++;
    for (const h of holders) if (overlap(tasks[h]!, x)) throw new Error(`task ${i} ${JSON.stringify(span(x))} granted while task ${h} ${JSON.stringify(span(tasks[h]!))} holds an overlapping range`);
    holders.add(i);
    for (let k = 0; k < x.hold; k++) await step(x.macro);
    holders.delete(i);
    release();
    done[i] = true;
  };
  let timer: NodeJS.Timeout | undefined;
  const all = Promise.all(tasks.map(run));
  const stuck = new Promise<never>((_r, rej) => {
    timer = setTimeout(() => rej(new Error(`acquirers never woken: tasks ${done.flatMap((d, i) => (d ? [] : [i])).join(', ')} still waiting with nothing held`)), 2000);
  });
  try {
    await Promise.race([all, stuck]);
  } finally {
    clearTimeout(timer);
  }
  if (lock.size !== 0) throw new Error(`the lock holds ${lock.size} entries after every range was released`);
  for (let a = 0; a < tasks.length; a++)
    for (let b = 0; b < tasks.length; b++)
      if (a !== b && overlap(tasks[a]!, tasks[b]!) && requested[a]! < requested[b]! && granted[b]! < granted[a]!)
        throw new Error(`task ${b} ${JSON.stringify(span(tasks[b]!))}, requested after task ${a} ${JSON.stringify(span(tasks[a]!))}, was granted first`);
}

t.test('RangeLock: exclusion, no lost wakeups, FIFO among overlapping requests', async (t) => {
  const prop = fc.asyncProperty(fc.array(task, { minLength: 1, maxLength: 24 }), (tasks) => runSchedule(tasks));
  await checkProperty(t, 'random schedules', prop, fcParams({ numRuns: 300 }));
});

t.test('a waiter is not starved by later requests that overlap it but not each other', async (t) => {
  // A copy chunk [0, 100) behind guest writes at 10 and 20 that always have one in flight:
  // each new write overlaps the chunk but not the write before it.
  const lock = new RangeLock();
  let release = await lock.acquire(10, 1);
  let chunkGranted = false;
  const chunk = lock.acquire(0, 100).then((r) => {
    chunkGranted = true;
    r();
  });
  let writesBeforeChunk = 0;
  for (let i = 0; i < 100; i++) {
    const next = lock.acquire(i % 2 ? 10 : 20, 1);
    release();
    await new Promise<void>((r) => setImmediate(r));
    release = await next;
    if (chunkGranted) break;
    writesBeforeChunk++;
  }
  release();
  await chunk;
  t.ok(chunkGranted, 'the chunk is granted');
  t.equal(writesBeforeChunk, 0, `before any write requested after it (${writesBeforeChunk} of them went first)`);
  t.equal(lock.size, 0, 'and the lock ends empty');
});
