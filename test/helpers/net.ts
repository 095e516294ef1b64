// Loopback ports for the servers the tests and the bench start.
import * as net from 'node:net';
import { once } from 'node:events';

/** A free TCP port on 127.0.0.1 (the kernel picks it; it is released for a server to bind). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Resolves once 127.0.0.1:port accepts a connection; rejects after `timeoutMs`, or at once if `gone()` says the server died. */
export async function waitForPort(port: number, timeoutMs: number, gone: () => string | undefined = () => undefined): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    const why = gone();
    if (why !== undefined) throw new Error(`nothing listening on 127.0.0.1:${port}: ${why}`);
    if (Date.now() > end) throw new Error(`nothing listening on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A connected pair of TCP sockets on 127.0.0.1 (`client` dialled, `peer` accepted), destroyed in teardown. */
export async function tcpPair(t: { teardown(fn: () => unknown): void }): Promise<{ client: net.Socket; peer: net.Socket }> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'connect');
  const [peer] = (await accepted) as [net.Socket];
  t.teardown(() => {
    client.destroy();
    peer.destroy();
    server.close();
  });
  return { client, peer };
}
