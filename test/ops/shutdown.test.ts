// SIGTERM is bounded: clients attached (idle, busy, or stuck mid-request) never keep the
// server alive past --shutdown-timeout, and every write a client saw acknowledged is in the image.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { CMD_READ, CMD_WRITE, RawNbdClient } from '../helpers/rawclient.js';

const NBD_ESHUTDOWN = 108;
import { makeImage, MiB, serve, tmpDir, type ServerHandle, type Teardownable } from '../helpers/server.js';
import { requirePythonNbd, SYSTEM_PYTHON } from '../helpers/tools.js';

const BLOCK = 64 * 1024;
const IMAGE_SIZE = 64 * MiB;
const BLOCKS = IMAGE_SIZE / BLOCK;

/** Resolves with the exit status and how long after `since` the server exited; rejects after `limitMs`. */
function exitAfter(s: ServerHandle, since: number, limitMs = 20_000): Promise<{ code: number | null; ms: number }> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server was still running ${limitMs} ms after SIGTERM\n${s.stderr().slice(-4000)}`)), limitMs);
    const done = () => {
      clearTimeout(timer);
      resolve({ code: s.exited()!.code, ms: performance.now() - since });
    };
    if (s.exited()) done();
    else s.proc.once('exit', done);
  });
}

/** An idle client: handshake done, then silent. */
async function idleClient(t: Teardownable, s: ServerHandle): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect(s.newstylePort);
  t.teardown(() => c.destroy());
  await c.handshake('disk');
  return c;
}

// libnbd, 16 writes in flight, sequence-numbered blocks, until the server stops it. On the
// first error it stops submitting, waits for what is in flight and disconnects (NBD_CMD_DISC).
// Prints "running" once writes are being acknowledged, then JSON: acked [seq, block] pairs and errors.
const BUSY_WRITER = String.raw`
import nbd, sys, json, errno
uri, block, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
inflight = {}   # cookie -> (seq, blk, buf)
acked, errors = [], []
seq, announced, stop = 0, False, False
def payload(s):
    return (s.to_bytes(8, 'little') * (block // 8))
try:
    while True:
        while not stop and len(inflight) < 16:
            seq += 1
            blk = seq % blocks
            buf = payload(seq)
            c = h.aio_pwrite(buf, blk * block)
            inflight[c] = (seq, blk, buf)
        if not inflight:
            break
        c = h.aio_peek_command_completed()
        if c <= 0:
            h.poll(-1)
            continue
        s, blk, _ = inflight.pop(c)
        try:
            h.aio_command_completed(c)
            acked.append([s, blk])
            if not announced and len(acked) >= 200:
                announced = True
                print("running", flush=True)
        except nbd.Error as e:
            errors.append(e.errno or 'unknown: ' + str(e))
            stop = True
    try:
        h.shutdown()
    except nbd.Error:
        pass
except nbd.Error as e:
    errors.append(e.errno or 'connection: ' + str(e))
print(json.dumps({"acked": acked, "errors": errors}), flush=True)
`;

t.test('SIGTERM with an idle and a busy client attached: bounded exit, acknowledged writes on disk', async (t) => {
  await requirePythonNbd();
  const dir = await tmpDir(t);
  const image = await makeImage(path.join(dir, 'disk.img'), IMAGE_SIZE);
  const s = await serve(t, [image, '--name', 'disk', '--shutdown-timeout', '3']);

  const idle = await idleClient(t, s);
  await s.waitForLog((e) => e.event === 'transmission');

  const py = spawn(SYSTEM_PYTHON, ['-c', BUSY_WRITER, s.uri('disk'), String(BLOCK), String(BLOCKS)], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => py.kill('SIGKILL'));
  let stdout = '';
  let stderr = '';
  py.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  py.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const writer = new Promise<number | null>((resolve) => py.once('close', (code) => resolve(code)));
  const describeWriter = () => `writer stdout (tail): ${stdout.slice(-300)}\nwriter stderr: ${stderr.slice(-4000)}`;
  // Wait until the writer is really busy: its "running" line comes once 200 writes were acknowledged.
  await new Promise<void>((resolve, reject) => {
    const onData = () => {
      if (!stdout.startsWith('running\n')) return;
      py.stdout.off('data', onData);
      resolve();
    };
    py.stdout.on('data', onData);
    void writer.then(() => reject(new Error(`the writer ended before the server was stopped\n${describeWriter()}`)));
  });

  const sent = performance.now();
  s.proc.kill('SIGTERM');
  const exit = await exitAfter(s, sent);
  t.equal(exit.code, 0, 'clean exit');
  t.ok(exit.ms < 3000 + 4000, `exited within the shutdown timeout plus margin (${Math.round(exit.ms)} ms)`);
  t.ok(await idle.waitClosed(1000), 'the idle client was disconnected');

  const code = await writer;
  t.equal(code, 0, `the writer finished\n${describeWriter()}`);
  const out = JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as { acked?: [number, number][]; errors?: unknown[] };
  t.ok(out.acked && out.acked.length >= 200, `the writer got writes acknowledged\n${describeWriter()}`);
  // Writes not acknowledged either got NBD_ESHUTDOWN (they arrived while others were still in
  // flight) or were never read (the connection was closed once nothing was in flight): never EIO.
  const unexpected = (out.errors ?? []).filter((e) => !['ESHUTDOWN', 'ENOTCONN', 'ECONNRESET', 'EPIPE'].includes(e as string));
  t.same(unexpected, [], `writes left unacknowledged ended in ESHUTDOWN or a closed connection: ${JSON.stringify(out.errors)}`);

  // Every acknowledged write is in the image: each block holds its last acknowledged sequence
  // number, or a later one (a write in flight at the end may have landed unacknowledged).
  const lastAcked = new Map<number, number>();
  for (const [seq, blk] of out.acked!) lastAcked.set(blk, Math.max(seq, lastAcked.get(blk) ?? 0));
  const fd = fs.openSync(image, 'r');
  const buf = Buffer.alloc(BLOCK);
  let bad = 0;
  const examples: string[] = [];
  try {
    for (const [blk, seq] of lastAcked) {
      fs.readSync(fd, buf, 0, BLOCK, blk * BLOCK);
      const stored = Number(buf.readBigUInt64LE(0));
      const uniform = buf.equals(Buffer.alloc(BLOCK, buf.subarray(0, 8)));
      if (!uniform || stored < seq) {
        bad++;
        if (examples.length < 5) examples.push(`block ${blk}: acked seq ${seq}, image holds ${stored}${uniform ? '' : ' (torn)'}`);
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  t.equal(bad, 0, `all ${lastAcked.size} acknowledged blocks are on disk ${examples.join('; ')}`);
  t.ok(s.logs.some((e) => e.event === 'shutdown-draining'), 'the drain was logged');
});

t.test('SIGTERM: in-flight requests finish, new ones get NBD_ESHUTDOWN, a request that never completes is cut off after --shutdown-timeout', async (t) => {
  const dir = await tmpDir(t);
  const image = await makeImage(path.join(dir, 'disk.img'), 8 * MiB);
  const s = await serve(t, [image, '--name', 'disk', '--shutdown-timeout', '2']);
  // A WRITE whose payload stops half way and never resumes: in flight until the server gives up on it.
  const stuck = await idleClient(t, s);
  await stuck.sendRequest({ type: CMD_WRITE, handle: 1n, offset: 0n, length: MiB }, Buffer.alloc(MiB / 2, 0x11));
  // A WRITE whose payload is completed once shutdown has begun, followed at once by a READ.
  const late = await idleClient(t, s);
  const PART = 32 * 1024;
  await late.sendRequest({ type: CMD_WRITE, handle: 2n, offset: BigInt(2 * MiB), length: PART }, Buffer.alloc(PART / 2, 0x22));
  const idle = await idleClient(t, s);
  await s.waitForLog((e) => e.event === 'transmission' && s.logs.filter((l) => l.event === 'transmission').length === 3);

  const sent = performance.now();
  s.proc.kill('SIGTERM');
  await s.waitForLog((e) => e.event === 'shutdown-draining');
  t.ok(await idle.waitClosed(1500), 'the idle client is disconnected at once, not after the timeout');

  await late.write(Buffer.concat([Buffer.alloc(PART / 2, 0x22), RawNbdClient.encodeRequest({ type: CMD_READ, handle: 3n, offset: 0n, length: 512 })]));
  const replies = [await late.readSimpleReply(), await late.readSimpleReply()];
  const byHandle = new Map(replies.map((r) => [r.handle, r.error]));
  t.equal(byHandle.get(2n), 0, 'the WRITE in flight when shutdown began completed');
  t.equal(byHandle.get(3n), NBD_ESHUTDOWN, 'the READ sent during shutdown got NBD_ESHUTDOWN');
  t.ok(await late.waitClosed(1500), 'and the connection was closed once nothing was in flight');

  const exit = await exitAfter(s, sent);
  t.equal(exit.code, 0, 'clean exit');
  t.ok(exit.ms >= 1900, `the stuck request was given the shutdown timeout (${Math.round(exit.ms)} ms)`);
  t.ok(exit.ms < 2000 + 4000, `exited within the shutdown timeout plus margin (${Math.round(exit.ms)} ms)`);
  const timeout = s.logs.find((e) => e.event === 'shutdown-timeout');
  t.ok(timeout, 'the forced close was logged');
  t.equal(timeout?.connections, 1, 'only the stuck connection was left to close');
  t.ok(await stuck.waitClosed(1000), 'the stuck client was disconnected');
  const data = fs.readFileSync(image).subarray(2 * MiB, 2 * MiB + PART);
  t.ok(data.equals(Buffer.alloc(PART, 0x22)), 'the acknowledged write is in the image');
});

t.test('--shutdown-timeout is checked and appears in the config file too', async (t) => {
  const { parseConfig } = await import('../../src/cli/config.js');
  t.equal(parseConfig({ shutdownTimeout: 4 }, 'c.json', '/').shutdownTimeout, 4);
  t.throws(() => parseConfig({ shutdownTimeout: -1 }, 'c.json', '/'), /c\.json\.shutdownTimeout: expected a number of seconds/);
});
