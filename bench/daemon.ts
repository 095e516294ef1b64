/**
 * Long-running helpers of the mirror suite: an nbd-migrate `serve` (source
 * with an admin socket, or an `--incoming` destination) and a qemu-nbd
 * target. nbd-migrate is started with `--log-format json` and its stderr is
 * parsed line by line, so the suite learns the port it bound (`--port 0`) from
 * the `listening` event, waits for `ready`, and can watch `mirror-state`
 * events as they happen.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { exited, Tail } from './proc.js';
import { freePort, HOST, probeNbd } from './servers.js';

/** A parsed JSON log line; `_at` is when the bench received it (performance.now()). */
export type LogRecord = Record<string, unknown> & { event?: string; level?: string; _at?: number };

export class DaemonError extends Error {
  override readonly name = 'DaemonError';
}

export class Daemon extends EventEmitter {
  readonly pid: number;
  private readonly tail = new Tail(8000);
  private readonly records: LogRecord[] = [];
  private partial = '';

  constructor(
    readonly label: string,
    readonly cmd: string,
    readonly args: string[],
    readonly child: ChildProcess,
  ) {
    super();
    this.pid = child.pid ?? -1;
    child.stderr?.on('data', (b: Buffer) => {
      this.tail.push(b);
      this.partial += b.toString();
      let nl: number;
      while ((nl = this.partial.indexOf('\n')) >= 0) {
        const line = this.partial.slice(0, nl);
        this.partial = this.partial.slice(nl + 1);
        if (!line.startsWith('{')) continue;
        try {
          const rec = JSON.parse(line) as LogRecord;
          rec._at = performance.now();
          this.records.push(rec);
          this.emit('log', rec);
        } catch {
          /* not a log record */
        }
      }
    });
  }

  alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  stderr(): string {
    return this.tail.toString();
  }

  describe(): string {
    return `${this.cmd} ${this.args.join(' ')}`;
  }

  /** Log records seen so far. */
  logs(): readonly LogRecord[] {
    return this.records;
  }

  /** The first log record (past or future) that matches; rejects if the process exits first or on timeout. */
  waitForLog(match: (r: LogRecord) => boolean, timeoutMs: number, what: string): Promise<LogRecord> {
    const seen = this.records.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.off('log', onLog);
        this.child.off('exit', onExit);
      };
      const onLog = (r: LogRecord) => {
        if (!match(r)) return;
        done();
        resolve(r);
      };
      const onExit = () => {
        done();
        reject(new DaemonError(`${this.label} exited (${this.child.exitCode ?? this.child.signalCode}) while waiting for ${what}\n  command: ${this.describe()}\n  stderr: ${this.stderr().trim().slice(-2000) || '(empty)'}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new DaemonError(`${this.label}: no ${what} within ${timeoutMs} ms\n  command: ${this.describe()}\n  stderr: ${this.stderr().trim().slice(-2000) || '(empty)'}`));
      }, timeoutMs);
      this.on('log', onLog);
      this.child.once('exit', onExit);
      if (!this.alive()) onExit();
    });
  }

  /**
   * SIGTERM; if the process is still there after `graceMs`, SIGKILL. Resolves
   * with whether it needed the SIGKILL (a server that ignores a clean shutdown
   * request is worth reporting).
   */
  async stop(graceMs = 5000): Promise<{ killed: boolean }> {
    let killed = false;
    if (this.child.pid !== undefined && this.alive()) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => {
        killed = true;
        this.child.kill('SIGKILL');
      }, graceMs);
      await exited(this.child);
      clearTimeout(timer);
    }
    runningDaemons.delete(this);
    return { killed };
  }

  /** Waits up to `ms` for the process to exit on its own; true if it did. */
  async exitWithin(ms: number): Promise<boolean> {
    if (!this.alive()) return true;
    let timer: NodeJS.Timeout | undefined;
    const gone = await Promise.race([exited(this.child).then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
    clearTimeout(timer);
    return gone;
  }
}

/** Daemons started and not yet stopped, so an interrupt can end them. */
export const runningDaemons = new Set<Daemon>();

export function startDaemon(label: string, cmd: string, args: string[], cwd: string): Daemon {
  const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
  const d = new Daemon(label, cmd, args, child);
  child.once('error', (e) => d.emit('log', { event: 'spawn-error', message: e.message }));
  runningDaemons.add(d);
  return d;
}

/** Synchronous last resort (process exit): SIGKILL every daemon still running. */
export function killDaemonsSync(): void {
  for (const d of runningDaemons) {
    try {
      if (d.alive()) process.kill(d.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

export interface NbdMigrateServer {
  daemon: Daemon;
  port: number;
  uri: string;
  adminSocket: string | undefined;
}

/** A private directory for admin sockets (unix socket paths must stay short). */
let socketDir: string | undefined;
export function adminSocketPath(tag: string): string {
  socketDir ??= fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-bench-'));
  return path.join(socketDir, `${tag}.sock`);
}
export function removeSocketDir(): void {
  if (socketDir) fs.rmSync(socketDir, { recursive: true, force: true });
  socketDir = undefined;
}

/**
 * `nbd-migrate serve IMAGE --name NAME --listen 127.0.0.1 --port 0 --log-format json`
 * plus `--admin-socket` or `--incoming`; resolves after the `ready` event.
 */
export async function startNbdMigrate(
  o: { bin: string; repoRoot: string; image: string; name: string; adminSocket?: string; incoming?: boolean; label?: string },
  readyTimeoutMs = 60_000,
): Promise<NbdMigrateServer> {
  const args = [o.bin, 'serve', o.image, '--name', o.name, '--listen', HOST, '--port', '0', '--log-format', 'json'];
  if (o.adminSocket) args.push('--admin-socket', o.adminSocket);
  if (o.incoming) args.push('--incoming');
  const d = startDaemon(o.label ?? 'nbd-migrate serve', process.execPath, args, o.repoRoot);
  try {
    await d.waitForLog((r) => r.event === 'ready', readyTimeoutMs, 'ready event');
  } catch (e) {
    await d.stop();
    throw e;
  }
  const listening = d.logs().find((r) => r.event === 'listening' && r.listener === 'newstyle');
  const port = Number(listening?.port);
  if (!Number.isInteger(port) || port <= 0) {
    await d.stop();
    throw new DaemonError(`nbd-migrate logged no newstyle port\n  command: ${d.describe()}\n  stderr: ${d.stderr().trim().slice(-2000)}`);
  }
  return { daemon: d, port, uri: `nbd://${HOST}:${port}/${o.name}`, adminSocket: o.adminSocket };
}

export interface QemuNbdTarget {
  daemon: Daemon;
  port: number;
  uri: string;
}

/** The mirror target: `qemu-nbd -f raw -x NAME -b 127.0.0.1 -p PORT --persistent --shared=8 --cache=writeback IMAGE`. */
export function qemuNbdTargetArgs(image: string, name: string, port: number): string[] {
  return ['-f', 'raw', '-x', name, '-b', HOST, '-p', String(port), '--persistent', '--shared=8', '--cache=writeback', image];
}

export async function startQemuNbdTarget(image: string, name: string, cwd: string, readyTimeoutMs = 20_000): Promise<QemuNbdTarget> {
  const port = await freePort();
  const d = startDaemon('qemu-nbd target', 'qemu-nbd', qemuNbdTargetArgs(image, name, port), cwd);
  await waitNbd(d, port, readyTimeoutMs);
  return { daemon: d, port, uri: `nbd://${HOST}:${port}/${name}` };
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

/** An nbdkit file-plugin target (it sets TCP_NODELAY on its sockets; qemu-nbd 7.2 does not). */
export function nbdkitTargetArgs(image: string, name: string, port: number): string[] {
  return ['-f', '--exit-with-parent', '-i', HOST, '-p', String(port), '--exportname', name, 'file', `file=${image}`];
}

/** Starts qemu-nbd or nbdkit serving `image` on a free port; resolves once it answers NBD. */
export async function startNbdTarget(kind: 'qemu-nbd' | 'nbdkit', image: string, name: string, cwd: string, readyTimeoutMs = 20_000): Promise<QemuNbdTarget> {
  if (kind === 'qemu-nbd') return startQemuNbdTarget(image, name, cwd, readyTimeoutMs);
  const port = await freePort();
  const d = startDaemon('nbdkit target', 'nbdkit', nbdkitTargetArgs(image, name, port), cwd);
  await waitNbd(d, port, readyTimeoutMs);
  return { daemon: d, port, uri: `nbd://${HOST}:${port}/${name}` };
}

async function waitNbd(d: Daemon, port: number, readyTimeoutMs: number): Promise<void> {
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (!d.alive()) {
      await d.stop();
      throw new DaemonError(`${d.label} exited (${d.child.exitCode ?? d.child.signalCode}) before serving\n  command: ${d.describe()}\n  stderr: ${d.stderr().trim() || '(empty)'}`);
    }
    if (await probeNbd(port, 1000)) return;
    if (Date.now() > deadline) {
      await d.stop();
      throw new DaemonError(`${d.label} did not answer NBD on port ${port} within ${readyTimeoutMs} ms\n  command: ${d.describe()}\n  stderr: ${d.stderr().trim() || '(empty)'}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
