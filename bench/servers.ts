/**
 * The three NBD servers compared (and two variants of nbd-migrate), each started on 127.0.0.1 with a free port,
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
import type { ChildProcess } from 'node:child_process';
import { freePort } from '../test/helpers/net.js';
import { startServer as startNbdMigrate } from '../test/helpers/server.js';
import { nbdkit, nbdkitArgs, qemuNbd, qemuNbdArgs } from '../test/helpers/peers.js';

export { freePort };

/**
 * Variants of nbd-migrate, each compared with the plain server in a line under the table:
 * nbd-migrate-metrics has --metrics on (the goal is no difference); nbd-migrate-nopoll has
 * busy polling off (--busy-poll-us 0: what polling buys, mostly at queue depth 1).
 */
export const SERVER_NAMES = ['nbd-migrate', 'nbd-migrate-metrics', 'nbd-migrate-nopoll', 'qemu-nbd', 'nbdkit'] as const;
export type ServerName = (typeof SERVER_NAMES)[number];
/** nbd-migrate and its variants (the same server, other settings). */
type NbdMigrateName = Extract<ServerName, `nbd-migrate${string}`>;

export const EXPORT_NAME = 'bench';
export const HOST = '127.0.0.1';

/** The executable each server needs, and the Debian package that ships it. */
export const SERVER_TOOLS: Record<ServerName, { cmd: string; pkg: string }> = {
  'nbd-migrate': { cmd: 'node', pkg: 'nodejs' },
  'nbd-migrate-metrics': { cmd: 'node', pkg: 'nodejs' },
  'nbd-migrate-nopoll': { cmd: 'node', pkg: 'nodejs' },
  'qemu-nbd': { cmd: 'qemu-nbd', pkg: 'qemu-utils' },
  nbdkit: { cmd: 'nbdkit', pkg: 'nbdkit' },
};

export interface ServerOptions {
  image: string;
  port: number;
  /** nbd-migrate's bin script. */
  nbdMigrateBin: string;
  /** nbd-migrate-metrics: the port of its /metrics listener. */
  metricsPort?: number;
}

/** qemu-nbd's settings beyond qemuNbd()'s defaults (see the top of this file). */
const QEMU_NBD_SETTINGS = ['--shared=16', '--cache=writeback', '--aio=threads'];

/** nbdkit's file plugin serving `image` as `name` (the plugin serves any name; it matters only with --run). */
export function nbdkitFileArgs(image: string, name: string): string[] {
  return ['--exit-with-parent', '--exportname', name, 'file', `file=${image}`];
}

/** `nbd-migrate serve`'s arguments after "serve", for the plain server and its variants. */
function nbdMigrateArgs(o: ServerOptions, variant: NbdMigrateName, metricsPort: number | string = o.metricsPort ?? 'PORT'): string[] {
  const args = [o.image, '--name', EXPORT_NAME, '--listen', HOST, '--port', String(o.port), '--log-format', 'json', '--log-level', 'warn'];
  if (variant === 'nbd-migrate-metrics') args.push('--metrics', `${HOST}:${metricsPort}`);
  if (variant === 'nbd-migrate-nopoll') args.push('--busy-poll-us', '0');
  return args;
}

/** The command line that serves `image` on `port`. */
export function serverCommand(name: ServerName, o: ServerOptions): { cmd: string; args: string[] } {
  switch (name) {
    case 'nbd-migrate':
    case 'nbd-migrate-metrics':
    case 'nbd-migrate-nopoll':
      return { cmd: process.execPath, args: [o.nbdMigrateBin, 'serve', ...nbdMigrateArgs(o, name)] };
    case 'qemu-nbd':
      return { cmd: 'qemu-nbd', args: qemuNbdArgs(o.image, EXPORT_NAME, o.port, QEMU_NBD_SETTINGS) };
    case 'nbdkit':
      return { cmd: 'nbdkit', args: nbdkitArgs(o.port, nbdkitFileArgs(o.image, EXPORT_NAME)) };
  }
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
  /** Its stderr so far. */
  stderr(): string;
  stop(): Promise<void>;
}

/**
 * Starts one server and resolves once its port accepts connections
 * (nbd-migrate logs only warnings here, so not its "ready" event).
 */
export async function startServer(name: ServerName, o: ServerOptions): Promise<RunningServer> {
  let h: { proc: ChildProcess; stderr(): string; stop(): Promise<void> };
  try {
    switch (name) {
      case 'nbd-migrate':
      case 'nbd-migrate-nopoll':
        h = await startNbdMigrate(nbdMigrateArgs(o, name), { cli: o.nbdMigrateBin, readyPort: o.port });
        break;
      case 'nbd-migrate-metrics':
        h = await startNbdMigrate(nbdMigrateArgs(o, name, o.metricsPort ?? (await freePort())), { cli: o.nbdMigrateBin, readyPort: o.port });
        break;
      case 'qemu-nbd':
        h = await qemuNbd(o.image, EXPORT_NAME, o.port, QEMU_NBD_SETTINGS);
        break;
      case 'nbdkit':
        h = await nbdkit(o.port, nbdkitFileArgs(o.image, EXPORT_NAME));
        break;
    }
  } catch (e) {
    throw new ServerStartError(`${name} did not start: ${(e as Error).message}`);
  }
  const { proc } = h;
  return {
    name,
    port: o.port,
    pid: proc.pid ?? -1,
    uri: `nbd://${HOST}:${o.port}/${EXPORT_NAME}`,
    alive: () => proc.exitCode === null && proc.signalCode === null,
    stderr: () => h.stderr(),
    stop: () => h.stop(),
  };
}
