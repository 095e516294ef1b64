// nbd-client (Debian nbd-client, the reference client) lists the exports of
// nbd-migrate with NBD_OPT_LIST. This nbd-client (3.24) takes the port as a
// positional argument after the host: `nbd-client -l HOST PORT` (-p means
// "persist", not "port"). Listing needs no kernel nbd device.

import t from 'tap';
import { join } from 'node:path';
import { MiB, makeImage, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

const nbdClient = await requireTool('nbd-client', 'nbd-client');

t.test('nbd-client -l lists every export', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(join(dir, 'a.img'), 4 * MiB);
  const b = await makeImage(join(dir, 'b.img'), 2 * MiB);
  const c = await makeImage(join(dir, 'c.img'), 1 * MiB);
  const srv = await serve(t, [
    a,
    '--name',
    'vm1',
    '--description',
    'Primary disk',
    '--export',
    `scratch=${b},description=Scratch space`,
    '--export',
    `iso=${c},read-only`,
  ]);

  const r = await run(nbdClient, ['-l', '127.0.0.1', String(srv.newstylePort)], { timeoutMs: 30_000 });
  t.equal(r.code, 0, 'nbd-client -l exits 0', { output: describeRun(r) });
  const lines = r.stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('Negotiation'));
  const names = lines.map((l) => l.split(':')[0]!.trim()).sort();
  t.same(names, ['iso', 'scratch', 'vm1'], 'all three exports listed', { output: describeRun(r) });
  t.ok(lines.includes('vm1: Primary disk'), 'vm1 listed with its description', { lines });
  t.ok(lines.includes('scratch: Scratch space'), 'scratch listed with its description', { lines });
  t.ok(lines.includes('iso'), 'iso listed without a description', { lines });
});

t.test('nbd-client -l with a single export', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(join(dir, 'only.img'), MiB);
  const srv = await serve(t, [a, '--name', 'only']);
  const r = await run(nbdClient, ['-l', '127.0.0.1', String(srv.newstylePort)], { timeoutMs: 30_000 });
  t.equal(r.code, 0, 'nbd-client -l exits 0', { output: describeRun(r) });
  const lines = r.stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('Negotiation'));
  t.same(lines, ['only'], 'exactly the one export', { output: describeRun(r) });
});
