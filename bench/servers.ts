/**
 * The three NBD servers compared, each started on 127.0.0.1 with a free port,
 * serving the same raw image under the export name "bench".
 *
 * Fairness: the image sits on tmpfs and every server goes through the page
 * cache (nbd-migrate always does: pread/pwritev on libuv's thread pool), and
 * none of them flushes unless the client asks (fio's nbd engine sends no FUA
 * and no FLUSH in these jobs).
 *  - qemu-nbd: --cache=writeback is its default and the page-cache mode that
 *    matches ours (cache=none is O_DIRECT, which tmpfs may refuse and which
 *    would measure something else; writethrough would fdatasync every write).
 *    --aio=threads (the default) is a thread pool like libuv's; io_uring and
 *    native would be a different architecture. --persistent because each fio
 *    run is a new connection; --shared=16 lets the readiness probe and fio
 *    overlap harmlessly.
 *  - nbdkit file plugin: cache=default (page cache) and its default 16-thread
 *    parallel thread model. --exportname only matters with --run (nbdkit's
 *    file plugin serves the file under any export name), so fio's /bench
 *    works unchanged. --exit-with-parent guards against a crashed benchmark.
 *  - nbd-migrate: the CLI as shipped, logging only warnings; UV_THREADPOOL_SIZE
 *    etc. pass through from the benchmark's environment if set.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import { exited, stopChild, Tail } from './proc.js';

export const SERVER_NAMES = ['nbd-migrate', 'qemu-nbd', 'nbdkit'] as const;
export type ServerName = (typeof SERVER_NAMES)[number];

export const EXPORT_NAME = 'bench';
export const HOST = '127.0.0.1';

/** The executable each server needs, and the Debian package that ships it. */
export const SERVER_TOOLS: Record<ServerName, { cmd: string; pkg: string }> = {
  'nbd-migrate': { cmd: 'node', pkg: 'nodejs' },
  'qemu-nbd': { cmd: 'qemu-nbd', pkg: 'qemu-utils' },
  nbdkit: { cmd: 'nbdkit', pkg: 'nbdkit' },
};

export interface ServerOptions {
  image: string;
  port: number;
  /** nbd-migrate's bin script. */
  nbdMigrateBin: string;
  repoRoot: string;
}

/** The command line that serves `image` on `port` (cwd is the repo root). */
export function serverCommand(name: ServerName, o: ServerOptions): { cmd: string; args: string[] } {
  switch (name) {
    case 'nbd-migrate':
      return {
        cmd: process.execPath,
        args: [o.nbdMigrateBin, 'serve', o.image, '--name', EXPORT_NAME, '--listen', HOST, '--port', String(o.port), '--log-format', 'json', '--log-level', 'warn'],
      };
    case 'qemu-nbd':
      return {
        cmd: 'qemu-nbd',
        args: ['-f', 'raw', '-x', EXPORT_NAME, '-b', HOST, '-p', String(o.port), '--persistent', '--shared=16', '--cache=writeback', '--aio=threads', o.image],
      };
    case 'nbdkit':
      return {
        cmd: 'nbdkit',
        args: ['-f', '--exit-with-parent', '-i', HOST, '-p', String(o.port), '--exportname', EXPORT_NAME, 'file', `file=${o.image}`],
      };
  }
}

/** A free TCP port on 127.0.0.1 (the kernel picks it; we release it for the server to bind). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, HOST, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('could not get a free port'))));
    });
  });
}

/** True if something on the port speaks NBD: the server's greeting starts with "NBDMAGIC". */
export function probeNbd(port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    let got = Buffer.alloc(0);
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.on('error', () => done(false));
    sock.on('data', (b: Buffer) => {
      got = Buffer.concat([got, b]);
      if (got.length >= 8) done(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    sock.on('end', () => done(false));
  });
}

export class ServerStartError extends Error {
  override readonly name = 'ServerStartError';
}

export interface RunningServer {
  name: ServerName;
  port: number;
  pid: number;
  uri: string;
  /** True while the process is alive. */
  alive(): boolean;
  /** The last few KB of its stderr. */
  stderr(): string;
  stop(): Promise<void>;
}

/** Servers started and not yet stopped, so an interrupt can stop them. */
export const runningServers = new Set<RunningServer>();

export async function startServer(name: ServerName, o: ServerOptions, readyTimeoutMs = 20_000): Promise<RunningServer> {
  const { cmd, args } = serverCommand(name, o);
  const tail = new Tail();
  const child: ChildProcess = spawn(cmd, args, { cwd: o.repoRoot, stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr?.on('data', (b: Buffer) => tail.push(b));
  const spawnFailed = new Promise<string>((resolve) => child.once('error', (e) => resolve(`could not start: ${e.message}`)));
  const exitedEarly = exited(child).then(() => `exited (${child.exitCode ?? child.signalCode}) before serving`);
  const alive = () => child.exitCode === null && child.signalCode === null;
  const server: RunningServer = {
    name,
    port: o.port,
    pid: child.pid ?? -1,
    uri: `nbd://${HOST}:${o.port}/${EXPORT_NAME}`,
    alive,
    stderr: () => tail.toString(),
    stop: async () => {
      await stopChild(child);
      runningServers.delete(server);
    },
  };
  runningServers.add(server);

  const describe = () => `${cmd} ${args.join(' ')}`;
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    const failed = await Promise.race([
      spawnFailed,
      exitedEarly,
      probeNbd(o.port, 1000).then((ok) => (ok ? null : undefined)),
    ]);
    if (failed === null) return server;
    if (typeof failed === 'string') {
      await server.stop();
      throw new ServerStartError(`${name} ${failed}\n  command: ${describe()}\n  stderr: ${tail.toString().trim() || '(empty)'}`);
    }
    if (Date.now() > deadline) {
      await server.stop();
      throw new ServerStartError(`${name} did not answer NBD on port ${o.port} within ${readyTimeoutMs} ms\n  command: ${describe()}\n  stderr: ${tail.toString().trim() || '(empty)'}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
