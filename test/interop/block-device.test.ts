// Block devices served like image files (issue 11 part 1), on loop devices
// (losetup; these machines have no device-mapper): size from BLKGETSIZE64,
// qemu-io patterns, qemu-img compare against the backing file, BLOCK_STATUS
// all data, TRIM and WRITE_ZEROES (fast and not) through libnbd, fio; a device
// held by another exclusive opener (or a second server) is refused in one line;
// QEMU's image locks apply to devices; the pure-JS fallback refuses devices.
// Every loop device attached here is detached in t.teardown, even on failure.

import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { CLI, MiB, REPO_ROOT, makeImage, patternBuffer, readAt, serve, tmpDir, writeAt, serveOnce as serveRefusal, fatalCause, type Teardownable } from '../helpers/server.js';
import { SYSTEM_PYTHON, describeRun, requirePythonNbd, requireTool, run } from '../helpers/tools.js';
import { libnbdScenario, sha256 } from '../helpers/libnbd.js';
import { adminRequest, waitForJob } from '../helpers/admin.js';
import { mkdtemp, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';

const losetup = await requireTool('losetup', 'mount');
const qemuIo = await requireTool('qemu-io', 'qemu-utils');
const qemuImg = await requireTool('qemu-img', 'qemu-utils');
const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');
const fio = await requireTool('fio', 'fio');
await requirePythonNbd();

const SIZE = 16 * MiB;

// A device's state folder defaults to /var/lib/nbd-migrate/<export name>/: every server here gets
// --state-dir inside a temporary folder instead (the test's own, or this file's for refusals), so
// nothing is left behind in /var/lib.
const STATE_ROOT = await mkdtemp(join(tmpdir(), 'nbd-migrate-bdev-state-'));
t.teardown(() => rm(STATE_ROOT, { recursive: true, force: true }));
const stateDir = (dir: string) => ['--state-dir', join(dir, 'state')];

/** Attaches FILE to a free loop device; detached in t.teardown whatever happens. Fails (never skips) when losetup is refused. */
async function attachLoop(t: Teardownable, file: string): Promise<string> {
  const r = await run(losetup, ['--find', '--show', file], { timeoutMs: 30_000 });
  const dev = r.stdout.trim();
  if (r.code !== 0 || !dev.startsWith('/dev/loop'))
    throw new Error(`losetup is not allowed here (needs root and /dev/loop-control), so block devices cannot be tested: ${describeRun(r)}`);
  t.teardown(async () => {
    const d = await run(losetup, ['-d', dev], { timeoutMs: 30_000 });
    if (d.code !== 0) console.error(`could not detach ${dev}: ${describeRun(d)}`);
  });
  return dev;
}

/** `nbd-migrate serve ARGS` that is expected to exit on its own (a refusal), its state under STATE_ROOT. */
const serveOnce = (args: string[], env: NodeJS.ProcessEnv = {}) => serveRefusal([...args, '--state-dir', STATE_ROOT], env);


/** A process holding DEV open O_RDWR|O_EXCL (as a mount or LVM would) until killed. */
async function holdExclusive(t: Teardownable, dev: string): Promise<ChildProcess> {
  const p = spawn(SYSTEM_PYTHON, ['-c', 'import os,sys\nfd=os.open(sys.argv[1], os.O_RDWR|os.O_EXCL)\nprint("held", flush=True)\nsys.stdin.read()', dev], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  t.teardown(() => {
    p.kill('SIGKILL');
  });
  let err = '';
  p.stderr!.on('data', (d) => (err += d));
  await new Promise<void>((resolve, reject) => {
    p.stdout!.on('data', (d) => String(d).includes('held') && resolve());
    p.on('exit', (code) => reject(new Error(`the O_EXCL holder exited (${code}): ${err}`)));
  });
  return p;
}

t.test('a loop device served read-write: size, qemu-io, compare, map, trim, zeroes, flush', async (t) => {
  const dir = await tmpDir(t);
  const backing = await makeImage(join(dir, 'backing.img'), SIZE);
  await writeAt(backing, 0, patternBuffer(2 * MiB, 7));
  const dev = await attachLoop(t, backing);
  const srv = await serve(t, [dev, '--name', 'lv', ...stateDir(dir)]);
  const uri = srv.uri('lv');
  const added = await srv.waitForLog((e) => e.event === 'export-added');
  t.equal(added.size, SIZE, 'the export size is the device size (BLKGETSIZE64)');
  t.ok(existsSync(join(dir, 'state', 'lv', 'dirty.bitmap')), 'the state folder is under --state-dir (DIR/<name>/)');
  const recovered = await srv.waitForLog((e) => e.event === 'dirty-recovered');
  t.equal(recovered.stateDir, join(dir, 'state', 'lv'), 'not /var/lib/nbd-migrate/lv: nothing of this test is left behind');

  const info = await run(nbdinfo, ['--json', uri], { timeoutMs: 30_000 });
  t.equal(info.code, 0, 'nbdinfo', { output: describeRun(info) });
  const exp = (JSON.parse(info.stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
  t.equal(exp['export-size'], SIZE, 'nbdinfo sees the device size');
  t.equal(exp.can_trim, true);
  t.equal(exp.can_zero, true);
  t.equal(exp.can_fast_zero, true);
  t.equal(exp.can_flush, true);

  const io = await run(
    qemuIo,
    ['-f', 'raw', '-c', 'read -P 0 2M 1M', '-c', 'write -P 0xa5 4M 1M', '-c', 'write -P 0x3c 5M 4k', '-c', 'read -P 0xa5 4M 1M', '-c', 'read -P 0x3c 5M 4k', '-c', 'flush', uri],
    { timeoutMs: 60_000 },
  );
  t.equal(io.code, 0, 'qemu-io writes and reads patterns through the device', { output: describeRun(io) });
  t.notMatch(io.stdout + io.stderr, /Pattern verification failed|error/i, 'patterns verified');
  t.same(await readAt(backing, 0, 2 * MiB), patternBuffer(2 * MiB, 7), 'what was on the device reads back unchanged');
  t.ok((await readAt(backing, 4 * MiB, MiB)).every((b) => b === 0xa5), 'the flushed write reached the backing file');

  const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', uri, backing], { timeoutMs: 60_000 });
  t.equal(cmp.code, 0, 'qemu-img compare: the export and the backing file are identical', { output: describeRun(cmp) });

  const map = await run(nbdinfo, ['--map', uri], { timeoutMs: 30_000 });
  t.equal(map.code, 0, 'nbdinfo --map', { output: describeRun(map) });
  const rows = map.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/));
  t.same(rows.map((r) => [Number(r[0]), Number(r[1]), r[3]]), [[0, SIZE, 'data']], 'BLOCK_STATUS: the whole device is data');

  // Trim and write-zeroes through libnbd, checking what the device then holds.
  const r = await libnbdScenario<Record<string, { ok: boolean; errname?: string; value?: { sha256: string } }>>(
    String.raw`
    h = conn(A['uri'])
    MiB = 1024 * 1024
    h.pwrite(b'\x11' * 4096, 3 * MiB)
    h.pwrite(b'\x77' * MiB, 10 * MiB)
    R['zero'] = attempt(lambda: h.zero(MiB, 0))
    R['zero_unaligned'] = attempt(lambda: h.zero(1000, 3 * MiB + 100))
    R['fast'] = attempt(lambda: h.zero(2 * MiB, 6 * MiB, nbd.CMD_FLAG_FAST_ZERO))
    R['fast_nohole'] = attempt(lambda: h.zero(MiB, 9 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
    R['nohole'] = attempt(lambda: h.zero(MiB, 9 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA))
    R['trim'] = attempt(lambda: h.trim(MiB, 10 * MiB))
    R['flush'] = attempt(lambda: h.flush())
    R['read_zero'] = attempt(lambda: h.pread(MiB, 0))
    R['read_edge'] = attempt(lambda: h.pread(1000, 3 * MiB + 100))
    R['read_fast'] = attempt(lambda: h.pread(2 * MiB, 6 * MiB))
    R['read_nohole'] = attempt(lambda: h.pread(MiB, 9 * MiB))
    close(h)
    fd = os.open(A['backing'], os.O_RDONLY)
    try:
        R['next_data'] = {'ok': True, 'value': os.lseek(fd, 10 * MiB, os.SEEK_DATA)}
    except OSError as e:
        R['next_data'] = {'ok': True, 'value': -1 if e.errno == errno.ENXIO else -2}
    `,
    { uri, backing },
  );
  t.ok(r.zero?.ok, 'WRITE_ZEROES', { r });
  t.ok(r.zero_unaligned?.ok, 'WRITE_ZEROES on an unaligned range (edges written, whole sectors by ioctl)', { r });
  t.ok(r.fast?.ok, 'FAST_ZERO succeeds: a loop device has the write-zeroes offload', { r });
  t.equal(r.fast_nohole?.errname, 'ENOTSUP', 'FAST_ZERO with NO_HOLE fails fast with ENOTSUP (no cheap zeroing keeps it allocated)', { r });
  t.ok(r.nohole?.ok, 'WRITE_ZEROES with NO_HOLE and FUA (BLKZEROOUT)', { r });
  t.ok(r.trim?.ok, 'TRIM (BLKDISCARD)', { r });
  t.ok(r.flush?.ok, 'FLUSH (fsync)', { r });
  t.equal(r.read_zero?.value?.sha256, sha256(Buffer.alloc(MiB)), 'the zeroed range reads zeros');
  t.equal(r.read_edge?.value?.sha256, sha256(Buffer.alloc(1000)), 'the unaligned zeroed range reads zeros');
  t.equal(r.read_fast?.value?.sha256, sha256(Buffer.alloc(2 * MiB)), 'the fast-zeroed range reads zeros');
  t.equal(r.read_nohole?.value?.sha256, sha256(Buffer.alloc(MiB)), 'the NO_HOLE-zeroed range reads zeros');
  const next = (r.next_data as unknown as { value: number }).value;
  t.ok(next === -1 || next >= 11 * MiB, 'the discarded range is a hole in the backing file (BLKDISCARD reached the loop device)', { next });

  const back = await readAt(backing, 0, 4 * MiB);
  t.ok(back.subarray(0, MiB).every((b) => b === 0), 'zeros reached the backing file');
  t.same(back.subarray(MiB, 2 * MiB), patternBuffer(2 * MiB, 7).subarray(MiB), 'data past the zeroed range is kept');
  t.ok(back.subarray(3 * MiB, 3 * MiB + 100).every((b) => b === 0x11), 'bytes before the unaligned zero range are kept');
  t.ok(back.subarray(3 * MiB + 100, 3 * MiB + 1100).every((b) => b === 0), 'the unaligned range is zero on the backing file');
  t.ok(back.subarray(3 * MiB + 1100, 3 * MiB + 4096).every((b) => b === 0x11), 'bytes after the unaligned zero range are kept');

  const fioRun = await run(
    fio,
    ['--name=v', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--size=8M', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0'],
    { timeoutMs: 120_000, cwd: dir },
  );
  t.equal(fioRun.code, 0, 'fio random writes with crc32c verification through the device', { output: describeRun(fioRun) });
  t.notMatch(fioRun.stdout, /verify failed|bad magic/i);
  const cmp2 = await run(qemuIo, ['-f', 'raw', '-c', 'flush', uri], { timeoutMs: 30_000 });
  t.equal(cmp2.code, 0);
  const cmp3 = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', uri, backing], { timeoutMs: 60_000 });
  t.equal(cmp3.code, 0, 'after fio and a flush the export and the backing file are still identical', { output: describeRun(cmp3) });
});

t.test('QEMU image locks apply to a served device', async (t) => {
  const dir = await tmpDir(t);
  const dev = await attachLoop(t, await makeImage(join(dir, 'backing.img'), SIZE));
  await serve(t, [dev, '--name', 'lv', ...stateDir(dir)]);
  const w = await run(qemuIo, ['-f', 'raw', '-c', 'write -P 0xcc 0 4k', dev], { timeoutMs: 30_000 });
  t.not(w.code, 0, 'qemu-io cannot write the device nbd-migrate serves', { output: describeRun(w) });
  t.match(w.stderr, /Failed to get "write" lock/, 'it names the write lock');
});

t.test('a device held by another exclusive opener, or another server, is refused', async (t) => {
  const dir = await tmpDir(t);
  const dev = await attachLoop(t, await makeImage(join(dir, 'backing.img'), SIZE));
  const holder = await holdExclusive(t, dev);
  const r = await serveOnce([dev, '--name', 'lv']);
  t.not(r.code, 0, 'serve exits with an error', { output: describeRun(r) });
  t.equal(fatalCause(r.stderr), `export "lv": device ${dev} is in use (mounted, or held by another program); not serving it`, 'one clear line');
  holder.kill('SIGKILL');
  await new Promise((resolve) => holder.once('exit', resolve));

  await serve(t, [dev, '--name', 'lv', ...stateDir(dir)]);
  const second = await serveOnce([dev, '--name', 'again']);
  t.not(second.code, 0, 'a second read-write server of the same device is refused', { output: describeRun(second) });
  t.match(fatalCause(second.stderr) ?? '', `device ${dev} is in use (mounted, or held by another program)`);
});

t.test('the pure-JS fallback refuses block devices', async (t) => {
  const dir = await tmpDir(t);
  const dev = await attachLoop(t, await makeImage(join(dir, 'backing.img'), SIZE));
  for (const ro of [[], ['--read-only']]) {
    const r = await serveOnce([dev, '--name', 'lv', ...ro], { NBD_MIGRATE_NATIVE: '0' });
    t.not(r.code, 0, `serve ${ro.join(' ')} exits with an error`, { output: describeRun(r) });
    t.equal(
      fatalCause(r.stderr),
      `export "lv": cannot open ${dev}: ${dev} is a block device, which needs the native addon (the pure-JS storage fallback cannot size it; fallback because: NBD_MIGRATE_NATIVE=0)`,
      'one line naming the device and why',
    );
  }
});

t.test('a mirror of an image-file export onto `serve --incoming /dev/loopN` lands on the device', async (t) => {
  const dir = await tmpDir(t);
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  for (let off = 0; off < SIZE; off += 4 * MiB) await writeAt(src, off, patternBuffer(MiB, off / MiB + 3));
  // The destination device starts with other data, which the mirror must replace (holes included).
  const backing = await makeImage(join(dir, 'dst.img'), SIZE, { fill: 0xee });
  const dev = await attachLoop(t, backing);
  // The migration markers sit beside the image path: for a device, in /dev. Never leave them behind.
  t.teardown(async () => {
    for (const m of ['incoming', 'received', 'fenced']) await rm(`${dev}.nbd-migrate-${m}`, { force: true });
  });
  const admin = join(dir, 'src.sock');
  const s = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  const d = await serve(t, [dev, '--name', 'vm1', '--incoming', ...stateDir(dir)]);
  const st = (await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: d.uri('vm1'), cutover: 'auto' })) as { targetKind?: string; targetFreeBytes?: number | null };
  t.equal(st.targetKind, 'nbd-migrate-incoming', 'the device export is a migration destination');
  t.equal(st.targetFreeBytes, null, "a device destination reports no free space (its room is its size, not /dev's free space)");
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed' || j.state === 'failed', 120_000);
  t.equal(done.state, 'completed', 'the mirror completes', { done });
  t.ok(existsSync(`${dev}.nbd-migrate-received`), 'completion is recorded');
  await s.stop();
  await d.stop();
  const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', src, backing], { timeoutMs: 60_000 });
  t.equal(cmp.code, 0, 'the loop device (its backing file) holds exactly the source image', { output: describeRun(cmp) });
});

/** The open flags (octal, from /proc/PID/fdinfo) of the server's descriptor for `path`. */
async function openFlags(pid: number, path: string): Promise<number | undefined> {
  const { readdir, readlink, readFile } = await import('node:fs/promises');
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target !== path) continue;
    const m = /^flags:\s+([0-7]+)/m.exec(await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
    if (m) return parseInt(m[1]!, 8);
  }
  return undefined;
}
const O_DIRECT = 0o40000;

t.test('--direct: O_DIRECT on a device and on an image file, unaligned requests through bounce buffers', async (t) => {
  const dir = await tmpDir(t);
  const backing = await makeImage(join(dir, 'backing.img'), SIZE, { fill: 0x5a });
  const dev = await attachLoop(t, backing);
  const img = await makeImage(join(dir, 'file.img'), SIZE, { fill: 0x5a });
  const cfg = join(dir, 'direct.json');
  await (await import('node:fs/promises')).writeFile(cfg, JSON.stringify({ exports: [{ name: 'file', path: img, direct: true }] }));
  const srv = await serve(t, [dev, '--name', 'lv', '--direct', '--config', cfg, ...stateDir(dir)]);
  const pid = srv.proc.pid!;
  const devFlags = await openFlags(pid, dev);
  t.ok(devFlags !== undefined && (devFlags & O_DIRECT) !== 0, 'the device is open O_DIRECT (--direct)', { devFlags });
  const fileFlags = await openFlags(pid, img);
  t.ok(fileFlags !== undefined && (fileFlags & O_DIRECT) !== 0, 'the image file is open O_DIRECT (config "direct": true)', { fileFlags });
  const added = srv.logs.filter((e) => e.event === 'export-added');
  t.same(added.map((e) => [e.export, e.direct, e.blockDevice]), [['file', true, false], ['lv', true, true]], 'export-added says direct and block device');

  for (const [name, path] of [['lv', backing], ['file', img]] as const) {
    const uri = srv.uri(name);
    const io = await run(
      qemuIo,
      [
        '-f', 'raw',
        '-c', 'write -P 0x11 100 1000',
        '-c', 'read -P 0x5a 0 100',
        '-c', 'read -P 0x11 100 1000',
        '-c', 'read -P 0x5a 1100 7092',
        '-c', 'write -P 0x22 8190 5',
        '-c', 'read -P 0x22 8190 5',
        '-c', 'read -P 0x5a 8195 10000',
        '-c', 'write -P 0x33 1M 64k',
        '-c', 'read -P 0x33 1M 64k',
        '-c', 'write -z 2097452 5000',
        '-c', 'read -P 0 2097452 5000',
        '-c', 'read -P 0x5a 2M 300',
        '-c', 'read -P 0x5a 2102452 3000',
        '-c', 'flush',
        uri,
      ],
      { timeoutMs: 60_000 },
    );
    t.equal(io.code, 0, `${name}: unaligned and aligned writes, reads and zeroes through O_DIRECT`, { output: describeRun(io) });
    t.notMatch(io.stdout + io.stderr, /Pattern verification failed|error/i, `${name}: patterns verified`);
    // 1 KiB random writes at depth 16: several land in one 4 KiB block at once, each a read-modify-write.
    const f = await run(
      fio,
      ['--name=v', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=1k', '--size=2M', '--offset=4M', '--iodepth=16', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0'],
      { timeoutMs: 120_000, cwd: dir },
    );
    t.equal(f.code, 0, `${name}: fio 1k random writes at depth 16 verify (concurrent read-modify-writes of shared blocks)`, { output: describeRun(f) });
    const cmp = await run(qemuImg, ['compare', '-U', '-f', 'raw', '-F', 'raw', uri, path], { timeoutMs: 60_000 });
    t.equal(cmp.code, 0, `${name}: the export and what is on disk are identical`, { output: describeRun(cmp) });
  }
});

t.test('--direct refusals: a size that is not whole 4 KiB blocks, and the fallback', async (t) => {
  const dir = await tmpDir(t);
  const odd = await makeImage(join(dir, 'odd.img'), SIZE + 512);
  const r = await serveOnce([odd, '--name', 'odd', '--direct']);
  t.not(r.code, 0, { output: describeRun(r) });
  t.equal(fatalCause(r.stderr), `export "odd": cannot open ${odd}: ${odd}: --direct needs a size that is a multiple of 4096 bytes (it is ${SIZE + 512})`);
  const img = await makeImage(join(dir, 'ok.img'), SIZE);
  const f = await serveOnce([img, '--name', 'ok', '--direct'], { NBD_MIGRATE_NATIVE: '0' });
  t.not(f.code, 0, { output: describeRun(f) });
  t.equal(fatalCause(f.stderr), `export "ok": cannot open ${img}: ${img}: --direct needs the native addon (aligned buffers for O_DIRECT); fallback because: NBD_MIGRATE_NATIVE=0`);
});

const cliOnce = (args: string[]) =>
  run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { cwd: REPO_ROOT, timeoutMs: 60_000 });

t.test('copy from an image file onto a device, and from a device into a new image file', async (t) => {
  const dir = await tmpDir(t);
  const src = await makeImage(join(dir, 'src.img'), SIZE);
  for (let off = 0; off < SIZE; off += 4 * MiB) await writeAt(src, off + 512, patternBuffer(MiB, off / MiB + 9));
  const backing = await makeImage(join(dir, 'dst.img'), SIZE, { fill: 0xee });
  const dev = await attachLoop(t, backing);
  const c = await cliOnce(['copy', src, dev]);
  t.equal(c.code, 0, 'copy onto the device', { output: describeRun(c) });
  const cmp = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', src, backing], { timeoutMs: 60_000 });
  t.equal(cmp.code, 0, 'the device holds the source image (its 0xee filler replaced by zeros)', { output: describeRun(cmp) });
  const out = join(dir, 'out.img');
  const c2 = await cliOnce(['copy', dev, out]);
  t.equal(c2.code, 0, 'copy from the device into a new file', { output: describeRun(c2) });
  const cmp2 = await run(qemuImg, ['compare', '-f', 'raw', '-F', 'raw', src, out], { timeoutMs: 60_000 });
  t.equal(cmp2.code, 0, 'the new file holds what the device holds', { output: describeRun(cmp2) });
});

t.test('a mounted device is refused', async (t) => {
  const mkfs = await requireTool('mkfs.ext4', 'e2fsprogs');
  const dir = await tmpDir(t);
  const dev = await attachLoop(t, await makeImage(join(dir, 'backing.img'), SIZE));
  const mk = await run(mkfs, ['-q', '-F', dev], { timeoutMs: 60_000 });
  t.equal(mk.code, 0, 'mkfs.ext4', { output: describeRun(mk) });
  const mnt = join(dir, 'mnt');
  await (await import('node:fs/promises')).mkdir(mnt);
  const m = await run('mount', [dev, mnt], { timeoutMs: 30_000 });
  if (m.code !== 0) throw new Error(`mount is not allowed here, so a mounted device cannot be tested: ${describeRun(m)}`);
  let mounted = true;
  const umount = async () => {
    if (!mounted) return;
    mounted = false;
    const u = await run('umount', [mnt], { timeoutMs: 30_000 });
    if (u.code !== 0) console.error(`could not unmount ${mnt}: ${describeRun(u)}`);
  };
  t.teardown(umount);
  const r = await serveOnce([dev, '--name', 'lv']);
  t.not(r.code, 0, 'serve exits with an error', { output: describeRun(r) });
  t.equal(fatalCause(r.stderr), `export "lv": device ${dev} is in use (mounted, or held by another program); not serving it`, 'one clear line');
  const ro = await serve(t, [dev, '--name', 'lv', '--read-only', ...stateDir(dir)]);
  t.ok(ro.logs.some((e) => e.event === 'ready'), 'read-only (no O_EXCL) it may be served');
  await ro.stop();
  await umount();
});
