// Image locking that QEMU honours: nbd-migrate takes QEMU's OFD byte-range locks
// (block/file-posix.c: byte 100 + bit per permission held, 200 + bit per
// permission not shared) beside its flock, so
//   (a) while nbd-migrate serves an image read-write, qemu-io, qemu-nbd and
//       qemu-img refuse to write it ("Failed to get "write" lock"), while
//       force-shared readers (-U) still work; and
//   (b) while QEMU (qemu-nbd, or a paused qemu-system-x86_64 guest with the
//       image as its disk) holds an image for writing, `nbd-migrate serve`
//       refuses it with one clear line.

import t from 'tap';
import { spawn } from 'node:child_process';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { KiB, MiB, allBytes, makeImage, readAt, serve, tmpDir, serveOnce, fatalCause, type Teardownable } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { freePort, qemuNbd } from '../migration/harness.js';

const qemuIo = await requireTool('qemu-io', 'qemu-utils');
const qemuImg = await requireTool('qemu-img', 'qemu-utils');
const qemuNbdBin = await requireTool('qemu-nbd', 'qemu-utils');

const FILL = 0x5a;



t.test('(a) an image nbd-migrate serves read-write is refused to QEMU writers, open to -U readers', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: FILL });
  const copy = join(dir, 'copy.img');
  await copyFile(img, copy);
  const srv = await serve(t, [img, '--name', 'vm1']);
  t.notOk(srv.logs.some((e) => e.event === 'image-lock-degraded'), 'native addon: QEMU locks taken, no degraded warning');

  const w = await run(qemuIo, ['-f', 'raw', '-c', 'write -P 0xcc 0 4k', img], { timeoutMs: 30_000 });
  t.not(w.code, 0, 'qemu-io write fails', { output: describeRun(w) });
  t.match(w.stderr, /Failed to get "write" lock/, 'qemu-io names the write lock');
  t.ok(allBytes(await readAt(img, 0, 64 * KiB), FILL), 'the image is unchanged');

  const sock = join(dir, 'qnbd.sock');
  const n = await run(qemuNbdBin, ['-f', 'raw', '-k', sock, img], { timeoutMs: 20_000 });
  t.notOk(n.timedOut, 'qemu-nbd does not start serving the image', { output: describeRun(n) });
  t.not(n.code, 0, 'qemu-nbd exits with an error');
  t.match(n.stderr, /Failed to get "write" lock/, 'qemu-nbd names the write lock');

  const info = await run(qemuImg, ['info', '-U', '-f', 'raw', img], { timeoutMs: 30_000 });
  t.equal(info.code, 0, 'qemu-img info -U works', { output: describeRun(info) });
  t.match(info.stdout, /virtual size: 4 MiB/);
  const cmp = await run(qemuImg, ['compare', '-U', '-f', 'raw', '-F', 'raw', img, copy], { timeoutMs: 30_000 });
  t.equal(cmp.code, 0, 'qemu-img compare -U works (identical)', { output: describeRun(cmp) });
  const r = await run(qemuIo, ['-r', '-U', '-f', 'raw', '-c', `read -P ${FILL} 0 4k`, img], { timeoutMs: 30_000 });
  t.equal(r.code, 0, 'qemu-io -r -U reads', { output: describeRun(r) });

  await srv.stop();
  const after = await run(qemuIo, ['-f', 'raw', '-c', 'write -P 0xcc 0 4k', img], { timeoutMs: 30_000 });
  t.equal(after.code, 0, 'once nbd-migrate has stopped, qemu-io may write', { output: describeRun(after) });
  t.ok(allBytes(await readAt(img, 0, 4 * KiB), 0xcc));
});

t.test('(a) a read-only export keeps QEMU writers off but lets readers in', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: FILL });
  await serve(t, [img, '--name', 'vm1', '--read-only']);
  const w = await run(qemuIo, ['-f', 'raw', '-c', 'write -P 0xcc 0 4k', img], { timeoutMs: 30_000 });
  t.not(w.code, 0, 'qemu-io write fails', { output: describeRun(w) });
  t.match(w.stderr, /Failed to get "write" lock/);
  t.ok(allBytes(await readAt(img, 0, 4 * KiB), FILL), 'the image is unchanged');
  const r = await run(qemuIo, ['-r', '-f', 'raw', '-c', `read -P ${FILL} 0 4k`, img], { timeoutMs: 30_000 });
  t.equal(r.code, 0, 'qemu-io -r (no -U) reads beside a read-only export', { output: describeRun(r) });
  const ro = await serve(t, [img, '--name', 'again', '--read-only']);
  t.ok(ro.proc.pid, 'a second read-only nbd-migrate serves it too');
});

t.test('(b) nbd-migrate refuses an image qemu-nbd holds for writing', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: FILL });
  const q = await qemuNbd(img, 'q', await freePort());
  t.teardown(() => q.stop());

  for (const extra of [[], ['--read-only']]) {
    const r = await serveOnce([img, '--name', 'vm1', ...extra]);
    t.notOk(r.timedOut, `serve ${extra.join(' ')} does not start`, { output: describeRun(r) });
    t.equal(r.code, 1, 'exits 1');
    const cause = fatalCause(r.stderr);
    t.equal(
      cause,
      `export "vm1": ${img} is in use: another process (for example QEMU) holds it for writing; not serving it`,
      `one clear line naming the image (${extra.join(' ') || 'read-write'})`,
    );
    t.ok(r.stderr.includes('"event":"image-lock-conflict"'), 'the conflict is logged with its lock byte');
  }

  await q.stop();
  const srv = await serve(t, [img, '--name', 'vm1']);
  t.ok(srv.proc.pid, 'once qemu-nbd is gone the image is served');
});

/** A paused (-S) TCG guest whose virtio disk is `img`, opened the way libvirt does; resolves once QMP answers. */
async function pausedGuest(t: Teardownable, img: string, readOnly: boolean): Promise<void> {
  const qemu = await requireTool('qemu-system-x86_64', 'qemu-system-x86');
  const ro = readOnly ? ',read-only=on' : '';
  const proc = spawn(
    qemu,
    [
      '-accel', 'tcg', '-S', '-nodefaults', '-no-user-config', '-display', 'none',
      '-blockdev', `driver=file,filename=${img},node-name=f0${ro}`,
      '-blockdev', `driver=raw,file=f0,node-name=d0${ro}`,
      '-device', 'virtio-blk-pci,drive=d0',
      '-qmp', 'stdio',
    ],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  t.teardown(async () => {
    proc.kill('SIGKILL');
    await exited;
  });
  let out = '';
  let err = '';
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  // Commands run only in the main loop, after every device (and so its image lock) is set up.
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`QEMU did not answer QMP within 30 s\n${out}\n${err}`)), 30_000);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`QEMU exited (${code}) before answering QMP\n${out}\n${err}`));
    });
    proc.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      if (/"status": "prelaunch"/.test(out)) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.stdin!.write('{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n');
  });
}

t.test('(b) nbd-migrate refuses the disk of a running QEMU guest', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: FILL });
  await pausedGuest(t, img, false);
  for (const extra of [[], ['--read-only']]) {
    const r = await serveOnce([img, '--name', 'vm1', ...extra]);
    t.equal(r.code, 1, `serve ${extra.join(' ')} exits 1`, { output: describeRun(r) });
    t.equal(fatalCause(r.stderr), `export "vm1": ${img} is in use: another process (for example QEMU) holds it for writing; not serving it`);
  }
});

t.test('(b) a read-only QEMU guest disk (share-rw=off) keeps nbd-migrate from serving it read-write only', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: FILL });
  await pausedGuest(t, img, true);
  const r = await serveOnce([img, '--name', 'vm1']);
  t.equal(r.code, 1, 'read-write serve exits 1', { output: describeRun(r) });
  t.equal(
    fatalCause(r.stderr),
    `export "vm1": ${img} is in use: another process (for example QEMU) has it open and does not share "write" access; not serving it`,
  );
  const ro = await serve(t, [img, '--name', 'vm1', '--read-only']);
  t.ok(ro.proc.pid, 'a read-only export shares it with the read-only guest');
});

t.test('fallback (NBD_MIGRATE_NATIVE=0) says once that it cannot take QEMU locks', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(join(dir, 'a.img'), MiB);
  const b = await makeImage(join(dir, 'b.img'), MiB);
  const srv = await serve(t, [a, b, '--name', 'a', '--name', 'b'], { env: { NBD_MIGRATE_NATIVE: '0' } });
  const warned = srv.logs.filter((e) => e.event === 'image-lock-degraded');
  t.equal(warned.length, 1, 'one warning for two images', { logs: warned });
  t.match(String(warned[0]?.reason), /native addon/);
});
