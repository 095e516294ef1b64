import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { busyPollStatus, setBusyPoll } from '../../../src/util/busy-poll.js';
import { nativeAddon } from '../../../src/util/addon.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

t.before(() => {
  // The addon is built by `npm ci`; without it this file tests nothing of what it names.
  if (!nativeAddon().addon) throw new Error(`the native addon is not loaded (${nativeAddon().reason}): run npm ci, which builds native/ with node-gyp (g++, make, python3)`);
});
t.afterEach(() => {
  setBusyPoll(0);
});

/**
 * A child that echoes every byte at once, as a QD1 client answers a reply with its next request:
 * each answer is an event after a short sleep of this loop (the child's own wake-up). A pool round
 * trip is not that: its completion is often ready before the loop has gone to sleep at all.
 */
function echoPeer(): { roundTrip(): Promise<void>; close(): Promise<void> } {
  const child = spawn(process.execPath, ['-e', 'process.stdin.on("data", (d) => process.stdout.write(d));'], { stdio: ['pipe', 'pipe', 'inherit'] });
  let waiting: (() => void) | undefined;
  child.stdout.on('data', () => waiting?.());
  return {
    roundTrip: () =>
      new Promise<void>((resolve) => {
        waiting = resolve;
        child.stdin.write('x');
      }),
    close: () => new Promise<void>((resolve) => {
      child.on('close', () => resolve());
      child.stdin.end();
    }),
  };
}

/** Round trips with the echo peer until `done` holds (at least `min`, at most 5000: a loaded machine needs more). */
async function pingUntil(min: number, done: () => boolean): Promise<number> {
  const peer = echoPeer();
  let n = 0;
  while (n < min || (n < 5000 && !done())) {
    await peer.roundTrip();
    n++;
  }
  await peer.close();
  return n;
}

t.test('events close together grow the window, and the loop finds them while it polls', async (t) => {
  t.equal(setBusyPoll(100), 100, 'the bound is in force');
  const before = busyPollStatus();
  const n = await pingUntil(400, () => {
    const s = busyPollStatus();
    return s.grown > before.grown && s.caught > before.caught && s.windowUs > 0;
  });
  const s = busyPollStatus();
  t.equal(s.maxUs, 100);
  t.ok(s.grown > before.grown, `the window grew (${s.grown - before.grown} times)`);
  t.ok(s.caught > before.caught, `events were found while polling instead of after a wake-up (${s.caught - before.caught} of ${n})`);
  t.ok(s.windowUs > 0 && s.windowUs <= 100, `window ${s.windowUs} us is within the bound`);
  t.notOk(s.unavailable);
});

t.test('events after sleeps longer than the bound shrink the window to nothing', async (t) => {
  setBusyPoll(100);
  // Open the window first (a loaded machine may take more round trips to grow it).
  await pingUntil(100, () => busyPollStatus().windowUs > 0);
  const grown = busyPollStatus();
  t.ok(grown.windowUs > 0, `the window is open first (${grown.windowUs} us)`);
  // A child that writes a line every 20 ms: each line is an event after a 20 ms sleep (> 100 us).
  const child = spawn(process.execPath, ['-e', 'let n = 0; const i = setInterval(() => { process.stdout.write("x\\n"); if (++n === 12) clearInterval(i); }, 20);']);
  let lines = 0;
  // Read as the last line arrives: the child's exit that follows is a burst of events close together,
  // which opens the window again, as it should.
  let atLast: ReturnType<typeof busyPollStatus> | undefined;
  child.stdout.on('data', (d: Buffer) => {
    lines += d.toString().split('\n').length - 1;
    if (lines === 12) atLast = busyPollStatus();
  });
  await new Promise((resolve) => child.on('close', resolve));
  t.equal(lines, 12);
  t.ok(atLast, 'status read at the last line');
  t.ok(atLast!.shrunk > grown.shrunk, `the window shrank (${atLast!.shrunk - grown.shrunk} times)`);
  t.equal(atLast!.windowUs, 0, 'closed: a loop whose events come far apart sleeps');
});

t.test('0 turns polling off: the window closes and nothing more is caught', async (t) => {
  setBusyPoll(100);
  await pingUntil(100, () => busyPollStatus().windowUs > 0);
  t.equal(setBusyPoll(0), 0);
  const off = busyPollStatus();
  t.equal(off.maxUs, 0);
  t.equal(off.windowUs, 0);
  await pingUntil(200, () => true);
  const after = busyPollStatus();
  t.equal(after.caught, off.caught, 'nothing found by polling while off');
  t.equal(after.grown, off.grown, 'the window did not grow while off');
});

t.test('a bound outside 0-10000 us is refused', async (t) => {
  t.throws(() => setBusyPoll(-1), RangeError);
  t.throws(() => setBusyPoll(10_001), RangeError);
  t.throws(() => setBusyPoll(Number.NaN), RangeError);
});

t.test('polling does not keep a process alive: it exits when its work is done', async (t) => {
  const script = `import { setBusyPoll } from ${JSON.stringify(path.join(root, 'dist/src/util/busy-poll.js'))};
    import * as fs from 'node:fs';
    setBusyPoll(100);
    let n = 0;
    const next = () => fs.stat('/', () => { if (++n < 50) next(); else console.log('done'); });
    next();`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.error, undefined, 'exited by itself (no timeout)');
  t.equal(r.status, 0, r.stderr);
  t.equal(r.stdout.trim(), 'done');
});

t.test('without the addon, polling is off and status says why', async (t) => {
  const script = `import { setBusyPoll, busyPollStatus } from ${JSON.stringify(path.join(root, 'dist/src/util/busy-poll.js'))};
    console.log(JSON.stringify({ inForce: setBusyPoll(100), status: busyPollStatus() }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, NBD_MIGRATE_NATIVE: '0' }, timeout: 60_000 });
  t.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { inForce: number; status: { maxUs: number; unavailable?: string } };
  t.equal(out.inForce, 0);
  t.equal(out.status.maxUs, 0);
  t.match(out.status.unavailable, /native addon is not loaded: NBD_MIGRATE_NATIVE=0/);
});
