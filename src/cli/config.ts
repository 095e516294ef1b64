/**
 * The serve configuration: a JSON file (--config) merged with command-line
 * options, which win. A bad config is refused with the field named, before
 * anything starts.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parseNbdUri } from '../client/uri.js';
import { Acl } from '../server/acl.js';
import { NbdMigrateError } from '../util/errors.js';
import { parseSize } from '../util/units.js';
import { MAX_CAPACITY as MAX_LOG_CAPACITY } from '../dirty/activity-log.js';
import { DEFAULT_BUSY_POLL_US, MAX_BUSY_POLL_US } from '../util/busy-poll.js';

export interface ExportConfig {
  name: string;
  path: string;
  readOnly: boolean;
  description?: string;
  /** Also serve this export with oldstyle negotiation on its own TCP port (0 = any free port). */
  oldstylePort?: number;
  /** Destination of a migration: only the migration source may attach until it completes. */
  incoming?: boolean;
  /** Client addresses or CIDRs allowed to attach (IPv4/IPv6); absent admits everyone. */
  allow?: string[];
  /** Open the image or device O_DIRECT (the host page cache bypassed). */
  direct?: boolean;
  /** The export's state folder (default: IMAGE.nbd-migrate.d/, or DIR/<name> under --state-dir). */
  stateDir?: string;
  /**
   * The export's own address (listen=[fd00::11]:10809): newstyle there offering this export only,
   * and its oldstyle port (if any) on the same host. Bound as soon as the address appears.
   */
  listen?: ListenAddress;
  /** Post-copy destination: serve at once, fetch absent blocks from this NBD URI (migration/postcopy.ts). */
  fetchFrom?: string;
}

export interface ServeConfig {
  listen: string;
  port: number;
  /** Newstyle on a Unix socket too. */
  socket?: string;
  /** Seconds a client may take to finish the handshake. */
  handshakeTimeout: number;
  /** Admin socket (JSON lines, mode 0600) for mirror control and status. */
  adminSocket?: string;
  /** Serve Prometheus metrics on HOST:PORT (/metrics). */
  metrics?: string;
  /** Bytes per dirty-bitmap bit. */
  dirtyGranularity: number;
  /** Parent of the exports' state folders (DIR/<export name>/); default: beside each image, /var/lib/nbd-migrate for devices. */
  stateDir?: string;
  /** Crash-safe dirty tracking (the activity log in each writable export's state folder); default on. */
  activityLog?: boolean;
  /** Bytes per activity-log extent (default 4 MiB). */
  activityExtent?: number;
  /** Extents an activity log names at most before it checkpoints (default: every extent of the export, up to 16,378). */
  activityLogExtents?: number;
  /** Serve fenced or half-received images read-write anyway. */
  force: boolean;
  /** Connections open at once (all listeners), and per export. */
  maxConnections: number;
  maxConnectionsPerExport: number;
  /** Seconds of silence after which an idle connection is closed; 0 = never. */
  idleTimeout: number;
  /** Seconds SIGTERM lets connections drain (in-flight requests finish) before closing them. */
  shutdownTimeout: number;
  /** TLS: off, on (clients may upgrade with STARTTLS), or require (nothing but STARTTLS before TLS). */
  tls: 'off' | 'on' | 'require';
  tlsCert?: string;
  tlsKey?: string;
  /** CA for client certificates: when given, clients must present a certificate it signed. */
  tlsCa?: string;
  /** Operator command run (sh -c) after each cutover that switched an export, with NBD_MIGRATE_* in its environment. */
  onCutover?: string;
  /** Seconds --on-cutover may run before it is killed and reported failed (default 30). */
  onCutoverTimeout?: number;
  /** Post-copy: seconds a guest read of an absent block waits for the source before EIO (default 120). */
  fetchTimeout?: number;
  /** Post-copy: background fill rate limit in bytes/s (undefined: unlimited). */
  fillBandwidth?: number;
  /** Bytes of recently read blocks kept in memory for remote devices (0/undefined: none). */
  readCache?: number;
  /** Microseconds the event loop may poll for the next event before it sleeps (adaptive; 0 = never; see util/busy-poll.ts). */
  busyPollUs: number;
  exports: ExportConfig[];
}

/** A configuration (file, option or export) that cannot be served; the message names the field. */
export class ConfigError extends NbdMigrateError {
  override readonly name: string = 'ConfigError';
  constructor(message: string, options?: { cause?: unknown }) {
    super('EINVAL', message, options);
  }
}

export const CONFIG_DEFAULTS = {
  listen: '0.0.0.0',
  port: 10809,
  handshakeTimeout: 10,
  dirtyGranularity: 64 * 1024,
  maxConnections: 1024,
  maxConnectionsPerExport: 256,
  idleTimeout: 0,
  shutdownTimeout: 10,
  tls: 'off',
  busyPollUs: DEFAULT_BUSY_POLL_US,
} as const;

type Json = Record<string, unknown>;

function field<T>(obj: Json, key: string, where: string, check: (v: unknown) => v is T, what: string): T | undefined {
  const v = obj[key];
  if (v === undefined) return undefined;
  if (!check(v)) throw new ConfigError(`${where}.${key}: expected ${what}, got ${JSON.stringify(v)}`);
  return v;
}

const isString = (v: unknown): v is string => typeof v === 'string';
const isBool = (v: unknown): v is boolean => typeof v === 'boolean';
const isPort = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 65535;
const isGranularity = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 512 && ((v as number) & ((v as number) - 1)) === 0;
const isTlsMode = (v: unknown): v is 'off' | 'on' | 'require' => v === 'off' || v === 'on' || v === 'require';
const isCount = (v: unknown): v is number => Number.isInteger(v) && (v as number) > 0;
const isLogCapacity = (v: unknown): v is number => isCount(v) && v <= MAX_LOG_CAPACITY;
const isNonNegative = (v: unknown): v is number => typeof v === 'number' && v >= 0 && Number.isFinite(v);
const isStringList = (v: unknown): v is string[] => Array.isArray(v) && v.every((x) => typeof x === 'string');
const isPositive = (v: unknown): v is number => typeof v === 'number' && v > 0 && Number.isFinite(v);
const isBusyPoll = (v: unknown): v is number => isNonNegative(v) && v <= MAX_BUSY_POLL_US;

const NUMERIC = {
  port: [isPort, 'a port number 0-65535'],
  count: [isCount, 'a positive integer'],
  'log-extents': [isLogCapacity, `an integer from 1 to ${MAX_LOG_CAPACITY}`],
  seconds: [isNonNegative, 'a number of seconds'],
  'positive-seconds': [isPositive, 'a number of seconds above 0'],
  'busy-poll': [isBusyPoll, `a number of microseconds from 0 to ${MAX_BUSY_POLL_US}`],
} as const;

function numeric(option: string, kind: keyof typeof NUMERIC, v: unknown): number {
  const [ok, what] = NUMERIC[kind];
  const n = typeof v === 'number' ? v : typeof v === 'string' && v.trim() !== '' ? Number(v) : NaN;
  if (!ok(n)) throw new ConfigError(`--${option}: expected ${what}, got ${JSON.stringify(v)}`);
  return n;
}

/**
 * yargs `coerce` for a numeric option. yargs' own `type: 'number'` turns "abc" into NaN
 * and loses the text, so the check is done here: a bad value names its option.
 */
export const numericArg = (option: string, kind: keyof typeof NUMERIC) => (v: unknown): number => numeric(option, kind, v);
/** The same for a repeatable option. */
export const numericArgs = (option: string, kind: keyof typeof NUMERIC) => (v: unknown): number[] =>
  (Array.isArray(v) ? v : [v]).map((x) => numeric(option, kind, x));

/** Parses and checks a config file; relative image paths are taken from the file's directory. */
export function loadConfigFile(file: string): Partial<ServeConfig> {
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new ConfigError(`${file}: ${(e as Error).message}`);
  }
  return parseConfig(raw, file, path.dirname(path.resolve(file)));
}

const TOP_KEYS = new Set(['stateDir', 'activityLog', 'activityExtent', 'activityLogExtents', 'listen', 'port', 'socket', 'handshakeTimeout', 'adminSocket', 'metrics', 'dirtyGranularity', 'maxConnections', 'maxConnectionsPerExport', 'idleTimeout', 'shutdownTimeout', 'tls', 'tlsCert', 'tlsKey', 'tlsCa', 'onCutover', 'onCutoverTimeout', 'busyPollUs', 'exports', '$comment']);
const EXPORT_KEYS = new Set(['stateDir', 'name', 'path', 'listen', 'readOnly', 'description', 'oldstylePort', 'incoming', 'allow', 'direct', 'fetchFrom', '$comment']);

export function parseConfig(raw: unknown, where: string, baseDir: string): Partial<ServeConfig> {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ConfigError(`${where}: expected a JSON object`);
  const o = raw as Json;
  for (const k of Object.keys(o)) if (!TOP_KEYS.has(k)) throw new ConfigError(`${where}.${k}: unknown field`);
  const out: Partial<ServeConfig> = {};
  // Top-level settings that are copied as they are, once checked: key, check, what it must be.
  const plain: Array<[keyof ServeConfig, (v: unknown) => boolean, string]> = [
    ['listen', isString, 'an address string'],
    ['port', isPort, 'a port number 0-65535'],
    ['socket', isString, 'a socket path'],
    ['handshakeTimeout', isPositive, 'a number of seconds'],
    ['adminSocket', isString, 'a socket path'],
    ['metrics', isString, 'a HOST:PORT string'],
    ['maxConnections', isCount, 'a positive integer'],
    ['maxConnectionsPerExport', isCount, 'a positive integer'],
    ['idleTimeout', isNonNegative, 'a number of seconds (0 = never)'],
    ['shutdownTimeout', isNonNegative, 'a number of seconds'],
    ['tls', isTlsMode, '"off", "on" or "require"'],
    ['onCutover', isString, 'a shell command'],
    ['onCutoverTimeout', isPositive, 'a number of seconds'],
    ['activityLogExtents', isLogCapacity, `an integer from 1 to ${MAX_LOG_CAPACITY}`],
    ['busyPollUs', isBusyPoll, `a number of microseconds from 0 to ${MAX_BUSY_POLL_US}`],
  ];
  for (const [key, check, what] of plain) {
    const v = field(o, key, where, check as (v: unknown) => v is unknown, what);
    if (v !== undefined) (out as Record<string, unknown>)[key] = v;
  }
  for (const k of ['tlsCert', 'tlsKey', 'tlsCa'] as const) {
    const v = field(o, k, where, isString, 'a PEM file path');
    if (v !== undefined) out[k] = path.resolve(baseDir, v);
  }
  const gran = field(o, 'dirtyGranularity', where, isGranularity, 'a power of two of at least 512 bytes');
  if (gran !== undefined) out.dirtyGranularity = gran;
  const sd = field(o, 'stateDir', where, isString, 'a directory path');
  if (sd !== undefined) out.stateDir = path.resolve(baseDir, sd);
  const al = field(o, 'activityLog', where, isBool, 'true or false');
  if (al !== undefined) out.activityLog = al;
  const ae = field(o, 'activityExtent', where, isGranularity, 'a power of two of at least 512 bytes');
  if (ae !== undefined) out.activityExtent = ae;
  const exps = field(o, 'exports', where, Array.isArray, 'an array of exports');
  if (exps) {
    out.exports = exps.map((e, i) => {
      const w = `${where}.exports[${i}]`;
      if (typeof e !== 'object' || e === null || Array.isArray(e)) throw new ConfigError(`${w}: expected an object`);
      const eo = e as Json;
      for (const k of Object.keys(eo)) if (!EXPORT_KEYS.has(k)) throw new ConfigError(`${w}.${k}: unknown field`);
      const name = field(eo, 'name', w, isString, 'a string');
      const p = field(eo, 'path', w, isString, 'an image path');
      if (name === undefined) throw new ConfigError(`${w}.name: missing`);
      if (p === undefined) throw new ConfigError(`${w}.path: missing`);
      const ec: ExportConfig = { name, path: path.resolve(baseDir, p), readOnly: field(eo, 'readOnly', w, isBool, 'true or false') ?? false };
      const d = field(eo, 'description', w, isString, 'a string');
      if (d !== undefined) ec.description = d;
      const op = field(eo, 'oldstylePort', w, isPort, 'a port number 0-65535');
      if (op !== undefined) ec.oldstylePort = op;
      if (field(eo, 'incoming', w, isBool, 'true or false')) ec.incoming = true;
      if (field(eo, 'direct', w, isBool, 'true or false')) ec.direct = true;
      const esd = field(eo, 'stateDir', w, isString, 'a directory path');
      if (esd !== undefined) ec.stateDir = path.resolve(baseDir, esd);
      const la = field(eo, 'listen', w, isString, 'an address such as "[fd00::11]:10809"');
      if (la !== undefined) ec.listen = parseListenAddress(la, `${w}.listen`);
      const ff = field(eo, 'fetchFrom', w, isString, 'an NBD URI');
      if (ff !== undefined) ec.fetchFrom = checkFetchFrom(ff, `${w}.fetchFrom`);
      const allow = field(eo, 'allow', w, isStringList, 'a list of addresses or CIDRs');
      if (allow !== undefined) ec.allow = checkAllow(allow, `${w}.allow`);
      return ec;
    });
  }
  return out;
}

/**
 * A post-copy source URI, checked when the configuration is read: a typo
 * would otherwise only show as fetches retrying until --fetch-timeout.
 */
function checkFetchFrom(uri: string, where: string): string {
  try {
    parseNbdUri(uri);
  } catch (e) {
    throw new ConfigError(`${where}: ${(e as Error).message}`);
  }
  return uri;
}

/** `NAME=PATH[,oldstyle-port=N][,read-only][,incoming][,direct][,description=TEXT]` from --export. */
export function parseExportSpec(spec: string): ExportConfig {
  const where = `--export ${spec}`;
  const eq = spec.indexOf('=');
  if (eq <= 0) throw new ConfigError(`${where}: expected NAME=PATH[,listen=ADDR[:PORT]][,oldstyle-port=N][,read-only][,incoming][,direct][,allow=CIDR]...[,description=TEXT]`);
  const name = spec.slice(0, eq);
  const [p, ...opts] = spec.slice(eq + 1).split(',');
  if (!p) throw new ConfigError(`${where}: missing image path`);
  const ec: ExportConfig = { name, path: path.resolve(p), readOnly: false };
  for (let i = 0; i < opts.length; i++) {
    const opt = opts[i]!;
    const [k, v] = opt.split(/=(.*)/s, 2) as [string, string | undefined];
    if (k === 'read-only' && v === undefined) ec.readOnly = true;
    else if (k === 'incoming' && v === undefined) ec.incoming = true;
    else if (k === 'direct' && v === undefined) ec.direct = true;
    else if (k === 'state-dir' && v) ec.stateDir = path.resolve(v);
    else if (k === 'listen' && v) ec.listen = parseListenAddress(v, where);
    else if (k === 'fetch-from' && v) ec.fetchFrom = checkFetchFrom(v, where);
    else if (k === 'allow' && v) ec.allow = checkAllow([...(ec.allow ?? []), v], where);
    else if (k === 'oldstyle-port' && v !== undefined && isPort(Number(v)) && v !== '') ec.oldstylePort = Number(v);
    else if (k === 'description' && v !== undefined) {
      // The description is last and may itself contain commas.
      ec.description = [v, ...opts.slice(i + 1)].join(',');
      break;
    } else throw new ConfigError(`${where}: bad option "${opt}"`);
  }
  return ec;
}

/** An export's own address: host (an IP address or name) and port. */
export interface ListenAddress {
  host: string;
  port: number;
}

/**
 * `[fd00::11]:10809`, `[fd00::11]`, `fd00::11` (no port), `192.0.2.11:10809`
 * or `192.0.2.11`; the port defaults to 10809.
 */
export function parseListenAddress(text: string, where: string): ListenAddress {
  const bad = (why: string) => new ConfigError(`${where}: listen=${text}: ${why} (expected ADDR[:PORT], an IPv6 address in brackets: [fd00::11]:10809)`);
  let host: string;
  let port: string | undefined;
  const v6 = /^\[([^\]]*)\](?::(.*))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    port = v6[2];
    if (net.isIPv6(host) === false) throw bad(`"${host}" is not an IPv6 address`);
  } else if ((text.match(/:/g) ?? []).length > 1) {
    host = text;
    if (!net.isIPv6(host)) throw bad(`"${host}" is not an IPv6 address`);
  } else {
    const i = text.indexOf(':');
    host = i < 0 ? text : text.slice(0, i);
    port = i < 0 ? undefined : text.slice(i + 1);
  }
  if (!host || /\s/.test(host)) throw bad('no address');
  const n = port === undefined ? 10809 : Number(port);
  if (port === '' || !isPort(n)) throw bad(`bad port "${port}"`);
  return { host, port: n };
}

/** `[v6]:port` or `v4:port`, as given to NBD_MIGRATE_LISTEN and in messages. */
export function formatListenAddress(a: ListenAddress): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

export function checkConfig(c: ServeConfig): void {
  if (!['off', 'on', 'require'].includes(c.tls)) throw new ConfigError(`--tls: expected off, on or require, got "${c.tls}"`);
  if (c.tls !== 'off' && (!c.tlsCert || !c.tlsKey)) throw new ConfigError(`--tls ${c.tls} needs --tls-cert and --tls-key`);
  if (c.tls === 'require' && c.exports.some((e) => e.oldstylePort !== undefined))
    throw new ConfigError('--tls require: oldstyle ports cannot do TLS; remove them or use --tls on');
  if (c.exports.length === 0) throw new ConfigError('no exports: give an IMAGE, --export NAME=PATH, or a --config file with "exports"');
  const names = new Set<string>();
  const ports = new Set<number>();
  const listens = new Map<string, string>();
  for (const e of c.exports) {
    if (Buffer.byteLength(e.name) > 4096) throw new ConfigError(`export "${e.name.slice(0, 32)}...": name is over 4096 bytes`);
    if (names.has(e.name)) throw new ConfigError(`export "${e.name}" is defined twice`);
    names.add(e.name);
    // A post-copy destination writes every fetched block into its image, and it is the live disk from the start.
    if (e.fetchFrom && e.readOnly)
      throw new ConfigError(`export "${e.name}": fetch-from and read-only do not go together (fetched blocks are written into the image)`);
    if (e.fetchFrom && e.incoming)
      throw new ConfigError(`export "${e.name}": fetch-from and incoming do not go together (a post-copy destination serves guests at once; --incoming waits for a mirror)`);
    if (e.oldstylePort) {
      if (ports.has(e.oldstylePort) || e.oldstylePort === c.port)
        throw new ConfigError(`export "${e.name}": oldstyle port ${e.oldstylePort} is already used`);
      ports.add(e.oldstylePort);
    }
    if (e.listen) {
      const key = formatListenAddress(e.listen);
      if (e.listen.port !== 0 && listens.has(key)) throw new ConfigError(`export "${e.name}": listen=${key} is already used by export "${listens.get(key)}"`);
      if (e.listen.port !== 0 && e.listen.port === c.port && e.listen.host === c.listen)
        throw new ConfigError(`export "${e.name}": listen=${key} is the server's own --listen/--port`);
      listens.set(key, e.name);
    }
  }
}

/** The serve options as yargs parses them. */
export interface ServeArgs {
  images?: string[];
  name?: string[];
  description?: string[];
  export?: string[];
  config?: string;
  listen?: string;
  port?: number;
  'oldstyle-port'?: number[];
  socket?: string;
  'read-only'?: boolean;
  direct?: boolean;
  'handshake-timeout'?: number;
  'admin-socket'?: string;
  metrics?: string;
  allow?: string[];
  'max-connections'?: number;
  'max-connections-per-export'?: number;
  'idle-timeout'?: number;
  'shutdown-timeout'?: number;
  tls?: string;
  'tls-cert'?: string;
  'tls-key'?: string;
  'tls-ca'?: string;
  'on-cutover'?: string;
  'on-cutover-timeout'?: number;
  incoming?: boolean;
  force?: boolean;
  'dirty-granularity'?: string | number;
  'state-dir'?: string;
  'activity-log'?: boolean;
  'activity-extent'?: string | number;
  'activity-log-extents'?: number;
  'fetch-from'?: string;
  'fetch-timeout'?: number;
  'max-bandwidth'?: string;
  'read-cache'?: string;
  'busy-poll-us'?: number;
}

/** Builds the serve configuration: config file first, then the command line on top. */
export function serveConfigFrom(argv: ServeArgs): ServeConfig {
  const file = argv.config ? loadConfigFile(argv.config) : {};
  const images = argv.images ?? [];
  const names = argv.name ?? [];
  const descriptions = argv.description ?? [];
  const oldPorts = argv['oldstyle-port'] ?? [];
  if (names.length > images.length) throw new ConfigError(`${names.length} --name options for ${images.length} IMAGE arguments`);
  if (oldPorts.length > images.length) throw new ConfigError(`${oldPorts.length} --oldstyle-port options for ${images.length} IMAGE arguments`);
  const fromArgs: ExportConfig[] = images.map((img, i) => {
    const e: ExportConfig = {
      name: names[i] ?? path.basename(img).replace(/\.(img|raw)$/, ''),
      path: path.resolve(img),
      readOnly: argv['read-only'] ?? false,
    };
    if (argv.incoming) e.incoming = true;
    if (argv.direct) e.direct = true;
    if (argv['fetch-from']) e.fetchFrom = checkFetchFrom(argv['fetch-from'], '--fetch-from');
    if (argv.allow?.length) e.allow = checkAllow(argv.allow, '--allow');
    if (descriptions[i] !== undefined) e.description = descriptions[i];
    if (oldPorts[i] !== undefined) e.oldstylePort = oldPorts[i];
    return e;
  });
  const cfg: ServeConfig = {
    listen: argv.listen ?? file.listen ?? CONFIG_DEFAULTS.listen,
    port: argv.port ?? file.port ?? CONFIG_DEFAULTS.port,
    handshakeTimeout: argv['handshake-timeout'] ?? file.handshakeTimeout ?? CONFIG_DEFAULTS.handshakeTimeout,
    dirtyGranularity: granularityArg(argv['dirty-granularity']) ?? file.dirtyGranularity ?? CONFIG_DEFAULTS.dirtyGranularity,
    force: argv.force ?? false,
    maxConnections: argv['max-connections'] ?? file.maxConnections ?? CONFIG_DEFAULTS.maxConnections,
    maxConnectionsPerExport: argv['max-connections-per-export'] ?? file.maxConnectionsPerExport ?? CONFIG_DEFAULTS.maxConnectionsPerExport,
    idleTimeout: argv['idle-timeout'] ?? file.idleTimeout ?? CONFIG_DEFAULTS.idleTimeout,
    shutdownTimeout: argv['shutdown-timeout'] ?? file.shutdownTimeout ?? CONFIG_DEFAULTS.shutdownTimeout,
    tls: (argv.tls as ServeConfig['tls'] | undefined) ?? file.tls ?? CONFIG_DEFAULTS.tls,
    busyPollUs: argv['busy-poll-us'] ?? file.busyPollUs ?? CONFIG_DEFAULTS.busyPollUs,
    exports: [...(file.exports ?? []), ...fromArgs, ...(argv.export ?? []).map(parseExportSpec)],
  };
  if (argv['fetch-from'] && images.length !== 1) throw new ConfigError(`--fetch-from: give exactly one IMAGE (or fetch-from=URI in an --export spec), not ${images.length}`);
  if (argv['fetch-timeout'] !== undefined) cfg.fetchTimeout = argv['fetch-timeout'];
  if (argv['max-bandwidth'] !== undefined) cfg.fillBandwidth = bytesArg(argv['max-bandwidth'], '--max-bandwidth') || undefined;
  if (argv['read-cache'] !== undefined) cfg.readCache = bytesArg(argv['read-cache'], '--read-cache') || undefined;
  const socket = argv.socket ?? file.socket;
  if (socket !== undefined) cfg.socket = socket;
  const stateDir = argv['state-dir'] !== undefined ? path.resolve(argv['state-dir']) : file.stateDir;
  if (stateDir !== undefined) cfg.stateDir = stateDir;
  const activityLog = argv['activity-log'] ?? file.activityLog;
  if (activityLog !== undefined) cfg.activityLog = activityLog;
  const extent = argv['activity-extent'] !== undefined ? powerOfTwoArg(argv['activity-extent'], '--activity-extent') : file.activityExtent;
  if (extent !== undefined) cfg.activityExtent = extent;
  const logExtents = argv['activity-log-extents'] ?? file.activityLogExtents;
  if (logExtents !== undefined) cfg.activityLogExtents = logExtents;
  const admin = argv['admin-socket'] ?? file.adminSocket;
  if (admin !== undefined) cfg.adminSocket = admin;
  const metrics = argv.metrics ?? file.metrics;
  if (metrics !== undefined) cfg.metrics = metrics;
  const hook = argv['on-cutover'] ?? file.onCutover;
  if (hook) cfg.onCutover = hook;
  const hookTimeout = argv['on-cutover-timeout'] ?? file.onCutoverTimeout;
  if (hookTimeout !== undefined) cfg.onCutoverTimeout = hookTimeout;
  const cert = argv['tls-cert'] ? path.resolve(argv['tls-cert']) : file.tlsCert;
  const key = argv['tls-key'] ? path.resolve(argv['tls-key']) : file.tlsKey;
  const ca = argv['tls-ca'] ? path.resolve(argv['tls-ca']) : file.tlsCa;
  if (cert !== undefined) cfg.tlsCert = cert;
  if (key !== undefined) cfg.tlsKey = key;
  if (ca !== undefined) cfg.tlsCa = ca;
  checkConfig(cfg);
  return cfg;
}

/** A byte count or rate option (--max-bandwidth, --read-cache). */
function bytesArg(v: string | number, option: string): number {
  try {
    return parseSize(v, option);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
}

/** A power-of-two size option (at least 512 bytes). */
function powerOfTwoArg(v: string | number, option: string): number {
  let n: number;
  try {
    n = parseSize(v, option);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (!isGranularity(n)) throw new ConfigError(`${option}: expected a power of two of at least 512 bytes, got ${v}`);
  return n;
}

function granularityArg(v: string | number | undefined): number | undefined {
  if (v === undefined) return undefined;
  let n: number;
  try {
    n = parseSize(v, '--dirty-granularity');
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (!isGranularity(n)) throw new ConfigError(`--dirty-granularity: expected a power of two of at least 512 bytes, got ${v}`);
  return n;
}

/** Checks an allow-list now, so a bad entry stops startup with its field named. */
function checkAllow(entries: string[], where: string): string[] {
  try {
    Acl.parse(entries);
  } catch (e) {
    throw new ConfigError(`${where}: ${(e as Error).message}`);
  }
  return entries;
}
