/**
 * Listeners and connection lifecycle: newstyle on TCP (10809 by default) and on
 * Unix sockets, oldstyle on one TCP port per export. Each accepted socket goes
 * handshake -> transmission -> closed; a handshake that stalls is dropped.
 */
import * as fs from 'node:fs';
import { settledWithin } from '../util/within.js';
import * as net from 'node:net';
import { NbdMigrateError } from '../util/errors.js';
import { logger } from '../util/log.js';
import { Connection, ConnectionClosed } from './connection.js';
import type { Acl } from './acl.js';
import { type Export, ExportRegistry } from './export.js';
import {
  DEFAULT_HANDSHAKE_LIMITS,
  HandshakeError,
  type HandshakeLimits,
  type Negotiated,
  newstyleHandshake,
  type TlsPolicy,
  oldstyleHandshake,
} from './handshake.js';
import { DEFAULT_SESSION_LIMITS, Session, type SessionLimits } from './session.js';
import { MemoryBudget } from './memory-budget.js';
import { ServerStats } from './stats.js';

export const DEFAULT_NBD_PORT = 10809;
/** How long shutdown lets connections drain before closing them (--shutdown-timeout). */
export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 10_000;

export interface ServerOptions {
  handshakeTimeoutMs: number;
  handshake: HandshakeLimits;
  session: SessionLimits;
  /** Connections open at once, all listeners together; past it new ones are closed at once. */
  maxConnections: number;
  /** Connections in transmission with one export; past it GO gets ERR_POLICY. */
  maxConnectionsPerExport: number;
  /** STARTTLS support; undefined answers it ERR_UNSUP. */
  tls?: TlsPolicy;
  /** Request payload bytes held at once across all connections (see MemoryBudget). */
  memoryBudget: number;
}

export const DEFAULT_SERVER_OPTIONS: ServerOptions = {
  handshakeTimeoutMs: 10_000,
  handshake: DEFAULT_HANDSHAKE_LIMITS,
  session: DEFAULT_SESSION_LIMITS,
  maxConnections: 1024,
  maxConnectionsPerExport: 256,
  memoryBudget: 256 * 1024 * 1024,
};

/** 'export': newstyle on an export's own address (listen=), offering that export only. */
export type ListenerKind = 'newstyle' | 'oldstyle' | 'unix' | 'export';

export interface BoundListener {
  kind: ListenerKind;
  /** For oldstyle and export listeners: the one export this port serves. */
  exportName?: string;
  address?: string;
  port?: number;
  path?: string;
  /** Inherited file descriptor (socket activation). */
  fd?: number;
}

const log = logger();

export class NbdServer {
  private readonly listeners: Array<{ server: net.Server; info: BoundListener }> = [];
  /** Exports' own addresses not on this host yet, retried until they appear (by export). */
  private readonly pendingBinds = new Map<string, Set<() => void>>();
  private readonly connections = new Set<Connection>();
  private readonly sessions = new Set<Session>();
  /** Connections past the handshake (shutdown drains these; the others are simply closed). */
  private readonly transmitting = new WeakSet<Connection>();
  private nextId = 1;
  private closing = false;
  readonly stats = new ServerStats();
  private readonly budget: MemoryBudget;

  constructor(
    readonly exports: ExportRegistry,
    private readonly options: ServerOptions = DEFAULT_SERVER_OPTIONS,
  ) {
    this.budget = new MemoryBudget(options.memoryBudget);
  }

  get bound(): BoundListener[] {
    return this.listeners.map((l) => l.info);
  }

  async listenNewstyle(host: string, port: number): Promise<BoundListener> {
    return this.listen({ kind: 'newstyle' }, (s) => s.listen(port, host));
  }

  async listenOldstyle(exportName: string, host: string, port: number): Promise<BoundListener> {
    if (!this.exports.get(exportName)) throw new Error(`oldstyle port for unknown export "${exportName}"`);
    return this.listen({ kind: 'oldstyle', exportName }, (s) => s.listen(port, host));
  }

  /**
   * An export's own listener (--export NAME=PATH,listen=ADDR): newstyle offering
   * only that export (the default name "" is it), or oldstyle. An address that
   * is not on this host (EADDRNOTAVAIL: the address moves with the disk and is
   * still on the other host, or still tentative) is bound as soon as it
   * appears: the bind is retried with backoff until then. Resolves after the
   * first attempt, with the listener if it is bound; other errors reject.
   */
  async listenExport(kind: 'export' | 'oldstyle', exportName: string, host: string, port: number): Promise<BoundListener | undefined> {
    if (!this.exports.get(exportName)) throw new Error(`listener for unknown export "${exportName}"`);
    const attempt = () => this.listen({ kind, exportName }, (s) => s.listen(port, host));
    try {
      return await attempt();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EADDRNOTAVAIL')
        throw new Error(`export "${exportName}": cannot listen on ${host.includes(':') ? `[${host}]` : host}:${port}: ${(e as Error).message}`, { cause: e });
      log.warn('listen-pending', {
        listener: kind, export: exportName, address: host, port, cause: (e as Error).message,
        effect: 'the address is not on this host yet; bound as soon as it appears',
      });
    }
    let delay = 50;
    let timer: NodeJS.Timeout | undefined;
    const cancels = this.pendingBinds.get(exportName) ?? new Set<() => void>();
    this.pendingBinds.set(exportName, cancels);
    let cancelled = false;
    const cancel = () => {
      cancelled = true;
      clearTimeout(timer);
      cancels.delete(cancel);
    };
    cancels.add(cancel);
    const retry = () => {
      timer = setTimeout(() => {
        if (cancelled || this.closing) return cancel();
        attempt().then(
          (info) => {
            // Closed (handoff, reload, shutdown) while the bind was under way: it does not stay.
            if (cancelled || this.closing) this.closeListener(info, 'closed while binding');
            else cancel();
          },
          (e: NodeJS.ErrnoException) => {
            if (cancelled) return;
            if (e.code !== 'EADDRNOTAVAIL') {
              cancel();
              return log.error('listen-failed', { listener: kind, export: exportName, address: host, port, cause: e });
            }
            delay = Math.min(delay * 2, 500);
            retry();
          },
        );
      }, delay);
      timer.unref();
    };
    retry();
    return undefined;
  }

  /**
   * Closes an export's own listeners (handoff, reload) and gives up binding
   * any still pending. Connections they accepted stay; nothing new is accepted.
   */
  closeExportListeners(exportName: string, reason: string): void {
    for (const cancel of [...(this.pendingBinds.get(exportName) ?? [])]) cancel();
    this.pendingBinds.delete(exportName);
    for (const l of this.listeners.filter((x) => x.info.exportName === exportName)) this.closeListener(l.info, reason);
  }

  private closeListener(info: BoundListener, reason: string): void {
    const i = this.listeners.findIndex((l) => l.info === info);
    if (i < 0) return;
    const [l] = this.listeners.splice(i, 1);
    // close() stops accepting at once; its callback waits for the connections, which are not waited for here.
    l!.server.close();
    log.info('listener-closed', { listener: info.kind, export: info.exportName, address: info.address, port: info.port, reason });
  }

  /** Newstyle on an inherited, already listening socket (systemd socket activation). */
  async listenFd(fd: number): Promise<BoundListener> {
    return this.listen({ kind: 'newstyle', fd }, (s) => s.listen({ fd }));
  }

  async listenUnix(path: string): Promise<BoundListener> {
    await removeStaleSocket(path);
    return this.listen({ kind: 'unix', path }, (s) => s.listen(path));
  }

  private listen(info: BoundListener, start: (s: net.Server) => void): Promise<BoundListener> {
    const server = net.createServer({ noDelay: true }, (socket) => this.accept(socket, info));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.once('listening', () => {
        server.off('error', reject);
        server.on('error', (err) => log.error('listener-error', { listener: info.kind, cause: err }));
        const a = server.address();
        if (a && typeof a === 'object') {
          info.address = a.address;
          info.port = a.port;
        }
        this.listeners.push({ server, info });
        log.info('listening', { listener: info.kind, export: info.exportName, address: info.address, port: info.port, path: info.path, fd: info.fd });
        resolve(info);
      });
      start(server);
    });
  }

  private accept(socket: net.Socket, listener: BoundListener): void {
    const id = this.nextId++;
    const remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    const conn = new Connection(id, socket, logger({ conn: id }));
    if (this.closing) {
      this.stats.refuse('shutdown');
      conn.destroy(); // the accepted socket's handle now belongs to the connection's socket
      return;
    }
    // An export's own address serves that export only, and only once it takes guests
    // (an --incoming destination: after MIGRATE_COMPLETE). Before that, a client is closed at once.
    if (listener.exportName !== undefined) {
      const exp = this.exports.get(listener.exportName);
      const why = exp ? exp.admission([]) : `export "${listener.exportName}" is gone`;
      if (why) {
        this.stats.refuse('not-open');
        conn.log.info('connection-refused', { listener: listener.kind, export: listener.exportName, remote, cause: why });
        conn.destroy();
        return;
      }
    }
    if (this.connections.size >= this.options.maxConnections) {
      this.stats.refuse('connection-limit');
      conn.log.warn('connection-refused', { remote, cause: `${this.options.maxConnections} connections already open (--max-connections)` });
      conn.destroy();
      return;
    }
    this.connections.add(conn);
    this.stats.accepted++;
    this.stats.open++;
    conn.log.info('connection-open', { listener: listener.kind, remote });
    conn.onClose(() => {
      this.connections.delete(conn);
      this.stats.open--;
      conn.log.info('connection-closed');
    });
    void this.handshake(conn, listener);
  }

  private async handshake(conn: Connection, listener: BoundListener): Promise<void> {
    const timer = setTimeout(() => {
      conn.log.warn('handshake-timeout', { timeoutMs: this.options.handshakeTimeoutMs, action: 'disconnect' });
      this.stats.refuse('handshake-timeout');
      conn.destroy();
    }, this.options.handshakeTimeoutMs);
    let negotiated: Negotiated | null;
    try {
      if (listener.kind === 'oldstyle') {
        const exp = this.exports.get(listener.exportName!);
        if (!exp) throw new HandshakeError(`export "${listener.exportName}" is gone`);
        // Oldstyle has no way to say no: a refused client is disconnected before the greeting.
        const why = this.admit(exp, conn);
        if (why) throw new HandshakeError(why);
        negotiated = oldstyleHandshake(conn, exp);
      } else {
        const offered = listener.kind === 'export' ? new OneExport(this.exports, listener.exportName!) : this.exports;
        negotiated = await newstyleHandshake(conn, offered, this.options.handshake, (exp, c) => this.admit(exp, c), this.options.tls);
      }
    } catch (e) {
      if (!(e instanceof ConnectionClosed)) {
        conn.log.warn('handshake-failed', { cause: e, action: 'disconnect' });
        this.stats.refuse('handshake-failed');
      }
      conn.destroy();
      return;
    } finally {
      clearTimeout(timer);
    }
    if (!negotiated) {
      conn.log.info('handshake-aborted');
      conn.end();
      return;
    }
    if (this.closing) {
      conn.destroy(); // negotiated while shutdown began: nothing in flight yet
      return;
    }
    const session = new Session(conn, negotiated, this.options.session, this.budget);
    this.sessions.add(session);
    this.transmitting.add(conn);
    conn.onClose(() => this.sessions.delete(session));
    session.start();
  }

  /** The server's admission rules for one export: its address list, then the per-export limit. */
  private admit(exp: Export, conn: Connection): string | undefined {
    if (exp.acl && !exp.acl.allows(conn.remoteAddress)) {
      this.stats.refuse('acl');
      return `client ${conn.remoteAddress} is not allowed to attach to export "${exp.name}"`;
    }
    const attached = this.connectionsByExport().get(exp.name) ?? 0;
    if (attached >= this.options.maxConnectionsPerExport) {
      this.stats.refuse('export-connection-limit');
      return `export "${exp.name}" already has ${attached} connections (--max-connections-per-export)`;
    }
    return undefined;
  }

  /** Replaces an export's address list and disconnects attached clients it no longer allows. */
  setAcl(exportName: string, acl: Acl | undefined): number {
    const exp = this.exports.get(exportName);
    if (!exp || exp.name !== exportName) throw new NbdMigrateError('ENOENT', `no export named "${exportName}"`);
    exp.acl = acl;
    let dropped = 0;
    for (const s of this.sessions)
      if (s.exportName === exportName && acl && !acl.allows(s.remoteAddress)) dropped += s.destroy('acl') ? 1 : 0;
    logger().info('acl-changed', { export: exportName, allow: acl?.entries ?? null, disconnected: dropped });
    return dropped;
  }

  /** Stops the oldstyle listener of an export (on reload). */
  async closeOldstyle(exportName: string): Promise<void> {
    const i = this.listeners.findIndex((l) => l.info.kind === 'oldstyle' && l.info.exportName === exportName);
    if (i < 0) return;
    const [l] = this.listeners.splice(i, 1);
    await new Promise<void>((r) => l!.server.close(() => r()));
  }

  /** Hard-closes every connection attached to an export (their clients reconnect elsewhere). */
  disconnectExport(name: string): number {
    let n = 0;
    for (const s of this.sessions) if (s.exportName === name) n += s.destroy('handoff') ? 1 : 0;
    return n;
  }

  /**
   * Handoff after a cutover (--handoff disconnect): every connection attached
   * to the export stops reading, finishes and answers what it has read (on the
   * target by now), then closes. Bounded by `timeoutMs` per connection.
   * Resolves with the number of connections handed off.
   */
  async handOffExport(name: string, timeoutMs: number): Promise<number> {
    const mine = [...this.sessions].filter((s) => s.exportName === name);
    await Promise.all(mine.map((s) => s.handOff(timeoutMs)));
    return mine.length;
  }

  /** Connections in transmission with each export. */
  connectionsByExport(): Map<string, number> {
    const m = new Map<string, number>();
    for (const s of this.sessions) m.set(s.exportName, (m.get(s.exportName) ?? 0) + 1);
    return m;
  }

  /**
   * Shutdown: stops accepting, drops connections still negotiating, lets
   * in-flight requests finish while new ones get NBD_ESHUTDOWN, closes each
   * connection once it has nothing in flight, and after `drainTimeoutMs`
   * hard-closes whatever is left. Bounded: never waits on a client.
   */
  async close(drainTimeoutMs = DEFAULT_SHUTDOWN_TIMEOUT_MS): Promise<void> {
    this.closing = true;
    for (const name of [...this.pendingBinds.keys()]) this.closeExportListeners(name, 'shutdown');
    // net.Server.close() calls back only once all its connections are gone, so it is awaited last.
    const listenersClosed = Promise.all(this.listeners.map((l) => new Promise<void>((r) => l.server.close(() => r()))));
    for (const c of this.connections) if (!this.transmitting.has(c)) c.destroy();
    const sessions = [...this.sessions];
    log.info('shutdown-draining', { connections: sessions.length, timeoutMs: drainTimeoutMs });
    const allClosed = () => Promise.all([...this.connections].map((c) => new Promise<void>((r) => c.onClose(r))));
    const drained = Promise.all(sessions.map((s) => s.shutdown())).then(allClosed);
    const timedOut = !(await settledWithin(drained, drainTimeoutMs));
    if (timedOut)
      log.warn('shutdown-timeout', { timeoutMs: drainTimeoutMs, connections: this.connections.size, action: 'disconnect' });
    for (const c of this.connections) c.destroy();
    await listenersClosed;
  }
}

/** What an export's own listener offers: that export alone, under its name and as the default (""). */
class OneExport extends ExportRegistry {
  constructor(
    private readonly all: ExportRegistry,
    private readonly only: string,
  ) {
    super();
  }

  override get(name: string): Export | undefined {
    const e = this.all.get(this.only);
    return e && (name === '' || name === e.name) ? e : undefined;
  }

  override list(): Export[] {
    const e = this.all.get(this.only);
    return e ? [e] : [];
  }
}

/** A leftover socket file from a dead server would make listen() fail with EADDRINUSE. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new Error(`${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new Error(`${path} is in use by a running server`);
  fs.unlinkSync(path);
}
