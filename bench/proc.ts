/**
 * What the benchmark measures of processes: CPU time and memory from /proc,
 * and tool versions. Starting them, peers and waiting on jobs are the test
 * helpers' (test/helpers/); this file only adds the tracking an interrupt
 * needs.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { run } from '../test/helpers/tools.js';

/** Children of run() (fio, copiers) still alive, so an interrupt can end them: pass `track` as run()'s onSpawn. */
export const runningCommands = new Set<ChildProcess>();

export function track(child: ChildProcess): void {
  runningCommands.add(child);
  child.once('close', () => runningCommands.delete(child));
  child.once('error', () => runningCommands.delete(child));
}

/** First line of `cmd args`'s stdout, for version reporting; undefined if it fails. */
export async function firstLine(cmd: string, args: string[]): Promise<string | undefined> {
  try {
    const r = await run(cmd, args, { timeoutMs: 10_000 });
    return r.code === 0 ? r.stdout.split('\n')[0]?.trim() || undefined : undefined;
  } catch {
    return undefined;
  }
}

const CLK_TCK = await (async () => {
  const v = Number(await firstLine('getconf', ['CLK_TCK']));
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

/** VmRSS and VmHWM of a process in bytes, from /proc/PID/status; undefined once it is gone. */
export function processMemory(pid: number): { rss: number; hwm: number } | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const kb = (key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+)\\s+kB`, 'm').exec(text);
    return m ? Number(m[1]) * 1024 : NaN;
  };
  const rss = kb('VmRSS');
  const hwm = kb('VmHWM');
  return Number.isFinite(rss) ? { rss, hwm: Number.isFinite(hwm) ? hwm : rss } : undefined;
}

/** Thrown when Ctrl-C (or SIGTERM) asked the benchmark to stop. */
export class Interrupted extends Error {
  override readonly name = 'Interrupted';
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
