import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ConfigError, loadConfigFile, numericArg, parseConfig, parseExportSpec, serveConfigFrom } from '../../../src/cli/config.js';

const configDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../config');

t.test('every example JSON config in config/ parses', async (t) => {
  const files = fs.readdirSync(configDir).filter((f) => f.endsWith('.json') && !f.includes('grafana'));
  t.ok(files.length >= 2, `found ${files.join(', ')}`);
  for (const f of files) {
    const c = loadConfigFile(path.join(configDir, f));
    t.ok(c.exports && c.exports.length > 0, `${f} has exports`);
    for (const e of c.exports ?? []) t.ok(path.isAbsolute(e.path), `${f}: ${e.name} path resolved`);
  }
});

t.test('bad configs name the field', async (t) => {
  t.throws(() => parseConfig({ port: 'x' }, 'c.json', '/'), { message: /c\.json\.port: expected a port/ });
  t.throws(() => parseConfig({ exports: [{ name: 'a' }] }, 'c.json', '/'), { message: /c\.json\.exports\[0\]\.path: missing/ });
  t.throws(() => parseConfig({ exports: [{ name: 'a', path: 'x', readonly: true }] }, 'c.json', '/'), {
    message: /exports\[0\]\.readonly: unknown field/,
  });
  t.throws(() => parseConfig([], 'c.json', '/'), ConfigError);
});

t.test('--export specs', async (t) => {
  t.same(parseExportSpec('vm1=/d/a.img,oldstyle-port=20001,read-only,description=a, b'), {
    name: 'vm1',
    path: '/d/a.img',
    readOnly: true,
    oldstylePort: 20001,
    description: 'a, b',
  });
  t.throws(() => parseExportSpec('noequals'), ConfigError);
  t.throws(() => parseExportSpec('a=/x,oldstyle-port=abc'), /bad option/);
  t.throws(() => parseExportSpec('a=/x,bogus'), /bad option/);
});

t.test('command line on top of the config file; duplicates refused', async (t) => {
  const cfg = serveConfigFrom({
    config: path.join(configDir, 'single-export.json'),
    images: ['/tmp/b.img'],
    name: ['b'],
    'oldstyle-port': [20005],
    port: 0,
    'read-only': true,
  });
  t.equal(cfg.port, 0, 'CLI port wins');
  t.equal(cfg.listen, '0.0.0.0', 'file listen kept');
  t.same(cfg.exports.map((e) => e.name), ['vm1', 'b']);
  t.same(cfg.exports[1], { name: 'b', path: '/tmp/b.img', readOnly: true, oldstylePort: 20005 });
  t.throws(() => serveConfigFrom({ images: ['/a.img', '/b/a.img'] }), /defined twice/);
  t.throws(() => serveConfigFrom({}), /no exports/);
  t.throws(() => serveConfigFrom({ images: ['/a.img'], name: ['x', 'y'] }), /2 --name options for 1 IMAGE/);
});

t.test('the event loop\'s polling bound: --busy-poll-us or "busyPollUs", 0 to 10000, default 100', async (t) => {
  t.equal(serveConfigFrom({ images: ['/a.img'] }).busyPollUs, 100, 'default');
  t.equal(serveConfigFrom({ images: ['/a.img'], 'busy-poll-us': 0 }).busyPollUs, 0, 'off from the command line');
  t.equal(parseConfig({ busyPollUs: 250 }, 'c.json', '/').busyPollUs, 250);
  t.throws(() => parseConfig({ busyPollUs: -1 }, 'c.json', '/'), { message: /c\.json\.busyPollUs: expected a number of microseconds from 0 to 10000/ });
  t.throws(() => parseConfig({ busyPollUs: 10001 }, 'c.json', '/'), { message: /busyPollUs/ });
  t.throws(() => numericArg('busy-poll-us', 'busy-poll')('fast'), { message: /--busy-poll-us: expected a number of microseconds from 0 to 10000, got "fast"/ });
  t.equal(numericArg('busy-poll-us', 'busy-poll')('50'), 50);
});

t.test('the activity log capacity: --activity-log-extents or "activityLogExtents", 1 to 65530', async (t) => {
  t.equal(parseConfig({ activityLogExtents: 2048 }, 'c.json', '/').activityLogExtents, 2048);
  t.throws(() => parseConfig({ activityLogExtents: 0 }, 'c.json', '/'), { message: /c\.json\.activityLogExtents: expected an integer from 1 to 65530/ });
  t.throws(() => parseConfig({ activityLogExtents: 65531 }, 'c.json', '/'), { message: /activityLogExtents/ });
  t.equal(serveConfigFrom({ images: ['/a.img'], 'activity-log-extents': 300 }).activityLogExtents, 300, 'from the command line');
  t.equal(serveConfigFrom({ images: ['/a.img'] }).activityLogExtents, undefined, 'unset: the log picks (every extent, up to 16378)');
  t.throws(() => numericArg('activity-log-extents', 'log-extents')('70000'), { message: /--activity-log-extents: expected an integer from 1 to 65530, got "70000"/ });
});
