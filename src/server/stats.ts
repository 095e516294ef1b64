/**
 * Per-export request statistics, kept as plain numbers on the data path (a few
 * additions per request, no allocation, no library call) and read by the
 * metrics exporter at scrape time. The server never imports prom-client.
 */
import { COMMAND_NAMES } from '../protocol/constants.js';

/** Upper bounds (seconds) of the latency histogram buckets; +Inf is implied. */
export const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
] as const;

export class OpStats {
  count = 0;
  bytes = 0;
  /** Sum of latencies in seconds. */
  latencySum = 0;
  /** Non-cumulative counts per bucket; the last slot is +Inf. */
  readonly buckets = new Float64Array(LATENCY_BUCKETS.length + 1);
  /** Failed requests by NBD error name (EINVAL, EIO, ...). */
  readonly errors = new Map<string, number>();

  observe(bytes: number, seconds: number): void {
    this.count++;
    this.bytes += bytes;
    this.latencySum += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.buckets[i]!++;
  }

  error(name: string): void {
    this.errors.set(name, (this.errors.get(name) ?? 0) + 1);
  }
}

export class ExportStats {
  /** Keyed by command name (read, write, ...). */
  readonly ops = new Map<string, OpStats>();

  op(type: number): OpStats {
    const name = COMMAND_NAMES[type] ?? 'unknown';
    let s = this.ops.get(name);
    if (!s) this.ops.set(name, (s = new OpStats()));
    return s;
  }
}

/** Connection counters for the whole server. */
export class ServerStats {
  open = 0;
  accepted = 0;
  /** Connections ended before transmission, by reason (handshake-timeout, handshake-failed, policy, shutdown). */
  readonly refused = new Map<string, number>();

  refuse(reason: string): void {
    this.refused.set(reason, (this.refused.get(reason) ?? 0) + 1);
  }
}
