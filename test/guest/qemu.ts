// Boots the test guest (build-guest.ts) under QEMU with its disks on NBD, the
// way libvirt attaches an NBD network disk, and follows the run through the
// marker lines the guest prints on its serial console.
//
// A run is judged by its markers only: `@@NBDM RESULT ok` and no
// `@@NBDM RESULT fail`. QEMU's exit status says nothing (the guest's
// `poweroff -f` exits 0 after a failure too). Every run has a deadline after
// which QEMU gets SIGTERM and, a few seconds later, SIGKILL: a QEMU whose NBD
// server stalls sits in uninterruptible block I/O and ignores SIGTERM.
//
// While a guest runs, the host can wait for markers (`vm.waitFor('PROGRESS',
// ...)`) and send lines to the guest's console (`vm.send('stop')`), which
// the guest reads with `host_says` or the `workload` loop of rootfs/lib/nbdm.sh.
//
// NBDM_GUEST_CONSOLE=1 in the environment copies every console line to stderr.

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Teardownable } from '../helpers/server.js';
import { requireTool } from '../helpers/tools.js';
import { buildGuest, scenarioArchive, type Guest } from './build-guest.js';

// ---------------------------------------------------------------------------
// Disks, exactly as libvirt attaches them

export type NbdServerAddress = { type: 'inet'; host?: string; port: number } | { type: 'unix'; path: string };

export interface NbdDisk {
  server: NbdServerAddress;
  /**
   * The export name (`<source protocol='nbd' name='...'>`). Leave it out for
   * an oldstyle port: libvirt then passes no "export" and QEMU negotiates
   * without a name (oldstyle servers send their one export unasked).
   */
  export?: string;
  /**
   * `<driver discard='...'>`. Absent (the default, and what the README's XML
   * says) means libvirt passes no "discard" and QEMU's default, "ignore",
   * applies: the guest's discards are dropped inside QEMU and never reach
   * the NBD server. Only `discard='unmap'` turns them into NBD_CMD_TRIM.
   */
  discard?: 'unmap' | 'ignore';
  /** `<readonly/>`. */
  readOnly?: boolean;
  /**
   * `<reconnect delay='N'/>` inside <source>: QEMU's "reconnect-delay". Without
   * it a dropped NBD connection fails the guest's I/O at once.
   */
  reconnectDelay?: number;
}

/** The libvirt <disk> element that `blockdevArgs` models, for messages and docs. */
export function libvirtDiskXml(disk: NbdDisk, target = 'vda'): string {
  const driverExtra = disk.discard ? ` discard='${disk.discard}'` : '';
  const name = disk.export !== undefined ? ` name='${disk.export}'` : '';
  const host =
    disk.server.type === 'inet'
      ? `<host name='${disk.server.host ?? '127.0.0.1'}' port='${disk.server.port}'/>`
      : `<host transport='unix' socket='${disk.server.path}'/>`;
  return [
    `<disk type='network' device='disk'>`,
    `  <driver name='qemu' type='raw' cache='none'${driverExtra}/>`,
    `  <source protocol='nbd'${name}>`,
    `    ${host}`,
    ...(disk.reconnectDelay !== undefined ? [`    <reconnect delay='${disk.reconnectDelay}'/>`] : []),
    `  </source>`,
    `  <target dev='${target}' bus='virtio'/>`,
    ...(disk.readOnly ? ['  <readonly/>'] : []),
    `</disk>`,
  ].join('\n');
}

/**
 * The QEMU arguments for one disk, as current libvirt generates them for
 * `libvirtDiskXml(disk)` (compare libvirt's tests/qemuxmlconfdata
 * disk-network-nbd and disk-cache *.x86_64-latest.args):
 *
 *   -blockdev '{"driver":"nbd","server":{...},"export":"vm1",
 *               "node-name":"libvirt-1-storage","read-only":false,
 *               "cache":{"direct":true,"no-flush":false}}'
 *   -device '{"driver":"virtio-blk-pci","drive":"libvirt-1-storage",
 *             "id":"virtio-disk0","write-cache":"on"}'
 *
 * -blockdev/-device rather than `-drive file=nbd://...,cache=none`: libvirt
 * has used -blockdev since QEMU 4.2, and it is the form whose every property
 * is explicit. cache='none' is cache.direct=on + cache.no-flush=off on the
 * node and write-cache=on on the device: the guest sees a volatile write
 * cache, so its `sync` and O_DIRECT+fsync become NBD_CMD_FLUSH. type='raw'
 * with nothing else on the format layer is a bare protocol node (libvirt
 * leaves out the no-op raw format node). PCI addresses are left to QEMU.
 */
export function blockdevArgs(disk: NbdDisk, index: number): string[] {
  const node = `libvirt-${index + 1}-storage`;
  const server =
    disk.server.type === 'inet'
      ? { type: 'inet', host: disk.server.host ?? '127.0.0.1', port: String(disk.server.port) }
      : { type: 'unix', path: disk.server.path };
  const blockdev: Record<string, unknown> = { driver: 'nbd', server };
  if (disk.export !== undefined) blockdev.export = disk.export;
  if (disk.reconnectDelay !== undefined) blockdev['reconnect-delay'] = disk.reconnectDelay;
  blockdev['node-name'] = node;
  blockdev['read-only'] = disk.readOnly ?? false;
  if (disk.discard) blockdev.discard = disk.discard;
  blockdev.cache = { direct: true, 'no-flush': false };
  const device = { driver: 'virtio-blk-pci', drive: node, id: `virtio-disk${index}`, 'write-cache': 'on' };
  return ['-blockdev', JSON.stringify(blockdev), '-device', JSON.stringify(device)];
}

// ---------------------------------------------------------------------------
// Markers

export interface Marker {
  /** RESULT, PROGRESS, WAIT, ... */
  kind: string;
  /** The words after the kind. */
  args: string[];
  /** Everything after the kind, trimmed. */
  rest: string;
  /** Milliseconds since QEMU was started. */
  atMs: number;
}

const MARKER = /@@NBDM (\S+)(.*)$/;

/** The marker in one console line, if any (lines may carry kernel output before it). */
export function parseMarker(line: string, atMs = 0): Marker | undefined {
  const m = MARKER.exec(line.replace(/\r/g, ''));
  if (!m) return undefined;
  const rest = m[2]!.trim();
  return { kind: m[1]!, args: rest ? rest.split(/\s+/) : [], rest, atMs };
}

// ---------------------------------------------------------------------------
// Running a guest

export interface GuestOptions {
  /** Disks in order: vda, vdb, ... */
  disks: NbdDisk[];
  /** The body of /scenario.sh, sourced (in a subshell) after rootfs/lib/nbdm.sh. */
  script: string;
  /** Deadline for the whole run, boot included. Default 120 s. */
  timeoutMs?: number;
  /** Between SIGTERM and SIGKILL at the deadline. Default 3 s. */
  killAfterMs?: number;
  /** Guest memory. Default 256 MiB. */
  memMiB?: number;
  /** Called with every console line (\r removed). */
  onLine?: (line: string) => void;
  /** A prebuilt guest; default: buildGuest(). */
  guest?: Guest;
  /** A command QEMU runs under, e.g. ['ip', 'netns', 'exec', NS] (test/helpers/netns.ts); it must exec QEMU. */
  prefix?: string[];
  /**
   * The guest's root filesystem, e.g. '/dev/vda': an ext4 made by
   * root-image.ts. The initramfs then only loads the modules, mounts it and
   * switch_root's onto its /sbin/init, which runs the /scenario.sh stored in
   * that filesystem (`script` is not used).
   */
  rootDevice?: string;
}

export interface GuestResult {
  /** A `RESULT ok` marker and no `RESULT fail`. */
  ok: boolean;
  /** Why the run failed, in one line (undefined if ok). */
  failure: string | undefined;
  markers: Marker[];
  /** The serial console, \r removed. */
  transcript: string;
  /** QEMU's stderr. */
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  durationMs: number;
  /** The QEMU command line, for messages. */
  command: string;
}

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of running) {
    try {
      p.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
});

function shellQuote(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

export class GuestVm {
  readonly markers: Marker[] = [];
  readonly lines: string[] = [];
  /** Resolves once QEMU has exited (or been killed at the deadline). */
  readonly result: Promise<GuestResult>;
  readonly command: string;

  private readonly proc: ChildProcess;
  private readonly started = Date.now();
  private partial = '';
  private stderrText = '';
  private timedOut = false;
  private exited = false;
  private waiters: { pred: (m: Marker) => boolean; resolve: (m: Marker) => void; reject: (e: Error) => void }[] = [];
  private killTimer: NodeJS.Timeout | undefined;

  constructor(qemu: string, args: string[], private readonly opts: GuestOptions, cleanup: () => Promise<void>) {
    this.command = [qemu, ...args].map(shellQuote).join(' ');
    this.proc = spawn(qemu, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    running.add(this.proc);
    this.proc.stdin!.on('error', () => {
      /* QEMU gone */
    });
    this.proc.stdout!.setEncoding('utf8');
    this.proc.stdout!.on('data', (chunk: string) => this.onData(chunk));
    this.proc.stderr!.setEncoding('utf8');
    this.proc.stderr!.on('data', (chunk: string) => {
      this.stderrText += chunk;
      if (this.stderrText.length > 256 * 1024) this.stderrText = this.stderrText.slice(-128 * 1024);
    });
    const deadline = setTimeout(() => {
      this.timedOut = true;
      void this.kill();
    }, opts.timeoutMs ?? 120_000);

    this.result = new Promise<GuestResult>((resolve) => {
      let finished = false;
      const finish = (code: number | null, signal: NodeJS.Signals | null) => {
        if (finished) return; // 'error' may be followed by 'close'
        finished = true;
        clearTimeout(deadline);
        if (this.killTimer) clearTimeout(this.killTimer);
        running.delete(this.proc);
        if (this.partial) this.onLine(this.partial);
        this.partial = '';
        this.exited = true;
        const why = this.exitDescription(code, signal);
        for (const w of this.waiters.splice(0)) w.reject(new Error(`the guest ended before the awaited marker: ${why}\n${this.tail()}`));
        void cleanup().finally(() => resolve(this.judge(code, signal)));
      };
      this.proc.on('error', (e) => {
        this.stderrText += `\nspawn error: ${e.message}`;
        finish(null, null);
      });
      this.proc.on('close', finish);
    });
  }

  private exitDescription(code: number | null, signal: NodeJS.Signals | null): string {
    if (this.timedOut) return `timed out after ${this.opts.timeoutMs ?? 120_000} ms (killed)`;
    return signal ? `QEMU killed by ${signal}` : `QEMU exited with code ${code}`;
  }

  private onData(chunk: string): void {
    this.partial += chunk;
    let nl: number;
    while ((nl = this.partial.indexOf('\n')) >= 0) {
      this.onLine(this.partial.slice(0, nl));
      this.partial = this.partial.slice(nl + 1);
    }
  }

  private onLine(raw: string): void {
    const line = raw.replace(/\r/g, '');
    this.lines.push(line);
    if (this.lines.length > 20_000) this.lines.splice(0, 10_000); // a console flood must not eat the memory
    this.opts.onLine?.(line);
    if (process.env.NBDM_GUEST_CONSOLE) process.stderr.write(`[guest] ${line}\n`);
    const m = parseMarker(line, Date.now() - this.started);
    if (!m) return;
    this.markers.push(m);
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      const w = this.waiters[i]!;
      if (w.pred(m)) {
        this.waiters.splice(i, 1);
        w.resolve(m);
      }
    }
    // A failure ends the wait for anything else: no need to sit out the timeout.
    if (m.kind === 'RESULT' && m.args[0] === 'fail') {
      for (const w of this.waiters.splice(0)) w.reject(new Error(`the guest failed: ${m.rest}\n${this.tail()}`));
    }
  }

  /** The first marker of `kind` (past or future) for which `pred` holds. */
  waitFor(kind: string, pred: (m: Marker) => boolean = () => true, timeoutMs = 60_000): Promise<Marker> {
    const match = (m: Marker) => m.kind === kind && pred(m);
    const found = this.markers.find(match);
    if (found) return Promise.resolve(found);
    const failed = this.markers.find((m) => m.kind === 'RESULT' && m.args[0] === 'fail');
    if (failed) return Promise.reject(new Error(`the guest failed: ${failed.rest}\n${this.tail()}`));
    if (this.exited) return Promise.reject(new Error(`the guest has ended; no ${kind} marker\n${this.tail()}`));
    return new Promise((resolve, reject) => {
      const w = {
        pred: match,
        resolve: (m: Marker) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new Error(`no ${kind} marker within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Send one line to the guest's console (read there by host_says / workload). */
  send(line: string): void {
    if (!this.exited) this.proc.stdin!.write(`${line}\n`);
  }

  /** SIGTERM now, SIGKILL after killAfterMs; resolves with the result. */
  kill(): Promise<GuestResult> {
    if (!this.exited && !this.killTimer) {
      this.proc.kill('SIGTERM');
      this.killTimer = setTimeout(() => {
        if (!this.exited) this.proc.kill('SIGKILL');
      }, this.opts.killAfterMs ?? 3000);
    }
    return this.result;
  }

  /** The last console lines and QEMU's stderr, for failure messages. */
  tail(lines = 60): string {
    const t = this.lines.slice(-lines).join('\n');
    const e = this.stderrText.trim();
    return `--- console (last ${lines} lines) ---\n${t}` + (e ? `\n--- qemu stderr ---\n${e.slice(-4000)}` : '');
  }

  private judge(code: number | null, signal: NodeJS.Signals | null): GuestResult {
    const results = this.markers.filter((m) => m.kind === 'RESULT');
    const failed = results.find((m) => m.args[0] !== 'ok');
    const passed = results.find((m) => m.args[0] === 'ok');
    let failure: string | undefined;
    if (failed) failure = `guest reported: ${failed.rest}`;
    else if (!passed) failure = `no RESULT marker; ${this.exitDescription(code, signal)}`;
    return {
      ok: failure === undefined,
      failure,
      markers: [...this.markers],
      transcript: this.lines.join('\n'),
      stderr: this.stderrText,
      code,
      signal,
      timedOut: this.timedOut,
      durationMs: Date.now() - this.started,
      command: this.command,
    };
  }
}

/** A multi-line description of a finished run, for assertion messages. */
export function describeGuest(r: GuestResult, lines = 80): string {
  const status = r.timedOut ? 'timed out (killed)' : r.signal ? `signal ${r.signal}` : `exit ${r.code}`;
  return (
    `${r.failure ?? 'ok'} [qemu ${status}, ${(r.durationMs / 1000).toFixed(1)} s]\n` +
    `${r.command}\n--- console (last ${lines} lines) ---\n${r.transcript.split('\n').slice(-lines).join('\n')}` +
    (r.stderr.trim() ? `\n--- qemu stderr ---\n${r.stderr.trim().slice(-4000)}` : '')
  );
}

/** qemu-system-x86_64, installing qemu-system-x86 as root if missing. */
export function requireQemu(): Promise<string> {
  return requireTool('qemu-system-x86_64', 'qemu-system-x86');
}

/**
 * Boot the guest and return at once; `vm.result` resolves when it ends.
 * With `t`, a guest still running at the end of the test is killed.
 */
export async function startGuest(t: Teardownable | undefined, opts: GuestOptions): Promise<GuestVm> {
  const qemu = await requireQemu();
  const guest = opts.guest ?? (await buildGuest());
  // The scenario goes into a second cpio appended to the cached base
  // initramfs; the kernel unpacks both, in order.
  const dir = await mkdtemp(join(tmpdir(), 'nbdm-guest-'));
  const initrd = join(dir, 'initrd.cpio');
  await writeFile(initrd, Buffer.concat([await readFile(guest.initrd), scenarioArchive(opts.script)]));
  const args = [
    '-accel', 'tcg', // /dev/kvm may exist without working; TCG always does
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-serial', 'stdio',
    '-no-reboot',
    '-m', String(opts.memMiB ?? 256),
    '-smp', '1',
    '-kernel', guest.kernel,
    '-initrd', initrd,
    '-append', `console=ttyS0 panic=-1 oops=panic loglevel=4 no_timer_check nbdm.disks=${opts.disks.length}${opts.rootDevice ? ` nbdm.root=${opts.rootDevice}` : ''}`,
    ...opts.disks.flatMap((d, i) => blockdevArgs(d, i)),
  ];
  const [cmd, ...argv] = [...(opts.prefix ?? []), qemu, ...args];
  const vm = new GuestVm(cmd!, argv, opts, () => rm(dir, { recursive: true, force: true }));
  t?.teardown(() => vm.kill());
  return vm;
}

/** Boot the guest, let it run to its end, and return how it went. */
export async function runGuest(t: Teardownable | undefined, opts: GuestOptions): Promise<GuestResult> {
  const vm = await startGuest(t, opts);
  return vm.result;
}
