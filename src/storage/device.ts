/**
 * The one narrow storage interface. The server, filters (dirty tracking, the
 * cutover gate, write-through) and the mirror's copy engine all speak it, so a
 * layer only knows the layer below it (the nbdkit plugin/filter idea).
 */

/** What a device can do; asked whenever needed (per connection, per request), never cached: a stack's switch changes it. */
export interface Capabilities {
  readonly canWrite: boolean;
  readonly canFlush: boolean;
  readonly canFua: boolean;
  readonly canTrim: boolean;
  readonly canZero: boolean;
  /** WRITE_ZEROES with FAST_ZERO can be honoured (sometimes); otherwise it fails fast with ENOTSUP. */
  readonly canFastZero: boolean;
  readonly canExtents: boolean;
  readonly canCache: boolean;
  /** Every connection sees one shared state, and a flush on any of them covers all completed writes. */
  readonly canMultiConn: boolean;
}

export interface WriteOptions {
  /** Durable before the promise resolves. */
  fua: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range must stay allocated: no hole punching. */
  noHole: boolean;
  /** Fail with ENOTSUP instead of falling back to writing zeros. */
  fast: boolean;
}

/** One run of the base:allocation map; `flags` are NBD_STATE_HOLE / NBD_STATE_ZERO bits. */
export type { Extent } from '../protocol/codec.js';
import type { Extent } from '../protocol/codec.js';
import { NbdMigrateError } from '../util/errors.js';

/** See Device.fileRange. */
export interface FileRange {
  readonly fd: number;
  readonly position: number;
}

export interface Device {
  /** Size in bytes, fixed for the device's life. */
  readonly size: number;
  capabilities(): Capabilities;
  /** Reads exactly `length` bytes at `offset` into `into` starting at `at` (no copy by the caller). */
  read(offset: number, length: number, into: Buffer, at: number): Promise<void>;
  /**
   * The fast path of read(): the data read now, within this call, when it is at hand (the page
   * cache), and true. False: `into` may hold part of it, and the caller uses read(). Optional.
   */
  readNow?(offset: number, length: number, into: Buffer, at: number): boolean;
  /**
   * Where a READ of the range can be sent from directly (sendfile): the file and the range's
   * position in it, when those bytes are the file's and reading them waits on nothing (the
   * page cache holds them). Undefined: use read(). Optional.
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
  /** Writes the concatenation of `data` at `offset`; the buffers are not joined. */
  write(offset: number, data: readonly Buffer[], opts: WriteOptions): Promise<void>;
  /**
   * The fast path of a write without FUA: made now, within this call, when nothing on the way
   * can wait (no hold, throttle or write-through; the page cache takes it), and true. False:
   * nothing was done (or it may be made again), and the caller uses write(). Optional: a
   * device without it is always written through write().
   */
  writeNow?(offset: number, data: readonly Buffer[]): boolean;
  flush(): Promise<void>;
  trim(offset: number, length: number, opts: WriteOptions): Promise<void>;
  zero(offset: number, length: number, opts: ZeroOptions): Promise<void>;
  /** Consecutive extents from `offset`, covering at most `length` bytes and at most `maxExtents` entries (at least one). */
  extents(offset: number, length: number, maxExtents: number): Promise<Extent[]>;
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/** Bytes in a write's buffers (they are never joined). */
export function byteLength(data: readonly Buffer[]): number {
  let n = 0;
  for (const b of data) n += b.length;
  return n;
}

/** An error from a device, carrying a POSIX errno name (`code`) for the one errno -> NBD mapping. */
export class DeviceError extends NbdMigrateError {
  override readonly name: string = 'DeviceError';
}
