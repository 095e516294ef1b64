// An export replaced while a client negotiates (src/server/handshake.ts): a post-copy
// hand-over swaps the export under its name. A client that met the old export (listed or
// chose its metadata contexts) must not enter transmission with the new one holding what it
// learnt of the old: its next option naming the export is refused, and a fresh connection
// meets the new export alone.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import { Export, ExportRegistry } from '../../../src/server/export.js';
import { DEFAULT_SERVER_OPTIONS, NbdServer } from '../../../src/server/server.js';
import { MemoryDevice } from '../../helpers/memory-device.js';
import { RawNbdClient } from '../../helpers/rawclient.js';

const SIZE = 1024 * 1024;

async function negotiating(t: Tap.Test) {
  const registry = new ExportRegistry();
  registry.add(new Export({ name: 'vm1', device: new MemoryDevice(SIZE) }));
  const server = new NbdServer(registry, DEFAULT_SERVER_OPTIONS);
  const bound = await server.listenNewstyle('127.0.0.1', 0);
  t.teardown(() => server.close(1000));
  const open = async () => {
    const c = await RawNbdClient.connect(bound.port!);
    t.teardown(() => c.destroy());
    await c.readGreeting();
    await c.sendClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);
    await c.sendOption(C.NBD_OPT_STRUCTURED_REPLY);
    t.equal((await c.readOptionReply()).type, C.NBD_REP_ACK, 'structured replies');
    return c;
  };
  const replace = () => {
    registry.remove('vm1');
    registry.add(new Export({ name: 'vm1', device: new MemoryDevice(SIZE) }));
  };
  /** Sends an option and reads its replies up to the last (ACK or an error). */
  const ask = async (c: RawNbdClient, opt: number, data: Buffer) => {
    await c.sendOption(opt, data);
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const r = await c.readOptionReply();
      replies.push(r);
      if (r.type === C.NBD_REP_ACK || (r.type & 0x80000000) !== 0) return replies;
    }
  };
  return { open, replace, ask };
}

const setContexts = codec.encodeMetaContextRequest('vm1', [C.BASE_ALLOCATION]);
const go = codec.encodeInfoRequest('vm1', []);
const last = (rs: Array<{ type: number; data: Buffer }>) => rs[rs.length - 1]!;

t.test('listed on the old export, then GO on the new one: GO refused, naming the change', async (t) => {
  const { open, replace, ask } = await negotiating(t);
  const c = await open();
  t.equal(last(await ask(c, C.NBD_OPT_LIST_META_CONTEXT, codec.encodeMetaContextRequest('vm1', []))).type, C.NBD_REP_ACK, 'listed');
  replace();
  const r = last(await ask(c, C.NBD_OPT_GO, go));
  t.equal(r.type, C.NBD_REP_ERR_POLICY, 'GO refused');
  t.match(r.data.toString(), /changed during this negotiation/);
});

t.test('contexts chosen on the old export: SET and GO on the new one refused', async (t) => {
  const { open, replace, ask } = await negotiating(t);
  const c = await open();
  t.equal(last(await ask(c, C.NBD_OPT_SET_META_CONTEXT, setContexts)).type, C.NBD_REP_ACK, 'chosen on the old export');
  replace();
  t.equal(last(await ask(c, C.NBD_OPT_SET_META_CONTEXT, setContexts)).type, C.NBD_REP_ERR_POLICY, 'SET refused');
  t.equal(last(await ask(c, C.NBD_OPT_GO, go)).type, C.NBD_REP_ERR_POLICY, 'GO refused');
});

t.test('a fresh connection after the replacement negotiates as usual', async (t) => {
  const { open, replace, ask } = await negotiating(t);
  replace();
  const c = await open();
  t.equal(last(await ask(c, C.NBD_OPT_SET_META_CONTEXT, setContexts)).type, C.NBD_REP_ACK);
  t.equal(last(await ask(c, C.NBD_OPT_GO, go)).type, C.NBD_REP_ACK, 'GO accepted');
});
