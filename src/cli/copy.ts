/**
 * `nbd-migrate copy SRC DST`: the mirror's copy engine with no guest. Either
 * side is an NBD URI or a raw image file; holes are not copied (they become
 * WRITE_ZEROES, or nothing where the destination already reads as zero).
 */
import * as fs from 'node:fs';
import { DirtyBitmap } from '../dirty/bitmap.js';
import { connectPlain } from '../migration/connector.js';
import { copySweep, DEFAULT_COPY_OPTIONS, newCopyStats } from '../migration/copy.js';
import { TokenBucket } from '../util/token-bucket.js';
import type { Device } from '../storage/device.js';
import { FileDevice } from '../storage/file-device.js';
import { formatBytes } from '../util/units.js';
import { ProgressBar } from './progress.js';

const isUri = (s: string) => /^nbd(\+unix)?:\/\//.test(s) || /^nbds/.test(s);

async function open(spec: string, readOnly: boolean, createSize?: number): Promise<Device> {
  if (isUri(spec)) return connectPlain(spec);
  if (createSize !== undefined && !fs.existsSync(spec)) {
    const fd = fs.openSync(spec, 'wx');
    fs.ftruncateSync(fd, createSize);
    fs.closeSync(fd);
  }
  return FileDevice.open(spec, { readOnly });
}

export async function copyCommand(src: string, dst: string, opts: { maxBandwidth?: number; progress: boolean }): Promise<void> {
  const source = await open(src, true);
  let target: Device | undefined;
  try {
    target = await open(dst, false, source.size);
    if (target.size < source.size) throw new Error(`destination is smaller than the source (${target.size} < ${source.size} bytes)`);
    if (!target.capabilities().canWrite) throw new Error(`destination ${dst} is read-only`);
    const bitmap = new DirtyBitmap(source.size, DEFAULT_COPY_OPTIONS.chunkBytes);
    bitmap.markAll();
    const stats = newCopyStats();
    const bar = opts.progress ? new ProgressBar() : undefined;
    const t0 = performance.now();
    const timer = bar
      ? setInterval(() => {
          const done = stats.dataBytes + stats.zeroBytes + stats.skippedBytes;
          const secs = (performance.now() - t0) / 1000;
          const rate = secs > 0 ? done / secs : 0;
          bar.draw({ done, total: source.size, rate, etaSeconds: rate > 0 ? (source.size - done) / rate : null });
        }, 250)
      : undefined;
    try {
      await copySweep(source, target, bitmap, {
        ...DEFAULT_COPY_OPTIONS,
        limiter: opts.maxBandwidth ? new TokenBucket(opts.maxBandwidth) : undefined,
        skipTargetZeros: true,
      }, stats);
      await target.flush();
    } finally {
      if (timer) clearInterval(timer);
    }
    const secs = (performance.now() - t0) / 1000;
    bar?.end(
      `copied ${formatBytes(stats.dataBytes)} of data, zeroed ${formatBytes(stats.zeroBytes)}, skipped ${formatBytes(stats.skippedBytes)} ` +
        `in ${secs.toFixed(2)} s`,
    );
  } finally {
    await target?.close().catch(() => undefined);
    await source.close().catch(() => undefined);
  }
}
