// Helpers for locating and running the external NBD client tools used by the
// interop tests. Everything here is asynchronous: the server under test runs
// as a child process, but the tests must never block the event loop while a
// client talks to it.

import { spawn, type ChildProcess } from 'node:child_process';
import { access, constants } from 'node:fs/promises';
import { delimiter, join } from 'node:path';

export interface RunOptions {
  /** Kill the child (SIGKILL) after this many milliseconds. Default 60 s. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  /** Called with the child once spawned (to signal it early, or to track it). */
  onSpawn?: (child: ChildProcess) => void;
}

export interface RunResult {
  cmd: string;
  args: string[];
  /** Exit code, or null if the child was killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** A one-line description of a finished command, for assertion messages. */
export function describeRun(r: RunResult): string {
  const status = r.timedOut
    ? `timed out (killed)`
    : r.code !== null
      ? `exit ${r.code}`
      : `signal ${r.signal}`;
  return (
    `${r.cmd} ${r.args.map(quoteArg).join(' ')} -> ${status}\n` +
    `--- stdout ---\n${r.stdout.slice(-8000)}\n--- stderr ---\n${r.stderr.slice(-8000)}`
  );
}

function quoteArg(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

/**
 * Run a command asynchronously and collect its output. Never rejects because
 * of the exit status; it rejects only if the command cannot be spawned.
 */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    opts.onSpawn?.(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        cmd,
        args,
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        timedOut,
      });
    });
    child.stdin.on('error', () => {
      /* child may exit before reading its input */
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Like run(), but throws (with the full output) unless the exit code is 0. */
export async function runOk(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0 || r.timedOut) {
    throw new Error(`command failed: ${describeRun(r)}`);
  }
  return r;
}

/** Find an executable on PATH (plus the sbin directories), or null. */
export async function which(cmd: string): Promise<string | null> {
  if (cmd.includes('/')) {
    return (await isExecutable(cmd)) ? cmd : null;
  }
  const dirs = (process.env.PATH ?? '').split(delimiter).filter(Boolean);
  for (const extra of ['/usr/local/sbin', '/usr/sbin', '/sbin']) {
    if (!dirs.includes(extra)) dirs.push(extra);
  }
  for (const dir of dirs) {
    const p = join(dir, cmd);
    if (await isExecutable(p)) return p;
  }
  return null;
}

async function isExecutable(p: string): Promise<boolean> {
  try {
    await access(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;

async function aptInstall(debPackage: string): Promise<string> {
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  // Two test files may try to install at the same time: wait for the lock.
  const lockOpt = ['-o', 'DPkg::Lock::Timeout=300'];
  const install = () =>
    run('apt-get', [...lockOpt, 'install', '-y', '--no-install-recommends', debPackage], {
      env,
      timeoutMs: 600_000,
    });
  let r = await install();
  if (r.code === 0) return '';
  const log = describeRun(r);
  const upd = await run('apt-get', [...lockOpt, 'update'], { env, timeoutMs: 600_000 });
  r = await install();
  if (r.code === 0) return '';
  return `${log}\n${describeRun(upd)}\n${describeRun(r)}`;
}

const ensured = new Map<string, Promise<void>>();

/**
 * Make sure a requirement is met: if `check` fails and we are root, install
 * the Debian package with apt-get and check again; otherwise throw an Error
 * that names the package to install.
 */
export function ensure(what: string, debPackage: string, check: () => Promise<boolean>): Promise<void> {
  const key = `${what}\0${debPackage}`;
  let p = ensured.get(key);
  if (!p) {
    p = (async () => {
      if (await check()) return;
      if (!isRoot) {
        throw new Error(
          `${what} is required but not available; install the Debian package '${debPackage}' ` +
            `(apt-get install ${debPackage})`,
        );
      }
      const log = await aptInstall(debPackage);
      if (await check()) return;
      throw new Error(
        `${what} is required but not available, and 'apt-get install -y ${debPackage}' did not provide it; ` +
          `install the Debian package '${debPackage}'.\n${log}`,
      );
    })();
    ensured.set(key, p);
  }
  return p;
}

/**
 * Return the absolute path of `cmd`, installing `debPackage` if it is missing
 * and we are root. Throws an Error naming the package otherwise.
 */
export async function requireTool(cmd: string, debPackage: string): Promise<string> {
  await ensure(`the command '${cmd}'`, debPackage, async () => (await which(cmd)) !== null);
  const p = await which(cmd);
  if (p === null) throw new Error(`'${cmd}' vanished from PATH; install the Debian package '${debPackage}'`);
  return p;
}

/** The Python that has the libnbd bindings (Debian's, not a pyenv one). */
export const SYSTEM_PYTHON = '/usr/bin/python3';

/** Ensure `/usr/bin/python3 -c 'import nbd'` works (Debian package python3-libnbd). */
export async function requirePythonNbd(): Promise<string> {
  await ensure(`python module 'nbd' for ${SYSTEM_PYTHON}`, 'python3-libnbd', async () => {
    if (!(await isExecutable(SYSTEM_PYTHON))) return false;
    const r = await run(SYSTEM_PYTHON, ['-c', 'import nbd'], { timeoutMs: 30_000 });
    return r.code === 0;
  });
  return SYSTEM_PYTHON;
}

/**
 * Run a Python script with the system python (which has libnbd). The script
 * is passed on stdin; `args` become sys.argv[1:].
 */
export async function runPython(script: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const py = await requirePythonNbd();
  return run(py, ['-', ...args], { ...opts, input: script });
}
