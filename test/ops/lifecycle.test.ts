// Operating it: config/ files parse, socket activation, SIGHUP reload, SIGTERM cleanup.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadConfigFile } from '../../src/cli/config.js';
import { CLI, makeImage, MiB, REPO_ROOT, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requirePythonNbd, requireTool, run, SYSTEM_PYTHON } from '../helpers/tools.js';

const CONFIG = path.join(REPO_ROOT, 'config');

/** A minimal systemd unit reader: sections of key=value lines. */
function readUnit(file: string): Map<string, Map<string, string>> {
  const out = new Map<string, Map<string, string>>();
  let section: Map<string, string> | undefined;
  for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const sec = /^\[(\w+)\]$/.exec(line);
    if (sec) {
      out.set(sec[1]!, (section = new Map()));
      continue;
    }
    const eq = line.indexOf('=');
    if (!section || eq <= 0) throw new Error(`${file}: cannot parse "${line}"`);
    section.set(line.slice(0, eq), line.slice(eq + 1));
  }
  return out;
}

t.test('config/: JSON examples, systemd units, libvirt XML and the Grafana dashboard', async (t) => {
  const dest = loadConfigFile(path.join(CONFIG, 'migration-destination.json'));
  t.equal(dest.exports?.[0]?.incoming, true, 'the destination example receives a migration');

  const service = readUnit(path.join(CONFIG, 'nbd-migrate.service'));
  const exec = service.get('Service')?.get('ExecStart') ?? '';
  t.match(exec, /bin\/nbd-migrate serve /);
  // The ExecStart options are ones the CLI knows: run its parser on them.
  const argv = exec.split(/\s+/).slice(2);
  const help = await run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, 'serve', '--help']);
  for (const opt of argv.filter((a) => a.startsWith('--'))) t.match(help.stdout, new RegExp(`${opt}\\b`), `serve knows ${opt}`);
  t.equal(service.get('Service')?.get('ExecReload'), '/bin/kill -HUP $MAINPID');
  const socket = readUnit(path.join(CONFIG, 'nbd-migrate.socket'));
  t.equal(socket.get('Socket')?.get('ListenStream'), '10809');
  t.equal(socket.get('Socket')?.get('Service'), 'nbd-migrate.service');

  await requirePythonNbd(); // /usr/bin/python3 is there; its xml parser checks the XML
  for (const f of ['libvirt-disk-newstyle.xml', 'libvirt-disk-oldstyle.xml']) {
    const r = await run(SYSTEM_PYTHON, [
      '-c',
      'import sys, xml.etree.ElementTree as E\nd=E.parse(sys.argv[1]).getroot()\ns=d.find("source")\nprint(d.get("type"), s.get("protocol"), s.get("name"), d.find("driver").get("cache"), d.find("driver").get("discard"), s.find("host").get("port"))',
      path.join(CONFIG, f),
    ]);
    t.equal(r.code, 0, describeRun(r));
    t.match(r.stdout, /^network nbd (vm1|None) none unmap \d+/, `${f}: ${r.stdout.trim()}`);
  }

  const dash = JSON.parse(fs.readFileSync(path.join(CONFIG, 'grafana-dashboard.json'), 'utf8')) as {
    panels: Array<{ targets: Array<{ expr: string }> }>;
  };
  const exporter = fs.readFileSync(path.join(REPO_ROOT, 'src', 'metrics', 'exporter.ts'), 'utf8');
  const names = [...exporter.matchAll(/(?:counter|gauge)\('([a-z_]+)'/g)].map((m) => `nbd_migrate_${m[1]}`);
  names.push('nbd_migrate_request_duration_seconds');
  for (const p of dash.panels)
    for (const target of p.targets)
      for (const used of target.expr.match(/nbd_migrate_[a-z_]+/g) ?? [])
        t.ok(names.some((n) => used === n || used === `${n}_bucket`), `dashboard metric ${used} exists`);
});

t.test('systemd socket activation (libnbd starts the server with LISTEN_FDS)', async (t) => {
  await requireTool('nbdinfo', 'libnbd-bin');
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'disk.img'), 8 * MiB);
  const r = await run('nbdinfo', ['--json', '--', '[', '/usr/bin/env', '-u', 'NODE_OPTIONS', process.execPath, CLI, 'serve', img, '--name', 'vm1', '--log-level', 'warn', ']'], {
    timeoutMs: 30_000,
  });
  t.equal(r.code, 0, describeRun(r));
  const info = JSON.parse(r.stdout) as { exports: Array<{ 'export-name': string; 'export-size': number; can_multi_conn: boolean }> };
  t.equal(info.exports[0]!['export-size'], 8 * MiB);
  t.equal(info.exports[0]!['export-name'], 'vm1');
});

t.test('SIGHUP adds and removes exports without dropping connections; SIGTERM leaves no sockets', async (t) => {
  await requirePythonNbd();
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), 8 * MiB);
  const b = await makeImage(path.join(dir, 'b.img'), 4 * MiB);
  const cfgFile = path.join(dir, 'config.json');
  fs.writeFileSync(cfgFile, JSON.stringify({ exports: [{ name: 'a', path: a }] }));
  const sock = path.join(dir, 'nbd.sock');
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, ['--config', cfgFile, '--socket', sock, '--admin-socket', admin]);

  // A client attached to "a" for the whole test: it writes before and reads after the reloads.
  const client = run(SYSTEM_PYTHON, [
    '-c',
    [
      'import nbd, sys, time, os',
      'h = nbd.NBD(); h.connect_uri(sys.argv[1])',
      'h.pwrite(b"A" * 4096, 0)',
      'while not os.path.exists(sys.argv[2]): time.sleep(0.05)',
      'assert h.pread(4096, 0) == b"A" * 4096',
      'h.pwrite(b"B" * 4096, 4096); h.flush(); h.shutdown(); print("ok")',
    ].join('\n'),
    s.uri('a'),
    path.join(dir, 'go'),
  ]);
  await new Promise((r) => setTimeout(r, 500));
  fs.writeFileSync(cfgFile, JSON.stringify({ exports: [{ name: 'b', path: b }] }));
  s.proc.kill('SIGHUP');
  await s.waitForLog((e) => e.event === 'reloaded');
  const list = await run('nbdinfo', ['--list', '--json', s.uri('')]);
  t.match(list.stdout, /"export-name": "b"/, 'new export listed');
  t.notMatch(list.stdout, /"export-name": "a"/, 'removed export no longer offered');
  fs.writeFileSync(path.join(dir, 'go'), '');
  const c = await client;
  t.equal(c.stdout.trim(), 'ok', `the connection to the removed export kept working\n${describeRun(c)}`);
  t.equal(fs.readFileSync(a).subarray(4096, 8192).toString(), 'B'.repeat(4096), 'and its writes reached the image');

  fs.writeFileSync(cfgFile, '{ not json');
  s.proc.kill('SIGHUP');
  await s.waitForLog((e) => e.event === 'reload-failed');
  t.equal(s.exited(), undefined, 'a bad config on reload keeps the server running');

  t.ok(fs.existsSync(sock) && fs.existsSync(admin));
  await s.stop();
  t.equal(s.exited()?.code, 0, 'clean exit on SIGTERM');
  t.notOk(fs.existsSync(sock), 'NBD socket removed');
  t.notOk(fs.existsSync(admin), 'admin socket removed');
});
