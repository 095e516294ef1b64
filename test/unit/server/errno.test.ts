// The errno -> NBD error mapping, with the request's flags deciding ENOTSUP and EOVERFLOW.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import { nbdErrorFor, nbdErrorName } from '../../../src/server/errno.js';

const err = (code: string) => Object.assign(new Error(code), { code });
const name = (e: unknown, flags = 0) => nbdErrorName(nbdErrorFor(e, flags));

t.test('errno names map to the NBD error values', async (t) => {
  const cases: Array<[string, string]> = [
    ['EPERM', 'EPERM'],
    ['EACCES', 'EPERM'],
    ['EROFS', 'EPERM'],
    ['EIO', 'EIO'],
    ['ENOMEM', 'ENOMEM'],
    ['EINVAL', 'EINVAL'],
    ['ENOSPC', 'ENOSPC'],
    ['EDQUOT', 'ENOSPC'],
    ['EFBIG', 'ENOSPC'],
    ['ESHUTDOWN', 'ESHUTDOWN'],
  ];
  for (const [code, nbd] of cases) {
    t.equal(name(err(code)), nbd, `${code} -> ${nbd}`);
    t.equal(name(err(code), C.NBD_CMD_FLAG_FAST_ZERO | C.NBD_CMD_FLAG_DF), nbd, `${code} -> ${nbd} whatever the flags`);
  }
});

t.test('anything unrecognised is EIO', async (t) => {
  for (const e of [err('ENOENT'), err('ECONNRESET'), new Error('plain'), 'a string', undefined, null, { code: 5 }])
    t.equal(name(e), 'EIO', String((e as { code?: unknown } | null)?.code ?? e));
});

t.test('ENOTSUP goes on the wire only to a request with FAST_ZERO', async (t) => {
  for (const code of ['ENOTSUP', 'EOPNOTSUPP']) {
    t.equal(nbdErrorFor(err(code), C.NBD_CMD_FLAG_FAST_ZERO), C.NBD_ENOTSUP, `${code} with FAST_ZERO`);
    t.equal(nbdErrorFor(err(code), C.NBD_CMD_FLAG_FAST_ZERO | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FUA), C.NBD_ENOTSUP, `${code} with FAST_ZERO among others`);
    t.equal(nbdErrorFor(err(code), 0), C.NBD_EINVAL, `${code} without flags`);
    t.equal(nbdErrorFor(err(code), C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FUA), C.NBD_EINVAL, `${code} with other flags`);
    t.equal(nbdErrorFor(err(code), C.NBD_CMD_FLAG_DF), C.NBD_EINVAL, `${code} with DF`);
  }
});

t.test('EOVERFLOW goes on the wire only to a request with DF', async (t) => {
  t.equal(nbdErrorFor(err('EOVERFLOW'), C.NBD_CMD_FLAG_DF), C.NBD_EOVERFLOW, 'with DF');
  t.equal(nbdErrorFor(err('EOVERFLOW'), C.NBD_CMD_FLAG_DF | C.NBD_CMD_FLAG_FUA), C.NBD_EOVERFLOW, 'with DF and FUA');
  t.equal(nbdErrorFor(err('EOVERFLOW'), 0), C.NBD_EINVAL, 'without flags');
  t.equal(nbdErrorFor(err('EOVERFLOW'), C.NBD_CMD_FLAG_FAST_ZERO), C.NBD_EINVAL, 'with FAST_ZERO');
});

t.test('names for logs', async (t) => {
  t.equal(nbdErrorName(C.NBD_ENOSPC), 'ENOSPC');
  t.equal(nbdErrorName(12345), 'E12345', 'values the spec does not define');
});
