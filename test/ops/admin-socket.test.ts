// The admin socket: one default path for the systemd unit, ctl and the README; a running
// server's socket is never taken over, and a server removes only the socket it created.
import t from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { DEFAULT_ADMIN_SOCKET } from '../../src/util/paths.js';
import { CLI, makeImage, MiB, REPO_ROOT, serve, startServer, tmpDir } from '../helpers/server.js';
import { describeRun, run } from '../helpers/tools.js';

const cli = (args: string[]) => run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { timeoutMs: 30_000 });

t.test('the systemd unit, ctl and the README agree on the admin socket path', async (t) => {
  const unit = fs.readFileSync(path.join(REPO_ROOT, 'config', 'nbd-migrate.service'), 'utf8');
  const exec = /^ExecStart=(.*)$/m.exec(unit)?.[1] ?? '';
  const args = exec.split(/\s+/);
  const unitSocket = args[args.indexOf('--admin-socket') + 1];
  t.equal(unitSocket, DEFAULT_ADMIN_SOCKET, 'the unit passes the default admin socket');
  t.match(unit, /^RuntimeDirectory=nbd-migrate$/m, 'and systemd creates its directory');
  t.equal(path.dirname(DEFAULT_ADMIN_SOCKET), '/run/nbd-migrate');

  const help = await cli(['ctl', '--help']);
  t.match(help.stdout, `[default: "${DEFAULT_ADMIN_SOCKET}"]`, `ctl connects to the same socket by default\n${describeRun(help)}`);

  const readme = fs.readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
  t.match(readme, `--admin-socket ${DEFAULT_ADMIN_SOCKET}`, 'the README serves on it');
  t.notMatch(readme, '/run/nbd-migrate.sock', 'and never names the old path');
});

/** A Unix socket server in this process (the "other server" of a test), closed in teardown. */
async function listenAt(t: Tap, p: string): Promise<net.Server> {
  const srv = net.createServer((c) => c.end('hello\n'));
  await new Promise<void>((resolve, reject) => srv.once('error', reject).listen(p, resolve));
  t.teardown(() => new Promise<void>((r) => srv.close(() => r())));
  return srv;
}
type Tap = { teardown(fn: () => unknown): void };

/** Connects and reads the first line: proves someone live is behind the path. */
function firstLine(p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = net.connect(p);
    let buf = '';
    c.setEncoding('utf8');
    c.on('data', (d: string) => {
      buf += d;
      if (buf.includes('\n')) {
        c.destroy();
        resolve(buf.split('\n')[0]!);
      }
    });
    c.on('error', reject);
  });
}

t.test('a second serve refuses an admin socket a running server answers on, and leaves it working', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const b = await makeImage(path.join(dir, 'b.img'), 4 * MiB);
  const admin = path.join(dir, 'admin.sock');
  await serve(t, [a, '--name', 'a', '--admin-socket', admin]);

  const second = await cli(['serve', b, '--name', 'b', '--listen', '127.0.0.1', '--port', '0', '--admin-socket', admin, '--log-format', 'json']);
  t.not(second.code, 0, `the second server did not start\n${describeRun(second)}`);
  t.match(second.stderr, `admin socket ${admin} is in use by a running server`, 'and said why, naming the path');

  t.ok(fs.existsSync(admin), 'the first server still has its socket file');
  const status = await cli(['ctl', '--socket', admin, 'status', '--json']);
  t.equal(status.code, 0, `ctl still reaches the first server\n${describeRun(status)}`);
  t.match(JSON.parse(status.stdout), { exports: [{ name: 'a' }] }, 'and it is the first server that answers');
});

t.test('a stale admin socket (nobody listening) is replaced; a file that is not a socket is refused', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  // A socket file left by a dead server: bound, hard-linked aside, then closed (close removes only the original name).
  const stale = path.join(dir, 'stale.sock');
  const tmp = net.createServer();
  await new Promise<void>((r) => tmp.listen(path.join(dir, 'x.sock'), r));
  fs.linkSync(path.join(dir, 'x.sock'), stale);
  await new Promise<void>((r) => tmp.close(() => r()));
  t.ok(fs.lstatSync(stale).isSocket(), 'a stale socket file is in place');
  const s = await serve(t, [img, '--name', 'a', '--admin-socket', stale]);
  await s.waitForLog((e) => e.event === 'stale-socket-removed' && e.path === stale);
  const status = await cli(['ctl', '--socket', stale, 'status']);
  t.equal(status.code, 0, `the new server answers on it\n${describeRun(status)}`);
  await s.stop();

  const notSocket = path.join(dir, 'notes.txt');
  fs.writeFileSync(notSocket, 'precious');
  const r = await cli(['serve', img, '--name', 'a', '--listen', '127.0.0.1', '--port', '0', '--admin-socket', notSocket, '--log-format', 'json']);
  t.not(r.code, 0, `refused\n${describeRun(r)}`);
  t.match(r.stderr, `admin socket ${notSocket} exists and is not a socket`);
  t.equal(fs.readFileSync(notSocket, 'utf8'), 'precious', 'the file is untouched');
});

t.test('on exit a server removes its own admin socket, never one that replaced it', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const admin = path.join(dir, 'admin.sock');
  const s = await startServer([img, '--name', 'a', '--admin-socket', admin]);
  t.teardown(() => s.stop());
  // Someone else's server now owns the path (its file replaced ours).
  fs.unlinkSync(admin);
  await listenAt(t, admin);
  await s.stop();
  t.equal(s.exited()?.code, 0, 'clean exit');
  t.ok(fs.existsSync(admin), "the other server's socket file is still there");
  t.equal(await firstLine(admin), 'hello', 'and the other server is still reachable through it');
  t.ok(s.logs.some((e) => e.event === 'admin-socket-kept'), 'the server said why it left the file');

  // Its own socket it does remove, and nothing else in the directory is left behind.
  const own = await startServer([img, '--name', 'a', '--admin-socket', path.join(dir, 'own.sock')]);
  t.teardown(() => own.stop());
  await own.stop();
  // a.img.nbd-migrate.d is the export's state folder (activity log, stored bitmap): it stays by design.
  t.same(fs.readdirSync(dir).sort(), ['a.img', 'a.img.nbd-migrate.d', 'admin.sock'], 'own socket removed, no temporary names left');
});
