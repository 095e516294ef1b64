// Test certificates made with openssl, laid out as QEMU's tls-creds-x509 and libnbd's
// tls-certificates= expect: DIR/ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { requireTool, runOk } from '../helpers/tools.js';

export interface Certs {
  /** CA certificate and key. */
  ca: string;
  /** For servers (qemu-nbd --tls-creds dir, or our --tls-cert/--tls-key). */
  serverDir: string;
  /** For clients with a certificate (qemu/libnbd). */
  clientDir: string;
  /** For clients without a certificate (CA only). */
  anonDir: string;
}

export async function makeCerts(dir: string): Promise<Certs> {
  await requireTool('openssl', 'openssl');
  const p = (...x: string[]) => path.join(dir, ...x);
  for (const d of ['server', 'client', 'anon']) fs.mkdirSync(p(d), { recursive: true });
  const ossl = (args: string[]) => runOk('openssl', args, { timeoutMs: 30_000 });
  await ossl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'), '-days', '2', '-subj', '/CN=nbd-migrate test CA']);
  fs.writeFileSync(p('server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  fs.writeFileSync(p('client.ext'), 'extendedKeyUsage=clientAuth\n');
  for (const who of ['server', 'client']) {
    await ossl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p(who, `${who}-key.pem`), '-out', p(`${who}.csr`), '-subj', `/CN=${who === 'server' ? 'localhost' : 'nbd-client'}`]);
    await ossl(['x509', '-req', '-in', p(`${who}.csr`), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'), '-CAcreateserial', '-out', p(who, `${who}-cert.pem`), '-days', '2', '-extfile', p(`${who}.ext`)]);
  }
  for (const d of ['server', 'client', 'anon']) fs.copyFileSync(p('ca-cert.pem'), p(d, 'ca-cert.pem'));
  return { ca: p('ca-cert.pem'), serverDir: p('server'), clientDir: p('client'), anonDir: p('anon') };
}

/** QEMU's --object for a client credential directory. */
export const qemuTlsObject = (dir: string) => `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`;

/** Certificates a careful peer must refuse, each in a directory of the same layout. */
export interface BadCerts {
  /** Client: a self-signed certificate (CN=rogue) the test CA never signed. */
  rogueDir: string;
  /** Client: signed by another CA (CN=foreign). */
  foreignDir: string;
  /** Client: signed by the test CA, valid only in January 2020 (CN=expired). */
  expiredDir: string;
  /** Server: right names, signed by another CA (ca-cert.pem holds both CAs, so it still verifies clients of the test CA). */
  foreignServerDir: string;
  /** Server: signed by the test CA for names that are not 127.0.0.1/localhost. */
  wrongNameServerDir: string;
}

export async function makeBadCerts(certs: Certs): Promise<BadCerts> {
  const root = path.dirname(certs.ca);
  const p = (...x: string[]) => path.join(root, ...x);
  const ossl = (args: string[]) => runOk('openssl', args, { timeoutMs: 30_000 });
  const caKey = p('ca-key.pem');
  const dirs = { rogueDir: p('rogue'), foreignDir: p('foreign'), expiredDir: p('expired'), foreignServerDir: p('foreign-server'), wrongNameServerDir: p('wrong-name-server') };
  for (const d of Object.values(dirs)) fs.mkdirSync(d, { recursive: true });
  const key = (dir: string, who: string, cn: string) =>
    ossl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(dir, `${who}-key.pem`), '-out', path.join(dir, `${who}.csr`), '-subj', `/CN=${cn}`]);
  const sign = (dir: string, who: string, ca: string, key: string, ext: string) =>
    ossl(['x509', '-req', '-in', path.join(dir, `${who}.csr`), '-CA', ca, '-CAkey', key, '-CAcreateserial', '-out', path.join(dir, `${who}-cert.pem`), '-days', '2', '-extfile', ext]);

  await ossl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('other-ca-key.pem'), '-out', p('other-ca-cert.pem'), '-days', '2', '-subj', '/CN=some other CA']);
  await ossl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(dirs.rogueDir, 'client-key.pem'), '-out', path.join(dirs.rogueDir, 'client-cert.pem'), '-days', '2', '-subj', '/CN=rogue', '-extensions', 'v3', '-config', writeReqConfig(p('rogue.cnf'))]);
  await key(dirs.foreignDir, 'client', 'foreign');
  await sign(dirs.foreignDir, 'client', p('other-ca-cert.pem'), p('other-ca-key.pem'), p('client.ext'));

  // x509 -days cannot put a validity in the past; openssl ca takes explicit dates.
  await key(dirs.expiredDir, 'client', 'expired');
  const db = p('expired-ca');
  fs.mkdirSync(db, { recursive: true });
  fs.writeFileSync(path.join(db, 'index.txt'), '');
  fs.writeFileSync(path.join(db, 'serial'), '1000\n');
  fs.writeFileSync(
    path.join(db, 'ca.cnf'),
    `[ca]\ndefault_ca = d\n[d]\ndatabase = ${path.join(db, 'index.txt')}\nnew_certs_dir = ${db}\nserial = ${path.join(db, 'serial')}\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n`,
  );
  await ossl(['ca', '-batch', '-notext', '-config', path.join(db, 'ca.cnf'), '-cert', certs.ca, '-keyfile', caKey, '-in', path.join(dirs.expiredDir, 'client.csr'),
    '-out', path.join(dirs.expiredDir, 'client-cert.pem'), '-startdate', '20200101000000Z', '-enddate', '20200201000000Z', '-extfile', p('client.ext')]);

  await key(dirs.foreignServerDir, 'server', 'localhost');
  await sign(dirs.foreignServerDir, 'server', p('other-ca-cert.pem'), p('other-ca-key.pem'), p('server.ext'));
  fs.writeFileSync(p('wrong-name.ext'), 'subjectAltName=IP:192.0.2.1,DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n');
  await key(dirs.wrongNameServerDir, 'server', 'elsewhere.invalid');
  await sign(dirs.wrongNameServerDir, 'server', certs.ca, caKey, p('wrong-name.ext'));

  for (const d of [dirs.rogueDir, dirs.foreignDir, dirs.expiredDir, dirs.wrongNameServerDir]) fs.copyFileSync(certs.ca, path.join(d, 'ca-cert.pem'));
  fs.writeFileSync(path.join(dirs.foreignServerDir, 'ca-cert.pem'), Buffer.concat([fs.readFileSync(p('other-ca-cert.pem')), fs.readFileSync(certs.ca)]));
  return dirs;
}

function writeReqConfig(file: string): string {
  fs.writeFileSync(file, '[req]\ndistinguished_name = dn\n[dn]\n[v3]\nextendedKeyUsage = clientAuth\nbasicConstraints = critical,CA:FALSE\n');
  return file;
}
