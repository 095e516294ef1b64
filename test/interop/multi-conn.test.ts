// NBD_FLAG_CAN_MULTI_CONN: with several libnbd connections to one export, a
// write completed on one connection must be covered by a FLUSH (or be made
// durable by FUA) on any other connection, and visible to all of them.

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, serve, tmpDir } from '../helpers/server.js';
import { libnbdScenario } from '../helpers/libnbd.js';
import { requirePythonNbd } from '../helpers/tools.js';

await requirePythonNbd();

t.test('multi-conn flush visibility', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 32 * MiB, { fill: 0x11 });
  const srv = await serve(t, [img, '--name', 'vm1']);

  const R = await libnbdScenario<Record<string, unknown>>(
    `
    def file_region(off, n):
        with open(A['path'], 'rb') as f:
            f.seek(off)
            return f.read(n)

    hA = conn(A['uri'], strict=None)
    hB = conn(A['uri'], strict=None)
    R['multi_conn'] = [hA.can_multi_conn(), hB.can_multi_conn()]
    R['can_flush'] = [hA.can_flush(), hB.can_flush()]
    R['can_fua'] = [hA.can_fua(), hB.can_fua()]

    # 1. Write on A, flush on B: in the file and readable from B.
    d1 = os.urandom(1024 * 1024)
    hA.pwrite(d1, 3 * 1024 * 1024)
    hB.flush()
    R['w1_file'] = sha(file_region(3 * 1024 * 1024, len(d1))) == sha(d1)
    R['w1_read_b'] = sha(hB.pread(len(d1), 3 * 1024 * 1024)) == sha(d1)

    # 2. Unaligned write on B, flush on A.
    d2 = os.urandom(77777)
    hB.pwrite(d2, 9 * 1024 * 1024 + 333)
    hA.flush()
    R['w2_file'] = sha(file_region(9 * 1024 * 1024 + 333, len(d2))) == sha(d2)
    R['w2_read_a'] = sha(hA.pread(len(d2), 9 * 1024 * 1024 + 333)) == sha(d2)

    # 3. FUA write on A: durable (in the file) when it completes, visible on B.
    d3 = os.urandom(65536)
    hA.pwrite(d3, 12 * 1024 * 1024, flags=nbd.CMD_FLAG_FUA)
    R['w3_file'] = sha(file_region(12 * 1024 * 1024, len(d3))) == sha(d3)
    R['w3_read_b'] = sha(hB.pread(len(d3), 12 * 1024 * 1024)) == sha(d3)

    # 4. Write-zeroes and trim on A, flush on B.
    hA.zero(1024 * 1024, 16 * 1024 * 1024)
    hB.flush()
    R['w4_file_zero'] = file_region(16 * 1024 * 1024, 1024 * 1024) == bytes(1024 * 1024)
    R['w4_read_b_zero'] = hB.pread(1024 * 1024, 16 * 1024 * 1024) == bytes(1024 * 1024)

    # 5. Four connections, many writes in flight on each (aio), one flush on
    #    the last connection after all replies arrived.
    hs = [hA, hB, conn(A['uri'], strict=None), conn(A['uri'], strict=None)]
    expect = {}
    cookies = []
    for i, h in enumerate(hs):
        for j in range(16):
            off = 20 * 1024 * 1024 + (i * 16 + j) * 65536
            data = os.urandom(65536)
            expect[off] = data
            cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)))
    for h, c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
    hs[3].flush()
    R['w5_file'] = all(file_region(off, 65536) == d for off, d in expect.items())
    R['w5_read_all'] = all(h.pread(65536, off) == d for h in hs for off, d in expect.items())
    R['untouched'] = file_region(0, 65536) == b'\\x11' * 65536
    for h in hs:
        close(h)
    `,
    { uri: srv.uri('vm1'), path: img },
  );

  t.same(R.multi_conn, [true, true], 'can_multi_conn() is true on both connections');
  t.same(R.can_flush, [true, true], 'can_flush() is true');
  t.same(R.can_fua, [true, true], 'can_fua() is true');
  t.equal(R.w1_file, true, 'write on A + flush on B: data is in the image file');
  t.equal(R.w1_read_b, true, 'write on A + flush on B: B reads the new data');
  t.equal(R.w2_file, true, 'unaligned write on B + flush on A: data is in the image file');
  t.equal(R.w2_read_a, true, 'unaligned write on B + flush on A: A reads the new data');
  t.equal(R.w3_file, true, 'FUA write on A: data is in the image file on completion');
  t.equal(R.w3_read_b, true, 'FUA write on A: B reads the new data');
  t.equal(R.w4_file_zero, true, 'write-zeroes on A + flush on B: zeroes in the file');
  t.equal(R.w4_read_b_zero, true, 'write-zeroes on A + flush on B: B reads zeroes');
  t.equal(R.w5_file, true, '64 concurrent writes on 4 connections + one flush: all in the file');
  t.equal(R.w5_read_all, true, 'all 4 connections read all 64 writes');
  t.equal(R.untouched, true, 'unwritten data is untouched');
});
