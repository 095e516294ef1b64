import t from 'tap';
import { ByteQueue } from '../../../src/util/byte-queue.js';

const q3 = () => {
  const q = new ByteQueue();
  q.push(Buffer.from('abc'));
  q.push(Buffer.from(''));
  q.push(Buffer.from('defg'));
  q.push(Buffer.from('h'));
  return q;
};

t.test('peek within one chunk is a view, across chunks a copy', async (t) => {
  const q = q3();
  const first = Buffer.from('xyz');
  const q2 = new ByteQueue();
  q2.push(first);
  const v = q2.peek(2);
  first[0] = 0x41;
  t.equal(v.toString(), 'Ay', 'view shares memory');
  t.equal(q.peek(5).toString(), 'abcde');
  t.equal(q.length, 8, 'peek does not consume');
  t.equal(q.peek(0).length, 0);
  t.throws(() => q.peek(9), RangeError);
});

t.test('take, drop and takeSlices consume in order', async (t) => {
  const q = q3();
  t.equal(q.take(2).toString(), 'ab');
  t.equal(q.drop(2), 2);
  const slices = q.takeSlices(3);
  t.same(slices.map((s) => s.toString()), ['efg'], 'payload as a slice of the chunk it arrived in');
  t.equal(q.length, 1);
  t.equal(q.take(1).toString(), 'h');
  t.equal(q.length, 0);
  t.equal(q.drop(10), 0, 'drop on empty queue');
});

t.test('takeSlices spanning chunks returns the original chunk memory', async (t) => {
  const q = q3();
  q.drop(1);
  const s = q.takeSlices(6);
  t.same(s.map((b) => b.toString()), ['bc', 'defg']);
  t.equal(Buffer.concat(s).toString(), 'bcdefg');
  t.equal(q.take(1).toString(), 'h');
});

t.test('drop more than buffered discards what is there', async (t) => {
  const q = q3();
  t.equal(q.drop(100), 8);
  t.equal(q.length, 0);
  q.push(Buffer.from('z'));
  t.equal(q.take(1).toString(), 'z');
});

/** An owner that counts its references, as a receive slab does. */
const counter = () => {
  const o = { refs: 0, ref: () => void o.refs++, unref: () => void o.refs-- };
  return o;
};

t.test('owned chunks: the queue holds one reference per chunk until it is consumed', async (t) => {
  const q = new ByteQueue();
  const a = counter();
  const b = counter();
  q.push(Buffer.from('abcd'), a);
  q.push(Buffer.from('efgh'), b);
  t.equal(a.refs, 1);
  t.equal(b.refs, 1);
  q.drop(3);
  t.equal(a.refs, 1, 'a partly consumed chunk stays referenced');
  q.drop(1);
  t.equal(a.refs, 0, 'released once consumed');
  q.clear();
  t.equal(b.refs, 0, 'clear releases what is left');
});

t.test('owned chunks: take copies (the owner reuses its memory), takeSlices hands references to the caller', async (t) => {
  const q = new ByteQueue();
  const a = counter();
  const b = counter();
  const first = Buffer.from('abcd');
  q.push(first, a);
  q.push(Buffer.from('efgh'), b);
  const taken = q.take(2);
  first[0] = 0x5a;
  t.equal(taken.toString(), 'ab', 'a copy, not a view of reusable memory');
  t.throws(() => q.takeSlices(2), /needs a list/, 'slices of owned memory without a place for their references are refused');
  const held: Array<{ ref(): void; unref(): void }> = [];
  const slices = q.takeSlices(4, held);
  t.same(slices.map((s) => s.toString()), ['cd', 'ef']);
  t.same(held, [a, b], 'both owners held for the caller');
  t.equal(a.refs, 1, 'the fully taken chunk: the queue passed its reference on');
  t.equal(b.refs, 2, 'the partly taken chunk: one reference for the queue, one for the caller');
  for (const o of held) o.unref();
  t.equal(a.refs, 0);
  t.equal(b.refs, 1);
  t.equal(q.take(2).toString(), 'gh');
  t.equal(b.refs, 0);
});
