// Start and stop the nbd-migrate server under test, and make disk images.
//
// The server is always a child process (`node bin/nbd-migrate serve ...`)
// listening on loopback ephemeral ports; its JSON-lines log on stderr tells
// us the ports and when it is ready.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitForPort } from './net.js';
import { run, type RunResult } from './tools.js';

/** The checkout: the nearest directory above this file whose package.json is nbd-migrate's (from test/helpers/ and, compiled for the bench, dist/test/helpers/). */
function findRepoRoot(): string {
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; ) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj) && (JSON.parse(readFileSync(pj, 'utf8')) as { name?: unknown }).name === 'nbd-migrate') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error(`cannot find the nbd-migrate checkout above ${fileURLToPath(import.meta.url)}`);
    dir = up;
  }
}

export const REPO_ROOT = findRepoRoot();
export const CLI = join(REPO_ROOT, 'bin', 'nbd-migrate');
export const CLI_MAIN = join(REPO_ROOT, 'dist', 'src', 'cli', 'main.js');

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export interface LogEntry {
  event?: string;
  level?: string;
  [key: string]: unknown;
}

export interface StartOptions {
  /** Extra environment variables (merged over process.env). */
  env?: NodeJS.ProcessEnv;
  /** How long to wait for the "ready" log event. Default 20 s. */
  readyTimeoutMs?: number;
  /** The bin script to run instead of this checkout's CLI (another build, e.g. a baseline). */
  cli?: string;
  /**
   * Ready once this port (the one given with --port) accepts connections,
   * instead of on the "ready" log event: for a --log-level that hides it.
   */
  readyPort?: number;
  /** A command the server runs under, e.g. ['ip', 'netns', 'exec', NS] (test/helpers/netns.ts). */
  prefix?: string[];
}

export interface ServerHandle {
  proc: ChildProcess;
  /** Every JSON log line the server printed so far, parsed. */
  logs: LogEntry[];
  /** The fixed-newstyle TCP port (127.0.0.1). */
  newstylePort: number;
  /** The Unix socket path, if --socket was given. */
  socketPath: string | undefined;
  /** The oldstyle TCP port of an export (throws if it has none). */
  oldstylePort(name: string): number;
  /** nbd://127.0.0.1:PORT/NAME (NAME may be "", the default export). */
  uri(name?: string): string;
  /** nbd+unix:///NAME?socket=PATH (throws without --socket). */
  unixUri(name?: string): string;
  /** nbd://127.0.0.1:PORT for an export's oldstyle port. */
  oldstyleUri(name: string): string;
  /** All stderr text the server wrote so far. */
  stderr(): string;
  /** Resolve with the first log entry (past or future) matching `pred`. */
  waitForLog(pred: (e: LogEntry) => boolean, timeoutMs?: number): Promise<LogEntry>;
  /** Calls `fn` with every log entry from now on, as it arrives; returns the unsubscribe. */
  onLog(fn: (e: LogEntry) => void): () => void;
  /** SIGTERM, then SIGKILL after 5 s; resolves when the process is gone. */
  stop(): Promise<void>;
  /** Exit code/signal once the process has exited, else undefined. */
  exited(): { code: number | null; signal: NodeJS.Signals | null } | undefined;
}

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of running) {
    try {
      p.kill('SIGKILL');
    } catch {
      /* already gone */
    }
  }
});

function checkBuilt(cli: string): void {
  const root = join(dirname(cli), '..');
  const main = join(root, 'dist', 'src', 'cli', 'main.js');
  if (!existsSync(main)) {
    throw new Error(
      `nbd-migrate is not built: ${main} does not exist. ` +
        `Run 'npm run build' (or 'npm ci', whose prepare step builds) in ${root} first.`,
    );
  }
  if (!existsSync(cli)) {
    throw new Error(`the CLI entry ${cli} does not exist`);
  }
}

/**
 * The server's environment: ours minus the test runner's Node loader hooks
 * (tap puts its TypeScript loader into NODE_OPTIONS, which must not leak
 * into the compiled server), plus `extra`.
 */
function serverEnv(extra: NodeJS.ProcessEnv | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.NODE_OPTIONS;
  for (const k of Object.keys(env)) if (k.startsWith('TS_NODE_')) delete env[k];
  return { ...env, ...extra };
}

function hasOpt(args: string[], opt: string): boolean {
  return args.some((a) => a === opt || a.startsWith(`${opt}=`));
}

/**
 * Spawn `nbd-migrate serve ARGS...` and wait for it to log "ready".
 * Unless given in `args`, adds `--listen 127.0.0.1 --port 0 --log-format json`.
 */
export async function startServer(args: string[], opts: StartOptions = {}): Promise<ServerHandle> {
  const cli = opts.cli ?? CLI;
  checkBuilt(cli);
  const full = ['serve', ...args];
  if (!hasOpt(args, '--listen')) full.push('--listen', '127.0.0.1');
  if (!hasOpt(args, '--port')) full.push('--port', '0');
  if (!hasOpt(args, '--log-format')) full.push('--log-format', 'json');
  // tap's @tapjs/processinfo re-injects its loader into NODE_OPTIONS of every
  // child it sees spawned; that loader breaks the extensionless ESM entry
  // point (ERR_REQUIRE_CYCLE_MODULE). env(1) drops it right before exec'ing
  // node, so the server runs exactly as it would from a shell (same pid).
  const argv = ['/usr/bin/env', '-u', 'NODE_OPTIONS', process.execPath, cli, ...full];
  const pre = opts.prefix ?? [];
  const proc = spawn(pre[0] ?? argv[0]!, [...pre.slice(1), ...(pre.length ? argv : argv.slice(1))], {
    cwd: REPO_ROOT,
    env: serverEnv(opts.env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return attach(proc, `nbd-migrate ${full.join(' ')}`, opts.readyTimeoutMs ?? 20_000, opts.readyPort);
}

function attach(proc: ChildProcess, description: string, readyTimeoutMs: number, readyPort?: number): Promise<ServerHandle> {
  running.add(proc);
  const logs: LogEntry[] = [];
  let stderrText = '';
  let stdoutText = '';
  let partial = '';
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const waiters: { pred: (e: LogEntry) => boolean; resolve: (e: LogEntry) => void }[] = [];
  const exitWaiters: (() => void)[] = [];
  const listeners = new Set<(e: LogEntry) => void>();

  const onLine = (line: string) => {
    const s = line.trim();
    if (!s.startsWith('{')) return;
    let e: LogEntry;
    try {
      e = JSON.parse(s) as LogEntry;
    } catch {
      return;
    }
    if (typeof e !== 'object' || e === null) return;
    logs.push(e);
    for (const fn of listeners) fn(e);
    for (let i = waiters.length - 1; i >= 0; i--) {
      const w = waiters[i]!;
      if (w.pred(e)) {
        waiters.splice(i, 1);
        w.resolve(e);
      }
    }
  };
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (chunk: string) => {
    stderrText += chunk;
    if (stderrText.length > 4 * MiB) stderrText = stderrText.slice(-2 * MiB);
    partial += chunk;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      onLine(partial.slice(0, nl));
      partial = partial.slice(nl + 1);
    }
  });
  proc.stdout!.setEncoding('utf8');
  proc.stdout!.on('data', (chunk: string) => {
    stdoutText += chunk;
    if (stdoutText.length > 1 * MiB) stdoutText = stdoutText.slice(-MiB / 2);
  });
  proc.on('exit', (code, signal) => {
    exitInfo = { code, signal };
    running.delete(proc);
    for (const w of exitWaiters.splice(0)) w();
  });

  const waitExit = () =>
    new Promise<void>((res) => {
      if (exitInfo) res();
      else exitWaiters.push(res);
    });

  const diag = () =>
    `${description}\n--- stderr ---\n${stderrText.slice(-8000)}` +
    (stdoutText ? `\n--- stdout ---\n${stdoutText.slice(-4000)}` : '');

  const waitForLog = (pred: (e: LogEntry) => boolean, timeoutMs = 10_000): Promise<LogEntry> => {
    const found = logs.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((res, rej) => {
      const w = {
        pred,
        resolve: (e: LogEntry) => {
          clearTimeout(timer);
          res(e);
        },
      };
      const timer = setTimeout(() => {
        const i = waiters.indexOf(w);
        if (i >= 0) waiters.splice(i, 1);
        rej(new Error(`timed out after ${timeoutMs} ms waiting for a server log entry\n${diag()}`));
      }, timeoutMs);
      waiters.push(w);
    });
  };

  const stop = async () => {
    if (exitInfo) return;
    proc.kill('SIGTERM');
    const killer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await waitExit();
    clearTimeout(killer);
  };

  return new Promise<ServerHandle>((resolveReady, rejectReady) => {
    let settled = false;
    const fail = (why: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      void stop().then(() => rejectReady(new Error(`nbd-migrate did not become ready: ${why}\n${diag()}`)));
    };
    const awaited = readyPort === undefined ? 'a "ready" log event' : `port ${readyPort} to accept connections`;
    const timer = setTimeout(() => fail(`no ${awaited} within ${readyTimeoutMs} ms`), readyTimeoutMs);
    proc.on('error', (e) => fail(`spawn error: ${e.message}`));
    exitWaiters.push(() => fail(`process exited early (code ${exitInfo?.code}, signal ${exitInfo?.signal})`));
    const ready = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const listening = logs.filter((e) => e.event === 'listening');
      const ns = listening.find((e) => e.listener === 'newstyle');
      const unix = listening.find((e) => e.listener === 'unix');
      const newstylePort = typeof ns?.port === 'number' ? ns.port : (readyPort ?? NaN);
      const socketPath = typeof unix?.path === 'string' ? unix.path : undefined;
      const oldstylePort = (name: string): number => {
        const e = listening.find((l) => l.listener === 'oldstyle' && l.export === name);
        if (!e || typeof e.port !== 'number') {
          throw new Error(`no oldstyle listener logged for export '${name}'\n${diag()}`);
        }
        return e.port;
      };
      const handle: ServerHandle = {
        proc,
        logs,
        newstylePort,
        socketPath,
        oldstylePort,
        uri: (name = '') => {
          if (!Number.isInteger(newstylePort)) throw new Error(`no newstyle listener logged\n${diag()}`);
          return `nbd://127.0.0.1:${newstylePort}/${encodeURIComponent(name)}`;
        },
        unixUri: (name = '') => {
          if (socketPath === undefined) throw new Error(`no unix listener logged\n${diag()}`);
          return `nbd+unix:///${encodeURIComponent(name)}?socket=${encodeURIComponent(socketPath)}`;
        },
        oldstyleUri: (name: string) => `nbd://127.0.0.1:${oldstylePort(name)}`,
        stderr: () => stderrText,
        waitForLog,
        onLog: (fn) => {
          listeners.add(fn);
          return () => listeners.delete(fn);
        },
        stop,
        exited: () => exitInfo,
      };
      resolveReady(handle);
    };
    if (readyPort === undefined) waiters.push({ pred: (e) => e.event === 'ready', resolve: ready });
    else waitForPort(readyPort, readyTimeoutMs, () => (exitInfo ? 'exited' : undefined)).then(ready, () => undefined);
  });
}

/** Minimal view of a tap Test for registering teardowns. */
export interface Teardownable {
  teardown(fn: () => unknown): void;
}

/** startServer() and stop it in t.teardown. */
export async function serve(t: Teardownable, args: string[], opts: StartOptions = {}): Promise<ServerHandle> {
  const s = await startServer(args, opts);
  t.teardown(() => s.stop());
  return s;
}

/** A fresh temporary directory, removed in t.teardown. */
export async function tmpDir(t: Teardownable, prefix = 'nbd-migrate-interop-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface ImageOptions {
  /**
   * 'sparse' (default): a hole of `size` bytes; 'random': random data;
   * a number: every byte set to that value.
   */
  fill?: 'sparse' | 'random' | number;
}

/** Create (or replace) a raw image file of exactly `size` bytes. */
export async function makeImage(path: string, size: number, opts: ImageOptions = {}): Promise<string> {
  const fill = opts.fill ?? 'sparse';
  const fh = await open(path, 'w');
  try {
    await fh.truncate(size);
    if (fill !== 'sparse') {
      const chunk = 4 * MiB;
      const constant = typeof fill === 'number' ? Buffer.alloc(chunk, fill) : undefined;
      for (let off = 0; off < size; off += chunk) {
        const n = Math.min(chunk, size - off);
        const buf = constant ? constant.subarray(0, n) : randomBytes(n);
        await fh.write(buf, 0, n, off);
      }
    }
  } finally {
    await fh.close();
  }
  return path;
}

/** Write `data` at `offset` into an existing file, without truncating it. */
export async function writeAt(path: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

/** Read `length` bytes at `offset` from a file (short at end of file). */
export async function readAt(path: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** A deterministic, position-dependent pattern (easy to spot misplacements). */
export function patternBuffer(length: number, seed = 1): Buffer {
  const buf = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[i] = x & 0xff;
  }
  return buf;
}

/** True if every byte of `buf` equals `value`. */
export function allBytes(buf: Buffer, value: number): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== value) return false;
  return true;
}

/** `nbd-migrate serve ARGS` that is expected to exit on its own (a refusal), with a JSON log on stderr. */
export function serveOnce(args: string[], env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, 'serve', ...args, '--listen', '127.0.0.1', '--port', '0', '--log-format', 'json'], {
    cwd: REPO_ROOT,
    timeoutMs: 15_000,
    env: { ...process.env, ...env },
  });
}

/** The `cause` of the server's fatal log line. */
export function fatalCause(stderr: string): string | undefined {
  for (const line of stderr.split('\n')) {
    if (!line.startsWith('{')) continue;
    const e = JSON.parse(line) as { event?: string; cause?: string };
    if (e.event === 'fatal') return e.cause;
  }
  return undefined;
}
