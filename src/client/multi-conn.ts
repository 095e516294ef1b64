/**
 * Several connections to one export as one Device, when the server advertises
 * NBD_FLAG_CAN_MULTI_CONN (proto.md: every connection sees one shared state, and a
 * flush's effect is visible on all of them), as nbdcopy uses them.
 *
 * - The first connection is the device's face: size, flags, contexts. Copying starts
 *   on it at once; the others are dialled meanwhile and join as they finish their
 *   handshake (across a WAN a handshake is several round trips: nobody waits for it).
 *   One that fails to join (refused, a server that allows fewer connections than it
 *   advertises multi-conn for, another export size) is logged and left out: it
 *   carried nothing.
 * - Each request goes to the connection with the fewest bytes outstanding; every
 *   connection keeps its own bounds (requests and bytes in flight, transport.ts), so
 *   the whole is bounded by `connections` times them.
 * - Errors: a failed request rejects as on one connection, whichever carried it (the
 *   copy fails with it); a connection lost after it joined is logged with its number.
 * - flush() waits for nothing itself: callers flush once their writes are answered
 *   (proto.md: a client with several connections MUST NOT send NBD_CMD_FLUSH before the
 *   writes it should cover are answered). It is then sent on every connection at once:
 *   one would do with multi-conn, all costs no extra round trip and does not depend on
 *   the server keeping its promise.
 * - Without NBD_FLAG_CAN_MULTI_CONN, or with `connections` 1, connectMulti() returns
 *   the one plain NbdClient.
 */
import type { Capabilities, Device, Extent, WriteOptions, ZeroOptions } from '../storage/device.js';
import { NbdClient, type NbdClientOptions } from './nbd-client.js';

export interface MultiConnOptions extends NbdClientOptions {
  /** Connections at most (1: one plain connection). */
  connections: number;
  /** Bound on an extra connection's connect and handshake (default: connectTimeoutMs, 10 s). */
  joinTimeoutMs?: number;
  /** Told about connections joining, failing to join and lost. */
  log?: (event: string, fields: Record<string, unknown>) => void;
}

/** Connects; with multi-conn advertised and `connections` > 1, a MultiConnClient (the others join as they come). */
export async function connectMulti(uri: string, opts: MultiConnOptions): Promise<NbdClient | MultiConnClient> {
  const { connections, joinTimeoutMs, log, ...clientOpts } = opts;
  if (!(Number.isInteger(connections) && connections >= 1)) throw new RangeError(`connections must be a positive integer, got ${connections}`);
  const first = await NbdClient.connect(uri, clientOpts);
  if (connections === 1 || !first.capabilities().canMultiConn) return first;
  return new MultiConnClient(first, uri, connections, { ...clientOpts, connectTimeoutMs: joinTimeoutMs ?? clientOpts.connectTimeoutMs }, log);
}

interface Conn {
  client: NbdClient;
  /** 1-based, in the order dialled. */
  n: number;
  /** Payload bytes (and 1 per request without) sent on it and not yet answered. */
  outstanding: number;
}

export class MultiConnClient implements Device {
  readonly size: number;
  readonly uri: string;
  private readonly conns: Conn[] = [];
  private readonly joining: Array<Promise<void>> = [];
  private closing = false;
  /** Gives up the connections still dialling (close()). */
  private readonly abandon = new AbortController();

  constructor(
    first: NbdClient,
    uri: string,
    /** Connections wanted (the first included). */
    readonly wanted: number,
    clientOpts: NbdClientOptions,
    private readonly log?: MultiConnOptions['log'],
  ) {
    this.size = first.size;
    this.uri = first.uri;
    this.add(first, 1);
    for (let n = 2; n <= wanted; n++) this.joining.push(this.join(uri, n, { ...clientOpts, signal: this.abandon.signal }, first));
  }

  /** Connections carrying requests now. */
  get connections(): number {
    return this.conns.length;
  }

  /** Resolves once every extra connection has joined or given up. */
  async joined(): Promise<void> {
    await Promise.all(this.joining);
  }

  private add(client: NbdClient, n: number): void {
    const c: Conn = { client, n, outstanding: 0 };
    client.on('close', (err?: Error) => {
      if (err) this.log?.('multi-conn-lost', { connection: n, of: this.wanted, cause: err.message });
    });
    this.conns.push(c);
  }

  private async join(uri: string, n: number, opts: NbdClientOptions, first: NbdClient): Promise<void> {
    let c: NbdClient;
    try {
      c = await NbdClient.connect(uri, opts);
    } catch (e) {
      if (!this.closing) this.log?.('multi-conn-join-failed', { connection: n, of: this.wanted, cause: (e as Error).message });
      return;
    }
    // Another export behind the same name (or a server that changed its mind) must not carry our writes.
    const why =
      c.size !== first.size
        ? `its export is ${c.size} bytes, the first connection's ${first.size}`
        : c.transmissionFlags !== first.transmissionFlags
          ? `its transmission flags 0x${c.transmissionFlags.toString(16)} differ from the first connection's 0x${first.transmissionFlags.toString(16)}`
          : undefined;
    if (why || this.closing) {
      if (why) this.log?.('multi-conn-join-failed', { connection: n, of: this.wanted, cause: why });
      await c.close();
      return;
    }
    this.add(c, n);
    this.log?.('multi-conn-joined', { connection: n, of: this.wanted });
  }

  capabilities(): Capabilities {
    return this.conns[0]!.client.capabilities();
  }

  /** The open connection with the least outstanding (the first on a tie). */
  private pick(): Conn {
    let best: Conn | undefined;
    for (const c of this.conns) if (!c.client.closed && (!best || c.outstanding < best.outstanding)) best = c;
    return best ?? this.conns[0]!;
  }

  private async on<T>(bytes: number, op: (c: NbdClient) => Promise<T>): Promise<T> {
    const c = this.pick();
    const w = Math.max(1, bytes);
    c.outstanding += w;
    try {
      return await op(c.client);
    } finally {
      c.outstanding -= w;
    }
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.on(length, (c) => c.read(offset, length, into, at));
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    let n = 0;
    for (const b of data) n += b.length;
    return this.on(n, (c) => c.write(offset, data, opts));
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.on(0, (c) => c.trim(offset, length, opts));
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.on(0, (c) => c.zero(offset, length, opts));
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.on(0, (c) => c.extents(offset, length, maxExtents));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.on(0, (c) => c.cache(offset, length));
  }

  /** On every connection at once; rejects with the first failure once all have answered. */
  async flush(): Promise<void> {
    const r = await Promise.allSettled(this.conns.map((c) => c.client.flush()));
    for (const x of r) if (x.status === 'rejected') throw x.reason;
  }

  /** Closes every connection; those still dialling are given up (a server may allow fewer connections than asked for). */
  async close(): Promise<void> {
    this.closing = true;
    this.abandon.abort();
    await Promise.all([...this.joining, ...this.conns.map((c) => c.client.close())]);
  }
}
