// Crash-safe dirty tracking (issue 12.1), proved against a model: a writer
// keeps 32 random 4 KiB writes in flight and records every offset it sent and
// every one the server acknowledged; the server is killed with SIGKILL at a
// random moment (a chosen number of acknowledgements), 20 rounds in a row on
// the same image and state folder, with a clean SIGTERM every fifth round.
// After each stop the state folder is read with the module itself
// (readRecovered) and, after the restart, through the admin socket:
//   - every block acknowledged since the image was created is dirty (the
//     bitmap is never cleared here: no mirror runs, so creation is the last
//     clean point);
//   - nothing is dirty that was never sent (the extent is 64 KiB, one bit,
//     so the log's over-report is exactly the writes in flight);
//   - the log (1018 extents, --activity-log-extents) fills and checkpoints many
//     times on the way
//     (about 1,400 new blocks per round).
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../src/client/nbd-client.js';
import { readRecovered, SLOT_CAPACITY } from '../../src/dirty/activity-log.js';
import { StateFolder } from '../../src/dirty/state.js';
import { adminRequest } from '../helpers/admin.js';
import { GiB, KiB, makeImage, startServer, tmpDir, type ServerHandle } from '../helpers/server.js';

const SIZE = 4 * GiB;
const GRAN = 64 * KiB;
const BLOCKS = SIZE / GRAN;
const ROUNDS = 20;
const QD = 32;

/** A small deterministic PRNG (xorshift32), so a failing round can be replayed from its seed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

t.test('kill -9 in a loop: every acknowledged write is dirty after the restart, nothing unsent is', async (t) => {
  const dir = await tmpDir(t, 'nbd-migrate-dirty-crash-');
  const image = await makeImage(path.join(dir, 'vm1.img'), SIZE);
  const stateDir = `${image}.nbd-migrate.d`;
  const admin = path.join(dir, 'admin.sock');
  const seed = Number(process.env.CRASH_SEED ?? Date.now() % 100000);
  t.comment(`seed ${seed} (CRASH_SEED replays)`);
  const rand = rng(seed);
  const acked = new Set<number>();
  const sent = new Set<number>();
  let server: ServerHandle | undefined;
  t.teardown(() => server?.stop());

  for (let round = 1; round <= ROUNDS; round++) {
    const clean = round % 5 === 0;
    server = await startServer([image, '--name', 'vm1', '--admin-socket', admin, '--activity-extent', '64K', '--activity-log-extents', String(SLOT_CAPACITY), '--dirty-granularity', '64K']);
    const recoveredLine = await server.waitForLog((e) => e.event === 'dirty-recovered');
    // After the restart the server holds what the files said (checked below, before this round's writes).
    const st = (await adminRequest(admin, { cmd: 'status' })) as { exports: Array<{ name: string; dirtyBlocks: number }> };
    const before = readRecovered(StateFolder.open(stateDir), SIZE, GRAN).bitmap;
    t.equal(st.exports[0]!.dirtyBlocks, before.dirtyBlocks(), `round ${round}: the restarted server serves the recovered bitmap (${before.dirtyBlocks()} blocks)`);
    if (round > 1) t.equal(recoveredLine.clean, (round - 1) % 5 === 0, `round ${round}: dirty-recovered says clean=${recoveredLine.clean}`);

    const client = await NbdClient.connect(server.uri('vm1'));
    const target = 300 + Math.floor(rand() * 2500);
    const payload = Buffer.alloc(4 * KiB, round);
    let inflight = 0;
    let roundAcks = 0;
    let stopping = false;
    const proc = server.proc;
    const exited = new Promise<void>((r) => proc.once('exit', () => r()));
    await new Promise<void>((resolve) => {
      const pump = () => {
        while (!stopping && inflight < QD) {
          const block = Math.floor(rand() * BLOCKS);
          const offset = block * GRAN + Math.floor(rand() * 16) * 4 * KiB;
          sent.add(block);
          inflight++;
          client.write(offset, [payload], { fua: false }).then(
            () => {
              inflight--;
              if (stopping) return; // answered after we pulled the plug: not counted, it may or may not be dirty
              acked.add(block);
              if (++roundAcks >= target) {
                stopping = true;
                if (clean) proc.kill('SIGTERM');
                else proc.kill('SIGKILL');
                resolve();
              } else pump();
            },
            () => {
              inflight--;
            },
          );
        }
      };
      pump();
    });
    await exited;
    client.destroy();
    server = undefined;

    const { bitmap, recovery } = readRecovered(StateFolder.open(stateDir), SIZE, GRAN);
    const lost = [...acked].filter((b) => !bitmap.isDirty(b));
    t.same(lost.slice(0, 10), [], `round ${round} (${clean ? 'SIGTERM' : 'SIGKILL'} after ${roundAcks} acks): every acknowledged block is dirty (${lost.length} lost)`);
    let extra = 0;
    for (let run = bitmap.nextRun(0, BLOCKS); run; run = bitmap.nextRun(run.block + run.count, BLOCKS))
      for (let b = run.block; b < run.block + run.count; b++) if (!sent.has(b)) extra++;
    t.equal(extra, 0, `round ${round}: nothing dirty that was never sent (dirty ${bitmap.dirtyBlocks()}, acked ${acked.size}, sent ${sent.size})`);
    if (clean) t.equal(recovery.logExtents, 0, `round ${round}: a clean stop empties the log`);
    t.ok(recovery.logExtents <= SLOT_CAPACITY);
  }
  t.ok(acked.size > SLOT_CAPACITY * 4, `the writes (${acked.size} blocks) overflowed the log many times over`);
});

t.test('where the state folder goes: beside the image, --state-dir DIR/<name>, state-dir= per export; none with --no-activity-log', async (t) => {
  const dir = await tmpDir(t, 'nbd-migrate-state-dir-');
  const a = await makeImage(path.join(dir, 'a.img'), 64 * KiB * 16);
  const b = await makeImage(path.join(dir, 'b.img'), 64 * KiB * 16);
  const c = await makeImage(path.join(dir, 'c.img'), 64 * KiB * 16);
  const parent = path.join(dir, 'states');
  const own = path.join(dir, 'own-b');
  const s = await startServer(['--export', `a=${a}`, '--export', `b=${b},state-dir=${own}`, '--state-dir', parent]);
  const lines = await Promise.all(['a', 'b'].map((n) => s.waitForLog((e) => e.event === 'dirty-recovered' && e.export === n)));
  t.equal(lines[0]!.stateDir, path.join(parent, 'a'), '--state-dir DIR puts export a in DIR/a');
  t.equal(lines[1]!.stateDir, own, 'state-dir= names export b\'s own folder');
  const client = await NbdClient.connect(s.uri('a'));
  await client.write(0, [Buffer.alloc(4096, 1)], { fua: false });
  await client.close();
  await s.stop();
  const rec = readRecovered(StateFolder.open(path.join(parent, 'a')), 64 * KiB * 16, GRAN);
  t.ok(rec.bitmap.isDirty(0) && rec.recovery.logExtents === 0, 'the clean stop stored the exact bitmap there');
  const beside = await startServer([c, '--name', 'c']);
  await beside.stop();
  t.ok(fs.existsSync(path.join(`${c}.nbd-migrate.d`, 'dirty.bitmap')), 'by default: IMAGE.nbd-migrate.d beside the image');
  fs.rmSync(`${c}.nbd-migrate.d`, { recursive: true });
  const off = await startServer([c, '--name', 'c', '--no-activity-log']);
  await off.stop();
  t.notOk(fs.existsSync(`${c}.nbd-migrate.d`) && fs.existsSync(path.join(`${c}.nbd-migrate.d`, 'dirty.bitmap')), '--no-activity-log keeps nothing');
});
