/**
 * The WAN delay proxy the bench's wan row runs through: a fixed one-way delay
 * each direction, one bandwidth cap shared by all connections, bytes in order.
 * Only lower bounds are asserted (they hold however loaded the machine is).
 */
import t from 'tap';
import * as net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { startDelayProxy } from '../../helpers/delay-proxy.js';

/** A server that echoes everything back. */
async function echoServer(t: typeof import('tap').default): Promise<number> {
  const server = net.createServer((s) => s.pipe(s));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return (server.address() as net.AddressInfo).port;
}

/** Sends `data` through the proxy and resolves with what came back and how long it took (ms). */
function roundTrip(port: number, data: Buffer): Promise<{ back: Buffer; ms: number }> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port, noDelay: true });
    const parts: Buffer[] = [];
    let got = 0;
    let t0 = 0;
    s.on('connect', () => {
      t0 = performance.now();
      s.write(data);
    });
    s.on('data', (c: Buffer) => {
      parts.push(c);
      got += c.length;
      if (got >= data.length) {
        const ms = performance.now() - t0;
        s.destroy();
        resolve({ back: Buffer.concat(parts), ms });
      }
    });
    s.on('error', reject);
  });
}

t.test('one-way delay each direction; bytes arrive whole and in order', async (t) => {
  const proxy = await startDelayProxy({ targetHost: '127.0.0.1', targetPort: await echoServer(t), delayMs: 30, bandwidth: 1e9 });
  t.teardown(() => proxy.close());
  const small = await roundTrip(proxy.port, Buffer.from('ping'));
  t.equal(small.back.toString(), 'ping');
  t.ok(small.ms >= 60, `a round trip takes at least twice the one-way delay (${small.ms.toFixed(1)} ms)`);
  const data = randomBytes(4 * 1024 * 1024);
  const big = await roundTrip(proxy.port, data);
  t.equal(createHash('sha256').update(big.back).digest('hex'), createHash('sha256').update(data).digest('hex'), 'every byte back, in order');
});

t.test('one bandwidth cap shared by all connections', async (t) => {
  const bandwidth = 20 * 1024 * 1024; // 20 MiB/s each direction
  const proxy = await startDelayProxy({ targetHost: '127.0.0.1', targetPort: await echoServer(t), delayMs: 5, bandwidth });
  t.teardown(() => proxy.close());
  const one = await roundTrip(proxy.port, randomBytes(4 * 1024 * 1024));
  t.ok(one.ms >= 200, `4 MiB at 20 MiB/s takes at least 200 ms (${one.ms.toFixed(0)} ms)`);
  const t0 = performance.now();
  await Promise.all([roundTrip(proxy.port, randomBytes(4 * 1024 * 1024)), roundTrip(proxy.port, randomBytes(4 * 1024 * 1024))]);
  const both = performance.now() - t0;
  t.ok(both >= 400, `two connections of 4 MiB share the cap: at least 400 ms together (${both.toFixed(0)} ms)`);
  t.ok(proxy.stats.toTarget >= 12 * 1024 * 1024 && proxy.stats.toClient >= 12 * 1024 * 1024, 'the counters saw all of it');
});
