/**
 * The root of the errors nbd-migrate raises on purpose. Each carries a stable
 * `code` that callers decide by and that the admin socket and the logs show:
 * a POSIX errno name (ENOENT, EINVAL, ENOSPC: the errno -> NBD mapping reads it
 * from device errors) or one of ours (EUNREACHABLE, ETOOSMALL, ESELF, ELIVE).
 * The error it wraps, if any, is its `cause`. Subclasses name the layer:
 * DeviceError (storage), AdminError (admin socket), ConfigError (configuration),
 * JobError (migration), InvalidArgument (admin command arguments), AclError.
 */
export class NbdMigrateError extends Error {
  override readonly name: string = 'NbdMigrateError';
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The `code` of any error: ours, Node's system errors (ECONNRESET, ...) and the native addon's; undefined if it has none. */
export function errorCode(e: unknown): string | undefined {
  const code = (e as { code?: unknown } | null | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}
