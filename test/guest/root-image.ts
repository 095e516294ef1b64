// The test guest's root filesystem as a disk image: an ext4 made with
// `mkfs.ext4 -d DIR` (e2fsprogs; it populates the filesystem from a
// directory without mounting anything, so no root and no loop device), holding
//   /bin/busybox (busybox-static) and a symlink per applet (/bin/sh, /bin/dd, ...),
//   /sbin/init (test/guest/rootfs/sbin/init) and /lib/nbdm.sh,
//   /scenario.sh, the scenario the guest runs,
//   and the caller's files (e.g. /data/...).
// The guest boots it with startGuest({ rootDevice: '/dev/vda', ... }): the
// initramfs loads the modules, mounts it and switch_root's onto /sbin/init.
//
// On the host the image is read back with debugfs (dump a file) and checked
// with `e2fsck -fn`, again without mounting.

import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describeRun, requireTool, run, runOk } from '../helpers/tools.js';
import { requireStaticBusybox, ROOTFS_DIR } from './build-guest.js';

export interface RootFile {
  /** Absolute path in the guest, e.g. /data/base.bin. */
  path: string;
  data: Buffer | string;
  mode?: number;
}

export interface RootImageOptions {
  /** The body of /scenario.sh, sourced (in a subshell) by /sbin/init after lib/nbdm.sh. */
  scenario: string;
  files?: RootFile[];
}

export interface RootImage {
  /** The busybox copied in (the host can compare the guest's /bin/busybox with it). */
  busybox: string;
}

/** mkfs.ext4 over the existing file `image` (its size is the filesystem's), populated as described above. */
export async function makeRootImage(image: string, opts: RootImageOptions): Promise<RootImage> {
  const mkfs = await requireTool('mkfs.ext4', 'e2fsprogs');
  const busybox = await requireStaticBusybox();
  const stage = await mkdtemp(join(tmpdir(), 'nbdm-rootfs-'));
  try {
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'lib', 'dev', 'proc', 'sys', 'tmp', 'etc', 'data']) {
      await mkdir(join(stage, d), { recursive: true });
    }
    await chmod(join(stage, 'tmp'), 0o1777);
    await copyFile(busybox, join(stage, 'bin', 'busybox'));
    await chmod(join(stage, 'bin', 'busybox'), 0o755);
    const list = await runOk(busybox, ['--list-full']);
    for (const applet of list.stdout.split('\n').map((l) => l.trim()).filter(Boolean)) {
      if (applet === 'bin/busybox' || applet === 'sbin/init' || applet === 'linuxrc') continue;
      await mkdir(join(stage, dirname(applet)), { recursive: true });
      await symlink('/bin/busybox', join(stage, applet));
    }
    await copyFile(join(ROOTFS_DIR, 'sbin', 'init'), join(stage, 'sbin', 'init'));
    await chmod(join(stage, 'sbin', 'init'), 0o755);
    await copyFile(join(ROOTFS_DIR, 'lib', 'nbdm.sh'), join(stage, 'lib', 'nbdm.sh'));
    await writeFile(join(stage, 'scenario.sh'), opts.scenario, { mode: 0o755 });
    for (const f of opts.files ?? []) {
      const p = join(stage, f.path.replace(/^\/+/, ''));
      await mkdir(dirname(p), { recursive: true });
      await writeFile(p, f.data, { mode: f.mode ?? 0o644 });
    }
    // 4 KiB blocks (mke2fs would pick 1 KiB for a small filesystem); the
    // kernel's ext4 reads every feature e2fsprogs 1.47 enables by default.
    const r = await run(mkfs, ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'nbdm-root', '-d', stage, image], { timeoutMs: 120_000 });
    if (r.code !== 0) throw new Error(`mkfs.ext4 -d failed (e2fsprogs 1.43 or later is needed for -d): ${describeRun(r)}`);
    return { busybox };
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

/** The content of file `path` of the ext4 `image`, read with debugfs (nothing is mounted). */
export async function readRootFile(image: string, path: string): Promise<Buffer> {
  const debugfs = await requireTool('debugfs', 'e2fsprogs');
  const dir = await mkdtemp(join(tmpdir(), 'nbdm-dump-'));
  try {
    const out = join(dir, 'out');
    const r = await run(debugfs, ['-R', `dump ${path} ${out}`, image], { timeoutMs: 60_000 });
    // debugfs exits 0 even when the file does not exist: the dump must be there.
    const data = await readFile(out).catch(() => undefined);
    if (r.code !== 0 || data === undefined) throw new Error(`debugfs could not dump ${path} from ${image}: ${describeRun(r)}`);
    return data;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** `e2fsck -fn image`: exit code 0 means the filesystem is clean (-n: nothing is changed). */
export async function fsckImage(image: string): Promise<{ clean: boolean; output: string }> {
  const e2fsck = await requireTool('e2fsck', 'e2fsprogs');
  const r = await run(e2fsck, ['-fn', image], { timeoutMs: 120_000 });
  return { clean: r.code === 0, output: describeRun(r) };
}
