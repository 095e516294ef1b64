// SIGHUP re-reads exports only; a reload that changes the port, listen address, admin socket or
// metrics must say that a restart is needed instead of ignoring the change silently.
import t from 'tap';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { RawNbdClient } from '../helpers/rawclient.js';
import { CLI, makeImage, MiB, REPO_ROOT, tmpDir, type LogEntry } from '../helpers/server.js';

/** A port nothing listens on right now (loopback). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

t.test('SIGHUP that changes the port, admin socket and metrics warns that a restart is needed', async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), 4 * MiB);
  const b = await makeImage(path.join(dir, 'b.img'), 4 * MiB);
  const cfgFile = path.join(dir, 'config.json');
  const port = await freePort();
  const write = (c: object) => fs.writeFileSync(cfgFile, JSON.stringify(c));
  const base = { listen: '127.0.0.1', port, adminSocket: path.join(dir, 'admin.sock') };
  write({ ...base, exports: [{ name: 'a', path: a }] });

  // Spawned directly: the port must come from the config file alone (the test helper adds --port 0,
  // and the command line would override the file on every reload).
  const proc = spawn('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, 'serve', '--config', cfgFile, '--log-format', 'json'], {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  t.teardown(() => proc.kill('SIGKILL'));
  const logs: LogEntry[] = [];
  const waiters: Array<{ pred: (e: LogEntry) => boolean; resolve: (e: LogEntry) => void }> = [];
  let partial = '';
  proc.stderr.setEncoding('utf8').on('data', (c: string) => {
    partial += c;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      if (!line.startsWith('{')) continue;
      const e = JSON.parse(line) as LogEntry;
      logs.push(e);
      for (const w of [...waiters]) if (w.pred(e)) waiters.splice(waiters.indexOf(w), 1) && w.resolve(e);
    }
  });
  const waitFor = (pred: (e: LogEntry) => boolean, what: string) =>
    logs.find(pred) ??
    new Promise<LogEntry>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${what} log entry in 10 s:\n${logs.map((l) => JSON.stringify(l)).join('\n')}`)), 10_000);
      waiters.push({ pred, resolve: (e) => (clearTimeout(timer), resolve(e)) });
    });
  await waitFor((e) => e.event === 'ready', 'ready');

  const newPort = await freePort();
  write({ ...base, port: newPort, adminSocket: path.join(dir, 'other.sock'), metrics: '127.0.0.1:0', exports: [{ name: 'a', path: a }, { name: 'b', path: b }] });
  proc.kill('SIGHUP');
  const warn = await waitFor((e) => e.event === 'reload-restart-needed', 'reload-restart-needed');
  t.equal(warn.level, 'warn');
  t.same(warn.changed, ['port', 'adminSocket', 'metrics'], 'each changed setting is named');
  t.same((warn.changes as Record<string, unknown>).port, { running: port, configured: newPort }, 'with its running and configured values');
  t.match(warn.cause, /restart nbd-migrate to apply them/);
  const reloaded = await waitFor((e) => e.event === 'reloaded', 'reloaded');
  t.same(reloaded.exports, ['a', 'b'], 'the export change was applied all the same');

  // Still serving where it was: the old port, the old admin socket.
  const c = await RawNbdClient.connect(port);
  t.teardown(() => c.destroy());
  t.equal((await c.handshake('b')).size, BigInt(4 * MiB), 'the new export is served on the running port');
  t.ok(fs.existsSync(path.join(dir, 'admin.sock')) && !fs.existsSync(path.join(dir, 'other.sock')), 'the admin socket was not moved');

  // Back to the running settings, with an export removed: nothing to warn about.
  const before = logs.filter((e) => e.event === 'reload-restart-needed').length;
  write({ ...base, exports: [{ name: 'a', path: a }] });
  proc.kill('SIGHUP');
  await waitFor((e) => e.event === 'reloaded' && Array.isArray(e.exports) && e.exports.length === 1, 'second reloaded');
  t.equal(logs.filter((e) => e.event === 'reload-restart-needed').length, before, 'no warning when only exports changed');

  c.destroy();
  proc.kill('SIGTERM');
  t.equal(await exited, 0, 'clean exit');
});
