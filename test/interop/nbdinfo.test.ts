// nbdinfo (Debian libnbd-bin) against nbd-migrate: export listing with
// descriptions, allocation map of a sparse image, advertised flags and block
// sizes, export size, and the default ("") export.

import t from 'tap';
import { join } from 'node:path';
import { KiB, MiB, makeImage, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');

interface InfoExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  contexts?: string[];
  is_read_only?: boolean;
  can_cache?: boolean;
  can_df?: boolean;
  can_fast_zero?: boolean;
  can_flush?: boolean;
  can_fua?: boolean;
  can_multi_conn?: boolean;
  can_trim?: boolean;
  can_zero?: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}
interface InfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: InfoExport[];
}

async function nbdinfoJson(args: string[]): Promise<InfoJson> {
  const r = await run(nbdinfo, ['--json', ...args], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`nbdinfo failed: ${describeRun(r)}`);
  return JSON.parse(r.stdout) as InfoJson;
}

const SIZE_VM1 = 16 * MiB;
const SIZE_DATA = 3 * MiB + 12345; // deliberately not a multiple of 512
const SIZE_RO = 8 * MiB;

t.test('nbdinfo against a server with several exports', async (t) => {
  const dir = await tmpDir(t);
  const vm1 = await makeImage(join(dir, 'vm1.img'), SIZE_VM1);
  // Sparse image: data at [1M, 2M) and [8M, 8M+4K), holes elsewhere.
  await writeAt(vm1, 1 * MiB, patternBuffer(1 * MiB, 1));
  await writeAt(vm1, 8 * MiB, patternBuffer(4 * KiB, 2));
  const data = await makeImage(join(dir, 'data.img'), SIZE_DATA, { fill: 'random' });
  const ro = await makeImage(join(dir, 'ro.img'), SIZE_RO, { fill: 0x42 });
  const srv = await serve(t, [
    vm1,
    '--name',
    'vm1',
    '--description',
    'First disk',
    '--export',
    `data=${data},description=Second disk`,
    '--export',
    `ro=${ro},read-only`,
  ]);

  t.test('--list names every export with its description', async (t) => {
    const info = await nbdinfoJson(['--list', srv.uri('')]);
    t.equal(info.protocol, 'newstyle-fixed', 'fixed newstyle protocol');
    t.equal(info.TLS, false);
    const names = info.exports.map((e) => e['export-name']).sort();
    t.same(names, ['data', 'ro', 'vm1'], 'all three exports listed');
    const byName = new Map(info.exports.map((e) => [e['export-name'], e]));
    t.equal(byName.get('vm1')?.description, 'First disk', 'vm1 description');
    t.equal(byName.get('data')?.description, 'Second disk', 'data description');
    t.notOk(byName.get('ro')?.description, 'ro has no description');
    t.equal(byName.get('vm1')?.['export-size'], SIZE_VM1, 'vm1 size');
    t.equal(byName.get('data')?.['export-size'], SIZE_DATA, 'data size');
    t.equal(byName.get('ro')?.['export-size'], SIZE_RO, 'ro size');
    t.equal(byName.get('ro')?.is_read_only, true, 'ro is read-only');
    t.equal(byName.get('vm1')?.is_read_only, false, 'vm1 is writable');

    // The human-readable listing too.
    const r = await run(nbdinfo, ['--list', srv.uri('')], { timeoutMs: 60_000 });
    t.equal(r.code, 0, 'nbdinfo --list exits 0', { output: describeRun(r) });
    t.match(r.stdout, /export="vm1":\s*\n\s*description: First disk/);
    t.match(r.stdout, /export="data":\s*\n\s*description: Second disk/);
    t.match(r.stdout, /export="ro":/);
  });

  t.test('--map reports holes as hole,zero and data as data', async (t) => {
    const expected = [
      { offset: 0, length: 1 * MiB, type: 3, description: 'hole,zero' },
      { offset: 1 * MiB, length: 1 * MiB, type: 0, description: 'data' },
      { offset: 2 * MiB, length: 6 * MiB, type: 3, description: 'hole,zero' },
      { offset: 8 * MiB, length: 4 * KiB, type: 0, description: 'data' },
      { offset: 8 * MiB + 4 * KiB, length: SIZE_VM1 - 8 * MiB - 4 * KiB, type: 3, description: 'hole,zero' },
    ];
    const r = await run(nbdinfo, ['--map', '--json', srv.uri('vm1')], { timeoutMs: 60_000 });
    t.equal(r.code, 0, 'nbdinfo --map --json exits 0', { output: describeRun(r) });
    const raw = JSON.parse(r.stdout) as { offset: number; length: number; type: number; description: string }[];
    // Merge adjacent extents of the same type (a server may split them).
    const merged: typeof raw = [];
    for (const e of raw) {
      const last = merged[merged.length - 1];
      if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
      else merged.push({ ...e });
    }
    t.same(merged, expected, 'map of the sparse image');

    const text = await run(nbdinfo, ['--map', srv.uri('vm1')], { timeoutMs: 60_000 });
    t.equal(text.code, 0, 'nbdinfo --map exits 0', { output: describeRun(text) });
    t.match(text.stdout, /^\s*0\s+1048576\s+3\s+hole,zero$/m);
    t.match(text.stdout, /^\s*1048576\s+1048576\s+0\s+data$/m);
    t.match(text.stdout, /^\s*8388608\s+4096\s+0\s+data$/m);

    // --map --totals: 1 MiB + 4 KiB of data.
    const totals = await run(nbdinfo, ['--map', '--totals', srv.uri('vm1')], { timeoutMs: 60_000 });
    t.equal(totals.code, 0, 'nbdinfo --map --totals exits 0', { output: describeRun(totals) });
    t.match(totals.stdout, new RegExp(`^\\s*${MiB + 4 * KiB}\\s+[\\d.]+%\\s+0\\s+data$`, 'm'));
    t.match(totals.stdout, new RegExp(`^\\s*${SIZE_VM1 - MiB - 4 * KiB}\\s+[\\d.]+%\\s+3\\s+hole,zero$`, 'm'));
  });

  t.test('flags, meta contexts and block sizes', async (t) => {
    const info = await nbdinfoJson([srv.uri('vm1')]);
    t.equal(info.protocol, 'newstyle-fixed');
    t.equal(info.structured, true, 'structured replies negotiated');
    t.equal(info.exports.length, 1);
    const e = info.exports[0]!;
    t.equal(e['export-name'], 'vm1');
    t.equal(e['export-size'], SIZE_VM1);
    t.equal(e.block_size_minimum, 1, 'block_size_minimum 1');
    t.equal(e.block_size_preferred, 4096, 'block_size_preferred 4096');
    t.equal(e.block_size_maximum, 33554432, 'block_size_maximum 32 MiB');
    t.ok(e.contexts?.includes('base:allocation'), 'base:allocation meta context');
    t.match(
      e,
      {
        is_read_only: false,
        can_cache: true,
        can_df: true,
        can_fast_zero: true,
        can_flush: true,
        can_fua: true,
        can_multi_conn: true,
        can_trim: true,
        can_zero: true,
      },
      'advertised transmission flags',
    );

    const roInfo = await nbdinfoJson([srv.uri('ro')]);
    t.equal(roInfo.exports[0]?.is_read_only, true, 'read-only export is advertised read-only');
    t.equal(roInfo.exports[0]?.['export-size'], SIZE_RO);
  });

  t.test('--size', async (t) => {
    for (const [name, size] of [
      ['vm1', SIZE_VM1],
      ['data', SIZE_DATA],
      ['ro', SIZE_RO],
    ] as const) {
      const r = await run(nbdinfo, ['--size', srv.uri(name)], { timeoutMs: 60_000 });
      t.equal(r.code, 0, `nbdinfo --size ${name} exits 0`, { output: describeRun(r) });
      t.equal(r.stdout.trim(), String(size), `size of ${name}`);
    }
    // The empty export name maps to the first export.
    const d = await run(nbdinfo, ['--size', srv.uri('')], { timeoutMs: 60_000 });
    t.equal(d.code, 0, 'nbdinfo --size of the default export exits 0', { output: describeRun(d) });
    t.equal(d.stdout.trim(), String(SIZE_VM1), 'default export "" is the first export');

    // An unknown export name is refused.
    const bad = await run(nbdinfo, ['--size', srv.uri('no-such-export')], { timeoutMs: 60_000 });
    t.not(bad.code, 0, 'unknown export is refused');
  });
});
