// --handoff disconnect with writes in flight across the cutover (issue 11.3):
// every write held during the switch is completed on the target and answered
// before the source closes the connection. A write that got an ack is on the
// target; no write that landed gets an error (the old code closed the socket
// right after releasing the held writes to the target: they landed, and the
// client got ENOTCONN for them).
//
// The client is libnbd (python3-libnbd) with 32 writes in flight at all times,
// each 4 KiB to its own slot with its sequence number in every 8 bytes, so
// the target image says which writes landed.
import t from 'tap';
import * as path from 'node:path';
import { adminRequest, waitForJob } from '../helpers/admin.js';
import { startDelayProxy } from '../helpers/delay-proxy.js';
import { makeImage, MiB, readAt, serve, tmpDir } from '../helpers/server.js';
import { describeRun, runPython } from '../helpers/tools.js';

const SIZE = 64 * MiB;
const BLOCK = 4096;

// Writes until the handle dies (or every slot is written). Prints per write: acked, failed (errno) or unanswered.
const CLIENT = String.raw`
import nbd, errno, json, struct, sys, os
uri, depth, started = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
slots = h.get_size() // 4096
acked, failed, pending = [], {}, {}
seq = 0
def gone():
    return h.aio_is_dead() or h.aio_is_closed()
def block(n):
    return struct.pack('<Q', n + 1) * 512
while True:
    while not gone() and len(pending) < depth and seq < slots:
        try:
            pending[seq] = h.aio_pwrite(block(seq), seq * 4096)
        except nbd.Error as e:
            failed[seq] = errno.errorcode.get(e.errnum, str(e.errnum))
        seq += 1
        if seq == 64:
            open(started, 'w').close()
    for n, cookie in list(pending.items()):
        try:
            if h.aio_command_completed(cookie):
                acked.append(n)
                del pending[n]
        except nbd.Error as e:
            failed[n] = errno.errorcode.get(e.errnum, str(e.errnum)) if e.errnum else e.string
            del pending[n]
    if gone() or (not pending and seq >= slots):
        break
    try:
        h.poll(1000)
    except nbd.Error as e:
        pass
print(json.dumps({'acked': acked, 'failed': failed, 'unanswered': list(pending), 'sent': seq, 'dead': gone()}))
`;

t.test('handoff disconnect: writes held at the switch are completed on the target and answered before the close', async (t) => {
  const dir = await tmpDir(t);
  const src = await makeImage(path.join(dir, 'src.img'), SIZE);
  const dst = await makeImage(path.join(dir, 'dst.img'), SIZE);
  const admin = path.join(dir, 'admin.sock');
  const dstSrv = await serve(t, [dst, '--name', 'vm1', '--incoming']);
  // The target 10 ms away each way: the writes held at the switch are still on their way to it when
  // the handoff begins (on localhost, on a busy machine, they had sometimes all been answered already).
  const dstUrl = new URL(dstSrv.uri('vm1'));
  const link = await startDelayProxy({ targetHost: dstUrl.hostname, targetPort: Number(dstUrl.port), delayMs: 10, bandwidth: 1_250_000_000 });
  t.teardown(() => link.close());
  const srcSrv = await serve(t, [src, '--name', 'vm1', '--admin-socket', admin]);
  const startedFile = path.join(dir, 'started');

  const client = runPython(CLIENT, [srcSrv.uri('vm1'), '32', startedFile], { timeoutMs: 120_000 });
  // The client writes before the mirror starts, during it and across the switch.
  await srcSrv.waitForLog((e) => e.event === 'transmission');
  await adminRequest(admin, {
    cmd: 'mirror', export: 'vm1', target: link.uri('vm1'), cutover: 'auto', handoff: 'disconnect', maxDowntime: '20ms',
  });
  const done = await waitForJob(admin, 'vm1', (j) => j.state === 'completed', { what: 'the cutover', failOn: ['failed', 'aborted'] });
  t.comment(`cutover after pass ${done.pass}, guests held ${done.pauseMs} ms`);
  const r = await client;
  t.equal(r.code, 0, 'the client ran to its end', { diag: describeRun(r) });
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { acked: number[]; failed: Record<string, string>; unanswered: number[]; sent: number; dead: boolean };
  t.comment(`client: ${out.sent} sent, ${out.acked.length} acked, ${Object.keys(out.failed).length} failed, ${out.unanswered.length} unanswered`);
  t.ok(out.dead, 'the source closed the connection at the switch (handoff disconnect)');
  t.ok(out.acked.length > 64, 'the client wrote across the migration');

  const landed = async (n: number): Promise<boolean> => {
    const b = await readAt(dst, n * BLOCK, BLOCK);
    const want = Buffer.alloc(8);
    want.writeBigUInt64LE(BigInt(n + 1));
    for (let i = 0; i < BLOCK; i += 8) if (!b.subarray(i, i + 8).equals(want)) return false;
    return true;
  };
  const lost: number[] = [];
  for (const n of out.acked) if (!(await landed(n))) lost.push(n);
  t.same(lost, [], 'every acknowledged write is on the target');
  const landedButFailed: string[] = [];
  for (const [n, errname] of Object.entries(out.failed)) if (await landed(Number(n))) landedButFailed.push(`${n}: ${errname}`);
  t.same(landedButFailed, [], 'no write that landed on the target was answered with an error');
  const handoff = srcSrv.logs.find((e) => e.event === 'connection-dropped' && e.reason === 'handoff');
  t.ok(handoff, 'the source logged the handoff of the connection', { diag: srcSrv.logs.filter((e) => /connection|cutover|handoff/.test(String(e.event))) });
  if (handoff) t.ok(Number(handoff.answered) > 0, `writes were in flight at the close (the case of the bug): ${handoff.answered} answered during the handoff`);
});
