// Incremental copies (issue 12.4): copy --changed-since NAME against nbd-migrate checkpoints
// and qemu-nbd -B (a qcow2 persistent bitmap), and the seed's workflow with a writer running:
// checkpoint, full copy, incremental copies until small, then mirror --since onto the
// pre-seeded destination, which sends only the delta. The figures (bytes sent by the
// incremental copies and the mirror against the full copy) are measured and printed.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { describeRun, requireTool, run, type RunResult } from '../helpers/tools.js';
import { KiB, makeImage, MiB, patternBuffer, serve, tmpDir, writeAt } from '../helpers/server.js';
import { cli, compare, freePort, jobStatus, qemuNbd, startWriter, waitForJob } from './harness.js';
import { readIncoming } from '../../src/migration/markers.js';

const SIZE = 64 * MiB;
const G = 64 * KiB;

interface CopyFigures {
  size: number;
  changedBytes: number;
  ranges: number | null;
  dataBytes: number;
  zeroBytes: number;
  skippedBytes: number;
  seconds: number;
}

/** `nbd-migrate copy --no-progress --json ARGS`: its figures (bytes sent = data + zeroes). */
async function copy(t: Tap, args: string[]): Promise<CopyFigures & { sent: number }> {
  const r: RunResult = await cli(['copy', '--no-progress', '--json', ...args], 120_000);
  t.equal(r.code, 0, describeRun(r));
  const f = JSON.parse(r.stdout.trim().split('\n').pop()!) as CopyFigures;
  return { ...f, sent: f.dataBytes + f.zeroBytes };
}
type Tap = typeof t;

/** A raw source of SIZE with 32 MiB of data (every other 4 MiB). */
async function sourceImage(dir: string, name = 'src.img'): Promise<string> {
  const src = await makeImage(path.join(dir, name), SIZE);
  for (let off = 0; off < SIZE; off += 8 * MiB) await writeAt(src, off, patternBuffer(4 * MiB, off + 1));
  return src;
}

async function qemuIo(target: string[], cmds: string[]): Promise<void> {
  await requireTool('qemu-io', 'qemu-utils');
  const r = await run('qemu-io', [...target, ...cmds.flatMap((c) => ['-c', c])]);
  if (r.code !== 0) throw new Error(`qemu-io failed: ${describeRun(r)}`);
}

/** Changes after the checkpoint: three 4 KiB writes in three blocks, a trim of data, zeroes over data. */
const CHANGES = ['write -P 0x5a 100k 4k', 'write -P 0x5b 20M 4k', 'write -P 0x5c 40M 4k', 'discard 16M 1M', 'write -z 33M 256k'];
const CHANGED = 3 * G + MiB + 256 * KiB;

t.test('copy --changed-since copies only the changed ranges, from nbd-migrate and from qemu-nbd -B', async (t) => {
  const dir = await tmpDir(t);
  const src = await sourceImage(dir);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  t.equal((await cli(['ctl', '--socket', admin, 'checkpoint', 'create', 'vm1', 'ck1'])).code, 0);
  const dst = path.join(dir, 'dst.img');
  const full = await copy(t, [s.uri('vm1'), dst]);
  await qemuIo(['-f', 'raw', s.uri('vm1')], CHANGES);
  const incr = await copy(t, [s.uri('vm1'), dst, '--changed-since', 'ck1']);
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, `the destination equals the source\n${describeRun(cmp)}`);
  t.equal(incr.changedBytes, CHANGED, 'the changed bytes are the 64 KiB blocks the changes touched');
  t.equal(incr.ranges, 5);
  t.ok(incr.sent <= incr.changedBytes, `sent no more than changed (${incr.sent} of ${incr.changedBytes})`);
  t.ok(full.sent >= 32 * MiB, `the full copy sent the data (${full.sent})`);
  t.comment(`nbd-migrate source: full copy sent ${full.sent} bytes, copy --changed-since ${incr.sent} (${((incr.sent / full.sent) * 100).toFixed(2)} %), ${incr.changedBytes} changed`);

  // A checkpoint the source does not have: refused, nothing copied.
  const bad = await cli(['copy', '--no-progress', s.uri('vm1'), dst, '--changed-since', 'nope']);
  t.not(bad.code, 0);
  t.match(bad.stderr, /does not offer qemu:dirty-bitmap:nope \(it offers: ck1\)/, describeRun(bad));
  const file = await cli(['copy', '--no-progress', src, dst, '--changed-since', 'ck1']);
  t.match(file.stderr, /--changed-since needs an NBD source/, 'a file source keeps no bitmap');

  // qemu-nbd -B on a qcow2 persistent bitmap, copied into an nbd-migrate export over NBD.
  await requireTool('qemu-img', 'qemu-utils');
  const base = await sourceImage(dir, 'base.img');
  const q = path.join(dir, 'src.qcow2');
  for (const args of [['convert', '-f', 'raw', '-O', 'qcow2', base, q], ['bitmap', '--add', '-f', 'qcow2', q, 'ck1']]) {
    const r = await run('qemu-img', args);
    t.equal(r.code, 0, describeRun(r));
  }
  const seeded = path.join(dir, 'seeded.img');
  fs.copyFileSync(base, seeded); // the full copy, as of the bitmap's creation
  await qemuIo(['-f', 'qcow2', q], CHANGES);
  const port = await freePort();
  const p = await qemuNbd(q, 'vm1', port, ['-f', 'qcow2', '--read-only', '-B', 'ck1']);
  t.teardown(() => p.stop());
  const d = await serve(t, [seeded, '--name', 'seed']);
  const fromQemu = await copy(t, [`nbd://127.0.0.1:${port}/vm1`, d.uri('seed'), '--changed-since', 'ck1']);
  t.equal(fromQemu.changedBytes, CHANGED, 'qemu-nbd reports the same changed bytes');
  t.ok(fromQemu.sent <= CHANGED, `sent ${fromQemu.sent}`);
  await d.stop();
  const qc = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', '-U', q, seeded]);
  t.equal(qc.code, 0, `the nbd-migrate destination equals the qcow2\n${describeRun(qc)}`);
});

t.test('the seed workflow under a writer: checkpoint, full copy, incremental copies until small, mirror --since', async (t) => {
  const dir = await tmpDir(t);
  const src = await sourceImage(dir);
  const shadow = path.join(dir, 'shadow.img');
  fs.copyFileSync(src, shadow);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  const REGION = 2 * MiB; // the writer's working set: what keeps changing
  const writer = await startWriter(s.uri('vm1'), shadow, dir, { region: REGION, seed: 3 });
  let writerStopped = false;
  t.teardown(async () => {
    if (!writerStopped) await writer.stop().catch(() => undefined);
  });
  const ctl = async (...args: string[]) => {
    const r = await cli(['ctl', '--socket', admin, ...args]);
    t.equal(r.code, 0, describeRun(r));
    return r;
  };
  const changedSoFar = async (name: string) =>
    ((await adminRequest(admin, { cmd: 'checkpoint', action: 'list', export: 'vm1' })) as { name: string; dirtyBytes: number }[]).find((c) => c.name === name)!.dirtyBytes;

  // 1. checkpoint, then the full copy (the checkpoint catches what the copy races with)
  await ctl('checkpoint', 'create', 'vm1', 'ck1');
  const dst = path.join(dir, 'dst.img');
  const full = await copy(t, [s.uri('vm1'), dst]);
  // 2-3. the next checkpoint, the copy of what changed since the previous one; until small
  const rounds: (CopyFigures & { sent: number })[] = [];
  let last = 'ck1';
  for (let k = 2; k <= 4; k++) {
    const next = `ck${k}`;
    await ctl('checkpoint', 'create', 'vm1', next);
    const r = await copy(t, [s.uri('vm1'), dst, '--changed-since', last]);
    t.ok(r.changedBytes <= REGION + 2 * G, `round ${k - 1}: only the writer's region changed (${r.changedBytes} bytes)`);
    rounds.push(r);
    await ctl('checkpoint', 'delete', 'vm1', last);
    last = next;
    if (r.changedBytes <= REGION) break; // small: the working set, no longer the disk
  }
  t.ok((await changedSoFar(last)) > 0, 'the writer went on changing the disk');

  // 4. the pre-seeded image becomes a migration destination; the mirror sends only the delta.
  const d = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  const wrong = await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: d.uri('vm1'), since: 'nope' }).catch((e: Error) => e);
  t.match(wrong, { code: 'ENOENT', message: /--since nope: no checkpoint named "nope"/ });
  const started = await ctl('mirror', 'vm1', d.uri('vm1'), '--since', last, '--cutover', 'manual', '--max-downtime', '200ms');
  t.match(started.stdout, /mirror of vm1 .* started/);
  const ready = await waitForJob(admin, 'vm1', (j) => j.state === 'ready', { what: 'the --since mirror to be ready' });
  t.equal(ready.since, last);
  const sentByMirror = ready.dataBytes + ready.zeroBytes;
  t.ok(sentByMirror < full.sent / 2, `the mirror sent the delta (${sentByMirror} bytes), not the disk (${full.sent})`);
  // The writer keeps writing while ready (write-through): a checkpoint made now sees its next writes.
  await ctl('checkpoint', 'create', 'vm1', 'at-ready');
  for (const end = Date.now() + 60_000; (await changedSoFar('at-ready')) === 0; )
    if (Date.now() > end) throw new Error('the writer wrote nothing in 60 s while the mirror was ready');
  const cut = await cli(['ctl', '--socket', admin, 'cutover', 'vm1']);
  t.equal(cut.code, 0, describeRun(cut));
  const done = await jobStatus(admin, 'vm1');
  t.equal(done.state, 'completed');
  const w = await writer.stop();
  writerStopped = true;
  t.equal(w.errors, 0, `the writer saw no errors (${w.writes} writes; first: ${w.firstError})`);
  t.ok(w.writes > 100, `the writer wrote through the whole workflow (${w.writes} writes)`);
  const cmp = await compare(shadow, d.uri('vm1'));
  t.equal(cmp.code, 0, `the destination is exactly what the writer wrote\n${describeRun(cmp)}`);

  const pct = (n: number) => `${((n / full.sent) * 100).toFixed(1)} %`;
  t.comment(
    `figures: full copy sent ${full.sent} bytes in ${full.seconds.toFixed(2)} s; incremental copies sent ` +
      rounds.map((r) => `${r.sent} (${pct(r.sent)}, ${r.changedBytes} changed, ${r.seconds.toFixed(2)} s)`).join(', ') +
      `; mirror --since sent ${sentByMirror} before ready (${pct(sentByMirror)}), ${done.dataBytes + done.zeroBytes} in all; writer ${w.writes} writes`,
  );
});

t.test('mirror --since onto a destination that is not a copy (never seeded) is refused by its spot check, and the destination is left unbound', async (t) => {
  const dir = await tmpDir(t);
  const src = await sourceImage(dir);
  const admin = path.join(dir, 'admin.sock');
  await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  await adminRequest(admin, { cmd: 'checkpoint', action: 'create', export: 'vm1', name: 'ck1' });
  const empty = await makeImage(path.join(dir, 'empty.img'), SIZE);
  const d = await serve(t, [empty, '--name', 'vm1', '--incoming']);
  const r = await cli(['ctl', '--socket', admin, 'mirror', 'vm1', d.uri('vm1'), '--since', 'ck1']);
  t.not(r.code, 0);
  t.match(r.stderr, /EINVAL: --since ck1: target .* differs from the source at offset \d+, in a block that has not changed since the checkpoint: it is not a copy/, describeRun(r));
  t.notOk(readIncoming(empty)?.job, 'the destination was released: another job may bind it');
  const st = (await adminRequest(admin, { cmd: 'status' })) as { jobs: unknown[] };
  t.same(st.jobs, [], 'no job was left behind');
});

t.test('mirror --since onto a qemu-nbd destination seeded by copy sends only the changes', async (t) => {
  const dir = await tmpDir(t);
  const src = await sourceImage(dir);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  await adminRequest(admin, { cmd: 'checkpoint', action: 'create', export: 'vm1', name: 'ck1' });
  const dst = path.join(dir, 'dst.img');
  const full = await copy(t, [s.uri('vm1'), dst]);
  await qemuIo(['-f', 'raw', s.uri('vm1')], CHANGES);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port);
  t.teardown(() => q.stop());
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${port}/vm1`, since: 'ck1', cutover: 'auto' });
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed', { what: 'the --since mirror to complete' });
  t.equal(done.targetKind, 'foreign');
  const sent = done.dataBytes + done.zeroBytes;
  t.ok(sent <= CHANGED, `the mirror sent ${sent} bytes: the changes (${CHANGED} bytes of blocks), not the disk (${full.sent})`);
  await s.stop(); // the switched source forwards to qemu-nbd: stop it first
  await q.stop();
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, `the destination equals the source\n${describeRun(cmp)}`);
});
