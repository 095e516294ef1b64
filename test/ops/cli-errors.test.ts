// Operator-facing CLI errors: one clear line that names what is wrong, and a non-zero exit.
import t from 'tap';
import * as path from 'node:path';
import { CLI, makeImage, MiB, tmpDir } from '../helpers/server.js';
import { describeRun, run } from '../helpers/tools.js';

const cli = (args: string[]) => run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { timeoutMs: 30_000 });

t.test('a bad numeric option value is refused naming the option, before anything starts', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'disk.img'), MiB);
  const cases: Array<[string[], RegExp]> = [
    [['--port', 'abc'], /--port: expected a port number 0-65535, got "abc"/],
    [['--port', '70000'], /--port: expected a port number 0-65535, got 70000/],
    [['--oldstyle-port', 'x'], /--oldstyle-port: expected a port number 0-65535, got "x"/],
    [['--max-connections', 'lots'], /--max-connections: expected a positive integer, got "lots"/],
    [['--idle-timeout', '-5'], /--idle-timeout: expected a number of seconds, got -5/],
    [['--shutdown-timeout', 'soon'], /--shutdown-timeout: expected a number of seconds, got "soon"/],
  ];
  for (const [opts, message] of cases) {
    const r = await cli(['serve', img, '--listen', '127.0.0.1', ...opts, '--log-format', 'json']);
    t.not(r.code, 0, `${opts.join(' ')}: refused\n${describeRun(r)}`);
    const fatal = r.stderr.split('\n').filter((l) => l.includes('"event":"fatal"'));
    t.equal(fatal.length, 1, `${opts.join(' ')}: one error line\n${r.stderr}`);
    t.match((JSON.parse(fatal[0] ?? '{}') as { cause?: string }).cause, message, `${opts.join(' ')}: the error names the option and the value`);
    t.notMatch(r.stderr, /"event":"(listening|export-added)"/, `${opts.join(' ')}: nothing was started`);
  }
  const ok = await cli(['serve', '--help']);
  t.match(ok.stdout, /--port\b/, 'the options are still listed in --help');
});
