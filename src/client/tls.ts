/**
 * TLS for nbds:// URIs: node:tls options from libnbd's tls-certificates
 * directory layout (ca-cert.pem, client-cert.pem, client-key.pem). The
 * upgrade itself happens in the handshake, after NBD_OPT_STARTTLS.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { formatNbdUri, type NbdUri } from './uri.js';

/** Options for the TLS session to `u` (which must carry `tls`); throws if its certificate directory has no CA. */
export function tlsOptions(u: NbdUri): tls.ConnectionOptions {
  const t = u.tls!;
  const file = (name: string) => (t.certificates ? path.join(t.certificates, name) : undefined);
  const readIf = (f: string | undefined) => (f && fs.existsSync(f) ? fs.readFileSync(f) : undefined);
  const ca = readIf(file('ca-cert.pem'));
  const cert = readIf(file('client-cert.pem'));
  const key = readIf(file('client-key.pem'));
  if (t.certificates && !ca) throw new Error(`${formatNbdUri(u)}: ${file('ca-cert.pem')} not found (tls-certificates=)`);
  const servername = t.hostname ?? (u.transport === 'tcp' ? u.host : 'localhost');
  return {
    ...(ca ? { ca } : {}),
    ...(cert && key ? { cert, key } : {}),
    rejectUnauthorized: t.verifyPeer,
    // SNI takes no IP literals; the name is still checked against the certificate.
    ...(net.isIP(servername) ? {} : { servername }),
    checkServerIdentity: (_host, c) => tls.checkServerIdentity(servername, c),
    minVersion: 'TLSv1.2',
  };
}
