/**
 * Reaching an NBD server: the socket (TCP or Unix), TLS options for nbds://
 * URIs, and the newstyle handshake, all within one deadline. What comes out
 * is a negotiated socket for the transport.
 */
import * as net from 'node:net';
import { HandshakeReader, negotiate, type NegotiatedExport } from './handshake.js';
import { nativeQuickAck, tcpFd, type SetQuickAck } from './quickack.js';
import { tlsOptions } from './tls.js';
import type { NbdUri } from './uri.js';

/** Socket write buffer before 'drain' is awaited. */
const WRITE_HIGH_WATER = 1024 * 1024;

export interface DialOptions {
  connectTimeoutMs: number;
  /** Gives up connecting (the socket is closed): a connection that is no longer wanted. */
  signal?: AbortSignal;
  /** Arms TCP_QUICKACK during the handshake (default: the addon's; null: never). For tests. */
  handshakeQuickAck?: SetQuickAck | null;
  metaContexts: readonly string[];
  listMetaContexts: readonly string[];
  /** False: simple replies only (handshake.ts); default true. */
  structuredReplies?: boolean;
}

/**
 * Connects and negotiates within `connectTimeoutMs`. Rejects with an Error
 * whose message names `label` and the reason; the socket is closed then.
 */
export async function dial(
  u: NbdUri,
  opts: DialOptions,
  label: string,
): Promise<{ socket: net.Socket; negotiated: NegotiatedExport; readAhead: Buffer[] }> {
  // A bad certificate directory fails before anything is sent.
  const tlsOpts = u.tls ? tlsOptions(u) : undefined;
  const socket =
    u.transport === 'tcp'
      ? net.connect({
          host: u.host,
          port: u.port,
          noDelay: true,
          // Notices a peer that vanished while the connection was idle.
          keepAlive: true,
          keepAliveInitialDelay: 30_000,
          writableHighWaterMark: WRITE_HIGH_WATER,
        } as net.NetConnectOpts)
      : net.connect({ path: u.socket, writableHighWaterMark: WRITE_HIGH_WATER } as net.NetConnectOpts);
  const reader = new HandshakeReader(socket);
  let timer: NodeJS.Timeout | undefined;
  let timedOut = false;
  let onAbort: (() => void) | undefined;
  let quickAck: (() => void) | undefined;
  try {
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        const e = new Error(`${label}: connection and handshake timed out after ${opts.connectTimeoutMs} ms`);
        reader.fail(e);
        reject(e);
      }, opts.connectTimeoutMs);
      onAbort = () => {
        timedOut = true;
        const e = new Error(`${label}: connection abandoned: no longer needed`);
        reader.fail(e);
        reject(e);
      };
      if (opts.signal?.aborted) onAbort();
      else opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
    await Promise.race([
      new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', (e) => reject(new Error(`${label}: cannot connect: ${e.message}`, { cause: e })));
      }),
      timeout,
    ]);
    // The handshake's replies acknowledged at once (quickack.ts): a server without TCP_NODELAY
    // (qemu-nbd 7.2) holds the second piece of a reply until the first is acknowledged, and a
    // client waiting for the whole reply sends nothing the ACK could ride on: 92 ms for a
    // handshake with qemu-nbd on loopback (two delayed ACKs), ~5 ms with this.
    const set = u.transport === 'tcp' ? (opts.handshakeQuickAck === undefined ? nativeQuickAck() : opts.handshakeQuickAck) : null;
    const fd = set ? tcpFd(socket) : undefined;
    if (set && fd !== undefined && set(fd) === 0) {
      quickAck = () => void set(fd);
      socket.on('data', quickAck);
    }
    // negotiate() replaces io.socket by the TLS socket after STARTTLS.
    const io = { socket: socket as net.Socket, reader };
    const negotiated = await Promise.race([
      negotiate(io, { exportName: u.exportName, metaContexts: opts.metaContexts, listMetaContexts: opts.listMetaContexts, structuredReplies: opts.structuredReplies, label, tls: tlsOpts }),
      timeout,
    ]);
    clearTimeout(timer);
    if (onAbort) opts.signal?.removeEventListener('abort', onAbort);
    if (quickAck) socket.off('data', quickAck);
    io.reader.detach();
    const readAhead = io.reader.queue.length > 0 ? io.reader.queue.takeSlices(io.reader.queue.length) : [];
    return { socket: io.socket, negotiated, readAhead };
  } catch (e) {
    clearTimeout(timer);
    if (onAbort) opts.signal?.removeEventListener('abort', onAbort);
    if (quickAck) socket.off('data', quickAck);
    reader.detach();
    socket.on('error', () => {}); // late errors after we gave up
    if (timedOut || !socket.writable) socket.destroy();
    else {
      // Let an NBD_OPT_ABORT (if one was queued) go out, then close.
      socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
    }
    throw e;
  }
}
