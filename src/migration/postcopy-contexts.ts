/**
 * The NBD meta contexts of post-copy: the names a destination, its fetcher
 * and a handed-over source list or select to find each other.
 */
import type { MetaContext } from '../server/export.js';

/** Selected by a destination's fetcher: `nbd-migrate:fetch:<destination export id>` (a post-copy supplier admits only it). */
export const FETCH_CONTEXT_PREFIX = 'nbd-migrate:fetch:';
/** Listed by a destination still filling (`serve --fetch-from`): what `ctl postcopy` on the source checks. */
export const POSTCOPY_DESTINATION_CONTEXT = 'nbd-migrate:postcopy-destination';
/** Listed by a source export handed over (`ctl postcopy`): read-only, and only the destination's fetcher attaches. */
export const POSTCOPY_SUPPLIER_CONTEXT = 'nbd-migrate:postcopy-supplier';
/**
 * On a supplier handed over from a mirror (`ctl mirror --converge postcopy`):
 * block status 1 for every block the pre-copy had not brought over yet (or
 * that changed after it did). The destination marks those absent again before
 * it serves anything, then asks block status of POSTCOPY_APPLIED_CONTEXT,
 * which tells the source it may move its guests.
 */
export const POSTCOPY_DIRTY_CONTEXT = 'nbd-migrate:postcopy-dirty';
export const POSTCOPY_APPLIED_CONTEXT = 'nbd-migrate:postcopy-applied';

/** A context that only names something: block status says 0 for all of it. */
export const flat = (name: string, id: number): MetaContext => ({ id, name, extents: (_o, l) => Promise.resolve([{ length: l, flags: 0 }]) });
