// READ replies sent from the image's file (sendfile, src/server/sendfile.ts), in process with
// a raw client that stops reading: the socket fills, so replies go whole, in part (the rest
// queued) and not at all (the ordinary path), and every one still arrives whole, in the
// order sent, with the image's bytes. The fast path is checked to have been taken each way.
import * as fs from 'node:fs';
import * as path from 'node:path';
import t from 'tap';
import { Connection } from '../../../src/server/connection.js';
import { Export, ExportRegistry } from '../../../src/server/export.js';
import { nativeSendFile } from '../../../src/server/sendfile.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../../../src/server/server.js';
import { FileDevice } from '../../../src/storage/file-device.js';
import { CMD_READ, RawNbdClient } from '../../helpers/rawclient.js';
import { patternBuffer } from '../../helpers/server.js';

const M = 1024 * 1024;

type Outcome = 'sent' | 'queued' | undefined;

/** Records what every Connection.sendFileReply call did; `wait(n)` resolves after n calls. */
function spyOnSendFile(t: Tap.Test): { outcomes: Outcome[]; wait: (n: number) => Promise<void> } {
  const proto = Connection.prototype as unknown as { sendFileReply: (...a: unknown[]) => Outcome };
  const original = proto.sendFileReply;
  const outcomes: Outcome[] = [];
  let waiter: { n: number; resolve: () => void } | undefined;
  proto.sendFileReply = function (this: Connection, ...a: unknown[]) {
    const r = original.apply(this, a);
    outcomes.push(r);
    if (waiter && outcomes.length >= waiter.n) waiter.resolve();
    return r;
  };
  t.teardown(() => {
    proto.sendFileReply = original;
  });
  return {
    outcomes,
    wait: (n) => (outcomes.length >= n ? Promise.resolve() : new Promise((resolve) => (waiter = { n, resolve }))),
  };
}

async function serveImage(t: Tap.Test, image: Buffer): Promise<number> {
  const dir = fs.mkdtempSync('/dev/shm/nbd-migrate-sendfile-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, image);
  const device = await FileDevice.open(file, { readOnly: false });
  const registry = new ExportRegistry();
  registry.add(new Export({ name: 'vm1', device }));
  const server = new NbdServer(registry, DEFAULT_SERVER_OPTIONS);
  const bound = await server.listenNewstyle('127.0.0.1', 0);
  t.teardown(async () => {
    await server.close(1000);
    await device.close();
  });
  return bound.port!;
}

/** A raw client in transmission on export vm1 (destroyed at teardown). */
async function client(t: Tap.Test, port: number): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect(port);
  t.teardown(() => c.destroy());
  await c.handshake('vm1');
  return c;
}

t.test('the addon has sendFileReply (npm ci builds it)', async (t) => {
  t.type(nativeSendFile(), 'function');
});

t.test('a client that stops reading: whole, partial and ordinary replies all arrive whole and in order', async (t) => {
  const size = 16 * M;
  const image = patternBuffer(size, 7);
  const spy = spyOnSendFile(t);
  const port = await serveImage(t, image);
  const c = await client(t, port);

  // 40 reads of about 1 MiB (far more than loopback's socket buffers hold; within the session's
  // bounds on bytes in flight and queued), with nothing read meanwhile.
  const n = 40;
  const at = (i: number) => ((i * 7) % 15) * M + (i % 3) * 4096;
  const len = (i: number) => M - (i % 4) * 512;
  c.sock.pause();
  const reqs: Buffer[] = [];
  for (let i = 0; i < n; i++) reqs.push(RawNbdClient.encodeRequest({ type: CMD_READ, handle: BigInt(1000 + i), offset: BigInt(at(i)), length: len(i) }));
  await c.write(Buffer.concat(reqs));
  await spy.wait(n);
  c.sock.resume();

  const seen = new Set<bigint>();
  for (let k = 0; k < n; k++) {
    const head = await c.read(16);
    t.equal(head.readUInt32BE(0), 0x67446698, `reply ${k}: a simple reply's magic`);
    t.equal(head.readUInt32BE(4), 0, `reply ${k}: no error`);
    const handle = head.readBigUInt64BE(8);
    const i = Number(handle - 1000n);
    t.ok(i >= 0 && i < n && !seen.has(handle), `reply ${k}: an outstanding request's handle (${handle})`);
    seen.add(handle);
    const data = await c.read(len(i));
    t.ok(data.equals(image.subarray(at(i), at(i) + len(i))), `reply ${k} (request ${i}): the image's bytes`);
  }
  t.equal(seen.size, n, 'every request answered once');
  const count = (o: Outcome) => spy.outcomes.filter((x) => x === o).length;
  t.ok(count('sent') > 0, `some replies went whole from the file (${count('sent')})`);
  t.ok(count('queued') > 0, `some went in part, the rest queued (${count('queued')})`);
  t.ok(count(undefined) > 0, `and some, behind a queued rest, by the ordinary path (${count(undefined)})`);
});

t.test('small reads are copied, not sent from the file', async (t) => {
  const image = patternBuffer(M, 3);
  const spy = spyOnSendFile(t);
  const port = await serveImage(t, image);
  const c = await client(t, port);
  const r = await c.readAt(4096, 4096);
  t.equal(r.error, 0);
  t.ok(r.data.equals(image.subarray(4096, 8192)));
  t.same(spy.outcomes, [], 'no sendfile for 4 KiB');
});

t.test('a client that goes away with replies still queued: the server serves the next one', async (t) => {
  const image = patternBuffer(16 * M, 9);
  const spy = spyOnSendFile(t);
  const port = await serveImage(t, image);
  const c = await client(t, port);
  c.sock.pause();
  const reqs: Buffer[] = [];
  for (let i = 0; i < 24; i++) reqs.push(RawNbdClient.encodeRequest({ type: CMD_READ, handle: BigInt(i), offset: BigInt((i % 15) * M), length: M }));
  await c.write(Buffer.concat(reqs));
  await spy.wait(24);
  t.ok(spy.outcomes.includes('queued'), 'a reply was left half sent, its rest queued');
  c.destroy();
  t.ok(await c.waitClosed(5000), 'the first client is gone');
  const d = await client(t, port);
  const r = await d.readAt(5 * M + 512, M);
  t.equal(r.error, 0);
  t.ok(r.data.equals(image.subarray(5 * M + 512, 6 * M + 512)), 'a new client reads the image, sent from the file');
  t.equal(spy.outcomes.at(-1), 'sent');
});
