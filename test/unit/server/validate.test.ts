// validateRequest on its own: one test per rule, and the order between rules.
import t from 'tap';
import * as C from '../../../src/protocol/constants.js';
import { validateRequest, type RequestContext } from '../../../src/server/validate.js';
import { NBD_CMD_MIGRATE_COMPLETE, NBD_CMD_MIGRATE_RELEASE } from '../../../src/migration/incoming.js';

const SIZE = 1 << 20;
const ALL_FLAGS =
  C.NBD_FLAG_HAS_FLAGS |
  C.NBD_FLAG_SEND_FLUSH |
  C.NBD_FLAG_SEND_FUA |
  C.NBD_FLAG_SEND_TRIM |
  C.NBD_FLAG_SEND_WRITE_ZEROES |
  C.NBD_FLAG_SEND_FAST_ZERO |
  C.NBD_FLAG_SEND_CACHE |
  C.NBD_FLAG_SEND_DF;

/** A writable 1 MiB export over structured replies with base:allocation, every feature offered. */
const ctx = (over: Partial<RequestContext> = {}): RequestContext => ({
  transmissionFlags: ALL_FLAGS,
  structuredReplies: true,
  exportName: 'disk',
  readOnly: false,
  size: SIZE,
  metaContexts: 1,
  // The incoming migration's commands, as an export receiving one offers them; this connection named no job.
  extraCommands: new Map([[NBD_CMD_MIGRATE_COMPLETE, false], [NBD_CMD_MIGRATE_RELEASE, false]]),
  shuttingDown: false,
  ...over,
});
const req = (type: number, flags = 0, offset = 0, length = 4096) => ({ type, flags, offset, length });
const errorOf = (r: ReturnType<typeof validateRequest>) => (r ? (C.NBD_ERROR_NAMES[r.error] ?? r.error) : 'ok');

t.test('every command with a valid range and no flags passes', async (t) => {
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS])
    t.equal(validateRequest(req(type), ctx()), undefined, C.COMMAND_NAMES[type]!);
  t.equal(validateRequest(req(C.NBD_CMD_FLUSH, 0, 0, 0), ctx()), undefined, 'FLUSH');
  t.equal(validateRequest(req(C.NBD_CMD_READ, 0, SIZE - 4096, 4096), ctx()), undefined, 'READ of the last block');
  t.equal(validateRequest(req(C.NBD_CMD_READ, 0, SIZE, 0), ctx()), undefined, 'zero-length READ at the end');
});

t.test('unknown commands are EINVAL', async (t) => {
  for (const type of [8, 9, 0x4e4c, 0xffff]) {
    const r = validateRequest(req(type), ctx());
    t.equal(errorOf(r), 'EINVAL', `command ${type}`);
    t.equal(r?.message, `unknown command ${type}`);
  }
});

t.test('flags each command takes', async (t) => {
  const cases: Array<[number, number, boolean]> = [
    [C.NBD_CMD_READ, C.NBD_CMD_FLAG_FUA, true],
    [C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF, true],
    [C.NBD_CMD_READ, C.NBD_CMD_FLAG_NO_HOLE, false],
    [C.NBD_CMD_READ, C.NBD_CMD_FLAG_REQ_ONE, false],
    [C.NBD_CMD_READ, C.NBD_CMD_FLAG_FAST_ZERO, false],
    [C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_FUA, true],
    [C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_DF, false],
    [C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_NO_HOLE, false],
    [C.NBD_CMD_TRIM, C.NBD_CMD_FLAG_FUA, true],
    [C.NBD_CMD_TRIM, C.NBD_CMD_FLAG_NO_HOLE, false],
    [C.NBD_CMD_CACHE, C.NBD_CMD_FLAG_FUA, true],
    [C.NBD_CMD_CACHE, C.NBD_CMD_FLAG_DF, false],
    [C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO, true],
    [C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_DF, false],
    [C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_REQ_ONE, false],
    [C.NBD_CMD_BLOCK_STATUS, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_REQ_ONE, true],
    [C.NBD_CMD_BLOCK_STATUS, C.NBD_CMD_FLAG_NO_HOLE, false],
    [C.NBD_CMD_READ, 1 << 15, false],
  ];
  for (const [type, flags, ok] of cases) {
    const r = validateRequest(req(type, flags), ctx());
    t.equal(errorOf(r), ok ? 'ok' : 'EINVAL', `${C.COMMAND_NAMES[type]} flags 0x${flags.toString(16)}`);
    if (!ok) t.equal(r?.message, `flags 0x${flags.toString(16)} not valid for ${C.COMMAND_NAMES[type]}`);
  }
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_FLUSH, C.NBD_CMD_FLAG_FUA, 0, 0), ctx())), 'ok', 'FLUSH takes FUA');
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_FLUSH, C.NBD_CMD_FLAG_DF, 0, 0), ctx())), 'EINVAL', 'FLUSH takes no DF');
});

t.test('flags that depend on what was negotiated', async (t) => {
  const noFua = ctx({ transmissionFlags: ALL_FLAGS & ~C.NBD_FLAG_SEND_FUA });
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS])
    t.equal(errorOf(validateRequest(req(type, C.NBD_CMD_FLAG_FUA), noFua)), 'EINVAL', `${C.COMMAND_NAMES[type]}: FUA without SEND_FUA`);
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_FLUSH, C.NBD_CMD_FLAG_FUA, 0, 0), noFua)), 'EINVAL', 'FLUSH: FUA without SEND_FUA');

  const noFast = ctx({ transmissionFlags: ALL_FLAGS & ~C.NBD_FLAG_SEND_FAST_ZERO });
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_FAST_ZERO), noFast)), 'EINVAL', 'FAST_ZERO without SEND_FAST_ZERO');
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_FLAG_NO_HOLE), noFast)), 'ok', 'NO_HOLE needs no negotiation');

  const simple = ctx({ structuredReplies: false });
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_READ, C.NBD_CMD_FLAG_DF), simple)), 'EINVAL', 'DF without structured replies');
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_READ, C.NBD_CMD_FLAG_FUA), simple)), 'ok', 'FUA on READ with simple replies');
});

t.test('a read-only export refuses the commands that write with EPERM', async (t) => {
  const ro = ctx({ readOnly: true });
  for (const type of [C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES]) {
    const r = validateRequest(req(type), ro);
    t.equal(errorOf(r), 'EPERM', C.COMMAND_NAMES[type]!);
    t.equal(r?.message, 'export "disk" is read-only');
  }
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS])
    t.equal(errorOf(validateRequest(req(type), ro)), 'ok', `${C.COMMAND_NAMES[type]} on a read-only export`);
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_FLUSH, 0, 0, 0), ro)), 'ok', 'FLUSH on a read-only export');
});

t.test('READ and WRITE payloads are bounded by the maximum block size', async (t) => {
  const big = ctx({ size: 2 * C.MAX_PAYLOAD });
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE]) {
    t.equal(errorOf(validateRequest(req(type, 0, 0, C.MAX_PAYLOAD), big)), 'ok', `${C.COMMAND_NAMES[type]} of the maximum`);
    const r = validateRequest(req(type, 0, 0, C.MAX_PAYLOAD + 1), big);
    t.equal(errorOf(r), 'EINVAL', `${C.COMMAND_NAMES[type]} one byte over`);
    t.equal(r?.message, `${C.MAX_PAYLOAD + 1} bytes is over the ${C.MAX_PAYLOAD}-byte maximum block size`);
  }
  for (const type of [C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS])
    t.equal(errorOf(validateRequest(req(type, 0, 0, C.MAX_PAYLOAD + 1), big)), 'ok', `${C.COMMAND_NAMES[type]} carries no payload: no bound`);
});

t.test('a range past the end: ENOSPC for writes of data, EINVAL for the rest', async (t) => {
  const expect: Array<[number, string]> = [
    [C.NBD_CMD_WRITE, 'ENOSPC'],
    [C.NBD_CMD_WRITE_ZEROES, 'ENOSPC'],
    [C.NBD_CMD_READ, 'EINVAL'],
    [C.NBD_CMD_TRIM, 'EINVAL'],
    [C.NBD_CMD_CACHE, 'EINVAL'],
    [C.NBD_CMD_BLOCK_STATUS, 'EINVAL'],
  ];
  for (const [type, error] of expect) {
    const r = validateRequest(req(type, 0, SIZE - 4096, 4097), ctx());
    t.equal(errorOf(r), error, `${C.COMMAND_NAMES[type]} one byte past the end`);
    t.equal(r?.message, `range ${SIZE - 4096}+4097 is beyond the end of the ${SIZE}-byte export`);
    t.equal(errorOf(validateRequest(req(type, 0, SIZE + 1, 0), ctx())), error, `${C.COMMAND_NAMES[type]} starting past the end`);
  }
  // An offset beyond 2^53 decodes as Infinity (codec.decodeRequestHeader): out of range, never a wrap.
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_READ, 0, Number.POSITIVE_INFINITY, 1), ctx())), 'EINVAL', 'offset beyond 2^53');
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_FLUSH, 0, SIZE * 4, 4096), ctx())), 'ok', 'FLUSH ignores its range');
});

t.test('BLOCK_STATUS needs a context and a length', async (t) => {
  const r = validateRequest(req(C.NBD_CMD_BLOCK_STATUS), ctx({ metaContexts: 0 }));
  t.equal(errorOf(r), 'EINVAL');
  t.equal(r?.message, 'no metadata context was negotiated');
  const z = validateRequest(req(C.NBD_CMD_BLOCK_STATUS, 0, 0, 0), ctx());
  t.equal(errorOf(z), 'EINVAL');
  t.equal(z?.message, 'block status of zero length');
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_BLOCK_STATUS), ctx({ metaContexts: 3 }))), 'ok', 'several contexts');
});

t.test("nbd-migrate's own commands exist only with the incoming job context", async (t) => {
  for (const type of [NBD_CMD_MIGRATE_COMPLETE, NBD_CMD_MIGRATE_RELEASE]) {
    const r = validateRequest(req(type, 0, 0, 0), ctx());
    t.equal(errorOf(r), 'EINVAL', `${C.COMMAND_NAMES[type] ?? type} without the job context`);
    t.equal(r?.message, `unknown command ${type}`, 'looks like any unknown command');
    t.equal(errorOf(validateRequest(req(type, 0, 0, 0), ctx({ extraCommands: new Map([[type, true]]) }))), 'ok', `${type} with the job context`);
    t.equal(errorOf(validateRequest(req(type, C.NBD_CMD_FLAG_FUA, 0, 0), ctx({ extraCommands: new Map([[type, true]]) }))), 'EINVAL', `${type} takes no flags`);
  }
});

t.test('shutdown refuses every request with ESHUTDOWN', async (t) => {
  const down = ctx({ shuttingDown: true });
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_FLUSH, C.NBD_CMD_BLOCK_STATUS, 99]) {
    const r = validateRequest(req(type), down);
    t.equal(errorOf(r), 'ESHUTDOWN', `command ${type}`);
    t.equal(r?.message, 'the server is shutting down');
  }
});

t.test('order: the first rule broken decides the error', async (t) => {
  const ro = ctx({ readOnly: true });
  // shutdown before everything
  t.equal(errorOf(validateRequest(req(99, 0xffff, SIZE * 2, 1), ctx({ shuttingDown: true }))), 'ESHUTDOWN', 'shutdown first');
  // flags before read-only: a bad flag on a write to a read-only export
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_DF), ro)), 'EINVAL', 'flags before read-only');
  // read-only before the range: a write past the end of a read-only export
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_WRITE, 0, SIZE, 4096), ro)), 'EPERM', 'read-only before range');
  // size before the range: an oversized write past the end
  const over = validateRequest(req(C.NBD_CMD_WRITE, 0, SIZE, C.MAX_PAYLOAD + 1), ctx());
  t.equal(errorOf(over), 'EINVAL', 'payload bound before range');
  t.match(over?.message, /maximum block size/);
  // range before the context checks
  t.equal(errorOf(validateRequest(req(C.NBD_CMD_BLOCK_STATUS, 0, SIZE, 4096), ctx({ metaContexts: 0 }))), 'EINVAL');
  t.match(validateRequest(req(C.NBD_CMD_BLOCK_STATUS, 0, SIZE, 4096), ctx({ metaContexts: 0 }))?.message, /beyond the end/, 'range before contexts');
  const mig = validateRequest(req(NBD_CMD_MIGRATE_COMPLETE, 0, SIZE, 4096), ctx());
  t.match(mig?.message, /beyond the end/, 'range before the job context');
});
