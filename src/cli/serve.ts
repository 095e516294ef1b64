/**
 * `nbd-migrate serve`: opens the images, builds each export's device stack,
 * binds the listeners and the admin socket, serves until SIGTERM/SIGINT, then
 * aborts unfinished mirrors, drains in-flight requests, flushes, and closes.
 *
 * Each export is opened by export-open.ts (image, state folder, checkpoints,
 * post-copy, its device stack); this file is the process: registry,
 * listeners, admin socket, metrics, reload (SIGHUP) and shutdown.
 */
import * as fs from 'node:fs';
import * as tls from 'node:tls';
import { adminHandlers } from '../admin/commands.js';
import { AdminServer } from '../admin/server.js';
import { MigrationController } from '../migration/controller.js';
import type { MirrorSource } from '../migration/job.js';
import { Export, ExportRegistry } from '../server/export.js';
import type { TlsPolicy } from '../server/handshake.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../server/server.js';
import { handOver } from '../migration/postcopy-handover.js';
import { settledWithin } from '../util/within.js';
import { PostcopyDestination } from '../migration/postcopy.js';
import { JobError } from '../migration/errors.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import { log } from '../util/log.js';
import { busyPollStatus, setBusyPoll } from '../util/busy-poll.js';
import { ConfigError, type ExportConfig, type ServeConfig } from './config.js';
import { closeCheckpoints, closeState, type OpenExport, openExport, StateFolderBusy } from './export-open.js';

export interface RunningServer {
  server: NbdServer;
  controller: MigrationController;
  reload(next: ServeConfig): Promise<void>;
  stop(): Promise<void>;
}

/** How long closing an export (shutdown, or a reload that removed it) waits for its final flush. */
const SHUTDOWN_FLUSH_MS = 10_000;
/** Beyond the drain and the flush, what else shutdown may take before the process is made to exit. */
const SHUTDOWN_SLACK_MS = 10_000;

/** Loads the certificates once at startup; a bad file stops startup with its name. */
function tlsPolicy(cfg: ServeConfig): TlsPolicy | undefined {
  if (cfg.tls === 'off') return undefined;
  const read = (f: string | undefined, what: string) => {
    try {
      return f ? fs.readFileSync(f) : undefined;
    } catch (e) {
      throw new ConfigError(`${what} ${f}: ${(e as Error).message}`);
    }
  };
  let secureContext: tls.SecureContext;
  const ca = read(cfg.tlsCa, '--tls-ca');
  try {
    secureContext = tls.createSecureContext({ cert: read(cfg.tlsCert, '--tls-cert'), key: read(cfg.tlsKey, '--tls-key'), ca, minVersion: 'TLSv1.2' });
  } catch (e) {
    throw new ConfigError(`TLS certificate or key: ${(e as Error).message}`);
  }
  // With a CA, clients must present a certificate it signed.
  return { mode: cfg.tls, options: { secureContext, requestCert: ca !== undefined, rejectUnauthorized: ca !== undefined } };
}

/** File descriptors passed by systemd socket activation (LISTEN_PID/LISTEN_FDS, fds from 3). */
function socketActivationFds(): number[] {
  const pid = Number(process.env.LISTEN_PID);
  const n = Number(process.env.LISTEN_FDS);
  if (pid !== process.pid || !Number.isInteger(n) || n < 1) return [];
  // Not inherited by anything we start.
  delete process.env.LISTEN_PID;
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  return Array.from({ length: n }, (_, i) => 3 + i);
}


function sameExport(a: ExportConfig, b: ExportConfig): boolean {
  return JSON.stringify({ ...a, description: undefined }) === JSON.stringify({ ...b, description: undefined }) && a.description === b.description;
}

/** The serving process: exports, listeners, admin socket, metrics; reloadable on SIGHUP. */
class ServeProcess implements RunningServer {
  readonly registry = new ExportRegistry();
  readonly sources = new Map<string, MirrorSource>();
  /** Post-copy destinations (serve --fetch-from), by export. */
  readonly postcopies = new Map<string, PostcopyDestination>();
  private readonly open = new Map<string, OpenExport>();
  /** Exports removed by a reload whose images stay open until their last connection ends. */
  private readonly retiring = new Set<OpenExport>();
  /** Exports a reload could not open yet: their state folder is still held by the retired export of that name. */
  private readonly deferred = new Map<string, ExportConfig>();
  readonly server: NbdServer;
  readonly controller: MigrationController;
  private admin: AdminServer | undefined;
  private metrics: { close(): Promise<void> } | undefined;
  private reaper: NodeJS.Timeout | undefined;

  constructor(private cfg: ServeConfig) {
    this.server = new NbdServer(this.registry, {
      ...DEFAULT_SERVER_OPTIONS,
      handshakeTimeoutMs: cfg.handshakeTimeout * 1000,
      maxConnections: cfg.maxConnections,
      maxConnectionsPerExport: cfg.maxConnectionsPerExport,
      session: { ...DEFAULT_SERVER_OPTIONS.session, idleTimeoutMs: cfg.idleTimeout * 1000 },
      tls: tlsPolicy(cfg),
    });
    this.controller = new MigrationController(this.sources, () => this.server.connectionsByExport());
  }

  async addExport(e: ExportConfig): Promise<OpenExport> {
    const { oe, exp, receiving } = await openExport(e, this.cfg, { server: this.server, handOver: (o) => this.doHandOver(e.name, o) });
    const { file, postcopy } = oe;
    this.registry.add(exp);
    this.sources.set(e.name, oe.source);
    if (postcopy) {
      this.postcopies.set(e.name, postcopy);
      postcopy.start();
    }
    this.open.set(e.name, oe);
    log('info', 'export-added', { export: e.name, image: e.path, size: file.size, readOnly: e.readOnly, incoming: receiving, exportId: exp.id, storage: file.sparseKind, blockDevice: file.isBlockDevice, direct: file.isDirect });
    if (e.listen) {
      await this.server.listenExport('export', e.name, e.listen.host, e.listen.port);
      if (e.oldstylePort !== undefined) await this.server.listenExport('oldstyle', e.name, e.listen.host, e.oldstylePort);
    } else if (e.oldstylePort !== undefined) await this.server.listenOldstyle(e.name, this.cfg.listen, e.oldstylePort);
    return oe;
  }

  /** `ctl postcopy`: the export is handed over to a post-copy destination (migration/postcopy-handover.ts handOver). */
  async handOver(name: string, o: { target: string; handoff: 'forward' | 'disconnect'; cutoverTimeoutMs?: number }): Promise<unknown> {
    const oe = this.open.get(name);
    const old = this.registry.get(name);
    if (!oe || !old || old.name !== name) throw new JobError('ENOENT', `no export named "${name}"`);
    if (this.controller.running().some((j) => j.source.name === name)) throw new JobError('EBUSY', `a mirror of "${name}" is running: abort it first`);
    if (oe.stack.switch.switched) throw new JobError('EINVAL', `export "${name}" was already switched to another disk`);
    if (oe.config.readOnly) throw new JobError('EROFS', `export "${name}" is read-only: nothing to hold; let the destination fetch from it as it is`);
    return this.doHandOver(name, o);
  }

  /** The hand-over itself: after ctl postcopy's checks, or a mirror's --converge postcopy switch (with its dirty bitmap). */
  private doHandOver(name: string, o: { target: string; handoff: 'forward' | 'disconnect'; dirty?: DirtyBitmap; cutoverTimeoutMs?: number }) {
    const oe = this.open.get(name);
    const old = this.registry.get(name);
    if (!oe || !old || old.name !== name) throw new JobError('ENOENT', `no export named "${name}"`);
    return handOver({
      name,
      image: oe.config.path,
      exportId: oe.source.exportId,
      stack: oe.stack,
      destination: o.target,
      handoff: o.handoff,
      dirty: o.dirty,
      cutoverTimeoutMs: o.cutoverTimeoutMs,
      replaceExport: (device, extension) => {
        this.registry.remove(name);
        this.registry.add(new Export({ name, description: old.description, device, extension, id: old.id, acl: old.acl }));
      },
      restoreExport: () => {
        this.registry.remove(name);
        this.registry.add(old);
      },
      disconnectClients: () => oe.source.disconnectClients(),
      wrapRemote: oe.source.wrapRemote,
    });
  }

  /** Takes an export away from new clients; connected ones keep it until they disconnect. */
  async retireExport(name: string): Promise<void> {
    const oe = this.open.get(name);
    if (!oe) return;
    await this.server.closeOldstyle(name);
    this.server.closeExportListeners(name, 'export removed');
    this.registry.remove(name);
    this.sources.delete(name);
    this.postcopies.delete(name);
    this.open.delete(name);
    this.retiring.add(oe);
    log('info', 'export-removed', { export: name, connections: this.server.connectionsByExport().get(name) ?? 0 });
    this.reaper ??= setInterval(() => void this.reap(), 1000);
    await this.reap();
  }

  private async reap(): Promise<void> {
    const conns = this.server.connectionsByExport();
    for (const oe of [...this.retiring]) {
      if ((conns.get(oe.config.name) ?? 0) > 0) continue;
      this.retiring.delete(oe);
      await closeExport(oe);
      // A reload's new export of that name waited for this one's state folder: it opens now.
      const waiting = this.deferred.get(oe.config.name);
      if (waiting && !this.open.has(waiting.name)) {
        this.deferred.delete(waiting.name);
        await this.addExport(waiting).then(
          () => log('info', 'export-open-resumed', { export: waiting.name, image: waiting.path }),
          (err) => log('error', 'reload-export-failed', { export: waiting.name, cause: err }),
        );
      }
    }
    if (this.retiring.size === 0 && this.reaper) {
      clearInterval(this.reaper);
      this.reaper = undefined;
    }
  }

  async start(): Promise<void> {
    try {
      for (const e of this.cfg.exports) await this.addExport(e);
      const activated = socketActivationFds();
      if (activated.length > 0) {
        // systemd (or libnbd's nbd_connect_systemd_socket_activation) handed us listening sockets: serve on those.
        for (const fd of activated) await this.server.listenFd(fd);
      } else await this.server.listenNewstyle(this.cfg.listen, this.cfg.port);
      if (this.cfg.socket) await this.server.listenUnix(this.cfg.socket);
      if (this.cfg.adminSocket) {
        this.admin = new AdminServer(this.cfg.adminSocket, adminHandlers({ controller: this.controller, server: this.server, postcopy: this.postcopies, handOver: (n, o) => this.handOver(n, o) }));
        await this.admin.listen();
      }
      if (this.cfg.metrics) {
        // prom-client loads only when metrics are asked for: ~30 ms of every server's start otherwise.
        const { buildRegistry, startMetricsServer } = await import('../metrics/exporter.js');
        this.metrics = await startMetricsServer(this.cfg.metrics, buildRegistry({ exports: this.registry, server: this.server.stats, controller: this.controller, postcopy: this.postcopies }));
      }
      applyBusyPoll(this.cfg.busyPollUs);
    } catch (err) {
      await this.stop();
      throw err;
    }
    log('info', 'ready', { exports: this.cfg.exports.map((e) => e.name), listeners: this.server.bound, adminSocket: this.cfg.adminSocket });
  }

  /**
   * SIGHUP: exports added to the configuration are opened, removed ones retired,
   * changed ones replaced; connections to exports that stay are untouched.
   * Listener addresses, the admin socket and metrics are not rebound.
   */
  async reload(next: ServeConfig): Promise<void> {
    const wanted = new Map(next.exports.map((e) => [e.name, e]));
    this.deferred.clear(); // this configuration decides: still blocked ones are deferred again below
    const busy = new Set(this.controller.running().map((j) => j.source.name));
    for (const [name, oe] of [...this.open]) {
      const w = wanted.get(name);
      if (w && sameExport(w, oe.config)) continue;
      if (busy.has(name)) {
        log('error', 'reload-skipped', { export: name, cause: 'a mirror of this export is running' });
        wanted.delete(name);
        continue;
      }
      await this.retireExport(name);
    }
    this.cfg = { ...this.cfg, exports: next.exports, force: next.force, busyPollUs: next.busyPollUs };
    applyBusyPoll(next.busyPollUs);
    for (const [name, e] of wanted) {
      if (this.open.has(name)) continue;
      try {
        await this.addExport(e);
      } catch (err) {
        if (err instanceof StateFolderBusy && err.sameProcess && [...this.retiring].some((r) => r.config.name === name)) {
          this.deferred.set(name, e);
          log('warn', 'export-open-deferred', { export: name, image: e.path, cause: err, effect: 'opens once the retired export of that name has closed' });
        } else log('error', 'reload-export-failed', { export: name, cause: err });
      }
    }
    log('info', 'reloaded', { exports: [...this.open.keys()] });
  }

  async stop(): Promise<void> {
    setBusyPoll(0); // the process may go on (tests, a library user): its loop sleeps as Node's does again
    await this.admin?.close();
    await this.metrics?.close();
    // Mirrors not yet switched stop, resumable (flushed target, stored bitmap and record, the destination
    // still bound: MirrorJob.stop); the source stays authoritative. A cutover in progress finishes.
    this.controller.evacuations.cancel(); // queued exports of an evacuation do not start
    await Promise.all(this.controller.running().map((j) => (j.state === 'cutting-over' ? j.finished() : j.stop().catch(() => undefined))));
    await this.server.close(this.cfg.shutdownTimeout * 1000);
    if (this.reaper) clearInterval(this.reaper);
    // Side by side, so that frozen targets cost one flush bound in all, not one each; an export
    // retired under a name still open closes after that one (they share its state folder).
    const byName = new Map<string, OpenExport[]>();
    for (const oe of [...this.open.values(), ...this.retiring]) {
      const list = byName.get(oe.config.name);
      if (list) list.push(oe);
      else byName.set(oe.config.name, [oe]);
    }
    await Promise.all([...byName.values()].map(async (list) => {
      for (const oe of list) await closeExport(oe);
    }));
    this.deferred.clear();
    this.open.clear();
    this.retiring.clear();
  }
}

/**
 * Closes an export that no client uses any more: its final flush (bounded: an unreachable
 * target must not hold up shutdown or a reload), its target after a cutover, checkpoints,
 * post-copy, state and image. A target that did not answer the flush is not waited for:
 * its close would wait for that flush first.
 */
async function closeExport(oe: OpenExport): Promise<void> {
  const name = oe.config.name;
  const flushed = await settledWithin(
    oe.stack.device.flush().catch((e) => log('error', 'flush-failed', { export: name, cause: e })),
    SHUTDOWN_FLUSH_MS,
  );
  const target = oe.stack.switch.target;
  if (!flushed) {
    log('error', 'flush-timeout', { export: name, timeoutMs: SHUTDOWN_FLUSH_MS, effect: target ? 'its target is left without waiting for it' : 'closing anyway' });
    void target?.close().catch(() => undefined);
  } else await target?.close().catch(() => undefined);
  closeCheckpoints(oe);
  await oe.postcopy?.close().catch((e) => log('error', 'postcopy-close-failed', { export: name, cause: e }));
  await closeState(oe);
  await oe.file.close().catch((e) => log('error', 'close-failed', { image: oe.file.path, cause: e }));
  oe.unlockState?.();
}

/** Sets the event loop's polling bound; a bound that cannot be applied is said, not ignored. */
function applyBusyPoll(us: number): void {
  const inForce = setBusyPoll(us);
  const st = busyPollStatus();
  if (st.unavailable) log('warn', 'busy-poll-unavailable', { busyPollUs: us, cause: st.unavailable, effect: 'the event loop sleeps between requests: low-queue-depth I/O pays a wake-up per request' });
  else log('debug', 'busy-poll', { busyPollUs: inForce });
}

export async function startServe(cfg: ServeConfig): Promise<RunningServer> {
  const p = new ServeProcess(cfg);
  await p.start();
  return p;
}

/** What SIGHUP does not re-apply: listeners, admin socket, metrics, TLS and limits are set up once, at startup. */
const RESTART_ONLY = [
  'listen', 'port', 'socket', 'adminSocket', 'metrics', 'tls', 'tlsCert', 'tlsKey', 'tlsCa',
  'onCutover', 'onCutoverTimeout', 'handshakeTimeout', 'maxConnections', 'maxConnectionsPerExport', 'idleTimeout', 'shutdownTimeout', 'dirtyGranularity',
] as const;

/** A reload that changes settings only a restart applies says so, naming them, instead of ignoring them silently. */
function warnRestartNeeded(running: ServeConfig, next: ServeConfig): void {
  const changes: Record<string, { running: unknown; configured: unknown }> = {};
  for (const k of RESTART_ONLY) if (running[k] !== next[k]) changes[k] = { running: running[k] ?? null, configured: next[k] ?? null };
  const changed = Object.keys(changes);
  if (changed.length === 0) return;
  log('warn', 'reload-restart-needed', {
    changed,
    changes,
    cause: `${changed.join(', ')} changed in the configuration, but SIGHUP only re-reads exports; restart nbd-migrate to apply ${changed.length > 1 ? 'them' : 'it'}`,
  });
}

/** Serves until a termination signal, then shuts down cleanly; SIGHUP re-reads the configuration. */
export async function serveUntilSignal(cfg: ServeConfig, reread?: () => ServeConfig): Promise<void> {
  // The handlers are in place before startup logs "ready": a signal sent right after it must
  // get a clean shutdown (or reload), not the default action, which kills the process.
  let early: NodeJS.Signals | undefined;
  let onSignal = (sig: NodeJS.Signals): void => void (early ??= sig);
  let onHup = () => log('info', 'reload-ignored', { cause: 'still starting' });
  process.on('SIGTERM', (sig) => onSignal(sig));
  process.on('SIGINT', (sig) => onSignal(sig));
  process.on('SIGHUP', () => onHup());
  const running = await startServe(cfg);
  let reloading = Promise.resolve();
  onHup = () => {
    reloading = reloading.then(async () => {
      if (!reread) return log('info', 'reload-ignored', { cause: 'nothing to re-read' });
      let next: ServeConfig;
      try {
        next = reread();
      } catch (e) {
        return log('error', 'reload-failed', { cause: e, effect: 'the running configuration stays' });
      }
      warnRestartNeeded(cfg, next);
      await running.reload(next);
    });
  };
  await new Promise<void>((resolve) => {
    let stopping = false;
    onSignal = (sig: NodeJS.Signals) => {
      if (stopping) return log('info', 'shutdown-in-progress', { signal: sig });
      stopping = true;
      log('info', 'shutdown', { signal: sig, shutdownTimeoutMs: cfg.shutdownTimeout * 1000 });
      // The drain and the final flushes are each bounded; this is the backstop for anything else
      // (a mirror abort or cutover that does not end), so the process exits well within systemd's TimeoutStopSec.
      const limitMs = cfg.shutdownTimeout * 1000 + SHUTDOWN_FLUSH_MS + SHUTDOWN_SLACK_MS;
      setTimeout(() => {
        log('error', 'shutdown-forced', { afterMs: limitMs, cause: 'shutdown did not finish in time' });
        process.exit(1);
      }, limitMs).unref();
      running.stop().then(
        () => {
          log('info', 'stopped');
          // Everything is flushed and closed: a handle left open must not keep the process alive.
          setTimeout(() => {
            log('warn', 'exit-forced', { cause: 'handles still open after shutdown' });
            process.exit(0);
          }, 1000).unref();
          resolve();
        },
        (e) => {
          log('error', 'shutdown-failed', { cause: e });
          process.exitCode = 1;
          resolve();
        },
      );
    };
    if (early) onSignal(early);
  });
}
