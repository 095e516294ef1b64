import t from 'tap';
import { replyPoolBytes, returnReplyBuffer, takeReplyBuffer } from '../../../src/server/reply-pool.js';

t.test('READ reply buffers come back and are handed out again, by exact size', async (t) => {
  const size = 1024 * 1024 + 24;
  const a = takeReplyBuffer(size);
  t.equal(a.length, size);
  const before = replyPoolBytes();
  returnReplyBuffer(a);
  t.equal(replyPoolBytes(), before + size, 'pooled');
  t.equal(takeReplyBuffer(4096 + 16).length, 4096 + 16, 'another size is not served from it');
  const b = takeReplyBuffer(size);
  t.equal(b, a, 'the same buffer again: no allocation, nothing for the GC');
  t.equal(replyPoolBytes(), before);
});

t.test('the pool is bounded and takes only whole buffers it can reuse', async (t) => {
  const before = replyPoolBytes();
  const big = Buffer.alloc(8 * 1024 * 1024);
  returnReplyBuffer(big);
  t.equal(replyPoolBytes(), before, 'a reply past 4 MiB is left to the GC');
  const slab = Buffer.alloc(2 * 4096);
  returnReplyBuffer(slab.subarray(0, 4096));
  t.equal(replyPoolBytes(), before, 'a view into a larger buffer is not pooled');
  const many = Array.from({ length: 40 }, () => takeReplyBuffer(65536 + 16));
  for (const b of many) returnReplyBuffer(b);
  t.equal(replyPoolBytes() - before, 32 * (65536 + 16), 'at most 32 buffers of one size are kept');
});
