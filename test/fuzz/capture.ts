// Regenerates the fuzz corpus (test/fuzz/corpus/*.bin): the client side of
// real sessions, recorded by a TCP proxy between real NBD clients (qemu-img,
// qemu-io, nbdinfo, python3-libnbd) and an nbd-migrate server configured like
// the fuzz server (export "vm1" of 64 MiB).
//
//   npm run build && node --import @tapjs/typescript/import test/fuzz/capture.ts
//
// Each .bin file holds exactly what one client connection sent.

import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeImage, startServer, writeAt } from '../helpers/server.js';
import { run, requirePythonNbd, requireTool } from '../helpers/tools.js';
import { FUZZ_EXPORTS } from './lib/generate.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const OUT = join(HERE, 'corpus');

interface Proxy {
  port: number;
  sessions: Buffer[][];
  close(): Promise<void>;
}

/** A loopback TCP proxy that records what each client sends. */
function proxy(targetPort: number): Promise<Proxy> {
  const sessions: Buffer[][] = [];
  const server = net.createServer((client) => {
    const rec: Buffer[] = [];
    sessions.push(rec);
    const up = net.connect({ host: '127.0.0.1', port: targetPort });
    client.on('data', (d: Buffer) => {
      rec.push(Buffer.from(d));
      up.write(d);
    });
    up.on('data', (d: Buffer) => client.write(d));
    client.on('end', () => up.end());
    up.on('end', () => client.end());
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      resolve({ port, sessions, close: () => new Promise((r) => server.close(() => r())) });
    });
  });
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'nbd-migrate-capture-'));
  const vm1 = await makeImage(join(dir, 'vm1.img'), FUZZ_EXPORTS.vm1.size);
  await writeAt(vm1, 1024 * 1024, Buffer.alloc(256 * 1024, 0x5a));
  const ro = await makeImage(join(dir, 'ro.img'), FUZZ_EXPORTS.ro.size, { fill: 'random' });
  const srv = await startServer([vm1, '--name', 'vm1', '--oldstyle-port', '0', '--export', `ro=${ro},read-only`]);
  const qemuImg = await requireTool('qemu-img', 'qemu-utils');
  const qemuIo = await requireTool('qemu-io', 'qemu-utils');
  const nbdinfo = await requireTool('nbdinfo', 'libnbd-bin');
  const py = await requirePythonNbd();
  await mkdir(OUT, { recursive: true });

  const pyScript = `
import nbd, sys
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.connect_uri(sys.argv[1])
buf = b'\\xa5' * 4096
h.pwrite(buf, 8192, nbd.CMD_FLAG_FUA)
h.pread(4096, 8192)
h.pread_structured(512, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
h.zero(65536, 131072)
h.zero(65536, 262144, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 393216)
h.cache(65536, 0)
h.block_status(1 << 20, 0, lambda *a: 0)
h.block_status(1 << 20, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.flush()
h.shutdown()
`;
  const jobs: Array<{ name: string; port: () => number; cmd: (p: number) => [string, string[]] }> = [
    { name: 'qemu-img-info', port: () => srv.newstylePort, cmd: (p) => [qemuImg, ['info', '-f', 'raw', `nbd://127.0.0.1:${p}/vm1`]] },
    { name: 'qemu-img-map', port: () => srv.newstylePort, cmd: (p) => [qemuImg, ['map', '-f', 'raw', '--output=json', `nbd://127.0.0.1:${p}/vm1`]] },
    {
      name: 'qemu-io-write',
      port: () => srv.newstylePort,
      cmd: (p) => [
        qemuIo,
        ['-f', 'raw', '-c', 'write -P 0xab 4096 4096', '-c', 'read -P 0xab 4096 4096', '-c', 'write -z 131072 65536', '-c', 'discard 262144 65536', '-c', 'flush', `nbd://127.0.0.1:${p}/vm1`],
      ],
    },
    { name: 'nbdinfo', port: () => srv.newstylePort, cmd: (p) => [nbdinfo, [`nbd://127.0.0.1:${p}/vm1`]] },
    { name: 'nbdinfo-map', port: () => srv.newstylePort, cmd: (p) => [nbdinfo, ['--map', `nbd://127.0.0.1:${p}/vm1`]] },
    { name: 'nbdinfo-list', port: () => srv.newstylePort, cmd: (p) => [nbdinfo, ['--list', `nbd://127.0.0.1:${p}`]] },
    { name: 'libnbd-ops', port: () => srv.newstylePort, cmd: (p) => [py, ['-c', pyScript, `nbd://127.0.0.1:${p}/vm1`]] },
    { name: 'oldstyle-qemu-io', port: () => srv.oldstylePort('vm1'), cmd: (p) => [qemuIo, ['-f', 'raw', '-c', 'read 0 65536', '-c', 'write -P 0x11 0 512', `nbd:127.0.0.1:${p}`]] },
  ];
  try {
    for (const j of jobs) {
      const px = await proxy(j.port());
      const [cmd, args] = j.cmd(px.port);
      const r = await run(cmd, args, { timeoutMs: 60_000 });
      await new Promise((res) => setTimeout(res, 200));
      await px.close();
      if (r.code !== 0) console.error(`${j.name}: exit ${r.code}\n${r.stderr}`);
      let n = 0;
      for (const s of px.sessions) {
        const bytes = Buffer.concat(s);
        if (bytes.length === 0) continue;
        const file = join(OUT, `${j.name}-${n++}.bin`);
        await writeFile(file, bytes);
        console.log(`${file}: ${bytes.length} bytes`);
      }
    }
  } finally {
    await srv.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
