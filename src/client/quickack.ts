/**
 * TCP_QUICKACK on a client connection, re-armed after every read (the kernel
 * does not keep it): each reply read is acknowledged at once instead of after
 * Linux's delayed-ACK timer (~40 ms).
 *
 * Why: a server that sets no TCP_NODELAY (qemu-nbd 7.2 sets none; checked with
 * strace) holds a small reply back while its previous one is unacknowledged
 * (Nagle). When the client has nothing to send meanwhile — a mirror's cutover
 * holds guest writes and waits for its last replies — every such reply waited
 * for the delayed ACK: tcpdump on loopback showed the held replies leaving 3 µs
 * after the client's pure ACK, 42 ms after the one before (bench cutover4 with
 * qemu-nbd targets: the pause was ~42 ms of 50). One setsockopt per read.
 *
 * Needs the addon's tcpQuickAck (native/nbd_native.cc); without it (the pure-JS
 * fallback, NBD_MIGRATE_NATIVE=0, an older build) nothing is armed. Plain TCP
 * only: a TLS or Unix socket has no TCP fd here.
 */
import type * as net from 'node:net';
import { nativeAddon } from '../util/addon.js';
import { socketFd } from '../util/onread.js';

export type SetQuickAck = (fd: number) => number;

let native: SetQuickAck | null | undefined;

/** The addon's tcpQuickAck (returns 0 or an errno), or null when it is not there. */
export function nativeQuickAck(): SetQuickAck | null {
  if (native === undefined) native = (nativeAddon().addon?.tcpQuickAck as SetQuickAck | undefined) ?? null;
  return native;
}

/** The socket's file descriptor when it is a plain TCP socket, else undefined. */
export function tcpFd(socket: net.Socket): number | undefined {
  return socket.remoteFamily?.startsWith('IPv') ? socketFd(socket) : undefined;
}

/**
 * Arms TCP_QUICKACK now and after every read on `socket`. Returns whether it
 * was armed; the first failure (a closed socket) disarms it.
 */
export function armQuickAck(socket: net.Socket, set: SetQuickAck | null = nativeQuickAck()): boolean {
  const fd = tcpFd(socket);
  if (!set || fd === undefined || set(fd) !== 0) return false;
  const onData = (): void => {
    if (set(fd) !== 0) socket.off('data', onData);
  };
  socket.on('data', onData);
  return true;
}
