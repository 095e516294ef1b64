/**
 * Moving a plain TCP/Unix socket onto a new net.Socket that reads through
 * `onread` into buffers the caller chooses, instead of a fresh 64 KiB Buffer
 * per read (on the server a quarter of a sequential write's time, on the
 * client 15-25 % of a copy's CPU went to allocating and collecting those).
 * Used by the server's connections (read slabs) and the client's transport.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';

export type OnRead = { buffer: () => Buffer; callback: (n: number, buf: Buffer) => boolean | void };

/**
 * The handle is taken over between reads, so nothing may be buffered in the
 * old object; it is destroyed. Undefined (keep the socket as it is) for TLS,
 * a socket that is closed or has data queued, or when the handle cannot be taken.
 */
export function adoptForOnread(socket: net.Socket, onread: OnRead): net.Socket | undefined {
  if (socket instanceof tls.TLSSocket || socket.destroyed || socket.readableLength > 0 || socket.writableLength > 0) return undefined;
  const a = socket as unknown as { _handle?: { readStop?: () => number; reading?: boolean; useUserBuffer?: unknown } | null };
  const handle = a._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || typeof handle.readStop !== 'function') return undefined;
  handle.reading = false;
  handle.readStop();
  const s = new net.Socket({
    handle,
    onread,
    readable: true,
    writable: true,
    writableHighWaterMark: socket.writableHighWaterMark,
  } as unknown as net.SocketConstructorOpts);
  a._handle = null;
  socket.destroy();
  return s;
}

/** The file descriptor under a plain TCP or Unix socket (its libuv handle), else undefined. */
export function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}
