// Session handoff (--handoff disconnect), in process with a raw client: once
// the handoff begins nothing new is read, a WRITE whose payload is arriving
// is read to its end, every request read is completed and answered (writes
// held by the device among them), and only then is the connection closed. A
// request sent after the handoff began is neither answered nor applied.
import t from 'tap';
import { Export, ExportRegistry } from '../../../src/server/export.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../../../src/server/server.js';
import { MemoryDevice } from '../../helpers/memory-device.js';
import { CMD_WRITE, RawNbdClient } from '../../helpers/rawclient.js';

const BLOCK = 4096;

t.test('handoff: held and half-received writes are answered, nothing read after the handoff began', async (t) => {
  // Writes are held until `release` (as the cutover gate holds them); `held` resolves once the first is in.
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let seen!: () => void;
  const held = new Promise<void>((r) => (seen = r));
  const device = new MemoryDevice(1024 * 1024, {
    delay: (op) => {
      if (op !== 'write') return undefined;
      seen();
      return gate;
    },
  });
  const registry = new ExportRegistry();
  registry.add(new Export({ name: 'vm1', device }));
  const server = new NbdServer(registry, DEFAULT_SERVER_OPTIONS);
  const bound = await server.listenNewstyle('127.0.0.1', 0);
  t.teardown(() => server.close(1000));
  const c = await RawNbdClient.connect(bound.port!);
  t.teardown(() => c.destroy());
  await c.handshake('vm1');

  const a = Buffer.alloc(BLOCK, 0xa1);
  const b = Buffer.alloc(BLOCK, 0xb2);
  const d = Buffer.alloc(BLOCK, 0xc3);
  const hdr = (handle: bigint, offset: number) => RawNbdClient.encodeRequest({ type: CMD_WRITE, handle, offset: BigInt(offset), length: BLOCK });
  // A in full, B's header and half its payload, in one segment: the server reads both before A's write is held.
  await c.write(Buffer.concat([hdr(1n, 0), a, hdr(2n, BLOCK), b.subarray(0, BLOCK / 2)]));
  await held;
  const handedOff = server.handOffExport('vm1', 5000);
  // The rest of B's payload, then C: B is finished, C is never read.
  await c.write(Buffer.concat([b.subarray(BLOCK / 2), hdr(3n, 2 * BLOCK), d]));
  release();
  const replies = [await c.readSimpleReply(), await c.readSimpleReply()];
  t.same(replies.map((r) => [r.handle, r.error]).sort(), [[1n, 0], [2n, 0]], 'the held write and the half-received one are answered, with success');
  t.ok(await c.waitClosed(5000), 'then the connection is closed');
  t.equal(await handedOff, 1, 'one connection handed off');
  const got = async (off: number) => {
    const buf = Buffer.alloc(BLOCK);
    await device.read(off, BLOCK, buf, 0);
    return buf;
  };
  t.ok((await got(0)).equals(a), 'A is on the device');
  t.ok((await got(BLOCK)).equals(b), 'B is on the device');
  t.ok((await got(2 * BLOCK)).equals(Buffer.alloc(BLOCK)), 'C, sent after the handoff began, was not applied');
});
