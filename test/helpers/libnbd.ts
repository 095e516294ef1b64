// Drive libnbd's Python bindings (Debian python3-libnbd, /usr/bin/python3)
// from the tests. A scenario is a snippet of Python that fills the dict `R`
// with observations; the TypeScript test makes the assertions.
//
// Available in the snippet:
//   A                      the JSON-decoded `args` object
//   R                      dict printed as JSON at the end
//   conn(uri, strict=0)    connected nbd.NBD handle (base:allocation requested);
//                          strict=0 turns libnbd's client-side checks off so
//                          that bad requests really reach the server
//   attempt(fn)            {'ok': True, 'value': ...} or
//                          {'ok': False, 'errnum', 'errname', 'msg'}; bytes
//                          values become {'len', 'sha256', 'head'}
//   extents(h, count, offset, flags=0)
//                          list of (length, flags) base:allocation extents
//   sha(data)              hex sha256 of bytes
//   close(*handles)        shutdown (ignoring errors of dead handles) and close

import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { describeRun, runPython } from './tools.js';

const PRELUDE = String.raw`
import nbd, errno, json, sys, os, hashlib
A = json.loads(sys.argv[1])
R = {}

def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()

def conn(uri, strict=0):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h

def attempt(fn):
    try:
        v = fn()
        if isinstance(v, (bytes, bytearray)):
            v = {'len': len(v), 'sha256': sha(v), 'head': bytes(v[:16]).hex()}
        return {'ok': True, 'value': v}
    except nbd.Error as e:
        return {'ok': False, 'errnum': e.errnum, 'errname': errno.errorcode.get(e.errnum), 'msg': e.string}

def close(*hs):
    # Polite disconnect; a handle that is already dead is left to the GC.
    for h in hs:
        try:
            h.shutdown()
        except nbd.Error:
            pass

def extents(h, count, offset, flags=0):
    got = []
    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            e = list(entries)
            got.append([off, [[e[i], e[i + 1]] for i in range(0, len(e), 2)]])
        return 0
    h.block_status(count, offset, cb, flags=flags)
    return got
`;

const EPILOGUE = String.raw`
print('@@RESULT@@' + json.dumps(R))
`;

/** The outcome of one libnbd call, as recorded by attempt(). */
export type Attempt =
  | { ok: true; value: unknown }
  | { ok: false; errnum: number; errname: string | null; msg: string };

/** Run a scenario and return R. Throws (with full output) if Python fails. */
export async function libnbdScenario<T = Record<string, unknown>>(
  body: string,
  args: Record<string, unknown>,
  timeoutMs = 120_000,
): Promise<T> {
  const script = `${PRELUDE}\n${dedent(body)}\n${EPILOGUE}`;
  const r = await runPython(script, [JSON.stringify(args)], { timeoutMs });
  const line = r.stdout.split('\n').find((l) => l.startsWith('@@RESULT@@'));
  if (r.code !== 0 || line === undefined) {
    throw new Error(`libnbd scenario failed: ${describeRun({ ...r, args: ['-', '<args>'] })}`);
  }
  return JSON.parse(line.slice('@@RESULT@@'.length)) as T;
}

function dedent(s: string): string {
  const lines = s.replace(/^\n/, '').split('\n');
  const indents = lines.filter((l) => l.trim()).map((l) => /^ */.exec(l)![0].length);
  const n = indents.length ? Math.min(...indents) : 0;
  return lines.map((l) => l.slice(n)).join('\n');
}

/** sha256 (hex) of a file region, to compare with Python's sha(). */
export async function fileSha(path: string, offset = 0, length?: number): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    const end = length === undefined ? size : Math.min(size, offset + length);
    const h = createHash('sha256');
    const buf = Buffer.alloc(4 * 1024 * 1024);
    for (let pos = offset; pos < end; ) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - pos), pos);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return h.digest('hex');
  } finally {
    await fh.close();
  }
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}
