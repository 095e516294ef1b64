/**
 * Driving an nbd-migrate mirror job over the admin socket (newline-delimited
 * JSON on a unix socket, through the project's own `adminRequest`), and
 * tearing a source/target pair down afterwards.
 */
import * as fs from 'node:fs';
import { adminRequest } from '../src/admin/server.js';
import type { JobState, JobStatus } from '../src/migration/job.js';
import type { Daemon, LogRecord } from './daemon.js';
import { Interrupted, sleep } from './proc.js';

export type { JobState, JobStatus };

export const MIRROR_EXPORT = 'vm1';

export class MirrorBenchError extends Error {
  override readonly name = 'MirrorBenchError';
}

export async function startMirror(adminSocket: string, target: string, cutover: 'auto' | 'manual'): Promise<JobStatus> {
  return (await adminRequest(adminSocket, { cmd: 'mirror', export: MIRROR_EXPORT, target, cutover })) as JobStatus;
}

export async function jobStatus(adminSocket: string): Promise<JobStatus> {
  return (await adminRequest(adminSocket, { cmd: 'status', export: MIRROR_EXPORT }, 10_000)) as JobStatus;
}

export async function requestCutover(adminSocket: string): Promise<JobStatus> {
  return (await adminRequest(adminSocket, { cmd: 'cutover', export: MIRROR_EXPORT })) as JobStatus;
}

export async function abortMirror(adminSocket: string): Promise<void> {
  await adminRequest(adminSocket, { cmd: 'abort', export: MIRROR_EXPORT }).catch(() => undefined);
}

/**
 * Polls the job's status every `pollMs` (and at once when the server logs a
 * `mirror-state` change) until its state is one of `want`. Resolves with that
 * status and the performance.now() at which it was seen; rejects if the job
 * fails or is aborted (unless wanted), if the server dies, or at `deadline`
 * (a performance.now() value), or with Interrupted once `stopRequested()`.
 */
export async function waitForState(
  source: Daemon,
  adminSocket: string,
  want: readonly JobState[],
  deadline: number,
  stopRequested: () => boolean,
  pollMs = 25,
): Promise<{ status: JobStatus; at: number }> {
  for (;;) {
    if (stopRequested()) throw new Interrupted();
    let wake: (() => void) | undefined;
    const onLog = (r: LogRecord) => {
      if (r.event === 'mirror-state') wake?.();
    };
    source.on('log', onLog);
    try {
      const status = await jobStatus(adminSocket);
      const at = performance.now();
      if (want.includes(status.state)) return { status, at };
      if (status.state === 'failed' || status.state === 'aborted')
        throw new MirrorBenchError(`mirror job ${status.state}${status.error ? `: ${status.error}` : ''}`);
      if (!source.alive()) throw new MirrorBenchError(`the source server died; stderr: ${source.stderr().trim().slice(-2000)}`);
      if (at > deadline)
        throw new MirrorBenchError(
          `mirror job still ${status.state} at the deadline (wanted ${want.join(' or ')}): pass ${status.pass}, ` +
            `${(status.dirtyBytes / 2 ** 20).toFixed(0)} MiB dirty, rate ${(status.rate / 1e6).toFixed(0)} MB/s, convergence ${status.convergence}, ` +
            `${(status.dataBytes / 2 ** 20).toFixed(0)} MiB copied`,
        );
      await Promise.race([sleep(pollMs), new Promise<void>((r) => (wake = r))]);
    } finally {
      source.off('log', onLog);
    }
  }
}

/**
 * Stops the source (SIGTERM), then the target. A source that has not exited
 * `graceMs` after SIGTERM is reported as `sourceHung` and given until its
 * target goes away (plus the usual SIGKILL grace).
 */
export async function stopPair(source: Daemon | undefined, target: Daemon | undefined, graceMs = 2000): Promise<{ sourceHung: boolean }> {
  let sourceHung = false;
  if (source?.alive()) {
    source.child.kill('SIGTERM');
    sourceHung = !(await source.exitWithin(graceMs));
  }
  await target?.stop();
  await source?.stop(3000);
  return { sourceHung };
}

/** Removes an image and the marker/lock files nbd-migrate keeps beside it. */
export function removeImageAndMarkers(image: string): void {
  for (const f of [image, `${image}.nbd-migrate-fenced`, `${image}.nbd-migrate-incoming`, `${image}.nbd-migrate.lock`]) fs.rmSync(f, { force: true });
}

/** Removes only the markers (the source image itself is reused between samples). */
export function removeMarkers(image: string): void {
  for (const f of [`${image}.nbd-migrate-fenced`, `${image}.nbd-migrate-incoming`, `${image}.nbd-migrate.lock`]) fs.rmSync(f, { force: true });
}
