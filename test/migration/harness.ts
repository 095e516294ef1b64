// Shared pieces of the migration tests: qemu-nbd targets, the writer, ctl.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { jobStatus, waitForJob } from '../helpers/admin.js';
import { freePort, waitForPort } from '../helpers/net.js';
import { CLI, REPO_ROOT } from '../helpers/server.js';
import { requirePythonNbd, requireTool, run, SYSTEM_PYTHON, type RunResult } from '../helpers/tools.js';

export const WRITER = path.join(REPO_ROOT, 'test', 'migration', 'writer.py');

export { freePort, waitForPort };

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

export interface Writer {
  stop(): Promise<{ writes: number; errors: number; maxLatencyMs: number; firstError: string | null }>;
}

/** Starts the python3-libnbd writer; stop() ends it and returns its counts. */
export async function startWriter(uri: string, shadow: string, dir: string, opts: { block?: number; region?: number; seed?: number } = {}): Promise<Writer> {
  await requirePythonNbd();
  const stopfile = path.join(dir, `stop-${Math.random().toString(36).slice(2)}`);
  const done: Promise<RunResult> = run(SYSTEM_PYTHON, [WRITER, uri, shadow, stopfile, String(opts.block ?? 4096), String(opts.region ?? 0)], {
    timeoutMs: 300_000,
    env: { ...process.env, WRITER_SEED: String(opts.seed ?? 1) },
  });
  return {
    stop: async () => {
      fs.writeFileSync(stopfile, '');
      const r = await done;
      const line = r.stdout.trim().split('\n').pop() ?? '';
      try {
        return JSON.parse(line);
      } catch {
        throw new Error(`writer failed: code ${r.code}\n${r.stderr}\n${r.stdout}`);
      }
    },
  };
}

/** Runs `nbd-migrate ARGS` as the operator would. */
export function cli(args: string[], timeoutMs = 120_000): Promise<RunResult> {
  return run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { timeoutMs, cwd: REPO_ROOT });
}

export { jobStatus, waitForJob };

/** qemu-img compare of two images (files or NBD URIs), raw. */
export async function compare(a: string, b: string): Promise<RunResult> {
  await requireTool('qemu-img', 'qemu-utils');
  return run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', '-U', a, b], { timeoutMs: 120_000 });
}
