// Loopback ports for the servers the tests and the bench start.
import * as fs from 'node:fs';
import * as net from 'node:net';
import { once } from 'node:events';

/** A free TCP port on 127.0.0.1, below the ephemeral range when it can be (see inside); it is released for a server to bind. */
export async function freePort(): Promise<number> {
  // Below the kernel's ephemeral range: a port from bind(0) comes from the range every outgoing
  // connection takes its source port from, so with two test runs side by side one of their many
  // client sockets could hold it by the time the server binds (seen: EADDRINUSE in on-cutover).
  const low = ephemeralLow();
  for (let attempt = 0; attempt < 50 && low > FIXED_PORTS_FROM + 1000; attempt++) {
    const port = FIXED_PORTS_FROM + Math.floor(Math.random() * (low - FIXED_PORTS_FROM));
    if (port === 10809) continue; // the NBD port, which `npm start` and some tests use
    if (await bindable(port)) return port;
  }
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Where freePort's ports start: above the well-known and common service ports. */
const FIXED_PORTS_FROM = 20000;

/** The first port of the kernel's ephemeral range (net.ipv4.ip_local_port_range), 32768 if unknown. */
function ephemeralLow(): number {
  try {
    const low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    return Number.isInteger(low) && low > 0 ? low : 32768;
  } catch {
    return 32768;
  }
}

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
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
