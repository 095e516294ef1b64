// The fuzz campaign: one nbd-migrate server (a child process), a storm of
// generated cases over real sockets, a well-behaved client on its own export,
// and the invariants checked all along:
//   - the server stays alive and prints no uncaught exception, error-level log,
//     Node warning or internal request failure;
//   - every case is answered as the protocol requires (SessionChecker), within
//     a bound, and handshakes that stall are dropped at the handshake timeout;
//   - the fuzzed image keeps its size, the read-only export's image and a
//     canary file beside the images are untouched;
//   - the server's RSS stays under a limit;
//   - the good client keeps reading back exactly what it wrote, and new
//     connections keep being accepted; after the storm the server's file
//     descriptors return to their baseline.

import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { join } from 'node:path';
import { NbdClient } from '../../../src/client/nbd-client.js';
import { makeImage, serve, tmpDir, writeAt, type ServerHandle, type Teardownable } from '../../helpers/server.js';
import { RawNbdClient } from '../../helpers/rawclient.js';
import { SessionChecker, type CheckerConfig, type Violation } from './checker.js';
import { FUZZ_EXPORTS, generateCase, loadCorpus, MiB, type CaseSpec, type GenContext, type Target } from './generate.js';
import { Rng } from './prng.js';
import { C } from './wire.js';

export interface CampaignOptions {
  seed: number;
  /** Stop after this many cases (undefined: no limit). */
  cases?: number;
  /** Stop after this many seconds of storm (undefined: no limit). */
  seconds?: number;
  /** Cases in flight at once. */
  concurrency: number;
  handshakeTimeoutS: number;
  rssLimitMiB: number;
  corpusDir: string;
  /** Run exactly these case indices (a replay). */
  only?: number[];
  /** Seconds to spend minimising each new finding. */
  minimiseSeconds: number;
  log: (line: string) => void;
}

export interface Finding {
  kind: string;
  signature: string;
  detail: string;
  count: number;
  caseIndex?: number;
  gen?: string;
  target?: Target;
  finish?: string;
  /** The client bytes that triggered it (hex), as generated. */
  bytes?: string;
  /** After minimisation, if it still reproduced. */
  minimal?: { target: Target; bytes: string; finish: string };
}

export interface CampaignResult {
  cases: number;
  seconds: number;
  byGen: Record<string, number>;
  /** Milliseconds spent per generator, summed over its cases. */
  msByGen: Record<string, number>;
  outcomes: Record<string, number>;
  findings: Finding[];
  rssMaxMiB: number;
  rssBaselineMiB: number;
  goodOps: number;
  goodReconnects: number;
  serverRestarts: number;
  bytesSent: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Time this process could not run (its event loop was late: a long task, GC,
 * or a machine too busy to schedule it), summed. Deadlines that the server
 * must meet ("closes within 5 s of its handshake timeout", "answers within
 * 20 s") are measured on `runningClock()`, which stops while this process is
 * stalled: with the server in this process (the in-process engine) it is
 * stalled too, and a busy machine stalls both.
 */
let stalledTotal = 0;
let longestBlock = 0;
let stallTicker: NodeJS.Timeout | undefined;
const STALL_TICK_MS = 50;
function runningClock(): number {
  if (!stallTicker) {
    let last = performance.now();
    let lastCpu = process.cpuUsage();
    stallTicker = setInterval(() => {
      const now = performance.now();
      const late = now - last - STALL_TICK_MS;
      if (late > 10) stalledTotal += late;
      if (late > 100) {
        // The main thread's own work in that gap (CPU time, minus the tick): a long task rather than a busy machine.
        const cpu = process.cpuUsage(lastCpu);
        const worked = Math.min(late, (cpu.user + cpu.system) / 1000 - STALL_TICK_MS);
        if (worked > longestBlock) longestBlock = worked;
      }
      last = now;
      lastCpu = process.cpuUsage();
    }, STALL_TICK_MS).unref();
  }
  return Date.now() - stalledTotal;
}

/** Resolves once runningClock() reaches `deadline`; `cancel` lets it go. */
function runningUntil(deadline: number): { done: Promise<void>; cancel: () => void } {
  let timer: NodeJS.Timeout | undefined;
  const done = new Promise<void>((resolve) => {
    const check = () => {
      const left = deadline - runningClock();
      if (left <= 0) resolve();
      else timer = setTimeout(check, Math.min(left + 1, 1000));
    };
    check();
  });
  return { done, cancel: () => clearTimeout(timer) };
}

/**
 * The longest stall this process spent computing (CPU time in the gap, so
 * not a machine too busy to run it): a long task on the event loop, the
 * server's or the harness's. Includes GC pauses and work on other threads.
 */
export function longestBlockMs(): number {
  return longestBlock;
}

/** Milliseconds of stall so far (see runningClock). */
export function stalledMs(): number {
  return stalledTotal;
}

/**
 * Records findings by signature: the first of each kind and cause is kept (with
 * its case, to replay), later ones only counted. Returns the new finding, or
 * undefined when it was one already seen. Both engines use it.
 */
export function findingRecorder(findings: Map<string, Finding>, log: (line: string) => void) {
  return (kind: string, detail: string, spec?: CaseSpec): Finding | undefined => {
    const signature = signatureOf(kind, detail);
    const f = findings.get(signature);
    if (f) {
      f.count++;
      return undefined;
    }
    const nf: Finding = { kind, signature, detail, count: 1 };
    if (spec) {
      nf.caseIndex = spec.index;
      nf.gen = spec.gen;
      nf.target = spec.target;
      nf.finish = spec.finish;
      nf.bytes = spec.bytes.length <= 256 * 1024 ? spec.bytes.toString('hex') : `${spec.bytes.subarray(0, 4096).toString('hex')}... (${spec.bytes.length} bytes)`;
    }
    findings.set(signature, nf);
    log(`FINDING ${kind}${spec ? ` (case ${spec.index}, ${spec.gen}, ${spec.target})` : ''}: ${detail}`);
    return nf;
  };
}

export function signatureOf(kind: string, detail: string): string {
  return `${kind}: ${detail.replace(/0x[0-9a-f]+/gi, 'X').replace(/\d+/g, 'N').replace(/"[^"]*"/g, '"…"').slice(0, 160)}`;
}

function sha(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** What each of a process's descriptors points at (sockets with their address and TCP state). */
export function fdTargets(pid: number): Map<string, string> {
  const out = new Map<string, string>();
  const sockets = new Map<string, string>();
  for (const f of ['tcp', 'tcp6', 'unix']) {
    try {
      for (const line of readFileSync(`/proc/net/${f}`, 'utf8').split('\n').slice(1)) {
        const cols = line.trim().split(/\s+/);
        if (f === 'unix' && cols.length >= 7) sockets.set(cols[6]!, `unix ${cols[7] ?? ''} state ${cols[5]}`);
        else if (cols.length >= 10) sockets.set(cols[9]!, `${f} ${cols[1]} -> ${cols[2]} state ${cols[3]}`);
      }
    } catch {
      /* not available */
    }
  }
  try {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      try {
        const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
        const m = /^socket:\[(\d+)\]$/.exec(target);
        out.set(fd, m ? `${target} ${sockets.get(m[1]!) ?? ''}` : target);
      } catch {
        /* closed meanwhile */
      }
    }
  } catch {
    /* process gone */
  }
  return out;
}

export function procStatus(pid: number): { rssMiB: number; fds: number } | undefined {
  try {
    const st = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(st);
    return { rssMiB: m ? Number(m[1]) / 1024 : 0, fds: readdirSync(`/proc/${pid}/fd`).length };
  } catch {
    return undefined;
  }
}

interface Files {
  dir: string;
  vm1: string;
  ro: string;
  good: string;
  canary: string;
  sock: string;
  vm1Size: number;
  roHash: string;
  canaryHash: string;
}

/**
 * The images live on tmpfs when there is one (FLUSH and FUA then cost nothing,
 * so the storm is not bound by the disk); FUZZ_DIR chooses another place.
 */
async function fuzzDir(t: Teardownable): Promise<string> {
  const base = process.env.FUZZ_DIR ?? (existsSync('/dev/shm') ? '/dev/shm' : undefined);
  if (!base) return tmpDir(t, 'nbd-migrate-fuzz-');
  const dir = await mkdtemp(join(base, 'nbd-migrate-fuzz-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function makeFiles(t: Teardownable): Promise<Files> {
  const dir = await fuzzDir(t);
  const vm1 = await makeImage(join(dir, 'vm1.img'), FUZZ_EXPORTS.vm1.size);
  // Some allocated data among the holes, so BLOCK_STATUS has extents to report.
  const rng = new Rng(7);
  for (let i = 0; i < 8; i++) await writeAt(vm1, rng.int(FUZZ_EXPORTS.vm1.size / 4096) * 4096, rng.bytes(rng.range(1, 64) * 4096).subarray(0, Math.min(FUZZ_EXPORTS.vm1.size, 256 * 1024)));
  const ro = await makeImage(join(dir, 'ro.img'), FUZZ_EXPORTS.ro.size, { fill: 'random' });
  const good = await makeImage(join(dir, 'good.img'), FUZZ_EXPORTS.good.size);
  const canary = await makeImage(join(dir, 'canary.bin'), 256 * 1024, { fill: 'random' });
  return {
    dir,
    vm1,
    ro,
    good,
    canary,
    sock: join(dir, 'nbd.sock'),
    vm1Size: statSync(vm1).size,
    roHash: sha(ro),
    canaryHash: sha(canary),
  };
}

export function serverArgs(f: Files, handshakeTimeoutS: number): string[] {
  return [
    f.vm1,
    '--name',
    'vm1',
    '--oldstyle-port',
    '0',
    '--export',
    `ro=${f.ro},read-only`,
    '--export',
    `good=${f.good}`,
    '--socket',
    f.sock,
    '--handshake-timeout',
    String(handshakeTimeoutS),
  ];
}

export function checkerConfig(target: Target): CheckerConfig {
  const e = FUZZ_EXPORTS;
  return {
    listener: target === 'oldstyle' ? 'oldstyle' : 'newstyle',
    exports: [e.vm1, e.ro, e.good].map((x) => ({ name: x.name, size: BigInt(x.size), readOnly: x.readOnly })),
    oldstyleExport: 'vm1',
    maxOptions: 1024,
    maxOptionLength: 64 * 1024,
    maxPayload: C.MAX_PAYLOAD,
    contexts: [C.BASE_ALLOCATION],
    // Every nbd-migrate export also lists its identity (nbd-migrate:export-id:<32 hex digits>).
    extraContexts: /^nbd-migrate:export-id:[0-9a-f]{32}$/,
  };
}

export interface CaseOutcome {
  violations: Violation[];
  outcome: string;
  ms: number;
  sent: number;
}

export interface Endpoint {
  port: number;
  oldstylePort: number;
  socketPath: string;
}

/** Runs one case over a real socket and judges the server's answers. */
export async function runCase(spec: CaseSpec, ep: Endpoint, handshakeTimeoutS: number): Promise<CaseOutcome> {
  const hsMs = handshakeTimeoutS * 1000;
  const checker = new SessionChecker(spec.bytes, checkerConfig(spec.target));
  const extra: Violation[] = [];
  const t0 = Date.now();
  const v0 = runningClock();
  // allowHalfOpen: the client does not answer the server's FIN with its own, as a
  // raw client need not; what the server does with a half-open connection is tested too.
  const sock =
    spec.target === 'unix'
      ? net.connect({ path: ep.socketPath, allowHalfOpen: true })
      : net.connect({ host: '127.0.0.1', port: spec.target === 'oldstyle' ? ep.oldstylePort : ep.port, allowHalfOpen: true });
  let closed = false;
  let closedAt = 0;
  let vClosedAt = 0;
  let clientClosed = false;
  sock.on('error', () => {});
  // The wait for the server's answers wakes on what can change the verdict: its bytes and its close.
  let wake: (() => void) | undefined;
  sock.on('data', (d: Buffer) => {
    checker.feed(d);
    if (wake && (checker.settled() || checker.awaitingClose())) wake();
  });
  const closedP = new Promise<void>((resolve) => {
    const onClose = () => {
      if (closed) return;
      closed = true;
      closedAt = Date.now();
      vClosedAt = runningClock();
      checker.serverClosed({ clientInitiated: clientClosed, elapsedMs: closedAt - t0, handshakeTimeoutMs: hsMs });
      resolve();
      wake?.();
    };
    sock.on('end', onClose); // the server's FIN
    sock.on('close', onClose);
  });
  const fullyClosedP = new Promise<boolean>((resolve) => sock.once('close', () => resolve(true)));
  const connected = await Promise.race([
    new Promise<boolean>((r) => sock.once('connect', () => r(true))),
    closedP.then(() => false),
    sleep(10_000).then(() => false),
  ]);
  if (!connected) {
    sock.destroy();
    return { violations: [{ kind: 'connect-failed', detail: `could not connect to the ${spec.target} listener within 10 s` }], outcome: 'connect-failed', ms: Date.now() - t0, sent: 0 };
  }
  sock.setNoDelay(true);
  if (spec.pauseReadMs > 0) {
    sock.pause();
    setTimeout(() => sock.resume(), spec.pauseReadMs);
  }

  // Send, piece by piece, without ever blocking past a deadline.
  const sendDeadline = v0 + 30_000;
  const plan = spec.plan.length ? spec.plan : [[spec.bytes.length, 0] as [number, number]];
  let at = 0;
  let sentAfterClose = 0;
  for (const [n, delay] of plan) {
    if (closed && !spec.sendAfterClose) break;
    if (delay) await sleep(delay);
    if (closed && !spec.sendAfterClose) break;
    if (sock.destroyed) break;
    // Bytes the server still takes well after its own FIN (closing within a grace period is fine).
    if (closed && runningClock() - vClosedAt > 3000) sentAfterClose += n;
    const piece = spec.bytes.subarray(at, at + n);
    at += n;
    if (piece.length === 0) continue;
    if (!sock.write(piece)) {
      let onDrain: (() => void) | undefined;
      const deadline = runningUntil(spec.sendAfterClose && closed ? Math.min(sendDeadline, vClosedAt + 5000) : sendDeadline);
      const drained = await Promise.race([
        new Promise<boolean>((r) => sock.once('drain', (onDrain = () => r(true)))),
        spec.sendAfterClose ? fullyClosedP : closedP.then(() => true),
        deadline.done.then(() => false),
      ]);
      if (onDrain) sock.off('drain', onDrain);
      deadline.cancel();
      if (!drained) {
        // The server stopped reading. Legitimate only where it stops on purpose, and then it must close.
        if (!checker.closeExpected) extra.push({ kind: 'send-stalled', detail: `server stopped reading after ${at - n} of ${spec.bytes.length} bytes (waiting for ${checker.waitingFor()})` });
        else if (closed && spec.sendAfterClose)
          extra.push({ kind: 'half-open-held', detail: `after closing its side (${checker.outcome}) the server stopped reading but kept the connection open for ${Date.now() - closedAt} ms: a client can hold it forever` });
        break;
      }
    }
  }
  const sentAt = Date.now();
  const vSentAt = runningClock();
  if (spec.sendAfterClose && sentAfterClose > 8 * MiB && !sock.destroyed)
    extra.push({ kind: 'reads-after-close', detail: `the server closed its side (${checker.outcome}) yet, from 3 s after that on, took ${(sentAfterClose / MiB).toFixed(0)} MiB more from the client without closing the connection` });

  if (spec.finish === 'reset') {
    clientClosed = true;
    if (spec.target === 'unix') sock.destroy(); // no RST on a Unix socket
    else sock.resetAndDestroy();
    await closedP;
    return { violations: [...checker.violations, ...extra], outcome: 'reset', ms: Date.now() - t0, sent: at };
  }
  if (spec.finish === 'fin') {
    clientClosed = true;
    sock.end();
    // The server first runs what it already received (on a slow disk, FLUSH and FUA take a while).
    const deadline = runningUntil(runningClock() + 20_000);
    const ok = await Promise.race([closedP.then(() => true), deadline.done.then(() => false)]);
    deadline.cancel();
    if (!ok) extra.push({ kind: 'no-close-after-fin', detail: 'server kept the connection open 20 s after the client half-closed it' });
    sock.destroy();
    return { violations: [...checker.violations, ...extra], outcome: 'fin', ms: Date.now() - t0, sent: at };
  }

  // 'wait': until the model says nothing more is owed, or a deadline. Waiting
  // out the handshake timeout is checked on every fourth such case only (it
  // costs a whole timeout); the others hang up once nothing else is owed.
  for (;;) {
    if (checker.settled() || closed) break;
    if (checker.awaitingClose() === 'timeout' && spec.index % 4 !== 0) break;
    // Deadlines run on the clock that stops while this process is stalled (see runningClock).
    const now = runningClock();
    const stalled = Date.now() - t0 - (now - v0);
    if (checker.inHandshake() && now - v0 > hsMs + 5000) {
      extra.push({ kind: 'handshake-timeout-not-enforced', detail: `handshake still open ${now - v0} ms after connecting (timeout ${hsMs} ms; ${stalled} ms more while stalled), waiting for ${checker.waitingFor()}` });
      break;
    }
    const limit = checker.closeExpected === 'timeout' ? v0 + hsMs + 5000 : Math.max(vSentAt, v0 + spec.pauseReadMs) + 20_000;
    if (now > limit) {
      extra.push({ kind: 'hang', detail: `nothing for ${now - vSentAt} ms after the last byte was sent (${stalled} ms more while stalled), waiting for ${checker.waitingFor()}` });
      break;
    }
    // Until the server sends or closes, or the next deadline above passes.
    const next = Math.min(limit, checker.inHandshake() ? v0 + hsMs + 5000 : Infinity) + 1 - now;
    let timer: NodeJS.Timeout | undefined;
    await new Promise<void>((r) => {
      wake = r;
      timer = setTimeout(r, Math.max(1, next));
    });
    wake = undefined;
    clearTimeout(timer);
  }
  let outcome = checker.outcome;
  if (!closed) {
    if (checker.awaitingClose() === 'timeout') outcome = 'hung-up-before-timeout';
    clientClosed = true;
    sock.destroy();
    await closedP;
  }
  // The server's FIN leaves our half-open side open (allowHalfOpen): close it, or every case leaks a socket in CLOSE_WAIT.
  sock.destroy();
  return { violations: [...checker.violations, ...extra], outcome, ms: Date.now() - t0, sent: at };
}

/** The well-behaved client: its own export, a shadow copy, read-back checks and periodic fresh connections. */
export class GoodClient {
  ops = 0;
  reconnects = 0;
  private failures = 0;
  private stopFlag = false;
  private readonly shadow = Buffer.alloc(FUZZ_EXPORTS.good.size);
  private client: NbdClient | undefined;
  private loopP: Promise<void> | undefined;
  constructor(
    private uri: () => string,
    private readonly report: (kind: string, detail: string) => void,
  ) {}

  start(): void {
    this.loopP = this.loop();
  }

  async stop(): Promise<void> {
    this.stopFlag = true;
    await this.loopP;
    await this.client?.close().catch(() => undefined);
    this.client = undefined;
  }

  get image(): Buffer {
    return this.shadow;
  }

  /** `p` within `ms` on the stall-aware clock (see runningClock): a starved machine is not the server's fault. */
  private async timed<T>(what: string, p: Promise<T>, ms = 15_000): Promise<T> {
    const v0 = runningClock();
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const tracked = p.finally(() => {
      settled = true;
      clearTimeout(timer);
    });
    const bound = new Promise<never>((_r, rej) => {
      const check = () => {
        if (settled) return;
        const left = ms - (runningClock() - v0);
        if (left <= 0) rej(new Error(`${what} took over ${ms} ms (not counting stalls)`));
        else timer = setTimeout(check, Math.min(left + 1, 1000));
      };
      check();
    });
    bound.catch(() => undefined);
    return Promise.race([tracked, bound]);
  }

  /** A connection within `ms`; one that comes later is closed (else it stays open, unused, forever). */
  private async connect(what: string, ms: number): Promise<NbdClient> {
    // Its own connect timeout counts stalls; the bound here does not.
    const p = NbdClient.connect(this.uri(), { connectTimeoutMs: 120_000 });
    try {
      return await this.timed(what, p, ms);
    } catch (e) {
      p.then((c) => c.close().catch(() => undefined), () => undefined);
      throw e;
    }
  }

  private async loop(): Promise<void> {
    const rng = new Rng(0x600d);
    let lastReconnect = Date.now();
    while (!this.stopFlag) {
      try {
        if (!this.client || this.client.closed) this.client = await this.connect('connect', 10_000);
        const c = this.client;
        const len = rng.range(1, 256 * 1024);
        const off = rng.int(this.shadow.length - len + 1);
        const op = rng.int(10);
        if (op < 4) {
          const data = rng.bytes(len);
          await this.timed('write', c.write(off, [data], { fua: rng.chance(0.1) }));
          data.copy(this.shadow, off);
        } else if (op < 9) {
          const into = Buffer.alloc(len);
          await this.timed('read', c.read(off, len, into, 0));
          if (!into.equals(this.shadow.subarray(off, off + len))) {
            this.report('good-client-corrupt', `read ${off}+${len} on the good export returned data that differs from what was written`);
          }
        } else await this.timed('flush', c.flush());
        this.ops++;
        this.failures = 0;
        await sleep(rng.range(0, 20)); // a steady client, not a second storm
        if (Date.now() - lastReconnect > 2000) {
          lastReconnect = Date.now();
          const t0 = Date.now();
          const v0 = runningClock();
          const c2 = await this.connect('fresh connect', 5000);
          const into = Buffer.alloc(4096);
          const o = rng.int(this.shadow.length - 4096);
          await this.timed('fresh read', c2.read(o, 4096, into, 0), 5000);
          if (!into.equals(this.shadow.subarray(o, o + 4096))) this.report('good-client-corrupt', `fresh connection read ${o}+4096 differs`);
          await c2.close();
          this.reconnects++;
          if (runningClock() - v0 > 5000) this.report('good-client-slow', `a fresh connection + read took ${Date.now() - t0} ms (${runningClock() - v0} ms not counting stalls)`);
        }
      } catch (e) {
        if (this.stopFlag) break;
        // One failure may be a starved machine (a handshake past the 2 s timeout); two in a row are a finding.
        if (++this.failures >= 2) this.report('good-client-failed', (e as Error).message);
        await this.client?.close().catch(() => undefined);
        this.client = undefined;
        await sleep(500);
      }
    }
  }
}

/**
 * Shrinks a finding's case while it still shows the same signature: whole
 * messages first, then byte ranges of shrinking size. Delivery-dependent cases
 * (a plan of pieces and delays) are kept as generated. Sets `f.minimal`.
 */
export async function minimiseFinding(
  f: Finding,
  spec: CaseSpec,
  v: Violation,
  replay: (spec: CaseSpec) => Promise<CaseOutcome>,
  o: { seconds: number; log: (line: string) => void; alive: () => boolean },
): Promise<void> {
  const sig = signatureOf(v.kind, v.detail);
  const reproduces = async (bytes: Buffer, finish = spec.finish, plan = spec.plan): Promise<boolean> => {
    if (!o.alive()) return false;
    const r = await replay({ ...spec, bytes, plan, finish });
    return r.violations.some((x) => signatureOf(x.kind, x.detail) === sig);
  };
  const until = Date.now() + o.seconds * 1000;
  let bytes = spec.bytes;
  let plan = spec.plan;
  if (plan.length && (await reproduces(bytes, spec.finish, []))) plan = [];
  if (plan.length) {
    if (!(await reproduces(bytes, spec.finish, plan))) return;
    f.minimal = { target: spec.target, bytes: bytes.toString('hex'), finish: spec.finish };
    return; // delivery-dependent: kept as generated
  }
  if (!(await reproduces(bytes))) return;
  if (spec.segments) {
    let segs = [...spec.segments];
    for (let i = segs.length - 1; i >= 0 && Date.now() < until; i--) {
      const cand = [...segs.slice(0, i), ...segs.slice(i + 1)];
      const b = Buffer.concat(cand.map((s) => s.bytes));
      if (await reproduces(b)) segs = cand;
    }
    bytes = Buffer.concat(segs.map((s) => s.bytes));
  }
  for (let chunk = Math.max(1, bytes.length >> 1); chunk >= 1 && Date.now() < until; chunk >>= 1) {
    for (let at = bytes.length - chunk; at >= 0 && Date.now() < until; at -= chunk) {
      const cand = Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + chunk)]);
      if (await reproduces(cand)) bytes = cand;
    }
  }
  f.minimal = { target: spec.target, bytes: bytes.toString('hex'), finish: spec.finish };
  o.log(`  minimised to ${bytes.length} bytes (${spec.target}, finish ${spec.finish}): ${bytes.toString('hex').slice(0, 400)}`);
}

/** Runs the whole campaign. Findings are returned, not asserted. */
export async function runCampaign(t: Teardownable, opts: CampaignOptions): Promise<CampaignResult> {
  const files = await makeFiles(t);
  const corpus = loadCorpus(opts.corpusDir);
  const ctx: GenContext = { corpus };
  const args = serverArgs(files, opts.handshakeTimeoutS);
  const findings = new Map<string, Finding>();
  const res: CampaignResult = {
    cases: 0,
    seconds: 0,
    byGen: {},
    msByGen: {},
    outcomes: {},
    findings: [],
    rssMaxMiB: 0,
    rssBaselineMiB: 0,
    goodOps: 0,
    goodReconnects: 0,
    serverRestarts: 0,
    bytesSent: 0,
  };
  const inflight = new Map<number, CaseSpec>();
  const suspects: CaseSpec[] = [];

  const add = findingRecorder(findings, opts.log);

  // ---- server and its monitors
  let srv: ServerHandle = await serve(t, args);
  let stderrLines: string[] = [];
  const watchStderr = (s: ServerHandle) => {
    let partial = '';
    s.proc.stderr!.on('data', (chunk: string | Buffer) => {
      partial += chunk.toString();
      let nl: number;
      while ((nl = partial.indexOf('\n')) >= 0) {
        const line = partial.slice(0, nl).trim();
        partial = partial.slice(nl + 1);
        if (line && !line.startsWith('{')) stderrLines.push(line);
      }
    });
  };
  watchStderr(srv);
  const endpoint = (): Endpoint => ({ port: srv.newstylePort, oldstylePort: srv.oldstylePort('vm1'), socketPath: srv.socketPath! });
  let ep = endpoint();

  const scanLogs = () => {
    // The helper keeps every parsed log entry; consume them here so a long run stays small.
    const entries = srv.logs.splice(0);
    for (const e of entries) {
      if (e.level === 'error') add('error-log', `${e.event}: ${JSON.stringify(e).slice(0, 400)}`);
      else if (e.event === 'request-failed' && e.errno !== 'ENOTSUP') add('request-failed', `${e.command} failed with ${e.errno}: ${String(e.cause)}`);
      else if (e.event === 'listener-error') add('listener-error', JSON.stringify(e).slice(0, 400));
    }
    if (stderrLines.length) {
      const text = stderrLines.splice(0).join('\n');
      add('stderr', text.slice(0, 2000));
    }
  };

  let crashed = false;
  const monitor = () => {
    const ex = srv.exited();
    if (ex && !crashed) {
      crashed = true;
      const f = add('crash', `server exited (code ${ex.code}, signal ${ex.signal}); stderr tail:\n${srv.stderr().slice(-3000)}`);
      suspects.push(...inflight.values());
      if (f) f.detail += `\n${inflight.size} case(s) in flight: ${[...inflight.keys()].join(', ')}`;
      return;
    }
    const st = procStatus(srv.proc.pid!);
    if (st) {
      res.rssMaxMiB = Math.max(res.rssMaxMiB, st.rssMiB);
      if (st.rssMiB > opts.rssLimitMiB)
        add('rss', `server RSS ${st.rssMiB.toFixed(0)} MiB over the ${opts.rssLimitMiB} MiB limit; cases in flight: ${[...inflight.values()].map((c) => `${c.index}:${c.gen}`).join(', ')}`);
    }
    try {
      const size = statSync(files.vm1).size;
      if (size !== files.vm1Size) add('image-size', `vm1.img is ${size} bytes, was ${files.vm1Size}`);
    } catch (e) {
      add('image-size', `cannot stat vm1.img: ${(e as Error).message}`);
    }
    scanLogs();
  };
  const timer = setInterval(monitor, 250);
  t.teardown(() => clearInterval(timer));

  const restart = async () => {
    // Keep what the dead server printed, then start a fresh one on the same files.
    srv = await serve(t, args);
    watchStderr(srv);
    ep = endpoint();
    crashed = false;
    res.serverRestarts++;
  };

  await sleep(300);
  res.rssBaselineMiB = procStatus(srv.proc.pid!)?.rssMiB ?? 0;

  const good = new GoodClient(
    () => srv.uri('good'),
    (kind, detail) => add(kind, detail),
  );
  good.start();
  await sleep(300);
  const fdBaseline = procStatus(srv.proc.pid!)?.fds ?? 0;
  const fdsBefore = fdTargets(srv.proc.pid!);

  // ---- the storm
  const start = Date.now();
  const deadline = opts.seconds ? start + opts.seconds * 1000 : Infinity;
  const indices = opts.only;
  let next = 0;
  const takeIndex = (): number | undefined => {
    if (indices) return next < indices.length ? indices[next++] : undefined;
    if (opts.cases !== undefined && next >= opts.cases) return undefined;
    if (Date.now() > deadline) return undefined;
    return next++;
  };
  let lastProgress = Date.now();
  const worker = async () => {
    for (;;) {
      if (crashed) {
        if (Date.now() > deadline || indices) return;
        await restart();
      }
      const i = takeIndex();
      if (i === undefined) return;
      const spec = generateCase(opts.seed, i, ctx);
      inflight.set(i, spec);
      let out: CaseOutcome;
      try {
        out = await runCase(spec, ep, opts.handshakeTimeoutS);
      } catch (e) {
        out = { violations: [{ kind: 'harness-error', detail: (e as Error).stack ?? String(e) }], outcome: 'harness-error', ms: 0, sent: 0 };
      } finally {
        inflight.delete(i);
      }
      res.cases++;
      res.bytesSent += out.sent;
      const g = spec.gen.replace(/[(+].*$/, '');
      res.byGen[g] = (res.byGen[g] ?? 0) + 1;
      res.msByGen[g] = (res.msByGen[g] ?? 0) + out.ms;
      res.outcomes[out.outcome] = (res.outcomes[out.outcome] ?? 0) + 1;
      if (srv.exited()) continue; // judged as a crash, not as this case's violations
      for (const v of out.violations) {
        const f = add(v.kind, v.detail, spec);
        if (f && opts.minimiseSeconds > 0) await minimise(f, spec, v);
      }
      if (Date.now() - lastProgress > 30_000) {
        lastProgress = Date.now();
        opts.log(`${res.cases} cases, ${((Date.now() - start) / 1000).toFixed(0)} s, RSS max ${res.rssMaxMiB.toFixed(0)} MiB, good ops ${good.ops}, findings ${findings.size}`);
      }
    }
  };

  const minimise = (f: Finding, spec: CaseSpec, v: Violation) =>
    minimiseFinding(f, spec, v, (s) => runCase(s, ep, opts.handshakeTimeoutS), { seconds: opts.minimiseSeconds, log: opts.log, alive: () => !srv.exited() });

  await Promise.all(Array.from({ length: opts.concurrency }, () => worker()));
  res.seconds = (Date.now() - start) / 1000;

  // ---- after the storm
  await good.stop();
  res.goodOps = good.ops;
  res.goodReconnects = good.reconnects;
  monitor();
  if (!srv.exited()) {
    // A well-behaved client still gets in and gets the right data.
    try {
      const c = await RawNbdClient.connect(srv.newstylePort);
      const info = await Promise.race([c.handshake('vm1'), sleep(5000).then(() => undefined)]);
      if (!info) add('post-storm', 'a fresh newstyle handshake did not complete within 5 s');
      else {
        const r = await c.readAt(0, 4096);
        if (r.error) add('post-storm', `a fresh READ failed with error ${r.error}`);
      }
      await c.disconnect();
      c.destroy();
      const c2 = await NbdClient.connect(srv.uri('good'), { connectTimeoutMs: 5000 });
      const all = Buffer.alloc(FUZZ_EXPORTS.good.size);
      await c2.read(0, all.length, all, 0);
      await c2.close();
      if (!all.equals(good.image)) add('good-client-corrupt', 'the good export does not hold what the good client wrote');
    } catch (e) {
      add('post-storm', `a well-behaved client failed after the storm: ${(e as Error).message}`);
    }
    // Every fuzz connection is gone: the server's descriptors come back down.
    let fds = 0;
    for (let i = 0; i < 40; i++) {
      fds = procStatus(srv.proc.pid!)?.fds ?? 0;
      if (fds <= fdBaseline + 2 || res.serverRestarts > 0) break;
      await sleep(250);
    }
    if (fds > fdBaseline + 2 && res.serverRestarts === 0) {
      const after = fdTargets(srv.proc.pid!);
      const added = [...after].filter(([fd, target]) => fdsBefore.get(fd) !== target).map(([fd, target]) => `fd ${fd}: ${target}`);
      add('fd-leak', `server holds ${fds} file descriptors after the storm, ${fdBaseline} before it; new: ${added.join('; ')}`);
    }
  }
  await sleep(300);
  monitor();
  try {
    const file = readFileSync(files.good);
    if (!file.equals(good.image)) add('good-client-corrupt', 'good.img on disk differs from what the good client wrote');
  } catch (e) {
    add('good-client-corrupt', (e as Error).message);
  }
  if (sha(files.ro) !== files.roHash) add('read-only-modified', 'the read-only export\'s image changed');
  if (sha(files.canary) !== files.canaryHash) add('canary-modified', 'the canary file beside the images changed');
  if (statSync(files.vm1).size !== files.vm1Size) add('image-size', `vm1.img is ${statSync(files.vm1).size} bytes, was ${files.vm1Size}`);

  // A crash: find which case did it, on a fresh server, one at a time.
  for (const s of suspects.slice(0, 16)) {
    if (srv.exited()) await restart();
    await runCase(s, endpoint(), opts.handshakeTimeoutS);
    await sleep(500);
    if (srv.exited()) {
      add('crash-reproduced', `case ${s.index} (${s.gen}, ${s.target}) alone crashes the server: ${s.bytes.toString('hex').slice(0, 20000)}`, s);
      break;
    }
  }
  res.findings = [...findings.values()];
  return res;
}

export { MiB };
