// Host-side twins of the guest's workload helpers (rootfs/lib/nbdm.sh): the
// same position-tagged sector pattern, and checksums of image regions.

import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { describeRun, run } from '../helpers/tools.js';

export const SECTOR = 512;
/** The guest's dd helpers move 64 KiB blocks: regions are multiples of this many sectors. */
export const SECTORS_PER_BLOCK = 128;

/**
 * `pattern TAG FIRST COUNT` of nbdm.sh: COUNT sectors; sector n (counted from
 * the start of the disk) is "TAG sector n" padded with spaces to 511 bytes,
 * then "\n".
 */
export function patternSectors(tag: string, first: number, count: number): Buffer {
  const buf = Buffer.alloc(count * SECTOR);
  for (let i = 0; i < count; i++) {
    const text = `${tag} sector ${first + i}`;
    if (text.length > SECTOR - 1) throw new Error(`tag too long: ${tag}`);
    buf.write(text.padEnd(SECTOR - 1, ' ') + '\n', i * SECTOR, 'latin1');
  }
  return buf;
}

export function md5(buf: Buffer): string {
  return createHash('md5').update(buf).digest('hex');
}

/** md5 of `length` bytes at `offset` of a file (short at end of file). */
export async function fileMd5(path: string, offset: number, length: number): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const h = createHash('md5');
    const chunk = Buffer.alloc(1024 * 1024);
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const { bytesRead } = await fh.read(chunk, 0, Math.min(chunk.length, end - pos), pos);
      if (bytesRead === 0) break;
      h.update(chunk.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return h.digest('hex');
  } finally {
    await fh.close();
  }
}

/** The first sector of a file region whose bytes differ from `expected`, for messages. */
export async function firstBadSector(path: string, offset: number, expected: Buffer): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const got = Buffer.alloc(expected.length);
    await fh.read(got, 0, got.length, offset);
    for (let s = 0; s < expected.length; s += SECTOR) {
      const a = got.subarray(s, s + SECTOR);
      if (!a.equals(expected.subarray(s, s + SECTOR))) {
        const text = a.toString('latin1').replace(/[^\x20-\x7e]/g, '.').trimEnd();
        return `sector ${(offset + s) / SECTOR}: ${JSON.stringify(text.slice(0, 80))}`;
      }
    }
    return 'none';
  } finally {
    await fh.close();
  }
}

/** Quote a value for a POSIX shell script. */
export function shq(s: string | number): string {
  const v = String(s);
  return /^[\w@%+=:,./-]+$/.test(v) ? v : `'${v.replace(/'/g, `'\\''`)}'`;
}

/** A tag unique to this run, so that data left by an earlier run can never pass for this one's. */
export function runTag(prefix: string): string {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}`;
}

export interface MapExtent {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/**
 * `qemu-img map --output=json -f raw -U IMG` of a raw file (SEEK_DATA/SEEK_HOLE
 * on the host), adjacent extents of the same kind merged. -U: the image is
 * open in the server meanwhile.
 */
export async function qemuImgMap(qemuImg: string, img: string): Promise<MapExtent[]> {
  const r = await run(qemuImg, ['map', '--output=json', '-f', 'raw', '-U', img], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`qemu-img map failed: ${describeRun(r)}`);
  const out: MapExtent[] = [];
  for (const e of JSON.parse(r.stdout) as MapExtent[]) {
    const last = out[out.length - 1];
    if (last && last.data === e.data && last.zero === e.zero && last.start + last.length === e.start) last.length += e.length;
    else out.push({ start: e.start, length: e.length, data: e.data, zero: e.zero });
  }
  return out;
}

/** The extents of `map` that overlap [start, start+length), clipped to it. */
export function extentsIn(map: MapExtent[], start: number, length: number): MapExtent[] {
  const end = start + length;
  return map
    .filter((e) => e.start < end && e.start + e.length > start)
    .map((e) => {
      const s = Math.max(e.start, start);
      return { ...e, start: s, length: Math.min(e.start + e.length, end) - s };
    });
}
