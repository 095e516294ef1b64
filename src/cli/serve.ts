/**
 * `nbd-migrate serve`: opens the images, binds the listeners, serves until
 * SIGTERM/SIGINT, then drains in-flight requests, flushes, and closes.
 */
import { Export, ExportRegistry } from '../server/export.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../server/server.js';
import { FileDevice } from '../storage/file-device.js';
import { log } from '../util/log.js';
import type { ServeConfig } from './config.js';

export interface RunningServer {
  server: NbdServer;
  stop(): Promise<void>;
}

export async function startServe(cfg: ServeConfig): Promise<RunningServer> {
  const registry = new ExportRegistry();
  const devices: FileDevice[] = [];
  const closeDevices = async () => {
    for (const d of devices) {
      try {
        await d.close();
      } catch (e) {
        log('error', 'close-failed', { image: d.path, cause: e });
      }
    }
  };
  try {
    for (const e of cfg.exports) {
      let device: FileDevice;
      try {
        device = await FileDevice.open(e.path, { readOnly: e.readOnly });
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (code === 'EWOULDBLOCK' || code === 'EAGAIN')
          throw new Error(`export "${e.name}": ${e.path} is already in use by another server (it holds the image lock)`, { cause: err });
        throw new Error(`export "${e.name}": cannot open ${e.path}: ${(err as Error).message}`, { cause: err });
      }
      devices.push(device);
      registry.add(new Export({ name: e.name, description: e.description, device }));
      log('info', 'export-added', { export: e.name, image: e.path, size: device.size, readOnly: e.readOnly, storage: device.sparseKind });
    }
    const server = new NbdServer(registry, { ...DEFAULT_SERVER_OPTIONS, handshakeTimeoutMs: cfg.handshakeTimeout * 1000 });
    const stop = async () => {
      await server.close();
      for (const d of devices) await d.flush().catch(() => undefined);
      await closeDevices();
    };
    try {
      await server.listenNewstyle(cfg.listen, cfg.port);
      if (cfg.socket) await server.listenUnix(cfg.socket);
      for (const e of cfg.exports) if (e.oldstylePort !== undefined) await server.listenOldstyle(e.name, cfg.listen, e.oldstylePort);
    } catch (err) {
      await server.close();
      throw err;
    }
    log('info', 'ready', { exports: cfg.exports.map((e) => e.name), listeners: server.bound });
    return { server, stop };
  } catch (err) {
    await closeDevices();
    throw err;
  }
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
