/**
 * `serve --on-cutover CMD`: an operator command run after each cutover that
 * switched an export (after the handoff, when the handoff is disconnect), for
 * example to move the export's own address (listen=) to the destination host.
 * It runs with `sh -c`, in its own process group, with the export, its
 * address and the target in its environment (see hookEnv). Its run time is
 * bounded: past the timeout the group gets SIGTERM, then SIGKILL. The outcome
 * (exit code, signal, the tail of stderr) is logged and kept in the job's
 * status as `onCutover`; a failure does not undo the cutover.
 */
import { spawn } from 'node:child_process';
import type { Logger } from '../util/log.js';

export interface CutoverHook {
  /** The shell command. */
  command: string;
  /** Past this, the command is killed and reported failed. */
  timeoutMs: number;
  /** What the export adds to the environment: NBD_MIGRATE_EXPORT, NBD_MIGRATE_IMAGE, NBD_MIGRATE_LISTEN, ... */
  env: Record<string, string>;
}

export interface HookStatus {
  command: string;
  state: 'running' | 'ok' | 'failed';
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  /** The last lines of its stderr (at most 2 KiB). */
  stderrTail: string;
  startedAt: string;
  durationMs: number | null;
}

const TAIL_BYTES = 2048;
/** Between SIGTERM and SIGKILL once the timeout is past. */
const KILL_AFTER_MS = 2000;

/**
 * The environment of the command for a job of `source` switched to `target`:
 * the export's own variables (cutoverHook.env) plus these.
 */
export function hookEnv(hook: CutoverHook, job: { target: string; jobId: string; handoff: string; pauseMs: number | null }): Record<string, string> {
  return {
    ...hook.env,
    NBD_MIGRATE_TARGET: job.target,
    NBD_MIGRATE_JOB: job.jobId,
    NBD_MIGRATE_HANDOFF: job.handoff,
    NBD_MIGRATE_PAUSE_MS: job.pauseMs === null ? '' : String(job.pauseMs),
  };
}

const tail = (s: string) => (s.length > TAIL_BYTES ? s.slice(-TAIL_BYTES) : s);

/** Runs the command; `update` sees the status when it starts and when it ends. Never rejects. */
export function runCutoverHook(hook: CutoverHook, env: Record<string, string>, log: Logger, update: (s: HookStatus) => void): Promise<HookStatus> {
  const t0 = performance.now();
  const status: HookStatus = {
    command: hook.command,
    state: 'running',
    exitCode: null,
    signal: null,
    timedOut: false,
    stderrTail: '',
    startedAt: new Date().toISOString(),
    durationMs: null,
  };
  update({ ...status });
  log.info('on-cutover-started', { command: hook.command, env, timeoutMs: hook.timeoutMs });
  return new Promise((resolve) => {
    let stderr = '';
    let stdout = '';
    let ended = false;
    const finish = (exitCode: number | null, signal: string | null, spawnError?: Error) => {
      if (ended) return; // 'error' may be followed by 'close'
      ended = true;
      clearTimeout(timer);
      clearTimeout(killer);
      status.exitCode = exitCode;
      status.signal = signal;
      status.durationMs = Math.round(performance.now() - t0);
      status.stderrTail = tail(spawnError ? `${stderr}${spawnError.message}` : stderr).trimEnd();
      status.state = exitCode === 0 && !status.timedOut ? 'ok' : 'failed';
      if (status.state === 'ok') log.info('on-cutover-done', { command: hook.command, durationMs: status.durationMs, stdoutTail: tail(stdout).trimEnd() });
      else
        log.error('on-cutover-failed', {
          command: hook.command,
          exitCode,
          signal,
          timedOut: status.timedOut,
          durationMs: status.durationMs,
          stderrTail: status.stderrTail,
          cause: status.timedOut
            ? `the --on-cutover command did not finish within ${hook.timeoutMs} ms and was killed`
            : spawnError
              ? `the --on-cutover command could not be started: ${spawnError.message}`
              : signal
                ? `the --on-cutover command was killed by ${signal}`
                : `the --on-cutover command exited with code ${exitCode}`,
          effect: 'the export is switched to the target; what the command was to do (moving the address, say) is not done',
        });
      update({ ...status });
      resolve({ ...status });
    };
    let killer: NodeJS.Timeout | undefined;
    const child = spawn('/bin/sh', ['-c', hook.command], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const killGroup = (sig: NodeJS.Signals) => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, sig);
      } catch {
        /* gone */
      }
    };
    const timer = setTimeout(() => {
      status.timedOut = true;
      killGroup('SIGTERM');
      killer = setTimeout(() => killGroup('SIGKILL'), KILL_AFTER_MS);
    }, hook.timeoutMs);
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout = tail(stdout + d)));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = tail(stderr + d)));
    child.once('error', (e) => finish(null, null, e));
    child.once('close', (code, signal) => finish(code, signal));
  });
}
