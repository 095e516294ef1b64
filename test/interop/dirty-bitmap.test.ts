// Checkpoints as qemu:dirty-bitmap:NAME against the real tools: nbdinfo --map and
// qemu-img map x-dirty-bitmap show exactly the changed ranges, the same as qemu-nbd -B
// on a qcow2 persistent bitmap made by `qemu-img bitmap --add` after the same changes;
// LIST and SET of the qemu: namespaces answer as qemu-nbd's; checkpoints persist across a
// clean restart (exact) and a kill -9 (the stored bits plus the activity log's extents; every
// block when the crashed run kept no activity log).
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { libnbdScenario } from '../helpers/libnbd.js';
import { qemuNbd } from '../helpers/peers.js';
import { freePort } from '../helpers/net.js';
import { KiB, makeImage, MiB, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { cli } from '../migration/harness.js';
import { readAt } from '../helpers/server.js';
import { requirePythonNbd, SYSTEM_PYTHON } from '../helpers/tools.js';
import { adminRequest } from '../helpers/admin.js';

/**
 * A writer that runs until its server dies: 4 KiB writes at `spread` random offsets in
 * [0, region), over and over, each acknowledged one applied to the shadow image; prints
 * how many were acknowledged.
 */
const CRASH_WRITER = String.raw`
import nbd, os, random, sys, json
uri, shadow, region, seed, spread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(seed)
offsets = [rng.randrange(region // 4096) * 4096 for _ in range(spread)]
out = open(shadow, 'r+b')
n = 0
try:
    while True:
        off = offsets[n % spread]
        data = rng.randbytes(4096)
        h.pwrite(data, off)
        out.seek(off)
        out.write(data)
        n += 1
except nbd.Error:
    pass
out.close()
print(json.dumps({'writes': n}))
`;

const SIZE = 16 * MiB + 512; // a short last block of the 64 KiB granularity
const G = 64 * KiB;

/** The changes after the checkpoint (qemu-io commands): a write inside one block, one across two, a trim, zeroes, the tail. */
const CHANGES = ['write -P 0x11 1048676 3000', 'write -P 0x22 3145000 2000', 'discard 8M 1M', 'write -z 12M 256k', `write -P 0x33 ${16 * MiB} 512`];
/** The 64 KiB blocks they touch, as byte ranges. */
const EXPECTED = [
  [MiB, G],
  [47 * G, 2 * G],
  [8 * MiB, MiB],
  [12 * MiB, 256 * KiB],
  [16 * MiB, 512],
];

async function qemuIo(target: string[], cmds: string[]): Promise<void> {
  await requireTool('qemu-io', 'qemu-utils');
  const r = await run('qemu-io', [...target, ...cmds.flatMap((c) => ['-c', c])]);
  if (r.code !== 0) throw new Error(`qemu-io failed: ${describeRun(r)}`);
}

/** nbdinfo --map=CONTEXT: [start, length, flags] lines, and the dirty ranges among them. */
async function nbdinfoMap(uri: string, context: string): Promise<{ lines: number[][]; dirty: number[][] }> {
  await requireTool('nbdinfo', 'libnbd-bin');
  const r = await run('nbdinfo', [`--map=${context}`, uri]);
  if (r.code !== 0) throw new Error(`nbdinfo failed: ${describeRun(r)}`);
  const lines = r.stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .map(([s, l, f, name]) => {
      if (Number(f) === 1 && name !== 'dirty') throw new Error(`nbdinfo names flag 1 "${name}", not dirty`);
      return [Number(s), Number(l), Number(f)];
    });
  return { lines, dirty: lines.filter((l) => l[2] === 1).map((l) => [l[0]!, l[1]!]) };
}

/** qemu-img map --output=json with x-dirty-bitmap: the changed ranges are the "data": false ones. */
async function qemuImgMap(port: number, context: string): Promise<number[][]> {
  const opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=vm1,x-dirty-bitmap=${context}`;
  const r = await run('qemu-img', ['map', '--output=json', '--image-opts', opts]);
  if (r.code !== 0) throw new Error(`qemu-img map failed: ${describeRun(r)}`);
  const out: number[][] = [];
  for (const e of JSON.parse(r.stdout) as { start: number; length: number; data: boolean }[]) {
    if (e.data) continue;
    const last = out[out.length - 1];
    if (last && last[0]! + last[1]! === e.start) last[1]! += e.length;
    else out.push([e.start, e.length]);
  }
  return out;
}

const portOf = (uri: string) => Number(new URL(uri).port);

/** nbd-migrate serving a raw image with data in it, an admin socket, checkpoint ck1 and then CHANGES. */
async function nbdMigrateWithChanges(t: Tap, dir: string) {
  const img = await makeImage(path.join(dir, 'raw.img'), SIZE);
  await writeAt(img, 0, patternBuffer(2 * MiB, 7));
  await writeAt(img, 8 * MiB, patternBuffer(MiB, 8));
  const admin = path.join(dir, 'admin.sock');
  const args = [img, '--name', 'vm1', '--admin-socket', admin];
  const s = await serve(t, args);
  const created = await cli(['ctl', '--socket', admin, 'checkpoint', 'create', 'vm1', 'ck1']);
  t.equal(created.code, 0, describeRun(created));
  t.match(created.stdout, /checkpoint created: ck1: .*changed since 0 B.*NBD context qemu:dirty-bitmap:ck1/);
  await qemuIo(['-f', 'raw', s.uri('vm1')], CHANGES);
  return { s, img, admin, args };
}
type Tap = typeof t;

/** qemu-nbd -B ck1 on a qcow2 with the same data, a persistent bitmap added before the same changes. */
async function qemuNbdWithChanges(t: Tap, dir: string, extraBitmaps: string[] = []) {
  await requireTool('qemu-img', 'qemu-utils');
  const q = path.join(dir, 'bm.qcow2');
  const mk = await run('qemu-img', ['create', '-f', 'qcow2', q, String(SIZE)]);
  t.equal(mk.code, 0, describeRun(mk));
  await qemuIo(['-f', 'qcow2', q], ['write -P 7 0 2M', 'write -P 8 8M 1M']);
  for (const b of ['ck1', ...extraBitmaps]) {
    const add = await run('qemu-img', ['bitmap', '--add', '-f', 'qcow2', q, b]);
    t.equal(add.code, 0, describeRun(add));
  }
  await qemuIo(['-f', 'qcow2', q], CHANGES);
  const port = await freePort();
  const p = await qemuNbd(q, 'vm1', port, ['-f', 'qcow2', '--read-only', ...['ck1', ...extraBitmaps].flatMap((b) => ['-B', b])]);
  t.teardown(() => p.stop());
  return { port, uri: `nbd://127.0.0.1:${port}/vm1` };
}

t.test('nbdinfo --map and qemu-img map x-dirty-bitmap show exactly the changed ranges, as qemu-nbd -B does', async (t) => {
  const dir = await tmpDir(t);
  const ours = await nbdMigrateWithChanges(t, dir);
  const theirs = await qemuNbdWithChanges(t, dir);

  const a = await nbdinfoMap(ours.s.uri('vm1'), 'qemu:dirty-bitmap:ck1');
  const b = await nbdinfoMap(theirs.uri, 'qemu:dirty-bitmap:ck1');
  t.same(a.dirty, EXPECTED, 'nbdinfo: the changed ranges (64 KiB blocks, the short last one to the end)');
  t.same(b.dirty, EXPECTED, 'qemu-nbd -B reads the same ranges (the reading of the context is the real peer\'s)');
  t.same(a.lines, b.lines, 'line for line the same map as qemu-nbd');
  t.equal(a.lines.reduce((n, l) => n + l[1]!, 0), SIZE, 'the map covers the export, no more');

  const qa = await qemuImgMap(portOf(ours.s.uri('vm1')), 'qemu:dirty-bitmap:ck1');
  const qb = await qemuImgMap(theirs.port, 'qemu:dirty-bitmap:ck1');
  t.same(qa, EXPECTED, 'qemu-img map: "data": false exactly where changed');
  t.same(qa, qb, 'the same as against qemu-nbd');

  const list = await cli(['ctl', '--socket', ours.admin, 'checkpoint', 'list', 'vm1', '--json']);
  const [ck] = JSON.parse(list.stdout) as { name: string; dirtyBytes: number; recovered: boolean }[];
  t.equal(ck!.dirtyBytes, EXPECTED.reduce((n, r) => n + r[1]!, 0), 'ctl checkpoint list counts the same bytes');
});

t.test('LIST and SET of qemu:, qemu:dirty-bitmap: and full names answer as qemu-nbd', async (t) => {
  const dir = await tmpDir(t);
  const ours = await nbdMigrateWithChanges(t, dir);
  const c2 = await cli(['ctl', '--socket', ours.admin, 'checkpoint', 'create', 'vm1', 'ck2']);
  t.equal(c2.code, 0, describeRun(c2));
  const theirs = await qemuNbdWithChanges(t, dir, ['ck2']);
  const scenario = `
    def listq(uri, queries):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(uri)
        for q in queries:
            h.add_meta_context(q)
        got = []
        h.opt_list_meta_context(lambda name: got.append(name) or 0)
        h.opt_abort()
        return sorted(n for n in got if n.startswith('qemu:'))
    def setq(uri, query):
        h = nbd.NBD()
        h.add_meta_context(query)
        h.connect_uri(uri)
        sel = [n for n in ['qemu:dirty-bitmap:ck1', 'qemu:dirty-bitmap:ck2'] if h.can_meta_context(n)]
        seen = []
        if sel:
            def cb(ctx, off, entries, err):
                seen.append([ctx, list(entries)[:4]])
                return 0
            h.block_status(2 * 1024 * 1024, 0, cb)
        close(h)
        return {'selected': sel, 'status': seen}
    for who in ['ours', 'theirs']:
        uri = A[who]
        R[who] = {
            'all': listq(uri, []),
            'qemu:': listq(uri, ['qemu:']),
            'ns': listq(uri, ['qemu:dirty-bitmap:']),
            'one': listq(uri, ['qemu:dirty-bitmap:ck2']),
            'none': listq(uri, ['qemu:dirty-bitmap:nope']),
            'set-ns': setq(uri, 'qemu:dirty-bitmap:'),
            'set-qemu': setq(uri, 'qemu:'),
            'set-one': setq(uri, 'qemu:dirty-bitmap:ck1'),
        }
  `;
  const R = await libnbdScenario<Record<string, Record<string, unknown>>>(scenario, { ours: ours.s.uri('vm1'), theirs: theirs.uri });
  const both = ['qemu:dirty-bitmap:ck1', 'qemu:dirty-bitmap:ck2'];
  t.same(R.ours!.all, both, 'LIST with no query lists every checkpoint');
  t.same(R.ours!['qemu:'], both, 'LIST qemu: lists them all');
  t.same(R.ours!.ns, both, 'LIST qemu:dirty-bitmap: lists them all');
  t.same(R.ours!.one, ['qemu:dirty-bitmap:ck2']);
  t.same(R.ours!.none, []);
  t.same(R.ours!['set-ns'], { selected: [], status: [] }, 'SET of the bare namespace selects nothing');
  t.same(R.ours!['set-qemu'], { selected: [], status: [] });
  t.same(R.ours!['set-one'], { selected: ['qemu:dirty-bitmap:ck1'], status: [['qemu:dirty-bitmap:ck1', [MiB, 0, G, 1]]] }, 'SET of a full name, and its block status');
  t.same(R.ours, R.theirs, 'every answer is qemu-nbd\'s');
});

t.test('checkpoints persist: exact across a clean restart; after kill -9 the stored bits plus the activity log, or every block without one; delete persists', async (t) => {
  const dir = await tmpDir(t);
  const first = await nbdMigrateWithChanges(t, dir);
  const before = await nbdinfoMap(first.s.uri('vm1'), 'qemu:dirty-bitmap:ck1');
  await first.s.stop();
  t.ok(fs.existsSync(path.join(`${first.img}.nbd-migrate.d`, 'checkpoints.json')), 'stored in the state folder beside the image');

  const second = await serve(t, first.args);
  const restored = await second.waitForLog((e) => e.event === 'checkpoint-restored');
  t.equal(restored.how, 'exact');
  t.same((await nbdinfoMap(second.uri('vm1'), 'qemu:dirty-bitmap:ck1')).lines, before.lines, 'the same map after a clean restart');
  await qemuIo(['-f', 'raw', second.uri('vm1')], ['write -P 0x44 5M 4k']);
  second.proc.kill('SIGKILL');
  await second.stop();

  const third = await serve(t, first.args);
  const recovered = await third.waitForLog((e) => e.event === 'checkpoint-restored');
  t.equal(recovered.level, 'warn');
  t.match(recovered.how, /unclean shutdown: stored bits plus the 1 extents of the activity log/);
  const map = await nbdinfoMap(third.uri('vm1'), 'qemu:dirty-bitmap:ck1');
  const covered = (off: number, len: number) => map.dirty.some(([o, l]) => o! <= off && off + len <= o! + l!);
  for (const [o, l] of [...EXPECTED, [5 * MiB, 4 * KiB]]) t.ok(covered(o!, l!), `after kill -9, [${o}, +${l}) still reads changed`);
  t.same(map.dirty.filter(([o]) => o! >= 4 * MiB && o! < 8 * MiB), [[4 * MiB, 5 * MiB]], 'the write since the last store comes back as its 4 MiB activity-log extent (4-8 MiB, run on into the trimmed 8-9 MiB)');
  t.ok(map.dirty.reduce((n, r) => n + r[1]!, 0) < SIZE / 2, 'not the whole disk: the activity log bounds the over-report');
  await third.stop();

  // A run without the activity log that crashes: every block, since nothing logged its changes.
  const nolog = await serve(t, [...first.args, '--no-activity-log']);
  await nolog.waitForLog((e) => e.event === 'checkpoint-restored');
  await qemuIo(['-f', 'raw', nolog.uri('vm1')], ['write -P 0x45 13M 4k']);
  nolog.proc.kill('SIGKILL');
  await nolog.stop();
  const fifth = await serve(t, first.args);
  const all = await fifth.waitForLog((e) => e.event === 'checkpoint-restored');
  t.match(all.how, /no activity log: every block/);
  t.same((await nbdinfoMap(fifth.uri('vm1'), 'qemu:dirty-bitmap:ck1')).lines, [[0, SIZE, 1]], 'every block reads changed: more than was written, never less');
  const list = await cli(['ctl', '--socket', first.admin, 'checkpoint', 'list', 'vm1']);
  t.match(list.stdout, /ck1: .*recovered after an unclean shutdown/, describeRun(list));
  const del = await cli(['ctl', '--socket', first.admin, 'checkpoint', 'delete', 'vm1', 'ck1']);
  t.equal(del.code, 0, describeRun(del));
  const again = await cli(['ctl', '--socket', first.admin, 'checkpoint', 'delete', 'vm1', 'ck1']);
  t.not(again.code, 0);
  t.match(again.stderr, /ENOENT: no checkpoint named "ck1"/, 'one line naming what is missing');
  await fifth.stop();

  const fourth = await serve(t, first.args);
  const empty = await cli(['ctl', '--socket', first.admin, 'checkpoint', 'list', 'vm1']);
  t.match(empty.stdout, /no checkpoints on vm1/);
  const r = await run('nbdinfo', ['--list', '--content', fourth.uri('vm1')]);
  t.notMatch(r.stdout, /qemu:dirty-bitmap/, 'a deleted checkpoint is not listed after a restart');
});

t.test('kill -9 under a writer, three times: every block it saw acknowledged since the checkpoint reads changed', async (t) => {
  const dir = await tmpDir(t);
  const size = 64 * MiB;
  const REGION = 48 * MiB; // the writer's span
  const SPREAD = 100; // offsets it rewrites each round: most blocks of the span stay unchanged
  const img = await makeImage(path.join(dir, 'crash.img'), size);
  await writeAt(img, 0, patternBuffer(16 * MiB, 5));
  const base = path.join(dir, 'base.img');
  const shadow = path.join(dir, 'shadow.img');
  fs.copyFileSync(img, base);
  fs.copyFileSync(img, shadow);
  const admin = path.join(dir, 'admin.sock');
  const args = [img, '--name', 'vm1', '--admin-socket', admin, '--activity-extent', '64K'];
  let s = await serve(t, args);
  t.equal((await cli(['ctl', '--socket', admin, 'checkpoint', 'create', 'vm1', 'ck'])).code, 0);
  let acked = 0;
  let everChanged = 0;
  for (let round = 1; round <= 3; round++) {
    await requirePythonNbd();
    // A fresh checkpoint per round: once it holds every offset the writer keeps rewriting, kill the server under it.
    await adminRequest(admin, { cmd: 'checkpoint', action: 'create', export: 'vm1', name: `r${round}` });
    const w = run(SYSTEM_PYTHON, ['-c', CRASH_WRITER, s.uri('vm1'), shadow, String(REGION), String(10 + round), String(SPREAD)], { timeoutMs: 120_000 });
    for (const end = Date.now() + 60_000; ; ) {
      const list = (await adminRequest(admin, { cmd: 'checkpoint', action: 'list', export: 'vm1' })) as { name: string; dirtyBlocks: number }[];
      if (list.find((c) => c.name === `r${round}`)!.dirtyBlocks >= SPREAD * 0.9) break;
      if (Date.now() > end) throw new Error('the writer made no progress');
    }
    s.proc.kill('SIGKILL');
    await s.stop();
    const wr = await w;
    t.equal(wr.code, 0, describeRun(wr));
    acked += (JSON.parse(wr.stdout.trim()) as { writes: number }).writes;
    s = await serve(t, args);
    const restored = await s.waitForLog((e) => e.event === 'checkpoint-restored' && e.checkpoint === 'ck');
    t.match(restored.how, /activity log/, `round ${round}: recovered from the stored bits and the activity log`);
    const map = await nbdinfoMap(s.uri('vm1'), 'qemu:dirty-bitmap:ck');
    const dirty = (block: number) => map.dirty.some(([o, l]) => o! <= block * G && (block + 1) * G <= o! + l!);
    let changed = 0;
    let missed = 0;
    for (let b = 0; b < REGION / G; b++) {
      const [a, z] = [await readAt(base, b * G, G), await readAt(shadow, b * G, G)];
      if (a.equals(z)) continue;
      changed++;
      if (!dirty(b)) missed++;
    }
    t.equal(missed, 0, `round ${round}: all ${changed} blocks changed by acknowledged writes (${acked} so far) read changed`);
    t.ok(changed > everChanged, 'each round changed more blocks');
    everChanged = changed;
    const total = map.dirty.reduce((n, r) => n + r[1]!, 0);
    t.ok(total <= (changed + 2 * SPREAD * 0.1 + 4) * G, `round ${round}: ${total / G} blocks read changed for ${changed} changed: the over-report is at most what was in flight and the last few extents`);
    t.ok(map.dirty.every(([o, l]) => o! + l! <= REGION), 'nothing outside it reads changed');
  }
  t.ok(acked > 100, `the writer's acknowledged writes: ${acked}`);
});
