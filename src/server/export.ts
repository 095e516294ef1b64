/**
 * An export: a name clients ask for, and the device stack behind it. Every
 * connection to an export shares one Device, which is what makes the
 * CAN_MULTI_CONN promise hold (a flush anywhere covers every completed write).
 */
import { randomBytes } from 'node:crypto';
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

/** A transmission command an extension adds (nbd-migrate's own live in 0x4e4d..): the server only dispatches it. */
export interface ExtraCommand {
  readonly name: string;
  /** Whether a connection that chose `contexts` may send it; otherwise it is an unknown command (EINVAL). */
  permitted(contexts: readonly MetaContext[]): boolean;
  /** Runs it (no payload, no flags, offset and length 0); a rejection is answered with its errno. */
  run(contexts: readonly MetaContext[]): Promise<void>;
}

/**
 * What an export adds to the protocol without the server knowing what it is
 * (migration/incoming.ts is the one there is): contexts it offers, an
 * admission rule, and a table of extra commands.
 */
export interface ExportExtension {
  /** Contexts listed now (and selectable by their exact names). */
  contexts(): MetaContext[];
  /** A SET_META_CONTEXT query no listed name matches (one that carries a job id, say). */
  matchSet(query: string): MetaContext | undefined;
  /** Why a connection that chose `contexts` may not attach (undefined: it may). */
  admission(contexts: readonly MetaContext[]): string | undefined;
  /** A connection that chose `contexts` entered transmission. */
  attached(contexts: readonly MetaContext[], peer: string): void;
  /** Extra transmission commands, by command type. */
  readonly commands: ReadonlyMap<number, ExtraCommand>;
}

export const newExportId = (): string => randomBytes(16).toString('hex');

export interface ExportOptions {
  name: string;
  description?: string;
  device: Device;
  /** The export's identity (default: a new random one). */
  id?: string;
  /** Contexts, an admission rule and commands the server knows nothing of (an incoming migration). */
  extension?: ExportExtension;
  /** Client addresses allowed to attach; undefined admits all. */
  acl?: Acl;
  /** More contexts offered, asked for at each listing (the export's checkpoints: `qemu:dirty-bitmap:NAME`). */
  contexts?: () => MetaContext[];
}

export class Export {
  readonly name: string;
  readonly description: string | undefined;
  readonly device: Device;
  /** Identity readable by clients as the `nbd-migrate:export-id:<id>` context. */
  readonly id: string;
  /** Request counters, shared by every connection to this export. */
  readonly stats = new ExportStats();
  /** Client addresses allowed to attach (changeable at runtime); undefined admits all. */
  acl: Acl | undefined;
  readonly extension: ExportExtension | undefined;
  private readonly moreContexts: (() => MetaContext[]) | undefined;

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description;
    this.device = opts.device;
    this.extension = opts.extension;
    this.id = opts.id ?? newExportId();
    this.acl = opts.acl;
    this.moreContexts = opts.contexts;
  }

  /** Offered contexts (the ones a listing shows): allocation, identity, and the extension's. */
  get metaContexts(): readonly MetaContext[] {
    const device = this.device;
    const flat = (name: string, id: number): MetaContext => ({ id, name, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });
    const all: MetaContext[] = [
      { id: 1, name: C.BASE_ALLOCATION, extents: (o, l, m) => device.extents(o, l, m) },
      flat(C.EXPORT_ID_CONTEXT_PREFIX + this.id, 3),
    ];
    if (this.extension) all.push(...this.extension.contexts());
    if (this.moreContexts) all.push(...this.moreContexts());
    return all;
  }

  /** Why a connection that chose `contexts` may not attach, by the extension's rule (undefined: it may). */
  admission(contexts: readonly MetaContext[]): string | undefined {
    return this.extension?.admission(contexts);
  }

  /** A connection that chose `contexts` entered transmission. */
  attached(contexts: readonly MetaContext[], peer: string): void {
    this.extension?.attached(contexts, peer);
  }

  get size(): number {
    return this.device.size;
  }

  /** Asked of the device each time, never cached: the stack below may switch (cutover). */
  get caps(): Capabilities {
    return this.device.capabilities();
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

  /**
   * Contexts matching a LIST query ("" lists all, a namespace such as "base:"
   * lists it) or a SET query (exact, or what the extension makes of it).
   */
  matchContexts(query: string, listing: boolean): MetaContext[] {
    if (listing && (query === '' || query.endsWith(':'))) return this.metaContexts.filter((m) => m.name.startsWith(query));
    const exact = this.metaContexts.filter((m) => m.name === query);
    if (listing || exact.length > 0) return exact;
    const m = this.extension?.matchSet(query);
    return m ? [m] : [];
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
