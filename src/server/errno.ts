/**
 * The one errno -> NBD error mapping ("Error values" in proto.md). The real
 * cause is logged before this lossy code goes on the wire.
 *
 * NBD_ENOTSUP and NBD_EOVERFLOW mean something only to a client that asked
 * for them: the spec says a server SHOULD NOT send ENOTSUP except to a
 * WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO ("fail fast"), nor EOVERFLOW except
 * to a READ with NBD_CMD_FLAG_DF. For any other request they become EINVAL,
 * as in nbdkit's server/protocol.c (nbd_errno).
 */
import * as C from '../protocol/constants.js';

const MAP: Readonly<Record<string, number>> = {
  EPERM: C.NBD_EPERM,
  EACCES: C.NBD_EPERM,
  EROFS: C.NBD_EPERM,
  EIO: C.NBD_EIO,
  ENOMEM: C.NBD_ENOMEM,
  EINVAL: C.NBD_EINVAL,
  ENOSPC: C.NBD_ENOSPC,
  EDQUOT: C.NBD_ENOSPC, // the spec asks for EDQUOT and EFBIG to become ENOSPC
  EFBIG: C.NBD_ENOSPC,
  EOVERFLOW: C.NBD_EOVERFLOW,
  ENOTSUP: C.NBD_ENOTSUP,
  EOPNOTSUPP: C.NBD_ENOTSUP,
  ESHUTDOWN: C.NBD_ESHUTDOWN,
};

/** NBD error value for any thrown thing, answering a request with `flags`; anything unrecognised is EIO. */
export function nbdErrorFor(e: unknown, flags: number): number {
  const code = (e as { code?: unknown } | null)?.code;
  const error = (typeof code === 'string' && MAP[code]) || C.NBD_EIO;
  if (error === C.NBD_ENOTSUP && !(flags & C.NBD_CMD_FLAG_FAST_ZERO)) return C.NBD_EINVAL;
  if (error === C.NBD_EOVERFLOW && !(flags & C.NBD_CMD_FLAG_DF)) return C.NBD_EINVAL;
  return error;
}

/** For logs and metrics: the error's name (only spec-defined values are ever sent). */
export function nbdErrorName(n: number): string {
  return C.NBD_ERROR_NAMES[n] ?? `E${n}`;
}
