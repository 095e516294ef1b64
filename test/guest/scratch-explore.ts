import { join } from 'node:path';
import { MiB, makeImage, startServer, tmpDir } from '../helpers/server.js';
import { describeGuest, runGuest } from './qemu.js';

const t = { teardown: (_f: () => unknown) => {} };
const dir = await tmpDir(t, 'nbdm-x-');
const img = await makeImage(join(dir, 'a.img'), 64 * MiB);
const srv = await startServer([img, '--name', 'vm1']);
const script = process.argv[2]!;
const r = await runGuest(undefined, {
  disks: [{ server: { type: 'inet', host: '127.0.0.1', port: srv.newstylePort }, export: 'vm1' }],
  script: (await import('node:fs')).readFileSync(script, 'utf8'),
  timeoutMs: 120_000,
});
console.log(describeGuest(r, 200));
await srv.stop();
