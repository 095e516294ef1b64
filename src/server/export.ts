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

/** An export receiving a migration (migration/incoming.ts): who owns it and what it reports. */
export interface IncomingState {
  readonly exportId: string;
  readonly boundJob: string | undefined;
  refusal(jobId: string, takeover: boolean): string | undefined;
  bind(jobId: string, takeover: boolean, peer: string): void;
  complete(jobId: string): void;
  release(jobId: string): void;
  freeBytes(): number;
  allocatedBytes(): number;
}

/** The migration job a connection's chosen contexts name (`nbd-migrate:incoming:<job>`), and whether it takes over. */
export function incomingJobOf(contexts: readonly MetaContext[]): { jobId: string; takeover: boolean } | undefined {
  const m = contexts.find((c) => c.name.startsWith(C.MIGRATE_INCOMING_JOB_PREFIX));
  if (!m) return undefined;
  return { jobId: m.name.slice(C.MIGRATE_INCOMING_JOB_PREFIX.length), takeover: contexts.some((c) => c.name === C.MIGRATE_TAKEOVER_CONTEXT) };
}

/** Job ids: what a source may put after `nbd-migrate:incoming:`. */
const JOB_ID = /^[0-9a-f]{8,64}$/;

export const newExportId = (): string => randomBytes(16).toString('hex');

export interface ExportOptions {
  name: string;
  description?: string;
  device: Device;
  /** The export's identity (default: a new random one). */
  id?: string;
  /** The export receives a migration: only the job bound to it may attach until it completes. */
  incoming?: IncomingState;
  /** Client addresses allowed to attach; undefined admits all. */
  acl?: Acl;
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
  private incomingState: ExportOptions['incoming'];

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description;
    this.device = opts.device;
    this.incomingState = opts.incoming;
    this.id = opts.incoming?.exportId ?? opts.id ?? newExportId();
    this.acl = opts.acl;
  }

  /** Offered contexts (the ones a listing shows). The incoming ones exist only while a migration is being received. */
  get metaContexts(): readonly MetaContext[] {
    const device = this.device;
    const flat = (name: string, id: number): MetaContext => ({ id, name, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });
    const all: MetaContext[] = [
      { id: 1, name: C.BASE_ALLOCATION, extents: (o, l, m) => device.extents(o, l, m) },
      flat(C.EXPORT_ID_CONTEXT_PREFIX + this.id, 3),
    ];
    const inc = this.incomingState;
    if (inc) {
      all.push(flat(C.MIGRATE_INCOMING_CONTEXT, 2), flat(C.MIGRATE_TAKEOVER_CONTEXT, 4));
      // Facts for the source's pre-checks; read when listed, so they are current.
      try {
        all.push(flat(C.FREE_BYTES_CONTEXT_PREFIX + inc.freeBytes(), 5), flat(C.ALLOCATED_BYTES_CONTEXT_PREFIX + inc.allocatedBytes(), 6));
      } catch {
        /* statfs failed: the source then cannot check space and says so */
      }
    }
    return all;
  }

  /** The receiving side of a migration, while there is one. */
  get incomingMigration(): IncomingState | undefined {
    return this.incomingState;
  }

  get incoming(): boolean {
    return this.incomingState !== undefined;
  }

  /** Why a connection that chose `contexts` may not attach, by the migration rules (undefined: it may). */
  incomingRefusal(contexts: readonly MetaContext[]): string | undefined {
    const inc = this.incomingState;
    if (!inc) return undefined;
    const job = incomingJobOf(contexts);
    if (!job)
      return `export "${this.name}" is receiving a migration and holds a half-copied disk; it opens to clients when the migration completes`;
    return inc.refusal(job.jobId, job.takeover);
  }

  /** A connection that chose `contexts` entered transmission: the job it names binds the destination. */
  attached(contexts: readonly MetaContext[], peer: string): void {
    const job = incomingJobOf(contexts);
    if (job) this.incomingState?.bind(job.jobId, job.takeover, peer);
  }

  /** The bound migration source says the copy is complete and flushed: open the export to everyone. */
  async completeIncoming(jobId: string): Promise<void> {
    const state = this.incomingState;
    if (!state) return; // already complete: the same job repeating itself after a failed cutover
    if (state.boundJob !== jobId) throw new Error(`job ${jobId} is not the job bound to export "${this.name}"`);
    await this.device.flush();
    state.complete(jobId);
    this.incomingState = undefined;
  }

  /** The bound source aborted its job: let another bind. */
  releaseIncoming(jobId: string): void {
    this.incomingState?.release(jobId);
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
   * lists it) or a SET query (exact, and on an incoming export
   * `nbd-migrate:incoming:<job id>`, which names the job attaching).
   */
  matchContexts(query: string, listing: boolean): MetaContext[] {
    if (listing && (query === '' || query.endsWith(':'))) return this.metaContexts.filter((m) => m.name.startsWith(query));
    if (!listing && this.incomingState && query.startsWith(C.MIGRATE_INCOMING_JOB_PREFIX)) {
      const job = query.slice(C.MIGRATE_INCOMING_JOB_PREFIX.length);
      if (!JOB_ID.test(job)) return [];
      return [{ id: 2, name: query, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) }];
    }
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
