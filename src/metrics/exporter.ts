/**
 * Prometheus metrics (`--metrics HOST:PORT`, GET /metrics). Everything is read
 * at scrape time from the counters the core keeps (ExportStats, ServerStats,
 * bitmaps, job status): the data path never calls into prom-client.
 * Names follow Prometheus conventions: nbd_migrate_ prefix, base units,
 * _total for counters.
 */
import * as http from 'node:http';
import client from 'prom-client';
import type { MigrationController } from '../migration/controller.js';
import type { JobState } from '../migration/job.js';
import type { PostcopyDestination } from '../migration/postcopy.js';
import type { ExportRegistry } from '../server/export.js';
import { LATENCY_BUCKETS, type ServerStats } from '../server/stats.js';
import { logger } from '../util/log.js';

const P = 'nbd_migrate_';
const JOB_STATES: readonly JobState[] = ['created', 'copying', 'ready', 'cutting-over', 'completed', 'aborted', 'failed'];
const log = logger({ component: 'metrics' });

export interface MetricsSources {
  exports: ExportRegistry;
  server: ServerStats;
  controller: MigrationController;
  /** Post-copy destinations (serve --fetch-from), by export. */
  postcopy?: ReadonlyMap<string, PostcopyDestination>;
}

/** A histogram whose buckets are kept elsewhere (ExportStats) and exposed as they are at scrape. */
class RequestDurationHistogram {
  readonly name = `${P}request_duration_seconds`;
  readonly help = 'Time from a request being parsed to its reply being queued, by export and operation';
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  constructor(private readonly exports: ExportRegistry) {}
  get() {
    const values: Array<{ value: number; labels: Record<string, string | number>; metricName: string }> = [];
    for (const e of this.exports.list()) {
      for (const [op, s] of e.stats.ops) {
        if (s.count === 0) continue;
        let cumulative = 0;
        LATENCY_BUCKETS.forEach((le, i) => {
          cumulative += s.buckets[i]!;
          values.push({ value: cumulative, labels: { export: e.name, op, le }, metricName: `${this.name}_bucket` });
        });
        values.push({ value: s.count, labels: { export: e.name, op, le: '+Inf' }, metricName: `${this.name}_bucket` });
        values.push({ value: s.latencySum, labels: { export: e.name, op }, metricName: `${this.name}_sum` });
        values.push({ value: s.count, labels: { export: e.name, op }, metricName: `${this.name}_count` });
      }
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }
  reset() {}
}

export function buildRegistry(src: MetricsSources): client.Registry {
  const reg = new client.Registry();
  client.collectDefaultMetrics({ register: reg, prefix: P });

  const counter = (name: string, help: string, labelNames: string[], fill: (set: (labels: Record<string, string>, v: number) => void) => void) =>
    new client.Counter({
      name: P + name,
      help,
      labelNames,
      registers: [reg],
      collect() {
        this.reset();
        fill((labels, v) => v > 0 && this.inc(labels, v));
      },
    });
  const gauge = (name: string, help: string, labelNames: string[], fill: (set: (labels: Record<string, string>, v: number) => void) => void) =>
    new client.Gauge({
      name: P + name,
      help,
      labelNames,
      registers: [reg],
      collect() {
        this.reset();
        fill((labels, v) => this.set(labels, v));
      },
    });

  const ops = (f: (exp: string, op: string, s: import('../server/stats.js').OpStats) => void) => {
    for (const e of src.exports.list()) for (const [op, s] of e.stats.ops) f(e.name, op, s);
  };
  counter('requests_total', 'Requests completed successfully, by export and operation', ['export', 'op'], (set) =>
    ops((exp, op, s) => set({ export: exp, op }, s.count)),
  );
  counter('request_bytes_total', 'Payload bytes read or written, by export and operation', ['export', 'op'], (set) =>
    ops((exp, op, s) => set({ export: exp, op }, s.bytes)),
  );
  counter('request_errors_total', 'Requests answered with an NBD error, by export, operation and error', ['export', 'op', 'error'], (set) =>
    ops((exp, op, s) => {
      for (const [error, n] of s.errors) set({ export: exp, op, error }, n);
    }),
  );
  // Not a prom-client class: registered through the registry's metric interface (get/reset).
  reg.registerMetric(new RequestDurationHistogram(src.exports) as unknown as client.Metric);

  gauge('connections_open', 'Client connections open now', [], (set) => set({}, src.server.open));
  counter('connections_accepted_total', 'Client connections accepted', [], (set) => set({}, src.server.accepted));
  counter('connections_refused_total', 'Client connections ended before transmission, by reason', ['reason'], (set) => {
    for (const [reason, n] of src.server.refused) set({ reason }, n);
  });

  const status = () => src.controller.status();
  gauge('dirty_bytes', 'Bytes marked dirty in the export\'s bitmap', ['export'], (set) => {
    for (const e of status().exports) set({ export: e.name }, e.dirtyBytes);
  });
  gauge('dirty_blocks', 'Blocks marked dirty in the export\'s bitmap', ['export'], (set) => {
    for (const e of status().exports) set({ export: e.name }, e.dirtyBlocks);
  });
  gauge('dirty_bitmap_bytes', 'Memory held by the export\'s dirty bitmap', ['export'], (set) => {
    for (const e of status().exports) set({ export: e.name }, e.bitmapBytes);
  });
  const logs = (f: (exp: string, l: import('../dirty/activity-log.js').ActivityLogStatus) => void) => {
    for (const e of status().exports) if (e.activityLog) f(e.name, e.activityLog);
  };
  gauge('activity_log_active_extents', 'Extents the export\'s activity log names now', ['export'], (set) => logs((exp, l) => set({ export: exp }, l.activeExtents)));
  counter('activity_log_extents_logged_total', 'Extents written into the activity log (first changes into extents not logged)', ['export'], (set) =>
    logs((exp, l) => set({ export: exp }, l.extentsLogged)),
  );
  counter('activity_log_syncs_total', 'Activity-log slot writes, each followed by an fdatasync', ['export'], (set) => logs((exp, l) => set({ export: exp }, l.syncs)));
  counter('activity_log_checkpoints_total', 'Activity-log checkpoints (the bitmap stored, the log started again)', ['export'], (set) =>
    logs((exp, l) => set({ export: exp }, l.checkpoints)),
  );
  gauge('mirror_state', 'Mirror job state (1 for the current one)', ['export', 'state'], (set) => {
    for (const j of status().jobs) for (const s of JOB_STATES) set({ export: j.export, state: s }, j.state === s ? 1 : 0);
  });
  gauge('mirror_pass', 'Sweep number of the mirror job', ['export'], (set) => {
    for (const j of status().jobs) set({ export: j.export }, j.pass);
  });
  counter('mirror_copied_bytes_total', 'Bytes the mirror job wrote, zeroed or found already zero on the target', ['export'], (set) => {
    for (const j of status().jobs) set({ export: j.export }, j.bytesCopied);
  });
  gauge('mirror_rate_bytes_per_second', 'Measured copy rate', ['export'], (set) => {
    for (const j of status().jobs) set({ export: j.export }, j.rate);
  });
  gauge('mirror_eta_seconds', 'Estimated seconds until the mirror is synchronised', ['export'], (set) => {
    for (const j of status().jobs) if (j.etaSeconds !== null) set({ export: j.export }, j.etaSeconds);
  });
  gauge('mirror_retries', 'Consecutive target failures the mirror job is retrying', ['export'], (set) => {
    for (const j of status().jobs) set({ export: j.export }, j.retries);
  });
  gauge('mirror_cutover_pause_seconds', 'Guest write pause measured at the last cutover', ['export'], (set) => {
    for (const j of status().jobs) if (j.pauseMs !== null) set({ export: j.export }, j.pauseMs / 1000);
  });
  // Host evacuations (ctl evacuate): their totals, by evacuation id.
  const EVAC_STATES = ['queued', 'running', 'ready', 'completed', 'failed', 'aborted'] as const;
  gauge('evacuation_exports', 'Exports of the evacuation by state (running: copying; ready: waiting for cutover)', ['evacuation', 'state'], (set) => {
    for (const ev of status().evacuations) for (const s of EVAC_STATES) set({ evacuation: ev.id, state: s }, ev.counts[s]);
  });
  gauge('evacuation_bytes', 'Bytes the evacuation moves (the sum of its exports\' sizes)', ['evacuation'], (set) => {
    for (const ev of status().evacuations) set({ evacuation: ev.id }, ev.bytesTotal);
  });
  gauge('evacuation_done_bytes', 'Bytes of the evacuation\'s exports in sync with their targets', ['evacuation'], (set) => {
    for (const ev of status().evacuations) set({ evacuation: ev.id }, ev.bytesDone);
  });
  counter('evacuation_copied_bytes_total', 'Bytes the evacuation\'s jobs wrote, zeroed or found already zero on the targets', ['evacuation'], (set) => {
    for (const ev of status().evacuations) set({ evacuation: ev.id }, ev.bytesCopied);
  });
  gauge('evacuation_rate_bytes_per_second', 'Sum of the running jobs\' copy rates', ['evacuation'], (set) => {
    for (const ev of status().evacuations) set({ evacuation: ev.id }, ev.rate);
  });
  gauge('evacuation_max_bandwidth_bytes_per_second', 'The budget the evacuation\'s running jobs share (absent: unlimited)', ['evacuation'], (set) => {
    for (const ev of status().evacuations) if (ev.maxBandwidth !== null) set({ evacuation: ev.id }, ev.maxBandwidth);
  });
  const postcopy = () => [...(src.postcopy?.values() ?? [])].map((p) => p.status());
  gauge('postcopy_present_bytes', 'Post-copy destination: bytes present locally', ['export'], (set) => {
    for (const p of postcopy()) set({ export: p.export }, p.presentBytes);
  });
  gauge('postcopy_absent_bytes', 'Post-copy destination: bytes still only on the source', ['export'], (set) => {
    for (const p of postcopy()) set({ export: p.export }, p.absentBytes);
  });
  gauge('postcopy_rate_bytes_per_second', 'Post-copy destination: bytes brought over per second (fetches and fill)', ['export'], (set) => {
    for (const p of postcopy()) set({ export: p.export }, p.rate);
  });
  gauge('postcopy_eta_seconds', 'Post-copy destination: estimated seconds until every block is present', ['export'], (set) => {
    for (const p of postcopy()) if (p.etaSeconds !== null) set({ export: p.export }, p.etaSeconds);
  });
  gauge('postcopy_completed', 'Post-copy destination: 1 once every block is present and the source detached', ['export'], (set) => {
    for (const p of postcopy()) set({ export: p.export }, p.state === 'completed' ? 1 : 0);
  });
  return reg;
}

/** Serves GET /metrics on `listen` ("HOST:PORT", "[::1]:PORT" or "PORT"). */
export async function startMetricsServer(listen: string, reg: client.Registry): Promise<{ port: number; close(): Promise<void> }> {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(listen) ?? (/^\d+$/.test(listen) ? [listen, undefined, '127.0.0.1', listen] : null);
  if (!m) throw new Error(`--metrics: expected HOST:PORT, got "${listen}"`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const port = Number(m[3]);
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('try /metrics\n');
      return;
    }
    reg.metrics().then(
      (text) => res.writeHead(200, { 'content-type': reg.contentType }).end(text),
      (e: unknown) => {
        log.error('metrics-failed', { cause: e });
        res.writeHead(500).end();
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = (server.address() as import('node:net').AddressInfo).port;
  log.info('listening', { listener: 'metrics', address: host, port: bound });
  return { port: bound, close: () => new Promise<void>((r) => server.close(() => r())) };
}
