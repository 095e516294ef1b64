/**
 * The one errno -> NBD error mapping ("Error values" in proto.md). The real
 * cause is logged before this lossy code goes on the wire.
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

/** NBD error value for any thrown thing; anything unrecognised is EIO. */
export function nbdErrorFor(e: unknown): number {
  const code = (e as { code?: unknown } | null)?.code;
  return (typeof code === 'string' && MAP[code]) || C.NBD_EIO;
}

/** For logs and metrics: the error's name (only spec-defined values are ever sent). */
export function nbdErrorName(n: number): string {
  return C.NBD_ERROR_NAMES[n] ?? `E${n}`;
}
