/** Sizes and durations as operators write them: "200M" (binary units, as qemu-img), "50ms", "2s". */

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

export function parseSize(v: unknown, what = 'size'): number {
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return v;
  const m = typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?(?:\/s)?\s*$/i.exec(v) : null;
  if (!m) throw new RangeError(`${what}: expected a number with an optional K/M/G/T suffix, got ${JSON.stringify(v)}`);
  return Math.round(Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!);
}

export function parseDurationMs(v: unknown, what = 'duration'): number {
  if (typeof v === 'number' && Number.isFinite(v) && v >= 0) return v;
  const m = typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(v) : null;
  if (!m) throw new RangeError(`${what}: expected e.g. 50ms, 2s or 1m, got ${JSON.stringify(v)}`);
  const n = Number(m[1]);
  return m[2] === 's' ? n * 1000 : m[2] === 'm' ? n * 60_000 : n;
}

/**
 * "1.5 GiB", "512.0 MiB". `compact` (the bench's tables): whole numbers
 * without decimals, 100 and more without a fraction, negative numbers scaled
 * too ("1 GiB", "4.5 MiB", "123 MiB", "-1.5 MiB").
 */
export function formatBytes(n: number, opts: { compact?: boolean } = {}): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while ((opts.compact ? Math.abs(v) : v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (opts.compact) return `${Number.isInteger(v) ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}
