import t from 'tap';
import { SLAB_BYTES, SlabReader } from '../../../src/server/read-slabs.js';

t.test('reads land one after another in one slab, which is reused only once every reference is gone', async (t) => {
  const r = new SlabReader();
  const first = r.next();
  t.equal(first.length, SLAB_BYTES, 'the first read may fill the whole slab');
  const slab = r.current;
  r.advance(1000);
  const second = r.next();
  t.equal(second.byteOffset, first.byteOffset + 1000, 'the next read lands right after the previous one');
  t.equal(r.current, slab);
  // A chunk of the slab is still referenced (a WRITE payload being written).
  slab.ref();
  r.advance(second.length - 1000); // all but 1000 bytes used: too little room left
  const third = r.next();
  t.not(r.current, slab, 'a used-up slab is retired');
  t.equal(third.length, SLAB_BYTES);
  const other = new SlabReader();
  t.not(other.current, slab, 'a retired slab still referenced is not handed out again');
  other.release();
  slab.unref();
  const again = new SlabReader();
  t.equal(again.current, slab, 'once released it is reused');
  again.release();
  r.release();
});
