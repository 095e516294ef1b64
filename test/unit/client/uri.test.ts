import t from 'tap';
import { formatNbdUri, parseNbdUri, NbdUriError } from '../../../src/client/uri.js';

t.test('TCP URIs', async (t) => {
  t.same(parseNbdUri('nbd://example.com/disk'), { transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk' });
  t.same(parseNbdUri('nbd://example.com:1234/disk'), { transport: 'tcp', host: 'example.com', port: 1234, exportName: 'disk' });
  t.same(parseNbdUri('nbd://127.0.0.1'), { transport: 'tcp', host: '127.0.0.1', port: 10809, exportName: '' }, 'no path: export ""');
  t.same(parseNbdUri('nbd://127.0.0.1/'), { transport: 'tcp', host: '127.0.0.1', port: 10809, exportName: '' }, '"/": export ""');
  t.match(parseNbdUri('nbd://127.0.0.1:/x'), { port: 10809 }, 'empty port: default');
  t.equal(parseNbdUri('nbd://example.com//disk').exportName, '/disk', 'only the first "/" is dropped');
  t.equal(parseNbdUri('nbd://example.com/hello%20world').exportName, 'hello world', 'percent-decoded');
  t.equal(parseNbdUri('nbd://example.com/a/../b').exportName, 'a/../b', 'no dot-segment normalisation');
  t.equal(parseNbdUri('NBD://example.com/x').transport, 'tcp', 'scheme is case-insensitive');
  t.equal(parseNbdUri('nbd+tcp://example.com/x').transport, 'tcp', 'nbd+tcp is TCP');
});

t.test('IPv6 literals', async (t) => {
  t.same(parseNbdUri('nbd://[::1]/disk'), { transport: 'tcp', host: '::1', port: 10809, exportName: 'disk' });
  t.same(parseNbdUri('nbd://[::1]:10810/disk'), { transport: 'tcp', host: '::1', port: 10810, exportName: 'disk' });
  t.same(parseNbdUri('nbd://[fe80::1%25eth0]:1/'), { transport: 'tcp', host: 'fe80::1%eth0', port: 1, exportName: '' }, 'zone id');
  t.throws(() => parseNbdUri('nbd://::1/disk'), /brackets/, 'unbracketed IPv6 is refused');
  t.throws(() => parseNbdUri('nbd://[::1/disk'), /unterminated/);
  t.throws(() => parseNbdUri('nbd://[::1]x/disk'), /after the IPv6 address/);
});

t.test('Unix socket URIs', async (t) => {
  t.same(parseNbdUri('nbd+unix:///disk?socket=/run/nbd.sock'), { transport: 'unix', socket: '/run/nbd.sock', exportName: 'disk' });
  t.same(parseNbdUri('nbd+unix:///?socket=nbd.sock'), { transport: 'unix', socket: 'nbd.sock', exportName: '' }, 'relative socket path');
  t.same(parseNbdUri('nbd+unix://?socket=%2Ftmp%2Fa%20b'), { transport: 'unix', socket: '/tmp/a b', exportName: '' }, 'encoded socket path');
  t.equal(parseNbdUri('nbd+unix:///?socket=%00/abstract').transport === 'unix' && (parseNbdUri('nbd+unix:///?socket=%00/abstract') as { socket: string }).socket, '\0/abstract', 'abstract socket');
  t.throws(() => parseNbdUri('nbd+unix:///disk'), /needs a "socket" query parameter/);
  t.throws(() => parseNbdUri('nbd+unix:///disk?socket='), /empty/);
  t.throws(() => parseNbdUri('nbd+unix://host/disk?socket=/x'), /takes no host/);
  t.throws(() => parseNbdUri('nbd://host/disk?socket=/x'), /only valid with nbd\+unix/);
});

t.test('TLS URIs and unsupported forms', async (t) => {
  t.same(parseNbdUri('nbds://host:10810/disk?tls-certificates=/etc/pki/nbd'), {
    transport: 'tcp',
    host: 'host',
    port: 10810,
    exportName: 'disk',
    tls: { verifyPeer: true, certificates: '/etc/pki/nbd' },
  });
  t.same(parseNbdUri('nbds+unix:///disk?socket=/x&tls-verify-peer=false').tls, { verifyPeer: false });
  t.same(parseNbdUri('NBDS://h/').tls, { verifyPeer: true });
  t.equal(formatNbdUri(parseNbdUri('nbds://h:10810/d?tls-certificates=/p')), 'nbds://h:10810/d');
  t.throws(() => parseNbdUri('nbd://host/disk?tls-certificates=/p'), /needs a TLS scheme/);
  t.throws(() => parseNbdUri('nbds://host/disk?tls-type=x509'), /unsupported TLS query parameter/);
  t.throws(() => parseNbdUri('nbds://host/disk?tls-verify-peer=maybe'), /true or false/);
  t.throws(() => parseNbdUri('nbd://user@host/disk'), /TLS/);
  t.throws(() => parseNbdUri('nbd+vsock://1:10809/disk'), /vsock/i);
});

t.test('bad URIs', async (t) => {
  const bad: Array<[string, RegExp]> = [
    ['', /empty/],
    ['/dev/nbd0', /not a URI/],
    ['http://host/disk', /unknown scheme "http:"/],
    ['nbd:///disk', /missing host/],
    ['nbd://host:0/disk', /out of range/],
    ['nbd://host:65536/disk', /out of range/],
    ['nbd://host:12a/disk', /invalid port/],
    ['nbd://host/disk?foo=1', /unknown query parameter "foo"/],
    ['nbd://host/disk#frag', /fragment/],
    ['nbd://host/%zz', /percent-encoding/],
    ['nbd://host/a%00b', /NUL/],
    ['nbd+unix:///d?socket=/a&socket=/b', /twice/],
  ];
  for (const [u, re] of bad) {
    t.throws(() => parseNbdUri(u), re, JSON.stringify(u));
    try {
      parseNbdUri(u);
    } catch (e) {
      t.ok(e instanceof NbdUriError && (e as Error).message.includes(`"${u}"`), 'the message quotes the URI');
    }
  }
});

t.test('formatNbdUri round-trips', async (t) => {
  for (const u of ['nbd://example.com/disk', 'nbd://[::1]:10810/a%20b', 'nbd+unix:///disk?socket=/run/x.sock', 'nbd://h:1/', 'nbd://h//x']) {
    const p = parseNbdUri(u);
    t.same(parseNbdUri(formatNbdUri(p)), p, u);
  }
  t.equal(formatNbdUri(parseNbdUri('nbd://h:10809/x')), 'nbd://h/x', 'default port omitted');
});
