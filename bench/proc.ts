/**
 * Process plumbing for the benchmark: finding tools, running a command with a
 * time limit, stopping children, and reading CPU time from /proc.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Absolute path of an executable on $PATH, or undefined. */
export function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      /* not here */
    }
  }
  return undefined;
}

/** First line of `cmd args` output (stdout, else stderr), for version reporting; undefined if it fails. */
export function firstLine(cmd: string, args: string[]): string | undefined {
  try {
    const out = execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
    return out.split('\n')[0]?.trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Keeps only the last `max` characters written to it (a child's stderr, for error messages). */
export class Tail {
  private text = '';
  constructor(private readonly max = 4000) {}
  push(chunk: Buffer | string): void {
    this.text = (this.text + chunk.toString()).slice(-this.max);
  }
  toString(): string {
    return this.text;
  }
}

/** Resolves once the child has exited (immediately if it already has). */
export function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the child is gone. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  // No pid: it never started (spawn error), so there is nothing to wait for.
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited(child);
  clearTimeout(timer);
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** Children started by run() that are still alive, so an interrupt can end them. */
export const runningCommands = new Set<ChildProcess>();

/** Runs a command to completion (SIGKILL after timeoutMs); never rejects on exit status. `onSpawn` gets the child (to signal it). */
export function run(cmd: string, args: string[], timeoutMs: number, cwd?: string, onSpawn?: (child: ChildProcess) => void): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    runningCommands.add(child);
    onSpawn?.(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('error', (e) => {
      clearTimeout(timer);
      runningCommands.delete(child);
      reject(e);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      runningCommands.delete(child);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(), timedOut });
    });
  });
}

const CLK_TCK = (() => {
  const v = Number(firstLine('getconf', ['CLK_TCK']));
  return Number.isInteger(v) && v > 0 ? v : 100;
})();

/** User+system CPU seconds used so far by a process, all its threads included; undefined once it is gone. */
export function processCpuSeconds(pid: number): number | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after the ")" that closes the command name; utime and stime are fields 14 and 15 of the whole line.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  return Number.isFinite(utime) && Number.isFinite(stime) ? (utime + stime) / CLK_TCK : undefined;
}

/** Busy and total jiffies of the whole machine (all CPUs), from /proc/stat. */
export function hostCpuTicks(): { busy: number; total: number } | undefined {
  try {
    const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
    const idle = (f[3] ?? 0) + (f[4] ?? 0);
    return { busy: total - idle, total };
  } catch {
    return undefined;
  }
}

export interface CpuSnapshot {
  at: bigint;
  proc: number | undefined;
  host: { busy: number; total: number } | undefined;
}

export function cpuSnapshot(pid: number): CpuSnapshot {
  return { at: process.hrtime.bigint(), proc: processCpuSeconds(pid), host: hostCpuTicks() };
}

/** CPU use between two snapshots: the process in % of one core, the machine in % of all cores. */
export function cpuBetween(a: CpuSnapshot, b: CpuSnapshot): { procPct: number | null; hostPct: number | null } {
  const wall = Number(b.at - a.at) / 1e9;
  return {
    procPct: a.proc !== undefined && b.proc !== undefined && wall > 0 ? ((b.proc - a.proc) / wall) * 100 : null,
    hostPct: a.host && b.host && b.host.total > a.host.total ? ((b.host.busy - a.host.busy) / (b.host.total - a.host.total)) * 100 : null,
  };
}

/**
 * CPU seconds (user+system) of this process's children that have exited and
 * been reaped (cutime + cstime of /proc/self/stat): the difference around one
 * short-lived command is that command's CPU use, every thread included.
 */
export function reapedChildrenCpuSeconds(): number | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync('/proc/self/stat', 'utf8');
  } catch {
    return undefined;
  }
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // cutime and cstime are fields 16 and 17 of the whole line.
  const cutime = Number(rest[13]);
  const cstime = Number(rest[14]);
  return Number.isFinite(cutime) && Number.isFinite(cstime) ? (cutime + cstime) / CLK_TCK : undefined;
}

/** Thrown when Ctrl-C (or SIGTERM) asked the benchmark to stop. */
export class Interrupted extends Error {
  override readonly name = 'Interrupted';
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
