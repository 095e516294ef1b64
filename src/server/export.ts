/**
 * An export: a name clients ask for, and the device stack behind it. Every
 * connection to an export shares one Device, which is what makes the
 * CAN_MULTI_CONN promise hold (a flush anywhere covers every completed write).
 */
import * as C from '../protocol/constants.js';
import type { Extent } from '../protocol/codec.js';
import type { Capabilities, Device } from '../storage/device.js';
import type { Acl } from './acl.js';
import { ExportStats } from './stats.js';

export const BLOCK_SIZE_MINIMUM = 1;
export const BLOCK_SIZE_PREFERRED = 4096;

/** A metadata context an export offers (proto.md "Metadata querying"). */
export interface MetaContext {
  readonly id: number;
  readonly name: string;
  /** Extents from `offset`, covering at most `length` bytes, at most `max` entries, at least one. */
  extents(offset: number, length: number, max: number): Promise<Extent[]>;
}

export interface ExportOptions {
  name: string;
  description?: string;
  device: Device;
  /** The export receives a migration: only the migration source may attach until it completes. */
  incoming?: { onComplete(): Promise<void> };
  /** Client addresses allowed to attach; undefined admits all. */
  acl?: Acl;
}

export class Export {
  readonly name: string;
  readonly description: string | undefined;
  readonly device: Device;
  readonly caps: Capabilities;
  /** Request counters, shared by every connection to this export. */
  readonly stats = new ExportStats();
  /** Client addresses allowed to attach (changeable at runtime); undefined admits all. */
  acl: Acl | undefined;
  private incomingState: ExportOptions['incoming'];

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description;
    this.device = opts.device;
    this.caps = opts.device.capabilities();
    this.incomingState = opts.incoming;
    this.acl = opts.acl;
  }

  /** Offered contexts. The incoming context exists only while a migration is being received. */
  get metaContexts(): readonly MetaContext[] {
    const device = this.device;
    const all: MetaContext[] = [{ id: 1, name: C.BASE_ALLOCATION, extents: (o, l, m) => device.extents(o, l, m) }];
    if (this.incomingState)
      all.push({ id: 2, name: C.MIGRATE_INCOMING_CONTEXT, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });
    return all;
  }

  get incoming(): boolean {
    return this.incomingState !== undefined;
  }

  /** The migration source says the copy is complete and flushed: open the export to everyone. */
  async completeIncoming(): Promise<void> {
    const state = this.incomingState;
    if (!state) return;
    await this.device.flush();
    await state.onComplete();
    this.incomingState = undefined;
  }

  get size(): number {
    return this.device.size;
  }

  get readOnly(): boolean {
    return !this.caps.canWrite;
  }

  /** Transmission flags for one connection; DF only means something once structured replies are on. */
  transmissionFlags(structuredReplies: boolean): number {
    const c = this.caps;
    let f = C.NBD_FLAG_HAS_FLAGS;
    if (!c.canWrite) f |= C.NBD_FLAG_READ_ONLY;
    if (c.canFlush) f |= C.NBD_FLAG_SEND_FLUSH;
    if (c.canFua) f |= C.NBD_FLAG_SEND_FUA;
    if (c.canTrim) f |= C.NBD_FLAG_SEND_TRIM;
    if (c.canZero) f |= C.NBD_FLAG_SEND_WRITE_ZEROES;
    if (c.canZero && c.canFastZero) f |= C.NBD_FLAG_SEND_FAST_ZERO;
    if (c.canMultiConn) f |= C.NBD_FLAG_CAN_MULTI_CONN;
    if (c.canCache) f |= C.NBD_FLAG_SEND_CACHE;
    if (structuredReplies) f |= C.NBD_FLAG_SEND_DF;
    return f;
  }

  /** Contexts matching a LIST query ("" lists all, "base:" lists the base namespace) or a SET query (exact). */
  matchContexts(query: string, listing: boolean): MetaContext[] {
    if (listing && (query === '' || query.endsWith(':'))) return this.metaContexts.filter((m) => m.name.startsWith(query));
    return this.metaContexts.filter((m) => m.name === query);
  }
}

/** The exports one server offers, by name; "" is the default export. */
export class ExportRegistry {
  private readonly byName = new Map<string, Export>();
  private defaultName: string | undefined;

  add(e: Export): void {
    if (this.byName.has(e.name)) throw new Error(`duplicate export name "${e.name}"`);
    this.byName.set(e.name, e);
    this.defaultName ??= e.name;
  }

  remove(name: string): Export | undefined {
    const e = this.byName.get(name);
    this.byName.delete(name);
    if (this.defaultName === name) this.defaultName = this.byName.keys().next().value;
    return e;
  }

  /** Looks an export up; the empty name means the default (first) export. */
  get(name: string): Export | undefined {
    return this.byName.get(name === '' ? (this.defaultName ?? '') : name);
  }

  list(): Export[] {
    return [...this.byName.values()];
  }
}
