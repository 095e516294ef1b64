/**
 * The command line. Option names (--listen, --port, --oldstyle-port, --socket,
 * --read-only, --name) are an interface operators and scripts rely on.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { configureLogFromOptions, isLevelEnabled, log, LOG_FORMATS, LOG_LEVELS, type Level, type LogFormatOption } from '../util/log.js';
import { DEFAULT_ADMIN_SOCKET, projectRoot } from '../util/paths.js';
import { CONFIG_DEFAULTS, ConfigError, numericArg, numericArgs, serveConfigFrom, type ServeArgs } from './config.js';
import { COPY_OPTIONS, copyCommand, copyOptionsFrom, type CopyArgs } from './copy.js';
import { ctlCommand, ctlCommandNames, ctlErrorLine, ctlRunning } from './ctl.js';
import type * as Serve from './serve.js';

const DEMO_SIZE = 1024 * 1024 * 1024;

/**
 * The server's modules (prom-client, the admin and migration layers) load only when a
 * command serves: `copy` starts in about half the time without them.
 */
const serveUntilSignal: typeof Serve.serveUntilSignal = async (...args) => (await import('./serve.js')).serveUntilSignal(...args);

function setUpLogging(argv: { 'log-format'?: string; 'log-level'?: string }): void {
  configureLogFromOptions((argv['log-format'] ?? 'auto') as LogFormatOption, (argv['log-level'] ?? 'info') as Level);
}

async function demo(argv: { port?: number; listen?: string }): Promise<void> {
  const dir = path.join(projectRoot, 'var');
  const image = path.join(dir, 'demo.img');
  fs.mkdirSync(dir, { recursive: true });
  if (!fs.existsSync(image)) {
    const fd = fs.openSync(image, 'wx');
    fs.ftruncateSync(fd, DEMO_SIZE); // sparse: takes no space until written
    fs.closeSync(fd);
    log('info', 'demo-image-created', { image, size: DEMO_SIZE });
  }
  const port = argv.port ?? CONFIG_DEFAULTS.port;
  const host = port === CONFIG_DEFAULTS.port ? 'localhost' : `localhost:${port}`;
  process.stdout.write(
    [
      `nbd-migrate demo: serving ${image} (1 GiB, sparse) as export "demo" on port ${port}.`,
      'Try, from another terminal:',
      `  qemu-img info nbd://${host}/demo`,
      `  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' nbd://${host}/demo`,
      `  nbdinfo --map nbd://${host}/demo`,
      `  nbdinfo --list nbd://${host}`,
      'Stop with Ctrl-C.',
      '',
    ].join('\n'),
  );
  await serveUntilSignal({
    listen: argv.listen ?? CONFIG_DEFAULTS.listen,
    port,
    handshakeTimeout: CONFIG_DEFAULTS.handshakeTimeout,
    dirtyGranularity: CONFIG_DEFAULTS.dirtyGranularity,
    maxConnections: CONFIG_DEFAULTS.maxConnections,
    maxConnectionsPerExport: CONFIG_DEFAULTS.maxConnectionsPerExport,
    idleTimeout: CONFIG_DEFAULTS.idleTimeout,
    busyPollUs: CONFIG_DEFAULTS.busyPollUs,
    shutdownTimeout: CONFIG_DEFAULTS.shutdownTimeout,
    tls: CONFIG_DEFAULTS.tls,
    force: false,
    exports: [{ name: 'demo', path: image, readOnly: false, description: 'nbd-migrate demo image' }],
  });
}

/**
 * The commands, each added to a yargs instance under a usage string: "serve [images..]"
 * in the full command tree, "$0 [images..]" when it is parsed alone (below).
 */
type AddCommand = (y: Argv, usage: string) => Argv;

const addServe: AddCommand = (y, usage) =>
  y.command(
    usage,
    'Serve raw disk images over NBD (fixed newstyle by name; oldstyle per port; Unix socket)',
    (y) =>
      y
        .positional('images', { type: 'string', array: true, describe: 'Raw image files to serve, one export each' })
        .option('name', { type: 'string', array: true, describe: 'Export name for the IMAGE at the same position (default: file name without .img)' })
        .option('description', { type: 'string', array: true, describe: 'Description for the IMAGE at the same position (shown by nbdinfo --list)' })
        .option('export', { type: 'string', array: true, describe: 'Another export: NAME=PATH[,listen=ADDR[:PORT]][,oldstyle-port=N][,read-only][,incoming][,direct][,allow=CIDR]...[,description=TEXT] (repeatable)' })
        .option('config', { type: 'string', describe: 'JSON config file (see config/); command-line options override it' })
        .option('listen', { type: 'string', describe: `Address for newstyle TCP (default ${CONFIG_DEFAULTS.listen})` })
        .option('port', { coerce: numericArg('port', 'port'), describe: `Port for newstyle TCP (default ${CONFIG_DEFAULTS.port}; 0 picks a free one)` })
        .option('oldstyle-port', { coerce: numericArgs('oldstyle-port', 'port'), array: true, describe: 'Also serve the IMAGE at the same position with oldstyle negotiation on this port' })
        .option('socket', { type: 'string', describe: 'Also serve newstyle on this Unix socket (nbd+unix:///NAME?socket=PATH)' })
        .option('read-only', { type: 'boolean', describe: 'Serve the IMAGE arguments read-only' })
        .option('direct', { type: 'boolean', describe: 'Open the IMAGE arguments (files or block devices) with O_DIRECT: the host page cache is bypassed (cache=none)' })
        .option('handshake-timeout', { coerce: numericArg('handshake-timeout', 'positive-seconds'), describe: `Seconds a client may take to negotiate (default ${CONFIG_DEFAULTS.handshakeTimeout})` })
        .option('admin-socket', { type: 'string', describe: `Admin socket (JSON lines, mode 0600) for \`nbd-migrate ctl\`: mirror, status, cutover, abort (ctl's default, and the systemd unit's: ${DEFAULT_ADMIN_SOCKET})` })
        .option('allow', { type: 'string', array: true, describe: 'Client address or CIDR allowed to attach to the IMAGE exports (repeatable; IPv4/IPv6); default: everyone' })
        .option('max-connections', { coerce: numericArg('max-connections', 'count'), describe: `Connections open at once, all listeners (default ${CONFIG_DEFAULTS.maxConnections})` })
        .option('max-connections-per-export', { coerce: numericArg('max-connections-per-export', 'count'), describe: `Connections per export (default ${CONFIG_DEFAULTS.maxConnectionsPerExport})` })
        .option('idle-timeout', { coerce: numericArg('idle-timeout', 'seconds'), describe: 'Close connections idle this many seconds (default 0: never)' })
        .option('shutdown-timeout', { coerce: numericArg('shutdown-timeout', 'seconds'), describe: `On SIGTERM, seconds in-flight requests may take before connections are closed (default ${CONFIG_DEFAULTS.shutdownTimeout})` })
        .option('tls', { choices: ['off', 'on', 'require'], describe: 'STARTTLS: off (default), on (clients may upgrade), require (nothing else before TLS)' })
        .option('tls-cert', { type: 'string', describe: 'Server certificate (PEM)' })
        .option('tls-key', { type: 'string', describe: 'Server private key (PEM)' })
        .option('tls-ca', { type: 'string', describe: 'CA (PEM) for client certificates: when given, clients must present one it signed' })
        .option('metrics', { type: 'string', describe: 'Serve Prometheus metrics on HOST:PORT at /metrics' })
        .option('incoming', { type: 'boolean', describe: 'The IMAGE arguments are migration destinations: only the migration source may attach until it completes' })
        .option('force', { type: 'boolean', describe: 'Serve images read-write even if fenced (migrated away) or half-received' })
        .option('on-cutover', { type: 'string', describe: 'Run this shell command after each cutover that switched an export (after the handoff), e.g. to move its listen= address; NBD_MIGRATE_EXPORT, _LISTEN, _TARGET, ... in its environment (README)' })
        .option('on-cutover-timeout', { coerce: numericArg('on-cutover-timeout', 'positive-seconds'), describe: 'Seconds --on-cutover may run before it is killed and reported failed (default 30)' })
        .option('dirty-granularity', { type: 'string', describe: 'Bytes per dirty-bitmap bit, a power of two (default 64K)' })
        .option('state-dir', { type: 'string', describe: 'Keep each export\'s state (crash-safe dirty bitmap, activity log, mirror record) in DIR/<export name>/ (default: IMAGE.nbd-migrate.d/ beside the image; /var/lib/nbd-migrate/<export name>/ for a block device)' })
        .option('activity-log', { type: 'boolean', describe: 'Crash-safe dirty tracking: log each coarse extent on disk before its first write is answered (default on; --no-activity-log keeps the bitmap in memory only)' })
        .option('activity-extent', { type: 'string', describe: 'Bytes per activity-log extent, a power of two (default 4M)' })
        .option('activity-log-extents', { coerce: numericArg('activity-log-extents', 'log-extents'), describe: 'Extents an activity log names before it checkpoints (default: every extent of the export, up to 16378: 64 GiB at 4M)' })
        .option('fetch-from', { type: 'string', describe: 'Post-copy destination: serve the IMAGE at once and fetch the blocks it does not hold yet from this NBD URI (nbd://SOURCE/NAME)' })
        .option('fetch-timeout', { coerce: numericArg('fetch-timeout', 'positive-seconds'), describe: 'Post-copy: seconds a read of a block not yet fetched waits for an unreachable source before it fails with EIO (default 120)' })
        .option('max-bandwidth', { type: 'string', describe: 'Post-copy: background fill rate limit, e.g. 50M (bytes/s; ctl set-speed changes it)' })
        .option('read-cache', { type: 'string', describe: 'Keep this many bytes of recently read blocks of remote devices in memory, e.g. 64M (after cutover, during post-copy)' })
        .option('busy-poll-us', { coerce: numericArg('busy-poll-us', 'busy-poll'), describe: `After handling I/O, poll up to this many microseconds for the next request before sleeping (adaptive, as QEMU's poll-max-ns; saves a wake-up per request at low queue depth, costs CPU while requests come closer together than this; 0 = never; default ${CONFIG_DEFAULTS.busyPollUs})` })
        .example('nbd-migrate serve disk.img --name vm1', 'Serve disk.img as export "vm1" on port 10809')
        .example('nbd-migrate serve disk.img --name vm1 --oldstyle-port 20001', 'Also serve it oldstyle on port 20001 (qemu: nbd:HOST:20001)')
        .example('nbd-migrate serve --export a=a.img --export b=b.img,read-only', 'Serve two exports'),
    async (argv) => serveUntilSignal(serveConfigFrom(argv as ServeArgs), () => serveConfigFrom(argv as ServeArgs)),
  );

const addDemo: AddCommand = (y, usage) =>
  y.command(
    usage,
    'Serve a sparse 1 GiB demo image (created on first run in var/) as export "demo"',
    (y) => y.option('port', { coerce: numericArg('port', 'port'), describe: 'Newstyle port (default 10809)' }).option('listen', { type: 'string' }),
    async (argv) => demo(argv),
  );

/** --connections is checked by numericArg (its message names the value given), not typed as a number by yargs. */
const { connections: _connections, ...COPY_OPTIONS_BUT_CONNECTIONS } = COPY_OPTIONS;

const addCopy: AddCommand = (y, usage) =>
  y.command(
    usage,
    'Copy a disk, sparse-aware: each side an NBD URI or a raw image file (created if missing)',
    (y) =>
      y
        .positional('src', { type: 'string', demandOption: true })
        .positional('dst', { type: 'string', demandOption: true })
        .options(COPY_OPTIONS_BUT_CONNECTIONS)
        .option('connections', { describe: COPY_OPTIONS.connections.describe, coerce: numericArg('connections', 'count') }),
    async (a) => copyCommand(a.src, a.dst, copyOptionsFrom(a as CopyArgs)),
  );


/** The commands built here (ctl is ctl.ts's): name -> (how to add it, its positionals). Each is parsed alone when named first. */
const COMMANDS: Record<string, [AddCommand, string]> = {
  serve: [addServe, ' [images..]'],
  demo: [addDemo, ''],
  copy: [addCopy, ' <src> <dst>'],
};

/** What every command shares: the log options, strict parsing, help, version, failure. */
function common(y: Argv, scriptName: string): Argv {
  return y
    .scriptName(scriptName)
    .option('log-format', { choices: LOG_FORMATS, default: 'auto', describe: 'Log format on stderr (auto: text on a TTY, JSON lines otherwise)' })
    .option('log-level', { choices: LOG_LEVELS, default: 'info', describe: 'Least severe level logged' })
    .middleware(setUpLogging)
    .strict()
    .help()
    .alias('h', 'help')
    .version()
    .fail((msg, err, y) => {
      if (err) throw err;
      process.stderr.write(`${y.help()}\n\n${msg}\n`);
      process.exit(2);
    });
}

export async function main(args: string[]): Promise<void> {
  const alone = Object.hasOwn(COMMANDS, args[0] ?? '') ? COMMANDS[args[0]!] : undefined;
  if (alone) {
    // A command named first is parsed as the default command of an instance of its own.
    // After calling a named command's handler, yargs builds the whole help text to keep it
    // (command.js, cacheHelpMessage), synchronously: for serve, ~80 ms of cliui and wrap-ansi
    // on the event loop before the server could start (fail() above never prints it).
    // A default command's help is not built.
    const [add, positionals] = alone;
    await add(common(yargs(args.slice(1)), `nbd-migrate ${args[0]}`), `$0${positionals}`).parseAsync();
    return;
  }
  let y = common(yargs(args), 'nbd-migrate').usage('$0 <command> [options]');
  const add = (name: string) => {
    const [addTo, positionals] = COMMANDS[name]!;
    y = addTo(y, `${name}${positionals}`);
  };
  add('serve');
  add('demo');
  y = y.command('ctl', `Control a running server through its admin socket (${ctlCommandNames().join(', ')})`, (y) => ctlCommand(y));
  add('copy');
  await y.demandCommand(1, 'Give a command: serve, demo, ctl or copy').parseAsync();
}

main(hideBin(process.argv)).catch((e: unknown) => {
  const err = e as Error;
  if (ctlRunning) {
    // ctl is an operator's command: one plain line, never a log record or a stack.
    process.stderr.write(`${ctlErrorLine(err)}\n`);
    if (isLevelEnabled('debug')) process.stderr.write(`${err?.stack}\n`);
    process.exit(1);
  }
  log('error', 'fatal', { cause: err?.message ?? String(e) });
  // The one line above says what is wrong; the stack is for debugging.
  if (!(err instanceof ConfigError) && isLevelEnabled('debug')) process.stderr.write(`${err?.stack}\n`);
  process.exit(1);
});
