// Error paths of nbd-migrate, driven through libnbd's Python bindings
// (Debian python3-libnbd) with libnbd's strict mode off so that every bad
// request actually reaches the server. Each error must come back as the
// errno the NBD spec asks for, and the connection must stay usable.

import t, { type Test } from 'tap';
import { join } from 'node:path';
import { stat } from 'node:fs/promises';
import { GiB, KiB, MiB, allBytes, makeImage, readAt, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { type Attempt, fileSha, libnbdScenario, sha256 } from '../helpers/libnbd.js';
import { requirePythonNbd } from '../helpers/tools.js';

await requirePythonNbd();

/** The call failed with `errname`, and the error was reported by the server. */
function serverError(t: Test, a: Attempt | undefined, errname: string | string[], what: string): void {
  const names = Array.isArray(errname) ? errname : [errname];
  t.ok(a && !a.ok && names.includes(a.errname ?? ''), `${what} -> ${names.join(' or ')}`, { got: a });
  if (a && !a.ok) t.match(a.msg, /command failed/, `${what}: the error was a server reply`, { got: a });
}

function succeeded(t: Test, a: Attempt | undefined, what: string): void {
  t.match(a, { ok: true }, `${what} succeeds`, { got: a });
}

/** A read attempt returned exactly `expectedSha`. */
function readMatches(t: Test, a: Attempt | undefined, expectedSha: string, what: string): void {
  t.match(a, { ok: true, value: { sha256: expectedSha } }, what, { got: a });
}

const W_SIZE = 8 * MiB + 1000; // odd size on purpose
const RO_SIZE = 1 * MiB;
const BIG_SIZE = 64 * MiB;

t.test('errors on a server with writable, read-only and large exports', async (t) => {
  const dir = await tmpDir(t);
  const w = await makeImage(join(dir, 'w.img'), W_SIZE, { fill: 'random' });
  const ro = await makeImage(join(dir, 'ro.img'), RO_SIZE, { fill: 0x42 });
  const big = await makeImage(join(dir, 'big.img'), BIG_SIZE, { fill: 'random' });
  const srv = await serve(t, [w, '--name', 'w', '--export', `ro=${ro},read-only`, '--export', `big=${big}`]);

  t.test('out-of-range requests', async (t) => {
    const head = await fileSha(w, 0, 4096);
    const tail = await fileSha(w, W_SIZE - 100, 100);
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      h = conn(A['uri'])
      S = h.get_size()
      R['size'] = {'ok': True, 'value': S}
      R['read_tail'] = attempt(lambda: h.pread(100, S - 100))
      R['read_at_end'] = attempt(lambda: h.pread(4096, S))
      R['read_straddle'] = attempt(lambda: h.pread(4096, S - 100))
      R['read_far'] = attempt(lambda: h.pread(1, 2**64 - 1))
      R['read_wrap'] = attempt(lambda: h.pread(4096, 2**64 - 2048))
      R['write_tail'] = attempt(lambda: h.pwrite(b'E' * 100, S - 100))
      R['write_straddle'] = attempt(lambda: h.pwrite(b'W' * 4096, S - 100))
      R['write_at_end'] = attempt(lambda: h.pwrite(b'W' * 10, S))
      R['write_wrap'] = attempt(lambda: h.pwrite(b'W' * 4096, 2**64 - 2048))
      R['zero_straddle'] = attempt(lambda: h.zero(4096, S - 100))
      R['trim_at_end'] = attempt(lambda: h.trim(4096, S))
      R['trim_straddle'] = attempt(lambda: h.trim(4096, S - 100))
      R['block_status_at_end'] = attempt(lambda: extents(h, 4096, S))
      R['cache_at_end'] = attempt(lambda: h.cache(4096, S))
      R['read_after'] = attempt(lambda: h.pread(4096, 0))
      R['flush_after'] = attempt(lambda: h.flush())
      close(h)
      `,
      { uri: srv.uri('w') },
    );
    t.match(R.size, { value: W_SIZE }, 'export size is the file size');
    readMatches(t, R.read_tail, tail, 'reading the last 100 bytes works');
    serverError(t, R.read_at_end, 'EINVAL', 'read at offset == size');
    serverError(t, R.read_straddle, 'EINVAL', 'read straddling the end');
    serverError(t, R.read_far, 'EINVAL', 'read at offset 2^64-1');
    serverError(t, R.read_wrap, 'EINVAL', 'read whose offset+length wraps 2^64');
    succeeded(t, R.write_tail, 'write of the last 100 bytes');
    serverError(t, R.write_straddle, 'ENOSPC', 'write straddling the end');
    serverError(t, R.write_at_end, 'ENOSPC', 'write at offset == size');
    serverError(t, R.write_wrap, ['ENOSPC', 'EINVAL'], 'write whose offset+length wraps 2^64');
    serverError(t, R.zero_straddle, 'ENOSPC', 'write-zeroes straddling the end');
    serverError(t, R.trim_at_end, 'EINVAL', 'trim at offset == size');
    serverError(t, R.trim_straddle, 'EINVAL', 'trim straddling the end');
    serverError(t, R.block_status_at_end, 'EINVAL', 'block status at offset == size');
    serverError(t, R.cache_at_end, 'EINVAL', 'cache at offset == size');
    readMatches(t, R.read_after, head, 'the connection still reads correct data afterwards');
    succeeded(t, R.flush_after, 'flush afterwards');

    t.equal((await stat(w)).size, W_SIZE, 'the image file did not grow');
    t.ok(allBytes(await readAt(w, W_SIZE - 100, 100), 0x45), 'failed writes did not touch the last 100 bytes');
  });

  t.test('write, trim and zero on a read-only export -> EPERM', async (t) => {
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      h = conn(A['uri'])
      R['is_read_only'] = {'ok': True, 'value': h.is_read_only()}
      R['write'] = attempt(lambda: h.pwrite(b'X' * 4096, 0))
      R['write_fua'] = attempt(lambda: h.pwrite(b'X' * 512, 4096, flags=nbd.CMD_FLAG_FUA))
      R['trim'] = attempt(lambda: h.trim(65536, 0))
      R['zero'] = attempt(lambda: h.zero(65536, 0))
      R['zero_nohole'] = attempt(lambda: h.zero(4096, 65536, flags=nbd.CMD_FLAG_NO_HOLE))
      R['read'] = attempt(lambda: h.pread(4096, 0))
      close(h)
      `,
      { uri: srv.uri('ro') },
    );
    t.match(R.is_read_only, { value: true }, 'export is advertised read-only');
    serverError(t, R.write, 'EPERM', 'write');
    // A read-only export need not advertise FUA; then the flag itself is invalid.
    serverError(t, R.write_fua, ['EPERM', 'EINVAL'], 'write with FUA');
    serverError(t, R.trim, 'EPERM', 'trim');
    serverError(t, R.zero, 'EPERM', 'write-zeroes');
    serverError(t, R.zero_nohole, 'EPERM', 'write-zeroes with NO_HOLE');
    readMatches(t, R.read, sha256(Buffer.alloc(4096, 0x42)), 'reads still work');
    t.ok(allBytes(await readAt(ro, 0, RO_SIZE), 0x42), 'the read-only image is unchanged');
  });

  t.test('zero-length requests are answered', async (t) => {
    const head = await fileSha(w, 0, 4096);
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      h = conn(A['uri'])
      S = h.get_size()
      ops = [
          ('read', lambda: h.pread(0, 0)),
          ('read_at_end', lambda: h.pread(0, S)),
          ('write', lambda: h.pwrite(b'', 4096)),
          ('write_fua', lambda: h.pwrite(b'', 4096, flags=nbd.CMD_FLAG_FUA)),
          ('trim', lambda: h.trim(0, 4096)),
          ('zero', lambda: h.zero(0, 4096)),
          ('cache', lambda: h.cache(0, 4096)),
          ('block_status', lambda: extents(h, 0, 4096)),
      ]
      for name, fn in ops:
          R[name] = attempt(fn)
          R[name + '_then_read'] = attempt(lambda: h.pread(4096, 0))
      close(h)
      `,
      { uri: srv.uri('w') },
    );
    for (const name of ['read', 'read_at_end', 'write', 'write_fua', 'trim', 'zero', 'cache', 'block_status']) {
      const a = R[name];
      t.ok(
        a !== undefined && (a.ok || (a.errname === 'EINVAL' && /command failed/.test(a.msg))),
        `zero-length ${name} gets a reply (success or EINVAL from the server)`,
        { got: a },
      );
      readMatches(t, R[`${name}_then_read`], head, `connection works after zero-length ${name}`);
    }
    t.match(R.read, { ok: true, value: { len: 0 } }, 'zero-length read returns no data');
  });

  t.test('READ larger than 32 MiB -> EINVAL, connection still works', async (t) => {
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      h = conn(A['uri'])
      R['max_block'] = {'ok': True, 'value': h.get_block_size(nbd.SIZE_MAXIMUM)}
      R['read_33m'] = attempt(lambda: h.pread(33 * 1024 * 1024, 0))
      R['read_32m_plus_1'] = attempt(lambda: h.pread(32 * 1024 * 1024 + 1, 4096))
      R['read_after'] = attempt(lambda: h.pread(4096, 0))
      R['read_32m'] = attempt(lambda: h.pread(32 * 1024 * 1024, 16 * 1024 * 1024))
      close(h)
      `,
      { uri: srv.uri('big') },
    );
    t.match(R.max_block, { value: 32 * MiB }, 'maximum block size 32 MiB');
    serverError(t, R.read_33m, 'EINVAL', '33 MiB read');
    serverError(t, R.read_32m_plus_1, 'EINVAL', '32 MiB + 1 read');
    readMatches(t, R.read_after, await fileSha(big, 0, 4096), 'a 4 KiB read afterwards returns the right data');
    readMatches(t, R.read_32m, await fileSha(big, 16 * MiB, 32 * MiB), 'an exactly 32 MiB read works');
  });

  t.test('WRITE larger than 32 MiB is refused and the stream stays in sync', async (t) => {
    const before = await fileSha(big, 0, BIG_SIZE);
    // The oversized payload is a train of valid NBD_CMD_TRIM requests (and a
    // WRITE_ZEROES at the end): if the server failed to skip the payload and
    // parsed it as requests, it would punch holes into the image.
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      import struct
      def req(typ, off, length, handle):
          return struct.pack('>IHHQQI', 0x25609513, 0, typ, handle, off, length)
      unit = b''.join(req(4, i * 65536, 65536, 0xbad0000 + i) for i in range(64)) + req(6, 0, 1 << 20, 0xbadffff)
      payload = (unit * ((33 * 1024 * 1024) // len(unit) + 1))[:33 * 1024 * 1024]
      h = conn(A['uri'])
      R['write_33m'] = attempt(lambda: h.pwrite(payload, 0))
      R['read_after'] = attempt(lambda: h.pread(1024 * 1024, 0))
      R['flush_after'] = attempt(lambda: h.flush())
      R['write_33m_again'] = attempt(lambda: h.pwrite(payload, 4096))
      R['read_after_again'] = attempt(lambda: h.pread(4096, 60 * 1024 * 1024))
      close(h)
      `,
      { uri: srv.uri('big') },
      180_000,
    );
    serverError(t, R.write_33m, 'EINVAL', '33 MiB write');
    readMatches(t, R.read_after, await fileSha(big, 0, MiB), 'a read afterwards returns the original data');
    succeeded(t, R.flush_after, 'flush afterwards');
    serverError(t, R.write_33m_again, 'EINVAL', 'a second 33 MiB write');
    readMatches(t, R.read_after_again, await fileSha(big, 60 * MiB, 4096), 'reads still work after the second');
    t.equal(await fileSha(big, 0, BIG_SIZE), before, 'the image is unchanged: no part of the payload was applied');

    // Exactly 32 MiB is allowed.
    const data = patternBuffer(32 * MiB, 77);
    const R2 = await libnbdScenario<Record<string, Attempt>>(
      `
      data = open(A['src'], 'rb').read()
      h = conn(A['uri'])
      R['write_32m'] = attempt(lambda: h.pwrite(data, 8 * 1024 * 1024))
      R['read_back'] = attempt(lambda: h.pread(32 * 1024 * 1024, 8 * 1024 * 1024))
      close(h)
      `,
      { uri: srv.uri('big'), src: await writeTemp(dir, 'p32.bin', data) },
    );
    succeeded(t, R2.write_32m, 'an exactly 32 MiB write');
    readMatches(t, R2.read_back, sha256(data), 'reading it back');
    t.equal(await fileSha(big, 8 * MiB, 32 * MiB), sha256(data), 'the 32 MiB write reached the file');
  });

  t.test('unknown command flags -> EINVAL', async (t) => {
    const head = await fileSha(w, 0, 4096);
    const R = await libnbdScenario<Record<string, Attempt>>(
      `
      h = conn(A['uri'])
      R['read'] = attempt(lambda: h.pread(4096, 0, flags=1 << 10))
      R['read_high'] = attempt(lambda: h.pread(4096, 0, flags=1 << 15))
      R['write'] = attempt(lambda: h.pwrite(b'U' * 4096, 0, flags=1 << 10))
      R['zero'] = attempt(lambda: h.zero(4096, 0, flags=1 << 12))
      R['trim'] = attempt(lambda: h.trim(4096, 0, flags=1 << 11))
      R['flush'] = attempt(lambda: h.flush(flags=1 << 10))
      R['read_after'] = attempt(lambda: h.pread(4096, 0))
      close(h)
      `,
      { uri: srv.uri('w') },
    );
    serverError(t, R.read, 'EINVAL', 'read with flag 1<<10');
    serverError(t, R.read_high, 'EINVAL', 'read with flag 1<<15');
    serverError(t, R.write, 'EINVAL', 'write with flag 1<<10');
    serverError(t, R.zero, 'EINVAL', 'write-zeroes with flag 1<<12');
    serverError(t, R.trim, 'EINVAL', 'trim with flag 1<<11');
    serverError(t, R.flush, 'EINVAL', 'flush with flag 1<<10');
    readMatches(t, R.read_after, head, 'data unchanged and connection usable');
    t.equal(await fileSha(w, 0, 4096), head, 'the refused write/zero/trim did not modify the file');
  });
});

t.test('TRIM, WRITE_ZEROES and BLOCK_STATUS longer than 32 MiB are served', async (t) => {
  const dir = await tmpDir(t);
  const size = 2 * GiB;
  const img = await makeImage(join(dir, 'sparse.img'), size);
  const marks: [number, Buffer][] = [
    [0, patternBuffer(4 * KiB, 1)], // before the zeroed range
    [100 * MiB, patternBuffer(4 * KiB, 2)], // inside the zeroed range
    [GiB + 4 * KiB, patternBuffer(4 * KiB, 3)], // between zeroed and trimmed ranges
    [GiB + 512 * MiB, patternBuffer(4 * KiB, 4)], // inside the trimmed range
  ];
  for (const [off, data] of marks) await writeAt(img, off, data);
  const srv = await serve(t, [img, '--name', 'sparse']);

  const R = await libnbdScenario<Record<string, Attempt>>(
    `
    G = 1024 ** 3
    h = conn(A['uri'])
    R['zero_1g'] = attempt(lambda: h.zero(G, 4096))
    R['trim_1g'] = attempt(lambda: h.trim(G - 8192, G + 8192))
    R['read_zeroed'] = attempt(lambda: h.pread(4096, 100 * 1024 * 1024))
    R['read_first'] = attempt(lambda: h.pread(4096, 0))
    R['read_between'] = attempt(lambda: h.pread(4096, G + 4096))
    R['bs_1g'] = attempt(lambda: extents(h, G, 4096))
    R['bs_2g_minus'] = attempt(lambda: extents(h, 2 * G - 4096, 4096))
    R['zero_64m_nohole'] = attempt(lambda: h.zero(64 * 1024 * 1024, 8192, flags=nbd.CMD_FLAG_NO_HOLE))
    R['read_after'] = attempt(lambda: h.pread(4096, 0))
    close(h)
    `,
    { uri: srv.uri('sparse') },
  );
  succeeded(t, R.zero_1g, '1 GiB write-zeroes');
  succeeded(t, R.trim_1g, '1 GiB trim');
  readMatches(t, R.read_zeroed, sha256(Buffer.alloc(4096)), 'data inside the zeroed range reads as zeroes');
  readMatches(t, R.read_first, sha256(marks[0]![1]), 'data before the zeroed range is intact');
  readMatches(t, R.read_between, sha256(marks[2]![1]), 'data between the zeroed and trimmed ranges is intact');
  readMatches(t, R.read_after, sha256(marks[0]![1]), 'connection still works');
  succeeded(t, R.zero_64m_nohole, '64 MiB write-zeroes with NO_HOLE');

  t.ok(allBytes(await readAt(img, 4096, 4096), 0), 'file: zeroed range is zero');
  t.ok(allBytes(await readAt(img, 100 * MiB, 4096), 0), 'file: mark inside the zeroed range is gone');
  t.ok((await readAt(img, GiB + 4 * KiB, 4096)).equals(marks[2]![1]), 'file: mark between ranges is intact');

  for (const key of ['bs_1g', 'bs_2g_minus'] as const) {
    const a = R[key];
    succeeded(t, a, `block status ${key}`);
    if (a?.ok) {
      const replies = a.value as [number, [number, number][]][];
      t.equal(replies.length, 1, `${key}: one base:allocation reply`);
      const ext = replies[0]?.[1] ?? [];
      const total = ext.reduce((n, [len]) => n + len, 0);
      t.ok(ext.length > 0 && total > 0, `${key}: at least one extent`, { ext: ext.slice(0, 8) });
      t.ok(total <= (key === 'bs_1g' ? GiB : 2 * GiB - 4096), `${key}: extents do not exceed the request`, { total });
      t.ok(((ext[0]?.[1] ?? 0) & 2) === 2, `${key}: first extent (after zero/trim) reads as zero`, {
        ext: ext.slice(0, 8),
      });
    }
  }
});

t.test('block status with REQ_ONE returns exactly one extent', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB);
  await writeAt(img, 0, patternBuffer(64 * KiB, 1));
  await writeAt(img, MiB, patternBuffer(4 * KiB, 2));
  const srv = await serve(t, [img, '--name', 'vm1']);
  const R = await libnbdScenario<Record<string, Attempt>>(
    `
    M = 1024 * 1024
    h = conn(A['uri'], strict=None)
    R['one_data'] = attempt(lambda: extents(h, M, 0, nbd.CMD_FLAG_REQ_ONE))
    R['one_hole'] = attempt(lambda: extents(h, M, 65536, nbd.CMD_FLAG_REQ_ONE))
    R['one_short'] = attempt(lambda: extents(h, 1000, 2 * M, nbd.CMD_FLAG_REQ_ONE))
    def full():
        out, off, size = [], 0, h.get_size()
        while off < size:
            r = extents(h, size - off, off)
            for length, flags in r[0][1]:
                out.append([off, length, flags])
                off += length
        return out
    R['full'] = attempt(full)
    close(h)
    `,
    { uri: srv.uri('vm1') },
  );
  const one = (a: Attempt | undefined): [number, number][] =>
    a?.ok ? ((a.value as [number, [number, number][]][])[0]?.[1] ?? []) : [];
  succeeded(t, R.one_data, 'REQ_ONE at a data extent');
  t.equal(one(R.one_data).length, 1, 'REQ_ONE: exactly one extent', { got: R.one_data });
  t.ok((one(R.one_data)[0]?.[0] ?? 0) > 0 && (one(R.one_data)[0]?.[0] ?? 0) <= 64 * KiB, 'extent within the data', {
    got: R.one_data,
  });
  t.equal(one(R.one_data)[0]?.[1], 0, 'the extent is data');

  succeeded(t, R.one_hole, 'REQ_ONE at a hole');
  t.equal(one(R.one_hole).length, 1, 'REQ_ONE: exactly one extent', { got: R.one_hole });
  t.ok(
    (one(R.one_hole)[0]?.[0] ?? 0) > 0 && (one(R.one_hole)[0]?.[0] ?? 0) <= MiB - 64 * KiB,
    'hole extent ends at or before the next data',
    { got: R.one_hole },
  );
  t.equal(one(R.one_hole)[0]?.[1], 3, 'the extent is hole,zero');

  succeeded(t, R.one_short, 'REQ_ONE with a 1000-byte request');
  t.same(one(R.one_short), [[1000, 3]], 'extent length clipped to the request length');

  succeeded(t, R.full, 'full walk without REQ_ONE');
  if (R.full?.ok) {
    const merged: [number, number, number][] = [];
    for (const [off, len, flags] of R.full.value as [number, number, number][]) {
      const last = merged[merged.length - 1];
      if (last && last[2] === flags && last[0] + last[1] === off) last[1] += len;
      else merged.push([off, len, flags]);
    }
    t.same(
      merged,
      [
        [0, 64 * KiB, 0],
        [64 * KiB, MiB - 64 * KiB, 3],
        [MiB, 4 * KiB, 0],
        [MiB + 4 * KiB, 3 * MiB - 4 * KiB, 3],
      ],
      'full allocation map',
    );
  }
});

async function writeTemp(dir: string, name: string, data: Buffer): Promise<string> {
  const p = join(dir, name);
  await makeImage(p, 0);
  await writeAt(p, 0, data);
  return p;
}
