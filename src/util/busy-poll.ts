/**
 * Adaptive polling of the event loop (`--busy-poll-us`), as QEMU's iothreads
 * poll (poll-max-ns): after the loop handled an event it stays awake for a
 * window, polling with a zero timeout, before it sleeps in epoll again.
 *
 * Why: at queue depth 1 (a guest's database, a FLUSH after every write) a
 * request is one round trip, and both ends sleep between requests. In a VM the
 * wake-up of a sleeping CPU costs tens of microseconds: fio's 4 KiB writes at
 * QD1 took 70-90 us here against 25 us with client and server pinned to one
 * CPU, and a minimal Node server and a C server each took as long as ours.
 * Polling removes the server's wake-up: 8.9k -> 18.4k IOPS (nbdkit 13.2k),
 * and a write + FLUSH at a time 4.2k -> 8.1k (nbdkit 7.7k), medians of 3.
 *
 * The window adapts (native/nbd_native.cc, QEMU's rule): an event that came
 * after a sleep shorter than the bound doubles it (from 4 us up to the bound),
 * one after a longer sleep halves it (below 4 us it is off). An idle server
 * sleeps; a server with sparse requests stops polling after a few of them;
 * one with requests closer together than the bound spends its gaps polling,
 * up to a core while a QD1 client runs flat out. 0 turns it off.
 *
 * Needs the addon's busyPoll; without it (the pure-JS fallback,
 * NBD_MIGRATE_NATIVE=0) the loop sleeps as Node's does, and status says so.
 */
import { nativeAddon } from './addon.js';

export const DEFAULT_BUSY_POLL_US = 100;
/** The largest bound accepted: beyond 10 ms a poll is no longer a short wait. */
export const MAX_BUSY_POLL_US = 10_000;

interface Native {
  busyPoll(maxNs: number): number;
  busyPollStats(out: Float64Array): void;
}

export interface BusyPollStatus {
  /** The bound in force (0: off). */
  maxUs: number;
  /** The window now (it adapts between 0 and maxUs). */
  windowUs: number;
  /** Events found while polling, each a wake-up saved. */
  caught: number;
  /** Windows that ran out with nothing found (the loop then slept). */
  expired: number;
  /** Times the window doubled, and halved. */
  grown: number;
  shrunk: number;
  /** Why it is off although asked for, when it is. */
  unavailable?: string;
}

/** Why polling is off although asked for (set by the last setBusyPoll). */
let unavailable: string | undefined;
/** The addon's figures: window, caught, expired, grown, shrunk (counts), bound (ns); it holds the state. */
const stats = new Float64Array(6);

/** The addon's calls, or why they are missing. */
function native(): Native | string {
  const a = nativeAddon();
  if (!a.addon) return `the native addon is not loaded: ${a.reason}`;
  if (typeof a.addon.busyPoll !== 'function') return 'the native addon has no busyPoll (an older build)';
  return a.addon as unknown as Native;
}

/** Sets the bound (microseconds; 0 turns polling off). Returns the bound in force, 0 when unavailable. */
export function setBusyPoll(us: number): number {
  if (!Number.isFinite(us) || us < 0 || us > MAX_BUSY_POLL_US) throw new RangeError(`busy-poll bound ${us} us is outside 0-${MAX_BUSY_POLL_US}`);
  unavailable = undefined;
  const n = native();
  if (typeof n === 'string') {
    if (us > 0) unavailable = n;
    return 0;
  }
  // -1: asked from a worker thread's loop (the addon polls one loop, the first that asked).
  const r = n.busyPoll(Math.round(us * 1000));
  if (r < 0) {
    unavailable = 'busy polling runs on the first event loop that asked for it only';
    return 0;
  }
  return r / 1000;
}

export function busyPollStatus(): BusyPollStatus {
  const s: BusyPollStatus = { maxUs: 0, windowUs: 0, caught: 0, expired: 0, grown: 0, shrunk: 0 };
  const n = native();
  if (typeof n !== 'string') {
    // Leaves zeros while nothing has asked for polling.
    n.busyPollStats(stats);
    s.windowUs = stats[0]! / 1000;
    s.caught = stats[1]!;
    s.expired = stats[2]!;
    s.grown = stats[3]!;
    s.shrunk = stats[4]!;
    s.maxUs = stats[5]! / 1000;
  }
  if (unavailable) s.unavailable = unavailable;
  return s;
}
