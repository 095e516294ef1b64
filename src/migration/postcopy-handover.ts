/**
 * Post-copy, source side (`ctl postcopy`): the export handed over to a
 * destination becomes a read-only supplier that only its fetcher attaches to.
 */
import { NbdClient } from '../client/nbd-client.js';
import type { DirtyBitmap } from '../dirty/bitmap.js';
import * as C from '../protocol/constants.js';
import { type Capabilities, type Device, DeviceError, type Extent } from '../storage/device.js';
import type { ExportExtension, ExtraCommand, MetaContext } from '../server/export.js';
import { Filter } from '../storage/filters/filter.js';
import type { Stack } from '../storage/stack.js';
import { clearFenced, writeFenced } from './markers.js';
import { ReconnectingDevice } from './reconnecting-device.js';
import { logger } from '../util/log.js';
import { targetFacts } from './connector.js';
import { DEFAULT_MIRROR_OPTIONS } from './options.js';
import { settledWithin } from '../util/within.js';
import {
  FETCH_CONTEXT_PREFIX,
  flat,
  POSTCOPY_APPLIED_CONTEXT,
  POSTCOPY_DESTINATION_CONTEXT,
  POSTCOPY_DIRTY_CONTEXT,
  POSTCOPY_SUPPLIER_CONTEXT,
} from './postcopy-contexts.js';

/** The handed-over image as the supplier serves it: reads only. */
class ReadOnlyFilter extends Filter {
  override capabilities(): Capabilities {
    return { ...this.next.capabilities(), canWrite: false, canTrim: false, canZero: false, canFastZero: false, canFua: false };
  }
  override async write(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
  override async trim(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
  override async zero(): Promise<void> {
    throw new DeviceError('EROFS', 'the export was handed over (post-copy): its image is fenced');
  }
}

/** The handed-over export for new connections: only the destination's fetcher attaches. */
export class SupplierExtension implements ExportExtension {
  readonly commands: ReadonlyMap<number, ExtraCommand> = new Map();
  private appliedResolve: (() => void) | undefined;
  /** Resolves once the destination has applied the dirty list (asked block status of POSTCOPY_APPLIED_CONTEXT). */
  readonly applied: Promise<void>;
  constructor(
    readonly exportName: string,
    readonly destination: string,
    readonly destExportId: string,
    /** The blocks the destination must not trust (hybrid: the mirror's dirty bitmap, frozen under the hold). */
    private readonly dirty?: DirtyBitmap,
  ) {
    this.applied = new Promise((r) => (this.appliedResolve = r));
  }
  contexts(): MetaContext[] {
    const all = [flat(POSTCOPY_SUPPLIER_CONTEXT, 41)];
    const dirty = this.dirty;
    if (dirty) {
      all.push({
        id: 43,
        name: POSTCOPY_DIRTY_CONTEXT,
        extents: async (o, l, max) => {
          const out: Extent[] = [];
          const g = dirty.granularity;
          let pos = o;
          const end = Math.min(o + l, dirty.size);
          while (pos < end && out.length < max) {
            const b = Math.floor(pos / g);
            const d = dirty.isDirty(b);
            let e = b + 1;
            while (e * g < end && dirty.isDirty(e) === d) e++;
            const n = Math.min(e * g, end) - pos;
            out.push({ length: n, flags: d ? 1 : 0 });
            pos += n;
          }
          return out;
        },
      });
    }
    // Always: the destination may have taken writes without fetching while the source was live (precopy), and must stop first.
    all.push({ id: 44, name: POSTCOPY_APPLIED_CONTEXT, extents: async (_o, l) => (this.appliedResolve?.(), [{ length: l, flags: 0 }]) });
    return all;
  }
  matchSet(query: string): MetaContext | undefined {
    return query === FETCH_CONTEXT_PREFIX + this.destExportId ? flat(query, 42) : undefined;
  }
  admission(contexts: readonly MetaContext[]): string | undefined {
    if (contexts.some((c) => c.name === FETCH_CONTEXT_PREFIX + this.destExportId)) return undefined;
    return `export "${this.exportName}" was handed over to ${this.destination} (post-copy): only that destination's fetcher may attach here; attach guests to the destination`;
  }
  attached(_contexts: readonly MetaContext[], peer: string): void {
    logger({ export: this.exportName, component: 'postcopy' }).info('supplier-attached', { peer, destination: this.destination });
  }
}

export interface HandOverContext {
  name: string;
  image: string;
  exportId: string;
  stack: Stack;
  destination: string;
  handoff: 'forward' | 'disconnect';
  /** New connections to the export's name get `device` under `extension` from now on; connected guests keep theirs. */
  replaceExport(device: Device, extension: ExportExtension): void;
  /** Undoes replaceExport (a hand-over that failed). */
  restoreExport(): void;
  /** Hybrid: the mirror's dirty bitmap; the destination applies it before the guests move. */
  dirty?: DirtyBitmap;
  /**
   * How long guests are held for the destination's fetcher to attach (the cutover timeout:
   * default DEFAULT_MIRROR_OPTIONS.cutoverTimeoutMs); past it the hand-over is undone and
   * the guests go on with the local image.
   */
  cutoverTimeoutMs?: number;
  disconnectClients(): void | Promise<void>;
  wrapRemote?: (remote: Device) => Device;
}

export interface HandOverResult {
  export: string;
  destination: string;
  destinationExportId: string;
  handoff: 'forward' | 'disconnect';
  pauseMs: number;
}

/**
 * `ctl postcopy EXPORT nbd://DEST/NAME`: the source hands its export over to a
 * post-copy destination. The destination is checked first (it must list
 * nbd-migrate:postcopy-destination and be the same size); then guest changes
 * are held, the image flushed and fenced (a restart refuses to serve it
 * read-write), the export turned into a read-only supplier that admits only
 * the destination's fetcher (`nbd-migrate:fetch:<its export id>`), and the
 * guests moved: forwarded to the destination, or disconnected.
 */
export async function handOver(ctx: HandOverContext): Promise<HandOverResult> {
  const log = logger({ export: ctx.name, destination: ctx.destination, component: 'postcopy' });
  const refuse = (code: string, msg: string) => new DeviceError(code, msg);
  let c: NbdClient;
  try {
    c = await NbdClient.connect(ctx.destination, { listMetaContexts: [C.MIGRATE_NAMESPACE], connectTimeoutMs: 10_000, requestTimeoutMs: 30_000 });
  } catch (e) {
    throw refuse('EUNREACHABLE', `destination ${ctx.destination} is unreachable: ${(e as Error).message}`);
  }
  const facts = targetFacts(c.listedContexts);
  try {
    if (!c.listedContexts.includes(POSTCOPY_DESTINATION_CONTEXT) || !facts.exportId)
      throw refuse('EINVAL', `destination ${ctx.destination} is not a post-copy destination (it lists ${c.listedContexts.join(', ') || 'nothing of nbd-migrate'}): serve the destination image there with --fetch-from nbd://THIS-HOST/${ctx.name}`);
    if (facts.exportId === ctx.exportId) throw refuse('ESELF', `destination ${ctx.destination} is export "${ctx.name}" itself`);
    if (c.size !== ctx.stack.local.size) throw refuse('ETOOSMALL', `destination ${ctx.destination} is ${c.size} bytes, the export ${ctx.stack.local.size}`);
    if (c.readOnly) throw refuse('EROFS', `destination ${ctx.destination} is read-only`);
  } catch (e) {
    c.destroy();
    throw e;
  }
  const stack = ctx.stack;
  const t0 = performance.now();
  let fenced = false;
  let replaced = false;
  try {
    await stack.gate.hold();
    stack.writeThrough.setWriteThrough(undefined);
    await stack.local.flush();
    writeFenced(ctx.image, { export: ctx.name, target: ctx.destination, time: new Date().toISOString() });
    fenced = true;
    const supplier = new SupplierExtension(ctx.name, ctx.destination, facts.exportId!, ctx.dirty);
    ctx.replaceExport(new ReadOnlyFilter(stack.local), supplier);
    replaced = true;
    {
      // Guests move only once the destination has attached (and no longer trusts the blocks a pre-copy left dirty).
      const limit = ctx.cutoverTimeoutMs ?? DEFAULT_MIRROR_OPTIONS.cutoverTimeoutMs;
      if (!(await settledWithin(supplier.applied, limit)))
        throw new DeviceError('ETIMEDOUT', `destination ${ctx.destination}: its fetcher did not attach within ${limit} ms (--cutover-timeout); is this source reachable from there as its --fetch-from says?`);
      log.info('postcopy-destination-attached', { dirtyBytes: ctx.dirty?.dirtyBytes() ?? null });
    }
    const forward = new ReconnectingDevice(c, () => NbdClient.connect(ctx.destination, { requestTimeoutMs: 30_000 }), ctx.destination);
    stack.switch.swap(ctx.wrapRemote?.(forward) ?? forward);
    stack.throttle.setRate(undefined);
  } catch (e) {
    c.destroy();
    if (replaced) ctx.restoreExport();
    if (fenced) clearFenced(ctx.image);
    log.error('postcopy-handover-failed', { cause: e, effect: 'guests stay on the local image' });
    throw e;
  } finally {
    stack.gate.release();
  }
  const pauseMs = Math.round((performance.now() - t0) * 100) / 100;
  log.info('postcopy-handover', { destinationExportId: facts.exportId, handoff: ctx.handoff, pauseMs, effect: 'the image is fenced; only the destination fetches from it' });
  if (ctx.handoff === 'disconnect') await ctx.disconnectClients();
  return { export: ctx.name, destination: ctx.destination, destinationExportId: facts.exportId!, handoff: ctx.handoff, pauseMs };
}
