/**
 * Client side of fixed newstyle negotiation (proto.md "Newstyle negotiation"):
 *
 *   greeting -> client flags -> NBD_OPT_STRUCTURED_REPLY (ERR_UNSUP tolerated; not asked
 *   when `structuredReplies` is false) -> NBD_OPT_SET_META_CONTEXT (if structured; refusal tolerated)
 *   -> NBD_OPT_GO with NBD_INFO_BLOCK_SIZE (ERR_UNSUP: NBD_OPT_EXPORT_NAME)
 *
 * Oldstyle and plain (unfixed) newstyle servers are refused with a clear error.
 */
import type { Socket } from 'node:net';
import * as tls from 'node:tls';
import * as C from '../protocol/constants.js';
import * as codec from '../protocol/codec.js';
import { ByteQueue } from '../util/byte-queue.js';
import { NbdHandshakeError, optionName, replyName } from './errors.js';

/** Option reply payloads above this end the handshake (the longest legitimate ones are ~4 KiB strings). */
const MAX_OPTION_REPLY = 1024 * 1024;
const OPTION_REPLY_HEADER_LENGTH = 20;

export interface BlockSize {
  readonly minimum: number;
  readonly preferred: number;
  readonly maximum: number;
}

/** What the server told us when no NBD_INFO_BLOCK_SIZE came (proto.md's defaults, and 32 MiB max). */
export const DEFAULT_BLOCK_SIZE: BlockSize = { minimum: 1, preferred: 4096, maximum: C.MAX_PAYLOAD };

export interface NegotiatedExport {
  exportName: string;
  size: number;
  transmissionFlags: number;
  structuredReplies: boolean;
  contexts: Map<string, number>;
  /** Context names the server listed for `listMetaContexts` (empty without structured replies or on refusal). */
  listedContexts: string[];
  blockSize: BlockSize;
  /** Whether the server reported block sizes (NBD_INFO_BLOCK_SIZE). */
  blockSizeReported: boolean;
  /** How the export was entered. */
  via: 'go' | 'export-name';
}

/** Awaitable reads over a socket during the handshake. */
export class HandshakeReader {
  readonly queue = new ByteQueue();
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.queue.push(chunk);
    if (this.waiter && this.queue.length >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve();
    }
  };
  private readonly onError = (e: Error) => this.fail(e);
  private readonly onEnd = () => this.fail(new Error('the server closed the connection'));

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
  }

  fail(e: Error): void {
    this.failure ??= e;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.failure);
  }

  async read(n: number): Promise<Buffer> {
    if (this.queue.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { n, resolve, reject };
      });
    }
    return this.queue.take(n);
  }

  /** Stops listening; what was read ahead stays in `queue`. */
  detach(): void {
    this.socket.off('data', this.onData);
    this.socket.off('error', this.onError);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
  }
}

interface OptionReply {
  type: number;
  payload: Buffer;
}

const isError = (type: number) => (type & 0x80000000) !== 0;

export interface NegotiateOptions {
  exportName: string;
  metaContexts: readonly string[];
  /** NBD_OPT_LIST_META_CONTEXT queries sent before selecting (what the server offers, e.g. "nbd-migrate:"). */
  listMetaContexts?: readonly string[];
  /**
   * Ask for structured replies (default true). False: simple replies only, and no metadata
   * contexts; one round trip less, for a connection that only writes (a copy's target).
   */
  structuredReplies?: boolean;
  /** Upgrade with NBD_OPT_STARTTLS first (required: a refusal fails the handshake). */
  tls?: tls.ConnectionOptions;
  /** For messages: which URI we are talking to. */
  label: string;
}

/**
 * Runs the handshake on a connected socket. On failure the caller destroys the
 * socket; an NBD_OPT_ABORT is sent first where the protocol allows it.
 */
export async function negotiate(io: { socket: Socket; reader: HandshakeReader }, opts: NegotiateOptions): Promise<NegotiatedExport> {
  const { exportName, label } = opts;
  let { socket, reader } = io;
  const send = (b: Buffer) => socket.write(b);
  let stage = 'waiting for the greeting';
  const read = async (n: number): Promise<Buffer> => {
    try {
      return await reader.read(n);
    } catch (e) {
      throw new NbdHandshakeError(`${label}: ${(e as Error).message} (${stage})`, { cause: e });
    }
  };

  const greeting = await read(16);
  if (greeting.readBigUInt64BE(0) !== C.NBD_MAGIC)
    throw new NbdHandshakeError(`${label}: not an NBD server (the greeting does not start with NBDMAGIC)`);
  const second = greeting.readBigUInt64BE(8);
  if (second === C.NBD_OLDSTYLE_MAGIC)
    throw new NbdHandshakeError(`${label}: the server uses oldstyle negotiation, which is not supported (only fixed newstyle servers are)`);
  if (second !== C.NBD_IHAVEOPT) throw new NbdHandshakeError(`${label}: unknown negotiation magic 0x${second.toString(16)} in the greeting`);
  const handshakeFlags = (await read(2)).readUInt16BE(0);
  if (!(handshakeFlags & C.NBD_FLAG_FIXED_NEWSTYLE))
    throw new NbdHandshakeError(`${label}: the server does not support fixed newstyle negotiation (only fixed newstyle servers are supported)`);
  const noZeroes = (handshakeFlags & C.NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0));
  send(clientFlags);

  const abort = () => {
    if (!socket.destroyed && socket.writable) socket.write(codec.encodeOptionRequest(C.NBD_OPT_ABORT));
  };

  const readReply = async (option: number): Promise<OptionReply> => {
    const h = await read(OPTION_REPLY_HEADER_LENGTH);
    const magic = h.readBigUInt64BE(0);
    if (magic !== C.NBD_OPT_REPLY_MAGIC) throw new NbdHandshakeError(`${label}: bad option reply magic 0x${magic.toString(16)} (${stage})`);
    const replyOption = h.readUInt32BE(8);
    if (replyOption !== option)
      throw new NbdHandshakeError(`${label}: the server answered ${optionName(replyOption)} while ${optionName(option)} was pending`);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw new NbdHandshakeError(`${label}: option reply of ${length} bytes is too large (${stage})`);
    const payload = length > 0 ? Buffer.from(await read(length)) : Buffer.alloc(0);
    if (type === C.NBD_REP_ERR_TLS_REQD) {
      abort();
      throw new NbdHandshakeError(`${label}: the server requires TLS: use an nbds:// URI${serverText(payload)}`, {
        option,
        reply: type,
        serverMessage: payload.toString('utf8'),
      });
    }
    return { type, payload };
  };
  const unexpected = (option: number, r: OptionReply) =>
    new NbdHandshakeError(`${label}: unexpected ${replyName(r.type)} in reply to ${optionName(option)}`, { option, reply: r.type });

  // -- TLS first, so that every later option is protected (proto.md "Client-side requirements")
  if (opts.tls) {
    stage = 'negotiating TLS (NBD_OPT_STARTTLS)';
    send(codec.encodeOptionRequest(C.NBD_OPT_STARTTLS));
    const r = await readReply(C.NBD_OPT_STARTTLS);
    if (r.type !== C.NBD_REP_ACK) {
      abort();
      throw new NbdHandshakeError(`${label}: the server refused TLS (${replyName(r.type)})${serverText(r.payload)}`, {
        option: C.NBD_OPT_STARTTLS,
        reply: r.type,
        serverMessage: r.payload.toString('utf8'),
      });
    }
    if (reader.queue.length > 0) throw new NbdHandshakeError(`${label}: the server sent data before the TLS handshake`);
    reader.detach();
    const secure = tls.connect({ ...opts.tls, socket });
    reader = new HandshakeReader(secure);
    socket = secure;
    io.socket = secure;
    io.reader = reader;
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', (e) => reject(new NbdHandshakeError(`${label}: TLS handshake failed: ${e.message}`, { cause: e })));
    });
  }

  // -- structured replies
  let structuredReplies = false;
  if (opts.structuredReplies !== false) {
    stage = 'negotiating structured replies';
    send(codec.encodeOptionRequest(C.NBD_OPT_STRUCTURED_REPLY));
    const r = await readReply(C.NBD_OPT_STRUCTURED_REPLY);
    if (r.type === C.NBD_REP_ACK) structuredReplies = true;
    else if (!isError(r.type)) throw unexpected(C.NBD_OPT_STRUCTURED_REPLY, r);
    // Any refusal (ERR_UNSUP from nbd-server, ERR_POLICY, ...): simple replies only.
  }

  // -- metadata contexts: what is offered (when asked), then what we select
  const listedContexts: string[] = [];
  if (structuredReplies && opts.listMetaContexts && opts.listMetaContexts.length > 0) {
    stage = 'listing metadata contexts';
    send(codec.encodeOptionRequest(C.NBD_OPT_LIST_META_CONTEXT, codec.encodeMetaContextRequest(exportName, [...opts.listMetaContexts])));
    for (;;) {
      const r = await readReply(C.NBD_OPT_LIST_META_CONTEXT);
      if (r.type === C.NBD_REP_ACK) break;
      if (r.type === C.NBD_REP_META_CONTEXT) {
        if (r.payload.length < 4) throw new NbdHandshakeError(`${label}: NBD_REP_META_CONTEXT reply of ${r.payload.length} bytes`);
        listedContexts.push(r.payload.toString('utf8', 4));
        continue;
      }
      if (isError(r.type)) {
        // Tolerated: the server lists nothing (an unknown export is reported by NBD_OPT_GO below).
        listedContexts.length = 0;
        break;
      }
      throw unexpected(C.NBD_OPT_LIST_META_CONTEXT, r);
    }
  }
  const contexts = new Map<string, number>();
  if (structuredReplies && opts.metaContexts.length > 0) {
    stage = 'selecting metadata contexts';
    send(codec.encodeOptionRequest(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest(exportName, [...opts.metaContexts])));
    for (;;) {
      const r = await readReply(C.NBD_OPT_SET_META_CONTEXT);
      if (r.type === C.NBD_REP_ACK) break;
      if (r.type === C.NBD_REP_META_CONTEXT) {
        if (r.payload.length < 4) throw new NbdHandshakeError(`${label}: NBD_REP_META_CONTEXT reply of ${r.payload.length} bytes`);
        contexts.set(r.payload.toString('utf8', 4), r.payload.readUInt32BE(0));
        continue;
      }
      if (isError(r.type)) {
        // Tolerated: no contexts (block status then reports everything as allocated data).
        contexts.clear();
        break;
      }
      throw unexpected(C.NBD_OPT_SET_META_CONTEXT, r);
    }
  }

  // -- enter transmission: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME where GO is unknown
  stage = `NBD_OPT_GO for export "${exportName}"`;
  send(codec.encodeOptionRequest(C.NBD_OPT_GO, codec.encodeInfoRequest(exportName, [C.NBD_INFO_BLOCK_SIZE])));
  let size: number | undefined;
  let transmissionFlags = 0;
  let blockSize: BlockSize | undefined;
  for (let first = true; ; first = false) {
    const r = await readReply(C.NBD_OPT_GO);
    if (r.type === C.NBD_REP_INFO) {
      if (r.payload.length < 2) throw new NbdHandshakeError(`${label}: NBD_REP_INFO reply of ${r.payload.length} bytes`);
      const info = r.payload.readUInt16BE(0);
      if (info === C.NBD_INFO_EXPORT) {
        if (r.payload.length !== 12) throw new NbdHandshakeError(`${label}: NBD_INFO_EXPORT of ${r.payload.length} bytes (expected 12)`);
        size = readSize(r.payload, 2, label);
        transmissionFlags = r.payload.readUInt16BE(10);
      } else if (info === C.NBD_INFO_BLOCK_SIZE) {
        if (r.payload.length !== 14) throw new NbdHandshakeError(`${label}: NBD_INFO_BLOCK_SIZE of ${r.payload.length} bytes (expected 14)`);
        blockSize = checkBlockSize(r.payload.readUInt32BE(2), r.payload.readUInt32BE(6), r.payload.readUInt32BE(10), label);
      }
      // NBD_INFO_NAME, NBD_INFO_DESCRIPTION and unknown types: ignored.
      continue;
    }
    if (r.type === C.NBD_REP_ACK) {
      if (size === undefined) throw new NbdHandshakeError(`${label}: the server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT`);
      return done('go');
    }
    if (isError(r.type)) {
      if (r.type === C.NBD_REP_ERR_UNSUP && first) break; // an old server: fall back to NBD_OPT_EXPORT_NAME
      abort();
      throw new NbdHandshakeError(
        `${label}: the server refused export "${exportName}" (${replyName(r.type)} in reply to NBD_OPT_GO)${serverText(r.payload)}`,
        { option: C.NBD_OPT_GO, reply: r.type, serverMessage: r.payload.toString('utf8') },
      );
    }
    throw unexpected(C.NBD_OPT_GO, r);
  }

  stage = `NBD_OPT_EXPORT_NAME for export "${exportName}" (a server ends the connection here when it has no such export)`;
  send(codec.encodeOptionRequest(C.NBD_OPT_EXPORT_NAME, Buffer.from(exportName)));
  const reply = await read(10 + (noZeroes ? 0 : C.ZERO_PAD_LENGTH));
  size = readSize(reply, 0, label);
  transmissionFlags = reply.readUInt16BE(8);
  return done('export-name');

  function done(via: 'go' | 'export-name'): NegotiatedExport {
    // Without HAS_FLAGS the other bits mean nothing.
    const flags = transmissionFlags & C.NBD_FLAG_HAS_FLAGS ? transmissionFlags : 0;
    return {
      exportName,
      size: size!,
      transmissionFlags: flags,
      structuredReplies,
      contexts,
      listedContexts,
      blockSize: blockSize ?? DEFAULT_BLOCK_SIZE,
      blockSizeReported: blockSize !== undefined,
      via,
    };
  }
}

function serverText(payload: Buffer): string {
  const s = payload.toString('utf8').trim();
  return s ? `: ${s}` : '';
}

function readSize(b: Buffer, at: number, label: string): number {
  const size = codec.readU64(b, at);
  if (!Number.isFinite(size)) throw new NbdHandshakeError(`${label}: export size ${b.readBigUInt64BE(at)} is too large`);
  return size;
}

const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;

function checkBlockSize(minimum: number, preferred: number, maximum: number, label: string): BlockSize {
  // proto.md: minimum a power of 2 up to 64 KiB, preferred a power of 2 at least the minimum,
  // maximum a multiple of the minimum (or 0xffffffff) at least the preferred... with some latitude.
  if (!isPow2(minimum) || minimum > 65536 || !isPow2(preferred) || preferred < minimum || maximum < minimum)
    throw new NbdHandshakeError(`${label}: the server sent invalid block sizes (minimum ${minimum}, preferred ${preferred}, maximum ${maximum})`);
  return { minimum, preferred, maximum };
}
