/**
 * `nbd-migrate ctl`: the operator's side of the admin socket.
 */
import type { Arguments, Argv, Options } from 'yargs';
import type { ArgSpec } from '../admin/args.js';
import { ADMIN_COMMANDS, type AdminCommand, type AdminCommandName } from '../admin/commands.js';
import { AdminError, adminRequest } from '../admin/server.js';
import type { CheckpointInfo } from '../dirty/checkpoints.js';
import type { ExportStatus } from '../migration/controller.js';
import type { JobStatus } from '../migration/job.js';
import type { PostcopyStatus } from '../migration/postcopy.js';
import { DEFAULT_ADMIN_SOCKET } from '../util/paths.js';
import { formatBytes } from '../util/units.js';
import { ProgressBar, type ProgressFigures } from './progress.js';
import { evacuationSummary, printStatusTables, waitForEvacuation } from './evacuate.js';
import type { EvacuationStatus } from '../migration/evacuation.js';

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
    // After the switch, the --on-cutover command is part of the outcome: waited for, and a failure fails ctl.
    const hookRunning = s.state === 'completed' && s.onCutover?.state === 'running';
    if ((final && !hookRunning) || (untilReady && s.state === 'ready')) {
      bar.end(
        s.state === 'completed'
          ? `completed: ${formatBytes(s.dataBytes)} copied, ${formatBytes(s.zeroBytes)} zeroed, ${formatBytes(s.skippedBytes)} skipped, cutover pause ${s.pauseMs} ms`
          : s.state === 'failed'
            ? `failed: ${s.error}`
            : s.state,
      );
      const h = s.onCutover;
      if (h?.state === 'ok') out(`on-cutover: done in ${h.durationMs} ms`);
      else if (h?.state === 'failed') {
        const why = h.timedOut ? `killed after ${h.durationMs} ms (--on-cutover-timeout)` : h.signal ? `killed by ${h.signal}` : `exit code ${h.exitCode}`;
        process.stderr.write(`on-cutover failed: ${why}${h.stderrTail ? `: ${h.stderrTail.split('\n').slice(-3).join(' / ')}` : ''}\n`);
        process.exitCode = 1;
      }
      return s;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** `ctl status` without --json: tables (src/cli/evacuate.ts). */
function printStatus(st: { exports: ExportStatus[]; jobs: JobStatus[]; evacuations?: EvacuationStatus[]; postcopy?: PostcopyStatus[] }): void {
  printStatusTables(st, out);
  for (const p of st.postcopy ?? [])
    out(
      `post-copy ${p.export} from ${p.source}: ${p.state}; present ${formatBytes(p.presentBytes)} of ${formatBytes(p.size)}, ` +
        `absent ${formatBytes(p.absentBytes)}, ${formatBytes(p.rate)}/s (source ${formatBytes(p.sourceRate)}/s), ETA ${p.etaSeconds === null ? '-' : `${p.etaSeconds} s`}` +
        (p.lastError && !p.sourceConnected && p.state !== 'completed' ? `; source away: ${p.lastError}` : ''),
    );
}

/** One ctl subcommand: which table arguments are positionals, what ctl sends by default, and what it prints. */
export interface CtlSubcommand {
  /** Table arguments given as positionals, in order: `<name>` required, `[name]` optional. */
  readonly positionals?: string;
  /** Values sent for table arguments the operator did not give (and shown in --help). */
  readonly defaults?: Readonly<Record<string, unknown>>;
  /** ctl's own options, never sent. */
  readonly local?: Readonly<Record<string, Options>>;
  /** Sends `request` (the table arguments given, or defaulted) and reports the reply. */
  run(socket: string, request: Record<string, unknown>, a: Arguments): Promise<void>;
}

/**
 * A ctl subcommand for every admin command, or 'socket-only'. The options come
 * from the command's table entry (src/admin/commands.ts): an argument the table
 * gains is a ctl option at once (camelCase as --kebab-case).
 */
export const CTL_SUBCOMMANDS: { readonly [K in AdminCommandName]: CtlSubcommand | 'socket-only' } = {
  postcopy: {
    positionals: '<export> <target>',
    defaults: { handoff: 'forward' },
    run: async (socket, req, a) => {
      const r = (await adminRequest(socket, req)) as { pauseMs: number; handoff: string };
      out(`${a.export} handed over to ${a.target}: image fenced, guests ${r.handoff === 'forward' ? 'forwarded' : 'disconnected'} (writes held ${r.pauseMs} ms); the destination fetches the rest`);
    },
  },
  status: {
    positionals: '[export]',
    local: { json: { type: 'boolean', describe: 'Print the raw JSON reply' } },
    run: async (socket, req, a) => {
      const r = await adminRequest(socket, req);
      if (a.json || a.export) out(JSON.stringify(r, null, 2));
      else printStatus(r as { exports: ExportStatus[]; jobs: JobStatus[] });
    },
  },
  mirror: {
    positionals: '<export> <target>',
    defaults: {
      cutover: 'manual',
      maxDowntime: '50ms',
      converge: 'active',
      handoff: 'forward',
      maxRetries: 10,
      targetTimeout: '30s',
      cutoverTimeout: '5s',
      force: false,
      requireSpace: false,
    },
    local: { wait: { type: 'boolean', describe: 'Draw progress until the job completes (or is ready, with manual cutover)' } },
    run: async (socket, req, a) => {
      await adminRequest(socket, req);
      out(`mirror of ${a.export} to ${a.target} started`);
      if (a.wait) {
        const s = await waitForJob(socket, a.export as string, a.cutover === 'manual');
        if (s.state === 'failed' || s.state === 'aborted') process.exitCode = 1;
      }
    },
  },
  cutover: {
    positionals: '[export]',
    local: { wait: { type: 'boolean', default: true } },
    run: async (socket, req, a) => {
      if (a.all) return cutoverAll(socket, req, a.wait === true);
      await adminRequest(socket, req);
      if (a.wait) {
        const s = await waitForJob(socket, a.export as string, false);
        if (s.state !== 'completed') process.exitCode = 1;
      } else out('cutover requested');
    },
  },
  abort: {
    positionals: '<export>',
    run: async (socket, req, a) => {
      await adminRequest(socket, req);
      out(`mirror of ${a.export} aborted`);
    },
  },
  'set-speed': {
    // ctl set-speed EXPORT RATE, or ctl set-speed --evacuation ID RATE (the one positional is then the rate).
    positionals: '[export] [rate]',
    run: async (socket, req, a) => {
      if (req.evacuation !== undefined && req.rate === undefined && req.export !== undefined) {
        req.rate = req.export;
        delete req.export;
      }
      const r = (await adminRequest(socket, req)) as EvacuationStatus;
      if (req.evacuation === undefined) return out(`speed of ${a.export} set to ${a.rate}`);
      const shared = r.exports.filter((e) => e.state === 'copying' || e.state === 'starting').length;
      out(
        `budget of evacuation ${r.id} set to ${r.maxBandwidth !== null ? `${formatBytes(r.maxBandwidth)}/s` : 'unlimited'}` +
          ` (shared by ${shared} running job${shared === 1 ? '' : 's'}, ${r.counts.queued} queued)`,
      );
    },
  },
  checkpoint: {
    positionals: '<action> <export> [name]',
    local: { json: { type: 'boolean', describe: 'Print the raw JSON reply' } },
    run: async (socket, req, a) => {
      const r = (await adminRequest(socket, req)) as CheckpointInfo | CheckpointInfo[];
      if (a.json) return out(JSON.stringify(r, null, 2));
      const line = (c: CheckpointInfo) =>
        `${c.name}: created ${c.createdAt}, changed since ${formatBytes(c.dirtyBytes)} (${c.dirtyBlocks} × ${formatBytes(c.granularity)})` +
        `${c.recovered ? ', recovered after an unclean shutdown (over-reports)' : ''}; NBD context ${c.context}`;
      if (Array.isArray(r)) {
        if (r.length === 0) out(`no checkpoints on ${a.export}`);
        for (const c of r) out(line(c));
      } else out(`checkpoint ${a.action === 'create' ? 'created' : 'deleted'}: ${line(r)}`);
    },
  },
  'set-acl': 'socket-only',
  evacuate: {
    defaults: { parallel: 2, cutover: 'manual' },
    local: {
      wait: {
        type: 'boolean',
        describe: 'Draw one progress line per export and a total until every export has ended (or is ready, with manual cutover); exit 1 if any failed',
      },
    },
    run: async (socket, req, a) => {
      // --exports a,b or --exports a b
      if (Array.isArray(req.exports)) req.exports = (req.exports as unknown[]).flatMap((x) => String(x).split(',')).filter((x) => x !== '');
      const st = (await adminRequest(socket, req)) as EvacuationStatus;
      out(`evacuation ${st.id} of ${st.exports.map((e) => e.export).join(', ')} to ${st.to} started (parallel ${st.parallel})`);
      if (!a.wait) return;
      const end = await waitForEvacuation(socket, st.id);
      for (const line of evacuationSummary(end)) out(line);
      if (end.counts.failed > 0 || end.counts.aborted > 0) process.exitCode = 1;
    },
  },
};

/** `ctl cutover --all`: every ready job of the manual evacuations; with --wait (default), each one's outcome. */
async function cutoverAll(socket: string, req: Record<string, unknown>, wait: boolean): Promise<void> {
  const r = (await adminRequest(socket, req)) as { requested: string[]; notReady: { export: string; state: string }[] };
  out(`cutover requested for ${r.requested.length ? r.requested.join(', ') : 'no export (none is ready)'}`);
  if (r.notReady.length) out(`not ready: ${r.notReady.map((n) => `${n.export} (${n.state})`).join(', ')}`);
  if (!wait) return;
  let bad = r.requested.length === 0;
  for (const name of r.requested) {
    let s: JobStatus;
    for (;;) {
      s = (await adminRequest(socket, { cmd: 'status', export: name })) as JobStatus;
      if (s.state === 'completed' || s.state === 'failed' || s.state === 'aborted') break;
      await new Promise((res) => setTimeout(res, 250));
    }
    out(`${name}: ${s.state}${s.state === 'completed' ? `, cutover pause ${s.pauseMs} ms` : s.error ? `: ${s.error}` : ''}`);
    if (s.state !== 'completed') bad = true;
  }
  if (bad) process.exitCode = 1;
}

/** The table arguments a subcommand takes as positionals, in order. */
export function ctlPositionals(sub: CtlSubcommand): { name: string; required: boolean }[] {
  return [...(sub.positionals ?? '').matchAll(/([<[])(\w+)[>\]]/g)].map((m) => ({ name: m[2]!, required: m[1] === '<' }));
}

/** `maxBandwidth` -> `max-bandwidth`: the ctl option of a table argument. */
export function ctlOptionName(arg: string): string {
  return arg.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}

/** A table argument as a yargs option (or positional): sizes and durations stay strings, for the server to parse. */
function yargsOption(spec: ArgSpec, dflt: unknown): Options {
  const o: Options = { describe: spec.doc };
  if (spec.kind === 'enum') o.choices = [...spec.values];
  else if (spec.kind === 'boolean') o.type = 'boolean';
  else if (spec.kind === 'integer') o.type = 'number';
  else o.type = 'string';
  if (spec.kind === 'list') o.array = true;
  if (dflt !== undefined) o.default = dflt;
  return o;
}

/** The admin commands ctl has a subcommand for, in the table's order. */
export function ctlCommandNames(): AdminCommandName[] {
  return (Object.keys(ADMIN_COMMANDS) as AdminCommandName[]).filter((name) => CTL_SUBCOMMANDS[name] !== 'socket-only');
}

/** The ctl subcommands, as yargs commands built from the admin table. */
export function ctlCommand(y: Argv): Argv {
  ctlRunning = true; // yargs builds only the command it runs
  y = y.option('socket', { type: 'string', default: DEFAULT_SOCKET, describe: 'The server\'s admin socket (serve --admin-socket)' });
  for (const name of ctlCommandNames()) {
    const sub = CTL_SUBCOMMANDS[name] as CtlSubcommand;
    const { summary, args } = ADMIN_COMMANDS[name] as AdminCommand;
    const positionals = ctlPositionals(sub);
    y = y.command(
      [name, ...positionals.map((p) => (p.required ? `<${ctlOptionName(p.name)}>` : `[${ctlOptionName(p.name)}]`))].join(' '),
      summary,
      (c) => {
        for (const p of positionals) c = c.positional(ctlOptionName(p.name), { type: 'string', describe: args[p.name]?.doc, demandOption: p.required || undefined });
        for (const [arg, spec] of Object.entries(args))
          if (!positionals.some((p) => p.name === arg)) c = c.option(ctlOptionName(arg), yargsOption(spec, sub.defaults?.[arg]));
        for (const [opt, o] of Object.entries(sub.local ?? {})) c = c.option(opt, o);
        return c;
      },
      async (a) => {
        const req: Record<string, unknown> = { cmd: name };
        for (const arg of Object.keys(args)) {
          const v = a[ctlOptionName(arg)];
          if (v !== undefined && v !== '') req[arg] = v;
        }
        await sub.run(a.socket as string, req, a);
      },
    );
  }
  return y.demandCommand(1, `Give a ctl command: ${ctlCommandNames().join(', ')}`);
}
