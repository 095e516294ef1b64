// Replies read the way a plain socket reads them (transport.ts, `onread`): into one reused
// scratch buffer that is overwritten after every read, or, for the rest of a READ's data,
// straight into the caller's buffer. Large and many small replies, split at every boundary.
import t from 'tap';
import fc from 'fast-check';
import * as net from 'node:net';
import { once } from 'node:events';
import * as C from '../../../src/protocol/constants.js';
import * as codec from '../../../src/protocol/codec.js';
import { ByteQueue } from '../../../src/util/byte-queue.js';
import { PendingRequest, ReplyParser } from '../../../src/client/replies.js';
import { Transport } from '../../../src/client/transport.js';
import { ck, chunk, u64, u32 } from '../../helpers/wire.js';
import { tcpPair } from '../../helpers/net.js';

const DONE = C.NBD_REPLY_FLAG_DONE;

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff || 1;
  return b;
}

/** One request and the reply the server sends for it. */
interface Case {
  type: number;
  offset: number;
  length: number;
  /** What the READ buffer must hold afterwards. */
  expect?: Buffer;
  errno?: number;
  wire: Buffer[];
}

/** A READ of `length` answered by `pieces` content chunks (data or hole, alternating from `hole`), or a simple reply. */
function readCase(cookie: number, length: number, pieces: number, hole: boolean, structured: boolean): Case {
  const offset = cookie * 1 << 20;
  const data = pattern(length, cookie);
  if (!structured) return { type: C.NBD_CMD_READ, offset, length, expect: data, wire: [codec.encodeSimpleReply(0, ck(cookie)), data] };
  const expect = Buffer.from(data);
  const wire: Buffer[] = [];
  const n = Math.max(1, Math.min(pieces, length));
  const step = Math.ceil(length / n);
  for (let i = 0, at = 0; at < length; i++, at += step) {
    const len = Math.min(step, length - at);
    const flags = at + len >= length ? DONE : 0;
    if (hole && i % 2 === 0) {
      expect.fill(0, at, at + len);
      wire.push(chunk(flags, C.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, Buffer.concat([u64(offset + at), u32(len)])));
    } else wire.push(chunk(flags, C.NBD_REPLY_TYPE_OFFSET_DATA, cookie, Buffer.concat([u64(offset + at), data.subarray(at, at + len)])));
  }
  return { type: C.NBD_CMD_READ, offset, length, expect, wire };
}
function flushCase(cookie: number, structured: boolean, errno = 0): Case {
  if (structured && errno !== 0) {
    const m = Buffer.from('no space left');
    const head = Buffer.alloc(6);
    head.writeUInt32BE(errno, 0);
    head.writeUInt16BE(m.length, 4);
    return { type: C.NBD_CMD_FLUSH, offset: 0, length: 0, errno, wire: [chunk(DONE, C.NBD_REPLY_TYPE_ERROR, cookie, Buffer.concat([head, m]))] };
  }
  if (structured) return { type: C.NBD_CMD_FLUSH, offset: 0, length: 0, wire: [chunk(DONE, C.NBD_REPLY_TYPE_NONE, cookie, Buffer.alloc(0))] };
  return { type: C.NBD_CMD_FLUSH, offset: 0, length: 0, errno: errno || undefined, wire: [codec.encodeSimpleReply(errno, ck(cookie))] };
}

/** Feeds `stream` the way the transport's onread path does; returns how many reads landed in place. */
function feed(parser: ReplyParser, stream: Buffer, readSizes: number[], scratchBytes: number, directMin: number): number {
  const scratch = Buffer.alloc(scratchBytes);
  let pos = 0;
  let i = 0;
  let inPlace = 0;
  while (pos < stream.length) {
    const target = parser.directTarget(directMin) ?? scratch;
    const want = readSizes.length > 0 ? readSizes[i++ % readSizes.length]! : Infinity;
    const n = Math.min(target.length, want, stream.length - pos);
    stream.copy(target, 0, pos, pos + n);
    pos += n;
    if (target === scratch) {
      parser.pushTransient(scratch.subarray(0, n));
      scratch.fill(0xa5); // the next read reuses it: nothing parsed later may come from here
    } else {
      parser.landed(n);
      inPlace++;
    }
  }
  return inPlace;
}

function run(cases: Case[], structured: boolean, readSizes: number[], scratchBytes: number, directMin: number) {
  const reqs = cases.map((c, i) => {
    const into = c.type === C.NBD_CMD_READ ? Buffer.alloc(c.length + 3, 0xee) : undefined;
    const r = new PendingRequest(c.type, 0, c.offset, c.length, 0, undefined, into, 3, () => {});
    r.cookie = i + 1;
    return r;
  });
  const map = new Map(reqs.map((r) => [r.cookie, r]));
  const done: number[] = [];
  const parser = new ReplyParser(structured, {
    lookup: (c) => map.get(c),
    done: (r) => {
      map.delete(r.cookie);
      done.push(r.cookie);
    },
  });
  const stream = Buffer.concat(cases.flatMap((c) => c.wire));
  const inPlace = feed(parser, stream, readSizes, scratchBytes, directMin);
  return { reqs, done, inPlace, idle: parser.idle, stream };
}

function check(cases: Case[], r: ReturnType<typeof run>): string | undefined {
  if (!r.idle) return 'parser not idle at the end';
  if (r.done.length !== cases.length) return `${r.done.length} of ${cases.length} replies completed`;
  for (let i = 0; i < cases.length; i++) {
    const c = cases[i]!;
    const q = r.reqs[i]!;
    if ((q.error?.nbdErrno ?? undefined) !== c.errno) return `reply ${i + 1}: error ${q.error?.nbdErrno} expected ${c.errno}`;
    if (c.expect) {
      if (!q.into!.subarray(0, 3).equals(Buffer.alloc(3, 0xee))) return `reply ${i + 1}: bytes before the READ's place were written`;
      if (!q.into!.subarray(3).equals(c.expect)) return `reply ${i + 1}: READ data differs`;
      if (q.type === C.NBD_CMD_READ && !q.simple && !q.fullyCovered) return `reply ${i + 1}: not fully covered`;
    }
  }
  return undefined;
}

const caseArb = (structured: boolean) =>
  fc.oneof(
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('big' as const), length: fc.integer({ min: 16 * 1024, max: 160 * 1024 }), pieces: fc.integer({ min: 1, max: 4 }), hole: fc.boolean() }) },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('small' as const), length: fc.integer({ min: 1, max: 700 }), pieces: fc.integer({ min: 1, max: 3 }), hole: fc.boolean() }) },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('flush' as const), errno: fc.constantFrom(0, 0, C.NBD_ENOSPC) }) },
  ).map((spec) => (cookie: number): Case =>
    spec.kind === 'flush' ? flushCase(cookie, structured, spec.errno) : readCase(cookie, spec.length, spec.pieces, spec.hole, structured),
  );

for (const structured of [true, false]) {
  const mode = structured ? 'structured' : 'simple';

  t.test(`${mode}: a mixed stream parses the same at every single split point`, async (t) => {
    const cases = [
      readCase(1, 3000, 3, true, structured),
      flushCase(2, structured),
      readCase(3, 40, 2, false, structured),
      flushCase(4, structured, C.NBD_ENOSPC),
      readCase(5, 2500, 1, false, structured),
      flushCase(6, structured),
    ];
    const total = Buffer.concat(cases.flatMap((c) => c.wire)).length;
    let bad: string | undefined;
    let sawInPlace = 0;
    for (let cut = 1; cut < total && !bad; cut++) {
      // Reads of `cut` bytes, then of everything else the scratch buffer holds.
      const r = run(cases, structured, [cut, 1 << 30], 8192, 256);
      bad = check(cases, r);
      if (bad) bad = `cut at ${cut}: ${bad}`;
      sawInPlace += r.inPlace > 0 ? 1 : 0;
    }
    t.equal(bad, undefined, `all ${total - 1} split points`);
    t.ok(sawInPlace > 0, 'READ data was read in place for some splits');
    const tiny = run(cases, structured, [1], 8192, 256);
    t.equal(check(cases, tiny), undefined, 'one byte per read');
    const small = run(cases, structured, [1 << 30], 7, 256);
    t.equal(check(cases, small), undefined, 'a scratch buffer smaller than a header');
  });

  t.test(`${mode}: large and many small replies, arbitrary reads (fast-check)`, async (t) => {
    fc.assert(
      fc.property(
        fc.array(caseArb(structured), { minLength: 1, maxLength: 40 }),
        fc.array(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 1, max: 70_000 })), { minLength: 1, maxLength: 20 }),
        fc.constantFrom(64, 4096, 64 * 1024),
        fc.constantFrom(1, 512, 16 * 1024),
        (makers, reads, scratch, directMin) => {
          const cases = makers.map((m, i) => m(i + 1));
          const r = run(cases, structured, reads, scratch, directMin);
          const bad = check(cases, r);
          if (bad) throw new Error(bad);
        },
      ),
      { numRuns: 150 },
    );
    // A 4 MiB READ arrives mostly in place: after the header, the rest lands in the caller's buffer.
    const big = [readCase(1, 4 << 20, 1, false, structured), flushCase(2, structured)];
    const r = run(big, structured, [], 64 * 1024, 16 * 1024);
    t.equal(check(big, r), undefined, '4 MiB read');
    t.equal(r.inPlace, 1, 'one in-place read for the rest of the 4 MiB');
  });
}

t.test('a Transport on a plain socket reads through onread and gets replies split anywhere', async (t) => {
  const { client, peer: server } = await tcpPair(t);
  let transport: Transport | undefined;
  t.teardown(() => transport?.destroy());
  server.setNoDelay(true);
  let hookCalls = 0;
  client.on('data', () => hookCalls++); // a 'data' listener of the dialled socket (TCP_QUICKACK's) still runs once per read
  const q = new ByteQueue();
  const headers: codec.RequestHeader[] = [];
  let wake: (() => void) | undefined;
  server.on('data', (b: Buffer) => {
    q.push(b);
    while (q.length >= C.REQUEST_HEADER_LENGTH) headers.push(codec.decodeRequestHeader(q.take(C.REQUEST_HEADER_LENGTH)));
    wake?.();
  });
  transport = new Transport(client, true, [], { maxInflightRequests: 256, maxInflightBytes: 1 << 28, requestTimeoutMs: 0 }, 'nbd://test/', () => {});
  t.ok((transport as unknown as { scratch?: Buffer }).scratch, 'the plain socket was moved onto onread');

  const cases: Case[] = [readCase(1, 3 << 20, 2, false, true)];
  for (let i = 2; i <= 200; i++) cases.push(i % 3 === 0 ? flushCase(i, true) : readCase(i, 1 + ((i * 97) % 3000), 1 + (i % 3), i % 2 === 0, true));
  cases.push(readCase(201, 1 << 20, 3, true, true));
  const intos = cases.map((c) => (c.type === C.NBD_CMD_READ ? Buffer.alloc(c.length, 0xee) : undefined));
  const results = cases.map((c, i) =>
    transport!.operation(() => transport!.submit(c.type, 0, c.offset, c.length, intos[i] ? { into: intos[i] } : {})).then(
      () => undefined,
      (e: Error) => e,
    ),
  );
  while (headers.length < cases.length) await new Promise<void>((resolve) => (wake = resolve));
  // The whole reply stream, written in pieces of odd sizes, each flushed before the next.
  const stream = Buffer.concat(cases.flatMap((c) => c.wire));
  const sizes = [1, 7, 16, 17, 33, 4095, 65537, 100_000, 3];
  for (let pos = 0, i = 0; pos < stream.length; i++) {
    const n = Math.min(sizes[i % sizes.length]!, stream.length - pos);
    if (!server.write(stream.subarray(pos, pos + n))) await once(server, 'drain');
    pos += n;
    if (i % 50 === 0) await new Promise<void>((resolve) => setImmediate(resolve));
  }
  const settled = await Promise.all(results);
  for (let i = 0; i < cases.length; i++) {
    if (settled[i]) {
      t.fail(`request ${i + 1} failed: ${settled[i]!.message}`);
      break;
    }
    if (cases[i]!.expect && !intos[i]!.equals(cases[i]!.expect!)) {
      t.fail(`request ${i + 1}: READ data differs`);
      break;
    }
  }
  t.pass(`${cases.length} replies (${stream.length} bytes) settled with the right data`);
  t.ok(hookCalls > 0, 'the dialled socket\'s data listener ran on reads');
  await transport.close();
  t.equal(transport.state.kind, 'CLOSED');
});
