// The ctl progress line: one measure of progress, and no ETA while the target is unreachable.
import t from 'tap';
import { progressFigures } from '../../../src/cli/ctl.js';
import type { JobStatus } from '../../../src/migration/job.js';

const MiB = 1024 * 1024;
const base = {
  export: 'vm1', target: 'nbd://x/vm1', jobId: 'abcdef0123456789', targetKind: 'foreign', targetDataBytes: 0, targetFreeBytes: null,
  sourceDataBytes: 64 * MiB, state: 'copying', pass: 1, size: 64 * MiB, bytesCopied: 0, dataBytes: 0, zeroBytes: 0, skippedBytes: 0,
  dirtyBytes: 64 * MiB, dirtyBlocks: 1024, granularity: 65536, rate: 0, etaSeconds: null, maxBandwidth: null, cutover: 'manual',
  maxDowntimeMs: 50, convergence: 'none', throttleRate: null, retries: 0, retrying: false, pauseMs: null,
  startedAt: '', finishedAt: null, error: null,
} satisfies JobStatus;

t.test('progress never runs backwards across a retried sweep', async (t) => {
  // 40 MiB copied in sweep 1, then the target failed: the chunks in flight (8 MiB) are dirty again,
  // and the retry counts as pass 2 while bytesCopied keeps growing past what is in sync.
  const before = progressFigures({ ...base, pass: 1, bytesCopied: 40 * MiB, dirtyBytes: 24 * MiB, rate: 100 * MiB, etaSeconds: 0.2 });
  const retrying = progressFigures({ ...base, pass: 1, bytesCopied: 40 * MiB, dirtyBytes: 32 * MiB, retrying: true, retries: 2, rate: 100 * MiB, etaSeconds: 0.3 });
  const after = progressFigures({ ...base, pass: 2, bytesCopied: 56 * MiB, dirtyBytes: 16 * MiB, rate: 100 * MiB, etaSeconds: 0.2 });
  t.equal(before.done, 40 * MiB);
  t.equal(retrying.done, 32 * MiB, 'what is in sync, from the bitmap');
  t.equal(after.done, 48 * MiB, 'pass 2 goes on from what is in sync, not from bytesCopied');
  t.ok(after.done <= after.total);
  t.equal(retrying.etaSeconds, null, 'no ETA while retrying');
  t.equal(retrying.rate, 0, 'no rate while retrying');
  t.match(retrying.state, /retrying \(attempt 2\)/);
});
