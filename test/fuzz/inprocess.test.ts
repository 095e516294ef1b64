// Protocol fuzzing, in process: the campaign's generated cases and oracle
// against an NbdServer built in this process over in-memory devices, on its
// real TCP, oldstyle and Unix-socket listeners (see lib/inprocess.ts).
// Hundreds of cases a second: this is the engine for long runs.
//
// Default: a 10 s seeded run that is part of `npm test`. A long run, in chunks:
//   FUZZ_SEED=1 FUZZ_FIRST=0 FUZZ_CASES=100000 npx tap --timeout=0 test/fuzz/inprocess.test.ts
// Environment:
//   FUZZ_SEED         campaign seed (default 0x5eed); case i is fully determined by (seed, i)
//   FUZZ_FIRST        first case index (default 0): a chunk is [FUZZ_FIRST, FUZZ_FIRST + FUZZ_CASES)
//   FUZZ_CASES        stop after this many cases
//   FUZZ_SECONDS      stop after this many seconds of storm (default 10 when FUZZ_CASES is unset)
//   FUZZ_CONCURRENCY  cases in flight at once (default 48)
//   FUZZ_ONLY         comma-separated case indices to replay
//   FUZZ_REPORT       write the findings and statistics as JSON to this path
//   FUZZ_MINIMISE     seconds spent minimising each new finding (default 20; 0 disables)
//   FUZZ_RSS_MIB      RSS limit for this whole process (default 4096: a sanity bound; freed Buffers stay in RSS)

import t from 'tap';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runInProcessCampaign, type InProcessResult } from './lib/inprocess.js';

const HERE = dirname(fileURLToPath(import.meta.url));

const env = process.env;
const num = (v: string | undefined): number | undefined => (v === undefined || v === '' ? undefined : Number(v));
const seed = num(env.FUZZ_SEED) ?? 0x5eed;
const first = num(env.FUZZ_FIRST) ?? 0;
const only = env.FUZZ_ONLY ? env.FUZZ_ONLY.split(',').map((s) => Number(s.trim())) : undefined;
const cases = num(env.FUZZ_CASES);
const seconds = num(env.FUZZ_SECONDS) ?? (cases === undefined && !only ? 10 : undefined);
const concurrency = num(env.FUZZ_CONCURRENCY) ?? 48;
const minimiseSeconds = num(env.FUZZ_MINIMISE) ?? 20;
const rssLimitMiB = num(env.FUZZ_RSS_MIB) ?? 4096;

// Without a time limit, allow a generous 5 ms per case on top of set-up and the checks after.
t.setTimeout(((seconds ?? ((cases ?? only?.length ?? 0) * 0.005 + 600)) + 240) * 1000);

function summary(r: InProcessResult): string {
  return [
    `seed ${seed}, cases [${r.first}, ${r.end}): ${r.cases} cases in ${r.seconds.toFixed(1)} s (${(r.cases / Math.max(0.001, r.seconds)).toFixed(0)}/s), ${(r.bytesSent / 1024 / 1024).toFixed(1)} MiB sent`,
    `generators: ${JSON.stringify(r.byGen)}`,
    `mean ms per case: ${JSON.stringify(Object.fromEntries(Object.entries(r.msByGen).map(([k, v]) => [k, Math.round(v / (r.byGen[k] ?? 1))])))}`,
    `outcomes: ${JSON.stringify(r.outcomes)}`,
    `event loop ${(r.eventLoopUtilisation * 100).toFixed(0)}% busy, ${r.cpuSeconds} s of CPU (${(r.cpuSeconds / Math.max(0.001, r.seconds) * 100).toFixed(0)}% of one core), stalled ${r.stalledSeconds} s, longest task ${r.longestBlockMs} ms`,
    `process RSS ${r.rssBaselineMiB.toFixed(0)} MiB at start, ${r.rssMaxMiB.toFixed(0)} MiB max`,
    `good client: ${r.goodOps} operations, ${r.goodReconnects} fresh connections`,
    `findings: ${r.findings.length}`,
  ].join('\n');
}

t.test('in-process protocol fuzz campaign', async (t) => {
  const r = await runInProcessCampaign(t, {
    seed,
    first,
    cases,
    seconds,
    only,
    concurrency,
    handshakeTimeoutS: 2,
    rssLimitMiB,
    corpusDir: join(HERE, 'corpus'),
    minimiseSeconds,
    log: (line) => t.comment(line),
  });
  t.comment(summary(r));
  if (env.FUZZ_REPORT) writeFileSync(env.FUZZ_REPORT, JSON.stringify({ seed, ...r }, null, 2));

  t.ok(r.cases > 0, `${r.cases} cases ran (seed ${seed}, indices ${r.first}..${r.end - 1}, ${(r.cases / Math.max(0.001, r.seconds)).toFixed(0)} cases/s)`);
  if (cases !== undefined && !only) t.equal(r.cases, cases, `all ${cases} cases of the chunk ran`);
  t.ok(r.goodOps > 0, `the well-behaved client kept working during the storm (${r.goodOps} operations)`);
  t.ok(r.rssMaxMiB < rssLimitMiB, `process RSS stayed under ${rssLimitMiB} MiB (max ${r.rssMaxMiB.toFixed(0)} MiB)`);
  for (const f of r.findings) {
    t.fail(`${f.kind}: ${f.detail}`, {
      count: f.count,
      case: f.caseIndex,
      gen: f.gen,
      target: f.target,
      finish: f.finish,
      minimal: f.minimal,
      bytes: f.bytes && f.bytes.length > 4000 ? `${f.bytes.slice(0, 4000)}...` : f.bytes,
      replay: f.caseIndex !== undefined ? `FUZZ_SEED=${seed} FUZZ_ONLY=${f.caseIndex} npx tap test/fuzz/inprocess.test.ts` : undefined,
    });
  }
  t.equal(r.findings.length, 0, `no findings in ${r.cases} cases`);
});
