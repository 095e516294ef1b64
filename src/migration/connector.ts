/**
 * The target connector: the one place that knows how to reach a mirror
 * target. It connects (TLS comes with nbds:// URIs), sets the per-request
 * timeout, and checks that the target is a fit:
 * - never the source's own export (ESELF), whatever address names it;
 * - never a live nbd-migrate export that is not a migration destination,
 *   unless forced (ELIVE);
 * - an nbd-migrate destination is bound to this job (nbd-migrate:incoming:<job>),
 *   and must have room for the source's data (ENOSPC);
 * - on every later connection, the same disk as at first (EIDENTITY).
 * The job, the post-cutover forwarding device and `nbd-migrate copy` reach
 * targets through it.
 */
import { NbdClient, type NbdClientOptions } from '../client/nbd-client.js';
import * as C from '../protocol/constants.js';
import type { Device } from '../storage/device.js';
import type { Logger } from '../util/log.js';
import { JobError } from './errors.js';
import * as I from './incoming.js';
import type { ConnectFn, Target } from './target.js';

/** What an nbd-migrate target says about itself in its listing (nothing for qemu-nbd, nbdkit, ...). */
export interface TargetFacts {
  exportId: string | undefined;
  incoming: boolean;
  freeBytes: number | undefined;
  allocatedBytes: number | undefined;
}

export type TargetKind = 'nbd-migrate-incoming' | 'nbd-migrate-live' | 'foreign';

export function targetFacts(listed: readonly string[] | undefined): TargetFacts {
  const num = (prefix: string) => {
    const v = listed?.find((n) => n.startsWith(prefix));
    const n = v === undefined ? NaN : Number(v.slice(prefix.length));
    return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
  };
  return {
    exportId: listed?.find((n) => n.startsWith(C.EXPORT_ID_CONTEXT_PREFIX))?.slice(C.EXPORT_ID_CONTEXT_PREFIX.length),
    incoming: listed?.includes(I.MIGRATE_INCOMING_CONTEXT) ?? false,
    freeBytes: num(I.FREE_BYTES_CONTEXT_PREFIX),
    allocatedBytes: num(I.ALLOCATED_BYTES_CONTEXT_PREFIX),
  };
}

/** One plain connection (no checks): for `nbd-migrate copy`'s two sides. */
export function connectPlain(uri: string, options: NbdClientOptions = {}): Promise<NbdClient> {
  return NbdClient.connect(uri, options);
}

/** Bytes a device holds as data (not reading as zero), by its allocation map. */
export async function allocatedBytes(dev: Device, size = dev.size): Promise<number> {
  let pos = 0;
  let data = 0;
  while (pos < size) {
    const extents = await dev.extents(pos, size - pos, 1024);
    if (extents.length === 0) break;
    for (const e of extents) {
      if (!(e.flags & C.NBD_STATE_ZERO)) data += e.length;
      pos += e.length;
    }
  }
  return data;
}

export interface ConnectorOptions {
  uri: string;
  /** The job this connector works for: it binds an nbd-migrate destination. */
  jobId: string;
  /** Accept a live nbd-migrate export; take over a destination bound to another job (first connection only). */
  force: boolean;
  /** Refuse, instead of warning, a destination that cannot hold the full virtual size. */
  requireSpace: boolean;
  /** --converge postcopy: the target must be a post-copy destination (serve --fetch-from), and as such is accepted. */
  postcopyDestination?: boolean;
  /** Per-request timeout on every connection. */
  requestTimeoutMs: number;
  /** The source export: its identity, size and allocated data. */
  source: { name: string; exportId: string; size: number; dataBytes: () => number | null };
  /** Identities of every export this server serves. */
  localExportIds?: () => ReadonlySet<string>;
  connect?: ConnectFn;
  log: Logger;
  /**
   * This job resumes one a previous process left (src/dirty/export-state.ts):
   * the destination must be that job's (this export id, still bound to it),
   * or the job is refused rather than leave a disk half-copied.
   */
  resume?: { destExportId: string };
}

export class TargetConnector {
  /** What the target said of itself at the first connection; later connections must say the same. */
  private facts: TargetFacts | undefined;
  kind: TargetKind | null = null;
  /** Data a foreign target already held at the first connection (null when unknown). */
  targetDataBytes: number | null = null;

  constructor(private readonly o: ConnectorOptions) {}

  get uri(): string {
    return this.o.uri;
  }

  get freeBytes(): number | null {
    return this.facts?.freeBytes ?? null;
  }

  /** The destination's export id (nbd-migrate targets), once connected. */
  get destExportId(): string | null {
    return this.facts?.exportId ?? null;
  }

  private get incomingContext(): string {
    return I.MIGRATE_INCOMING_JOB_PREFIX + this.o.jobId;
  }

  private open(options: NbdClientOptions): Promise<Target> {
    return (this.o.connect ?? ((u, opts) => NbdClient.connect(u, opts)))(this.o.uri, options);
  }

  /**
   * Connects and checks that the target is a fit (`first`), or still the same
   * disk (later connections). Unfit targets are refused with a permanent
   * JobError naming the target and what to do. `signal` abandons the attempt.
   */
  async connect(first: boolean, signal?: AbortSignal): Promise<Target> {
    const { uri } = this.o;
    const metaContexts = [C.BASE_ALLOCATION, this.incomingContext];
    // Only the job's first connection may take a destination over; its reconnects must find it still bound to it.
    if (first && this.o.force) metaContexts.push(I.MIGRATE_TAKEOVER_CONTEXT);
    // A resumed job asks the destination to admit it only if it is already bound to it.
    if (first && this.o.resume) metaContexts.push(I.MIGRATE_RESUME_CONTEXT);
    let client: Target;
    try {
      // quickAck: a target without TCP_NODELAY (qemu-nbd) otherwise holds replies ~40 ms for our delayed ACK while a cutover waits on them.
      const connecting = this.open({ metaContexts, listMetaContexts: [C.MIGRATE_NAMESPACE], requestTimeoutMs: this.o.requestTimeoutMs, quickAck: true });
      if (signal) connecting.then((c) => signal.aborted && c.destroy(), () => undefined);
      client = await (signal ? Promise.race([connecting, abortion(signal)]) : connecting);
    } catch (e) {
      if (e instanceof JobError) throw e;
      const msg = (e as Error).message;
      if (msg.includes(I.RESUME_REFUSAL))
        throw new JobError('EIDENTITY', `target ${uri} refused to resume this job: ${msg.replace(/^.*?: the server refused export "[^"]*" \([^)]*\): /, '')}`, { cause: e, permanent: true });
      if (/bound to migration job/.test(msg))
        throw new JobError('EBUSY', `target ${uri} refused this job: ${msg.replace(/^.*?: the server refused export "[^"]*" \([^)]*\): /, '')}`, { cause: e, permanent: true });
      throw new JobError('EUNREACHABLE', `target ${uri} is unreachable: ${msg}`, { cause: e });
    }
    try {
      await this.check(client, first);
    } catch (e) {
      // Attaching bound an nbd-migrate destination to this job: let it go again, since the job never starts.
      if (first && client.contexts.has(this.incomingContext)) await client.request(I.NBD_CMD_MIGRATE_RELEASE, 0, 0, 0).catch(() => undefined);
      client.destroy();
      throw e;
    }
    return client;
  }

  /** Whether `target` is bound to this job as an nbd-migrate destination (it then takes MIGRATE_COMPLETE). */
  boundOn(target: Target): boolean {
    return target.contexts.has(this.incomingContext);
  }

  private async check(client: Target, first: boolean): Promise<void> {
    const { uri, source } = this.o;
    const unfit = (code: string, msg: string) => new JobError(code, msg, { permanent: true });
    if (client.size < source.size) throw unfit('ETOOSMALL', `target ${uri} is smaller than the source (${client.size} < ${source.size} bytes)`);
    if (client.readOnly) throw unfit('EROFS', `target ${uri} is read-only`);
    const facts = targetFacts(client.listedContexts);
    if (facts.exportId !== undefined && facts.exportId === source.exportId)
      throw unfit('ESELF', `target ${uri} is export "${source.name}" itself: a mirror onto itself would destroy it. Give the URI of the destination host`);
    if (!first) {
      if (facts.exportId !== this.facts?.exportId)
        throw unfit(
          'EIDENTITY',
          `target ${uri} is no longer the disk this job was copying to (export id ${this.facts?.exportId ?? 'none'} before, ${facts.exportId ?? 'none'} now); the job stops rather than write into another disk`,
        );
      this.o.log.info('target-connected', { reconnect: true, contexts: [...client.contexts.keys()] });
      return;
    }
    // Listed by a post-copy destination (migration/postcopy-contexts.ts POSTCOPY_DESTINATION_CONTEXT).
    const postcopyDest = client.listedContexts?.includes('nbd-migrate:postcopy-destination') ?? false;
    if (this.o.postcopyDestination && !postcopyDest)
      throw unfit('EINVAL', `--converge postcopy: target ${uri} is not a post-copy destination; serve the destination image with --fetch-from nbd://THIS-HOST/${source.name}`);
    if (facts.exportId !== undefined && !facts.incoming && !this.o.force && !(this.o.postcopyDestination && postcopyDest)) {
      const local = this.o.localExportIds?.().has(facts.exportId) ? ' (an export of this same server)' : '';
      throw unfit(
        'ELIVE',
        `target ${uri} is a live nbd-migrate export${local}, not a migration destination: mirroring would overwrite a disk that may be in use. ` +
          `Serve the destination image with --incoming, or pass --force if that export really is scratch`,
      );
    }
    if (facts.incoming && !client.contexts.has(this.incomingContext))
      throw unfit('EPROTO', `target ${uri} is an nbd-migrate destination but did not accept this job's incoming context`);
    const resume = this.o.resume;
    if (resume && (!facts.incoming || facts.exportId !== resume.destExportId || !client.contexts.has(I.MIGRATE_RESUME_CONTEXT)))
      throw unfit(
        'EIDENTITY',
        `target ${uri} is not the destination this job was copying to before the restart (export id ${resume.destExportId} then, ` +
          `${facts.exportId ?? 'none'}${facts.incoming ? '' : ', not receiving'} now): resuming would copy only what changed into a disk that lacks the rest. ` +
          `Pass --force to start a fresh mirror (the whole disk is copied again)`,
      );
    this.facts = facts;
    this.kind = facts.exportId === undefined ? 'foreign' : facts.incoming ? 'nbd-migrate-incoming' : 'nbd-migrate-live';
    if (facts.freeBytes !== undefined) this.checkSpace(facts.freeBytes + (facts.allocatedBytes ?? 0));
    // What a foreign target already holds: data there will be overwritten (holes it reads as zero are skipped).
    if (this.kind !== 'nbd-migrate-incoming' && client.contexts.has(C.BASE_ALLOCATION))
      this.targetDataBytes = await allocatedBytes(client, source.size);
    this.o.log.info('target-connected', {
      kind: this.kind,
      size: client.size,
      exportId: facts.exportId ?? null,
      targetDataBytes: this.targetDataBytes,
      targetFreeBytes: facts.freeBytes ?? null,
      sourceDataBytes: source.dataBytes(),
      force: this.o.force,
      structuredReplies: client.structuredReplies,
      contexts: [...client.contexts.keys()],
    });
  }

  /** The destination must hold the source's data; it should hold the whole virtual size. */
  private checkSpace(room: number): void {
    const { uri, source } = this.o;
    const data = source.dataBytes() ?? source.size;
    if (room < data)
      throw new JobError('ENOSPC', `target ${uri} has room for ${room} bytes but the source holds ${data} bytes of data: free space on the destination first`, {
        permanent: true,
      });
    if (room < source.size) {
      const msg = `target ${uri} has room for ${room} bytes, less than the ${source.size}-byte virtual size: the guest could run out of space after cutover`;
      if (this.o.requireSpace) throw new JobError('ENOSPC', `${msg} (--require-space)`, { permanent: true });
      this.o.log.warn('target-space-short', { room, size: source.size, sourceDataBytes: data, effect: 'mirroring anyway; --require-space refuses' });
    }
  }

  /** Lets an nbd-migrate destination go, so another job may bind it (best effort, bounded). */
  async release(): Promise<void> {
    if (this.kind !== 'nbd-migrate-incoming') return;
    let c: Target | undefined;
    const t = setTimeout(() => c?.destroy(), 2000);
    try {
      c = await this.open({ metaContexts: [this.incomingContext], connectTimeoutMs: 2000, requestTimeoutMs: 2000 });
      if (c.contexts.has(this.incomingContext)) await c.request(I.NBD_CMD_MIGRATE_RELEASE, 0, 0, 0);
      this.o.log.info('destination-released', { target: this.o.uri });
    } catch (e) {
      this.o.log.warn('destination-release-failed', {
        cause: e,
        effect: 'the destination stays bound to this job; another source needs --force to take it over',
      });
    } finally {
      clearTimeout(t);
      c?.destroy();
    }
  }
}

/** A promise that rejects when `signal` aborts. */
export function abortion(signal: AbortSignal): Promise<never> {
  return new Promise<never>((_r, reject) => {
    const fail = () => reject(new JobError('ECANCELED', 'the job was aborted'));
    if (signal.aborted) fail();
    else signal.addEventListener('abort', fail, { once: true });
  });
}
