/**
 * One client socket and its input queue. The handshake reads it with awaited
 * `need(n)` calls; the transmission session then takes over the data events.
 * Either way the socket is paused whenever the queue holds more than the phase
 * needs, so a client can never make us buffer without bound.
 */
import type { Socket } from 'node:net';
import * as tls from 'node:tls';
import { constants as osConstants } from 'node:os';
import { ByteQueue, type ChunkOwner } from '../util/byte-queue.js';
import type { Logger } from '../util/log.js';
import { adoptForOnread, socketFd } from '../util/onread.js';
import { SlabReader } from './read-slabs.js';
import { fillFromFile, nativeSendFile } from './sendfile.js';

const { EINVAL, ENOSYS, EOPNOTSUPP } = osConstants.errno;

/** The most the handshake phase buffers ahead of what it asked for. */
const HANDSHAKE_READ_AHEAD = 64 * 1024;
/** How long a soft close waits for the client to close its side. */
const END_GRACE_MS = 2000;
/** During a soft close, output that makes no progress for this long (a client that stopped reading) ends the connection. */
const END_OUTPUT_STALL_MS = 30_000;

export class ConnectionClosed extends Error {
  override readonly name = 'ConnectionClosed';
}

/**
 * Why the peer's certificate chain failed verification against the context's CAs
 * (OpenSSL's result: DEPTH_ZERO_SELF_SIGNED_CERT, CERT_HAS_EXPIRED, ...), or undefined
 * if it passed. Node keeps this result on the TLS handle and exposes it publicly
 * (`authorized`) only for sockets a tls.Server made; a socket upgraded after
 * STARTTLS reads it where tls.Server does. Fails closed if that is ever missing.
 */
function peerVerifyError(socket: tls.TLSSocket): { code: string; message: string } | undefined {
  const handle = (socket as unknown as { ssl?: { verifyError?: () => (Error & { code?: string }) | null } }).ssl;
  if (typeof handle?.verifyError !== 'function') return { code: 'VERIFY_RESULT_UNAVAILABLE', message: 'this Node.js does not expose the certificate verification result' };
  if (!socket.getPeerX509Certificate()) return { code: 'NO_CLIENT_CERTIFICATE', message: 'the client sent no certificate' };
  const e = handle.verifyError();
  return e ? { code: e.code ?? 'CERT_VERIFY_FAILED', message: e.message } : undefined;
}

export class Connection {
  readonly input = new ByteQueue();
  /** Where reads land on a plain socket (undefined: Node's own buffers, e.g. a socket that came in some other way). */
  private readonly reader: SlabReader | undefined;
  closed = false;
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  /** Set by the transmission session; while unset, data feeds `need()`. */
  private onInput: (() => void) | undefined;
  private readonly closeHandlers: Array<() => void> = [];

  /** The client's address; undefined on a Unix socket. */
  readonly remoteAddress: string | undefined;

  /** The socket bytes travel on: the TCP/Unix socket, or the TLS socket after STARTTLS. */
  socket: Socket;
  /** Whether STARTTLS has upgraded this connection. */
  tls = false;

  constructor(
    readonly id: number,
    socket: Socket,
    readonly log: Logger,
  ) {
    const reader = new SlabReader();
    const adopted = adoptForOnread(socket, {
      buffer: () => reader.next(),
      callback: (n, buf) => {
        const owner = reader.current;
        reader.advance(n);
        this.received(buf.subarray(0, n), owner);
      },
    });
    if (adopted) {
      this.reader = reader;
      socket = adopted;
    } else reader.release();
    this.socket = socket;
    if (adopted && this.sendFile) this.fileSendFd = socketFd(adopted);
    this.remoteAddress = socket.remoteAddress;
    socket.setNoDelay?.(true);
    this.attach(socket, adopted === undefined);
    socket.on('close', () => this.markClosed());
  }

  private attach(socket: Socket, dataEvents = true): void {
    if (dataEvents) socket.on('data', (chunk: Buffer) => this.received(chunk));
    socket.on('error', (err) => this.log.debug('socket-error', { cause: err }));
  }

  private received(chunk: Buffer, owner?: ChunkOwner): void {
    this.input.push(chunk, owner);
    if (this.onInput) return this.onInput();
    if (this.waiter && this.input.length >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve();
    }
    if (this.input.length > HANDSHAKE_READ_AHEAD + (this.waiter?.n ?? 0)) this.socket.pause();
  }

  /**
   * NBD_OPT_STARTTLS was acknowledged: everything from here on is TLS. The
   * client may not send before our ACK, so nothing may be buffered yet.
   */
  async startTls(options: tls.TLSSocketOptions): Promise<void> {
    if (this.input.length > 0) throw new Error(`${this.input.length} bytes arrived before the TLS handshake`);
    const raw = this.socket;
    // The ACK must leave in clear text before TLS takes over the socket.
    if (this.corked) this.uncork();
    raw.removeAllListeners('data');
    const secure = new tls.TLSSocket(raw, { ...options, isServer: true });
    // The certificate checked below is the one the session keeps: no renegotiation.
    secure.disableRenegotiation();
    this.socket = secure;
    this.tls = true;
    this.fileSendFd = undefined; // TLS encrypts in user space
    this.attach(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secure', resolve);
      secure.once('error', (e: Error & { code?: string }) => {
        // OpenSSL itself refuses a client that sends no certificate when one is required.
        if (e.code === 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE')
          this.log.warn('tls-refused', { authorizationError: 'NO_CLIENT_CERTIFICATE', cause: e, clientCert: null, action: 'disconnect' });
        reject(e);
      });
      secure.once('close', () => reject(new ConnectionClosed('connection closed during the TLS handshake')));
    });
    const peer = secure.getPeerCertificate();
    const clientCert = peer?.subject?.CN ?? null;
    if (options.requestCert) {
      // A TLSSocket made outside a tls.Server only asks for a certificate (and with
      // rejectUnauthorized insists that one is sent); nothing checks it. Do what tls.Server does.
      const failed = peerVerifyError(secure);
      secure.authorized = !failed;
      if (failed && options.rejectUnauthorized) {
        this.log.warn('tls-refused', { authorizationError: failed.code, cause: failed.message, clientCert, action: 'disconnect' });
        secure.destroy();
        throw new Error(`client certificate refused: ${failed.code}: ${failed.message}`);
      }
    }
    this.log.info('tls-established', { protocol: secure.getProtocol(), cipher: secure.getCipher()?.name, clientCert, authorized: secure.authorized });
  }

  /** Resolves once `n` bytes are buffered; rejects if the socket closes first. */
  need(n: number): Promise<void> {
    if (this.input.length >= n) return Promise.resolve();
    if (this.closed) return Promise.reject(new ConnectionClosed('connection closed'));
    this.socket.resume();
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /** Reads exactly `n` bytes (copied out only when they span chunks). */
  async read(n: number): Promise<Buffer> {
    await this.need(n);
    return this.input.take(n);
  }

  /** Discards `n` bytes of input as they arrive, never holding more than one chunk's worth. */
  async discard(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      left -= this.input.drop(left);
      if (left > 0) await this.need(1);
    }
  }

  /**
   * Queues bytes for the client. Replies completed in the same event-loop turn
   * leave in one writev: the socket is corked at the first send and uncorked
   * in the check phase, after every I/O callback of this turn has run.
   */
  send(buf: Buffer): boolean;
  /** With `flushed`: called once the bytes have left for the kernel (or were dropped); returns undefined if never queued. */
  send(buf: Buffer, flushed: () => void): boolean | undefined;
  send(buf: Buffer, flushed?: () => void): boolean | undefined {
    if (this.closed || this.socket.destroyed) return flushed ? undefined : false;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    return flushed ? this.socket.write(buf, () => flushed()) : this.socket.write(buf);
  }

  /**
   * A READ reply with its data sent from a file (see sendfile.ts): `header`, then `length`
   * bytes of `fd` at `position`. Made only between whole replies: on a plain socket with
   * nothing of ours corked, buffered or half-written, so the bytes cannot land inside
   * another reply. What the socket does not take at once is read here (the range is in
   * the page cache) and queued like any reply, ahead of everything sent after it.
   * 'sent': all of it is with the kernel. 'queued': the rest waits in the socket, and
   * `flushed` is called once it has left. Undefined: nothing was sent, use send().
   */
  sendFileReply(header: Buffer, fd: number, position: number, length: number, flushed: () => void): 'sent' | 'queued' | undefined {
    const sock = this.fileSendFd;
    if (sock === undefined || this.corked || this.closed) return undefined;
    const s = this.socket as unknown as { writableLength: number; _handle?: { writeQueueSize?: number } | null };
    if (s.writableLength !== 0 || s._handle?.writeQueueSize !== 0) return undefined;
    const status = this.sendStatus;
    const sent = this.sendFile!(sock, header, fd, position, length, status);
    const total = header.length + length;
    if (sent === total) return 'sent';
    // Nothing went: the socket is full, or has failed (the ordinary path meets that too).
    if (sent === 0) return undefined;
    const err = status[0]!;
    // A file sendfile refuses: this connection stops trying (the header went; its data follows below).
    if (sent === header.length && (err === EINVAL || err === ENOSYS || err === EOPNOTSUPP)) this.fileSendFd = undefined;
    // The rest of this reply must be the next bytes on the wire: queued now, before anything else.
    const rest = Buffer.allocUnsafe(total - sent);
    const at = sent < header.length ? header.copy(rest, 0, sent) : 0;
    const dataSent = Math.max(0, sent - header.length);
    try {
      fillFromFile(rest, at, fd, position + dataSent, err === -1 ? 0 : length - dataSent);
    } catch (e) {
      // Half a reply is on the wire and the rest of its data cannot be read: the stream cannot go on.
      this.log.warn('request-failed', { command: 'NBD_CMD_READ', position, length, cause: e, action: 'disconnect' });
      this.destroy();
      return 'sent';
    }
    this.socket.write(rest, () => flushed());
    return 'queued';
  }

  private readonly sendFile = nativeSendFile();
  /** The socket's fd while replies may be sent from files: a plain socket and the addon. */
  private fileSendFd: number | undefined;
  private readonly sendStatus = new Int32Array(1);

  private corked = false;
  private readonly uncork = () => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Hands input to the transmission session; bytes already buffered are delivered at once. */
  takeOver(onInput: () => void): void {
    this.onInput = onInput;
    this.socket.resume();
    if (this.input.length > 0) onInput();
  }

  onClose(fn: () => void): void {
    if (this.closed) fn();
    else this.closeHandlers.push(fn);
  }

  /** Hard disconnect. */
  destroy(): void {
    this.socket.destroy();
    this.markClosed();
  }

  /**
   * Soft close: flush what was written, then close. A client that never closes
   * its side (or goes on sending) would hold the socket forever, so whatever
   * it sends is discarded and the socket is destroyed after a grace period.
   * The grace period starts once our last bytes have left for the kernel, so
   * a slow reader still gets every reply; output that stops moving for
   * END_OUTPUT_STALL_MS (a client that no longer reads) ends it as well.
   */
  end(): void {
    this.onInput = () => this.input.clear();
    this.input.clear();
    this.socket.resume();
    this.socket.end();
    const grace = () => setTimeout(() => this.destroy(), END_GRACE_MS).unref();
    if (this.socket.writableFinished) {
      grace();
      return;
    }
    this.socket.once('finish', grace);
    let left = this.socket.writableLength;
    let movedAt = Date.now();
    const watch = setInterval(() => {
      if (this.closed || this.socket.writableFinished) return clearInterval(watch);
      if (this.socket.writableLength < left) {
        left = this.socket.writableLength;
        movedAt = Date.now();
      } else if (Date.now() - movedAt >= END_OUTPUT_STALL_MS) {
        clearInterval(watch);
        this.log.warn('output-stalled', { unsentBytes: left, waitedMs: END_OUTPUT_STALL_MS, action: 'disconnect' });
        this.destroy();
      }
    }, END_GRACE_MS);
    watch.unref();
  }

  /** Resolves once queued output is below `limit` bytes (the client is reading its replies). */
  async drained(limit: number): Promise<void> {
    while (!this.closed && this.socket.writableLength > limit) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.socket.off('drain', done);
          this.socket.off('close', done);
          resolve();
        };
        this.socket.once('drain', done);
        this.socket.once('close', done);
      });
    }
    if (this.closed) throw new ConnectionClosed('connection closed');
  }

  private markClosed(): void {
    if (this.closed) return;
    this.closed = true;
    this.input.clear();
    this.reader?.release();
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(new ConnectionClosed('connection closed'));
    }
    for (const fn of this.closeHandlers.splice(0)) fn();
  }
}
