// Long in-process fuzz runs, outside tap: the same engine as inprocess.test.ts,
// without tap's async-hook domain (which costs a hook call per promise, about
// a fifth of the engine's time). One invocation runs one chunk of one seed,
// [FUZZ_FIRST, FUZZ_FIRST + FUZZ_CASES), and prints a JSON summary line;
// the exit status is 1 when there were findings. Same environment as
// inprocess.test.ts. For example:
//   FUZZ_SEED=1 FUZZ_FIRST=0 FUZZ_CASES=100000 FUZZ_REPORT=/tmp/chunk.json \
//     node --import=./node_modules/@tapjs/typescript/dist/esm/import.mjs test/fuzz/inprocess-run.ts

import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runInProcessCampaign } from './lib/inprocess.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const env = process.env;
const num = (v: string | undefined): number | undefined => (v === undefined || v === '' ? undefined : Number(v));
const seed = num(env.FUZZ_SEED) ?? 0x5eed;
const only = env.FUZZ_ONLY ? env.FUZZ_ONLY.split(',').map((s) => Number(s.trim())) : undefined;
const cases = num(env.FUZZ_CASES);
const seconds = num(env.FUZZ_SECONDS) ?? (cases === undefined && !only ? 10 : undefined);

const teardowns: Array<() => unknown> = [];
const log = (line: string) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);
const r = await runInProcessCampaign(
  { teardown: (fn: () => unknown) => void teardowns.push(fn) },
  {
    seed,
    first: num(env.FUZZ_FIRST) ?? 0,
    cases,
    seconds,
    only,
    concurrency: num(env.FUZZ_CONCURRENCY) ?? 48,
    handshakeTimeoutS: 2,
    rssLimitMiB: num(env.FUZZ_RSS_MIB) ?? 4096,
    corpusDir: join(HERE, 'corpus'),
    minimiseSeconds: num(env.FUZZ_MINIMISE) ?? 20,
    log,
  },
);
for (const fn of teardowns.reverse()) await fn();
if (env.FUZZ_REPORT) writeFileSync(env.FUZZ_REPORT, JSON.stringify({ seed, ...r }, null, 2));
for (const f of r.findings) log(`FINDING ${f.kind} x${f.count} (case ${f.caseIndex ?? '-'}, ${f.gen ?? '-'}): ${f.detail.slice(0, 2000)}`);
process.stdout.write(
  `${JSON.stringify({
    seed,
    first: r.first,
    end: r.end,
    cases: r.cases,
    seconds: Number(r.seconds.toFixed(1)),
    perSecond: Number((r.cases / Math.max(0.001, r.seconds)).toFixed(1)),
    eventLoopUtilisation: r.eventLoopUtilisation,
    cpuSeconds: r.cpuSeconds,
    stalledSeconds: r.stalledSeconds,
    longestBlockMs: r.longestBlockMs,
    mibSent: Number((r.bytesSent / 1048576).toFixed(0)),
    rssMaxMiB: Math.round(r.rssMaxMiB),
    goodOps: r.goodOps,
    findings: r.findings.map((f) => `${f.kind} x${f.count}`),
  })}\n`,
);
process.exit(r.findings.length ? 1 : 0);
