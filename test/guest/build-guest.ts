// Builds the tiny Linux guest the QEMU guest tests boot, once, and caches it
// outside the repository.
//
// The guest is:
//   - the kernel of Debian's `linux-image-*-cloud-amd64` (the package that
//     `linux-image-cloud-amd64` depends on), fetched with `apt-get download`
//     and unpacked with `dpkg-deb -x` into a scratch directory, never installed;
//   - its virtio modules (virtio_ring, virtio, virtio_pci_legacy_dev,
//     virtio_pci_modern_dev, virtio_pci, virtio_blk: all `=m` in that kernel),
//     stored uncompressed because busybox insmod may not read .ko.xz/.ko.zst;
//     and what an ext4 root filesystem needs (ext4, jbd2, mbcache, crc16,
//     crc32c_generic), which that kernel builds in, so nothing more is loaded;
//   - busybox from `busybox-static`, and the /init and /lib/nbdm.sh found in
//     test/guest/rootfs/.
//
// NBDM_GUEST_KERNEL_PACKAGE=linux-image-... picks another kernel package.
//
// Cache layout ($NBDM_GUEST_CACHE, else $XDG_CACHE_HOME/nbd-migrate-guest,
// else ~/.cache/nbd-migrate-guest):
//   <kernel release>_<package version>/vmlinuz, modules/*.ko, kernel.json
//   <kernel release>_<package version>/initrd-<hash>.cpio
// The kernel directory is keyed by kernel version; an initramfs by the hash of
// everything in it (busybox, modules, init scripts), so editing rootfs/
// rebuilds only the (sub-second) cpio. A later run reuses both; if apt knows
// no cloud kernel or the download fails (offline), the newest cached kernel
// is used. A newly fetched kernel replaces the older ones; initramfs files
// unused for a week are removed. Builds take a lock (<root>/.lock), as two
// test files may want the guest at once.
//
// The cpio archives are written by the small newc writer below rather than
// `cpio -o -H newc`: it needs no staging tree, so /dev/console (a character
// device, which the kernel opens as init's stdin/stdout before devtmpfs is
// mounted) goes in without mknod and thus without root, the output is
// byte-for-byte reproducible (mtime 0, fixed inode numbers), and the tests do
// not depend on the `cpio` package.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { describeRun, ensure, requireTool, run, runOk, which } from '../helpers/tools.js';

const HERE = dirname(fileURLToPath(import.meta.url));
/** The guest's /init and /lib/nbdm.sh. */
export const ROOTFS_DIR = join(HERE, 'rootfs');

/** Bumped whenever the layout of the initramfs changes in a way the hash does not see. */
const INITRD_FORMAT = 1;

/** The meta-package whose dependency names the current cloud kernel. */
const KERNEL_META_PACKAGE = 'linux-image-cloud-amd64';

/**
 * Loaded in this order by /init (each depends only on those before it). The
 * last five are what mounting an ext4 root filesystem needs (a guest booted
 * with `rootImage`, see root-image.ts); the cloud kernel builds them in
 * (CONFIG_EXT4_FS=y, JBD2, FS_MBCACHE, CRC16, CRYPTO_CRC32C all =y in
 * 6.1.0-*-cloud-amd64), so today only the virtio ones are loaded, but a
 * kernel that has them as modules gets them into the initramfs.
 */
export const GUEST_MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_legacy_dev',
  'virtio_pci_modern_dev',
  'virtio_pci',
  'virtio_blk',
  'crc16',
  'mbcache',
  'jbd2',
  'crc32c_generic',
  'ext4',
] as const;

/** Bumped when GUEST_MODULES (or anything else kernel.json records) changes: an older cached kernel is fetched again. */
const KERNEL_FORMAT = 2;

export interface Guest {
  /** The bzImage to pass as -kernel. */
  kernel: string;
  /** The base initramfs (busybox, modules, /init); scenarios append their own cpio to it. */
  initrd: string;
  /** `uname -r` of the guest kernel, e.g. 6.1.0-56-cloud-amd64. */
  kernelRelease: string;
  /** The Debian package the kernel came from, and its version. */
  kernelPackage: string;
  kernelVersion: string;
  /** The modules /init loads, in order (a module built into the kernel is left out). */
  modules: string[];
  /** The cache directory of this kernel. */
  dir: string;
}

interface KernelMeta {
  /** KERNEL_FORMAT when written (absent: 1, before the ext4 modules were looked for). */
  format?: number;
  package: string;
  version: string;
  release: string;
  modules: string[];
}

type Log = (msg: string) => void;

export interface BuildOptions {
  /** Where to cache; default as described at the top of this file. */
  cacheRoot?: string;
  /** Progress messages (downloads and builds only). */
  log?: Log;
}

export function defaultCacheRoot(): string {
  if (process.env.NBDM_GUEST_CACHE) return process.env.NBDM_GUEST_CACHE;
  const base = process.env.XDG_CACHE_HOME || join(homedir(), '.cache');
  return join(base, 'nbd-migrate-guest');
}

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
const aptEnv = () => ({ ...process.env, DEBIAN_FRONTEND: 'noninteractive' });
const aptLock = ['-o', 'DPkg::Lock::Timeout=300'];

// ---------------------------------------------------------------------------
// newc cpio writer

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; data: Buffer | string; mode?: number }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'chardev'; path: string; major: number; minor: number; mode?: number };

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function hex8(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

/**
 * A newc ("070701") cpio archive of `entries`, in order (parents before
 * children), with its TRAILER!!!. Paths are relative ("dev/console").
 * Archives like this may be concatenated: the kernel unpacks each in turn.
 */
export function newcArchive(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const add = (name: string, mode: number, data: Buffer, nlink: number, rdevMajor = 0, rdevMinor = 0) => {
    const nameBuf = Buffer.from(`${name}\0`, 'utf8');
    const header =
      '070701' +
      [ino++, mode, 0, 0, nlink, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBuf.length, 0].map(hex8).join('');
    parts.push(Buffer.from(header, 'ascii'), nameBuf, Buffer.alloc(pad4(110 + nameBuf.length)));
    parts.push(data, Buffer.alloc(pad4(data.length)));
  };
  for (const e of entries) {
    const path = e.path.replace(/^\/+/, '');
    switch (e.type) {
      case 'dir':
        add(path, fsc.S_IFDIR | (e.mode ?? 0o755), Buffer.alloc(0), 2);
        break;
      case 'file':
        add(path, fsc.S_IFREG | (e.mode ?? 0o644), typeof e.data === 'string' ? Buffer.from(e.data) : e.data, 1);
        break;
      case 'symlink':
        add(path, fsc.S_IFLNK | 0o777, Buffer.from(e.target), 1);
        break;
      case 'chardev':
        add(path, fsc.S_IFCHR | (e.mode ?? 0o600), Buffer.alloc(0), 1, e.major, e.minor);
        break;
    }
  }
  add('TRAILER!!!', 0, Buffer.alloc(0), 1);
  return Buffer.concat(parts);
}

/** A cpio holding just /scenario.sh, to append to the base initramfs. */
export function scenarioArchive(script: string): Buffer {
  return newcArchive([{ type: 'file', path: 'scenario.sh', data: script, mode: 0o755 }]);
}

// ---------------------------------------------------------------------------
// busybox

/** True if the ELF file at `path` has no PT_INTERP header (no dynamic loader needed). */
async function isStaticElf(path: string): Promise<boolean> {
  let buf: Buffer;
  try {
    buf = await readFile(path);
  } catch {
    return false;
  }
  if (buf.length < 64 || buf.readUInt32BE(0) !== 0x7f454c46 || buf[4] !== 2 || buf[5] !== 1) return false;
  const phoff = Number(buf.readBigUInt64LE(32));
  const phentsize = buf.readUInt16LE(54);
  const phnum = buf.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > buf.length) return false;
    if (buf.readUInt32LE(off) === 3 /* PT_INTERP */) return false;
  }
  return true;
}

/** The path of a statically linked busybox, installing busybox-static as root if needed. */
export async function requireStaticBusybox(): Promise<string> {
  const find = async () => {
    for (const p of ['/bin/busybox', '/usr/bin/busybox', await which('busybox')]) {
      if (p && (await isStaticElf(p))) return p;
    }
    return null;
  };
  await ensure('a statically linked busybox', 'busybox-static', async () => (await find()) !== null);
  const p = await find();
  if (!p) throw new Error(`no statically linked busybox found; install the Debian package 'busybox-static'`);
  return p;
}

// ---------------------------------------------------------------------------
// kernel

async function aptGet(args: string[], cwd?: string) {
  return run('apt-get', [...aptLock, ...args], { env: aptEnv(), cwd, timeoutMs: 600_000 });
}

let aptUpdated: Promise<void> | undefined;
/** apt-get update, once per process, only as root. */
function aptUpdateOnce(log: Log): Promise<void> {
  if (!isRoot) return Promise.resolve();
  aptUpdated ??= (async () => {
    log('apt-get update');
    const r = await aptGet(['update']);
    if (r.code !== 0) log(`apt-get update failed: ${describeRun(r)}`);
  })();
  return aptUpdated;
}

async function resolveKernelPackageOnce(): Promise<{ pkg: string; version: string } | null> {
  let pkg = process.env.NBDM_GUEST_KERNEL_PACKAGE;
  if (!pkg) {
    const r = await run('apt-cache', ['depends', KERNEL_META_PACKAGE], { timeoutMs: 60_000 });
    const m = /Depends:\s+(linux-image-[^\s<>|]+-cloud-amd64)\s*$/m.exec(r.stdout);
    if (!m) return null;
    pkg = m[1]!;
  }
  const s = await run('apt-cache', ['show', '--no-all-versions', pkg], { timeoutMs: 60_000 });
  const v = /^Version:\s*(\S+)/m.exec(s.stdout);
  if (s.code !== 0 || !v) return null;
  return { pkg, version: v[1]! };
}

/** The cloud kernel package apt would install now, updating the lists (as root) if they lack it. */
async function resolveKernelPackage(log: Log): Promise<{ pkg: string; version: string } | null> {
  const first = await resolveKernelPackageOnce();
  if (first) return first;
  await aptUpdateOnce(log);
  return resolveKernelPackageOnce();
}

function cacheKey(release: string, version: string): string {
  return `${release}_${version}`.replace(/[^\w.+-]/g, '_');
}

async function readMeta(dir: string): Promise<KernelMeta | null> {
  try {
    const meta = JSON.parse(await readFile(join(dir, 'kernel.json'), 'utf8')) as KernelMeta;
    await stat(join(dir, 'vmlinuz'));
    return meta;
  } catch {
    return null;
  }
}

/** The newest complete kernel directory in the cache, if any. */
async function newestCachedKernel(root: string): Promise<{ dir: string; meta: KernelMeta } | null> {
  let best: { dir: string; meta: KernelMeta; mtime: number } | null = null;
  let names: string[] = [];
  try {
    names = await readdir(root);
  } catch {
    return null;
  }
  for (const n of names) {
    if (n.startsWith('.')) continue;
    const dir = join(root, n);
    const meta = await readMeta(dir);
    if (!meta) continue;
    const mtime = (await stat(join(dir, 'kernel.json'))).mtimeMs;
    if (!best || mtime > best.mtime) best = { dir, meta, mtime };
  }
  return best && { dir: best.dir, meta: best.meta };
}

async function findFiles(dir: string, pred: (name: string) => boolean, out: string[] = []): Promise<string[]> {
  let ents;
  try {
    ents = await readdir(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of ents) {
    const p = join(dir, e.name);
    if (e.isDirectory()) await findFiles(p, pred, out);
    else if (pred(e.name)) out.push(p);
  }
  return out;
}

/** Run a command and return its stdout as bytes (run() decodes it as text). */
function runBinary(cmd: string, args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    child.on('error', reject);
    child.on('close', (code) =>
      code === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${err}`)),
    );
  });
}

/** A module file (.ko, .ko.xz, .ko.zst, .ko.gz), decompressed. */
async function readModule(path: string, busybox: string): Promise<Buffer> {
  if (path.endsWith('.ko')) return readFile(path);
  if (path.endsWith('.ko.gz')) return gunzipSync(await readFile(path));
  if (path.endsWith('.ko.xz')) return runBinary(busybox, ['unxz', '-c', path]);
  if (path.endsWith('.ko.zst')) return runBinary(await requireTool('zstd', 'zstd'), ['-dc', path]);
  throw new Error(`unknown module compression: ${path}`);
}

/** Download and unpack the kernel package into `dest` (a fresh directory). */
async function fetchKernel(pkg: string, version: string, dest: string, busybox: string, log: Log): Promise<KernelMeta> {
  const scratch = join(dest, '.scratch');
  await mkdir(scratch, { recursive: true });
  log(`apt-get download ${pkg} (${version})`);
  let r = await aptGet(['download', `${pkg}=${version}`], scratch);
  if (r.code !== 0) {
    await aptUpdateOnce(log);
    r = await aptGet(['download', `${pkg}=${version}`], scratch);
  }
  if (r.code !== 0) throw new Error(`cannot download the guest kernel: ${describeRun(r)}`);
  const deb = (await readdir(scratch)).find((n) => n.endsWith('.deb'));
  if (!deb) throw new Error(`apt-get download ${pkg} produced no .deb in ${scratch}`);
  const root = join(scratch, 'root');
  log(`dpkg-deb -x ${deb}`);
  await runOk('dpkg-deb', ['-x', join(scratch, deb), root], { timeoutMs: 300_000 });

  const vmlinuz = (await findFiles(join(root, 'boot'), (n) => n.startsWith('vmlinuz-')))[0];
  if (!vmlinuz) throw new Error(`${deb} has no /boot/vmlinuz-*`);
  const release = basename(vmlinuz).slice('vmlinuz-'.length);
  let modRoot = join(root, 'lib', 'modules', release);
  try {
    await stat(modRoot);
  } catch {
    modRoot = join(root, 'usr', 'lib', 'modules', release); // merged /usr (trixie and later)
  }
  let builtin = '';
  try {
    builtin = await readFile(join(modRoot, 'modules.builtin'), 'utf8');
  } catch {
    /* older packages may not ship it */
  }
  const all = await findFiles(join(modRoot, 'kernel'), (n) => /\.ko(\.(xz|zst|gz))?$/.test(n));
  const byName = new Map<string, string>();
  for (const p of all) byName.set(basename(p).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_'), p);

  await mkdir(join(dest, 'modules'), { recursive: true });
  const modules: string[] = [];
  for (const m of GUEST_MODULES) {
    const p = byName.get(m);
    if (!p) {
      if (new RegExp(`/${m.replace(/_/g, '[-_]')}\\.ko$`, 'm').test(builtin)) continue; // built in: nothing to load
      throw new Error(`kernel ${release} (${pkg}) has neither a module nor a built-in ${m}`);
    }
    const data = await readModule(p, busybox);
    await writeFile(join(dest, 'modules', `${m}.ko`), data);
    modules.push(m);
  }
  await copyFile(vmlinuz, join(dest, 'vmlinuz'));
  await rm(scratch, { recursive: true, force: true });
  const meta: KernelMeta = { format: KERNEL_FORMAT, package: pkg, version, release, modules };
  await writeFile(join(dest, 'kernel.json'), JSON.stringify(meta, null, 2) + '\n');
  return meta;
}

/** Remove cached kernels other than `keep` (a new kernel replaced them). */
async function pruneKernels(root: string, keep: string, log: Log): Promise<void> {
  for (const n of await readdir(root)) {
    const dir = join(root, n);
    if (n.startsWith('.') || dir === keep || !(await readMeta(dir))) continue;
    log(`removing the superseded guest kernel ${dir}`);
    await rm(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// locking (two test files may build at once; tap runs two jobs)

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function withLock<T>(root: string, fn: () => Promise<T>): Promise<T> {
  const lock = join(root, '.lock');
  const deadline = Date.now() + 15 * 60_000;
  for (;;) {
    try {
      await mkdir(lock);
      await writeFile(join(lock, 'pid'), String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      let stale = false;
      try {
        const pid = Number(await readFile(join(lock, 'pid'), 'utf8'));
        const age = Date.now() - (await stat(lock)).mtimeMs;
        stale = (pid > 0 && !pidAlive(pid)) || age > 15 * 60_000;
      } catch {
        // no pid file yet: its owner is between mkdir and writeFile, unless it died there
        try {
          stale = Date.now() - (await stat(lock)).mtimeMs > 60_000;
        } catch {
          /* gone meanwhile */
        }
      }
      if (stale) await rm(lock, { recursive: true, force: true });
      else if (Date.now() > deadline) throw new Error(`timed out waiting for the guest cache lock ${lock}`);
      else await new Promise((r) => setTimeout(r, 250));
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// initramfs

async function buildInitrd(kdir: string, meta: KernelMeta, busybox: string, log: Log): Promise<string> {
  const bb = await readFile(busybox);
  const init = await readFile(join(ROOTFS_DIR, 'init'));
  const lib = await readFile(join(ROOTFS_DIR, 'lib', 'nbdm.sh'));
  const mods = await Promise.all(meta.modules.map(async (m) => [m, await readFile(join(kdir, 'modules', `${m}.ko`))] as const));

  const entries: CpioEntry[] = [
    { type: 'dir', path: 'dev' },
    { type: 'chardev', path: 'dev/console', major: 5, minor: 1 },
    { type: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 },
    ...['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'proc', 'sys', 'run', 'mnt', 'etc', 'lib', 'lib/modules'].map(
      (path): CpioEntry => ({ type: 'dir', path }),
    ),
    { type: 'dir', path: 'tmp', mode: 0o1777 },
    { type: 'file', path: 'bin/busybox', data: bb, mode: 0o755 },
    { type: 'symlink', path: 'bin/sh', target: 'busybox' },
    { type: 'file', path: 'init', data: init, mode: 0o755 },
    { type: 'file', path: 'lib/nbdm.sh', data: lib },
    { type: 'file', path: 'lib/modules/order', data: meta.modules.join('\n') + '\n' },
    ...mods.map(([m, data]): CpioEntry => ({ type: 'file', path: `lib/modules/${m}.ko`, data })),
  ];
  const archive = newcArchive(entries);
  const hash = createHash('sha256').update(`format ${INITRD_FORMAT}\n`).update(archive).digest('hex').slice(0, 16);
  const path = join(kdir, `initrd-${hash}.cpio`);
  try {
    const now = new Date();
    await utimes(path, now, now); // in use: keep it from being pruned
    return path;
  } catch {
    /* build it */
  }
  log(`writing ${path}`);
  // Initramfs files built from other rootfs/ contents and unused for a week
  // go (another checkout may still be using a recent one: its runs touch it).
  for (const n of await readdir(kdir)) {
    if (!/^initrd-[0-9a-f]+\.cpio$/.test(n)) continue;
    const p = join(kdir, n);
    if (Date.now() - (await stat(p)).mtimeMs > 7 * 24 * 3600_000) await rm(p, { force: true });
  }
  const tmp = `${path}.${process.pid}.tmp`;
  const fh = await open(tmp, 'w');
  try {
    await fh.write(archive);
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  return path;
}

// ---------------------------------------------------------------------------

const built = new Map<string, Promise<Guest>>();

/**
 * Return the cached guest, building it first if needed (downloads the kernel
 * package; installs busybox-static as root). Throws, naming the Debian
 * package, when something is missing and cannot be installed.
 */
export function buildGuest(opts: BuildOptions = {}): Promise<Guest> {
  const root = opts.cacheRoot ?? defaultCacheRoot();
  let p = built.get(root);
  if (!p) {
    p = doBuild(root, opts.log ?? (() => {}));
    built.set(root, p);
    p.catch(() => built.delete(root));
  }
  return p;
}

async function doBuild(root: string, log: Log): Promise<Guest> {
  const busybox = await requireStaticBusybox();
  await requireTool('dpkg-deb', 'dpkg');
  await requireTool('apt-get', 'apt');
  await mkdir(root, { recursive: true });

  return withLock(root, async () => {
    // Under the lock, any scratch directory is left over from a build that died.
    for (const n of await readdir(root)) {
      if (n.startsWith('.build-')) await rm(join(root, n), { recursive: true, force: true });
    }
    let found: { dir: string; meta: KernelMeta } | null = null;
    let why = '';
    const want = await resolveKernelPackage(log);
    if (want) {
      // The package name is linux-image-<release>; the directory is keyed by release and version.
      const release = want.pkg.replace(/^linux-image-/, '');
      const kdir = join(root, cacheKey(release, want.version));
      const meta = await readMeta(kdir);
      if (meta && (meta.format ?? 1) >= KERNEL_FORMAT) {
        found = { dir: kdir, meta };
      } else {
        await rm(kdir, { recursive: true, force: true });
        const tmp = await mkdtemp(join(root, '.build-'));
        try {
          const fetched = await fetchKernel(want.pkg, want.version, tmp, busybox, log);
          await chmod(tmp, 0o755); // mkdtemp made it 0700
          await rename(tmp, kdir);
          found = { dir: kdir, meta: fetched };
          await pruneKernels(root, kdir, log);
        } catch (e) {
          await rm(tmp, { recursive: true, force: true });
          why = `fetching ${want.pkg} ${want.version} failed: ${(e as Error).message}`;
        }
      }
    } else {
      why = process.env.NBDM_GUEST_KERNEL_PACKAGE
        ? `apt knows no package ${process.env.NBDM_GUEST_KERNEL_PACKAGE} (NBDM_GUEST_KERNEL_PACKAGE)`
        : `'apt-cache depends ${KERNEL_META_PACKAGE}' names no linux-image-*-cloud-amd64 package (run 'apt-get update' as root)`;
    }
    if (!found) {
      // Offline, or apt knows no cloud kernel: an older cached kernel will do.
      found = await newestCachedKernel(root);
      if (!found) throw new Error(`cannot get the guest kernel: ${why}; and ${root} holds no cached kernel`);
      log(`${why}; using the cached ${found.meta.package} ${found.meta.version}`);
    }
    const { dir: kdir, meta } = found;
    const initrd = await buildInitrd(kdir, meta, busybox, log);
    return {
      kernel: join(kdir, 'vmlinuz'),
      initrd,
      kernelRelease: meta.release,
      kernelPackage: meta.package,
      kernelVersion: meta.version,
      modules: meta.modules,
      dir: kdir,
    };
  });
}
