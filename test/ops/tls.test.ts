// TLS: STARTTLS with X.509 against QEMU's and libnbd's clients, client certificates, and an encrypted mirror.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest } from '../../src/admin/server.js';
import { compare, freePort, qemuNbd, waitForJob } from '../migration/harness.js';
import { makeImage, MiB, serve, tmpDir } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { makeCerts, qemuTlsObject } from './certs.js';

const qemuOpts = (port: number) => `driver=nbd,host=127.0.0.1,port=${port},export=vm1,tls-creds=tls0`;

t.test('--tls require: QEMU and libnbd over TLS; clear-text clients refused', async (t) => {
  await requireTool('qemu-io', 'qemu-utils');
  await requireTool('nbdinfo', 'libnbd-bin');
  const dir = await tmpDir(t);
  const certs = await makeCerts(path.join(dir, 'pki'));
  const img = await makeImage(path.join(dir, 'disk.img'), 16 * MiB);
  const s = await serve(t, [img, '--name', 'vm1', '--tls', 'require', '--tls-cert', path.join(certs.serverDir, 'server-cert.pem'), '--tls-key', path.join(certs.serverDir, 'server-key.pem')]);

  const io = await run('qemu-io', ['--object', qemuTlsObject(certs.clientDir), '--image-opts', qemuOpts(s.newstylePort), '-c', 'write -P 0x3c 0 2M', '-c', 'read -P 0x3c 0 2M']);
  t.equal(io.code, 0, describeRun(io));
  t.notMatch(io.stdout, /Pattern verification failed/);
  const info = await run('nbdinfo', [`nbds://127.0.0.1:${s.newstylePort}/vm1?tls-certificates=${certs.clientDir}`]);
  t.equal(info.code, 0, describeRun(info));
  t.match(info.stdout, /with TLS/);
  const plain = await run('qemu-img', ['info', '-f', 'raw', s.uri('vm1')]);
  t.not(plain.code, 0, 'clear text refused');
  t.match(plain.stderr, /TLS/, describeRun(plain));
  const list = await run('nbdinfo', ['--list', s.uri('')]);
  t.not(list.code, 0, 'even NBD_OPT_LIST needs TLS');
  t.ok(await s.waitForLog((e) => e.event === 'tls-established' && !!e.protocol, 5000), 'TLS sessions are logged');
});

t.test('--tls-ca: client certificates are verified', async (t) => {
  await requireTool('nbdinfo', 'libnbd-bin');
  const dir = await tmpDir(t);
  const certs = await makeCerts(path.join(dir, 'pki'));
  const img = await makeImage(path.join(dir, 'disk.img'), 4 * MiB);
  const s = await serve(t, [
    img, '--name', 'vm1', '--tls', 'require',
    '--tls-cert', path.join(certs.serverDir, 'server-cert.pem'), '--tls-key', path.join(certs.serverDir, 'server-key.pem'), '--tls-ca', certs.ca,
  ]);
  const withCert = await run('nbdinfo', [`nbds://127.0.0.1:${s.newstylePort}/vm1?tls-certificates=${certs.clientDir}`]);
  t.equal(withCert.code, 0, describeRun(withCert));
  const without = await run('nbdinfo', [`nbds://127.0.0.1:${s.newstylePort}/vm1?tls-certificates=${certs.anonDir}`]);
  t.not(without.code, 0, 'a client without a certificate is refused');
  const logged = await s.waitForLog((e) => e.event === 'handshake-failed' && /certificate/.test(String(e.cause)), 5000);
  t.ok(logged, 'the reason is logged');
  const clientCn = (await s.waitForLog((e) => e.event === 'tls-established', 5000)).clientCert;
  t.equal(clientCn, 'nbd-client', 'the client certificate subject is logged');
});

t.test('the mirror speaks TLS to a qemu-nbd --tls-creds target', async (t) => {
  const dir = await tmpDir(t);
  const certs = await makeCerts(path.join(dir, 'pki'));
  const src = await makeImage(path.join(dir, 'src.img'), 32 * MiB, { fill: 'random' });
  const dst = await makeImage(path.join(dir, 'dst.img'), 32 * MiB);
  const port = await freePort();
  const q = await qemuNbd(dst, 'vm1', port, ['--object', `tls-creds-x509,id=tls0,dir=${certs.serverDir},endpoint=server`, '--tls-creds', 'tls0']);
  t.teardown(() => q.stop());
  const admin = path.join(dir, 'admin.sock');
  await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  await t.rejects(adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbd://127.0.0.1:${port}/vm1` }), /requires TLS/, 'a clear-text target URI is refused by the target');
  await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `nbds://127.0.0.1:${port}/vm1?tls-certificates=${certs.clientDir}`, cutover: 'auto' });
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed');
  t.equal(done.dataBytes, 32 * MiB);
  await q.stop();
  const cmp = await compare(src, dst);
  t.equal(cmp.code, 0, describeRun(cmp));
});
