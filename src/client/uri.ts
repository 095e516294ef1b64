/**
 * NBD URIs (doc/uri.md in NetworkBlockDevice/nbd, as qemu and libnbd read them):
 *
 *   nbd://host[:port]/[export]            TCP, port 10809 by default
 *   nbd://[::1]:10809/export              IPv6 literal (RFC 2732)
 *   nbd+unix:///[export]?socket=/path     Unix domain socket
 *
 * The export name is the path without its leading '/', percent-decoded
 * ("nbd://h//disk" names "/disk", "nbd://h" and "nbd://h/" name "").
 *   nbds://host[:port]/export?tls-certificates=DIR   TLS (STARTTLS) required
 *
 * TLS as libnbd reads it: DIR holds ca-cert.pem and, for client certificate
 * authentication, client-cert.pem and client-key.pem; tls-verify-peer=false
 * skips verifying the server; tls-hostname= overrides the name checked in its
 * certificate (default: the host). Unknown query parameters are diagnosed, as
 * the URI spec asks.
 */
import { NbdMigrateError } from '../util/errors.js';

export const NBD_DEFAULT_PORT = 10809;

/** TLS settings of an nbds:// URI. */
export interface NbdTlsSettings {
  /** Directory with ca-cert.pem and optionally client-cert.pem/client-key.pem; absent: the system CAs. */
  readonly certificates?: string;
  readonly verifyPeer: boolean;
  /** Name to check in the server certificate. */
  readonly hostname?: string;
}

export interface NbdTcpUri {
  readonly transport: 'tcp';
  readonly host: string;
  readonly port: number;
  readonly exportName: string;
  readonly tls?: NbdTlsSettings;
}

export interface NbdUnixUri {
  readonly transport: 'unix';
  /** Socket path; a leading NUL selects the Linux abstract namespace. */
  readonly socket: string;
  readonly exportName: string;
  readonly tls?: NbdTlsSettings;
}

export type NbdUri = NbdTcpUri | NbdUnixUri;

export class NbdUriError extends NbdMigrateError {
  override readonly name: string = 'NbdUriError';
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/** RFC 3986 appendix B, with the authority made optional. */
const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$/;

export function parseNbdUri(uri: string): NbdUri {
  const fail = (why: string): never => {
    throw new NbdUriError(`invalid NBD URI "${uri}": ${why}`);
  };
  if (typeof uri !== 'string' || uri.length === 0) fail('empty');
  const m = URI_RE.exec(uri);
  if (!m) return fail('not a URI (expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH)');
  const scheme = m[1]!.toLowerCase();
  const authority = m[2];
  const path = m[3]!;
  const query = m[4];
  const fragment = m[5];

  let transport: 'tcp' | 'unix';
  let secure = false;
  switch (scheme) {
    case 'nbd':
    case 'nbd+tcp':
      transport = 'tcp';
      break;
    case 'nbd+unix':
      transport = 'unix';
      break;
    case 'nbds':
    case 'nbds+tcp':
      transport = 'tcp';
      secure = true;
      break;
    case 'nbds+unix':
      transport = 'unix';
      secure = true;
      break;
    case 'nbds+vsock':
    case 'nbd+vsock':
      return fail('AF_VSOCK transport not supported (use nbd:// or nbd+unix://)');
    default:
      return fail(`unknown scheme "${scheme}:" (expected nbd:// or nbd+unix://)`);
  }
  if (fragment !== undefined) fail('a fragment ("#...") is not allowed');

  if (path !== '' && !path.startsWith('/')) fail('the export name must follow a "/"');
  const exportName = decode(path.slice(1), 'export name', fail);
  if (exportName.includes('\0')) fail('the export name contains a NUL character');
  if (Buffer.byteLength(exportName) > 4096) fail('the export name is longer than 4096 bytes');

  const params = parseQuery(query, fail);
  for (const key of params.keys()) {
    if (key.startsWith('tls-')) {
      if (!secure) fail(`query parameter "${key}" needs a TLS scheme (nbds://)`);
      if (!['tls-certificates', 'tls-verify-peer', 'tls-hostname'].includes(key)) fail(`unsupported TLS query parameter "${key}"`);
    } else if (key !== 'socket') fail(`unknown query parameter "${key}"`);
  }
  let tls: NbdTlsSettings | undefined;
  if (secure) {
    const verify = params.get('tls-verify-peer');
    if (verify !== undefined && !['true', 'false', '1', '0'].includes(verify)) fail(`tls-verify-peer must be true or false, got "${verify}"`);
    const certificates = params.get('tls-certificates');
    const hostname = params.get('tls-hostname');
    tls = {
      verifyPeer: verify !== 'false' && verify !== '0',
      ...(certificates ? { certificates } : {}),
      ...(hostname ? { hostname } : {}),
    };
  }

  if (transport === 'unix') {
    if (authority) fail('a nbd+unix URI takes no host (write nbd+unix:///export?socket=PATH)');
    const socket = params.get('socket');
    if (socket === undefined) return fail('a nbd+unix URI needs a "socket" query parameter (nbd+unix:///export?socket=PATH)');
    if (socket === '') fail('the "socket" query parameter is empty');
    return tls ? { transport, socket, exportName, tls } : { transport, socket, exportName };
  }

  if (params.has('socket')) fail('the "socket" query parameter is only valid with nbd+unix://');
  if (authority === undefined || authority === '') return fail('missing host (expected nbd://host[:port]/export)');
  let hostport = authority;
  const at = hostport.lastIndexOf('@');
  if (at >= 0) fail('user information ("user@") is used for TLS-PSK authentication, which is not supported (use X.509 certificates)');
  let host: string;
  let portText: string | undefined;
  if (hostport.startsWith('[')) {
    const close = hostport.indexOf(']');
    if (close < 0) return fail('unterminated IPv6 address ("[" without "]")');
    host = hostport.slice(1, close);
    const rest = hostport.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) fail(`unexpected "${rest}" after the IPv6 address`);
    portText = rest === '' ? undefined : rest.slice(1);
    if (!/^[0-9A-Fa-f:.]+(%.+)?$/.test(host) || !host.includes(':')) fail(`"${host}" is not an IPv6 address`);
    host = decode(host, 'host', fail);
  } else {
    const colon = hostport.lastIndexOf(':');
    if (colon >= 0) {
      portText = hostport.slice(colon + 1);
      hostport = hostport.slice(0, colon);
    }
    host = decode(hostport, 'host', fail);
    if (host.includes(':')) fail('an IPv6 address must be written in brackets, e.g. nbd://[::1]:10809/export');
  }
  if (host === '') fail('missing host (expected nbd://host[:port]/export)');
  if (/[\s/\\]/.test(host)) fail(`invalid host "${host}"`);
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== '') {
    if (!/^[0-9]{1,5}$/.test(portText)) fail(`invalid port "${portText}"`);
    port = Number(portText);
    if (port < 1 || port > 65535) fail(`port ${port} is out of range (1-65535)`);
  }
  return tls ? { transport, host, port, exportName, tls } : { transport, host, port, exportName };
}

/** The canonical URI text for a parsed URI (for messages and logs). */
export function formatNbdUri(u: NbdUri): string {
  const name = encodeURIComponent(u.exportName).replace(/%2F/gi, '/');
  const s = u.tls ? 's' : '';
  if (u.transport === 'unix') return `nbd${s}+unix:///${name}?socket=${encodeURIComponent(u.socket).replace(/%2F/gi, '/')}`;
  const host = u.host.includes(':') ? `[${u.host.replace(/%/g, '%25')}]` : u.host;
  return `nbd${s}://${host}${u.port === NBD_DEFAULT_PORT ? '' : `:${u.port}`}/${name}`;
}

function decode(s: string, what: string, fail: (why: string) => never): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return fail(`bad percent-encoding in the ${what}`);
  }
}

function parseQuery(query: string | undefined, fail: (why: string) => never): Map<string, string> {
  const out = new Map<string, string>();
  if (query === undefined || query === '') return out;
  for (const part of query.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = decode(eq < 0 ? part : part.slice(0, eq), 'query', fail);
    const value = eq < 0 ? '' : decode(part.slice(eq + 1), 'query', fail);
    if (out.has(key)) fail(`query parameter "${key}" given twice`);
    out.set(key, value);
  }
  return out;
}
