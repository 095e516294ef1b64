/**
 * The command line. Option names (--listen, --port, --oldstyle-port, --socket,
 * --read-only, --name) are an interface operators and scripts rely on.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { configureLogFromOptions, isLevelEnabled, log, type Level, type LogFormatOption } from '../util/log.js';
import { projectRoot } from '../util/paths.js';
import { CONFIG_DEFAULTS, numericArg, serveConfigFrom, type ServeArgs } from './config.js';
import { exitFatal } from './fatal.js';
import { LOG_OPTIONS } from './plain-args.js';
import { SERVE_IMAGES, SERVE_OPTIONS } from './serve-args.js';
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
        .positional('images', SERVE_IMAGES)
        .options(SERVE_OPTIONS)
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
    .options(LOG_OPTIONS)
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
  exitFatal(err);
});
