// Operator-facing CLI errors: one clear line that names what is wrong, and a non-zero exit.
import t from 'tap';
import * as path from 'node:path';
import { CLI, makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';

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
  // `serve` named first is parsed alone (main.ts): its usage and examples read as the full tree's do.
  t.match(ok.stdout, /^nbd-migrate serve \[images\.\.\]/, `usage line\n${ok.stdout}`);
  t.match(ok.stdout, /nbd-migrate serve disk\.img --name vm1/, 'the examples name the command once');
  t.notMatch(ok.stdout, /serve serve/, 'never twice');
  const tree = await cli(['--log-level', 'warn', 'serve', '--help']);
  t.equal(tree.code, 0, `a global option first goes through the whole command tree\n${describeRun(tree)}`);
  t.match(tree.stdout, /--port\b/, 'and lists the same options');
  const typo = await cli(['serve', img, '--prot', '1']);
  t.equal(typo.code, 2, `an unknown option is refused with exit 2\n${describeRun(typo)}`);
  t.match(typo.stderr, /Unknown argument: prot/, 'naming it');
});

/** The lines a command wrote, without empty ones (a pty ends lines with CR LF). */
const lines = (text: string) => text.split(/\r?\n/).filter((l) => l.trim() !== '');

t.test('ctl reports a failure in one plain line and exits non-zero (pipe and TTY)', async (t) => {
  const dir = await tmpDir(t);
  const missing = path.join(dir, 'no-server.sock');

  // No server there: said in one line, with the path and what to check; no log record, no stack.
  const r = await cli(['ctl', '--socket', missing, 'status']);
  t.equal(r.code, 1, `exit 1\n${describeRun(r)}`);
  t.same(lines(r.stderr).length, 1, `one line on stderr\n${r.stderr}`);
  t.match(r.stderr, `nbd-migrate ctl: cannot reach the admin socket ${missing}`);
  t.match(r.stderr, /no server listens there/);
  t.notMatch(r.stderr, /^\s+at |"event"/m, 'no stack trace, no JSON log record');

  // A command the server refuses: its error code and message.
  const img = await makeImage(path.join(dir, 'disk.img'), MiB);
  const admin = path.join(dir, 'admin.sock');
  await serve(t, [img, '--name', 'vm1', '--admin-socket', admin]);
  const refused = await cli(['ctl', '--socket', admin, 'abort', 'nosuch']);
  t.equal(refused.code, 1, `exit 1\n${describeRun(refused)}`);
  t.same(lines(refused.stderr).length, 1, `one line on stderr\n${refused.stderr}`);
  t.match(refused.stderr, /^nbd-migrate ctl: the server refused: ENOENT: .*nosuch/);

  // On a terminal (script(1) gives the command a pty): still one line, no stack.
  const script = await requireTool('script', 'bsdutils');
  const cmd = ['/usr/bin/env', '-u', 'NODE_OPTIONS', process.execPath, CLI, 'ctl', '--socket', missing, 'status'].join(' ');
  const tty = await run(script, ['-qec', cmd, '/dev/null'], { timeoutMs: 30_000 });
  t.equal(tty.code, 1, `exit 1 on a TTY\n${describeRun(tty)}`);
  t.same(lines(tty.stdout), [`nbd-migrate ctl: cannot reach the admin socket ${missing}: connect ENOENT ${missing} (no server listens there: check serve --admin-socket, or pass ctl --socket)`], 'one line on the terminal, no stack trace');
});
