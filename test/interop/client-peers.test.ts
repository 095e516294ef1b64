// nbd-migrate's NBD client (src/client) against real servers on 127.0.0.1:
// qemu-nbd (Debian qemu-utils), nbdkit (nbdkit) with and without filters that
// take features away, nbd-server 3.24 (nbd-server; simple replies only) and
// nbd-migrate's own server. Every peer is started and stopped here, on a free
// port; a missing tool fails the test naming its Debian package.

import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { readFile, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import { join } from 'node:path';
import * as C from '../../src/protocol/constants.js';
import { NbdClient, NbdRequestError } from '../../src/client/nbd-client.js';
import { DeviceError } from '../../src/storage/device.js';
import { MiB, KiB, makeImage, serve, tmpDir, writeAt, patternBuffer } from '../helpers/server.js';
import { requireTool } from '../helpers/tools.js';
import { NBD_CMD_MIGRATE_COMPLETE } from '../../src/migration/incoming.js';

const qemuNbd = await requireTool('qemu-nbd', 'qemu-utils');
const nbdkit = await requireTool('nbdkit', 'nbdkit');
const nbdServer = await requireTool('nbd-server', 'nbd-server');

const SIZE = 64 * MiB;
const NAME = 'disk';

// ------------------------------------------------------------------ peers

/** A port that was free a moment ago (servers that cannot listen on port 0 and report it). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

const children = new Set<number>();
process.on('exit', () => {
  for (const pid of children) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Resolves once something accepts TCP connections on the port. */
async function waitForPort(port: number, what: string, diag: () => string, gone: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (gone()) throw new Error(`${what} exited before listening on port ${port}\n${diag()}`);
    if (Date.now() > deadline) throw new Error(`${what} did not listen on port ${port} within ${timeoutMs} ms\n${diag()}`);
    await sleep(50);
  }
}

/** Spawns a foreground server, waits for its port, stops it at teardown. */
async function spawnServer(t: Test, cmd: string, args: string[], port: number): Promise<ChildProcess> {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (b: Buffer) => (out += b.toString()).length > 1e5 && (out = out.slice(-5e4)));
  proc.stderr!.on('data', (b: Buffer) => (out += b.toString()).length > 1e5 && (out = out.slice(-5e4)));
  let exited = false;
  const exit = once(proc, 'exit').then(() => (exited = true));
  if (proc.pid) children.add(proc.pid);
  t.teardown(async () => {
    if (!exited) {
      proc.kill('SIGTERM');
      const k = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exit;
      clearTimeout(k);
    }
    if (proc.pid) children.delete(proc.pid);
  });
  await waitForPort(port, `${cmd} ${args.join(' ')}`, () => out, () => exited);
  return proc;
}

interface Peer {
  name: string;
  /** Starts the server on `img` as export NAME; resolves with its URI. */
  start(t: Test, img: string, dir: string): Promise<string>;
  /** base:allocation is offered (only with structured replies). */
  extents: boolean;
  structured: boolean;
  /** The server advertises a maximum block size below 32 MiB and enforces it. */
  maxBlock?: number;
  /** Transmission flags expected set / clear. */
  flagsSet: number;
  flagsClear: number;
}

const F = C;
const PEERS: Peer[] = [
  {
    name: 'nbd-migrate',
    start: async (t, img) => (await serve(t, [img, '--name', NAME])).uri(NAME),
    extents: true,
    structured: true,
    flagsSet: F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_CAN_MULTI_CONN,
    flagsClear: F.NBD_FLAG_READ_ONLY,
  },
  {
    name: 'qemu-nbd',
    start: async (t, img) => {
      const port = await freePort();
      await spawnServer(t, qemuNbd, ['-f', 'raw', '-x', NAME, '-b', '127.0.0.1', '-p', String(port), '--persistent', '--shared=8', img], port);
      return `nbd://127.0.0.1:${port}/${NAME}`;
    },
    extents: true,
    structured: true,
    flagsSet: F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_FAST_ZERO,
    flagsClear: F.NBD_FLAG_READ_ONLY,
  },
  {
    name: 'nbdkit',
    start: async (t, img) => {
      const port = await freePort();
      // The file plugin serves any export name; the exportname filter makes unknown names fail.
      await spawnServer(
        t,
        nbdkit,
        ['-f', '--exit-with-parent', '-p', String(port), '-i', '127.0.0.1', '--exportname', NAME, '--filter=exportname', 'file', img, `exportname=${NAME}`, 'exportname-strict=true'],
        port,
      );
      return `nbd://127.0.0.1:${port}/${NAME}`;
    },
    extents: true,
    structured: true,
    flagsSet: F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_CACHE,
    flagsClear: F.NBD_FLAG_READ_ONLY,
  },
  {
    // Features taken away: no WRITE_ZEROES (nozero), a 1 MiB maximum and 512-byte minimum block
    // size that nbdkit enforces (blocksize-policy), simple replies only (--no-sr).
    name: 'nbdkit (no WRITE_ZEROES, 1 MiB max block, simple replies)',
    start: async (t, img) => {
      const port = await freePort();
      await spawnServer(
        t,
        nbdkit,
        [
          '-f',
          '--exit-with-parent',
          '--no-sr',
          '-p',
          String(port),
          '-i',
          '127.0.0.1',
          '--filter=exportname',
          '--filter=blocksize-policy',
          '--filter=nozero',
          'file',
          img,
          `exportname=${NAME}`,
          'exportname-strict=true',
          'blocksize-minimum=512',
          'blocksize-preferred=4096',
          'blocksize-maximum=1M',
          'blocksize-error-policy=error',
        ],
        port,
      );
      return `nbd://127.0.0.1:${port}/${NAME}`;
    },
    extents: false,
    structured: false,
    maxBlock: MiB,
    flagsSet: F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM,
    flagsClear: F.NBD_FLAG_READ_ONLY | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_FAST_ZERO,
  },
  {
    name: 'nbd-server (no FUA)',
    start: async (t, img, dir) => {
      const port = await freePort();
      const conf = join(dir, 'nbd-server.conf');
      const pidFile = join(dir, 'nbd-server.pid');
      await writeFile(
        conf,
        // No "fua = true": the client emulates FUA with a flush.
        `[generic]\nport = ${port}\nlistenaddr = 127.0.0.1\nallowlist = true\n\n[${NAME}]\nexportname = ${img}\nflush = true\ntrim = true\n`,
      );
      // nbd-server -d serves a single connection and exits, so it runs as a daemon and is
      // stopped through its pid file.
      const launcher = spawn(nbdServer, ['-C', conf, '-p', pidFile], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      launcher.stdout!.on('data', (b: Buffer) => (out += b.toString()));
      launcher.stderr!.on('data', (b: Buffer) => (out += b.toString()));
      const [code] = (await once(launcher, 'exit')) as [number | null];
      if (code !== 0) throw new Error(`nbd-server -C ${conf} exited with ${code}\n${out}`);
      let pid = 0;
      for (let i = 0; i < 100 && !pid; i++) {
        pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim()) || 0;
        if (!pid) await sleep(50);
      }
      if (!pid) throw new Error(`nbd-server wrote no pid file\n${out}`);
      children.add(pid);
      t.teardown(async () => {
        if (alive(pid)) process.kill(pid, 'SIGTERM');
        for (let i = 0; i < 100 && alive(pid); i++) await sleep(50);
        if (alive(pid)) process.kill(pid, 'SIGKILL');
        children.delete(pid);
      });
      await waitForPort(port, 'nbd-server', () => out, () => !alive(pid));
      return `nbd://127.0.0.1:${port}/${NAME}`;
    },
    extents: false,
    structured: false,
    flagsSet: F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES,
    flagsClear: F.NBD_FLAG_READ_ONLY | F.NBD_FLAG_SEND_FUA,
  },
];

// ------------------------------------------------------------------ helpers

async function rejectsCode(t: Test, p: Promise<unknown>, code: string, msg: string): Promise<Error | undefined> {
  try {
    await p;
    t.fail(`${msg}: resolved`);
    return undefined;
  } catch (e) {
    t.ok(e instanceof DeviceError, `${msg}: DeviceError`, { error: e });
    t.equal((e as DeviceError).code, code, `${msg}: ${code}`, { error: e });
    return e as Error;
  }
}

/** Walks extents() over [offset, offset+length); checks they tile it exactly. */
async function walkExtents(t: Test, c: NbdClient, offset: number, length: number): Promise<Array<{ offset: number; length: number; flags: number }>> {
  const out: Array<{ offset: number; length: number; flags: number }> = [];
  let pos = offset;
  let calls = 0;
  while (pos < offset + length) {
    const ext = await c.extents(pos, offset + length - pos, 64);
    calls++;
    if (ext.length === 0 || ext.some((e) => !(e.length > 0))) {
      t.fail('extents() returned an empty list or a zero-length extent', { ext });
      break;
    }
    for (const e of ext) {
      out.push({ offset: pos, length: e.length, flags: e.flags });
      pos += e.length;
    }
    if (calls > 10_000) throw new Error('extents walk does not terminate');
  }
  t.equal(pos, offset + length, 'extents tile the range exactly');
  return out;
}

// ------------------------------------------------------------------ tests

for (const peer of PEERS) {
  t.test(peer.name, async (t) => {
    const dir = await tmpDir(t, 'nbd-client-peers-');
    const img = await makeImage(join(dir, 'disk.img'), SIZE); // sparse
    // Data in [0, 1M) and [8M, 9M); holes elsewhere.
    const model = Buffer.alloc(SIZE);
    const d0 = randomBytes(MiB);
    const d8 = randomBytes(MiB);
    await writeAt(img, 0, d0);
    await writeAt(img, 8 * MiB, d8);
    d0.copy(model, 0);
    d8.copy(model, 8 * MiB);
    const uri = await peer.start(t, img, dir);

    const client = await NbdClient.connect(uri, { maxInflightRequests: 16 });
    t.teardown(() => client.destroy());
    let closeErr: unknown = 'not closed';
    client.on('close', (e?: Error) => (closeErr = e));
    const modelWrite = (off: number, data: Buffer) => data.copy(model, off);
    const modelZero = (off: number, len: number) => model.fill(0, off, off + len);
    const readBack = async (off: number, len: number) => {
      const b = Buffer.alloc(len, 0xcd);
      await client.read(off, len, b, 0);
      return b;
    };

    t.test('negotiated facts', async (t) => {
      t.equal(client.size, SIZE, 'size');
      t.equal(client.exportName, NAME);
      t.equal(client.structuredReplies, peer.structured, `structured replies: ${peer.structured}`);
      t.equal(client.contexts.has(C.BASE_ALLOCATION), peer.extents, `base:allocation: ${peer.extents}`);
      t.equal(client.transmissionFlags & peer.flagsSet, peer.flagsSet, `flags 0x${client.transmissionFlags.toString(16)} include 0x${peer.flagsSet.toString(16)}`);
      t.equal(client.transmissionFlags & peer.flagsClear, 0, `flags exclude 0x${peer.flagsClear.toString(16)}`);
      if (peer.maxBlock) t.equal(client.blockSize.maximum, peer.maxBlock, 'the maximum block size is recorded');
      t.equal(client.readOnly, false);
      t.comment(`${peer.name}: flags 0x${client.transmissionFlags.toString(16)}, block size ${JSON.stringify(client.blockSize)}, contexts ${JSON.stringify([...client.contexts])}`);
    });

    t.test('extents on a sparse image', async (t) => {
      const ext = await walkExtents(t, client, 0, SIZE);
      for (const e of ext) {
        if (e.flags & C.NBD_STATE_ZERO) {
          const s = model.subarray(e.offset, e.offset + e.length);
          if (!s.every((b) => b === 0)) t.fail(`extent ${e.offset}+${e.length} claims zeros over data`);
        }
      }
      const hole = await client.extents(2 * MiB, MiB, 16);
      if (peer.extents) {
        t.ok(hole.length >= 1 && hole[0]!.flags & C.NBD_STATE_ZERO, 'a hole reads as zero', { hole });
        t.ok(ext.some((e) => e.offset < MiB && !(e.flags & C.NBD_STATE_ZERO)), 'the data at 0 is data');
      } else {
        t.same(hole, [{ length: MiB, flags: 0 }], 'no base:allocation: one data extent');
        t.same(ext, [{ offset: 0, length: SIZE, flags: 0 }], 'the whole disk is one data extent');
      }
      t.same(await client.extents(SIZE - 4096, 1 << 30, 4).then((x) => x.reduce((n, e) => n + e.length, 0)), 4096, 'capped at the export end');
      const one = await client.extents(0, SIZE, 1);
      t.equal(one.length, 1, 'maxExtents 1: one extent');
    });

    t.test('reads of data and holes', async (t) => {
      t.ok((await readBack(0, 2 * MiB)).equals(model.subarray(0, 2 * MiB)), 'data then hole (zero-filled)');
      t.ok((await readBack(7 * MiB + 512, 2 * MiB)).equals(model.subarray(7 * MiB + 512, 9 * MiB + 512)), 'hole then data');
    });

    t.test('write/read round trip, including requests above 32 MiB', async (t) => {
      const small = patternBuffer(64 * KiB, 3);
      await client.write(3 * MiB, [small], { fua: false });
      modelWrite(3 * MiB, small);
      t.ok((await readBack(3 * MiB, 64 * KiB)).equals(small), '64 KiB');

      // 40 MiB in three buffers: one request would exceed every server's maximum.
      const big = patternBuffer(40 * MiB, 7);
      await client.write(16 * MiB, [big.subarray(0, 5 * MiB + 123), big.subarray(5 * MiB + 123, 33 * MiB), big.subarray(33 * MiB)], { fua: true });
      modelWrite(16 * MiB, big);
      const back = await readBack(16 * MiB, 40 * MiB);
      t.ok(back.equals(big), '40 MiB written and read back (split by the client)');

      if (client.blockSize.minimum === 1) {
        const odd = patternBuffer(12345, 9);
        await client.write(4097, [odd], { fua: false });
        modelWrite(4097, odd);
        t.ok((await readBack(4000, 12345 + 200)).equals(model.subarray(4000, 4000 + 12345 + 200)), 'unaligned write and read');
      }
      await client.flush();
      t.pass('flush');
    });

    t.test('zero and trim', async (t) => {
      await client.zero(17 * MiB, 2 * MiB, { fua: false, noHole: false, fast: false });
      modelZero(17 * MiB, 2 * MiB);
      await client.zero(20 * MiB + 4096, 8192, { fua: true, noHole: true, fast: false });
      modelZero(20 * MiB + 4096, 8192);
      t.ok((await readBack(16 * MiB, 8 * MiB)).equals(model.subarray(16 * MiB, 24 * MiB)), 'zeroed ranges read as zero, the rest is intact');

      const fast = await client.zero(21 * MiB, MiB, { fua: false, noHole: false, fast: true }).then(
        () => 'ok',
        (e: DeviceError) => e.code,
      );
      t.ok(fast === 'ok' || fast === 'ENOTSUP', `fast zero: ${fast}`);
      if (fast === 'ok') modelZero(21 * MiB, MiB);
      if (!(client.transmissionFlags & C.NBD_FLAG_SEND_FAST_ZERO)) t.equal(fast, 'ENOTSUP', 'no FAST_ZERO: ENOTSUP');
      t.ok((await readBack(21 * MiB, MiB)).equals(model.subarray(21 * MiB, 22 * MiB)), 'fast zero did what it said');

      // Trim leaves the contents unspecified: overwrite afterwards and check.
      await client.trim(30 * MiB, 4 * MiB, { fua: false });
      await client.trim(40 * MiB, MiB, { fua: true });
      const fill = patternBuffer(4 * MiB, 11);
      await client.write(30 * MiB, [fill], { fua: false });
      modelWrite(30 * MiB, fill);
      t.ok((await readBack(30 * MiB, 4 * MiB)).equals(fill), 'trim then write');
      await client.zero(40 * MiB, MiB, { fua: false, noHole: false, fast: false });
      modelZero(40 * MiB, MiB);
    });

    t.test('errors map to errno names', async (t) => {
      const e = await rejectsCode(t, client.read(SIZE - 512, 4096, Buffer.alloc(4096), 0), 'EINVAL', 'read beyond the end');
      if (e) {
        t.equal((e as NbdRequestError).nbdErrno, C.NBD_EINVAL, 'NBD error 22');
        t.comment(`${peer.name}: ${e.message}`);
      }
      const w = await client.write(SIZE - 512, [Buffer.alloc(4096)], { fua: false }).then(
        () => 'ok',
        (x: DeviceError) => x.code,
      );
      t.ok(w === 'ENOSPC' || w === 'EINVAL', `write beyond the end: ${w}`);
      // The connection survives errors.
      t.ok((await readBack(0, 4096)).equals(model.subarray(0, 4096)), 'still usable');
      if (peer.maxBlock) {
        // The server really enforces its maximum: request() is not split.
        await rejectsCode(t, client.request(C.NBD_CMD_WRITE, 0, 0, 2 * peer.maxBlock, [Buffer.alloc(2 * peer.maxBlock)]), 'EINVAL', 'an unsplit request above the maximum');
        t.ok((await readBack(0, 4096)).equals(model.subarray(0, 4096)), 'nothing was written');
      }
    });

    t.test('many concurrent requests, bounded in flight', async (t) => {
      let maxSeen = 0;
      const sample = setInterval(() => (maxSeen = Math.max(maxSeen, client.stats.inflightRequests)), 1);
      const bufs = Array.from({ length: 200 }, (_, i) => patternBuffer(64 * KiB, 100 + i));
      await Promise.all(bufs.map((b, i) => client.write(24 * MiB + i * 64 * KiB, [b], { fua: false })));
      bufs.forEach((b, i) => modelWrite(24 * MiB + i * 64 * KiB, b));
      const outs = bufs.map(() => Buffer.alloc(64 * KiB));
      await Promise.all(outs.map((o, i) => client.read(24 * MiB + i * 64 * KiB, 64 * KiB, o, 0)));
      t.ok(outs.every((o, i) => o.equals(bufs[i]!)), '200 x 64 KiB written and read back concurrently');

      // Mixed: 1 MiB reads and writes at once (both socket directions busy).
      const ws = Array.from({ length: 24 }, (_, i) => patternBuffer(MiB, 500 + i));
      const rs = Array.from({ length: 24 }, () => Buffer.alloc(MiB));
      await Promise.all([
        ...ws.map((b, i) => client.write(40 * MiB + i * MiB, [b], { fua: false })),
        ...rs.map((b, i) => client.read(16 * MiB + i * MiB, MiB, b, 0)),
      ]);
      ws.forEach((b, i) => modelWrite(40 * MiB + i * MiB, b));
      t.ok(rs.every((b, i) => b.equals(model.subarray(16 * MiB + i * MiB, 17 * MiB + i * MiB))), 'concurrent reads saw stable data');
      clearInterval(sample);
      t.ok(maxSeen <= 16, `never more than 16 requests in flight (saw ${maxSeen})`);
      t.ok(maxSeen > 1, 'requests were pipelined');
    });

    t.test('a missing export fails clearly', async (t) => {
      const missing = uri.replace(/\/disk$/, '/no-such-export');
      const err = (await NbdClient.connect(missing).catch((e) => e)) as Error;
      t.ok(err instanceof Error, 'connect rejects');
      t.match(err.message, missing, 'names the URI');
      t.match(err.message, /refused export "no-such-export" \(NBD_REP_ERR_\w+ in reply to NBD_OPT_GO\)/, 'says why');
      t.comment(`${peer.name}: ${err.message}`);
    });

    t.test('close, then the image holds exactly what was written', async (t) => {
      await client.flush();
      await client.close();
      t.equal(closeErr, undefined, "'close' without an error");
      await rejectsCode(t, client.read(0, 512, Buffer.alloc(512), 0), 'EPIPE', 'calls after close()');
      const file = await readFile(img);
      t.equal(file.length, SIZE);
      t.ok(file.equals(model), 'image file == model');
    });
  });
}

t.test('nbd-migrate only: Unix socket, read-only export, oldstyle, custom command', async (t) => {
  const dir = await tmpDir(t, 'nbd-client-peers-');
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB, { fill: 0x42 });
  const ro = await makeImage(join(dir, 'ro.img'), MiB, { fill: 0x24 });
  const sock = join(dir, 'nbd.sock');
  const srv = await serve(t, [img, '--name', NAME, '--oldstyle-port', '0', '--socket', sock, '--export', `ro=${ro},read-only`]);

  const u = await NbdClient.connect(srv.unixUri(NAME));
  const b = Buffer.alloc(4096);
  await u.read(0, 4096, b, 0);
  t.ok(b.every((x) => x === 0x42), 'read over nbd+unix');
  await u.close();

  const r = await NbdClient.connect(srv.uri('ro'));
  t.equal(r.readOnly, true, 'read-only export');
  await rejectsCode(t, r.write(0, [Buffer.alloc(512)], { fua: false }), 'EPERM', 'write to a read-only export');
  await rejectsCode(t, r.zero(0, 512, { fua: false, noHole: false, fast: false }), 'EPERM', 'zero on a read-only export');
  await r.read(0, 4096, b, 0);
  t.ok(b.every((x) => x === 0x24), 'reads work');
  await r.close();

  const old = (await NbdClient.connect(srv.oldstyleUri(NAME)).catch((e) => e)) as Error;
  t.match(old.message, /oldstyle negotiation, which is not supported/, 'oldstyle server refused clearly');

  const c = await NbdClient.connect(srv.uri(NAME));
  await rejectsCode(t, c.request(NBD_CMD_MIGRATE_COMPLETE, 0, 0, 0), 'EINVAL', 'MIGRATE_COMPLETE without the incoming context');
  await rejectsCode(t, c.request(0x7777, 0, 0, 0), 'EINVAL', 'an unknown command');
  const ok = Buffer.alloc(512);
  await c.read(0, 512, ok, 0);
  t.ok(ok.every((x) => x === 0x42), 'the connection survives refused custom commands');
  await c.close();
});
