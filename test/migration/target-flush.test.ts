// Power loss on the destination (issue 12.2 follow-up): a mirror may record a
// block as copied only once a flush of the target (NBD_CMD_FLUSH), sent after
// the target acknowledged that block, has completed. The target here is nbdkit
// with the cache filter in writeback mode: writes stay in nbdkit's cache and
// reach the image file only on a flush, so killing nbdkit (SIGKILL) loses every
// write that was not flushed, as a power loss of the destination would.
//   1. The stored bitmap (what a resume trusts) never calls a block copied that
//      the destination's image does not hold: after the source and then the
//      destination are killed, every clean block of the stored bitmap is the
//      source's data in the destination's image.
//   2. A destination that loses power and comes back while the job runs (the
//      job reconnects) ends up with the whole disk: what it acknowledged but
//      never flushed is copied again.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { adminRequest, jobStatus, waitForJob } from '../helpers/admin.js';
import { describeRun } from '../helpers/tools.js';
import { makeImage, MiB, patternBuffer, startServer, tmpDir, writeAt, type ServerHandle } from '../helpers/server.js';
import { compare, freePort, nbdkit, type Proc } from './harness.js';
import { StateFolder } from '../../src/dirty/state.js';
import { readRecovered } from '../../src/dirty/activity-log.js';
import { DEFAULT_GRANULARITY } from '../../src/dirty/bitmap.js';

const SIZE = 32 * MiB;
const G = DEFAULT_GRANULARITY;

async function setup(t: Tap.Test) {
  const dir = await tmpDir(t, 'nbd-migrate-tflush-');
  const src = await makeImage(path.join(dir, 'src.img'), SIZE);
  // Data everywhere, different in every block (a block of zeros would match an empty destination).
  for (let off = 0; off < SIZE; off += 4 * MiB) await writeAt(src, off, patternBuffer(4 * MiB, off / MiB + 1));
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const port = await freePort();
  const peers = new Set<Proc>();
  const servers = new Set<ServerHandle>();
  t.teardown(async () => {
    for (const s of servers) await s.stop();
    for (const p of peers) await p.stop();
  });
  const startTarget = async () => {
    const p = await nbdkit(port, ['--filter=cache', 'file', dst, 'cache=writeback']);
    peers.add(p);
    return p;
  };
  const admin = path.join(dir, 'admin.sock');
  const startSource = async () => {
    const s = await startServer([src, '--name', 'vm1', '--admin-socket', admin, '--log-level', 'debug']);
    servers.add(s);
    return s;
  };
  return { dir, src, dst, port, admin, target: `nbd://127.0.0.1:${port}/`, startTarget, startSource, servers, peers };
}

t.test('the stored progress never counts a block the destination had not flushed', async (t) => {
  const e = await setup(t);
  const nbd = await e.startTarget();
  const s = await e.startSource();
  await adminRequest(e.admin, { cmd: 'mirror', export: 'vm1', target: e.target, cutover: 'manual', maxBandwidth: '6M' });
  // Two saves with progress: the second one stores blocks copied after the first.
  let saves = 0;
  const saved = await s.waitForLog((l) => l.event === 'mirror-progress-saved' && (l.bytesCopied as number) >= 6 * MiB && ++saves >= 2, 60_000);
  t.ok((saved.targetFlushes as number) >= 1, `the target was flushed before the progress was saved (${saved.targetFlushes} flushes)`);
  // The source crashes, then the destination loses power: nbdkit's unflushed cache is gone.
  s.proc.kill('SIGKILL');
  await new Promise<void>((r) => (s.exited() ? r() : s.proc.once('exit', () => r())));
  e.servers.delete(s);
  await nbd.stop();
  e.peers.delete(nbd);

  const { bitmap } = readRecovered(StateFolder.open(`${e.src}.nbd-migrate.d`), SIZE, G);
  const blocks = SIZE / G;
  const clean = blocks - bitmap.dirtyBlocks();
  t.ok(clean >= (6 * MiB) / G, `the stored bitmap records progress (${clean} of ${blocks} blocks copied)`);
  const fs_ = { src: fs.openSync(e.src, 'r'), dst: fs.openSync(e.dst, 'r') };
  const a = Buffer.alloc(G);
  const b = Buffer.alloc(G);
  const missing: number[] = [];
  try {
    for (let blk = 0; blk < blocks; blk++) {
      if (bitmap.isDirty(blk)) continue;
      fs.readSync(fs_.src, a, 0, G, blk * G);
      fs.readSync(fs_.dst, b, 0, G, blk * G);
      if (!a.equals(b)) missing.push(blk);
    }
  } finally {
    fs.closeSync(fs_.src);
    fs.closeSync(fs_.dst);
  }
  t.same(missing.slice(0, 8), [], `every block stored as copied is on the destination's disk (${missing.length} of ${clean} are not)`);
});

t.test('a destination that loses power mid-mirror and comes back gets again what it had not flushed', async (t) => {
  const e = await setup(t);
  let nbd = await e.startTarget();
  const s = await e.startSource();
  await adminRequest(e.admin, { cmd: 'mirror', export: 'vm1', target: e.target, cutover: 'manual', maxBandwidth: '8M', maxRetries: 20 });
  await s.waitForLog((l) => l.event === 'mirror-progress-saved' && (l.bytesCopied as number) >= 4 * MiB, 60_000);
  // Power loss on the destination a moment after a save: some blocks are acknowledged and not flushed.
  const before = await jobStatus(e.admin, 'vm1');
  await waitForJob(e.admin, 'vm1', (j) => j.dataBytes >= before.dataBytes + MiB, { what: 'more copies after the save' });
  await nbd.stop();
  e.peers.delete(nbd);
  await s.waitForLog((l) => l.event === 'mirror-retry', 20_000);
  nbd = await e.startTarget();
  await s.waitForLog((l) => l.event === 'target-connected' && l.reconnect === true, 30_000);
  await adminRequest(e.admin, { cmd: 'set-speed', export: 'vm1', rate: 0 });
  await waitForJob(e.admin, 'vm1', (j) => j.state === 'ready', { what: 'the job to catch up again' });
  await adminRequest(e.admin, { cmd: 'cutover', export: 'vm1' });
  const done = await waitForJob(e.admin, 'vm1', (j) => j.state === 'completed', { what: 'the cutover' });
  t.equal(done.state, 'completed');
  await s.stop();
  e.servers.delete(s);
  await nbd.stop(); // the cutover flushed the target: its image holds everything
  e.peers.delete(nbd);
  const cmp = await compare(e.src, e.dst);
  t.equal(cmp.code, 0, `the destination's disk holds the whole source after the power loss\n${describeRun(cmp)}`);
});
