// Regressions from the protocol fuzzing campaign (test/fuzz/protocol.test.ts).
// Each case is a minimal reproduction of a finding; the fuzzer's case and seed
// are in the comment above it.

import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MiB, makeImage, serve, tmpDir } from '../helpers/server.js';
import { CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, RawNbdClient } from '../helpers/rawclient.js';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Nothing may come back for NBD_CMD_DISC; the server must close the connection. */
async function expectSilentClose(t: Test, c: RawNbdClient): Promise<void> {
  let reply: Buffer | undefined;
  try {
    reply = await c.read(16, 3000);
  } catch {
    /* closed (good) or nothing within 3 s */
  }
  t.equal(reply?.toString('hex'), undefined, '"There is no reply to an NBD_CMD_DISC"');
  t.ok(c.closed || (await c.waitClosed(3000)), 'the server closes the connection after NBD_CMD_DISC');
}

t.test('NBD_CMD_DISC with flags the server does not accept is still a disconnect', async (t) => {
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 4 * MiB);
  const ro = await makeImage(join(dir, 'ro.img'), MiB, { fill: 0x42 });
  const srv = await serve(t, [img, '--name', 'vm1', '--export', `ro=${ro},read-only`]);

  // Fuzz finding reply-to-disc (seed 24301, case 1154): the server validated
  // DISC's flags like any command's and answered EINVAL (a simple reply, or an
  // error chunk with structured replies) instead of disconnecting, and kept
  // the connection open. Minimal stream after EXPORT_NAME "vm1":
  //   25609513 8000 0002 000000000000036c 0000000000000000 00000000
  t.test('an unknown flag (0x8000)', async (t) => {
    const c = await RawNbdClient.connect(srv.newstylePort);
    t.teardown(() => c.destroy());
    await c.handshake('vm1');
    await c.sendRequest({ type: CMD_DISC, flags: 0x8000, handle: 0x36cn });
    await expectSilentClose(t, c);
  });

  // The same with FUA on an export that does not advertise NBD_FLAG_SEND_FUA
  // (read-only exports), as a client that sets FUA on every request would.
  t.test('NBD_CMD_FLAG_FUA on an export without SEND_FUA', async (t) => {
    const c = await RawNbdClient.connect(srv.newstylePort);
    t.teardown(() => c.destroy());
    const info = await c.handshake('ro');
    t.equal(info.flags & (1 << 3), 0, 'the read-only export does not advertise SEND_FUA');
    await c.sendRequest({ type: CMD_DISC, flags: 1, handle: 7n });
    await expectSilentClose(t, c);
  });

  // And with structured replies negotiated (an NBD_REPLY_TYPE_ERROR chunk was sent).
  t.test('structured replies: no error chunk either', async (t) => {
    const c = await RawNbdClient.connect(srv.newstylePort);
    t.teardown(() => c.destroy());
    await c.readGreeting();
    await c.sendClientFlags(FLAG_FIXED_NEWSTYLE | 2);
    await c.sendOption(8); // NBD_OPT_STRUCTURED_REPLY
    const sr = await c.readOptionReply();
    t.equal(sr.type, 1, 'structured replies acknowledged');
    await c.exportName('vm1', true);
    await c.sendRequest({ type: CMD_DISC, flags: 0x8000, handle: 0x36cn });
    await expectSilentClose(t, c);
  });
});

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : 0;
}

// Fuzz finding rss (the campaign's RSS invariant, reproduced directly): the
// in-flight and queued-reply bounds are per connection (128 MiB of requests,
// 64 MiB of replies), and nothing bounds them across connections. A client
// that pipelines 32 MiB READs and never reads the replies pins about 100 MiB
// of server memory per connection; five such connections took the server
// from 70 MiB to about 550 MiB.
t.test('server memory stays bounded across connections that never read their READ replies', async (t) => {
  const CONNECTIONS = 5;
  const READS = 8;
  const LIMIT_MIB = 400;
  const dir = await tmpDir(t);
  const img = await makeImage(join(dir, 'disk.img'), 64 * MiB);
  const srv = await serve(t, [img, '--name', 'vm1']);
  const pid = srv.proc.pid!;
  const before = rssMiB(pid);
  const clients: RawNbdClient[] = [];
  t.teardown(() => clients.forEach((c) => c.destroy()));
  for (let i = 0; i < CONNECTIONS; i++) {
    const c = await RawNbdClient.connect(srv.newstylePort);
    clients.push(c);
    await c.handshake('vm1');
    c.sock.pause(); // never read a reply
    for (let r = 0; r < READS; r++) await c.sendRequest({ type: CMD_READ, handle: BigInt(r), offset: 0n, length: 32 * MiB });
  }
  let peak = 0;
  for (let i = 0; i < 32; i++) {
    await sleep(250);
    peak = Math.max(peak, rssMiB(pid));
  }
  t.equal(srv.exited(), undefined, 'server still running');
  t.ok(peak < LIMIT_MIB, `server RSS stays under ${LIMIT_MIB} MiB with ${CONNECTIONS} such connections (${before.toFixed(0)} MiB before, peak ${peak.toFixed(0)} MiB)`);
});
