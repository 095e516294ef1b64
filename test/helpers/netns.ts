// Network namespaces a test creates for itself (ip netns, veth pairs, a
// bridge), so that addresses can be added, moved and removed without touching
// the host's own network: every address lives inside these namespaces only
// (ULA, fd00::/8), and everything is deleted in teardown, also on failure.
//
// Names are `nbdm<pid>-<short>`; namespaces left by a test process that no
// longer runs (killed before its teardown) are deleted when the next lab starts.
import type { Teardownable } from './server.js';
import { describeRun, requireTool, run, runOk, type RunOptions, type RunResult } from './tools.js';

export class NetLab {
  readonly prefix = `nbdm${process.pid}`;
  private readonly namespaces: string[] = [];
  private ipPath = 'ip';

  /** The `ip` binary (absolute), for commands the servers run. */
  get ipBin(): string {
    return this.ipPath;
  }

  private constructor() {}

  /** A lab whose namespaces are deleted in t.teardown. Needs root and `ip` (iproute2). */
  static async create(t: Teardownable): Promise<NetLab> {
    if (typeof process.getuid === 'function' && process.getuid() !== 0) throw new Error('network namespaces need root (ip netns add)');
    const lab = new NetLab();
    lab.ipPath = await requireTool('ip', 'iproute2');
    await lab.sweepStale();
    t.teardown(() => lab.destroy());
    return lab;
  }

  /** `ip ARGS`, failing with its output. */
  ip(...args: string[]): Promise<RunResult> {
    return runOk(this.ipPath, args, { timeoutMs: 30_000 });
  }

  /** A new namespace `nbdm<pid>-<short>` with its loopback up; returns its full name. */
  async ns(short: string): Promise<string> {
    const name = `${this.prefix}-${short}`;
    await this.ip('netns', 'add', name);
    this.namespaces.push(name);
    await this.ip('-n', name, 'link', 'set', 'lo', 'up');
    // Addresses are usable at once: no duplicate address detection (the namespaces are ours alone).
    await runOk(this.ipPath, ['netns', 'exec', name, 'sysctl', '-qw', 'net.ipv6.conf.all.accept_dad=0', 'net.ipv6.conf.default.accept_dad=0']).catch(() => undefined);
    return name;
  }

  /** A bridge `br` in namespace `ns`, up. */
  async bridge(ns: string, br: string): Promise<void> {
    await this.ip('-n', ns, 'link', 'add', br, 'type', 'bridge');
    await this.ip('-n', ns, 'link', 'set', br, 'up');
  }

  /**
   * A veth pair: `ifName` in namespace `ns` (up, with `addrs`), its peer in
   * `bridgeNs` enslaved to `br` (up).
   */
  async plug(ns: string, ifName: string, bridgeNs: string, br: string, addrs: string[]): Promise<void> {
    const peer = `p-${ns.split('-').pop()}-${ifName}`.slice(0, 15);
    await this.ip('link', 'add', ifName, 'netns', ns, 'type', 'veth', 'peer', 'name', peer, 'netns', bridgeNs);
    await this.ip('-n', ns, 'link', 'set', ifName, 'up');
    await this.ip('-n', bridgeNs, 'link', 'set', peer, 'master', br);
    await this.ip('-n', bridgeNs, 'link', 'set', peer, 'up');
    for (const a of addrs) await this.ip('-n', ns, 'addr', 'add', a, 'dev', ifName, 'nodad');
  }

  /** The argv prefix that runs a command inside `ns`. */
  execArgs(ns: string): string[] {
    return [this.ipPath, 'netns', 'exec', ns];
  }

  /** Runs a command inside `ns` (never rejects on its exit status). */
  exec(ns: string, cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
    return run(this.ipPath, ['netns', 'exec', ns, cmd, ...args], opts);
  }

  /** Deletes every namespace of this lab (their veths and bridges go with them); processes still inside are killed. */
  async destroy(): Promise<void> {
    for (const ns of this.namespaces.splice(0).reverse()) await this.delete(ns);
  }

  private async delete(ns: string): Promise<void> {
    const pids = await run(this.ipPath, ['netns', 'pids', ns], { timeoutMs: 10_000 });
    for (const pid of pids.stdout.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    const r = await run(this.ipPath, ['netns', 'del', ns], { timeoutMs: 10_000 });
    if (r.code !== 0) process.stderr.write(`netns cleanup: ${describeRun(r)}\n`);
  }

  /** Namespaces of test processes that are gone (killed before their teardown ran). */
  private async sweepStale(): Promise<void> {
    const list = await run(this.ipPath, ['netns', 'list'], { timeoutMs: 10_000 });
    for (const line of list.stdout.split('\n')) {
      const m = /^(nbdm(\d+)-\S+)/.exec(line.trim());
      if (!m || Number(m[2]) === process.pid) continue;
      let alive = true;
      try {
        process.kill(Number(m[2]), 0);
      } catch {
        alive = false;
      }
      if (!alive) await this.delete(m[1]!);
    }
  }
}
