/**
 * `nbd-migrate serve`: opens the images, builds each export's device stack,
 * binds the listeners and the admin socket, serves until SIGTERM/SIGINT, then
 * aborts unfinished mirrors, drains in-flight requests, flushes, and closes.
 *
 * Device stack per export, top to bottom:
 *   gate (cutover hold, guest throttle; swaps to the target at cutover)
 *   dirty tracking (marks the bitmap; write-through when the mirror is active)
 *   file (the raw image)
 */
import { AdminServer } from '../admin/server.js';
import { DirtyBitmap } from '../dirty/bitmap.js';
import { DirtyTrackingDevice } from '../dirty/tracking-device.js';
import { MigrationController } from '../migration/controller.js';
import { GateDevice } from '../migration/gate-device.js';
import type { MirrorSource } from '../migration/job.js';
import { clearIncoming, readFenced, readIncoming, writeIncoming } from '../migration/markers.js';
import { Export, ExportRegistry } from '../server/export.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../server/server.js';
import { FileDevice } from '../storage/file-device.js';
import { buildRegistry, startMetricsServer } from '../metrics/exporter.js';
import { log } from '../util/log.js';
import { parseDurationMs, parseSize } from '../util/units.js';
import { ConfigError, type ExportConfig, type ServeConfig } from './config.js';

export interface RunningServer {
  server: NbdServer;
  controller: MigrationController;
  stop(): Promise<void>;
}

/** Refuses images that must not be served read-write: migrated away, or half-received. */
function checkMarkers(e: ExportConfig, force: boolean): void {
  if (e.readOnly || force) return;
  const fenced = readFenced(e.path);
  if (fenced)
    throw new ConfigError(
      `export "${e.name}": ${e.path} was migrated to ${fenced.target ?? '?'} at ${fenced.time ?? '?'} and is fenced; ` +
        `serving it read-write would fork the disk (use --read-only, or --force if you really mean it)`,
    );
  if (!e.incoming && readIncoming(e.path))
    throw new ConfigError(
      `export "${e.name}": ${e.path} is the destination of an unfinished migration (half-copied); ` +
        `serve it with --incoming to resume receiving, or --force`,
    );
}

export async function startServe(cfg: ServeConfig): Promise<RunningServer> {
  const registry = new ExportRegistry();
  const sources = new Map<string, MirrorSource>();
  const devices: FileDevice[] = [];
  const closeDevices = async () => {
    for (const d of devices) await d.close().catch((e) => log('error', 'close-failed', { image: d.path, cause: e }));
  };
  let server: NbdServer | undefined;
  const granularity = cfg.dirtyGranularity;
  try {
    for (const e of cfg.exports) {
      checkMarkers(e, cfg.force);
      let file: FileDevice;
      try {
        file = await FileDevice.open(e.path, { readOnly: e.readOnly });
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === 'EWOULDBLOCK')
          throw new Error(`export "${e.name}": ${e.path} is already in use by another server (it holds the image lock)`, { cause: err });
        throw new Error(`export "${e.name}": cannot open ${e.path}: ${(err as Error).message}`, { cause: err });
      }
      devices.push(file);
      const bitmap = new DirtyBitmap(file.size, granularity);
      const tracking = new DirtyTrackingDevice(file, bitmap);
      const gate = new GateDevice(tracking);
      let incoming: { onComplete(): Promise<void> } | undefined;
      if (e.incoming) {
        if (e.readOnly) throw new ConfigError(`export "${e.name}": --incoming needs a writable image`);
        if (!readIncoming(e.path)) writeIncoming(e.path, { export: e.name, since: new Date().toISOString() });
        incoming = {
          onComplete: async () => {
            clearIncoming(e.path);
            log('info', 'incoming-complete', { export: e.name, image: e.path });
          },
        };
      }
      registry.add(new Export({ name: e.name, description: e.description, device: gate, incoming }));
      sources.set(e.name, { name: e.name, image: e.path, size: file.size, gate, tracking, bitmap, disconnectClients: () => server?.disconnectExport(e.name) });
      log('info', 'export-added', {
        export: e.name,
        image: e.path,
        size: file.size,
        readOnly: e.readOnly,
        incoming: e.incoming ?? false,
        storage: file.sparseKind,
      });
    }
    server = new NbdServer(registry, { ...DEFAULT_SERVER_OPTIONS, handshakeTimeoutMs: cfg.handshakeTimeout * 1000 });
    const srv = server;
    const controller = new MigrationController(sources, () => srv.connectionsByExport());
    const admin = cfg.adminSocket ? new AdminServer(cfg.adminSocket, adminHandlers(controller)) : undefined;
    let metrics: { close(): Promise<void> } | undefined;
    const stop = async () => {
      await admin?.close();
      await metrics?.close();
      // Mirrors not yet switched are aborted: the source stays authoritative. A cutover in progress finishes.
      await Promise.all(controller.running().map((j) => (j.state === 'cutting-over' ? j.finished() : j.abort().catch(() => undefined))));
      await srv.close();
      for (const s of sources.values()) await s.gate.flush().catch(() => undefined);
      await closeDevices();
    };
    try {
      await srv.listenNewstyle(cfg.listen, cfg.port);
      if (cfg.socket) await srv.listenUnix(cfg.socket);
      for (const e of cfg.exports) if (e.oldstylePort !== undefined) await srv.listenOldstyle(e.name, cfg.listen, e.oldstylePort);
      await admin?.listen();
      if (cfg.metrics) metrics = await startMetricsServer(cfg.metrics, buildRegistry({ exports: registry, server: srv.stats, controller }));
    } catch (err) {
      await admin?.close();
      await metrics?.close();
      await srv.close();
      throw err;
    }
    log('info', 'ready', { exports: cfg.exports.map((e) => e.name), listeners: srv.bound, adminSocket: cfg.adminSocket });
    return { server: srv, controller, stop };
  } catch (err) {
    await closeDevices();
    throw err;
  }
}

function str(args: Record<string, unknown>, key: string): string {
  const v = args[key];
  if (typeof v !== 'string' || v === '') throw Object.assign(new Error(`"${key}" must be a non-empty string`), { code: 'EINVAL' });
  return v;
}

function oneOf<T extends string>(args: Record<string, unknown>, key: string, allowed: readonly T[]): T | undefined {
  const v = args[key];
  if (v === undefined) return undefined;
  if (!allowed.includes(v as T)) throw Object.assign(new Error(`"${key}" must be one of ${allowed.join(', ')}`), { code: 'EINVAL' });
  return v as T;
}

function invalid<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw Object.assign(e as Error, { code: 'EINVAL' });
  }
}

/** The admin socket's commands (documented in the README). */
export function adminHandlers(c: MigrationController): Record<string, (a: Record<string, unknown>) => unknown> {
  return {
    status: (a) => (a.export === undefined ? c.status() : c.jobStatus(str(a, 'export'))),
    mirror: (a) => {
      const opts: Parameters<MigrationController['mirror']>[1] = { target: str(a, 'target') };
      if (a.maxBandwidth !== undefined) opts.maxBandwidth = invalid(() => parseSize(a.maxBandwidth, 'maxBandwidth')) || undefined;
      if (a.maxDowntime !== undefined) opts.maxDowntimeMs = invalid(() => parseDurationMs(a.maxDowntime, 'maxDowntime'));
      const cutover = oneOf(a, 'cutover', ['auto', 'manual'] as const);
      if (cutover) opts.cutover = cutover;
      const converge = oneOf(a, 'converge', ['active', 'throttle'] as const);
      if (converge) opts.converge = converge;
      const handoff = oneOf(a, 'handoff', ['forward', 'disconnect'] as const);
      if (handoff) opts.handoff = handoff;
      if (a.maxRetries !== undefined) {
        if (!Number.isInteger(a.maxRetries) || (a.maxRetries as number) < 0)
          throw Object.assign(new Error('"maxRetries" must be a non-negative integer'), { code: 'EINVAL' });
        opts.maxRetries = a.maxRetries as number;
      }
      return c.mirror(str(a, 'export'), opts);
    },
    cutover: (a) => c.cutover(str(a, 'export')),
    abort: (a) => c.abort(str(a, 'export')),
    'set-speed': (a) => c.setSpeed(str(a, 'export'), invalid(() => parseSize(a.rate, 'rate')) || undefined),
  };
}

/** Serves until a termination signal, then shuts down cleanly. */
export async function serveUntilSignal(cfg: ServeConfig): Promise<void> {
  const running = await startServe(cfg);
  await new Promise<void>((resolve) => {
    let stopping = false;
    const onSignal = (sig: NodeJS.Signals) => {
      if (stopping) return;
      stopping = true;
      log('info', 'shutdown', { signal: sig });
      running.stop().then(resolve, (e) => {
        log('error', 'shutdown-failed', { cause: e });
        resolve();
      });
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}
