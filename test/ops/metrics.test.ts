// --metrics: Prometheus exposition fed by the core's counters.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest } from '../helpers/admin.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requirePythonNbd, requireTool, run, SYSTEM_PYTHON } from '../helpers/tools.js';

async function scrape(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  return res.text();
}

function value(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

t.test('request, connection, dirty and mirror metrics', async (t) => {
  await requireTool('qemu-io', 'qemu-utils');
  const dir = await tmpDir(t);
  const img = await makeImage(path.join(dir, 'disk.img'), 16 * MiB);
  const admin = path.join(dir, 'admin.sock');
  const s = await serve(t, [img, '--name', 'vm1', '--metrics', '127.0.0.1:0', '--admin-socket', admin]);
  const m = await s.waitForLog((e) => e.event === 'listening' && e.listener === 'metrics');
  const port = m.port as number;

  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 1M', '-c', 'read 0 64k', s.uri('vm1')]);
  t.match(io.stdout + io.stderr, /wrote 1048576/, describeRun(io));
  await requirePythonNbd();
  const bad = await run(SYSTEM_PYTHON, [
    '-c',
    'import nbd,sys\nh=nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(sys.argv[1])\ntry:\n  h.pread(4096, 16*1024*1024)\nexcept nbd.Error as e:\n  print("errno", e.errnum)\nh.shutdown()',
    s.uri('vm1'),
  ]);
  t.match(bad.stdout, /errno 22/, describeRun(bad));
  const text = await scrape(port);

  t.equal(value(text, 'nbd_migrate_requests_total{export="vm1",op="write"}'), 1);
  t.equal(value(text, 'nbd_migrate_request_bytes_total{export="vm1",op="write"}'), 1024 * 1024);
  t.ok((value(text, 'nbd_migrate_requests_total{export="vm1",op="read"}') ?? 0) >= 1);
  t.equal(value(text, 'nbd_migrate_request_errors_total{export="vm1",op="read",error="EINVAL"}'), 1, 'read past the end counted by error');
  t.equal(value(text, 'nbd_migrate_request_duration_seconds_count{export="vm1",op="write"}'), 1, 'latency histogram');
  t.equal(value(text, 'nbd_migrate_request_duration_seconds_bucket{export="vm1",op="write",le="+Inf"}'), 1);
  t.equal(value(text, 'nbd_migrate_connections_accepted_total'), 2);
  t.equal(value(text, 'nbd_migrate_connections_open'), 0);
  t.equal(value(text, 'nbd_migrate_dirty_bytes{export="vm1"}'), 1024 * 1024, 'dirty bytes follow the write');
  t.equal(value(text, 'nbd_migrate_dirty_blocks{export="vm1"}'), 16);

  // Naming: prefix, and _total on every counter.
  for (const l of text.split('\n').filter((x) => x.startsWith('# TYPE '))) {
    const [, , name, type] = l.split(' ');
    t.ok(name!.startsWith('nbd_migrate_'), `${name} has the prefix`);
    if (type === 'counter') t.ok(name!.endsWith('_total'), `counter ${name} ends in _total`);
  }

  // A mirror to an unreachable target is refused; nothing appears. A job against ourselves shows its state.
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: 'nbd://127.0.0.1:1/vm1' }));
  const after = await scrape(port);
  t.notMatch(after, /nbd_migrate_mirror_state\{/, 'no job, no job series');
  const nf = await fetch(`http://127.0.0.1:${port}/other`);
  t.equal(nf.status, 404);
});
