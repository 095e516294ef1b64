/**
 * Checkpoints: named bitmaps of the blocks an export's clients changed since
 * each checkpoint was created (`ctl checkpoint create vm1 NAME`). Every write,
 * trim and write-zeroes marks every checkpoint (after the change, before it is
 * acknowledged); nothing ever clears a checkpoint's bits: only deleting it
 * does. The mirror's own bitmap is separate (the copy engine clears that one).
 *
 * Each checkpoint is offered to NBD clients as the metadata context
 * `qemu:dirty-bitmap:NAME` (QEMU's docs/interop/nbd.txt): one flag, bit 0,
 * set where the extent is dirty (changed since the checkpoint).
 *
 * Persistence goes through a CheckpointStore (the export's state folder): the
 * list and each bitmap are stored exactly at a clean shutdown, and the list is
 * stored as "not clean" while the server runs. A store found not clean (the
 * server crashed) gives back checkpoints that over-report: every block dirty,
 * or (with an activity log) the stored bits plus every extent the log names.
 * Never fewer bits than blocks changed.
 *
 * This folder imports nothing of the project (README, Layout): the contexts
 * returned here are structurally the server's MetaContext.
 */
import * as fs from 'node:fs';
import { DirtyBitmap } from './bitmap.js';
import { StateFolder } from './state.js';

/** The metadata context namespace of checkpoints: `qemu:dirty-bitmap:NAME`. */
export const DIRTY_BITMAP_CONTEXT_PREFIX = 'qemu:dirty-bitmap:';
/** The one flag of a qemu:dirty-bitmap context: the extent changed since the checkpoint. */
export const NBD_STATE_DIRTY = 1;
/** Checkpoint names: also file names in the state folder. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** Context ids of checkpoints start here (below are the server's own and the incoming migration's). */
const FIRST_CONTEXT_ID = 0x100;

/** A refusal with an errno-like code (the admin socket answers with it). */
export class CheckpointError extends Error {
  override readonly name = 'CheckpointError';
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** A checkpoint as stored: its bits, one per `granularity` bytes, block 0 in bit 0 of byte 0. */
export interface StoredCheckpoint {
  name: string;
  createdAt: string;
  size: number;
  granularity: number;
  bits: Buffer;
}

export interface StoredCheckpoints {
  /** True when written at a clean shutdown: the bits are exact. */
  clean: boolean;
  /** An activity log kept them crash-safe (attachLog): after a crash, its extents complete the bits. */
  activityLog?: boolean;
  checkpoints: StoredCheckpoint[];
}

/** Where an export's checkpoints persist (the export's state folder). */
export interface CheckpointStore {
  /** What the last run stored, or undefined when nothing was. */
  load(): StoredCheckpoints | undefined;
  /** Stores all of it, atomically (either the old state or the new one survives a crash). */
  save(state: StoredCheckpoints): void;
  /** Where, for messages. */
  readonly where: string;
}

export interface CheckpointInfo {
  name: string;
  /** The metadata context that serves it. */
  context: string;
  createdAt: string;
  granularity: number;
  dirtyBytes: number;
  dirtyBlocks: number;
  /** Restored after an unclean shutdown: its bits over-report. */
  recovered: boolean;
}

/** The extents of a context (structurally the protocol's Extent). */
export interface FlagExtent {
  length: number;
  flags: number;
}

/** A metadata context (structurally the server's MetaContext). */
export interface CheckpointContext {
  readonly id: number;
  readonly name: string;
  extents(offset: number, length: number, max: number): Promise<FlagExtent[]>;
}

export class Checkpoint {
  deleted = false;
  constructor(
    readonly name: string,
    readonly id: number,
    readonly createdAt: string,
    readonly bitmap: DirtyBitmap,
    readonly recovered: boolean,
  ) {}

  get contextName(): string {
    return DIRTY_BITMAP_CONTEXT_PREFIX + this.name;
  }

  info(): CheckpointInfo {
    return {
      name: this.name,
      context: this.contextName,
      createdAt: this.createdAt,
      granularity: this.bitmap.granularity,
      dirtyBytes: this.bitmap.dirtyBytes(),
      dirtyBlocks: this.bitmap.dirtyBlocks(),
      recovered: this.recovered,
    };
  }
}

/**
 * Block status of a bitmap from `offset`: alternating clean (0) and dirty
 * (NBD_STATE_DIRTY) extents covering at most `length` bytes (and never past
 * the end), at most `max` of them, at least one when there is anything to cover.
 */
export function bitmapExtents(bitmap: DirtyBitmap, offset: number, length: number, max: number): FlagExtent[] {
  const g = bitmap.granularity;
  const end = Math.min(offset + length, bitmap.size);
  const out: FlagExtent[] = [];
  let pos = offset;
  while (pos < end && out.length < Math.max(1, max)) {
    const block = Math.floor(pos / g);
    let runEnd: number;
    let flags: number;
    if (bitmap.isDirty(block)) {
      const run = bitmap.nextRun(block, bitmap.blocks - block)!;
      runEnd = (run.block + run.count) * g;
      flags = NBD_STATE_DIRTY;
    } else {
      const next = bitmap.nextRun(block, 1);
      runEnd = next ? next.block * g : bitmap.size;
      flags = 0;
    }
    runEnd = Math.min(runEnd, end);
    out.push({ length: runEnd - pos, flags });
    pos = runEnd;
  }
  return out;
}

/** A bitmap's bits as stored: one bit per block, LSB first (its 32-bit words, little-endian). */
export function encodeBits(bitmap: DirtyBitmap): Buffer {
  const words = bitmap.copyWords();
  const bits = Buffer.alloc(Math.ceil(bitmap.blocks / 8));
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    for (let k = 0; k < 4 && 4 * i + k < bits.length; k++) bits[4 * i + k] = (w >>> (8 * k)) & 0xff;
  }
  return bits;
}

/** Marks into `into` every byte range the stored bits (`granularity` bytes each) cover. */
export function decodeBits(bits: Buffer, granularity: number, into: DirtyBitmap): void {
  if (granularity === into.granularity && bits.length === Math.ceil(into.blocks / 8)) {
    // The same layout: whole words at once.
    const words = new Uint32Array(Math.ceil(into.blocks / 32));
    for (let i = 0; i < bits.length; i++) words[i >>> 2]! |= bits[i]! << (8 * (i & 3));
    return into.orWords(words);
  }
  const blocks = bits.length * 8;
  let b = 0;
  while (b < blocks) {
    if (bits[b >>> 3] === 0 && (b & 7) === 0) {
      b += 8;
      continue;
    }
    if (!(bits[b >>> 3]! & (1 << (b & 7)))) {
      b++;
      continue;
    }
    const start = b;
    while (b < blocks && bits[b >>> 3]! & (1 << (b & 7))) b++;
    into.mark(start * granularity, (b - start) * granularity);
  }
}

export interface CheckpointsOptions {
  size: number;
  granularity: number;
  /** Where they persist; without one they live in memory only. */
  store?: CheckpointStore;
  /**
   * After an unclean shutdown, what an activity log recovered: byte ranges
   * written since the stored state. Without one, every block is taken as changed.
   */
  recoveredRanges?: () => ReadonlyArray<readonly [offset: number, length: number]> | undefined;
  /** Told of what happened (restores, recoveries), as log events. */
  log?: (level: 'info' | 'warn' | 'error', event: string, fields: Record<string, unknown>) => void;
}

/** The checkpoints of one export. */
export class Checkpoints {
  private readonly byName = new Map<string, Checkpoint>();
  private nextId = FIRST_CONTEXT_ID;
  private detach: (() => void) | undefined;
  private logAttached = false;
  /** Marks since the bits were last stored. */
  private unstored = false;
  private readonly log: NonNullable<CheckpointsOptions['log']>;

  constructor(private readonly o: CheckpointsOptions) {
    this.log = o.log ?? (() => undefined);
  }

  /**
   * Restores what the store holds, then records "running" (not clean) before any
   * client can change the image, so a crash from now on is noticed at the next start.
   */
  open(): void {
    const store = this.o.store;
    if (!store) return;
    const stored = store.load();
    if (!stored) return;
    const recovered = stored.clean || !stored.activityLog ? undefined : this.o.recoveredRanges?.();
    for (const s of stored.checkpoints) {
      const bitmap = new DirtyBitmap(this.o.size, this.o.granularity);
      let how: string;
      if (s.size !== this.o.size) {
        bitmap.markAll();
        how = `the image changed size (${s.size} -> ${this.o.size} bytes): every block taken as changed`;
      } else {
        decodeBits(s.bits, s.granularity, bitmap);
        if (stored.clean) how = 'exact';
        else if (recovered) {
          for (const [off, len] of recovered) bitmap.mark(off, len);
          how = `unclean shutdown: stored bits plus the ${recovered.length} extents of the activity log`;
        } else {
          bitmap.markAll();
          how = 'unclean shutdown and no activity log: every block taken as changed';
        }
      }
      const cp = new Checkpoint(s.name, this.nextId++, s.createdAt, bitmap, !stored.clean || s.size !== this.o.size);
      this.byName.set(s.name, cp);
      this.log(cp.recovered ? 'warn' : 'info', 'checkpoint-restored', { checkpoint: s.name, from: store.where, how, dirtyBytes: bitmap.dirtyBytes() });
    }
    this.persist(false);
  }

  /** A client changed [offset, offset + length): every checkpoint marks it. */
  mark(offset: number, length: number): void {
    if (this.byName.size === 0) return;
    for (const cp of this.byName.values()) cp.bitmap.mark(offset, length);
    this.unstored = true;
  }

  get size(): number {
    return this.byName.size;
  }

  create(name: string): CheckpointInfo {
    if (!NAME.test(name))
      throw new CheckpointError('EINVAL', `checkpoint name ${JSON.stringify(name)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`);
    if (this.byName.has(name)) throw new CheckpointError('EEXIST', `checkpoint "${name}" already exists`);
    const cp = new Checkpoint(name, this.nextId++, new Date().toISOString(), new DirtyBitmap(this.o.size, this.o.granularity), false);
    this.byName.set(name, cp);
    try {
      this.persist(false);
    } catch (e) {
      this.byName.delete(name);
      throw new CheckpointError('EIO', `checkpoint "${name}" not created: cannot store it in ${this.o.store?.where}: ${(e as Error).message}`);
    }
    this.log('info', 'checkpoint-created', { checkpoint: name, context: cp.contextName });
    return cp.info();
  }

  delete(name: string): CheckpointInfo {
    const cp = this.get(name);
    this.byName.delete(name);
    cp.deleted = true;
    this.persist(false);
    this.log('info', 'checkpoint-deleted', { checkpoint: name });
    return cp.info();
  }

  get(name: string): Checkpoint {
    const cp = this.byName.get(name);
    if (!cp) throw new CheckpointError('ENOENT', `no checkpoint named "${name}"${this.byName.size ? ` (there are: ${[...this.byName.keys()].join(', ')})` : ''}`);
    return cp;
  }

  list(): CheckpointInfo[] {
    return [...this.byName.values()].map((c) => c.info());
  }

  /** One `qemu:dirty-bitmap:NAME` context per checkpoint, in creation order. */
  contexts(): CheckpointContext[] {
    return [...this.byName.values()].map((cp) => ({
      id: cp.id,
      name: cp.contextName,
      extents: (offset: number, length: number, max: number) => {
        // Deleted while a client had it selected: everything is reported changed, never less.
        if (cp.deleted) return Promise.resolve([{ length: Math.max(0, Math.min(offset + length, this.o.size) - offset), flags: NBD_STATE_DIRTY }]);
        return Promise.resolve(bitmapExtents(cp.bitmap, offset, length, max));
      },
    }));
  }

  /**
   * Crash safety from the export's activity log: at each of its checkpoints the bits
   * are stored (not clean) before extents leave the log, so after a crash the stored
   * bits plus the log's extents cover every change (recoveredRanges reads those).
   */
  attachLog(log: { beforeExtentsLeave(fn: () => void): () => void }): void {
    this.detach?.();
    // Only when something was marked since the bits were last stored (a mirror makes the log checkpoint every 2 s).
    // Synchronous: a store still in flight could otherwise land after a later one (a create, the clean close).
    this.detach = log.beforeExtentsLeave(() => (this.unstored ? this.persist(false) : undefined));
    this.logAttached = true;
    this.persist(false);
  }

  /** A clean shutdown: the exact bits are stored, marked clean. */
  close(): void {
    this.detach?.();
    this.persist(true);
  }

  private persist(clean: boolean): void {
    const store = this.o.store;
    if (!store) return;
    this.unstored = false;
    store.save(this.state(clean));
  }

  private state(clean: boolean): StoredCheckpoints {
    return {
      clean,
      activityLog: this.logAttached,
      checkpoints: [...this.byName.values()].map((cp) => ({
        name: cp.name,
        createdAt: cp.createdAt,
        size: cp.bitmap.size,
        granularity: cp.bitmap.granularity,
        bits: encodeBits(cp.bitmap),
      })),
    };
  }
}

// ---- the file store: one folder, a manifest and one bits file per checkpoint

const MANIFEST = 'checkpoints.json';
const bitsFile = (name: string) => `checkpoint.${name}.bits`;

function manifestOf(state: StoredCheckpoints): string {
  const m: Manifest = {
    version: 1,
    clean: state.clean,
    activityLog: state.activityLog === true,
    checkpoints: state.checkpoints.map((c) => ({ name: c.name, createdAt: c.createdAt, size: c.size, granularity: c.granularity, file: bitsFile(c.name) })),
  };
  return JSON.stringify(m, null, 2) + '\n';
}

interface Manifest {
  version: 1;
  clean: boolean;
  activityLog?: boolean;
  checkpoints: { name: string; createdAt: string; size: number; granularity: number; file: string }[];
}

/**
 * Checkpoints in the export's state folder (state.ts): `checkpoints.json` lists
 * them, `checkpoint.NAME.bits` holds each one's bits, every file replaced
 * atomically. The folder is created on the first save that has something to store.
 */
export class FileCheckpointStore implements CheckpointStore {
  private folder: StateFolder | undefined;

  constructor(readonly dir: string) {}

  get where(): string {
    return this.dir;
  }

  load(): StoredCheckpoints | undefined {
    if (!fs.existsSync(this.dir)) return undefined;
    const folder = (this.folder ??= StateFolder.open(this.dir));
    const m = folder.readJson<Manifest>(MANIFEST);
    if (!m) return undefined;
    return {
      clean: m.clean === true,
      activityLog: m.activityLog === true,
      checkpoints: m.checkpoints.map((c) => {
        const bits = folder.read(c.file);
        if (!bits) throw new Error(`${folder.file(c.file)} (checkpoint "${c.name}") is missing`);
        return { ...c, bits };
      }),
    };
  }

  save(state: StoredCheckpoints): void {
    const folder = this.folderFor(state);
    if (!folder) return;
    // Bits first, then the manifest that names them: a crash in between leaves the old manifest (and unused bits).
    for (const c of state.checkpoints) folder.writeAtomic(bitsFile(c.name), c.bits);
    folder.writeAtomic(MANIFEST, manifestOf(state));
    this.removeStale(folder, state);
  }

  /** The folder to write into; undefined when there is nothing to store and nothing stored. */
  private folderFor(state: StoredCheckpoints): StateFolder | undefined {
    if (!this.folder) {
      if (state.checkpoints.length === 0 && !fs.existsSync(this.dir)) return undefined;
      this.folder = StateFolder.open(this.dir);
    }
    if (state.checkpoints.length === 0 && this.folder.read(MANIFEST) === undefined) return undefined;
    return this.folder;
  }

  private removeStale(folder: StateFolder, state: StoredCheckpoints): void {
    const keep = new Set(state.checkpoints.map((c) => bitsFile(c.name)));
    for (const f of folder.list()) if (f.startsWith('checkpoint.') && f.endsWith('.bits') && !keep.has(f)) folder.remove(f);
  }
}
