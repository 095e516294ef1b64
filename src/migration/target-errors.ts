/**
 * What a failed request to a mirror target means, in one place: the copy
 * engine, the job and the post-cutover forwarding device all decide by it.
 * - connection: the connection is gone (or timed out); reconnect and go on;
 * - permanent: the target refused in a way that will not pass (no space, read-only,
 *   a request it calls invalid): fail fast with the reason;
 * - transient: the target answered an error that may pass (EIO): retry the request.
 */
export type TargetErrorKind = 'connection' | 'permanent' | 'transient';

/** Errors that mean "the connection is gone", not "the target said no". */
export const CONNECTION_LOST = new Set(['ECONNRESET', 'EPIPE', 'ESHUTDOWN', 'ECONNREFUSED', 'ETIMEDOUT', 'EUNREACHABLE']);
/** Errors that retrying will not cure. */
export const PERMANENT = new Set(['ENOSPC', 'EPERM', 'EROFS', 'EDQUOT', 'EFBIG', 'EINVAL', 'EOVERFLOW', 'ENOTSUP']);

export function targetErrorKind(e: unknown): TargetErrorKind {
  const code = (e as { code?: unknown })?.code;
  if (typeof code === 'string' && CONNECTION_LOST.has(code)) return 'connection';
  if (typeof code === 'string' && PERMANENT.has(code)) return 'permanent';
  if ((e as { permanent?: unknown })?.permanent === true) return 'permanent';
  return 'transient';
}
