// The admin socket client of the tests (test/migration, test/guest) and the
// bench: one request, a job's status, and waiting for a job to get somewhere.
import { adminRequest } from '../../src/admin/server.js';
import type { JobState, JobStatus } from '../../src/migration/job.js';

export { adminRequest };
export type { JobState, JobStatus };

/** The status of the mirror job of `exportName` (README, "Admin socket protocol"). */
export function jobStatus(socket: string, exportName: string, timeoutMs?: number): Promise<JobStatus> {
  return adminRequest(socket, { cmd: 'status', export: exportName }, timeoutMs) as Promise<JobStatus>;
}

export interface WaitOptions {
  /** Give up after this long. Default 120 s. */
  timeoutMs?: number;
  /** Ask for the status this often. Default 100 ms. */
  everyMs?: number;
  /** What is awaited, for the error messages. */
  what?: string;
  /** States that end the wait with an error (unless `pred` accepts them). Default: failed. */
  failOn?: readonly JobState[];
  /** Called before each status request; throws to stop waiting (an interrupt, a server that died). */
  check?: () => void;
  /** Calls `wake` when a status is worth asking for at once (e.g. a mirror-state log line); returns the unsubscribe. */
  wakeOn?: (wake: () => void) => () => void;
}

/** Polls the job's status until `pred` accepts it; `opts` may be just the timeout. */
export async function waitForJob(socket: string, exportName: string, pred: (s: JobStatus) => boolean, opts: number | WaitOptions = {}): Promise<JobStatus> {
  const o: WaitOptions = typeof opts === 'number' ? { timeoutMs: opts } : opts;
  const end = Date.now() + (o.timeoutMs ?? 120_000);
  const failOn = o.failOn ?? ['failed'];
  const what = o.what ?? 'the job';
  let wake: (() => void) | undefined;
  const unsubscribe = o.wakeOn?.(() => wake?.());
  try {
    for (;;) {
      o.check?.();
      const s = await jobStatus(socket, exportName);
      if (pred(s)) return s;
      if (failOn.includes(s.state)) throw new Error(`mirror job ${s.state} while waiting for ${what}: ${s.error}; last status ${JSON.stringify(s)}`);
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}; last status ${JSON.stringify(s)}`);
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((r) => {
        wake = r;
        timer = setTimeout(r, o.everyMs ?? 100);
      });
      clearTimeout(timer);
      wake = undefined;
    }
  } finally {
    unsubscribe?.();
  }
}
