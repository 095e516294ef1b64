// Shared pieces of the migration tests: qemu-nbd targets, the writer, ctl.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { adminRequest } from '../../src/admin/server.js';
import type { JobStatus } from '../../src/migration/job.js';
import { CLI, REPO_ROOT } from '../helpers/server.js';
import { requirePythonNbd, requireTool, run, SYSTEM_PYTHON, type RunResult } from '../helpers/tools.js';

export const WRITER = path.join(REPO_ROOT, 'test', 'migration', 'writer.py');

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export async function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`nothing listening on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface Proc {
  proc: ChildProcess;
  stderr(): string;
  stop(): Promise<void>;
}

/** A peer server process listening on 127.0.0.1:port; stop() kills it and waits for the exit. */
async function startPeer(cmd: string, debPackage: string, args: string[], port: number): Promise<Proc> {
  await requireTool(cmd, debPackage);
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  await waitForPort(port, 10_000);
  return {
    proc,
    stderr: () => err,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

/** qemu-nbd serving `img` as export `name` on 127.0.0.1:port, persistent (survives client disconnects). */
export function qemuNbd(img: string, name: string, port: number, extra: string[] = []): Promise<Proc> {
  return startPeer('qemu-nbd', 'qemu-utils', ['-f', 'raw', '-x', name, '-b', '127.0.0.1', '-p', String(port), '--persistent', '--shared=8', ...extra, img], port);
}

/** nbdkit serving `plugin ARGS` on 127.0.0.1:port in the foreground (filters as `--filter=NAME` in args). */
export function nbdkit(port: number, args: string[]): Promise<Proc> {
  return startPeer('nbdkit', 'nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...args], port);
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

export function jobStatus(socket: string, exportName: string): Promise<JobStatus> {
  return adminRequest(socket, { cmd: 'status', export: exportName }) as Promise<JobStatus>;
}

export async function waitForJob(socket: string, exportName: string, pred: (s: JobStatus) => boolean, timeoutMs = 120_000): Promise<JobStatus> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const s = await jobStatus(socket, exportName);
    if (pred(s)) return s;
    if (s.state === 'failed') throw new Error(`job failed: ${s.error}`);
    if (Date.now() > end) throw new Error(`timed out waiting on the job; last status ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** qemu-img compare of two images (files or NBD URIs), raw. */
export async function compare(a: string, b: string): Promise<RunResult> {
  await requireTool('qemu-img', 'qemu-utils');
  return run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', '-U', a, b], { timeoutMs: 120_000 });
}
