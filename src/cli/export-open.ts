/**
 * Opening one export for `serve`: its image, the markers that refuse it, its
 * state folder (lock, activity log, dirty bitmap), checkpoints, a post-copy
 * destination (--fetch-from) and the device stack over them. The serving
 * process (serve.ts) registers it and binds its listeners.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { MirrorSource } from '../migration/job.js';
import { IncomingMigration } from '../migration/incoming.js';
import type { CutoverHook } from '../migration/on-cutover.js';
import { readFenced, readIncoming, readReceived, writeIncoming } from '../migration/markers.js';
import { Acl } from '../server/acl.js';
import { Export, newExportId } from '../server/export.js';
import type { NbdServer } from '../server/server.js';
import { DeviceInUse, FileDevice } from '../storage/file-device.js';
import { ImageLockConflict } from '../storage/native.js';
import { buildStack, type Stack } from '../storage/stack.js';
import { ExportState } from '../dirty/export-state.js';
import { Checkpoints, FileCheckpointStore } from '../dirty/checkpoints.js';
import { defaultStateDir, lockStateFolder, StateFolder, StateFolderInUse } from '../dirty/state.js';
import { loggedRanges } from '../dirty/activity-log.js';
import { DEFAULT_GRANULARITY } from '../dirty/bitmap.js';
import { PostcopyDestination } from '../migration/postcopy.js';
import { postcopyRefusal } from '../migration/postcopy-store.js';
import { ReadCacheFilter } from '../storage/filters/read-cache.js';
import { log } from '../util/log.js';
import { ConfigError, type ExportConfig, formatListenAddress, type ServeConfig } from './config.js';

/** How long a handoff (--handoff disconnect) lets a connection answer what it has read before closing it hard. */
const HANDOFF_DRAIN_MS = 30_000;

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

/** The export's checkpoints, restored from its state folder (stateDirOf). */
function openCheckpoints(e: ExportConfig, dir: string, file: FileDevice, granularity: number): Checkpoints {
  const checkpoints = new Checkpoints({
    size: file.size,
    granularity,
    store: new FileCheckpointStore(dir),
    // After a crash: the extents the activity log names (read before the log is opened, which empties it).
    recoveredRanges: () => (fs.existsSync(dir) ? loggedRanges(StateFolder.open(dir)) : undefined),
    log: (level, event, fields) => log(level, event, { export: e.name, ...fields }),
  });
  try {
    checkpoints.open();
  } catch (err) {
    throw new Error(`export "${e.name}": cannot restore its checkpoints from ${dir}: ${(err as Error).message}`, { cause: err });
  }
  return checkpoints;
}

/** Stores the export's checkpoints exactly (a clean shutdown); a failure is logged, and the next start over-reports. */
export function closeCheckpoints(oe: OpenExport): void {
  try {
    oe.checkpoints.close();
  } catch (e) {
    log('error', 'checkpoints-store-failed', { export: oe.config.name, cause: e, effect: 'the next start takes every block of every checkpoint as changed' });
  }
}

/** The export's state folder: its own stateDir, else DIR/<name> under --state-dir, else the default (state.ts). */
export function stateDirOf(e: ExportConfig, cfg: ServeConfig, isBlockDevice: boolean): string {
  if (e.stateDir) return e.stateDir;
  if (cfg.stateDir) return path.join(cfg.stateDir, e.name.replace(/[/\0]/g, '_') || '_');
  return defaultStateDir(e.path, e.name, isBlockDevice);
}

/**
 * Crash-safe dirty tracking for a writable export (not while it receives a
 * migration: a half-copied destination has no changes worth keeping): the
 * bitmap recovered from the state folder, the activity log under the tracking.
 */
function openState(e: ExportConfig, cfg: ServeConfig, file: FileDevice, stack: Stack, receiving: boolean): ExportState | undefined {
  if (e.readOnly || receiving || cfg.activityLog === false) return undefined;
  const dir = stateDirOf(e, cfg, file.isBlockDevice);
  let state: ExportState;
  try {
    state = ExportState.open(dir, stack.bitmap, {
      extentBytes: cfg.activityExtent,
      capacity: cfg.activityLogExtents,
      onError: (err) => log('error', 'activity-log-failed', { export: e.name, cause: err, effect: 'writes into extents not yet logged fail with EIO until restart' }),
    });
  } catch (err) {
    throw new Error(`export "${e.name}": cannot open its state folder ${dir}: ${(err as Error).message} (give another with --state-dir, or --no-activity-log)`, { cause: err });
  }
  stack.tracking.activityLog = state.log;
  const r = state.recovery;
  const mirror = state.mirror();
  log(r.logExtents > 0 || r.markedAll ? 'warn' : 'info', 'dirty-recovered', {
    export: e.name,
    stateDir: dir,
    clean: r.logExtents === 0 && !r.markedAll,
    logExtents: r.logExtents,
    dirtyBytes: stack.bitmap.dirtyBytes(),
    ...(r.markedAll ? { markedAll: r.markedAll } : {}),
    extentBytes: state.log.extentBytes,
  });
  if (mirror)
    log('warn', 'mirror-resumable', {
      export: e.name,
      job: mirror.jobId,
      target: mirror.target,
      state: mirror.state,
      dirtyBytes: stack.bitmap.dirtyBytes(),
      effect: `nbd-migrate ctl mirror ${e.name} ${mirror.target} resumes it, copying only what is dirty`,
    });
  return state;
}

/** The state folder is held by another owner; `sameProcess`: this server's own export of that name, still being retired. */
export class StateFolderBusy extends Error {
  constructor(
    message: string,
    readonly sameProcess: boolean,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/**
 * The state folder's lock (state.ts lockStateFolder) for a writable export that
 * keeps state there (the activity log's exports, post-copy destinations, or a
 * folder that exists already: checkpoints); undefined where nothing is kept.
 */
function lockState(e: ExportConfig, cfg: ServeConfig, dir: string): (() => void) | undefined {
  if (e.readOnly) return undefined;
  const receiving = e.incoming === true && !readReceived(e.path);
  if ((receiving || cfg.activityLog === false) && !e.fetchFrom && !fs.existsSync(dir)) return undefined;
  try {
    return lockStateFolder(dir, `export "${e.name}" image ${e.path}`);
  } catch (err) {
    if (!(err instanceof StateFolderInUse)) throw new Error(`export "${e.name}": cannot lock its state folder ${dir}: ${(err as Error).message}`, { cause: err });
    if (err.pid === process.pid)
      throw new StateFolderBusy(
        `export "${e.name}": its state folder ${dir} is in use by this server's previous export of that name, retired by the reload and still serving its clients: it opens once they have disconnected`,
        true,
        { cause: err },
      );
    throw new StateFolderBusy(
      `export "${e.name}": its state folder ${dir} is in use by ${err.holder ?? 'another process'} (another nbd-migrate server): two owners would mix their activity logs and bitmaps. ` +
        'Give this export a folder of its own (--state-dir DIR, or state-dir= on the export), or stop the other server',
      false,
      { cause: err },
    );
  }
}

/** Clean close of the state: the exact bitmap stored (a failure is logged: the next start over-reports from the log). */
export async function closeState(oe: OpenExport): Promise<void> {
  await oe.state?.close().catch((e) => log('error', 'dirty-store-failed', { export: oe.config.name, cause: e, effect: 'the next start recovers from the activity log' }));
}

/** One open export: its config, its device stack and what the mirror needs of it. */
export interface OpenExport {
  config: ExportConfig;
  /** Its state folder and activity log (writable exports). */
  state?: ExportState;
  /** Releases the state folder's lock (after everything in the folder is stored). */
  unlockState?: () => void;
  file: FileDevice;
  stack: Stack;
  source: MirrorSource;
  postcopy?: PostcopyDestination;
  checkpoints: Checkpoints;
}

/** What an export needs of the serving process. */
export interface ExportWiring {
  server: NbdServer;
  /** The export's hand-over to a post-copy destination (ctl postcopy, mirror --converge postcopy). */
  handOver: NonNullable<MirrorSource['handOver']>;
}

/** An opened export, not yet registered nor listening; `exp` is what the registry serves. */
export interface OpenedExport {
  oe: OpenExport;
  exp: Export;
  receiving: boolean;
}

/** Opens export `e`: everything but its registration and its listeners (serve.ts). */
export async function openExport(e: ExportConfig, cfg: ServeConfig, wiring: ExportWiring): Promise<OpenedExport> {
  checkMarkers(e, cfg.force);
  // The export's state folder (src/dirty/state.ts placement; --state-dir names another): the present-map lives there.
  const pcDir = stateDirOf(e, cfg, ((p) => { try { return fs.statSync(p).isBlockDevice(); } catch { return false; } })(e.path));
  const pcRefusal = postcopyRefusal(e, cfg.force, pcDir);
  if (pcRefusal) throw new ConfigError(pcRefusal);
  if (e.incoming && e.readOnly) throw new ConfigError(`export "${e.name}": --incoming needs a writable image`);
  let file: FileDevice;
  try {
    file = await FileDevice.open(e.path, { readOnly: e.readOnly, direct: e.direct === true });
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'EWOULDBLOCK')
      throw new Error(`export "${e.name}": ${e.path} is already in use by another server (it holds the image lock)`, { cause: err });
    if (err instanceof DeviceInUse) throw new Error(`export "${e.name}": ${err.message}; not serving it`, { cause: err });
    if (err instanceof ImageLockConflict)
      throw new Error(`export "${e.name}": ${e.path} is in use: ${err.holder}; not serving it`, { cause: err });
    throw new Error(`export "${e.name}": cannot open ${e.path}: ${(err as Error).message}`, { cause: err });
  }
  // One owner per state folder (two servers, or a reload's new export beside the old one still draining).
  let unlockState: (() => void) | undefined;
  let checkpoints: Checkpoints;
  try {
    unlockState = lockState(e, cfg, stateDirOf(e, cfg, file.isBlockDevice));
    checkpoints = openCheckpoints(e, stateDirOf(e, cfg, file.isBlockDevice), file, cfg.dirtyGranularity ?? DEFAULT_GRANULARITY);
  } catch (err) {
    unlockState?.();
    await file.close().catch(() => undefined);
    throw err;
  }
  const postcopy = e.fetchFrom
    ? new PostcopyDestination({
        exportName: e.name,
        image: e.path,
        stateDir: pcDir,
        source: e.fetchFrom,
        local: file,
        granularity: cfg.dirtyGranularity,
        exportId: newExportId(),
        fetchTimeoutMs: (cfg.fetchTimeout ?? 120) * 1000,
        maxBandwidth: cfg.fillBandwidth,
      })
    : undefined;
  const stack = buildStack({ local: postcopy?.device ?? file, dirtyGranularity: cfg.dirtyGranularity, changes: checkpoints });
  const received = readReceived(e.path);
  let incoming: IncomingMigration | undefined;
  if (e.incoming && received) {
    // A completed destination is the live disk now: never re-marked half-copied.
    log('warn', 'incoming-already-complete', {
      export: e.name,
      image: e.path,
      job: received.job,
      completedAt: received.time,
      effect: 'served as a normal export; --incoming is ignored (remove the .nbd-migrate-received marker to receive a new migration into it)',
    });
  } else if (e.incoming) {
    const marker = readIncoming(e.path);
    const exportId = marker?.exportId ?? newExportId();
    const m = { export: e.name, since: new Date().toISOString(), ...marker, exportId };
    if (!marker?.exportId) writeIncoming(e.path, m);
    incoming = new IncomingMigration(e.path, m, {
      disconnectAll: () => wiring.server.disconnectExport(e.name),
      flush: () => stack.device.flush(),
    });
  }
  const source: MirrorSource = {
    name: e.name,
    image: e.path,
    size: file.size,
    stack,
    exportId: '',
    wrapRemote: cfg.readCache ? (remote) => new ReadCacheFilter(remote, cfg.readCache!) : undefined,
    handOver: wiring.handOver,
    cutoverHook: cutoverHook(e, cfg),
    disconnectClients: async () => {
      // The export's own address takes no one new here: its guests reconnect to wherever it moves.
      wiring.server.closeExportListeners(e.name, 'handoff');
      const n = await wiring.server.handOffExport(e.name, HANDOFF_DRAIN_MS);
      log('info', 'handoff', { export: e.name, connections: n });
    },
  };
  source.checkpoints = checkpoints;
  let state: ExportState | undefined;
  try {
    state = openState(e, cfg, file, stack, incoming !== undefined);
  } catch (err) {
    unlockState?.();
    await file.close().catch(() => undefined);
    throw err;
  }
  source.state = state;
  if (state) checkpoints.attachLog(state.log);
  const oe: OpenExport = { config: e, file, stack, source, checkpoints, state, unlockState, postcopy };
  const exp = new Export({ name: e.name, description: e.description, device: stack.device, extension: incoming, id: postcopy?.exportId ?? incoming?.exportId ?? received?.exportId, acl: e.allow ? Acl.parse(e.allow) : undefined, contexts: () => [...checkpoints.contexts(), ...(postcopy?.contexts() ?? [])] });
  source.exportId = exp.id;
  return { oe, exp, receiving: incoming !== undefined };
}

/** --on-cutover for export `e`, with the export's part of the command's environment. */
function cutoverHook(e: ExportConfig, cfg: ServeConfig): CutoverHook | undefined {
  if (!cfg.onCutover) return undefined;
  return {
    command: cfg.onCutover,
    timeoutMs: (cfg.onCutoverTimeout ?? 30) * 1000,
    env: {
      NBD_MIGRATE_EXPORT: e.name,
      NBD_MIGRATE_IMAGE: e.path,
      NBD_MIGRATE_LISTEN: e.listen ? formatListenAddress(e.listen) : '',
      NBD_MIGRATE_LISTEN_HOST: e.listen?.host ?? '',
      NBD_MIGRATE_LISTEN_PORT: e.listen ? String(e.listen.port) : '',
    },
  };
}
