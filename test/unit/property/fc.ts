// fast-check for the property tests: seeds and run counts from the environment
// (FC_SEED replays a failure, FC_RUNS lengthens a run), and a tap assertion
// that names the runs and the seed, or the counterexample and how to replay it.

import fc from 'fast-check';

export interface Params {
  numRuns: number;
  seed: number;
  endOnFailure?: boolean;
}

export function fcParams(defaults: { numRuns: number }): Params {
  const seed = process.env.FC_SEED ? Number(process.env.FC_SEED) : (Date.now() ^ (Math.random() * 0x100000000)) | 0;
  const numRuns = process.env.FC_RUNS ? Number(process.env.FC_RUNS) : defaults.numRuns;
  return { numRuns, seed };
}

import type { Test } from 'tap';

export async function checkProperty<T>(t: Test, name: string, prop: fc.IProperty<T> | fc.IAsyncProperty<T>, params: Params): Promise<void> {
  const details = await fc.check(prop as fc.IAsyncProperty<T>, params);
  if (!details.failed) {
    t.pass(`${name}: ${details.numRuns} runs hold (FC_SEED=${params.seed})`);
    return;
  }
  const err = details.errorInstance as Error | undefined;
  t.fail(`${name}: counterexample after ${details.numRuns} runs: ${err?.message ?? String(details.errorInstance)}`, {
    counterexample: JSON.stringify(details.counterexample, (_k, v) => (typeof v === 'bigint' ? v.toString() : v))?.slice(0, 4000),
    replay: `FC_SEED=${params.seed} (path ${details.counterexamplePath})`,
    shrinks: details.numShrinks,
  });
}
