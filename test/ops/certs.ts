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
