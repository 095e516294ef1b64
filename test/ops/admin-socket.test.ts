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
