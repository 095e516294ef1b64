import t from 'tap';
import { Acl, AclError } from '../../../src/server/acl.js';

t.test('IPv4 and IPv6 CIDRs and single addresses', async (t) => {
  const acl = Acl.parse(['10.0.0.0/8', '192.168.1.7', 'fd00::/8', '::1']);
  t.ok(acl.allows('10.200.3.4'));
  t.notOk(acl.allows('11.0.0.1'));
  t.ok(acl.allows('192.168.1.7'));
  t.notOk(acl.allows('192.168.1.8'));
  t.ok(acl.allows('fd12:3456::1'));
  t.notOk(acl.allows('fe80::1'));
  t.ok(acl.allows('::1'));
  t.ok(acl.allows('::ffff:10.1.2.3'), 'IPv4-mapped IPv6 address from a dual-stack listener');
  t.notOk(acl.allows('::ffff:11.1.2.3'));
  t.ok(acl.allows(undefined), 'Unix-socket clients are not subject to address lists');
  t.ok(Acl.parse(['0.0.0.0/0']).allows('203.0.113.9'));
  t.notOk(Acl.parse([]).allows('127.0.0.1'), 'an empty list admits no TCP client');
});

t.test('bad entries are refused with the entry named', async (t) => {
  for (const bad of ['10.0.0.0/33', 'example.com', '10.0.0.1/8/2', '::1/129', '1.2.3.4/x', ''])
    t.throws(() => Acl.parse([bad]), AclError, bad);
  t.throws(() => Acl.parse(['10.0.0.0/33']), /"10.0.0.0\/33"/);
});
