/**
 * The native addon (native/, built by `npm ci` through node-gyp-build), loaded once for
 * everything that uses it: storage's syscalls, TCP_QUICKACK on client sockets, and the
 * server's socket writer. NBD_MIGRATE_NATIVE=0 leaves it unloaded, so the pure-JS paths
 * can be tested; each user falls back on its own.
 */
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { projectRoot } from './paths.js';

let loaded: { addon: Record<string, unknown> | null; reason?: string } | undefined;

/** The addon's exports, or null and why (NBD_MIGRATE_NATIVE=0, or the first line of the load error). */
export function nativeAddon(): { addon: Record<string, unknown> | null; reason?: string } {
  if (loaded) return loaded;
  if (process.env.NBD_MIGRATE_NATIVE === '0') return (loaded = { addon: null, reason: 'NBD_MIGRATE_NATIVE=0' });
  try {
    const load = createRequire(import.meta.url)('node-gyp-build') as (dir: string) => Record<string, unknown>;
    loaded = { addon: load(path.join(projectRoot, 'native')) };
  } catch (e) {
    loaded = { addon: null, reason: (e as Error).message.split('\n')[0] };
  }
  return loaded;
}
