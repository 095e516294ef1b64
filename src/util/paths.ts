import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Where the admin socket lives by default: what the shipped systemd unit passes to
 * `serve --admin-socket` (its RuntimeDirectory is /run/nbd-migrate) and what `ctl` connects to.
 */
export const DEFAULT_ADMIN_SOCKET = '/run/nbd-migrate/admin.sock';

/** The checkout's root: the nearest directory above this file with our package.json (works from src/ and dist/src/). */
export const projectRoot: string = (() => {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj) && (JSON.parse(fs.readFileSync(pj, 'utf8')) as { name?: string }).name === 'nbd-migrate') return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error('cannot find the nbd-migrate checkout root');
    dir = up;
  }
})();
