/**
 * The admin socket: a Unix socket (mode 0600) speaking newline-delimited JSON.
 * Each request line is an object with "cmd" and arguments, and an optional
 * "id" echoed in the reply:
 *   -> {"id":1,"cmd":"mirror","export":"vm1","target":"nbd://dst/vm1","cutover":"manual"}
 *   <- {"id":1,"ok":true,"result":{...job status...}}
 *   <- {"id":1,"ok":false,"error":{"code":"EUNREACHABLE","message":"..."}}
 * A malformed line or unknown command gets an error reply; nothing it sends can
 * harm a running job. Lines are bounded (64 KiB): a longer one closes the connection.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { errorCode, NbdMigrateError } from '../util/errors.js';
import { logger } from '../util/log.js';

export type Handler = (args: Record<string, unknown>) => unknown;

const MAX_LINE = 64 * 1024;
/** Distinguishes the private bind names of admin servers in one process. */
let tmpSeq = 0;
const log = logger({ component: 'admin' });

/** The admin socket could not be set up or reached, or (refused) the server answered a request with an error. */
export class AdminError extends NbdMigrateError {
  override readonly name: string = 'AdminError';
  /** The server answered with this error (as opposed to: could not be reached, or no reply). */
  readonly refused: boolean;
  constructor(code: string, message: string, options?: { cause?: unknown; refused?: boolean }) {
    super(code, message, options);
    this.refused = options?.refused ?? false;
  }
}

export class AdminServer {
  private server: net.Server | undefined;
  private readonly clients = new Set<net.Socket>();
  /** The socket file this server created (dev/inode at bind), the only one close() may remove. */
  private created: { dev: number; ino: number } | undefined;

  constructor(
    readonly path: string,
    private readonly handlers: Readonly<Record<string, Handler>>,
  ) {}

  async listen(): Promise<void> {
    // Outside systemd (whose RuntimeDirectory makes it) the default's /run/nbd-migrate may not exist yet.
    fs.mkdirSync(path.dirname(this.path), { recursive: true, mode: 0o700 });
    await this.claimPath();
    const server = net.createServer((s) => this.accept(s));
    // Bound under a private name, then hard-linked into place: link() never replaces an existing
    // file, so a server that started meanwhile keeps its socket; and the unlink libuv does when the
    // server closes hits only the private name, never whatever then sits at this.path.
    const tmp = path.join(path.dirname(this.path), `.nbdm-${process.pid}-${tmpSeq++}`);
    fs.rmSync(tmp, { force: true });
    // Created 0600 from the start: the umask covers the window between bind and chmod.
    const old = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(tmp, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(old);
    }
    try {
      fs.linkSync(tmp, this.path);
    } catch (e) {
      await new Promise<void>((r) => server.close(() => r()));
      if ((e as { code?: string }).code === 'EEXIST') throw inUse(this.path);
      throw new AdminError(errorCode(e) ?? 'EIO', `cannot create the admin socket ${this.path}: ${(e as Error).message}`, { cause: e });
    } finally {
      fs.rmSync(tmp, { force: true });
    }
    fs.chmodSync(this.path, 0o600);
    const st = fs.statSync(this.path);
    this.created = { dev: st.dev, ino: st.ino };
    this.server = server;
    log.info('listening', { listener: 'admin', path: this.path });
  }

  /**
   * Makes way for our socket: nothing there is fine; a socket nobody answers on
   * (ECONNREFUSED) is a dead server's and is removed; a live server's socket,
   * or anything that is not a socket, stops startup.
   */
  private async claimPath(): Promise<void> {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(this.path);
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return;
      throw new AdminError(errorCode(e) ?? 'EIO', `cannot check the admin socket ${this.path}: ${(e as Error).message}`, { cause: e });
    }
    if (!st.isSocket()) throw new AdminError('EEXIST', `admin socket ${this.path} exists and is not a socket; refusing to replace it`);
    const refused = await new Promise<string | undefined>((resolve) => {
      const probe = net.connect(this.path);
      probe.once('connect', () => {
        probe.destroy();
        resolve(undefined);
      });
      probe.once('error', (e) => resolve((e as { code?: string }).code ?? 'EIO'));
    });
    if (refused === undefined) throw inUse(this.path);
    if (refused === 'ENOENT') return; // gone meanwhile
    if (refused !== 'ECONNREFUSED') throw new AdminError(refused, `cannot check the admin socket ${this.path}: connect failed with ${refused}`);
    log.info('stale-socket-removed', { path: this.path, cause: 'no server answers on it (ECONNREFUSED)' });
    fs.unlinkSync(this.path);
  }

  private accept(socket: net.Socket): void {
    this.clients.add(socket);
    socket.on('close', () => this.clients.delete(socket));
    socket.on('error', () => undefined);
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line) void this.handle(socket, line);
      }
      if (buf.length > MAX_LINE) {
        this.reply(socket, { ok: false, error: { code: 'E2BIG', message: `request line over ${MAX_LINE} bytes` } });
        socket.end();
      }
    });
  }

  private reply(socket: net.Socket, msg: object): void {
    if (!socket.destroyed) socket.write(JSON.stringify(msg) + '\n');
  }

  private async handle(socket: net.Socket, line: string): Promise<void> {
    let req: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(line);
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('expected a JSON object');
      req = parsed as Record<string, unknown>;
    } catch (e) {
      this.reply(socket, { ok: false, error: { code: 'EBADMSG', message: `malformed request: ${(e as Error).message}` } });
      return;
    }
    const id = req.id;
    const cmd = req.cmd;
    const handler = typeof cmd === 'string' && Object.hasOwn(this.handlers, cmd) ? this.handlers[cmd] : undefined;
    if (!handler) {
      this.reply(socket, { id, ok: false, error: { code: 'ENOSYS', message: `unknown command ${JSON.stringify(cmd)}; known: ${Object.keys(this.handlers).join(', ')}` } });
      return;
    }
    try {
      const result = await handler(req);
      this.reply(socket, { id, ok: true, result });
    } catch (e) {
      const err = e as Error & { code?: string };
      log.info('admin-command-failed', { cmd, cause: err });
      this.reply(socket, { id, ok: false, error: { code: err.code ?? 'EIO', message: err.message } });
    }
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.destroy();
    if (this.server) await new Promise<void>((r) => this.server!.close(() => r()));
    this.server = undefined;
    // Only the socket this process created: a file since put there by someone else stays.
    const created = this.created;
    this.created = undefined;
    if (!created) return;
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(this.path);
    } catch {
      return; // already gone
    }
    if (st.dev === created.dev && st.ino === created.ino) fs.rmSync(this.path, { force: true });
    else log.warn('admin-socket-kept', { path: this.path, cause: 'the file there is no longer the socket this server created' });
  }
}

function inUse(p: string): AdminError {
  return new AdminError(
    'EADDRINUSE',
    `admin socket ${p} is in use by a running server; refusing to start (stop that server, or give this one another --admin-socket)`,
  );
}

/** One request over the admin socket; resolves with the result or rejects with the server's error. */
export async function adminRequest(path: string, request: Record<string, unknown>, timeoutMs = 30_000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const s = net.connect(path);
    let buf = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new AdminError('ETIMEDOUT', `no reply from ${path} in ${timeoutMs} ms`));
    }, timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => s.write(JSON.stringify(request) + '\n'));
    s.on('data', (c: string) => {
      buf += c;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      s.end();
      try {
        const msg = JSON.parse(buf.slice(0, nl)) as { ok: boolean; result?: unknown; error?: { code: string; message: string } };
        if (msg.ok) resolve(msg.result);
        else reject(new AdminError(msg.error?.code ?? 'EIO', msg.error?.message ?? 'unknown error', { refused: true }));
      } catch (e) {
        reject(e);
      }
    });
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(new AdminError(errorCode(e) ?? 'EIO', `cannot reach the admin socket ${path}: ${e.message}`, { cause: e }));
    });
  });
}
