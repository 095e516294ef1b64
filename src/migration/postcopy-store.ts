/**
 * A post-copy destination's state, in the export's state folder (default
 * IMAGE.nbd-migrate.d/):
 * - postcopy.json: the source's URI and identity, since, completedAt;
 * - present-map: the absent blocks, written atomically (tmp, fsync, rename,
 *   fsync the folder) only after the image itself was made durable, so it
 *   never claims a block present whose data could still be lost.
 * A restart continues from the map; a completed destination serves as a
 * normal export and never asks the source again.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import { StateFolder } from '../dirty/state.js';

export interface PostcopyState {
  export: string;
  source: string;
  /** The source export's identity at the first connection (null: a server that has none, qemu-nbd, nbdkit). */
  sourceExportId: string | null;
  /** This destination's export identity (kept across restarts). */
  exportId: string;
  size: number;
  granularity: number;
  since: string;
  /** The supplier's dirty list (hybrid) was applied: never again (later guest writes would be undone). */
  dirtyAppliedAt?: string;
  completedAt?: string;
}

/** The state folder when none is named (an image file's: beside it; serve passes the export's, as src/dirty/state.ts places it). */
export const defaultStateDir = (image: string): string => `${path.resolve(image)}.nbd-migrate.d`;

const MAGIC = Buffer.from('NBDMABS1');

/** The post-copy files of one export, in its state folder (src/dirty/state.ts: every write atomic and durable). */
export class PostcopyStore {
  private opened: StateFolder | undefined;
  constructor(readonly dir: string) {}

  /** The folder, created on first write (a check that only reads creates nothing). */
  private get folder(): StateFolder {
    return (this.opened ??= StateFolder.open(this.dir));
  }

  private read(name: string): Buffer | undefined {
    if (!this.opened && !fs.existsSync(this.dir)) return undefined;
    return this.folder.read(name);
  }

  readState(): PostcopyState | undefined {
    const b = this.read(STATE_FILE);
    if (!b) return undefined;
    try {
      return JSON.parse(b.toString('utf8')) as PostcopyState;
    } catch (e) {
      throw new Error(`${path.join(this.dir, STATE_FILE)} is unreadable (${(e as Error).message}); the destination's post-copy state cannot be trusted`, { cause: e });
    }
  }

  writeState(s: PostcopyState): void {
    this.folder.writeAtomic(STATE_FILE, JSON.stringify(s) + '\n');
  }

  /** Sets `absent` from the saved map; false when there is none (everything is absent then). */
  loadAbsent(absent: DirtyBitmap): boolean {
    const buf = this.read(MAP_FILE);
    if (!buf) return false;
    if (buf.length < 32 || !buf.subarray(0, 8).equals(MAGIC) || (buf.length - 8) % 8 !== 0)
      throw new Error(`${path.join(this.dir, MAP_FILE)} is not a present-map`);
    const f = new Float64Array(buf.buffer.slice(buf.byteOffset + 8, buf.byteOffset + buf.length));
    const [size, granularity, runs] = [f[0]!, f[1]!, f[2]!];
    if (size !== absent.size || granularity !== absent.granularity || f.length !== 3 + 2 * runs)
      throw new Error(`${path.join(this.dir, MAP_FILE)} is for ${size} bytes at ${granularity} per block, not ${absent.size} at ${absent.granularity}`);
    absent.clearAll();
    for (let i = 0; i < runs; i++) absent.markBlocks(f[3 + 2 * i]!, f[4 + 2 * i]!);
    return true;
  }

  /** The map as it is now (absent runs), to save after the image is durable. */
  static snapshot(absent: DirtyBitmap): Buffer {
    const runs: number[] = [];
    for (let b = 0; ; ) {
      const r = absent.nextRun(b, absent.blocks);
      if (!r) break;
      runs.push(r.block, r.count);
      b = r.block + r.count;
    }
    const f = new Float64Array(3 + runs.length);
    f[0] = absent.size;
    f[1] = absent.granularity;
    f[2] = runs.length / 2;
    f.set(runs, 3);
    return Buffer.concat([MAGIC, Buffer.from(f.buffer)]);
  }

  saveMap(snapshot: Buffer): Promise<void> {
    return this.folder.writeAtomicAsync(MAP_FILE, snapshot);
  }
}

const STATE_FILE = 'postcopy.json';
const MAP_FILE = 'present-map';

/**
 * Why an export may not be served as configured (undefined: it may): a
 * half-filled post-copy destination served without --fetch-from would show
 * zeros where the source still holds the data.
 */
export function postcopyRefusal(e: { name: string; path: string; fetchFrom?: string; incoming?: boolean; readOnly: boolean }, force: boolean, stateDir = defaultStateDir(e.path)): string | undefined {
  if (e.fetchFrom && e.incoming) return `export "${e.name}": --fetch-from and --incoming exclude each other (post-copy pulls, pre-copy is pushed)`;
  if (e.fetchFrom && e.readOnly) return `export "${e.name}": --fetch-from needs a writable image (fetched blocks are written into it)`;
  if (e.fetchFrom || force) return undefined;
  let st: PostcopyState | undefined;
  try {
    st = new PostcopyStore(stateDir).readState();
  } catch (err) {
    return `export "${e.name}": ${(err as Error).message}`;
  }
  if (st && !st.completedAt)
    return (
      `export "${e.name}": ${e.path} is a post-copy destination still filling from ${st.source}; ` +
      `serve it with --fetch-from ${st.source} to go on (without it the blocks not yet fetched would read as zeros), or --force`
    );
  return undefined;
}
