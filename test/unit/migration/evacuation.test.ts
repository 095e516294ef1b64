// The evacuation's queue (src/migration/evacuation.ts) against a fake controller: which
// exports start when, what holds a slot, failures, refusals, shutdown, cutover --all.
import t from 'tap';
import { EventEmitter } from 'node:events';
import { type EvacuationHost, Evacuations, targetFor } from '../../../src/migration/evacuation.js';
import type { JobState, JobStatus } from '../../../src/migration/states.js';
import type { MirrorOptions } from '../../../src/migration/options.js';
import { BandwidthShare } from '../../../src/util/shared-bandwidth.js';
import { configureLog } from '../../../src/util/log.js';

configureLog({ level: 'error' });

const MiB = 1024 * 1024;

/** A controller whose jobs the test moves by hand: mirror() connects when `connect(name)` (or fails with `refuse(name)`). */
class FakeHost extends EventEmitter implements EvacuationHost {
  readonly started: { name: string; opts: Partial<MirrorOptions> & { target: string } }[] = [];
  readonly states = new Map<string, JobState>();
  readonly cutovers: string[] = [];
  readonly aborts: string[] = [];
  private readonly pending = new Map<string, { resolve: () => void; reject: (e: Error) => void }>();
  constructor(
    readonly exportsList: { name: string; size: number; backend: 'local' | 'target' }[],
    readonly busy: string[] = [],
  ) {
    super();
  }
  status() {
    const jobs = [...this.states].map(([n, s]) => this.job(n, s));
    for (const n of this.busy) jobs.push(this.job(n, 'copying'));
    return { exports: this.exportsList, jobs };
  }
  private job(name: string, state: JobState): JobStatus {
    const size = this.exportsList.find((e) => e.name === name)!.size;
    return { export: name, state, size, dirtyBytes: 0, bytesCopied: size, dataBytes: size, rate: 0, etaSeconds: null, pauseMs: null, error: null } as unknown as JobStatus;
  }
  mirror(name: string, opts: Partial<MirrorOptions> & { target: string }): Promise<JobStatus> {
    this.started.push({ name, opts });
    return new Promise((resolve, reject) => {
      this.pending.set(name, {
        resolve: () => {
          this.states.set(name, 'copying');
          resolve(this.job(name, 'copying'));
        },
        reject,
      });
    });
  }
  jobStatus(name: string): JobStatus {
    const s = this.states.get(name);
    if (!s) throw new Error(`no job for ${name}`);
    return this.job(name, s);
  }
  cutover(name: string): JobStatus {
    this.cutovers.push(name);
    return this.jobStatus(name);
  }
  async abort(name: string): Promise<JobStatus> {
    this.aborts.push(name);
    this.move(name, 'aborted');
    return this.jobStatus(name);
  }
  /** The job connects (mirror resolves), on the next turns. */
  async connect(name: string): Promise<void> {
    this.pending.get(name)!.resolve();
    await new Promise((r) => setImmediate(r));
  }
  async refuse(name: string, why: string): Promise<void> {
    this.pending.get(name)!.reject(new Error(why));
    await new Promise((r) => setImmediate(r));
  }
  move(name: string, to: JobState): void {
    const from = this.states.get(name)!;
    this.states.set(name, to);
    this.emit('job-state', name, to, from);
  }
}

const four = () =>
  new FakeHost([
    { name: 'a', size: 8 * MiB, backend: 'local' },
    { name: 'b', size: 8 * MiB, backend: 'local' },
    { name: 'c', size: 8 * MiB, backend: 'local' },
    { name: 'd', size: 8 * MiB, backend: 'local' },
  ]);
const states = (ev: Evacuations) => ev.status()[0]!.exports.map((e) => `${e.export}:${e.state}`).join(' ');

t.test('at most N start; an ended job or one failing to start hands its slot on, in queue order', async (t) => {
  const host = four();
  const evs = new Evacuations(host);
  const st = evs.start({ to: 'nbd://dst/{name}', parallel: 2, cutover: 'auto', maxBandwidth: 40 * MiB });
  t.equal(st.counts.queued, 2);
  t.same(host.started.map((s) => s.name), ['a', 'b'], 'the first two start');
  t.same(host.started.map((s) => s.opts.target), ['nbd://dst/a', 'nbd://dst/b'], '{name} substituted');
  t.ok(host.started.every((s) => s.opts.limiter instanceof BandwidthShare && s.opts.cutover === 'auto'), 'each takes a share of the one budget');
  t.equal(states(evs), 'a:starting b:starting c:queued d:queued');
  await host.connect('a');
  await host.refuse('b', 'target unreachable');
  t.equal(states(evs), 'a:copying b:failed c:starting d:queued', 'b failed at its start: c takes its slot');
  t.equal(evs.status()[0]!.exports[1]!.error, 'target unreachable');
  await host.connect('c');
  host.move('a', 'ready');
  host.move('a', 'cutting-over');
  t.equal(states(evs), 'a:cutting-over b:failed c:copying d:starting', 'a copies no more: d starts');
  t.equal(host.started.length, 3 + 0 + 1, 'a, b, c, d each started once');
  await host.connect('d');
  host.move('a', 'completed');
  host.move('c', 'failed');
  host.move('d', 'ready');
  t.equal(evs.status()[0]!.state, 'running');
  host.move('d', 'cutting-over');
  host.move('d', 'completed');
  const done = evs.status()[0]!;
  t.equal(done.state, 'done');
  t.same(done.counts, { queued: 0, running: 0, ready: 0, completed: 2, failed: 2, aborted: 0 });
  t.equal(host.listenerCount('job-state'), 0, 'a done evacuation stops listening');
});

t.test('manual: ready jobs give their slots on; cutover --all switches the ready ones and names the others', async (t) => {
  const host = four();
  const evs = new Evacuations(host);
  evs.start({ to: 'nbd://dst/{name}', parallel: 1, cutover: 'manual' });
  await host.connect('a');
  t.equal(states(evs), 'a:copying b:queued c:queued d:queued');
  host.move('a', 'ready');
  t.equal(states(evs), 'a:ready b:starting c:queued d:queued');
  await host.connect('b');
  t.same(evs.cutoverAll(), { requested: ['a'], notReady: [{ export: 'b', state: 'copying' }, { export: 'c', state: 'queued' }, { export: 'd', state: 'queued' }] });
  t.same(host.cutovers, ['a']);
  t.throws(() => new Evacuations(four()).cutoverAll(), { code: 'ENOENT' }, 'no manual evacuation: refused');
});

t.test('refusals: nothing starts', async (t) => {
  const host = new FakeHost(
    [
      { name: 'a', size: MiB, backend: 'local' },
      { name: 'b', size: MiB, backend: 'target' },
      { name: 'c', size: MiB, backend: 'local' },
    ],
    ['c'],
  );
  const evs = new Evacuations(host);
  t.throws(() => evs.start({ to: 'nbd://dst/{name}', exports: ['a', 'x'], parallel: 1, cutover: 'auto' }), { code: 'ENOENT', message: 'no export named "x"' });
  t.throws(() => evs.start({ to: 'nbd://dst/{name}', exports: ['b'], parallel: 1, cutover: 'auto' }), { code: 'EINVAL', message: 'already migrated: b' });
  t.throws(() => evs.start({ to: 'nbd://dst/{name}', exports: ['a', 'c'], parallel: 1, cutover: 'auto' }), { code: 'EBUSY', message: /holds c$/ });
  t.throws(() => evs.start({ to: 'nbd://dst/{name}', exports: ['a'], parallel: 0, cutover: 'auto' }), { code: 'EINVAL', message: /parallel/ });
  t.same(host.started, [], 'nothing started');
  // Every export (b is migrated, skipped; c is busy): refused as busy. Without c busy, a alone may go to a fixed URI.
  t.throws(() => evs.start({ to: 'nbd://dst/vm', parallel: 1, cutover: 'auto' }), { code: 'EBUSY' });
  host.busy.length = 0;
  t.throws(() => evs.start({ to: 'nbd://dst/vm', parallel: 1, cutover: 'auto' }), { code: 'EINVAL', message: /must contain \{name\}/ }, 'a and c to one URI');
  const st = evs.start({ to: 'nbd://dst/vm', exports: ['a'], parallel: 1, cutover: 'auto' });
  t.same(st.exports.map((e) => e.target), ['nbd://dst/vm'], 'one export may go to a URI without {name}');
  t.throws(() => evs.start({ to: 'nbd://dst/{name}', exports: ['a'], parallel: 1, cutover: 'auto' }), { code: 'EBUSY' }, 'a is held by the first evacuation');
  t.equal(targetFor('nbd+unix:///{name}?socket=/run/x.sock', 'vm 1'), 'nbd+unix:///vm%201?socket=/run/x.sock');
});

t.test('shutdown: queued exports never start; one that connects meanwhile is aborted; abort of a queued export', async (t) => {
  const host = four();
  const evs = new Evacuations(host);
  evs.start({ to: 'nbd://dst/{name}', parallel: 1, cutover: 'auto' });
  t.equal(evs.abortQueued('c')?.state, 'aborted', 'ctl abort c: out of the queue');
  t.equal(evs.abortQueued('a'), undefined, 'a is not queued (its job is the controller\'s to abort)');
  evs.cancel();
  await host.connect('a');
  t.same(host.aborts, ['a'], 'a connected after the shutdown began: aborted at once');
  t.equal(states(evs), 'a:aborted b:aborted c:aborted d:aborted');
  t.same(host.started.map((s) => s.name), ['a'], 'b and d never started');
  t.equal(evs.status()[0]!.state, 'done');
});

t.test('the per-job mirror options go to every job; set-speed changes the shared budget of a running evacuation', async (t) => {
  const host = four();
  const evs = new Evacuations(host);
  const job = { maxDowntimeMs: 2000, handoff: 'disconnect' as const, targetTimeoutMs: 10_000, cutoverTimeoutMs: 7000 };
  const st = evs.start({ to: 'nbd://dst/{name}', parallel: 2, cutover: 'auto', job });
  t.same(st.job, job, 'status shows the job options');
  t.equal(st.maxBandwidth, null, 'unlimited');
  await host.connect('a');
  await host.connect('b');
  for (const s of host.started) {
    t.match(s.opts, { ...job, cutover: 'auto', target: `nbd://dst/${s.name}` }, `${s.name} got the job options`);
    t.ok(s.opts.limiter instanceof BandwidthShare, `${s.name} takes a share even when unlimited (a limit may come later)`);
  }
  t.equal(host.started[0]!.opts.limiter!.rate, Infinity);
  const limited = evs.setSpeed(st.id, 8 * MiB);
  t.equal(limited.maxBandwidth, 8 * MiB, 'the new budget');
  t.same(limited.exports.map((e) => e.maxBandwidth), [4 * MiB, 4 * MiB, null, null], 'split between the two running jobs');
  t.equal(host.started[0]!.opts.limiter!.rate, 4 * MiB, 'the running job\'s limiter is held to it');
  t.equal(evs.setSpeed(st.id, undefined).maxBandwidth, null, 'undefined (0) lifts it');
  t.throws(() => evs.setSpeed('evac-999', MiB), { code: 'ENOENT', message: /no evacuation "evac-999" \(running: evac-\d+\)/ });
  for (const n of ['a', 'b']) host.move(n, 'completed');
  await host.connect('c');
  await host.connect('d');
  for (const n of ['c', 'd']) host.move(n, 'completed');
  t.equal(evs.status().at(-1)!.state, 'done');
  t.throws(() => evs.setSpeed(st.id, MiB), { code: 'EINVAL', message: /is done/ });
});
