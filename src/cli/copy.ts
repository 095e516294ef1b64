/**
 * `nbd-migrate copy SRC DST`: the mirror's copy engine with no guest. Either
 * side is an NBD URI or a raw image file; holes are not copied (they become
 * WRITE_ZEROES, or nothing where the destination already reads as zero).
 */
import * as fs from 'node:fs';
import type { InferredOptionTypes } from 'yargs';
import { DirtyBitmap } from '../dirty/bitmap.js';
import { DIRTY_BITMAP_CONTEXT_PREFIX, NBD_STATE_DIRTY } from '../dirty/checkpoints.js';
import type { NbdClient } from '../client/nbd-client.js';
import { BASE_ALLOCATION } from '../protocol/constants.js';
import { connectPlain } from '../migration/connector.js';
import { connectMulti } from '../client/multi-conn.js';
import { log } from '../util/log.js';
import { copySweep, DEFAULT_COPY_OPTIONS, newCopyStats } from '../migration/copy.js';
import { TokenBucket } from '../util/token-bucket.js';
import type { Device } from '../storage/device.js';
import { FileDevice } from '../storage/file-device.js';
import { formatBytes, parseSize } from '../util/units.js';
import { ProgressBar } from './progress.js';

const isUri = (s: string) => /^nbd(\+unix)?:\/\//.test(s) || /^nbds/.test(s);

/** Connections to each NBD side by default (nbdcopy's default is 4, at most one per core). */
export const DEFAULT_CONNECTIONS = 4;
/** More would only cost the server sockets and handshakes. */
export const MAX_CONNECTIONS = 16;

async function open(spec: string, readOnly: boolean, connections: number, createSize?: number): Promise<Device> {
  // Several connections only where the server advertises multi-conn (multi-conn.ts); replies
  // acknowledged at once (quickack.ts: qemu-nbd sets no TCP_NODELAY, its last replies and the
  // flush's would wait for our delayed ACK).
  // The destination is only written: simple replies, no block status, so its handshake is
  // GO alone (two round trips fewer; across a WAN 2 x 80 ms). Its holes are then zeroed
  // rather than asked about, which costs a sparse target next to nothing (bench/README.md).
  const writeOnly = readOnly ? {} : { structuredReplies: false, metaContexts: [] };
  if (isUri(spec)) return connectMulti(spec, { connections, quickAck: true, ...writeOnly, log: (event, fields) => log(event === 'multi-conn-joined' ? 'debug' : 'warn', event, { uri: spec, ...fields }) });
  if (createSize !== undefined && !fs.existsSync(spec)) {
    const fd = fs.openSync(spec, 'wx');
    fs.ftruncateSync(fd, createSize);
    fs.closeSync(fd);
  }
  return FileDevice.open(spec, { readOnly });
}

/**
 * --changed-since NAME: the source (an NBD server: nbd-migrate with checkpoint NAME, or
 * qemu-nbd -B NAME) must agree to `qemu:dirty-bitmap:NAME`; otherwise nothing is copied.
 */
async function openChanged(src: string, name: string): Promise<NbdClient> {
  if (!isUri(src)) throw new Error(`--changed-since needs an NBD source (nbd://HOST/EXPORT): ${src} is a file, which keeps no dirty bitmap`);
  const context = DIRTY_BITMAP_CONTEXT_PREFIX + name;
  const c = await connectPlain(src, { metaContexts: [BASE_ALLOCATION, context], listMetaContexts: [DIRTY_BITMAP_CONTEXT_PREFIX], quickAck: true });
  if (c.contexts.has(context)) return c;
  const offered = c.listedContexts.filter((n) => n.startsWith(DIRTY_BITMAP_CONTEXT_PREFIX)).map((n) => n.slice(DIRTY_BITMAP_CONTEXT_PREFIX.length));
  await c.close().catch(() => undefined);
  throw new Error(
    `${src} does not offer ${context} (${offered.length ? `it offers: ${offered.join(', ')}` : 'it offers no dirty bitmaps'}); ` +
      `create it with 'nbd-migrate ctl checkpoint create EXPORT ${name}' (qemu-nbd: -B ${name})`,
  );
}

/**
 * The ranges the source reports dirty in `context`, as a bitmap. Its granularity is the
 * coarsest (up to 64 KiB, at least 512 bytes) that every range boundary falls on, so
 * nothing clean is copied beyond what the source's own granularity forces.
 */
async function changedBitmap(source: NbdClient, context: string): Promise<{ bitmap: DirtyBitmap; ranges: number }> {
  const size = source.size;
  const runs: [number, number][] = [];
  for (let pos = 0; pos < size; ) {
    for (const e of await source.contextExtents(context, pos, size - pos, 1024)) {
      const last = runs[runs.length - 1];
      if (e.flags & NBD_STATE_DIRTY) {
        if (last && last[0] + last[1] === pos) last[1] += e.length;
        else runs.push([pos, e.length]);
      }
      pos += e.length;
    }
  }
  let granularity = 64 * 1024;
  for (const [o, l] of runs) for (const at of [o, o + l]) while (granularity > 512 && at !== size && at % granularity !== 0) granularity /= 2;
  const bitmap = new DirtyBitmap(size, granularity);
  for (const [o, l] of runs) bitmap.mark(o, l);
  return { bitmap, ranges: runs.length };
}

/**
 * copy's options, declared once for both of its parsers: main.ts (yargs; it adds the
 * --connections check) and copy-fast.ts (a plain copy, without yargs). `type` says
 * which take a value (string, number) and which are flags (boolean).
 */
export const COPY_OPTIONS = {
  'max-bandwidth': { type: 'string', describe: 'Rate limit, e.g. 200M' },
  progress: { type: 'boolean', default: true, describe: 'Draw a progress bar on stderr' },
  'changed-since': {
    type: 'string',
    describe: 'Copy only the ranges SRC reports dirty in its qemu:dirty-bitmap:NAME (an nbd-migrate checkpoint, or qemu-nbd -B NAME)',
  },
  json: { type: 'boolean', default: false, describe: 'Print the figures (bytes copied, zeroed, skipped, changed) as one JSON line on stdout' },
  connections: {
    type: 'number',
    describe: `Connections to each NBD side at most, used only where the server advertises multi-conn (default ${DEFAULT_CONNECTIONS})`,
  },
} as const;

/** copy's options as parsed (either parser), by their command-line names. */
export type CopyArgs = Partial<InferredOptionTypes<typeof COPY_OPTIONS>>;

/** What copyCommand takes, from the parsed options (sizes parsed here; throws naming a bad one). */
export function copyOptionsFrom(a: CopyArgs): CopyCommandOptions {
  return {
    maxBandwidth: a['max-bandwidth'] ? parseSize(a['max-bandwidth'], '--max-bandwidth') : undefined,
    progress: a.progress ?? COPY_OPTIONS.progress.default,
    changedSince: a['changed-since'],
    json: a.json ?? COPY_OPTIONS.json.default,
    connections: a.connections,
  };
}

export interface CopyCommandOptions {
  maxBandwidth?: number;
  progress: boolean;
  /** Copy only what the source reports dirty in qemu:dirty-bitmap:NAME. */
  changedSince?: string;
  /** Print the figures as one JSON line on stdout. */
  json?: boolean;
  /** Connections to each NBD side at most, used where the server advertises multi-conn (default DEFAULT_CONNECTIONS). */
  connections?: number;
}

export async function copyCommand(src: string, dst: string, opts: CopyCommandOptions): Promise<void> {
  const connections = opts.connections ?? DEFAULT_CONNECTIONS;
  if (!(Number.isInteger(connections) && connections >= 1 && connections <= MAX_CONNECTIONS))
    throw new Error(`--connections: expected 1 to ${MAX_CONNECTIONS}, got ${connections}`);
  const openSource = (): Promise<Device> => (opts.changedSince !== undefined ? openChanged(src, opts.changedSince) : open(src, true, connections));
  let source: Device;
  let target: Device | undefined;
  if (isUri(dst)) {
    // Both handshakes at once: across a WAN each is several round trips. (A file destination
    // waits for the source: it is created with the source's size.)
    const [s, d] = await Promise.allSettled([openSource(), open(dst, false, connections)]);
    if (s.status === 'rejected' || d.status === 'rejected') {
      for (const x of [s, d]) if (x.status === 'fulfilled') await x.value.close().catch(() => undefined);
      throw s.status === 'rejected' ? s.reason : (d as PromiseRejectedResult).reason;
    }
    source = s.value;
    target = d.value;
  } else source = await openSource();
  try {
    target ??= await open(dst, false, connections, source.size);
    if (target.size < source.size) throw new Error(`destination is smaller than the source (${target.size} < ${source.size} bytes)`);
    if (!target.capabilities().canWrite) throw new Error(`destination ${dst} is read-only`);
    let bitmap: DirtyBitmap;
    let ranges: number | undefined;
    if (opts.changedSince !== undefined) {
      ({ bitmap, ranges } = await changedBitmap(source as NbdClient, DIRTY_BITMAP_CONTEXT_PREFIX + opts.changedSince));
    } else {
      bitmap = new DirtyBitmap(source.size, DEFAULT_COPY_OPTIONS.chunkBytes);
      bitmap.markAll();
    }
    const total = bitmap.dirtyBytes();
    const stats = newCopyStats();
    const bar = opts.progress ? new ProgressBar() : undefined;
    const t0 = performance.now();
    const timer = bar
      ? setInterval(() => {
          const done = stats.dataBytes + stats.zeroBytes + stats.skippedBytes;
          const secs = (performance.now() - t0) / 1000;
          const rate = secs > 0 ? done / secs : 0;
          bar.draw({ done, total, rate, etaSeconds: rate > 0 ? (total - done) / rate : null });
        }, 250)
      : undefined;
    try {
      await copySweep(source, target, bitmap, {
        ...DEFAULT_COPY_OPTIONS,
        limiter: opts.maxBandwidth ? new TokenBucket(opts.maxBandwidth) : undefined,
        // Only a target that reports its holes (a file; an NBD target is not asked) has holes to skip.
        skipTargetZeros: target.capabilities().canExtents,
        // A cold copy: nothing else writes either side meanwhile, so hole claims are reused (copy.ts).
        exclusive: opts.changedSince === undefined,
      }, stats);
      await target.flush();
    } finally {
      if (timer) clearInterval(timer);
    }
    const secs = (performance.now() - t0) / 1000;
    bar?.end(
      (ranges !== undefined ? `${formatBytes(total)} changed since ${opts.changedSince} in ${ranges} range(s): ` : '') +
        `copied ${formatBytes(stats.dataBytes)} of data, zeroed ${formatBytes(stats.zeroBytes)}, skipped ${formatBytes(stats.skippedBytes)} ` +
        `in ${secs.toFixed(2)} s`,
    );
    if (opts.json)
      process.stdout.write(
        JSON.stringify({ size: source.size, changedBytes: total, ranges: ranges ?? null, granularity: bitmap.granularity, ...stats, seconds: secs }) + '\n',
      );
  } finally {
    await target?.close().catch(() => undefined);
    await source.close().catch(() => undefined);
  }
}
