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
