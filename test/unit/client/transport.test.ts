// The client transport on its own, over a loopback socket pair with no handshake:
// its states, cookies, in-flight bounds and request watchdog.
import t, { type Test } from 'tap';
import * as net from 'node:net';
import { once } from 'node:events';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import { ByteQueue } from '../../../src/util/byte-queue.js';
import { Transport, type TransportLimits } from '../../../src/client/transport.js';
import { tcpPair } from '../../helpers/net.js';

interface Peer {
  transport: Transport;
  /** Requests the far end has received, in order. */
  received: codec.RequestHeader[];
  /** Resolves once `n` requests have arrived. */
  requests(n: number): Promise<codec.RequestHeader[]>;
  reply(h: codec.RequestHeader, error?: number): void;
  server: net.Socket;
  closes: Array<Error | undefined>;
}

async function pair(t: Test, limits: Partial<TransportLimits> = {}): Promise<Peer> {
  const { client, peer: server } = await tcpPair(t);
  const received: codec.RequestHeader[] = [];
  const q = new ByteQueue();
  let wake: (() => void) | undefined;
  server.on('data', (b: Buffer) => {
    q.push(b);
    while (q.length >= C.REQUEST_HEADER_LENGTH) {
      const h = codec.decodeRequestHeader(q.take(C.REQUEST_HEADER_LENGTH));
      received.push(h);
      if (h.type === C.NBD_CMD_WRITE) q.drop(h.length); // test payloads arrive whole with their header
    }
    wake?.();
  });
  server.on('error', () => {});
  const closes: Array<Error | undefined> = [];
  const transport = new Transport(
    client,
    false,
    [],
    { maxInflightRequests: 64, maxInflightBytes: 1 << 26, requestTimeoutMs: 0, ...limits },
    'nbd://test/',
    (err) => closes.push(err),
  );
  return {
    transport,
    received,
    server,
    closes,
    async requests(n) {
      while (received.length < n) await new Promise<void>((resolve) => (wake = resolve));
      return received.slice(0, n);
    },
    reply(h, error = 0) {
      server.write(codec.encodeSimpleReply(error, h.cookie));
    },
  };
}

const flush = (p: Peer) => p.transport.operation(() => p.transport.submit(C.NBD_CMD_FLUSH, 0, 0, 0));

t.test('READY: requests get increasing cookies and settle by cookie in any order', async (t) => {
  const p = await pair(t);
  t.equal(p.transport.state.kind, 'READY');
  const a = flush(p);
  const b = flush(p);
  const [ha, hb] = await p.requests(2);
  t.same([codec.cookieToNumber(ha!.cookie), codec.cookieToNumber(hb!.cookie)], [1, 2], 'cookies count from 1');
  p.reply(hb!);
  await b;
  p.reply(ha!, C.NBD_ENOSPC);
  await t.rejects(a, { code: 'ENOSPC', nbdErrno: C.NBD_ENOSPC }, 'the error reaches the request it answers');
  t.equal(p.transport.state.kind, 'READY', 'a request error keeps the connection');
});

t.test('in-flight request bound: the rest wait in order', async (t) => {
  const p = await pair(t, { maxInflightRequests: 2 });
  const all = [flush(p), flush(p), flush(p)];
  const first = await p.requests(2);
  t.same(p.transport.stats, { inflightRequests: 2, inflightBytes: 0, queuedRequests: 1 });
  p.reply(first[0]!);
  const three = await p.requests(3);
  t.equal(codec.cookieToNumber(three[2]!.cookie), 3, 'the queued request goes once one is answered');
  p.reply(three[1]!);
  p.reply(three[2]!);
  await Promise.all(all);
  t.same(p.transport.stats, { inflightRequests: 0, inflightBytes: 0, queuedRequests: 0 });
});

t.test('close(): CLOSING refuses new operations, the pending one finishes, then DISC and CLOSED', async (t) => {
  const p = await pair(t);
  const pending = flush(p);
  const [h] = await p.requests(1);
  const closed = p.transport.close();
  t.equal(p.transport.state.kind, 'CLOSING');
  await t.rejects(flush(p), { code: 'EPIPE', message: /the client is closing/ });
  p.reply(h!);
  await pending;
  const [, disc] = await p.requests(2);
  t.equal(disc!.type, C.NBD_CMD_DISC, 'NBD_CMD_DISC once idle');
  p.server.end();
  await closed;
  t.equal(p.transport.state.kind, 'CLOSED');
  t.ok(p.transport.closed);
  await t.rejects(flush(p), { code: 'EPIPE', message: /the client closed the connection/ });
  t.same(p.closes, [undefined], "'close' once, without an error");
});

t.test('close(waitMs): a request the server never answers is given up after waitMs, and the socket dropped', async (t) => {
  const p = await pair(t);
  const pending = flush(p);
  pending.catch(() => undefined);
  await p.requests(1);
  const serverGone = once(p.server, 'close');
  await p.transport.close(50);
  await t.rejects(pending, { code: 'ECONNRESET' }, 'the unanswered request rejects');
  t.equal(p.transport.state.kind, 'DEAD');
  t.equal(p.received.length, 1, 'no NBD_CMD_DISC: nothing could follow an unanswered request');
  await serverGone;
  t.pass('the connection is closed');
});

t.test('close(waitMs): requests answered in time still end in a soft disconnect', async (t) => {
  const p = await pair(t);
  const pending = flush(p);
  const [h] = await p.requests(1);
  const closed = p.transport.close(60_000);
  p.reply(h!);
  await pending;
  const [, disc] = await p.requests(2);
  t.equal(disc!.type, C.NBD_CMD_DISC, 'NBD_CMD_DISC once idle');
  p.server.end();
  await closed;
  t.equal(p.transport.state.kind, 'CLOSED');
});

t.test('ESHUTDOWN: the server asks for a soft disconnect', async (t) => {
  const p = await pair(t, { maxInflightRequests: 2 });
  const a = flush(p);
  const b = flush(p);
  const queued = flush(p);
  const [ha, hb] = await p.requests(2);
  p.reply(ha!, C.NBD_ESHUTDOWN);
  await t.rejects(a, { code: 'ESHUTDOWN' });
  await t.rejects(queued, { code: 'ESHUTDOWN', message: /not sent/ }, 'the queued request is not sent');
  t.equal(p.transport.state.kind, 'CLOSING', 'draining while a request is in flight');
  await t.rejects(flush(p), { code: 'ESHUTDOWN', message: /the server is shutting down$/ });
  p.reply(hb!);
  await b;
  const [, , disc] = await p.requests(3);
  t.equal(disc!.type, C.NBD_CMD_DISC);
  p.server.end();
  await p.transport.close();
  t.equal(p.transport.state.kind, 'CLOSED');
  t.equal(p.closes.length, 1);
  t.match(p.closes[0], { message: /ESHUTDOWN/ }, "'close' carries the shutdown");
});

t.test('DEAD: the server closing with requests pending, a bad reply, destroy()', async (t) => {
  t.test('server closes', async (t) => {
    const p = await pair(t);
    const a = flush(p);
    await p.requests(1);
    p.server.destroy();
    await t.rejects(a, { code: 'ECONNRESET' });
    const s = p.transport.state;
    t.equal(s.kind, 'DEAD');
    await t.rejects(flush(p), { code: 'ECONNRESET', message: /NBD connection is closed/ });
    await new Promise((r) => setImmediate(r));
    t.equal(p.closes.length, 1);
    t.type(p.closes[0], Error);
  });
  t.test('unknown cookie', async (t) => {
    const p = await pair(t);
    const a = flush(p);
    await p.requests(1);
    p.server.write(codec.encodeSimpleReply(0, { hi: 0, lo: 99 }));
    await t.rejects(a, { code: 'ECONNRESET' });
    const s = p.transport.state;
    t.equal(s.kind, 'DEAD');
    if (s.kind === 'DEAD') t.match(s.reason.message, /protocol error from the server: reply for unknown cookie 0x0000000000000063/);
  });
  t.test('destroy()', async (t) => {
    const p = await pair(t);
    const a = flush(p);
    await p.requests(1);
    p.transport.destroy();
    await t.rejects(a, { code: 'ECONNRESET', message: /destroyed by the client/ });
    t.equal(p.transport.state.kind, 'DEAD');
    await new Promise((r) => setImmediate(r));
    t.same(p.closes, [undefined], "'close' without an error");
  });
});

t.test('the request watchdog drops a connection that stops answering', async (t) => {
  const p = await pair(t, { requestTimeoutMs: 200 });
  const started = performance.now();
  const a = flush(p);
  await p.requests(1);
  await t.rejects(a, { code: 'ETIMEDOUT', message: /no reply from the server for \d+ ms with 1 request\(s\) outstanding \(oldest: flush 0\+0\); timeout 200 ms/ });
  t.ok(performance.now() - started >= 200, 'not before the timeout');
  t.equal(p.transport.state.kind, 'DEAD');
  await new Promise((r) => setImmediate(r));
  t.match(p.closes, [{ message: /no reply from the server/ }]);
});

t.test('the watchdog spares a connection that makes progress, however long one request takes', async (t) => {
  const p = await pair(t, { requestTimeoutMs: 1000 });
  const slow = flush(p);
  const [hs] = await p.requests(1);
  for (let i = 2; i <= 4; i++) {
    const f = flush(p);
    const all = await p.requests(i);
    // The far end's behaviour under test: an answer every 400 ms, while the first request stays unanswered 1200 ms.
    await new Promise((r) => setTimeout(r, 400));
    p.reply(all[i - 1]!);
    await f;
  }
  p.reply(hs!);
  await slow;
  t.equal(p.transport.state.kind, 'READY');
});
