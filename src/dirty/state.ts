/**
 * The state folder: one per export, holding what must outlive the process
 * (the stored dirty bitmap, the activity log, the mirror job's record, and
 * whatever else other parts keep per export, e.g. checkpoints).
 *
 * Where it is:
 * - an image file: `IMAGE.nbd-migrate.d/` beside the image;
 * - a block device: `/var/lib/nbd-migrate/<export name>/` (a folder beside
 *   /dev/sdX would be on devtmpfs and vanish at reboot);
 * - `--state-dir DIR` (config `"stateDir"`) names it for an export instead.
 *
 * Every whole-file write is atomic and durable: write a temporary file in the
 * folder, fsync it, rename it over the old one, fsync the folder. A reader
 * therefore sees the old content or the new, never a mix, even after a crash.
 * Files that are rewritten in place (the activity log's slots) open their own
 * descriptor with `openFd`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sparseOps } from '../storage/native.js';

/** The folder's lock file: held (flock, exclusive) by the one export that owns the folder. */
export const LOCK_FILE = 'lock';

/** Another owner holds the state folder's lock (another server, or this one's export still being retired). */
export class StateFolderInUse extends Error {
  readonly code = 'EWOULDBLOCK';
  constructor(
    readonly dir: string,
    /** What the holder wrote into the lock file: `pid PID OWNER`. */
    readonly holder: string | undefined,
    /** The pid the holder wrote, if it did. */
    readonly pid: number | undefined,
  ) {
    super(`state folder ${dir} is in use by ${holder ? holder : 'another process'}`);
  }
}

/**
 * Takes the state folder's lock, so that two exports (two servers, or a reload's
 * new export while the old one of that name still drains) never keep their
 * activity logs, bitmaps and records in one folder at once: an exclusive flock
 * on `DIR/lock`, not waiting. flock belongs to the open file description, so a
 * second open in this same process conflicts as another process's does; the
 * kernel drops it when the process dies (a crash leaves no stale lock). Writes
 * `pid PID OWNER` into the file for the refusal's message. Throws
 * StateFolderInUse when it is held. Returns the release.
 */
export function lockStateFolder(dir: string, owner: string): () => void {
  const folder = StateFolder.open(dir);
  const file = folder.file(LOCK_FILE);
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  const ops = sparseOps().ops;
  try {
    ops.lock(fd, file, true);
  } catch (e) {
    fs.closeSync(fd);
    if ((e as { code?: string }).code !== 'EWOULDBLOCK') throw e;
    let holder: string | undefined;
    try {
      holder = fs.readFileSync(file, 'utf8').trim() || undefined;
    } catch {
      /* unreadable: say "another process" */
    }
    const pid = Number(/^pid (\d+)/.exec(holder ?? '')?.[1]);
    throw new StateFolderInUse(folder.dir, holder, Number.isInteger(pid) ? pid : undefined);
  }
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, `pid ${process.pid} ${owner}\n`, 0);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    ops.unlock(file);
    fs.closeSync(fd);
  };
}

/** Where an export's state folder is when nothing names it. */
export function defaultStateDir(image: string, exportName: string, isBlockDevice: boolean): string {
  if (isBlockDevice) return path.join('/var/lib/nbd-migrate', exportName.replace(/[/\0]/g, '_') || '_');
  return `${path.resolve(image)}.nbd-migrate.d`;
}

/** Makes a create, rename or unlink in `dir` durable. */
export function syncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function syncDirAsync(dir: string): Promise<void> {
  const h = await fs.promises.open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** File names inside the folder: plain names only (no separators, no dot files). */
function checkName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._:-]*$/.test(name) || name.includes('..')) throw new RangeError(`bad state file name "${name}"`);
}

let tmpSeq = 0;

export class StateFolder {
  private constructor(readonly dir: string) {}

  /** Opens the folder, creating it (mode 0700) and making its creation durable. */
  static open(dir: string): StateFolder {
    const abs = path.resolve(dir);
    if (!fs.existsSync(abs)) {
      fs.mkdirSync(abs, { recursive: true, mode: 0o700 });
      syncDir(path.dirname(abs));
    } else if (!fs.statSync(abs).isDirectory()) throw new Error(`state folder ${abs} exists and is not a directory`);
    return new StateFolder(abs);
  }

  /** The absolute path of file `name` in the folder. */
  file(name: string): string {
    checkName(name);
    return path.join(this.dir, name);
  }

  /** The file's bytes, or undefined when it does not exist. */
  read(name: string): Buffer | undefined {
    try {
      return fs.readFileSync(this.file(name));
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return undefined;
      throw e;
    }
  }

  /** The file parsed as JSON; undefined when missing. Throws (naming the file) when it does not parse. */
  readJson<T>(name: string): T | undefined {
    const b = this.read(name);
    if (b === undefined) return undefined;
    try {
      return JSON.parse(b.toString('utf8')) as T;
    } catch (e) {
      throw new Error(`state file ${this.file(name)} is not valid JSON: ${(e as Error).message}`, { cause: e });
    }
  }

  private tmpName(name: string): string {
    return path.join(this.dir, `.${name}.tmp${process.pid}.${tmpSeq++}`);
  }

  /** Replaces file `name` atomically and durably (write tmp, fsync, rename, fsync the folder). Blocks. */
  writeAtomic(name: string, data: Buffer | string): void {
    const file = this.file(name);
    const tmp = this.tmpName(name);
    try {
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        fs.writeFileSync(fd, data);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, file);
    } catch (e) {
      fs.rmSync(tmp, { force: true });
      throw e;
    }
    syncDir(this.dir);
  }

  /** The same as writeAtomic, on the thread pool (the event loop keeps serving meanwhile). */
  async writeAtomicAsync(name: string, data: Buffer | string): Promise<void> {
    const file = this.file(name);
    const tmp = this.tmpName(name);
    try {
      const h = await fs.promises.open(tmp, 'w', 0o600);
      try {
        await h.writeFile(data);
        await h.sync();
      } finally {
        await h.close();
      }
      await fs.promises.rename(tmp, file);
    } catch (e) {
      await fs.promises.rm(tmp, { force: true });
      throw e;
    }
    await syncDirAsync(this.dir);
  }

  writeJson(name: string, value: unknown): void {
    this.writeAtomic(name, JSON.stringify(value) + '\n');
  }

  /** Removes file `name` (if present), durably. */
  remove(name: string): void {
    const file = this.file(name);
    if (!fs.existsSync(file)) return;
    fs.rmSync(file, { force: true });
    syncDir(this.dir);
  }

  /** Opens (creating) a file to rewrite in place, for files with their own crash rules (the activity log). */
  openFd(name: string): number {
    const file = this.file(name);
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    if (!existed) syncDir(this.dir);
    return fd;
  }

  /** Names of the files in the folder (temporary files left by a crash excluded). */
  list(): string[] {
    return fs.readdirSync(this.dir).filter((n) => !n.startsWith('.'));
  }
}
