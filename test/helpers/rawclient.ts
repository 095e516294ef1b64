// A tiny, deliberately dumb NBD client over node:net, for the protocol corner
// cases that real clients refuse to produce (bad magic, unknown commands,
// stalling in the handshake, ...). Simple replies only: it never negotiates
// structured replies.

import { connect, type Socket } from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OLDSTYLE_MAGIC = 0x00420281861253n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;

export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_ERR_UNSUP = 0x80000001;

export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;

export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;

export class ConnectionClosedError extends Error {}

export class RawNbdClient {
  readonly sock: Socket;
  private chunks: Buffer[] = [];
  private avail = 0;
  private pending:
    | { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }
    | undefined;
  private closedFlag = false;
  private closeWaiters: (() => void)[] = [];
  /** Set when the socket emitted an error (e.g. ECONNRESET). */
  socketError: Error | undefined;

  private constructor(sock: Socket) {
    this.sock = sock;
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.avail += b.length;
      this.fulfil();
    });
    sock.on('error', (e) => {
      this.socketError = e;
    });
    sock.on('close', () => {
      this.closedFlag = true;
      if (this.pending) {
        const p = this.pending;
        this.pending = undefined;
        clearTimeout(p.timer);
        p.reject(new ConnectionClosedError(`connection closed with ${this.avail} of ${p.n} bytes available`));
      }
      for (const w of this.closeWaiters.splice(0)) w();
    });
  }

  static connect(port: number, host = '127.0.0.1', timeoutMs = 5000): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const sock = connect({ port, host });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`connect to ${host}:${port} timed out`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.setNoDelay(true);
        resolve(new RawNbdClient(sock));
      });
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.avail = rest.length;
    return out;
  }

  private fulfil(): void {
    const p = this.pending;
    if (!p || this.avail < p.n) return;
    this.pending = undefined;
    clearTimeout(p.timer);
    p.resolve(this.take(p.n));
  }

  /** Read exactly n bytes; rejects on timeout or if the peer closes first. */
  read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    if (this.pending) return Promise.reject(new Error('concurrent read'));
    if (this.avail >= n) return Promise.resolve(this.take(n));
    if (this.closedFlag) {
      return Promise.reject(
        new ConnectionClosedError(`connection already closed (${this.avail} of ${n} bytes available)`),
      );
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending = undefined;
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${n} bytes (${this.avail} available)`));
      }, timeoutMs);
      this.pending = { n, resolve, reject, timer };
    });
  }

  write(data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.sock.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Resolve true once the peer closed the connection, or false after timeoutMs. */
  waitClosed(timeoutMs: number): Promise<boolean> {
    if (this.closedFlag) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w = () => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        const i = this.closeWaiters.indexOf(w);
        if (i >= 0) this.closeWaiters.splice(i, 1);
        resolve(false);
      }, timeoutMs);
      this.closeWaiters.push(w);
    });
  }

  destroy(): void {
    this.sock.destroy();
  }

  // ---- handshake -------------------------------------------------------

  /** Read the newstyle greeting; returns the 16-bit handshake flags. */
  async readGreeting(): Promise<number> {
    const b = await this.read(18);
    const magic = b.readBigUInt64BE(0);
    const ihaveopt = b.readBigUInt64BE(8);
    if (magic !== NBDMAGIC) throw new Error(`bad server magic 0x${magic.toString(16)}`);
    if (ihaveopt !== IHAVEOPT) throw new Error(`not a newstyle server: 0x${ihaveopt.toString(16)}`);
    return b.readUInt16BE(16);
  }

  async sendClientFlags(flags: number): Promise<void> {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags >>> 0, 0);
    await this.write(b);
  }

  async sendOption(opt: number, data: Buffer = Buffer.alloc(0)): Promise<void> {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt >>> 0, 8);
    h.writeUInt32BE(data.length, 12);
    await this.write(Buffer.concat([h, data]));
  }

  /** Read one fixed-newstyle option reply. */
  async readOptionReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const magic = h.readBigUInt64BE(0);
    if (magic !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)}`);
    const opt = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    const data = len ? await this.read(len) : Buffer.alloc(0);
    return { opt, type, data };
  }

  /**
   * Send NBD_OPT_EXPORT_NAME and read the export info. `noZeroes` must match
   * what was sent in the client flags.
   */
  async exportName(name: string, noZeroes: boolean): Promise<{ size: bigint; flags: number }> {
    await this.sendOption(OPT_EXPORT_NAME, Buffer.from(name, 'utf8'));
    const b = await this.read(10 + (noZeroes ? 0 : 124));
    return { size: b.readBigUInt64BE(0), flags: b.readUInt16BE(8) };
  }

  /** Greeting + fixed newstyle + NO_ZEROES + EXPORT_NAME, in one go. */
  async handshake(name: string): Promise<{ size: bigint; flags: number; handshakeFlags: number }> {
    const handshakeFlags = await this.readGreeting();
    if (!(handshakeFlags & FLAG_FIXED_NEWSTYLE)) throw new Error('server is not fixed newstyle');
    const noZeroes = (handshakeFlags & FLAG_NO_ZEROES) !== 0;
    await this.sendClientFlags(FLAG_FIXED_NEWSTYLE | (noZeroes ? FLAG_NO_ZEROES : 0));
    const info = await this.exportName(name, noZeroes);
    return { ...info, handshakeFlags };
  }

  // ---- transmission ----------------------------------------------------

  static encodeRequest(r: {
    magic?: number;
    flags?: number;
    type: number;
    handle: bigint;
    offset?: bigint;
    length?: number;
  }): Buffer {
    const b = Buffer.alloc(28);
    b.writeUInt32BE((r.magic ?? REQUEST_MAGIC) >>> 0, 0);
    b.writeUInt16BE(r.flags ?? 0, 4);
    b.writeUInt16BE(r.type, 6);
    b.writeBigUInt64BE(r.handle, 8);
    b.writeBigUInt64BE(r.offset ?? 0n, 16);
    b.writeUInt32BE((r.length ?? 0) >>> 0, 24);
    return b;
  }

  async sendRequest(
    r: { magic?: number; flags?: number; type: number; handle: bigint; offset?: bigint; length?: number },
    payload?: Buffer,
  ): Promise<void> {
    const h = RawNbdClient.encodeRequest(r);
    await this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Read a simple reply; if it carries no error, also read `dataLength` bytes. */
  async readSimpleReply(dataLength = 0, timeoutMs = 10_000): Promise<{ error: number; handle: bigint; data: Buffer }> {
    const h = await this.read(16, timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`expected a simple reply, got magic 0x${magic.toString(16)}`);
    const error = h.readUInt32BE(4);
    const handle = h.readBigUInt64BE(8);
    const data = error === 0 && dataLength > 0 ? await this.read(dataLength, timeoutMs) : Buffer.alloc(0);
    return { error, handle, data };
  }

  /** NBD_CMD_READ with a simple reply. */
  async readAt(offset: number, length: number, handle = 0x1234n, flags = 0): Promise<{ error: number; data: Buffer }> {
    await this.sendRequest({ type: CMD_READ, handle, offset: BigInt(offset), length, flags });
    const r = await this.readSimpleReply(length);
    if (r.handle !== handle) throw new Error(`reply handle ${r.handle} != request handle ${handle}`);
    return { error: r.error, data: r.data };
  }

  /** Polite NBD_CMD_DISC, then close our side. */
  async disconnect(): Promise<void> {
    if (this.closedFlag) return;
    try {
      await this.sendRequest({ type: CMD_DISC, handle: 0xd15cn });
    } catch {
      /* ignore */
    }
    this.sock.end();
  }
}
