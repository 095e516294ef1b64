/**
 * The admin socket's commands, one entry each: the name (its key), what it
 * does, the arguments it accepts (checked by ./args.ts before the handler
 * runs), and the handler. `ctl` (src/cli/ctl.ts) builds its subcommands'
 * options from these entries, and test/unit/admin/commands.test.ts holds the
 * table, ctl and the README's "Admin socket protocol" section to each other.
 * A new command is one entry here and one line in ctl (or 'socket-only').
 */
import { busyPollStatus } from '../util/busy-poll.js';
import type { MigrationController } from '../migration/controller.js';
import type { EvacuationJobOptions } from '../migration/evacuation.js';
import type { PostcopyDestination } from '../migration/postcopy.js';
import { Acl } from '../server/acl.js';
import type { NbdServer } from '../server/server.js';
import { type Args, checkArgs, InvalidArgument, type Schema } from './args.js';
import type { Handler } from './server.js';

/** What the commands act on; serve passes its own. */
export interface AdminContext {
  readonly controller: MigrationController;
  readonly server: Pick<NbdServer, 'setAcl'>;
  /** Post-copy destinations (serve --fetch-from), by export. */
  readonly postcopy?: ReadonlyMap<string, PostcopyDestination>;
  /** `postcopy`: hands an export over to a post-copy destination (serve does it; absent elsewhere). */
  readonly handOver?: (exportName: string, o: { target: string; handoff: 'forward' | 'disconnect'; cutoverTimeoutMs?: number }) => Promise<unknown>;
}

export interface AdminCommand<S extends Schema = Schema> {
  /** One line: what the command does (ctl's help). */
  readonly summary: string;
  readonly args: S;
  /** Runs with the checked arguments; its result is the reply's "result", a thrown error's code the reply's error code. */
  run(ctx: AdminContext, args: Args<S>): unknown;
}

function command<const S extends Schema>(c: AdminCommand<S>): AdminCommand<S> {
  return c;
}

const exportArg = { kind: 'string', required: true, doc: 'The export' } as const;

type MirrorOpts = Parameters<MigrationController['mirror']>[1];

/** The mirror options that apply to each job: `ctl mirror` takes them, and `ctl evacuate` passes them to every job. */
const JOB_ARGS = {
  maxDowntime: { kind: 'duration', doc: 'Ready when the dirty data left can be copied within this' },
  converge: {
    kind: 'enum',
    values: ['active', 'throttle', 'postcopy'],
    doc: 'When the guest outpaces the copy: write-through to both sides, throttle guest writes, or switch to post-copy (the target must be served with --fetch-from)',
  },
  handoff: {
    kind: 'enum',
    values: ['forward', 'disconnect'],
    doc: 'After cutover: keep guests connected and forward to the target, or disconnect them',
  },
  maxRetries: { kind: 'integer', doc: 'Consecutive target failures before the job fails' },
  targetTimeout: { kind: 'duration', positive: true, doc: 'A target that answers nothing for this long is dropped and reconnected' },
  cutoverTimeout: { kind: 'duration', positive: true, doc: 'A cutover not done within this fails; guests go on with the local image' },
  writeThroughTimeout: {
    kind: 'duration',
    positive: true,
    doc: 'A guest write the target has not taken within this is left to the background copy',
  },
  force: {
    kind: 'boolean',
    doc: 'Mirror onto a live nbd-migrate export, or take over a destination bound to another job (the copy starts again)',
  },
  requireSpace: { kind: 'boolean', doc: 'Refuse a destination that cannot hold the full virtual size (default: warn)' },
} as const;

/** The JOB_ARGS given, as mirror options: only what was given (an option set to undefined would override the job's default). */
function jobOptions(a: Args<typeof JOB_ARGS>): EvacuationJobOptions {
  const o: EvacuationJobOptions = {};
  if (a.maxDowntime !== undefined) o.maxDowntimeMs = a.maxDowntime;
  if (a.converge !== undefined) o.converge = a.converge;
  if (a.handoff !== undefined) o.handoff = a.handoff;
  if (a.maxRetries !== undefined) o.maxRetries = a.maxRetries;
  if (a.targetTimeout !== undefined) o.targetTimeoutMs = a.targetTimeout;
  if (a.cutoverTimeout !== undefined) o.cutoverTimeoutMs = a.cutoverTimeout;
  if (a.writeThroughTimeout !== undefined) o.writeThroughTimeoutMs = a.writeThroughTimeout;
  if (a.force !== undefined) o.force = a.force;
  if (a.requireSpace !== undefined) o.requireSpace = a.requireSpace;
  return o;
}

/** The commands, in the order `known:` lists them in an unknown command's reply. */
export const ADMIN_COMMANDS = {
  status: command({
    summary: 'Exports, dirty data and mirror jobs',
    args: { export: { kind: 'string', doc: 'Only this export\'s mirror job' } },
    run: ({ controller, postcopy }, a) => {
      if (a.export === undefined) return { ...controller.status(), postcopy: [...(postcopy?.values() ?? [])].map((p) => p.status()), busyPoll: busyPollStatus() };
      return postcopy?.get(a.export)?.status() ?? controller.jobStatus(a.export);
    },
  }),
  mirror: command({
    summary: 'Start mirroring an export to an NBD target (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)',
    // Checked in this order (export last): the first bad field is the one reported.
    args: {
      target: { kind: 'string', required: true, doc: 'The NBD target (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)' },
      maxBandwidth: { kind: 'size', doc: 'Copy rate limit, e.g. 200M (bytes/s, binary units)' },
      cutover: { kind: 'enum', values: ['auto', 'manual'], doc: 'Switch as soon as ready (auto) or on `ctl cutover` (manual)' },
      ...JOB_ARGS,
      since: {
        kind: 'string',
        doc: 'The destination already holds this export as of checkpoint NAME (pre-seeded by copy): send only what changed since (you vouch for it)',
      },
      export: exportArg,
    },
    run: ({ controller }, a) => {
      const opts: MirrorOpts = { target: a.target, ...jobOptions(a) };
      // Only what was given: an option set to undefined would override the job's default.
      if (a.maxBandwidth !== undefined) opts.maxBandwidth = a.maxBandwidth || undefined; // 0: unlimited
      if (a.cutover !== undefined) opts.cutover = a.cutover;
      if (a.since !== undefined) opts.since = a.since;
      return controller.mirror(a.export, opts);
    },
  }),
  cutover: command({
    summary: 'Switch a ready mirror to its target (--all: every ready job of a manual evacuation)',
    args: {
      export: { kind: 'string', doc: 'The export (or give all)' },
      all: { kind: 'boolean', doc: 'Every ready job of a manual evacuation: {requested, notReady}' },
    },
    run: ({ controller }, a) => {
      if (a.all && a.export !== undefined) throw new InvalidArgument('give "export" or "all", not both');
      if (a.all) return controller.evacuations.cutoverAll();
      if (a.export === undefined) throw new InvalidArgument('"export" must be a non-empty string');
      return controller.cutover(a.export);
    },
  }),
  abort: command({
    summary: 'Stop a mirror before the switch; the source stays as it was',
    args: { export: exportArg },
    run: ({ controller }, a) => controller.abort(a.export),
  }),
  'set-speed': command({
    summary: 'Change the copy rate limit of an export\'s job, or (--evacuation ID) the budget an evacuation\'s jobs share (0 = unlimited)',
    args: {
      export: { kind: 'string', doc: 'The export (or give evacuation)' },
      evacuation: { kind: 'string', doc: 'An evacuation\'s id (evac-N, in status): change the budget its jobs share instead' },
      rate: { kind: 'size', required: true, doc: 'The new limit, e.g. 500M (bytes/s); 0 lifts it' },
    },
    run: ({ controller, postcopy }, a) => {
      if (a.evacuation !== undefined && a.export !== undefined) throw new InvalidArgument('give "export" or "evacuation", not both');
      if (a.evacuation !== undefined) return controller.evacuations.setSpeed(a.evacuation, a.rate || undefined);
      if (a.export === undefined) throw new InvalidArgument('"export" must be a non-empty string');
      const pc = postcopy?.get(a.export);
      if (!pc) return controller.setSpeed(a.export, a.rate || undefined);
      pc.setSpeed(a.rate || undefined);
      return pc.status();
    },
  }),
  checkpoint: command({
    summary: 'Create, list or delete an export\'s checkpoints (each records the blocks changed since it was created; NBD context qemu:dirty-bitmap:NAME)',
    args: {
      action: { kind: 'enum', values: ['create', 'list', 'delete'], required: true, doc: 'create, list or delete' },
      export: exportArg,
      name: { kind: 'string', doc: 'The checkpoint (create and delete)' },
    },
    run: ({ controller }, a) => controller.checkpoint(a.action, a.export, a.name),
  }),
  postcopy: command({
    summary: 'Hand an export over to a post-copy destination (serve --fetch-from there): hold guest writes, flush, fence the image, serve it read-only to that destination alone, move the guests',
    args: {
      target: { kind: 'string', required: true, doc: 'The destination (nbd://HOST[:PORT]/NAME), served with --fetch-from pointing at this export' },
      handoff: {
        kind: 'enum',
        values: ['forward', 'disconnect'],
        doc: 'Guests: keep them connected and forward their I/O to the destination, or disconnect them',
      },
      cutoverTimeout: {
        kind: 'duration',
        positive: true,
        doc: 'Guests are held at most this long for the destination to attach (default 5s); past it the hand-over is undone and they go on with the local image',
      },
      export: exportArg,
    },
    run: ({ handOver }, a) => {
      if (!handOver) throw new InvalidArgument('this server cannot hand exports over');
      return handOver(a.export, { target: a.target, handoff: a.handoff ?? 'forward', cutoverTimeoutMs: a.cutoverTimeout });
    },
  }),
  'set-acl': command({
    summary: 'Replace an export\'s client address list; connected clients it no longer admits are disconnected',
    // allow before export, as before the table.
    args: {
      allow: { kind: 'list', required: true, of: 'addresses/CIDRs', orNull: 'to admit everyone', doc: 'Addresses and CIDRs admitted, or null for everyone' },
      export: exportArg,
    },
    run: ({ server }, a) => ({ disconnected: server.setAcl(a.export, a.allow === null ? undefined : Acl.parse(a.allow)) }),
  }),
  evacuate: command({
    summary: 'Migrate every export (or the listed ones) to one destination, N at a time under one shared bandwidth budget',
    args: {
      to: { kind: 'string', required: true, doc: 'The destination, {name} replaced by each export\'s name: nbd://HOST:PORT/{name}' },
      exports: { kind: 'list', of: 'export names', doc: 'Only these exports (default: every export not yet migrated)' },
      parallel: { kind: 'integer', doc: 'Jobs copying at once (the others wait queued); default 2' },
      maxBandwidth: { kind: 'size', doc: 'One copy rate limit shared fairly by the running jobs, e.g. 400M (bytes/s; 0: unlimited)' },
      cutover: { kind: 'enum', values: ['auto', 'manual'], doc: 'Each job switches as soon as ready (auto), or on `ctl cutover --all` (manual)' },
      // Every job gets these, as `ctl mirror` takes them.
      ...JOB_ARGS,
    },
    run: ({ controller }, a) => {
      const job = jobOptions(a);
      return controller.evacuations.start({
        to: a.to,
        ...(a.exports !== undefined ? { exports: a.exports } : {}),
        parallel: a.parallel ?? 2,
        ...(a.maxBandwidth ? { maxBandwidth: a.maxBandwidth } : {}),
        cutover: a.cutover ?? 'manual',
        ...(Object.keys(job).length > 0 ? { job } : {}),
      });
    },
  }),
} as const;

export type AdminCommandName = keyof typeof ADMIN_COMMANDS;

/** The table as the admin socket runs it: each request's arguments are checked, then its handler runs on `ctx`. */
export function adminHandlers(ctx: AdminContext): Record<AdminCommandName, Handler> {
  const handlers = {} as Record<AdminCommandName, Handler>;
  for (const [name, c] of Object.entries(ADMIN_COMMANDS) as [AdminCommandName, AdminCommand][])
    handlers[name] = (request) => c.run(ctx, checkArgs(c.args, request));
  return handlers;
}
