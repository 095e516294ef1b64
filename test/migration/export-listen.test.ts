// An address per export (issue 11.3): `--export NAME=PATH,listen=ADDR` gives
// the export its own newstyle listener offering it alone; with
// `--handoff disconnect` the source closes that listener at the cutover; an
// `--incoming` destination binds it as soon as the address appears and takes
// guests on it only once the migration is complete.
import t from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { checkConfig, ConfigError, parseConfig, parseExportSpec, serveConfigFrom } from '../../src/cli/config.js';
import { adminRequest, waitForJob } from '../helpers/admin.js';
import { NetLab } from '../helpers/netns.js';
import { makeImage, MiB, serve, tmpDir, type ServerHandle } from '../helpers/server.js';
import { describeRun, requirePythonNbd, requireTool, run } from '../helpers/tools.js';
import { compare, freePort } from './harness.js';

/** The port an export's own listener got (logged as listener "export"). */
async function exportPort(s: ServerHandle, name: string): Promise<number> {
  const e = await s.waitForLog((l) => l.event === 'listening' && l.listener === 'export' && l.export === name);
  return e.port as number;
}

/** nbdinfo --json on a URI (or --list), run inside `prefix` when given. */
async function nbdinfo(args: string[], prefix: string[] = []) {
  const bin = await requireTool('nbdinfo', 'libnbd-bin');
  const argv = [...prefix, bin, '--json', ...args];
  return run(argv[0]!, argv.slice(1), { timeoutMs: 30_000 });
}

function refusedConnect(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve('connected');
    });
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}

t.test('listen= in --export and in the config file', async (t) => {
  t.same(parseExportSpec('vm1=/x.img,listen=[fd00::11]:10809').listen, { host: 'fd00::11', port: 10809 });
  t.same(parseExportSpec('vm1=/x.img,listen=[fd00::11]').listen, { host: 'fd00::11', port: 10809 }, 'the port defaults to 10809');
  t.same(parseExportSpec('vm1=/x.img,listen=fd00::11').listen, { host: 'fd00::11', port: 10809 }, 'a bare IPv6 address');
  t.same(parseExportSpec('vm1=/x.img,listen=192.0.2.11:10900,oldstyle-port=10901').listen, { host: '192.0.2.11', port: 10900 });
  t.throws(() => parseExportSpec('vm1=/x.img,listen=[nope]:1'), ConfigError);
  t.throws(() => parseExportSpec('vm1=/x.img,listen=[fd00::11]:99999'), /bad port/);
  t.throws(() => parseExportSpec('vm1=/x.img,listen='), /bad option/);
  const fromFile = parseConfig({ exports: [{ name: 'vm1', path: 'a.img', listen: '[fd00::12]:10810' }] }, 'c.json', '/tmp');
  t.same(fromFile.exports?.[0]?.listen, { host: 'fd00::12', port: 10810 }, 'config file "listen"');
  t.throws(() => parseConfig({ exports: [{ name: 'vm1', path: 'a.img', listen: 7 }] }, 'c.json', '/tmp'), /exports\[0\]\.listen/);
  t.throws(
    () => serveConfigFrom({ export: ['a=/a.img,listen=[fd00::11]:10809', 'b=/b.img,listen=[fd00::11]:10809'] }),
    /already used by export "a"/,
  );
  t.throws(() => serveConfigFrom({ listen: '127.0.0.1', port: 10809, export: ['a=/a.img,listen=127.0.0.1:10809'] }), /server's own/);
  t.doesNotThrow(() => checkConfig(serveConfigFrom({ export: ['a=/a.img,listen=[fd00::11]:10809', 'b=/b.img,listen=[fd00::12]:10809'] })));
});

t.test("an export's own listener offers that export alone", async (t) => {
  const dir = await tmpDir(t);
  const a = await makeImage(path.join(dir, 'a.img'), 1 * MiB);
  const b = await makeImage(path.join(dir, 'b.img'), 2 * MiB);
  const s = await serve(t, ['--export', `vm1=${a},listen=127.0.0.1:0`, '--export', `vm2=${b}`]);
  const port = await exportPort(s, 'vm1');
  t.not(port, s.newstylePort, 'a port of its own');
  const dflt = await nbdinfo([`nbd://127.0.0.1:${port}/`]);
  t.equal(dflt.code, 0, 'nbdinfo on the export\'s address', { diag: describeRun(dflt) });
  t.equal(JSON.parse(dflt.stdout).exports[0]["export-size"], 1 * MiB, 'the default export there is vm1');
  const list = await nbdinfo(['--list', `nbd://127.0.0.1:${port}/`]);
  t.same(JSON.parse(list.stdout).exports.map((e: { 'export-name': string }) => e['export-name']), ['vm1'], 'the listing shows vm1 only');
  const other = await nbdinfo([`nbd://127.0.0.1:${port}/vm2`]);
  t.not(other.code, 0, 'vm2 is not offered on vm1\'s address');
  const main = await nbdinfo([s.uri('vm2')]);
  t.equal(main.code, 0, 'vm2 is on the main listener');
});

t.test('handoff disconnect closes the source export\'s own listener; the destination opens its own only when complete', async (t) => {
  const dir = await tmpDir(t);
  const src = await makeImage(path.join(dir, 'src.img'), 8 * MiB, { fill: 'random' });
  const dst = await makeImage(path.join(dir, 'dst.img'), 8 * MiB);
  const admin = path.join(dir, 'admin.sock');
  const dstSrv = await serve(t, ['--export', `vm1=${dst},incoming,listen=127.0.0.1:0`]);
  const dstPort = await exportPort(dstSrv, 'vm1');
  const early = await nbdinfo([`nbd://127.0.0.1:${dstPort}/vm1`]);
  t.not(early.code, 0, 'before the migration completes the destination refuses guests on the export\'s address');
  await dstSrv.waitForLog((e) => e.event === 'connection-refused' && e.listener === 'export' && e.export === 'vm1');

  const oldPort = await freePort();
  const srcSrv = await serve(t, ['--listen', '127.0.0.2', '--export', `vm1=${src},listen=127.0.0.1:0,oldstyle-port=${oldPort}`, '--admin-socket', admin]);
  const srcPort = await exportPort(srcSrv, 'vm1');
  const oldstyle = await srcSrv.waitForLog((e) => e.event === 'listening' && e.listener === 'oldstyle' && e.export === 'vm1');
  t.match(oldstyle, { address: '127.0.0.1', port: oldPort }, "oldstyle-port is bound on the export's own address, not --listen");
  const old = await nbdinfo([`nbd://127.0.0.1:${oldPort}`]);
  t.equal(old.code, 0, 'nbdinfo on the oldstyle port', { diag: describeRun(old) });
  t.equal(JSON.parse(old.stdout).protocol, 'oldstyle', 'it speaks oldstyle');
  // A guest on the export's address, holding its connection until the server closes it.
  const py = await requirePythonNbd();
  const guest = run(py, ['-c', `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'x' * 4096, 0)
print('written', flush=True)
while not (h.aio_is_dead() or h.aio_is_closed()):
    h.poll(1000)
print('closed')
`, `nbd://127.0.0.1:${srcPort}/`], { timeoutMs: 60_000 });
  await srcSrv.waitForLog((e) => e.event === 'transmission' && e.export === 'vm1');
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: dstSrv.uri('vm1'), cutover: 'auto', handoff: 'disconnect' });
  await waitForJob(admin, 'vm1', (j) => j.state === 'completed', { failOn: ['failed', 'aborted'] });
  const closed = await srcSrv.waitForLog((e) => e.event === 'listener-closed' && e.export === 'vm1' && e.listener === 'export');
  t.equal(closed.reason, 'handoff', "the source closed the export's own listener at the handoff");
  const closedOld = await srcSrv.waitForLog((e) => e.event === 'listener-closed' && e.export === 'vm1' && e.listener === 'oldstyle');
  t.equal(closedOld.reason, 'handoff', 'and its oldstyle port');
  t.equal(await refusedConnect(srcPort), 'ECONNREFUSED', 'nothing listens on its address any more');
  t.equal(await refusedConnect(oldPort), 'ECONNREFUSED', 'nor on its oldstyle port');
  const g = await guest;
  t.match(g.stdout, /written\nclosed/, 'the guest on that address was disconnected', { diag: describeRun(g) });
  const cmp = await compare(src, `nbd://127.0.0.1:${dstPort}/`);
  t.equal(cmp.code, 0, 'once complete, the destination serves the disk on its own listener', { diag: describeRun(cmp) });
});

t.test('an address that is not on the host yet is bound as soon as it appears', async (t) => {
  const lab = await NetLab.create(t);
  const ns = await lab.ns('bind');
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 1 * MiB);
  const s = await serve(t, ['--listen', '127.0.0.1', '--export', `vm1=${img},listen=[fd00::11]:10809`], { prefix: lab.execArgs(ns) });
  const pending = await s.waitForLog((e) => e.event === 'listen-pending');
  t.match(pending, { export: 'vm1', address: 'fd00::11', port: 10809 }, 'the server is ready, waiting for the address');
  await lab.ip('-n', ns, 'addr', 'add', 'fd00::11/128', 'dev', 'lo', 'nodad');
  const bound = await s.waitForLog((e) => e.event === 'listening' && e.listener === 'export');
  t.match(bound, { export: 'vm1', address: 'fd00::11', port: 10809 }, 'bound once the address appeared');
  const info = await nbdinfo(['nbd://[fd00::11]:10809/'], lab.execArgs(ns));
  t.equal(info.code, 0, 'nbdinfo inside the namespace', { diag: describeRun(info) });
  t.equal(JSON.parse(info.stdout).exports[0]["export-size"], 1 * MiB, 'a guest reaches the export on its address');
});

t.test('SIGHUP with a new listen= moves the export to its new address', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'a.img'), 1 * MiB);
  const [p1, p2] = [await freePort(), await freePort()];
  const conf = path.join(dir, 'c.json');
  const write = (port: number) => fs.writeFileSync(conf, JSON.stringify({ exports: [{ name: 'vm1', path: img, listen: `127.0.0.1:${port}` }] }));
  write(p1);
  const s = await serve(t, ['--config', conf]);
  t.equal(await exportPort(s, 'vm1'), p1, 'bound on the configured address');
  write(p2);
  s.proc.kill('SIGHUP');
  const closed = await s.waitForLog((e) => e.event === 'listener-closed' && e.port === p1);
  t.equal(closed.reason, 'export removed', 'the old address is closed');
  await s.waitForLog((e) => e.event === 'listening' && e.listener === 'export' && e.port === p2);
  t.equal(await refusedConnect(p1), 'ECONNREFUSED', 'nothing on the old address');
  const info = await nbdinfo([`nbd://127.0.0.1:${p2}/`]);
  t.equal(info.code, 0, 'the export is on the new one', { diag: describeRun(info) });
});
