/**
 * TCP_QUICKACK during the handshake (src/client/connect.ts): qemu-nbd 7.2 sets no
 * TCP_NODELAY, so the second piece of an option reply (the ACK after a META_CONTEXT reply,
 * the ACK after GO's INFO replies) waited for the client's delayed ACK: 92 ms for a
 * handshake on loopback (strace: 41 ms gaps after REP_META_CONTEXT and after REP_INFO).
 * Here the arming is observed through the test hook: once on connect and again on every
 * read of the handshake, then no more (unless the client asked for quickAck).
 */
import t from 'tap';
import { join } from 'node:path';
import { NbdClient } from '../../../src/client/nbd-client.js';
import { freePort } from '../../helpers/net.js';
import { qemuNbd } from '../../helpers/peers.js';
import { MiB, makeImage, tmpDir } from '../../helpers/server.js';

t.test('armed on connect and on each handshake read, then left alone', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 8 * MiB);
  const port = await freePort();
  const q = await qemuNbd(img, 'vm1', port);
  t.teardown(() => q.stop());
  const calls: number[] = [];
  const c = await NbdClient.connect(`nbd://127.0.0.1:${port}/vm1`, {
    handshakeQuickAck: (fd) => {
      calls.push(fd);
      return 0;
    },
  });
  t.teardown(() => c.close());
  // connect, the greeting, NBD_OPT_STRUCTURED_REPLY's reply, SET_META_CONTEXT's and GO's (some may share a read)
  t.ok(calls.length >= 4, `armed ${calls.length} times during the handshake`);
  t.equal(new Set(calls).size, 1, 'always on the connection\'s own fd');
  t.ok(Number.isInteger(calls[0]) && calls[0]! >= 0, 'a real fd');
  const during = calls.length;
  const buf = Buffer.alloc(MiB);
  for (let i = 0; i < 4; i++) await c.read(i * MiB, MiB, buf, 0);
  t.equal(calls.length, during, 'not re-armed once the handshake is over');
});

t.test('null: never armed, and the handshake completes', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 8 * MiB);
  const port = await freePort();
  const q = await qemuNbd(img, 'vm1', port);
  t.teardown(() => q.stop());
  const c = await NbdClient.connect(`nbd://127.0.0.1:${port}/vm1`, { handshakeQuickAck: null });
  t.equal(c.size, 8 * MiB, 'the handshake completes without it');
  await c.close();
});
