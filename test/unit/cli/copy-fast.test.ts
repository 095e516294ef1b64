/**
 * `nbd-migrate copy` without yargs (src/cli/copy-fast.ts): the plain forms are parsed as
 * main.ts would, anything else is left to main.ts (undefined).
 */
import t from 'tap';
import { parseFastCopy } from '../../../src/cli/copy-fast.js';
import { COPY_OPTIONS } from '../../../src/cli/copy.js';

t.test('plain forms', async (t) => {
  t.same(parseFastCopy(['a.img', 'nbd://h/e']), {
    src: 'a.img',
    dst: 'nbd://h/e',
    opts: { maxBandwidth: undefined, progress: true, changedSince: undefined, json: false, connections: undefined },
    logFormat: 'auto',
    logLevel: 'info',
  });
  const c = parseFastCopy(['--no-progress', 'a', '--max-bandwidth', '200M', 'b', '--json', '--changed-since=cp1', '--connections=2', '--log-format', 'json', '--log-level=debug']);
  t.same(c, {
    src: 'a',
    dst: 'b',
    opts: { maxBandwidth: 200 * 1024 * 1024, progress: false, changedSince: 'cp1', json: true, connections: 2 },
    logFormat: 'json',
    logLevel: 'debug',
  });
  t.equal(parseFastCopy(['a', 'b', '--progress'])?.opts.progress, true);
  t.equal(parseFastCopy(['a', 'b', '--no-json'])?.opts.json, false);
});

t.test('every option main.ts declares for copy (COPY_OPTIONS) is known here too, as a value or a flag', async (t) => {
  const sample: Record<string, string> = { 'max-bandwidth': '1M', 'changed-since': 'cp1', connections: '2' };
  for (const [name, o] of Object.entries(COPY_OPTIONS)) {
    if (o.type === 'boolean') {
      t.not(parseFastCopy(['a', 'b', `--${name}`]), undefined, `--${name}`);
      t.not(parseFastCopy(['a', 'b', `--no-${name}`]), undefined, `--no-${name}`);
      t.equal(parseFastCopy(['a', 'b', `--${name}`, 'x']), undefined, `--${name} takes no value (x is a third operand)`);
    } else {
      t.ok(sample[name], `a sample value for --${name}`);
      t.not(parseFastCopy(['a', 'b', `--${name}`, sample[name]!]), undefined, `--${name} VALUE`);
      t.equal(parseFastCopy(['a', 'b', `--${name}`]), undefined, `--${name} without its value`);
    }
  }
});

t.test('anything else goes to main.ts', async (t) => {
  for (const args of [
    [],
    ['a'],
    ['a', 'b', 'c'],
    ['a', 'b', '--help'],
    ['--version'],
    ['a', 'b', '-h'],
    ['a', 'b', '--'],
    ['a', 'b', '--maxBandwidth', '1M'],
    ['a', 'b', '--max-band', '1M'],
    ['a', 'b', '--unknown'],
    ['a', 'b', '--connections', '0'],
    ['a', 'b', '--connections', 'x'],
    ['a', 'b', '--connections', '1', '--connections', '2'],
    ['a', 'b', '--changed-since'],
    ['a', 'b', '--changed-since', '--json'],
    ['a', 'b', '--changed-since='],
    ['a', 'b', '--log-format', 'yaml'],
    ['a', 'b', '--log-level', 'trace'],
    ['a', 'b', '--json=false'],
    ['a', 'b', '--progress', '--no-progress'],
    ['-', 'b'],
  ])
    t.equal(parseFastCopy(args), undefined, args.join(' '));
});

t.test('a bad size is main.ts\'s to report (it throws here)', async (t) => {
  t.throws(() => parseFastCopy(['a', 'b', '--max-bandwidth', 'lots']), /--max-bandwidth/);
});

t.test('--connections is bounded (1 to 16) before anything is opened', async (t) => {
  const { copyCommand } = await import('../../../src/cli/copy.js');
  for (const n of [0, 17, 1.5])
    await t.rejects(copyCommand('/nonexistent/src.img', '/nonexistent/dst.img', { progress: false, connections: n }), /--connections: expected 1 to 16/, String(n));
});
