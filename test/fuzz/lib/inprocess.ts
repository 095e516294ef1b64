// The in-process fuzz engine: the same generated cases (generate.ts), the same
// oracle (checker.ts) and the same client side of a case (campaign.ts runCase)
// as the over-the-wire campaign, but the server is an NbdServer built in this
// process over in-memory devices (test/helpers/memory-device.ts) with the
// device stack `serve` builds (src/storage/stack.ts), on
// its real listeners bound to loopback and to a Unix socket in a temporary
// directory. Nothing is spawned and nothing touches a disk, and many cases run
// at once, so it runs hundreds of cases a second where the campaign runs tens.
//
// What it checks, beyond the oracle's per-case verdict:
//   - no uncaught exception, unhandled rejection or process warning while the
//     storm runs (the server would have died of the first two);
//   - no error-level log, no request-failed log (an internal failure on a
//     request the fuzzer sent) other than ENOTSUP, no listener error;
//   - the read-only export's device is never changed;
//   - the well-behaved client on its own export reads back what it wrote;
//   - after the storm every connection is gone (server.stats.open back to 0),
//     every byte of the server-wide payload budget is given back, the process
//     holds no more descriptors than before, and a fresh client gets in;
//   - the process RSS stays under a limit.
// What only the child-process campaign shows (server RSS on its own, a server
// process that dies, file descriptors of image files, a real disk) stays there.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '../../../src/client/nbd-client.js';
import { Export, ExportRegistry } from '../../../src/server/export.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../../../src/server/server.js';
import { buildStack } from '../../../src/storage/stack.js';
import { configureLog } from '../../../src/util/log.js';
import { MemoryDevice } from '../../helpers/memory-device.js';
import type { Teardownable } from '../../helpers/server.js';
import { type CampaignResult, type CaseOutcome, type Endpoint, fdTargets, type Finding, findingRecorder, GoodClient, minimiseFinding, longestBlockMs, procStatus, runCase, stalledMs } from './campaign.js';
import { FUZZ_EXPORTS, generateCase, loadCorpus, type CaseSpec, type GenContext } from './generate.js';
import { Rng } from './prng.js';

export interface InProcessOptions {
  seed: number;
  /** First case index (chunks of one seed: [first, first + cases)). */
  first?: number;
  cases?: number;
  seconds?: number;
  only?: number[];
  concurrency: number;
  handshakeTimeoutS: number;
  /** Limit on the whole process's RSS (server, clients and oracle together). */
  rssLimitMiB: number;
  corpusDir: string;
  minimiseSeconds: number;
  log: (line: string) => void;
  /** Run the well-behaved client alongside (default true). */
  goodClient?: boolean;
}

export interface InProcessResult extends CampaignResult {
  first: number;
  /** Highest case index run + 1 (the chunk's end). */
  end: number;
  /** Share of the storm the event loop was busy (1: this one thread was the bottleneck). */
  eventLoopUtilisation: number;
  /** CPU time (user + system) the process used during the storm. */
  cpuSeconds: number;
  /** Time the process's event loop was stalled (late by more than 10 ms) during the storm. */
  stalledSeconds: number;
  /** The longest stall spent computing (see campaign.ts longestBlockMs), in ms. */
  longestBlockMs: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export interface InProcessServer {
  server: NbdServer;
  endpoint: Endpoint;
  devices: { vm1: MemoryDevice; ro: MemoryDevice; good: MemoryDevice };
  close(): Promise<void>;
}

/** The fuzz exports on in-memory devices, served in this process (the same names, sizes and contents as the campaign's images). */
export async function startInProcessServer(handshakeTimeoutS: number): Promise<InProcessServer> {
  const vm1 = new MemoryDevice(FUZZ_EXPORTS.vm1.size);
  const rng = new Rng(7);
  for (let i = 0; i < 8; i++) {
    const at = rng.int(FUZZ_EXPORTS.vm1.size / 4096) * 4096;
    const data = rng.bytes(rng.range(1, 64) * 4096).subarray(0, Math.min(FUZZ_EXPORTS.vm1.size, 256 * 1024));
    await vm1.write(at, [data.subarray(0, Math.min(data.length, vm1.size - at))], { fua: false });
  }
  const ro = MemoryDevice.from(new Rng(0x0e0).bytes(FUZZ_EXPORTS.ro.size), { readOnly: true });
  const good = new MemoryDevice(FUZZ_EXPORTS.good.size);
  vm1.modified = 0;
  const registry = new ExportRegistry();
  // The stack `serve` builds for each export (throttle, cutover gate, switch, write-through, dirty tracking) over the image.
  const stack = (d: MemoryDevice) => buildStack({ local: d }).device;
  registry.add(new Export({ name: 'vm1', device: stack(vm1) }));
  registry.add(new Export({ name: 'ro', device: stack(ro) }));
  registry.add(new Export({ name: 'good', device: stack(good) }));
  const server = new NbdServer(registry, { ...DEFAULT_SERVER_OPTIONS, handshakeTimeoutMs: handshakeTimeoutS * 1000 });
  const dir = await mkdtemp(join(tmpdir(), 'nbd-migrate-fuzz-ip-'));
  const tcp = await server.listenNewstyle('127.0.0.1', 0);
  const old = await server.listenOldstyle('vm1', '127.0.0.1', 0);
  const unix = await server.listenUnix(join(dir, 'nbd.sock'));
  return {
    server,
    endpoint: { port: tcp.port!, oldstylePort: old.port!, socketPath: unix.path! },
    devices: { vm1, ro, good },
    close: async () => {
      await server.close(2000);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** The server's payload budget in use (what every finished request must give back). */
function budgetUsed(server: NbdServer): number {
  return (server as unknown as { budget: { used: number } }).budget.used;
}

/** Runs the in-process campaign. Findings are returned, not asserted. */
export async function runInProcessCampaign(t: Teardownable, opts: InProcessOptions): Promise<InProcessResult> {
  const corpus = loadCorpus(opts.corpusDir);
  const ctx: GenContext = { corpus };
  const findings = new Map<string, Finding>();
  const first = opts.first ?? 0;
  const res: InProcessResult = {
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
    first,
    end: first,
    eventLoopUtilisation: 0,
    cpuSeconds: 0,
    stalledSeconds: 0,
    longestBlockMs: 0,
  };
  const inflight = new Map<number, CaseSpec>();

  const add = findingRecorder(findings, opts.log);
  const inFlightList = () => [...inflight.values()].slice(0, 20).map((c) => `${c.index}:${c.gen}`).join(', ');

  // ---- the server's own signals: its log lines and anything the process reports
  configureLog({
    format: 'json',
    level: 'info',
    sink: (line) => {
      // Parse only the lines that matter: most are info-level connection events.
      if (!line.includes('"level":"error"') && !line.includes('"event":"request-failed"') && !line.includes('"event":"listener-error"')) return;
      const e = JSON.parse(line) as Record<string, unknown>;
      if (e.level === 'error') add('error-log', `${String(e.event)}: ${line.slice(0, 400)}`);
      else if (e.event === 'request-failed' && e.errno !== 'ENOTSUP') add('request-failed', `${String(e.command)} failed with ${String(e.errno)}: ${String(e.cause)}`);
      else if (e.event === 'listener-error') add('listener-error', line.slice(0, 400));
    },
  });
  t.teardown(() => configureLog({ sink: (line) => process.stderr.write(line + '\n') }));
  const onUncaught = (e: unknown) => add('uncaught-exception', `${(e as Error)?.stack ?? String(e)}; cases in flight: ${inFlightList()}`);
  const onRejection = (e: unknown) => add('unhandled-rejection', `${(e as Error)?.stack ?? String(e)}; cases in flight: ${inFlightList()}`);
  const onWarning = (w: Error) => add('process-warning', `${w.name}: ${w.message}`);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onRejection);
  process.on('warning', onWarning);
  t.teardown(() => {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onRejection);
    process.off('warning', onWarning);
  });

  const fdBefore = procStatus(process.pid)?.fds ?? 0;
  const fdsBefore = fdTargets(process.pid);
  const srv = await startInProcessServer(opts.handshakeTimeoutS);
  t.teardown(() => srv.close());
  const ep = srv.endpoint;
  res.rssBaselineMiB = procStatus(process.pid)?.rssMiB ?? 0;

  const monitor = () => {
    const st = procStatus(process.pid);
    if (st) {
      res.rssMaxMiB = Math.max(res.rssMaxMiB, st.rssMiB);
      if (st.rssMiB > opts.rssLimitMiB) add('rss', `process RSS ${st.rssMiB.toFixed(0)} MiB over the ${opts.rssLimitMiB} MiB limit; cases in flight: ${inFlightList()}`);
    }
    if (srv.devices.ro.modified !== 0) add('read-only-modified', `the read-only export's device took ${srv.devices.ro.modified} bytes of changes`);
  };
  const timer = setInterval(monitor, 250);
  t.teardown(() => clearInterval(timer));

  const good = opts.goodClient === false ? undefined : new GoodClient(() => `nbd://127.0.0.1:${ep.port}/good`, (kind, detail) => add(kind, detail));
  good?.start();

  // ---- the storm
  const start = Date.now();
  const elu0 = performance.eventLoopUtilization();
  const cpu0 = process.cpuUsage();
  const stall0 = stalledMs();
  const deadline = opts.seconds ? start + opts.seconds * 1000 : Infinity;
  const indices = opts.only;
  let next = 0;
  const takeIndex = (): number | undefined => {
    if (indices) return next < indices.length ? indices[next++] : undefined;
    if (opts.cases !== undefined && next >= opts.cases) return undefined;
    if (Date.now() > deadline) return undefined;
    return first + next++;
  };
  const run = (spec: CaseSpec) => runCase(spec, ep, opts.handshakeTimeoutS);
  let lastProgress = Date.now();
  const worker = async () => {
    for (;;) {
      const i = takeIndex();
      if (i === undefined) return;
      const spec = generateCase(opts.seed, i, ctx);
      inflight.set(i, spec);
      let out: CaseOutcome;
      try {
        out = await run(spec);
      } catch (e) {
        out = { violations: [{ kind: 'harness-error', detail: (e as Error).stack ?? String(e) }], outcome: 'harness-error', ms: 0, sent: 0 };
      } finally {
        inflight.delete(i);
      }
      res.cases++;
      res.end = Math.max(res.end, i + 1);
      res.bytesSent += out.sent;
      const g = spec.gen.replace(/[(+].*$/, '');
      res.byGen[g] = (res.byGen[g] ?? 0) + 1;
      res.msByGen[g] = (res.msByGen[g] ?? 0) + out.ms;
      res.outcomes[out.outcome] = (res.outcomes[out.outcome] ?? 0) + 1;
      for (const v of out.violations) {
        const f = add(v.kind, v.detail, spec);
        if (f && opts.minimiseSeconds > 0) await minimiseFinding(f, spec, v, run, { seconds: opts.minimiseSeconds, log: opts.log, alive: () => true });
      }
      if (Date.now() - lastProgress > 30_000) {
        lastProgress = Date.now();
        const s = (Date.now() - start) / 1000;
        opts.log(`${res.cases} cases (up to index ${res.end}), ${s.toFixed(0)} s, ${(res.cases / s).toFixed(0)}/s, event loop ${(performance.eventLoopUtilization(elu0).utilization * 100).toFixed(0)}% busy, stalled ${((stalledMs() - stall0) / 1000).toFixed(0)} s, RSS max ${res.rssMaxMiB.toFixed(0)} MiB, good ops ${good?.ops ?? 0}, findings ${findings.size}`);
      }
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency }, () => worker()));
  res.seconds = (Date.now() - start) / 1000;
  res.eventLoopUtilisation = Number(performance.eventLoopUtilization(elu0).utilization.toFixed(3));
  const cpu = process.cpuUsage(cpu0);
  res.cpuSeconds = Number(((cpu.user + cpu.system) / 1e6).toFixed(1));
  res.stalledSeconds = Number(((stalledMs() - stall0) / 1000).toFixed(1));
  res.longestBlockMs = Math.round(longestBlockMs());

  // ---- after the storm
  if (good) {
    await good.stop();
    res.goodOps = good.ops;
    res.goodReconnects = good.reconnects;
  }
  monitor();
  // Every fuzz connection goes away (a soft close destroys the socket within 2 s), and gives its memory back.
  for (let i = 0; i < 40 && (srv.server.stats.open > 0 || budgetUsed(srv.server) !== 0); i++) await sleep(250);
  if (srv.server.stats.open > 0) add('connection-leak', `${srv.server.stats.open} connection(s) still open 10 s after the storm`);
  if (budgetUsed(srv.server) !== 0) add('budget-leak', `${budgetUsed(srv.server)} bytes of the server's payload budget never given back`);
  try {
    const c = await NbdClient.connect(`nbd://127.0.0.1:${ep.port}/good`, { connectTimeoutMs: 5000 });
    const all = Buffer.alloc(FUZZ_EXPORTS.good.size);
    await c.read(0, all.length, all, 0);
    await c.close();
    if (good && !all.equals(good.image)) add('good-client-corrupt', 'the good export does not hold what the good client wrote');
    if (good && !srv.devices.good.snapshot().equals(good.image)) add('good-client-corrupt', 'the good export\'s device does not hold what the good client wrote');
  } catch (e) {
    add('post-storm', `a well-behaved client failed after the storm: ${(e as Error).message}`);
  }
  for (let i = 0; i < 40; i++) {
    if ((procStatus(process.pid)?.fds ?? 0) <= fdBefore + 8) break;
    await sleep(250);
  }
  const fdAfter = procStatus(process.pid)?.fds ?? 0;
  // The server's three listeners (and their epoll/pipe bookkeeping) are still open: a small allowance.
  if (fdAfter > fdBefore + 8) {
    // Summarised by what they point at (socket states and addresses, ports replaced by the listener they belong to).
    const kinds = new Map<string, number>();
    const names: Array<[string, string]> = [[`:${ep.port.toString(16).toUpperCase().padStart(4, '0')}`, ':NEWSTYLE'], [`:${ep.oldstylePort.toString(16).toUpperCase().padStart(4, '0')}`, ':OLDSTYLE']];
    for (const [fd, target] of fdTargets(process.pid)) {
      if (fdsBefore.get(fd) === target) continue;
      let k = target.replace(/socket:\[\d+\]/, 'socket').replace(/:[0-9A-F]{4}\b/g, (m) => names.find(([p]) => p === m)?.[1] ?? ':PORT');
      k = k.replace(/\s+/g, ' ').trim();
      kinds.set(k, (kinds.get(k) ?? 0) + 1);
    }
    const top = [...kinds].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k, n]) => `${n} x ${k}`);
    add('fd-leak', `the process holds ${fdAfter} descriptors after the storm, ${fdBefore} before the server started; new: ${top.join('; ')}`);
  }
  if (!srv.devices.vm1.holesAreZero()) add('device-inconsistent', 'vm1 has non-zero bytes in pages it reports as holes');
  res.findings = [...findings.values()];
  return res;
}
