/**
 * Driving an nbd-migrate mirror job over the admin socket (the tests' admin
 * client, test/helpers/admin.ts), the source and target servers it runs
 * between (the tests' spawners), and tearing such a pair down afterwards.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { adminRequest, waitForJob, type JobState, type JobStatus } from '../test/helpers/admin.js';
import { freePort } from '../test/helpers/net.js';
import { startServer, type ServerHandle } from '../test/helpers/server.js';
import { nbdkit, qemuNbd } from '../test/helpers/peers.js';
import { Interrupted } from './proc.js';
import { HOST, nbdkitFileArgs } from './servers.js';

export type { JobState, JobStatus };

export const MIRROR_EXPORT = 'vm1';

/** The mirror target's qemu-nbd settings beyond qemuNbd()'s defaults. */
export const QEMU_NBD_TARGET_SETTINGS = ['--cache=writeback'];

export class MirrorBenchError extends Error {
  override readonly name = 'MirrorBenchError';
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
 * `nbd-migrate serve IMAGE --name vm1` plus `--admin-socket` or `--incoming`,
 * on 127.0.0.1, the port it picks, JSON logs; resolves after its "ready".
 */
export function startNbdMigrate(bin: string, image: string, o: { adminSocket?: string; incoming?: boolean }): Promise<ServerHandle> {
  const args = [image, '--name', MIRROR_EXPORT];
  if (o.adminSocket) args.push('--admin-socket', o.adminSocket);
  if (o.incoming) args.push('--incoming');
  return startServer(args, { cli: bin, readyTimeoutMs: 60_000 });
}

export interface MirrorTarget {
  uri: string;
  pid: number;
  stop(): Promise<void>;
}

/** A fresh target serving `image` as vm1: qemu-nbd, nbdkit's file plugin (it sets TCP_NODELAY; qemu-nbd 7.2 does not), or `nbd-migrate serve --incoming`. */
export async function startTarget(kind: 'qemu-nbd' | 'nbdkit' | 'nbd-migrate', image: string, bin: string): Promise<MirrorTarget> {
  if (kind === 'nbd-migrate') {
    const s = await startNbdMigrate(bin, image, { incoming: true });
    return { uri: s.uri(MIRROR_EXPORT), pid: s.proc.pid ?? -1, stop: s.stop };
  }
  const port = await freePort();
  const p = kind === 'qemu-nbd' ? await qemuNbd(image, MIRROR_EXPORT, port, QEMU_NBD_TARGET_SETTINGS) : await nbdkit(port, nbdkitFileArgs(image, MIRROR_EXPORT));
  return { uri: `nbd://${HOST}:${port}/${MIRROR_EXPORT}`, pid: p.proc.pid ?? -1, stop: p.stop };
}

export async function startMirror(adminSocket: string, target: string, cutover: 'auto' | 'manual'): Promise<JobStatus> {
  return (await adminRequest(adminSocket, { cmd: 'mirror', export: MIRROR_EXPORT, target, cutover })) as JobStatus;
}

export async function requestCutover(adminSocket: string): Promise<JobStatus> {
  return (await adminRequest(adminSocket, { cmd: 'cutover', export: MIRROR_EXPORT })) as JobStatus;
}

export async function abortMirror(adminSocket: string): Promise<void> {
  await adminRequest(adminSocket, { cmd: 'abort', export: MIRROR_EXPORT }).catch(() => undefined);
}

/**
 * Waits (the tests' waitForJob, every `pollMs` and at once when the server
 * logs a `mirror-state` change) until the job's state is one of `want`.
 * Resolves with that status and the performance.now() at which it was seen;
 * rejects if the job fails or is aborted, if the server dies, or at
 * `deadline` (a performance.now() value), or with Interrupted once
 * `stopRequested()`.
 */
export async function waitForState(
  source: ServerHandle,
  adminSocket: string,
  want: readonly JobState[],
  deadline: number,
  stopRequested: () => boolean,
  pollMs = 25,
): Promise<{ status: JobStatus; at: number }> {
  const status = await waitForJob(adminSocket, MIRROR_EXPORT, (s) => want.includes(s.state), {
    timeoutMs: deadline - performance.now(),
    everyMs: pollMs,
    what: `the mirror job to be ${want.join(' or ')}`,
    failOn: ['failed', 'aborted'],
    check: () => {
      if (stopRequested()) throw new Interrupted();
      if (source.exited()) throw new MirrorBenchError(`the source server died; stderr: ${source.stderr().trim().slice(-2000)}`);
    },
    wakeOn: (wake) => source.onLog((e) => e.event === 'mirror-state' && wake()),
  });
  return { status, at: performance.now() };
}

/**
 * Stops the source (SIGTERM, SIGKILL 5 s later), then the target. A source
 * that has not exited `graceMs` after SIGTERM is reported as `sourceHung`;
 * the target is stopped meanwhile.
 */
export async function stopPair(source: ServerHandle | undefined, target: { stop(): Promise<void> } | undefined, graceMs = 2000): Promise<{ sourceHung: boolean }> {
  let sourceHung = false;
  const stopping = source?.stop();
  if (stopping) {
    let timer: NodeJS.Timeout | undefined;
    sourceHung = await Promise.race([stopping.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs)))]);
    clearTimeout(timer);
  }
  await target?.stop();
  await stopping;
  return { sourceHung };
}

/** Removes an image and the marker/lock files nbd-migrate keeps beside it. */
export function removeImageAndMarkers(image: string): void {
  for (const f of [image, `${image}.nbd-migrate-fenced`, `${image}.nbd-migrate-incoming`, `${image}.nbd-migrate.lock`]) fs.rmSync(f, { force: true });
  fs.rmSync(`${image}.nbd-migrate.d`, { recursive: true, force: true }); // the state folder
}

/** Removes only the markers (the source image itself is reused between samples). */
export function removeMarkers(image: string): void {
  for (const f of [`${image}.nbd-migrate-fenced`, `${image}.nbd-migrate-incoming`, `${image}.nbd-migrate.lock`]) fs.rmSync(f, { force: true });
  fs.rmSync(`${image}.nbd-migrate.d`, { recursive: true, force: true }); // the state folder (a failed job's record would be resumed)
}
