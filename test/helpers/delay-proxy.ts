/**
 * A simulated long-distance link on loopback: a TCP proxy between a client
 * (the copier) and a server (the target) that adds a fixed one-way delay in
 * each direction and caps the bandwidth of each direction, one cap shared by
 * every connection through the proxy (as one WAN link is). Bytes keep their
 * order: each direction is one FIFO whose departure times only grow.
 *
 * Model: a byte leaves once the link is free (serialisation at `bandwidth`),
 * then arrives `delayMs` later. What the link has not delivered yet is held in
 * the proxy; past `bufferBytes` per connection and direction (by default twice
 * the bandwidth-delay product) the proxy stops reading from that side, so TCP
 * pushes back on the sender as a full path does.
 *
 * Loopback only: it listens on 127.0.0.1 and connects to the target given.
 */
import * as net from 'node:net';

export interface DelayProxyOptions {
  /** Where the target listens. */
  targetHost: string;
  targetPort: number;
  /** One-way delay, each direction (default 40 ms). */
  delayMs?: number;
  /** Bytes per second, each direction, shared by all connections (default 1 Gbit/s = 125,000,000). */
  bandwidth?: number;
  /** Bytes held per connection and direction before the proxy stops reading (default 2 x bandwidth x delay, at least 1 MiB). */
  bufferBytes?: number;
  /** Told about each connection the proxy accepts (before it connects on to the target). */
  onConnection?: () => void;
}

export interface DelayProxy {
  port: number;
  /** An nbd:// URI for `exportName` through the proxy. */
  uri(exportName: string): string;
  /** Bytes delivered, each direction, all connections. */
  readonly stats: { toTarget: number; toClient: number; connections: number };
  close(): Promise<void>;
}

/** One direction of the link: its shared serialisation clock. */
class Link {
  /** When the link is next free (performance.now() ms). */
  private freeAt = 0;
  constructor(private readonly bytesPerMs: number, readonly delayMs: number) {}

  /** When `n` bytes sent now arrive at the far end. */
  schedule(n: number): number {
    const now = performance.now();
    const start = Math.max(now, this.freeAt);
    this.freeAt = start + n / this.bytesPerMs;
    return this.freeAt + this.delayMs;
  }
}

/** One connection's one direction: chunks on their way, delivered in order at their arrival times. */
class Pipe {
  private readonly queue: Array<{ at: number; chunk: Buffer }> = [];
  private head = 0;
  private held = 0;
  private timer: NodeJS.Timeout | undefined;
  private ended = false;

  constructor(
    private readonly from: net.Socket,
    private readonly to: net.Socket,
    link: Link,
    private readonly limit: number,
    private readonly count: (n: number) => void,
  ) {
    from.on('data', (chunk: Buffer) => {
      this.queue.push({ at: link.schedule(chunk.length), chunk });
      this.held += chunk.length;
      if (this.held >= this.limit) from.pause();
      this.arm();
    });
    from.on('end', () => {
      this.ended = true;
      this.arm();
    });
  }

  private arm(): void {
    if (this.timer) return;
    if (this.head === this.queue.length) {
      if (this.ended) this.to.end();
      return;
    }
    const wait = Math.max(0, this.queue[this.head]!.at - performance.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.deliver();
    }, wait);
  }

  private deliver(): void {
    const now = performance.now();
    while (this.head < this.queue.length && this.queue[this.head]!.at <= now + 0.5) {
      const { chunk } = this.queue[this.head]!;
      this.queue[this.head++] = undefined as unknown as { at: number; chunk: Buffer };
      this.held -= chunk.length;
      this.count(chunk.length);
      if (!this.to.destroyed) this.to.write(chunk);
    }
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
    if (this.held < this.limit && this.from.isPaused()) this.from.resume();
    this.arm();
  }

  stop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

export async function startDelayProxy(o: DelayProxyOptions): Promise<DelayProxy> {
  const delayMs = o.delayMs ?? 40;
  const bandwidth = o.bandwidth ?? 125_000_000;
  const limit = o.bufferBytes ?? Math.max(1024 * 1024, Math.ceil((2 * bandwidth * delayMs) / 1000));
  const up = new Link(bandwidth / 1000, delayMs);
  const down = new Link(bandwidth / 1000, delayMs);
  const stats = { toTarget: 0, toClient: 0, connections: 0 };
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ noDelay: true }, (client) => {
    stats.connections++;
    o.onConnection?.();
    const target = net.connect({ host: o.targetHost, port: o.targetPort, noDelay: true });
    sockets.add(client);
    sockets.add(target);
    const pipes = [
      new Pipe(client, target, up, limit, (n) => (stats.toTarget += n)),
      new Pipe(target, client, down, limit, (n) => (stats.toClient += n)),
    ];
    const gone = () => {
      for (const p of pipes) p.stop();
      client.destroy();
      target.destroy();
      sockets.delete(client);
      sockets.delete(target);
    };
    // A reset or a full close on either side ends both (delivering what was in flight is not needed by any user here).
    client.on('error', gone);
    target.on('error', gone);
    client.on('close', gone);
    target.on('close', gone);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    uri: (name) => `nbd://127.0.0.1:${port}/${name}`,
    stats,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
