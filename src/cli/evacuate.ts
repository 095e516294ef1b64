/**
 * What ctl prints of evacuations and of `status`: the progress block of
 * `evacuate --wait` (one line per export and a total line: bytes, rate, ETA),
 * the final summary (each export's outcome), and the status tables.
 */
import { adminRequest } from '../admin/server.js';
import type { ExportStatus } from '../migration/controller.js';
import type { EvacuationExportStatus, EvacuationStatus } from '../migration/evacuation.js';
import type { JobStatus } from '../migration/job.js';
import { formatBytes } from '../util/units.js';

type Out = (s: string) => void;

/** Rows as columns padded to their widest cell (the last column is not padded). */
export function formatTable(rows: readonly (readonly string[])[], indent = ''): string[] {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => indent + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd());
}

const pct = (done: number, total: number) => `${(total > 0 ? Math.min(100, (done / total) * 100) : 100).toFixed(1)}%`;
const eta = (s: number | null) => (s === null ? '-' : s < 60 ? `${Math.ceil(s)}s` : `${Math.floor(s / 60)}m${String(Math.ceil(s % 60)).padStart(2, '0')}s`);
const rateOf = (r: number) => (r > 0 ? `${formatBytes(r)}/s` : '-');

function bar(done: number, total: number, width = 20): string {
  const filled = Math.round((total > 0 ? Math.min(1, done / total) : 1) * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}

function exportNote(e: EvacuationExportStatus): string {
  if (e.error) return e.error;
  if (e.state === 'completed' && e.pauseMs !== null) return `cutover pause ${e.pauseMs} ms`;
  if (e.maxBandwidth !== null && e.state === 'copying') return `share ${formatBytes(e.maxBandwidth)}/s`;
  return '';
}

/** The progress block: one line per export, then the total (bytes, rate, ETA). */
export function evacuationLines(st: EvacuationStatus): string[] {
  const rows = st.exports.map((e) => [
    e.export,
    e.state,
    bar(e.doneBytes, e.size),
    pct(e.doneBytes, e.size),
    `${formatBytes(e.doneBytes)}/${formatBytes(e.size)}`,
    rateOf(e.rate),
    `ETA ${FINAL_STATES.has(e.state) ? '-' : eta(e.etaSeconds)}`,
    exportNote(e),
  ]);
  const c = st.counts;
  rows.push([
    'total',
    `${c.completed}/${st.exports.length} done`,
    bar(st.bytesDone, st.bytesTotal),
    pct(st.bytesDone, st.bytesTotal),
    `${formatBytes(st.bytesDone)}/${formatBytes(st.bytesTotal)}`,
    rateOf(st.rate),
    `ETA ${st.state === 'done' ? '-' : eta(st.etaSeconds)}`,
    `${c.queued} queued, ${c.running} running, ${c.ready} ready, ${c.failed} failed, ${c.aborted} aborted` +
      (st.maxBandwidth !== null ? `; budget ${formatBytes(st.maxBandwidth)}/s` : ''),
  ]);
  return formatTable(rows);
}

const FINAL_STATES = new Set(['completed', 'aborted', 'failed']);

/** The summary after `--wait`: the outcome of each export, and the totals. */
export function evacuationSummary(st: EvacuationStatus): string[] {
  const c = st.counts;
  const rate = st.elapsedSeconds > 0 ? st.bytesCopied / st.elapsedSeconds : 0;
  const head =
    `evacuation ${st.id} to ${st.to}: ${c.completed} completed, ${c.failed} failed, ${c.aborted} aborted` +
    (c.ready ? `, ${c.ready} ready for \`ctl cutover --all\`` : '') +
    ` (of ${st.exports.length}) in ${st.elapsedSeconds.toFixed(1)} s; ${formatBytes(st.bytesCopied)} copied, ${formatBytes(rate)}/s`;
  const rows = st.exports.map((e) => [
    `${e.export}:`,
    e.state,
    e.target,
    `${formatBytes(e.dataBytes)} of data`,
    e.error ? `error: ${e.error}` : e.pauseMs !== null ? `cutover pause ${e.pauseMs} ms` : '',
  ]);
  return [head, ...formatTable(rows, '  ')];
}

/** Redraws a block of lines on stderr: in place on a TTY, every few seconds (and at the end) otherwise. */
class Block {
  private drawn = 0;
  private lastPlain = 0;
  private readonly tty = process.stderr.isTTY === true;

  draw(lines: string[], force = false): void {
    if (this.tty) {
      const up = this.drawn > 0 ? `\x1b[${this.drawn}A` : '';
      process.stderr.write(up + lines.map((l) => `\r\x1b[K${l}\n`).join(''));
      this.drawn = lines.length;
    } else if (force || Date.now() - this.lastPlain >= 2000) {
      this.lastPlain = Date.now();
      process.stderr.write(lines.join('\n') + '\n\n');
    }
  }
}

/**
 * Follows an evacuation until every export has ended (or, under manual
 * cutover, until every export that did not fail is ready); draws the progress
 * block on the way and returns the last status.
 */
export async function waitForEvacuation(socket: string, id: string): Promise<EvacuationStatus> {
  const block = new Block();
  for (;;) {
    const all = (await adminRequest(socket, { cmd: 'status' })) as { evacuations?: EvacuationStatus[] };
    const st = all.evacuations?.find((e) => e.id === id);
    if (!st) throw new Error(`evacuation ${id} is no longer known to the server`);
    const end = st.state === 'done' || st.state === 'ready';
    block.draw(evacuationLines(st), end);
    if (end) return st;
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * The exports table's ACTIVITY LOG column: "off" without crash-safe dirty
 * tracking (read-only, receiving, --no-activity-log), "FAILED" once it could
 * not be written (writes into unlogged extents then fail EIO), else the
 * extents it holds now and its checkpoints since the export opened.
 */
function activityLogCell(l: ExportStatus['activityLog']): string {
  if (!l) return 'off';
  if (l.failed) return 'FAILED';
  return `${l.activeExtents} x ${formatBytes(l.extentBytes, { compact: true })}, ${l.checkpoints} checkpoint${l.checkpoints === 1 ? '' : 's'}`;
}

/** `ctl status`: tables of the exports, the mirror jobs and the evacuations. */
export function printStatusTables(st: { exports: ExportStatus[]; jobs: JobStatus[]; evacuations?: EvacuationStatus[] }, out: Out): void {
  out(
    formatTable([
      ['EXPORT', 'SIZE', 'CONNS', 'DIRTY', 'BACKEND', 'ACTIVITY LOG', 'IMAGE'],
      ...st.exports.map((e) => [e.name, formatBytes(e.size), String(e.connections), formatBytes(e.dirtyBytes), e.backend, activityLogCell(e.activityLog), e.image]),
    ]).join('\n'),
  );
  out('');
  if (st.jobs.length === 0) out('no mirror jobs');
  else
    out(
      formatTable([
        ['MIRROR', 'TARGET', 'STATE', 'PASS', 'COPIED', 'DIRTY', 'RATE', 'ETA', 'CONVERGE', 'RETRIES', 'NOTE'],
        ...st.jobs.map((j) => [
          j.export,
          j.target,
          j.state + (j.retrying ? ' (retrying)' : ''),
          String(j.pass),
          formatBytes(j.bytesCopied),
          formatBytes(j.dirtyBytes),
          rateOf(j.rate),
          FINAL_STATES.has(j.state) ? '-' : eta(j.etaSeconds),
          j.convergence,
          String(j.retries),
          j.error
            ? `error: ${j.error}`
            : j.switchedToPostcopy
              ? `switched to post-copy at pass ${j.switchedToPostcopy.pass}, ${formatBytes(j.switchedToPostcopy.dirtyBytes)} left to fetch` +
                (j.switchedToPostcopy.pauseMs !== null ? `, pause ${j.switchedToPostcopy.pauseMs} ms` : '')
              : j.pauseMs !== null
                ? `cutover pause ${j.pauseMs} ms`
                : '',
        ]),
      ]).join('\n'),
    );
  for (const ev of st.evacuations ?? []) {
    out('');
    out(
      `evacuation ${ev.id} to ${ev.to}: ${ev.state}, parallel ${ev.parallel}, ` +
        `max-bandwidth ${ev.maxBandwidth !== null ? `${formatBytes(ev.maxBandwidth)}/s` : 'unlimited'}, cutover ${ev.cutover}, ${ev.elapsedSeconds.toFixed(1)} s` +
        // The mirror options given to every job (ctl evacuate --max-downtime ...), as the job sees them.
        (Object.keys(ev.job ?? {}).length ? `; each job: ${Object.entries(ev.job).map(([k, v]) => `${k} ${String(v)}`).join(', ')}` : ''),
    );
    out(
      formatTable(
        [
          ['EXPORT', 'STATE', 'DONE', 'SIZE', 'COPIED', 'RATE', 'ETA', 'NOTE'],
          ...ev.exports.map((e) => [
            e.export,
            e.state,
            pct(e.doneBytes, e.size),
            formatBytes(e.size),
            formatBytes(e.bytesCopied),
            rateOf(e.rate),
            FINAL_STATES.has(e.state) ? '-' : eta(e.etaSeconds),
            exportNote(e),
          ]),
          [
            'total',
            `${ev.counts.completed}/${ev.exports.length} done`,
            pct(ev.bytesDone, ev.bytesTotal),
            formatBytes(ev.bytesTotal),
            formatBytes(ev.bytesCopied),
            rateOf(ev.rate),
            ev.state === 'done' ? '-' : eta(ev.etaSeconds),
            `${ev.counts.queued} queued, ${ev.counts.running} running, ${ev.counts.ready} ready, ${ev.counts.completed} completed, ${ev.counts.failed} failed, ${ev.counts.aborted} aborted`,
          ],
        ],
        '  ',
      ).join('\n'),
    );
  }
}
