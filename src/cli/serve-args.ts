/**
 * serve's options, declared once for both of its parsers: main.ts (yargs) and
 * serve-fast.ts (a plain `serve`, without yargs; plain-args.ts). Parsed, they are
 * ServeArgs (config.ts), by their command-line names.
 */
import { DEFAULT_ADMIN_SOCKET } from '../util/paths.js';
import { CONFIG_DEFAULTS, numericArg, numericArgs } from './config.js';

/** The IMAGE operands. */
export const SERVE_IMAGES = { type: 'string', array: true, describe: 'Raw image files to serve, one export each' } as const;

export const SERVE_OPTIONS = {
  name: { type: 'string', array: true, describe: 'Export name for the IMAGE at the same position (default: file name without .img)' },
  description: { type: 'string', array: true, describe: 'Description for the IMAGE at the same position (shown by nbdinfo --list)' },
  export: { type: 'string', array: true, describe: 'Another export: NAME=PATH[,listen=ADDR[:PORT]][,oldstyle-port=N][,read-only][,incoming][,direct][,allow=CIDR]...[,description=TEXT] (repeatable)' },
  config: { type: 'string', describe: 'JSON config file (see config/); command-line options override it' },
  listen: { type: 'string', describe: `Address for newstyle TCP (default ${CONFIG_DEFAULTS.listen})` },
  port: { coerce: numericArg('port', 'port'), describe: `Port for newstyle TCP (default ${CONFIG_DEFAULTS.port}; 0 picks a free one)` },
  'oldstyle-port': { coerce: numericArgs('oldstyle-port', 'port'), array: true, describe: 'Also serve the IMAGE at the same position with oldstyle negotiation on this port' },
  socket: { type: 'string', describe: 'Also serve newstyle on this Unix socket (nbd+unix:///NAME?socket=PATH)' },
  'read-only': { type: 'boolean', describe: 'Serve the IMAGE arguments read-only' },
  direct: { type: 'boolean', describe: 'Open the IMAGE arguments (files or block devices) with O_DIRECT: the host page cache is bypassed (cache=none)' },
  'handshake-timeout': { coerce: numericArg('handshake-timeout', 'positive-seconds'), describe: `Seconds a client may take to negotiate (default ${CONFIG_DEFAULTS.handshakeTimeout})` },
  'admin-socket': { type: 'string', describe: `Admin socket (JSON lines, mode 0600) for \`nbd-migrate ctl\`: mirror, status, cutover, abort (ctl's default, and the systemd unit's: ${DEFAULT_ADMIN_SOCKET})` },
  allow: { type: 'string', array: true, describe: 'Client address or CIDR allowed to attach to the IMAGE exports (repeatable; IPv4/IPv6); default: everyone' },
  'max-connections': { coerce: numericArg('max-connections', 'count'), describe: `Connections open at once, all listeners (default ${CONFIG_DEFAULTS.maxConnections})` },
  'max-connections-per-export': { coerce: numericArg('max-connections-per-export', 'count'), describe: `Connections per export (default ${CONFIG_DEFAULTS.maxConnectionsPerExport})` },
  'idle-timeout': { coerce: numericArg('idle-timeout', 'seconds'), describe: 'Close connections idle this many seconds (default 0: never)' },
  'shutdown-timeout': { coerce: numericArg('shutdown-timeout', 'seconds'), describe: `On SIGTERM, seconds in-flight requests may take before connections are closed (default ${CONFIG_DEFAULTS.shutdownTimeout})` },
  tls: { choices: ['off', 'on', 'require'], describe: 'STARTTLS: off (default), on (clients may upgrade), require (nothing else before TLS)' },
  'tls-cert': { type: 'string', describe: 'Server certificate (PEM)' },
  'tls-key': { type: 'string', describe: 'Server private key (PEM)' },
  'tls-ca': { type: 'string', describe: 'CA (PEM) for client certificates: when given, clients must present one it signed' },
  metrics: { type: 'string', describe: 'Serve Prometheus metrics on HOST:PORT at /metrics' },
  incoming: { type: 'boolean', describe: 'The IMAGE arguments are migration destinations: only the migration source may attach until it completes' },
  force: { type: 'boolean', describe: 'Serve images read-write even if fenced (migrated away) or half-received' },
  'on-cutover': { type: 'string', describe: 'Run this shell command after each cutover that switched an export (after the handoff), e.g. to move its listen= address; NBD_MIGRATE_EXPORT, _LISTEN, _TARGET, ... in its environment (README)' },
  'on-cutover-timeout': { coerce: numericArg('on-cutover-timeout', 'positive-seconds'), describe: 'Seconds --on-cutover may run before it is killed and reported failed (default 30)' },
  'dirty-granularity': { type: 'string', describe: 'Bytes per dirty-bitmap bit, a power of two (default 64K)' },
  'state-dir': { type: 'string', describe: 'Keep each export\'s state (crash-safe dirty bitmap, activity log, mirror record) in DIR/<export name>/ (default: IMAGE.nbd-migrate.d/ beside the image; /var/lib/nbd-migrate/<export name>/ for a block device)' },
  'activity-log': { type: 'boolean', describe: 'Crash-safe dirty tracking: log each coarse extent on disk before its first write is answered (default on; --no-activity-log keeps the bitmap in memory only)' },
  'activity-extent': { type: 'string', describe: 'Bytes per activity-log extent, a power of two (default 4M)' },
  'activity-log-extents': { coerce: numericArg('activity-log-extents', 'log-extents'), describe: 'Extents an activity log names before it checkpoints (default: every extent of the export, up to 16378: 64 GiB at 4M)' },
  'fetch-from': { type: 'string', describe: 'Post-copy destination: serve the IMAGE at once and fetch the blocks it does not hold yet from this NBD URI (nbd://SOURCE/NAME)' },
  'fetch-timeout': { coerce: numericArg('fetch-timeout', 'positive-seconds'), describe: 'Post-copy: seconds a read of a block not yet fetched waits for an unreachable source before it fails with EIO (default 120)' },
  'max-bandwidth': { type: 'string', describe: 'Post-copy: background fill rate limit, e.g. 50M (bytes/s; ctl set-speed changes it)' },
  'read-cache': { type: 'string', describe: 'Keep this many bytes of recently read blocks of remote devices in memory, e.g. 64M (after cutover, during post-copy)' },
  'busy-poll-us': { coerce: numericArg('busy-poll-us', 'busy-poll'), describe: `After handling I/O, poll up to this many microseconds for the next request before sleeping (adaptive, as QEMU's poll-max-ns; saves a wake-up per request at low queue depth, costs CPU while requests come closer together than this; 0 = never; default ${CONFIG_DEFAULTS.busyPollUs})` },
} as const;
