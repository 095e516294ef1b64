import t from 'tap';
import { InvalidArgument } from '../../../src/admin/args.js';
import { AdminError } from '../../../src/admin/server.js';
import { ConfigError } from '../../../src/cli/config.js';
import { isConnectionLost, isPermanent, NbdHandshakeError, NbdProtocolError, NbdRequestError, targetErrorKind } from '../../../src/client/errors.js';
import { NbdUriError, parseNbdUri } from '../../../src/client/uri.js';
import { JobError } from '../../../src/migration/errors.js';
import { targetErrorKind as reExported } from '../../../src/migration/target-errors.js';
import { Acl, AclError } from '../../../src/server/acl.js';
import { DeviceError } from '../../../src/storage/device.js';
import { errorCode, NbdMigrateError } from '../../../src/util/errors.js';

t.test('one tree: every error class carries a stable code and its cause', async (t) => {
  const cause = new Error('below');
  const cases: [Error, string, string][] = [
    [new DeviceError('ENOSPC', 'full', { cause }), 'ENOSPC', 'DeviceError'],
    [new NbdRequestError(28, 'NBD_CMD_WRITE', undefined, 'no space'), 'ENOSPC', 'DeviceError'],
    [new AdminError('ECONNREFUSED', 'cannot reach', { cause }), 'ECONNREFUSED', 'AdminError'],
    [new ConfigError('x.json.port: expected a port', { cause }), 'EINVAL', 'ConfigError'],
    [new InvalidArgument('"export" must be a non-empty string'), 'EINVAL', 'InvalidArgument'],
    [new NbdHandshakeError('not an NBD server', { cause }), 'EHANDSHAKE', 'NbdHandshakeError'],
    [new NbdProtocolError('bad reply magic'), 'EPROTO', 'NbdProtocolError'],
    [new JobError('EBUSY', 'bound to another job', { cause, permanent: true }), 'EBUSY', 'JobError'],
  ];
  for (const [e, code, name] of cases) {
    t.ok(e instanceof NbdMigrateError, `${name} is an NbdMigrateError`);
    t.equal((e as NbdMigrateError).code, code, `${name}: code ${code}`);
    t.equal(e.name, name);
  }
  t.equal(new DeviceError('EIO', 'x', { cause }).cause, cause, 'the cause is kept');
  t.equal(new ConfigError('x', { cause }).cause, cause);
  t.equal(new NbdHandshakeError('x', { cause }).cause, cause);
  t.equal(new JobError('EIO', 'x', { cause }).cause, cause);
  t.equal(new JobError('EIO', 'x').permanent, false);
  t.equal(targetErrorKind(new JobError('EBUSY', 'x', { permanent: true })), 'permanent', 'a JobError marked permanent');
  t.equal(new AdminError('EIO', 'x').refused, false);
  t.equal(new AdminError('EIO', 'x', { refused: true }).refused, true, 'refused: the server answered with this error');

  const acl = t.throws(() => Acl.parse(['nope'])) as Error;
  t.ok(acl instanceof AclError && acl instanceof NbdMigrateError && (acl as AclError).code === 'EINVAL', 'AclError: EINVAL in the tree');
  const uri = t.throws(() => parseNbdUri('http://x/')) as Error;
  t.ok(uri instanceof NbdUriError && uri instanceof NbdMigrateError && (uri as NbdUriError).code === 'EINVAL', 'NbdUriError: EINVAL in the tree');
});

t.test('errorCode reads ours and Node system errors alike', async (t) => {
  t.equal(errorCode(new DeviceError('EROFS', 'ro')), 'EROFS');
  t.equal(errorCode(Object.freeze({ code: 'ECONNRESET' })), 'ECONNRESET');
  t.equal(errorCode(new Error('plain')), undefined);
  t.equal(errorCode({ code: 5 }), undefined, 'a numeric code is not an errno name');
  t.equal(errorCode(undefined), undefined);
  t.equal(errorCode(null), undefined);
});

t.test('predicates: connection lost, permanent, transient', async (t) => {
  const sys = (code: string) => Object.assign(new Error(`connect ${code}`), { code }); // as Node raises them
  for (const code of ['ECONNRESET', 'EPIPE', 'ESHUTDOWN', 'ECONNREFUSED', 'ETIMEDOUT', 'EUNREACHABLE']) {
    t.ok(isConnectionLost(sys(code)), `${code}: connection lost`);
    t.equal(targetErrorKind(new DeviceError(code, 'x')), 'connection');
  }
  for (const code of ['ENOSPC', 'EPERM', 'EROFS', 'EDQUOT', 'EFBIG', 'EINVAL', 'EOVERFLOW', 'ENOTSUP']) {
    t.ok(isPermanent(new DeviceError(code, 'x')), `${code}: permanent`);
    t.notOk(isConnectionLost(new DeviceError(code, 'x')));
    t.equal(targetErrorKind(new DeviceError(code, 'x')), 'permanent');
  }
  t.equal(targetErrorKind(new DeviceError('EIO', 'x')), 'transient', 'EIO may pass');
  t.equal(targetErrorKind(new Error('no code')), 'transient');
  t.equal(targetErrorKind(Object.assign(new NbdMigrateError('EIO', 'bound elsewhere'), { permanent: true })), 'permanent', 'marked permanent');
  t.equal(targetErrorKind(Object.assign(new NbdMigrateError('ECONNRESET', 'x'), { permanent: true })), 'connection', 'a lost connection wins over the mark');
  t.equal(targetErrorKind(new NbdHandshakeError('x')), 'transient', 'a failed handshake is neither lost nor permanent, as before it had a code');
  t.equal(targetErrorKind(new NbdProtocolError('x')), 'transient');
  t.equal(reExported, targetErrorKind, 'migration/target-errors.ts re-exports the client predicate');
});
