// Peer servers the tests and the bench start: qemu-nbd and nbdkit on
// loopback ports, and qemu-img compare.
import { spawn, type ChildProcess } from 'node:child_process';
import { waitForPort } from './net.js';
import { requireTool, run, type RunResult } from './tools.js';

export interface Proc {
  proc: ChildProcess;
  stderr(): string;
  stop(): Promise<void>;
}

const peers = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of peers) p.kill('SIGKILL');
});

/**
 * A peer server process listening on 127.0.0.1:port; stop() kills it and waits
 * for the exit. One that exits before listening fails at once, with its stderr.
 */
export async function startPeer(cmd: string, debPackage: string, args: string[], port: number): Promise<Proc> {
  await requireTool(cmd, debPackage);
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  peers.add(proc);
  let err = '';
  let spawnError: Error | undefined;
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  proc.once('error', (e) => (spawnError = e));
  const exited = new Promise<void>((r) =>
    proc.once('exit', () => {
      peers.delete(proc);
      r();
    }),
  );
  const stop = async () => {
    if (proc.pid !== undefined && proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    if (proc.pid !== undefined) await exited;
    peers.delete(proc);
  };
  const gone = () =>
    spawnError
      ? `${cmd} could not start: ${spawnError.message}`
      : proc.exitCode !== null || proc.signalCode !== null
        ? `${cmd} exited (${proc.exitCode ?? proc.signalCode}) before listening`
        : undefined;
  try {
    await waitForPort(port, 10_000, gone);
  } catch (e) {
    await stop();
    throw new Error(`${(e as Error).message}\n  command: ${cmd} ${args.join(' ')}\n  stderr: ${err.trim() || '(empty)'}`);
  }
  return { proc, stderr: () => err, stop };
}

/** qemu-nbd's arguments for qemuNbd(); `extra` may replace the default --shared=8. */
export function qemuNbdArgs(img: string, name: string, port: number, extra: string[] = []): string[] {
  const shared = extra.some((a) => a.startsWith('--shared')) ? [] : ['--shared=8'];
  return ['-f', 'raw', '-x', name, '-b', '127.0.0.1', '-p', String(port), '--persistent', ...shared, ...extra, img];
}

/** qemu-nbd serving `img` as export `name` on 127.0.0.1:port, persistent (survives client disconnects). */
export function qemuNbd(img: string, name: string, port: number, extra: string[] = []): Promise<Proc> {
  return startPeer('qemu-nbd', 'qemu-utils', qemuNbdArgs(img, name, port, extra), port);
}

/** nbdkit's arguments for nbdkit(). */
export function nbdkitArgs(port: number, args: string[]): string[] {
  return ['-f', '-i', '127.0.0.1', '-p', String(port), ...args];
}

/** nbdkit serving `plugin ARGS` on 127.0.0.1:port in the foreground (filters as `--filter=NAME` in args). */
export function nbdkit(port: number, args: string[]): Promise<Proc> {
  return startPeer('nbdkit', 'nbdkit', nbdkitArgs(port, args), port);
}

/** qemu-img compare of two images (files or NBD URIs), raw. */
export async function compare(a: string, b: string): Promise<RunResult> {
  await requireTool('qemu-img', 'qemu-utils');
  return run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', '-U', a, b], { timeoutMs: 120_000 });
}
