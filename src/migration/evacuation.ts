/**
 * Host evacuation (`ctl evacuate`): every export of this server, or the ones
 * listed, mirrored to one destination (`--to nbd://HOST:PORT/{name}`, the
 * export's name substituted). The exports wait in a queue; at most `parallel`
 * of them copy at once, each as an ordinary mirror job of the controller.
 *
 * One `--max-bandwidth` is shared by the jobs that run (SharedBandwidth: fair
 * by bytes, and a job that finishes hands its part to the others); it can be
 * changed, set or lifted while the evacuation runs (`ctl set-speed
 * --evacuation ID RATE`), so every job takes a share even when unlimited.
 * The per-job mirror options (`--max-downtime`, `--handoff`, ...) go to every
 * job as they are. A job holds
 * its slot while it copies: once it is ready under manual cutover (it then
 * copies only what guests write) or has ended, the next queued export starts.
 * One export failing, at its start or later, does not stop the others; each
 * export's outcome is kept for the summary.
 */
import { EventEmitter } from 'node:events';
import { logger, type Logger } from '../util/log.js';
import { SharedBandwidth, type BandwidthShare } from '../util/shared-bandwidth.js';
import { JobError } from './errors.js';
import type { MirrorOptions } from './options.js';
import type { JobState, JobStatus } from './states.js';

/** What an evacuation needs of the controller (MigrationController has it). */
export interface EvacuationHost {
  status(): { exports: { name: string; size: number; backend: 'local' | 'target' }[]; jobs: JobStatus[] };
  mirror(exportName: string, opts: Partial<MirrorOptions> & { target: string }): Promise<JobStatus>;
  jobStatus(exportName: string): JobStatus;
  cutover(exportName: string): JobStatus;
  abort(exportName: string): Promise<unknown>;
  on(event: 'job-state', fn: (exportName: string, to: JobState, from: JobState) => void): unknown;
  off(event: 'job-state', fn: (exportName: string, to: JobState, from: JobState) => void): unknown;
}

export interface EvacuationOptions {
  /** Destination URI; `{name}` is replaced by each export's name (URI-encoded). */
  to: string;
  /** Only these exports (default: every export not yet migrated). */
  exports?: string[];
  /** Jobs copying at once. */
  parallel: number;
  /** One budget for all running jobs, bytes/s; undefined = unlimited. */
  maxBandwidth?: number;
  cutover: 'auto' | 'manual';
  /** The mirror options every job gets (those of `ctl mirror` that are not the evacuation's own). */
  job?: EvacuationJobOptions;
}

/** What each job of an evacuation is told besides its target, cutover and share of the budget. */
export type EvacuationJobOptions = Omit<Partial<MirrorOptions>, 'target' | 'limiter' | 'maxBandwidth' | 'cutover' | 'since' | 'jobId' | 'connect' | 'localExportIds'>;

/** An export's place in the evacuation: waiting, its mirror starting, its job's state, or failed before a job existed. */
export type EvacuationExportState = 'queued' | 'starting' | JobState;

export interface EvacuationExportStatus {
  export: string;
  target: string;
  state: EvacuationExportState;
  size: number;
  /** Bytes in sync with the target (what the job copied, at most its size minus what its bitmap holds dirty); the size once completed. */
  doneBytes: number;
  /** Bytes the job wrote, zeroed or found already zero on the target. */
  bytesCopied: number;
  dataBytes: number;
  rate: number;
  etaSeconds: number | null;
  /** Its part of the shared budget now (the budget over the jobs in it), or null when unlimited. */
  maxBandwidth: number | null;
  pauseMs: number | null;
  error: string | null;
  startedAt: string | null;
  finishedAt: string | null;
}

export interface EvacuationCounts {
  queued: number;
  /** Starting or copying (holding a slot). */
  running: number;
  /** Synchronised, waiting for `ctl cutover` (manual), or cutting over. */
  ready: number;
  completed: number;
  failed: number;
  aborted: number;
}

export interface EvacuationStatus {
  id: string;
  to: string;
  parallel: number;
  maxBandwidth: number | null;
  cutover: 'auto' | 'manual';
  /** The mirror options given to every job (only those set; the others are the mirror defaults). */
  job: EvacuationJobOptions;
  /** running; ready (manual: every export that did not fail is ready for `ctl cutover --all`); done (every export ended). */
  state: 'running' | 'ready' | 'done';
  counts: EvacuationCounts;
  /** Sum of the exports' sizes. */
  bytesTotal: number;
  /** Sum of the exports' bytes in sync. */
  bytesDone: number;
  /** Sum of the bytes the jobs wrote, zeroed or skipped on the targets. */
  bytesCopied: number;
  /** Sum of the running jobs' rates, bytes/s. */
  rate: number;
  /** Seconds until the exports not ended are in sync, at that rate; null when unknown. */
  etaSeconds: number | null;
  startedAt: string;
  finishedAt: string | null;
  /** Seconds since it started (until it was done). */
  elapsedSeconds: number;
  exports: EvacuationExportStatus[];
}

interface Item {
  name: string;
  target: string;
  size: number;
  phase: 'queued' | 'starting' | 'job' | 'failed-to-start' | 'cancelled';
  error: string | null;
  share: BandwidthShare | undefined;
  /** The job's last status, kept once it ended (a later job of the same export must not replace it). */
  last: JobStatus | undefined;
  ended: boolean;
  startedAt: Date | null;
  finishedAt: Date | null;
}

const FINAL: readonly JobState[] = ['completed', 'aborted', 'failed'];
let seq = 0;

export class Evacuation extends EventEmitter {
  readonly id: string;
  private readonly items: Item[];
  /** Always there (Infinity when unlimited), so that a limit can be set on the running jobs later. */
  private readonly budget: SharedBandwidth;
  private readonly startedAt = new Date();
  private finishedAt: Date | null = null;
  private cancelled = false;
  private readonly log: Logger;
  private readonly onJobState = (name: string, to: JobState) => this.jobStateChanged(name, to);

  constructor(
    private readonly host: EvacuationHost,
    private readonly opts: EvacuationOptions,
    exports: { name: string; size: number }[],
  ) {
    super();
    this.id = `evac-${++seq}`;
    this.log = logger({ evacuation: this.id });
    this.budget = new SharedBandwidth(opts.maxBandwidth || Infinity);
    this.items = exports.map((e) => ({
      name: e.name,
      target: targetFor(opts.to, e.name),
      size: e.size,
      phase: 'queued',
      error: null,
      share: undefined,
      last: undefined,
      ended: false,
      startedAt: null,
      finishedAt: null,
    }));
  }

  /** The exports it holds (queued, running or ready), which no other evacuation may take. */
  holds(name: string): boolean {
    return this.items.some((i) => i.name === name && !this.itemEnded(i));
  }

  get isDone(): boolean {
    return this.finishedAt !== null;
  }

  start(): void {
    this.host.on('job-state', this.onJobState);
    this.log.info('evacuation-started', {
      exports: this.items.map((i) => i.name),
      to: this.opts.to,
      parallel: this.opts.parallel,
      maxBandwidth: this.opts.maxBandwidth ?? null,
      cutover: this.opts.cutover,
      job: this.opts.job ?? {},
    });
    this.pump();
  }

  /**
   * `ctl set-speed --evacuation`: a new budget for the running jobs and the ones still
   * queued (undefined lifts it). The shares keep their fairness; the rate applies at once.
   */
  setSpeed(bytesPerSecond: number | undefined): EvacuationStatus {
    if (this.finishedAt) throw new JobError('EINVAL', `evacuation ${this.id} is done`);
    const from = this.budget.unlimited ? null : this.budget.rate;
    this.budget.setRate(bytesPerSecond || Infinity);
    this.log.info('evacuation-speed', { from, maxBandwidth: bytesPerSecond || null, sharedBy: this.budget.size });
    return this.status();
  }

  /** Server shutdown: nothing queued starts any more (the controller aborts the running jobs). */
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    // What the restarted server still has to move: the queued exports and the jobs that stop now
    // (resumably; a cutover in progress finishes). The same evacuation over those resumes each
    // stopped job where it was (its target URI is the record's) and starts the others.
    const left = this.items.filter((i) => !this.itemEnded(i) && (i.phase !== 'job' || this.jobState(i) !== 'cutting-over')).map((i) => i.name);
    if (left.length > 0)
      this.log.warn('evacuation-resumable', {
        exports: left,
        effect: `stopped with the server; after the restart \`${this.resumeCommand(left)}\` goes on: stopped jobs resume, queued exports start`,
      });
    for (const i of this.items)
      if (i.phase === 'queued') {
        i.phase = 'cancelled';
        i.error = 'the server shut down before this export started';
        i.finishedAt = new Date();
        this.log.warn('evacuation-export', { export: i.name, state: 'aborted', error: i.error });
      }
    this.checkDone();
  }

  /** `ctl abort` of an export still queued: it leaves the queue (aborted); undefined when it is not queued here. */
  abortQueued(name: string): EvacuationExportStatus | undefined {
    const i = this.items.find((x) => x.name === name && x.phase === 'queued');
    if (!i) return undefined;
    i.phase = 'cancelled';
    i.error = 'aborted before it started';
    i.finishedAt = new Date();
    this.log.info('evacuation-export', { export: i.name, state: 'aborted', error: i.error });
    this.checkDone();
    return this.itemStatus(i);
  }

  /** `ctl cutover --all`: requests the switch of every job that is ready now; returns their names and the others'. */
  cutoverReady(): { requested: string[]; notReady: { export: string; state: EvacuationExportState }[] } {
    const requested: string[] = [];
    const notReady: { export: string; state: EvacuationExportState }[] = [];
    for (const i of this.items) {
      const st = this.itemStatus(i);
      if (FINAL.includes(st.state as JobState)) continue;
      if (st.state === 'ready') {
        this.host.cutover(i.name);
        requested.push(i.name);
      } else notReady.push({ export: i.name, state: st.state });
    }
    if (requested.length > 0) this.log.info('evacuation-cutover', { exports: requested, notReady: notReady.map((n) => n.export) });
    return { requested, notReady };
  }

  get cutoverMode(): 'auto' | 'manual' {
    return this.opts.cutover;
  }

  status(): EvacuationStatus {
    const exports = this.items.map((i) => this.itemStatus(i));
    const counts: EvacuationCounts = { queued: 0, running: 0, ready: 0, completed: 0, failed: 0, aborted: 0 };
    for (const e of exports) {
      if (e.state === 'queued') counts.queued++;
      else if (e.state === 'starting' || e.state === 'created' || e.state === 'copying') counts.running++;
      else if (e.state === 'ready' || e.state === 'cutting-over') counts.ready++;
      else counts[e.state]++;
    }
    const sum = (f: (e: EvacuationExportStatus) => number) => exports.reduce((n, e) => n + f(e), 0);
    const live = exports.filter((e) => !FINAL.includes(e.state as JobState));
    const rate = sum((e) => (FINAL.includes(e.state as JobState) ? 0 : e.rate));
    const left = live.reduce((n, e) => n + (e.size - e.doneBytes), 0);
    const end = this.finishedAt ?? new Date();
    return {
      id: this.id,
      to: this.opts.to,
      parallel: this.opts.parallel,
      maxBandwidth: this.budget.unlimited ? null : this.budget.rate,
      cutover: this.opts.cutover,
      job: this.opts.job ?? {},
      state: this.finishedAt ? 'done' : counts.queued === 0 && counts.running === 0 && this.opts.cutover === 'manual' ? 'ready' : 'running',
      counts,
      bytesTotal: sum((e) => e.size),
      bytesDone: sum((e) => e.doneBytes),
      bytesCopied: sum((e) => e.bytesCopied),
      rate,
      etaSeconds: left === 0 ? 0 : rate > 0 ? Math.round((left / rate) * 10) / 10 : null,
      startedAt: this.startedAt.toISOString(),
      finishedAt: this.finishedAt?.toISOString() ?? null,
      elapsedSeconds: Math.round((end.getTime() - this.startedAt.getTime()) / 100) / 10,
      exports,
    };
  }

  // ------------------------------------------------------------------ internals

  private itemStatus(i: Item): EvacuationExportStatus {
    let s: JobStatus | undefined = i.last;
    if (i.phase === 'job' && !i.ended) {
      try {
        s = this.host.jobStatus(i.name);
      } catch {
        /* the export went away (reload): its last status stands */
      }
    }
    const state: EvacuationExportState =
      i.phase === 'queued' ? 'queued' : i.phase === 'starting' ? 'starting' : i.phase === 'failed-to-start' ? 'failed' : i.phase === 'cancelled' ? 'aborted' : (s?.state ?? 'created');
    // The bitmap clears a chunk's bits when its copy starts (up to maxInflight chunks ahead of the
    // writes), so what is in sync is at most what has been written, zeroed or skipped.
    const doneBytes = state === 'completed' ? i.size : s ? Math.min(s.bytesCopied, Math.max(0, s.size - s.dirtyBytes)) : 0;
    return {
      export: i.name,
      target: i.target,
      state,
      size: i.size,
      doneBytes,
      bytesCopied: s?.bytesCopied ?? 0,
      dataBytes: s?.dataBytes ?? 0,
      rate: s && !FINAL.includes(s.state) ? s.rate : 0,
      etaSeconds: s && !FINAL.includes(s.state) ? s.etaSeconds : null,
      maxBandwidth: i.share && !i.ended && !this.budget.unlimited ? i.share.rate : null,
      pauseMs: s?.pauseMs ?? null,
      error: i.error ?? s?.error ?? null,
      startedAt: i.startedAt?.toISOString() ?? null,
      finishedAt: i.finishedAt?.toISOString() ?? null,
    };
  }

  /** The job's state now (undefined when the controller has no job for it). */
  private jobState(i: Item): JobState | undefined {
    try {
      return this.host.jobStatus(i.name).state;
    } catch {
      return undefined;
    }
  }

  /**
   * The ctl command that starts this evacuation again over `exports`, with the
   * budget it has now and the per-job options it was given (but not --force:
   * with it a stopped job would start afresh instead of resuming).
   */
  resumeCommand(exports: readonly string[]): string {
    const q = (v: string) => (/^[\w@%+=:,./{}-]+$/.test(v) ? v : `'${v.replace(/'/g, `'\\''`)}'`);
    const args = ['nbd-migrate', 'ctl', 'evacuate', '--to', q(this.opts.to), '--exports', q(exports.join(',')), '--parallel', String(this.opts.parallel)];
    if (!this.budget.unlimited) args.push('--max-bandwidth', String(Math.round(this.budget.rate)));
    args.push('--cutover', this.opts.cutover);
    const j = this.opts.job ?? {};
    const ms = (v: number) => `${v}ms`;
    if (j.maxDowntimeMs !== undefined) args.push('--max-downtime', ms(j.maxDowntimeMs));
    if (j.converge !== undefined) args.push('--converge', j.converge);
    if (j.handoff !== undefined) args.push('--handoff', j.handoff);
    if (j.maxRetries !== undefined) args.push('--max-retries', String(j.maxRetries));
    if (j.targetTimeoutMs !== undefined) args.push('--target-timeout', ms(j.targetTimeoutMs));
    if (j.cutoverTimeoutMs !== undefined) args.push('--cutover-timeout', ms(j.cutoverTimeoutMs));
    if (j.writeThroughTimeoutMs !== undefined) args.push('--write-through-timeout', ms(j.writeThroughTimeoutMs));
    if (j.requireSpace) args.push('--require-space');
    return args.join(' ');
  }

  private itemEnded(i: Item): boolean {
    return i.phase === 'failed-to-start' || i.phase === 'cancelled' || i.ended;
  }

  /** Holding a slot: starting, or a job that is copying. */
  private holdsSlot(i: Item): boolean {
    if (i.phase === 'starting') return true;
    if (i.phase !== 'job' || i.ended) return false;
    try {
      const st = this.host.jobStatus(i.name).state;
      return st === 'created' || st === 'copying';
    } catch {
      return false;
    }
  }

  private pump(): void {
    if (this.cancelled) return this.checkDone();
    let slots = this.opts.parallel - this.items.filter((i) => this.holdsSlot(i)).length;
    for (const i of this.items) {
      if (slots <= 0) break;
      if (i.phase !== 'queued') continue;
      slots--;
      void this.launch(i);
    }
    this.checkDone();
  }

  private async launch(i: Item): Promise<void> {
    i.phase = 'starting';
    i.startedAt = new Date();
    i.share = this.budget.share(i.name);
    this.log.info('evacuation-export', { export: i.name, state: 'starting', target: i.target });
    try {
      const opts: Partial<MirrorOptions> & { target: string } = { ...this.opts.job, target: i.target, cutover: this.opts.cutover, limiter: i.share };
      const s = await this.host.mirror(i.name, opts);
      i.phase = 'job';
      i.last = s;
      if (this.cancelled) {
        // The server began shutting down while this one connected: it must not copy on.
        await this.host.abort(i.name).catch((e: unknown) => this.log.warn('evacuation-abort-failed', { export: i.name, cause: e }));
      }
      // It may have ended already (its state event came before the reply).
      const now = this.host.jobStatus(i.name);
      if (FINAL.includes(now.state)) this.ended(i, now);
    } catch (e) {
      i.share?.leave();
      i.phase = 'failed-to-start';
      i.error = (e as Error)?.message ?? String(e);
      i.finishedAt = new Date();
      this.log.error('evacuation-export', { export: i.name, state: 'failed', target: i.target, error: i.error, cause: e });
    }
    this.pump();
  }

  private jobStateChanged(name: string, to: JobState): void {
    const i = this.items.find((x) => x.name === name && x.phase === 'job' && !x.ended);
    if (!i) return;
    if (FINAL.includes(to)) {
      let s: JobStatus | undefined;
      try {
        s = this.host.jobStatus(name);
      } catch {
        s = i.last;
      }
      this.ended(i, s);
    } else this.log.info('evacuation-export', { export: name, state: to });
    this.pump();
  }

  private ended(i: Item, s: JobStatus | undefined): void {
    if (i.ended) return;
    i.ended = true;
    i.last = s;
    i.finishedAt = new Date();
    i.share?.leave();
    const fields = { export: i.name, state: s?.state, bytesCopied: s?.bytesCopied, error: s?.error ?? null };
    if (s?.state === 'completed') this.log.info('evacuation-export', fields);
    else this.log.error('evacuation-export', fields);
  }

  private checkDone(): void {
    if (this.finishedAt || !this.items.every((i) => this.itemEnded(i))) return;
    this.finishedAt = new Date();
    this.host.off('job-state', this.onJobState);
    const st = this.status();
    this.log.info('evacuation-finished', { ...st.counts, seconds: st.elapsedSeconds, bytesCopied: st.bytesCopied });
    this.emit('done', st);
  }
}

/** The destination of one export: `{name}` in the template replaced by its URI-encoded name. */
export function targetFor(template: string, name: string): string {
  return template.split('{name}').join(encodeURIComponent(name));
}

/** The evacuations of one server: starts them after checking the request, and answers for all of them. */
export class Evacuations {
  private readonly list: Evacuation[] = [];

  constructor(private readonly host: EvacuationHost) {}

  /** Checks the request (nothing starts when it is refused), then starts the evacuation. */
  start(opts: EvacuationOptions): EvacuationStatus {
    if (!(opts.parallel >= 1)) throw new JobError('EINVAL', '"parallel" must be at least 1');
    const st = this.host.status();
    const byName = new Map(st.exports.map((e) => [e.name, e]));
    const running = new Set(st.jobs.filter((j) => !FINAL.includes(j.state)).map((j) => j.export));
    const migrated = (name: string) => byName.get(name)?.backend === 'target' || st.jobs.some((j) => j.export === name && j.state === 'completed');
    let names: string[];
    if (opts.exports !== undefined && opts.exports.length > 0) {
      names = [...new Set(opts.exports)];
      const unknown = names.filter((n) => !byName.has(n));
      if (unknown.length) throw new JobError('ENOENT', `no export named ${unknown.map((n) => `"${n}"`).join(', ')}`);
      const done = names.filter(migrated);
      if (done.length) throw new JobError('EINVAL', `already migrated: ${done.join(', ')}`);
    } else names = [...byName.keys()].filter((n) => !migrated(n));
    if (names.length === 0) throw new JobError('EINVAL', 'nothing to evacuate: every export is already migrated');
    const busy = names.filter((n) => running.has(n) || this.list.some((e) => e.holds(n)));
    if (busy.length) throw new JobError('EBUSY', `a mirror or evacuation already holds ${busy.join(', ')}`);
    if (names.length > 1 && !opts.to.includes('{name}'))
      throw new JobError('EINVAL', `"to" must contain {name} (the export's name) when more than one export moves: ${opts.to}`);
    const evac = new Evacuation(this.host, opts, names.map((n) => ({ name: n, size: byName.get(n)!.size })));
    this.list.push(evac);
    // Keep the last few that are done, for status.
    const done = this.list.filter((e) => e.isDone);
    for (const old of done.slice(0, Math.max(0, done.length - 8))) this.list.splice(this.list.indexOf(old), 1);
    evac.start();
    return evac.status();
  }

  status(): EvacuationStatus[] {
    return this.list.map((e) => e.status());
  }

  /** `ctl set-speed --evacuation ID RATE`: the shared budget of a running evacuation (undefined: unlimited). */
  setSpeed(id: string, bytesPerSecond: number | undefined): EvacuationStatus {
    const e = this.list.find((x) => x.id === id);
    if (!e) {
      const known = this.list.filter((x) => !x.isDone).map((x) => x.id);
      throw new JobError('ENOENT', `no evacuation "${id}"${known.length ? ` (running: ${known.join(', ')})` : ' (none is running)'}`);
    }
    return e.setSpeed(bytesPerSecond);
  }

  /** `cutover --all`: every ready job of every manual evacuation that is not done. */
  cutoverAll(): { requested: string[]; notReady: { export: string; state: EvacuationExportState }[] } {
    const manual = this.list.filter((e) => !e.isDone && e.cutoverMode === 'manual');
    if (manual.length === 0) throw new JobError('ENOENT', 'no manual evacuation is running');
    const out = { requested: [] as string[], notReady: [] as { export: string; state: EvacuationExportState }[] };
    for (const e of manual) {
      const r = e.cutoverReady();
      out.requested.push(...r.requested);
      out.notReady.push(...r.notReady);
    }
    return out;
  }

  /** `ctl abort` of a queued export: it leaves its evacuation's queue. */
  abortQueued(name: string): EvacuationExportStatus | undefined {
    for (const e of this.list) {
      const st = e.isDone ? undefined : e.abortQueued(name);
      if (st) return st;
    }
    return undefined;
  }

  /** Server shutdown: queued exports never start. */
  cancel(): void {
    for (const e of this.list) e.cancel();
  }
}
