/**
 * `nbd-migrate serve` without yargs (src/cli/serve-fast.ts, src/cli/plain-args.ts): what
 * the plain parser takes, it must take as yargs does with the same option table
 * (SERVE_OPTIONS, as main.ts declares serve); anything else is left to main.ts.
 */
import fc from 'fast-check';
import t from 'tap';
import yargs from 'yargs';
import { LOG_OPTIONS, parsePlainArgs } from '../../../src/cli/plain-args.js';
import { SERVE_IMAGES, SERVE_OPTIONS } from '../../../src/cli/serve-args.js';
import { parseFastServe } from '../../../src/cli/serve-fast.js';
import { checkProperty, fcParams } from '../property/fc.js';

/** What yargs makes of `serve ARGS`, as main.ts configures it (strict), without running anything; throws where it refuses. */
function yargsServe(args: readonly string[]): Record<string, unknown> {
  let parsed: Record<string, unknown> | undefined;
  yargs([...args])
    .command('$0 [images..]', 'serve', (y) => y.positional('images', SERVE_IMAGES).options(SERVE_OPTIONS), (argv) => void (parsed = argv))
    .options(LOG_OPTIONS)
    .strict()
    .help(false)
    .version(false)
    .exitProcess(false)
    .fail((msg, err) => {
      throw err ?? new Error(msg);
    })
    .parseSync();
  if (!parsed) throw new Error('the command did not run');
  return parsed;
}

/** A sample value for each option that takes one (valid for its coerce and choices). */
const SAMPLES: Record<string, string[]> = {
  name: ['vm1', 'disk-2'],
  description: ['a disk', 'x=y'],
  export: ['a=a.img', 'b=/srv/b.img,read-only'],
  config: ['/etc/nbd-migrate.json'],
  listen: ['127.0.0.1', '::1'],
  port: ['0', '10809', '0x10'],
  'oldstyle-port': ['20001', '20002'],
  socket: ['/run/nbd.sock'],
  'handshake-timeout': ['10', '0.5'],
  'admin-socket': ['/run/a.sock'],
  allow: ['10.0.0.0/8', '::1'],
  'max-connections': ['8'],
  'max-connections-per-export': ['4'],
  'idle-timeout': ['0', '30'],
  'shutdown-timeout': ['5'],
  tls: ['off', 'on', 'require'],
  'tls-cert': ['c.pem'],
  'tls-key': ['k.pem'],
  'tls-ca': ['ca.pem'],
  metrics: ['127.0.0.1:9100'],
  'on-cutover': ['echo moved'],
  'on-cutover-timeout': ['30'],
  'dirty-granularity': ['64K', '65536'],
  'state-dir': ['/var/lib/x'],
  'activity-extent': ['4M'],
  'activity-log-extents': ['1018'],
  'fetch-from': ['nbd://src/vm1'],
  'fetch-timeout': ['120'],
  'max-bandwidth': ['50M'],
  'read-cache': ['64M'],
  'busy-poll-us': ['0', '100'],
  'log-format': ['json', 'text', 'auto'],
  'log-level': ['debug', 'warn'],
};

const TABLE = { ...SERVE_OPTIONS, ...LOG_OPTIONS } as Record<string, { type?: string; array?: boolean }>;

/** The fields both parsers fill, compared: every option of the table, the images, the log options with their defaults. */
function comparable(argv: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { images: argv.images ?? [] };
  for (const name of Object.keys(TABLE)) if (argv[name] !== undefined) out[name] = argv[name];
  out['log-format'] ??= 'auto';
  out['log-level'] ??= 'info';
  return out;
}

t.test('every option serve declares has a sample value or is a flag', async (t) => {
  for (const [name, o] of Object.entries(TABLE)) t.ok(o.type === 'boolean' || SAMPLES[name]?.length, `--${name}`);
});

t.test('plain forms are parsed as yargs parses them', async (t) => {
  for (const args of [
    ['disk.img'],
    ['disk.img', '--name', 'vm1'],
    ['a.img', 'b.img', '--name', 'a', '--name=b', '--oldstyle-port', '20001', '--oldstyle-port', '20002'],
    ['--export', 'a=a.img', '--export=b=b.img,read-only', '--listen', '::1', '--port', '0'],
    ['disk.img', '--read-only', '--no-activity-log', '--tls', 'on', '--log-format', 'json', '--log-level=debug'],
    ['disk.img', '--fetch-from', 'nbd://src/vm1', '--max-bandwidth', '50M', '--busy-poll-us', '0'],
  ]) {
    const fast = parseFastServe(args);
    t.ok(fast, `taken: ${args.join(' ')}`);
    t.same(comparable({ ...fast!.argv, 'log-format': fast!.logFormat, 'log-level': fast!.logLevel }), comparable(yargsServe(args)), args.join(' '));
  }
  t.same(parseFastServe(['disk.img', '--port', '10809'])?.argv.port, 10809, 'numbers are coerced as main.ts coerces them');
  t.same(parseFastServe(['a', 'b', '--oldstyle-port', '1', '--oldstyle-port', '2'])?.argv['oldstyle-port'], [1, 2]);
});

t.test('anything else goes to main.ts', async (t) => {
  for (const args of [
    ['--help'],
    ['-h'],
    ['--version'],
    ['disk.img', '--'],
    ['disk.img', '--readOnly'],
    ['disk.img', '--read'],
    ['disk.img', '--unknown'],
    ['disk.img', '--port'],
    ['disk.img', '--port', 'x'],
    ['disk.img', '--port', '70000'],
    ['disk.img', '--port', '1', '--port', '2'],
    ['disk.img', '--port='],
    ['disk.img', '--listen', '-x'],
    ['disk.img', '--tls', 'maybe'],
    ['disk.img', '--log-level', 'trace'],
    ['disk.img', '--read-only=true'],
    ['disk.img', '--read-only', 'true'],
    ['disk.img', '--read-only', '--no-read-only'],
    ['--name', 'vm1', 'disk.img'],
    ['disk.img', '--allow', '10.0.0.1', 'other.img'],
    ['-', 'disk.img'],
    ['disk.img', '-p', '1'],
  ])
    t.equal(parseFastServe(args), undefined, args.join(' '));
});

t.test('a value that starts with a dash, or a flag followed by true/false, is never taken here', async (t) => {
  t.equal(parsePlainArgs(['--a', '-1'], { a: { type: 'string' } }), undefined);
  t.equal(parsePlainArgs(['--f', 'false'], { f: { type: 'boolean' } }), undefined);
  t.same(parsePlainArgs(['--f', 'x'], { f: { type: 'boolean' } }), { operands: ['x'], values: { f: true } });
  t.same(parsePlainArgs(['--no-f'], { f: { type: 'boolean' } }), { operands: [], values: { f: false } });
});

t.test('property: whatever the plain parser takes, yargs takes the same way', async (t) => {
  const names = Object.keys(TABLE);
  const token = fc.oneof(
    { weight: 2, arbitrary: fc.constantFrom('a.img', 'b.img', '/srv/c.raw') },
    {
      weight: 5,
      arbitrary: fc.tuple(fc.constantFrom(...names), fc.boolean(), fc.nat()).map(([name, eq, k]) => {
        const o = TABLE[name]!;
        if (o.type === 'boolean') return [k % 3 === 0 ? `--no-${name}` : `--${name}`];
        const v = SAMPLES[name]![k % SAMPLES[name]!.length]!;
        return eq ? [`--${name}=${v}`] : [`--${name}`, v];
      }),
    },
    { weight: 1, arbitrary: fc.constantFrom(['true'], ['false'], ['--'], ['-x'], ['--name'], ['--port', 'nope'], ['--readOnly']) },
  );
  const argsArb = fc.array(token, { maxLength: 8 }).map((ts) => ts.flatMap((x) => (typeof x === 'string' ? [x] : x)));
  let taken = 0;
  await checkProperty(
    t,
    'plain serve parse equals yargs',
    fc.property(argsArb, (args) => {
      const fast = parseFastServe(args);
      if (!fast) return true;
      taken++;
      const mine = comparable({ ...fast.argv, 'log-format': fast.logFormat, 'log-level': fast.logLevel });
      const theirs = comparable(yargsServe(args));
      if (JSON.stringify(mine) !== JSON.stringify(theirs)) throw new Error(`${JSON.stringify(args)}: plain ${JSON.stringify(mine)} yargs ${JSON.stringify(theirs)}`);
      return true;
    }),
    fcParams({ numRuns: 400 }),
  );
  t.ok(taken > 50, `the plain parser took ${taken} of the generated command lines (not only refusals)`);
});
