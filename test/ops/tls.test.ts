// TLS: STARTTLS with X.509 against QEMU's and libnbd's clients, client certificates, and an encrypted mirror.
import t from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { adminRequest } from '../helpers/admin.js';
import { compare, freePort, qemuNbd, waitForJob } from '../migration/harness.js';
import { allBytes, makeImage, MiB, serve, tmpDir, type ServerHandle } from '../helpers/server.js';
import { describeRun, requireTool, run } from '../helpers/tools.js';
import { makeBadCerts, makeCerts, qemuTlsObject } from './certs.js';

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

/** Bytes of a socket as they arrive; `read` resolves undefined if the socket ends first. */
class Bytes {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  ended = false;
  error: Error | undefined;
  constructor(private readonly s: net.Socket) {
    s.on('data', this.onData);
    s.on('error', (e) => (this.error = e));
    s.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }
  private onData = (b: Buffer) => {
    this.buf = Buffer.concat([this.buf, b]);
    this.wake?.();
  };
  detach(): void {
    this.s.off('data', this.onData);
  }
  async read(n: number): Promise<Buffer | undefined> {
    while (this.buf.length < n && !this.ended) await new Promise<void>((r) => (this.wake = r));
    if (this.buf.length < n) return undefined;
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
}

const option = (opt: number) => {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(0x49484156454f5054n, 0); // IHAVEOPT
  b.writeUInt32BE(opt, 8);
  return b;
};

/**
 * A client that presents whatever certificate `dir` holds: the newstyle handshake by hand, NBD_OPT_STARTTLS,
 * a node:tls upgrade with DIR/client-cert.pem (if present), then NBD_OPT_LIST. Resolves with the export names
 * listed, or undefined and why the session ended without them.
 */
async function startTlsThenList(port: number, dir: string): Promise<{ listed?: string[]; why: string }> {
  const raw = net.connect({ host: '127.0.0.1', port });
  try {
    const clear = new Bytes(raw);
    const greeting = await clear.read(18);
    if (!greeting || greeting.readBigUInt64BE(8) !== 0x49484156454f5054n) throw new Error('no newstyle greeting');
    raw.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
    raw.write(option(5)); // NBD_OPT_STARTTLS
    const ack = await clear.read(20);
    if (!ack || ack.readUInt32BE(8) !== 5 || ack.readUInt32BE(12) !== 1 || ack.readUInt32BE(16) !== 0) throw new Error(`STARTTLS not acknowledged: ${ack?.toString('hex')}`);
    clear.detach();
    const file = (f: string) => (fs.existsSync(path.join(dir, f)) ? fs.readFileSync(path.join(dir, f)) : undefined);
    const cert = file('client-cert.pem');
    const secure = tls.connect({ socket: raw, ca: file('ca-cert.pem'), ...(cert ? { cert, key: file('client-key.pem') } : {}), servername: 'localhost' });
    const enc = new Bytes(secure);
    const tlsError = await new Promise<Error | undefined>((resolve) => {
      secure.once('secureConnect', () => resolve(undefined));
      secure.once('error', resolve);
    });
    if (tlsError) return { why: `TLS handshake: ${tlsError.message}` };
    secure.write(option(3)); // NBD_OPT_LIST
    const names: string[] = [];
    for (;;) {
      const head = await enc.read(20);
      if (!head) return { why: `session ended without a reply to NBD_OPT_LIST${enc.error ? ` (${enc.error.message})` : ''}` };
      const type = head.readUInt32BE(12);
      const data = (await enc.read(head.readUInt32BE(16))) ?? Buffer.alloc(0);
      if (type === 1) break; // ACK
      if (type !== 2) return { why: `NBD_OPT_LIST answered 0x${type.toString(16)}` };
      names.push(data.subarray(4, 4 + data.readUInt32BE(0)).toString('utf8'));
    }
    secure.end(option(2)); // NBD_OPT_ABORT
    return { listed: names, why: 'served' };
  } finally {
    raw.destroy();
  }
}

const logLines = (s: ServerHandle) =>
  s.stderr().split('\n').flatMap((l) => {
    try {
      return [JSON.parse(l) as Record<string, unknown>];
    } catch {
      return [];
    }
  });

t.test('--tls-ca: a certificate the CA did not sign, an expired one, or none is refused before any option', async (t) => {
  const dir = await tmpDir(t);
  const certs = await makeCerts(path.join(dir, 'pki'));
  const bad = await makeBadCerts(certs);
  const img = await makeImage(path.join(dir, 'disk.img'), 4 * MiB);
  const s = await serve(t, [
    img, '--name', 'vm1', '--tls', 'require',
    '--tls-cert', path.join(certs.serverDir, 'server-cert.pem'), '--tls-key', path.join(certs.serverDir, 'server-key.pem'), '--tls-ca', certs.ca,
  ]);

  const good = await startTlsThenList(s.newstylePort, certs.clientDir);
  t.same(good.listed, ['vm1'], `a certificate the CA signed is served (${good.why})`);
  t.equal((await s.waitForLog((e) => e.event === 'tls-established', 5000)).clientCert, 'nbd-client');

  for (const [what, certDir, cn, code] of [
    ['a self-signed', bad.rogueDir, 'rogue', 'DEPTH_ZERO_SELF_SIGNED_CERT'],
    ["another CA's", bad.foreignDir, 'foreign', /UNABLE_TO_(VERIFY_LEAF_SIGNATURE|GET_ISSUER_CERT)/],
    ['an expired', bad.expiredDir, 'expired', 'CERT_HAS_EXPIRED'],
  ] as const) {
    const r = await startTlsThenList(s.newstylePort, certDir);
    t.equal(r.listed, undefined, `${what} client certificate is refused: ${r.why}`);
    const refused = await s.waitForLog((e) => e.event === 'tls-refused' && e.clientCert === cn, 5000);
    t.match(refused.authorizationError, code, `the refusal names the verification error (${what})`);
    t.notOk(logLines(s).some((e) => e.event === 'tls-established' && e.clientCert === cn), `no TLS session is established for ${cn}`);
  }

  const none = await startTlsThenList(s.newstylePort, certs.anonDir);
  t.equal(none.listed, undefined, `a client without a certificate is refused: ${none.why}`);
  const refused = await s.waitForLog((e) => e.event === 'tls-refused' && e.clientCert === null, 5000);
  t.ok(refused.authorizationError, `the refusal of a missing certificate is logged (${String(refused.authorizationError)})`);

  const after = await startTlsThenList(s.newstylePort, certs.clientDir);
  t.same(after.listed, ['vm1'], 'refusals leave the server serving');
});

t.test('the mirror refuses a TLS target whose certificate the CA did not sign, or that names another host', async (t) => {
  const dir = await tmpDir(t);
  const certs = await makeCerts(path.join(dir, 'pki'));
  const bad = await makeBadCerts(certs);
  const src = await makeImage(path.join(dir, 'src.img'), 8 * MiB, { fill: 'random' });
  const admin = path.join(dir, 'admin.sock');
  await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);

  for (const [what, serverDir, why] of [
    ['a certificate from another CA', bad.foreignServerDir, /TLS handshake failed: .*(unable to verify|self.signed|issuer)/i],
    ['a certificate for another host', bad.wrongNameServerDir, /TLS handshake failed: .*127\.0\.0\.1 is not in the cert's list/],
  ] as const) {
    const dst = await makeImage(path.join(dir, `dst-${path.basename(serverDir)}.img`), 8 * MiB);
    const port = await freePort();
    const q = await qemuNbd(dst, 'vm1', port, ['--object', `tls-creds-x509,id=tls0,dir=${serverDir},endpoint=server`, '--tls-creds', 'tls0']);
    t.teardown(() => q.stop());
    const target = `nbds://127.0.0.1:${port}/vm1`;
    const err = await adminRequest(admin, { cmd: 'mirror', export: 'vm1', target: `${target}?tls-certificates=${certs.clientDir}` }).then(
      () => undefined,
      (e: Error) => e,
    );
    t.ok(err, `a target with ${what} is refused`);
    t.match(err?.message, why, `the error says why (${err?.message})`);
    t.match(err?.message, target, 'and names the target');
    await q.stop();
    t.ok(allBytes(fs.readFileSync(dst), 0), 'nothing was written to the target');
  }
});
