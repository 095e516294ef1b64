// The three ways to make an export a post-copy destination (issue 13):
// `serve IMAGE --fetch-from URI`, `--export NAME=PATH,fetch-from=URI` and the
// config file's `fetchFrom`; each URI is checked when the configuration is read.

import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ConfigError, loadConfigFile, parseConfig, parseExportSpec, serveConfigFrom } from '../../../src/cli/config.js';

t.test('--export NAME=PATH,fetch-from=URI', async (t) => {
  t.same(parseExportSpec('vm1=/d/dst.img,fetch-from=nbd://src.example:10809/vm1'), {
    name: 'vm1',
    path: '/d/dst.img',
    readOnly: false,
    fetchFrom: 'nbd://src.example:10809/vm1',
  });
  t.same(
    parseExportSpec('vm1=/d/dst.img,fetch-from=nbd+unix:///vm1?socket=/run/src.sock,state-dir=/s,description=moved, from A'),
    { name: 'vm1', path: '/d/dst.img', readOnly: false, fetchFrom: 'nbd+unix:///vm1?socket=/run/src.sock', stateDir: '/s', description: 'moved, from A' },
    'with other options; the URI may hold = and ?',
  );
  t.throws(() => parseExportSpec('vm1=/d/dst.img,fetch-from='), /bad option "fetch-from="/, 'an empty URI is refused');
  t.throws(() => parseExportSpec('vm1=/d/dst.img,fetch-from=http://src/vm1'), { name: 'ConfigError', message: /^--export vm1=\/d\/dst\.img,fetch-from=http:\/\/src\/vm1: invalid NBD URI "http:\/\/src\/vm1"/ }, 'not an NBD URI: refused at once, naming the spec');
  t.throws(() => parseExportSpec('vm1=/d/dst.img,fetch-from=src:10809'), ConfigError, 'a host:port is not a URI either');
});

t.test('config file: exports[].fetchFrom', async (t) => {
  const c = parseConfig({ exports: [{ name: 'vm1', path: 'dst.img', fetchFrom: 'nbd://10.0.0.1/vm1' }, { name: 'vm2', path: '/x/b.img' }] }, 'c.json', '/etc/nbd');
  t.same(c.exports?.[0], { name: 'vm1', path: '/etc/nbd/dst.img', readOnly: false, fetchFrom: 'nbd://10.0.0.1/vm1' });
  t.equal(c.exports?.[1]?.fetchFrom, undefined, 'an export without it is a plain export');
  t.throws(() => parseConfig({ exports: [{ name: 'vm1', path: 'a', fetchFrom: 10809 }] }, 'c.json', '/'), { message: /^c\.json\.exports\[0\]\.fetchFrom: expected an NBD URI/ });
  t.throws(() => parseConfig({ exports: [{ name: 'vm1', path: 'a', fetchFrom: 'nbd:/vm1' }] }, 'c.json', '/'), {
    name: 'ConfigError',
    message: /^c\.json\.exports\[0\]\.fetchFrom: invalid NBD URI "nbd:\/vm1"/,
  });
  t.throws(() => parseConfig({ exports: [{ name: 'vm1', path: 'a', fetch_from: 'nbd://h/vm1' }] }, 'c.json', '/'), /exports\[0\]\.fetch_from: unknown field/);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-fetchfrom-cfg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'dst.json');
  fs.writeFileSync(file, JSON.stringify({ exports: [{ name: 'vm1', path: 'vm1.img', fetchFrom: 'nbd://src/vm1' }] }));
  t.same(loadConfigFile(file).exports, [{ name: 'vm1', path: path.join(dir, 'vm1.img'), readOnly: false, fetchFrom: 'nbd://src/vm1' }], 'loaded from a file, the path taken from its folder');
  const cfg = serveConfigFrom({ config: file, export: ['vm2=/x/vm2.img,fetch-from=nbd://src/vm2'], 'max-bandwidth': '2M', 'fetch-timeout': 30 });
  t.same(cfg.exports.map((e) => [e.name, e.fetchFrom]), [['vm1', 'nbd://src/vm1'], ['vm2', 'nbd://src/vm2']], 'file and --export side by side');
  t.equal(cfg.fillBandwidth, 2 * 1024 * 1024, '--max-bandwidth is the fill limit');
  t.equal(cfg.fetchTimeout, 30);
});

t.test('serve IMAGE --fetch-from URI', async (t) => {
  const cfg = serveConfigFrom({ images: ['/d/dst.img'], name: ['vm1'], 'fetch-from': 'nbd://src/vm1' });
  t.same(cfg.exports, [{ name: 'vm1', path: '/d/dst.img', readOnly: false, fetchFrom: 'nbd://src/vm1' }]);
  t.throws(() => serveConfigFrom({ images: ['/d/a.img', '/d/b.img'], 'fetch-from': 'nbd://src/vm1' }), /--fetch-from: give exactly one IMAGE/);
  t.throws(() => serveConfigFrom({ images: ['/d/a.img'], 'fetch-from': 'nbd://src:notaport/vm1' }), { name: 'ConfigError', message: /^--fetch-from: invalid NBD URI/ });
});

t.test('fetch-from with read-only or incoming is refused with one line naming the export', async (t) => {
  t.throws(() => serveConfigFrom({ export: ['vm1=/d/dst.img,fetch-from=nbd://src/vm1,read-only'] }), {
    name: 'ConfigError',
    message: /^export "vm1": fetch-from and read-only do not go together/,
  });
  t.throws(() => serveConfigFrom({ export: ['vm1=/d/dst.img,fetch-from=nbd://src/vm1,incoming'] }), {
    name: 'ConfigError',
    message: /^export "vm1": fetch-from and incoming do not go together/,
  });
  t.throws(() => serveConfigFrom({ images: ['/d/dst.img'], name: ['vm1'], 'fetch-from': 'nbd://src/vm1', incoming: true }), /fetch-from and incoming/);
  t.doesNotThrow(() => serveConfigFrom({ export: ['vm1=/d/dst.img,fetch-from=nbd://src/vm1', 'vm2=/d/b.img,read-only'] }), 'each alone is fine');
});
