// Protocol fuzzing: mutated and random handshakes, option sequences and
// request streams thrown at a real nbd-migrate server over TCP, its Unix
// socket and its oldstyle port, while a well-behaved client works on its own
// export. See lib/campaign.ts for the invariants and lib/checker.ts for the
// protocol oracle.
//
// Default: a short seeded run that is part of `npm test`. A long campaign:
//   FUZZ_SECONDS=900 npx tap --timeout=0 test/fuzz/protocol.test.ts
// Environment:
//   FUZZ_SEED         campaign seed (default 0x5eed); case i is fully determined by (seed, i)
//   FUZZ_CASES        stop after this many cases
//   FUZZ_SECONDS      stop after this many seconds of storm (default 10 when FUZZ_CASES is unset)
//   FUZZ_CONCURRENCY  cases in flight at once (default 4)
//   FUZZ_ONLY         comma-separated case indices to replay (e.g. from a report)
//   FUZZ_REPORT       write the findings and statistics as JSON to this path
//   FUZZ_MINIMISE     seconds spent minimising each new finding (default 20; 0 disables)
//   FUZZ_RSS_MIB      RSS limit for the server (default 400)

import t from 'tap';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCampaign, type CampaignResult } from './lib/campaign.js';

const HERE = dirname(fileURLToPath(import.meta.url));

const env = process.env;
const num = (v: string | undefined): number | undefined => (v === undefined || v === '' ? undefined : Number(v));
const seed = num(env.FUZZ_SEED) ?? 0x5eed;
const only = env.FUZZ_ONLY ? env.FUZZ_ONLY.split(',').map((s) => Number(s.trim())) : undefined;
const cases = num(env.FUZZ_CASES);
const seconds = num(env.FUZZ_SECONDS) ?? (cases === undefined && !only ? 10 : undefined);
const concurrency = num(env.FUZZ_CONCURRENCY) ?? 4;
const minimiseSeconds = num(env.FUZZ_MINIMISE) ?? 20;
const rssLimitMiB = num(env.FUZZ_RSS_MIB) ?? 400;

// The file's own timeout follows the requested length (plus set-up, minimising and the checks after).
t.setTimeout(((seconds ?? 600) + 240) * 1000);

function summary(r: CampaignResult): string {
  const lines = [
    `seed ${seed}: ${r.cases} cases in ${r.seconds.toFixed(1)} s (${(r.cases / Math.max(1, r.seconds)).toFixed(0)}/s), ${(r.bytesSent / 1024 / 1024).toFixed(1)} MiB sent`,
    `generators: ${JSON.stringify(r.byGen)}`,
    `mean ms per case: ${JSON.stringify(Object.fromEntries(Object.entries(r.msByGen).map(([k, v]) => [k, Math.round(v / (r.byGen[k] ?? 1))])))}`,
    `outcomes: ${JSON.stringify(r.outcomes)}`,
    `server RSS ${r.rssBaselineMiB.toFixed(0)} MiB at start, ${r.rssMaxMiB.toFixed(0)} MiB max; restarts ${r.serverRestarts}`,
    `good client: ${r.goodOps} operations, ${r.goodReconnects} fresh connections`,
    `findings: ${r.findings.length}`,
  ];
  return lines.join('\n');
}

t.test('protocol fuzz campaign', async (t) => {
  const r = await runCampaign(t, {
    seed,
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

  t.ok(r.cases > 0, 'cases ran');
  t.ok(r.goodOps > 0, 'the well-behaved client kept working during the storm');
  t.ok(r.rssMaxMiB < rssLimitMiB, `server RSS stayed under ${rssLimitMiB} MiB (max ${r.rssMaxMiB.toFixed(0)} MiB)`);
  t.equal(r.serverRestarts, 0, 'the server never died');
  for (const f of r.findings) {
    t.fail(`${f.kind}: ${f.detail}`, {
      count: f.count,
      case: f.caseIndex,
      gen: f.gen,
      target: f.target,
      finish: f.finish,
      minimal: f.minimal,
      bytes: f.bytes && f.bytes.length > 4000 ? `${f.bytes.slice(0, 4000)}...` : f.bytes,
      replay: f.caseIndex !== undefined ? `FUZZ_SEED=${seed} FUZZ_ONLY=${f.caseIndex}` : undefined,
    });
  }
  if (r.findings.length === 0) t.pass('no findings');
});
