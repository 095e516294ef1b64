/**
 * READ replies sent straight from the page cache (sendfile(2)): the kernel hands
 * the cached pages to the socket, so the data is never copied through a user-space
 * buffer. The ordinary path copies it twice on the server (pread into the reply
 * buffer on a pool thread, then send from it on the event loop).
 *
 * Only between whole replies: a direct write goes to the socket's fd behind Node's
 * back, so it is made only when nothing of ours is queued or half-written (see
 * Connection.sendFileReply). What the socket does not take at once is read into a
 * buffer and queued as usual.
 *
 * Needs the addon's sendFileReply (native/nbd_native.cc); without it (the pure-JS
 * fallback, NBD_MIGRATE_NATIVE=0), or with NBD_MIGRATE_SENDFILE=0, every reply takes the
 * ordinary path. Plain TCP and Unix sockets only: TLS encrypts in user space.
 */
import * as fs from 'node:fs';
import { nativeAddon } from '../util/addon.js';

/**
 * `header`, then `length` bytes of `fileFd` at `position`, written to the non-blocking
 * socket. Returns the bytes that went; it stops short when the socket is full (status[0]
 * 0), at end of file (-1), or at an error (its errno). The caller sends the rest.
 */
export type SendFile = (socketFd: number, header: Buffer, fileFd: number, position: number, length: number, status: Int32Array) => number;

let native: SendFile | null | undefined;

/** The addon's sendFileReply, or null when it is not there or NBD_MIGRATE_SENDFILE=0 turns it off. */
export function nativeSendFile(): SendFile | null {
  if (native === undefined)
    native = process.env.NBD_MIGRATE_SENDFILE === '0' ? null : ((nativeAddon().addon?.sendFileReply as SendFile | undefined) ?? null);
  return native;
}

/**
 * Reads `length` bytes of `fd` at `position` into `buf` at `at`; what lies past the end
 * of the file (it shrank) reads as zeros, as FileDevice.read does. Synchronous: the bytes
 * are in the page cache (the caller sent the rest of them from there a moment ago).
 */
export function fillFromFile(buf: Buffer, at: number, fd: number, position: number, length: number): void {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, at + done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  buf.fill(0, at + done);
}
