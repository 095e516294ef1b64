/**
 * The export's backend after cutover: the target, reached through an NBD
 * connection that is re-established when it drops. A request that fails
 * because the connection died is retried on the new one (every NBD command is
 * idempotent: the same data at the same offset), so a target restart shows up
 * to guests as latency, not as an I/O error. Errors the target itself returns
 * (EIO, ENOSPC, ...) pass through unchanged. After `giveUpMs` without a
 * connection, requests fail with the last error.
 */
import { type Capabilities, type Device, DeviceError, type Extent, type WriteOptions, type ZeroOptions } from '../storage/device.js';
import { logger } from '../util/log.js';
import type { Target } from './target.js';
import { CONNECTION_LOST } from './target-errors.js';

export class ReconnectingDevice implements Device {
  private current: Target;
  private reconnecting: Promise<Target> | undefined;
  /** Set by close(): no more reconnecting; waiting requests fail. */
  private closed = false;
  private readonly log = logger({ component: 'forward' });

  constructor(
    first: Target,
    private readonly connect: () => Promise<Target>,
    readonly uri: string,
    private readonly giveUpMs = 120_000,
  ) {
    this.current = first;
  }

  get size(): number {
    return this.current.size;
  }

  capabilities(): Capabilities {
    return this.current.capabilities();
  }

  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    return this.retry((d) => d.read(offset, length, into, at));
  }

  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void> {
    return this.retry((d) => d.write(offset, data, opts));
  }

  flush(): Promise<void> {
    return this.retry((d) => d.flush());
  }

  trim(offset: number, length: number, opts: WriteOptions): Promise<void> {
    return this.retry((d) => d.trim(offset, length, opts));
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.retry((d) => d.zero(offset, length, opts));
  }

  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]> {
    return this.retry((d) => d.extents(offset, length, maxExtents));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.retry((d) => d.cache(offset, length));
  }

  /** Closes the connection; requests waiting for a reconnect fail with ESHUTDOWN. */
  close(): Promise<void> {
    this.closed = true;
    return this.current.close();
  }

  private async retry<T>(op: (d: Device) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.giveUpMs;
    for (;;) {
      const d = this.current;
      try {
        return await op(d);
      } catch (e) {
        if (this.closed || !CONNECTION_LOST.has((e as { code?: string }).code ?? '') || Date.now() > deadline) throw e;
        await this.reconnect(d, deadline, e);
      }
    }
  }

  /** One reconnect at a time; every request that saw the old connection die waits for it. */
  private reconnect(dead: Target, deadline: number, cause: unknown): Promise<Target> {
    if (this.current !== dead) return Promise.resolve(this.current);
    this.reconnecting ??= (async () => {
      this.log.warn('target-connection-lost', { target: this.uri, cause, action: 'reconnect; guest requests wait' });
      dead.destroy();
      for (let attempt = 1; ; attempt++) {
        await new Promise((r) => setTimeout(r, Math.min(100 * 2 ** (attempt - 1), 2000)));
        if (this.closed) throw new DeviceError('ESHUTDOWN', `${this.uri}: closed while reconnecting`);
        try {
          const next = await this.connect();
          this.current = next;
          this.log.info('target-reconnected', { target: this.uri, attempt });
          return next;
        } catch (e) {
          if (Date.now() > deadline) throw e;
        }
      }
    })().finally(() => (this.reconnecting = undefined));
    return this.reconnecting;
  }
}
