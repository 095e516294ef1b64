/**
 * `nbd-migrate ctl`: the operator's side of the admin socket.
 */
import type { Argv } from 'yargs';
import { AdminError, adminRequest } from '../admin/server.js';
import type { ExportStatus } from '../migration/controller.js';
import type { JobStatus } from '../migration/job.js';
import { DEFAULT_ADMIN_SOCKET } from '../util/paths.js';
import { formatBytes } from '../util/units.js';
import { ProgressBar, type ProgressFigures } from './progress.js';

const DEFAULT_SOCKET = DEFAULT_ADMIN_SOCKET;

/** Set once the ctl command is being run: its failures are reported by ctlErrorLine. */
export let ctlRunning = false;

/**
 * A ctl failure as the operator sees it: one line (no stack), what went wrong and, when the
 * server could not be reached, the likely reason. The caller exits non-zero.
 */
export function ctlErrorLine(e: unknown): string {
  const err = e as Error & { code?: string };
  if (err instanceof AdminError && err.refused) return `nbd-migrate ctl: the server refused: ${err.code}: ${err.message}`;
  const hint: Record<string, string> = {
    ENOENT: '(no server listens there: check serve --admin-socket, or pass ctl --socket)',
    ECONNREFUSED: '(nothing answers: the server that made it is gone)',
    EACCES: '(the admin socket is mode 0600: run ctl as its owner, normally root)',
  };
  const why = err.code && hint[err.code] ? ` ${hint[err.code]}` : '';
  return `nbd-migrate ctl: ${err?.message ?? String(e)}${why}`;
}

type Out = (s: string) => void;
const out: Out = (s) => process.stdout.write(s + '\n');

/**
 * What the progress line shows of a job: one measure of progress (the bytes
 * in sync, from the bitmap, where every block starts dirty), so it never jumps
 * between measures when a failed sweep is retried; no ETA while the target is
 * away.
 */
export function progressFigures(s: JobStatus): ProgressFigures {
  let state = s.state + (s.convergence !== 'none' ? ` (${s.convergence})` : '');
  if (s.retrying) state += `, target unreachable: retrying (attempt ${s.retries})`;
  return {
    done: Math.max(0, s.size - s.dirtyBytes),
    total: s.size,
    dirty: s.dirtyBytes,
    rate: s.retrying ? 0 : s.rate,
    etaSeconds: s.retrying ? null : s.etaSeconds,
    pass: s.pass,
    state,
  };
}

/** Follows a job until it is final (or ready, under manual cutover); true when it ended well. */
export async function waitForJob(socket: string, exportName: string, untilReady: boolean): Promise<JobStatus> {
  const bar = new ProgressBar();
  for (;;) {
    const s = (await adminRequest(socket, { cmd: 'status', export: exportName })) as JobStatus;
    bar.draw(progressFigures(s));
    const final = s.state === 'completed' || s.state === 'aborted' || s.state === 'failed';
    if (final || (untilReady && s.state === 'ready')) {
      bar.end(
        s.state === 'completed'
          ? `completed: ${formatBytes(s.dataBytes)} copied, ${formatBytes(s.zeroBytes)} zeroed, ${formatBytes(s.skippedBytes)} skipped, cutover pause ${s.pauseMs} ms`
          : s.state === 'failed'
            ? `failed: ${s.error}`
            : s.state,
      );
      return s;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

function printStatus(st: { exports: ExportStatus[]; jobs: JobStatus[] }): void {
  for (const e of st.exports)
    out(
      `export ${e.name}: ${formatBytes(e.size)} ${e.image}, ${e.connections} connection(s), dirty ${formatBytes(e.dirtyBytes)} ` +
        `(${e.dirtyBlocks} × ${formatBytes(e.granularity)}), backend ${e.backend}`,
    );
  for (const j of st.jobs)
    out(
      `mirror ${j.export} -> ${j.target}: ${j.state}, pass ${j.pass}, copied ${formatBytes(j.bytesCopied)}, dirty ${formatBytes(j.dirtyBytes)}, ` +
        `rate ${formatBytes(j.rate)}/s, convergence ${j.convergence}, retries ${j.retries}` +
        (j.pauseMs !== null ? `, cutover pause ${j.pauseMs} ms` : '') +
        (j.error ? `, error: ${j.error}` : ''),
    );
  if (st.jobs.length === 0) out('no mirror jobs');
}

export function ctlCommand(y: Argv): Argv {
  ctlRunning = true; // yargs builds only the command it runs
  return y
    .option('socket', { type: 'string', default: DEFAULT_SOCKET, describe: 'The server\'s admin socket (serve --admin-socket)' })
    .command(
      'status [export]',
      'Exports, dirty data and mirror jobs',
      (y) => y.positional('export', { type: 'string' }).option('json', { type: 'boolean', describe: 'Print the raw JSON reply' }),
      async (a) => {
        const r = await adminRequest(a.socket as string, a.export ? { cmd: 'status', export: a.export } : { cmd: 'status' });
        if (a.json || a.export) out(JSON.stringify(r, null, 2));
        else printStatus(r as { exports: ExportStatus[]; jobs: JobStatus[] });
      },
    )
    .command(
      'mirror <export> <target>',
      'Start mirroring an export to an NBD target (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)',
      (y) =>
        y
          .positional('export', { type: 'string', demandOption: true })
          .positional('target', { type: 'string', demandOption: true })
          .option('max-bandwidth', { type: 'string', describe: 'Copy rate limit, e.g. 200M (bytes/s, binary units)' })
          .option('cutover', { choices: ['auto', 'manual'], default: 'manual', describe: 'Switch as soon as ready (auto) or on `ctl cutover` (manual)' })
          .option('max-downtime', { type: 'string', default: '50ms', describe: 'Ready when the dirty data left can be copied within this' })
          .option('converge', { choices: ['active', 'throttle'], default: 'active', describe: 'When the guest outpaces the copy: write-through to both sides, or throttle guest writes' })
          .option('handoff', { choices: ['forward', 'disconnect'], default: 'forward', describe: 'After cutover: keep guests connected and forward to the target, or disconnect them' })
          .option('max-retries', { type: 'number', default: 10, describe: 'Consecutive target failures before the job fails' })
          .option('target-timeout', { type: 'string', default: '30s', describe: 'A target that answers nothing for this long is dropped and reconnected' })
          .option('cutover-timeout', { type: 'string', default: '5s', describe: 'A cutover not done within this fails; guests go on with the local image' })
          .option('force', { type: 'boolean', default: false, describe: 'Mirror onto a live nbd-migrate export, or take over a destination bound to another job (the copy starts again)' })
          .option('require-space', { type: 'boolean', default: false, describe: 'Refuse a destination that cannot hold the full virtual size (default: warn)' })
          .option('wait', { type: 'boolean', describe: 'Draw progress until the job completes (or is ready, with manual cutover)' }),
      async (a) => {
        const req: Record<string, unknown> = {
          cmd: 'mirror',
          export: a.export,
          target: a.target,
          cutover: a.cutover,
          maxDowntime: a['max-downtime'],
          converge: a.converge,
          handoff: a.handoff,
          maxRetries: a['max-retries'],
          targetTimeout: a['target-timeout'],
          cutoverTimeout: a['cutover-timeout'],
          force: a.force,
          requireSpace: a['require-space'],
        };
        if (a['max-bandwidth']) req.maxBandwidth = a['max-bandwidth'];
        await adminRequest(a.socket as string, req);
        out(`mirror of ${a.export} to ${a.target} started`);
        if (a.wait) {
          const s = await waitForJob(a.socket as string, a.export as string, a.cutover === 'manual');
          if (s.state === 'failed' || s.state === 'aborted') process.exitCode = 1;
        }
      },
    )
    .command(
      'cutover <export>',
      'Switch a ready mirror to its target',
      (y) => y.positional('export', { type: 'string', demandOption: true }).option('wait', { type: 'boolean', default: true }),
      async (a) => {
        await adminRequest(a.socket as string, { cmd: 'cutover', export: a.export });
        if (a.wait) {
          const s = await waitForJob(a.socket as string, a.export as string, false);
          if (s.state !== 'completed') process.exitCode = 1;
        } else out('cutover requested');
      },
    )
    .command(
      'abort <export>',
      'Stop a mirror before the switch; the source stays as it was',
      (y) => y.positional('export', { type: 'string', demandOption: true }),
      async (a) => {
        await adminRequest(a.socket as string, { cmd: 'abort', export: a.export });
        out(`mirror of ${a.export} aborted`);
      },
    )
    .command(
      'set-speed <export> <rate>',
      'Change the copy rate limit (0 = unlimited)',
      (y) => y.positional('export', { type: 'string', demandOption: true }).positional('rate', { type: 'string', demandOption: true }),
      async (a) => {
        await adminRequest(a.socket as string, { cmd: 'set-speed', export: a.export, rate: a.rate });
        out(`speed of ${a.export} set to ${a.rate}`);
      },
    )
    .demandCommand(1, 'Give a ctl command: status, mirror, cutover, abort, set-speed');
}
