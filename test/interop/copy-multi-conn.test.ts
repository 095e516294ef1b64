// `nbd-migrate copy` with several connections (issue 14, multi-conn): only to a server
// that advertises NBD_FLAG_CAN_MULTI_CONN, a flush on every connection at the end, a
// server that takes fewer connections than asked for is no failure, an error on any
// connection fails the copy. Connections are counted by a pass-through proxy
// (test/helpers/delay-proxy.ts with no delay) between the copier and the server.

import t from 'tap';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { startDelayProxy } from '../helpers/delay-proxy.js';
import { freePort } from '../helpers/net.js';
import { compare, nbdkit, qemuNbd } from '../helpers/peers.js';
import { CLI, MiB, makeImage, patternBuffer, REPO_ROOT, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

await requireTool('nbdkit', 'nbdkit');
await requireTool('qemu-img', 'qemu-utils');

const SIZE = 64 * MiB;

/**
 * A source with data and holes: 6 MiB of pattern every 8 MiB (50 MiB of data with the odd run, more than one
 * 32 MiB copy window), one odd run across a hole and a chunk boundary.
 */
async function source(dir: string): Promise<string> {
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  for (let at = 0; at < SIZE; at += 8 * MiB) await writeAt(src, at, patternBuffer(6 * MiB, at / MiB + 1));
  await writeAt(src, 6 * MiB - 4096, patternBuffer(3 * MiB, 99));
  return src;
}

/** Runs `nbd-migrate copy SRC nbd://proxy/NAME` with `extra` options; the proxy counts connections. */
async function copyThroughProxy(t: Tap.Test, src: string, port: number, name: string, extra: string[]) {
  const proxy = await startDelayProxy({ targetHost: '127.0.0.1', targetPort: port, delayMs: 0, bandwidth: 1e12 });
  t.teardown(() => proxy.close());
  // tap's loader must not leak into the CLI (see test/helpers/server.ts).
  const r = await run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, 'copy', src, proxy.uri(name), '--no-progress', '--log-level', 'debug', ...extra], {
    timeoutMs: 120_000,
    cwd: REPO_ROOT,
  });
  const events = r.stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { event: string; connection?: number; cause?: string });
  return { r, connections: proxy.stats.connections, events };
}

t.test('multi-conn advertised (nbdkit file): 4 connections, a flush on each, the copy equals the source', async (t) => {
  const dir = await tmpDir(t);
  const src = await source(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE, { fill: 0x77 });
  const logfile = join(dir, 'nbdkit.log');
  const port = await freePort();
  // Every write and zero takes 300 ms at the target (wdelay covers both). The source's 50 MiB of data is more than the
  // copy's 32 MiB window, so a third of it can only be sent once the first writes are answered, 300 ms on: by then the
  // others have joined (a handshake, ~1 ms quiet, tens of ms on a busy host), and it must go to them. With data that fit
  // in one window (35 MiB with the odd run, before) a host busy with benchmarks sent it all before the others joined,
  // which is right, but says nothing about spreading.
  const k = await nbdkit(port, ['--filter=log', '--filter=delay', 'file', dst, `logfile=${logfile}`, 'wdelay=300ms']);
  t.teardown(() => k.stop());
  const { r, connections, events } = await copyThroughProxy(t, src, port, '', ['--connections', '4']);
  t.equal(r.code, 0, describeRun(r));
  t.equal(connections, 4, 'four connections were opened');
  t.equal(events.filter((e) => e.event === 'multi-conn-joined').length, 3, 'three joined the first');
  const log = await readFile(logfile, 'utf8');
  const writers = new Set([...log.matchAll(/connection=(\d+) (?:Write|Zero) /g)].map((m) => m[1]));
  t.ok(writers.size >= 2, `writes went over several connections (${[...writers].join(', ')})`);
  const flushed = new Set([...log.matchAll(/connection=(\d+) Flush /g)].map((m) => m[1]));
  t.equal(flushed.size, 4, 'every connection was flushed');
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, `qemu-img compare: ${describeRun(cmp)}`);
});

t.test('multi-conn not advertised: one connection, whatever --connections says', async (t) => {
  const dir = await tmpDir(t);
  const src = await source(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE, { fill: 0x77 });
  const port = await freePort();
  const k = await nbdkit(port, ['--filter=multi-conn', 'file', dst, 'multi-conn-mode=disable']);
  t.teardown(() => k.stop());
  const { r, connections } = await copyThroughProxy(t, src, port, '', ['--connections', '4']);
  t.equal(r.code, 0, describeRun(r));
  t.equal(connections, 1, 'one connection');
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, `qemu-img compare: ${describeRun(cmp)}`);
});

t.test('a server taking fewer connections than asked for: refused (nbdkit limit=2) or never accepted (qemu-nbd --shared=2)', async (t) => {
  const dir = await tmpDir(t);
  const src = await source(dir);
  {
    const dst = await makeImage(join(dir, 'dst1.img'), SIZE, { fill: 0x77 });
    const port = await freePort();
    const k = await nbdkit(port, ['--filter=limit', 'file', dst, 'limit=2']);
    t.teardown(() => k.stop());
    const { r, events } = await copyThroughProxy(t, src, port, '', ['--connections', '4']);
    t.equal(r.code, 0, describeRun(r));
    t.equal(events.filter((e) => e.event === 'multi-conn-joined').length, 1, 'one joined the first');
    t.equal(events.filter((e) => e.event === 'multi-conn-join-failed').length, 2, 'two could not join, and said so');
    t.equal((await compare(src, dst)).code, 0, 'the copy equals the source');
  }
  {
    const dst = await makeImage(join(dir, 'dst2.img'), SIZE, { fill: 0x77 });
    const port = await freePort();
    const q = await qemuNbd(dst, 'vm1', port, ['--shared=2']);
    t.teardown(() => q.stop());
    const { r, events } = await copyThroughProxy(t, src, port, 'vm1', ['--connections', '4']);
    t.equal(r.code, 0, describeRun(r));
    t.ok(events.filter((e) => e.event === 'multi-conn-joined').length <= 1, 'at most one joined the first');
    t.equal((await compare(src, dst)).code, 0, 'the copy equals the source');
  }
});

t.test('an error on any connection fails the copy, clearly', async (t) => {
  const dir = await tmpDir(t);
  const src = await source(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const k = await nbdkit(port, ['--filter=error', 'file', dst, 'error=EIO', 'error-pwrite-rate=100%']);
  t.teardown(() => k.stop());
  const { r, connections, events } = await copyThroughProxy(t, src, port, '', ['--connections', '4']);
  t.equal(r.code, 1, 'exit 1');
  t.ok(connections > 1, 'several connections');
  const fatal = events.find((e) => e.event === 'fatal');
  t.match(fatal?.cause, /write \d+\+\d+ failed: EIO/, `one fatal line naming the failed write: ${fatal?.cause}`);
});

t.test('NBD to NBD: both handshakes at once, not one after the other', async (t) => {
  const dir = await tmpDir(t);
  const src = await source(dir);
  const dst = await makeImage(join(dir, 'dst.img'), SIZE, { fill: 0x77 });
  const [sp, dp] = [await freePort(), await freePort()];
  const ks = await nbdkit(sp, ['-r', 'file', src]);
  t.teardown(() => ks.stop());
  const kd = await nbdkit(dp, ['file', dst]);
  t.teardown(() => kd.stop());
  // The source is far away (150 ms one way): its greeting alone takes 150 ms to arrive.
  const far = await startDelayProxy({ targetHost: '127.0.0.1', targetPort: sp, delayMs: 150, bandwidth: 1e12 });
  t.teardown(() => far.close());
  const seen: number[] = [];
  const near = await startDelayProxy({ targetHost: '127.0.0.1', targetPort: dp, delayMs: 0, bandwidth: 1e12, onConnection: () => seen.push(far.stats.toClient) });
  t.teardown(() => near.close());
  const r = await run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, 'copy', far.uri(''), near.uri(''), '--no-progress', '--connections', '1'], {
    timeoutMs: 120_000,
    cwd: REPO_ROOT,
  });
  t.equal(r.code, 0, describeRun(r));
  t.equal(seen.length, 1, 'one connection to the destination');
  // Before: the destination was dialled once the source's handshake was over (greeting and all its replies received).
  t.equal(seen[0], 0, 'the destination was dialled before any of the source\'s handshake had arrived');
  t.equal((await compare(src, dst)).code, 0, 'the copy equals the source');
});
