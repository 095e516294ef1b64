// The post-copy present-map's one rule (src/migration/postcopy.ts persist):
// the saved map never claims a block present before its data is durable. A
// FLUSH through the destination's device makes the image durable first and
// saves the map after; a write still running when the map is snapshotted is
// not claimed; a restart reads back exactly what was saved.
import t from 'tap';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirtyBitmap } from '../../../src/dirty/bitmap.js';
import { PostcopyDestination } from '../../../src/migration/postcopy.js';
import { PostcopyStore } from '../../../src/migration/postcopy-store.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const G = 64 * 1024;
const SIZE = 16 * G;

t.test('the map is saved only after the image is flushed, and claims only completed writes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'nbdm-pcmap-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const stateDir = join(dir, 'state');
  const store = new PostcopyStore(stateDir);
  const saved = () => {
    const m = new DirtyBitmap(SIZE, G);
    return store.loadAbsent(m) ? m : undefined;
  };
  let hold: Promise<void> | undefined;
  let release!: () => void;
  const seenAtFlush: Array<boolean | undefined> = [];
  const local = new MemoryDevice(SIZE, { delay: (op, off) => (op === 'write' && off === 5 * G ? hold : undefined) });
  const flush = local.flush.bind(local);
  local.flush = async () => {
    // At the moment the image is made durable, the map on disk must not claim block 2 yet.
    const m = saved();
    seenAtFlush.push(m ? !m.isDirty(2) : undefined);
    return flush();
  };
  const dest = new PostcopyDestination({
    exportName: 'vm1',
    image: join(dir, 'img'),
    stateDir,
    source: 'nbd://127.0.0.1:1/none',
    local,
    granularity: G,
    exportId: 'a'.repeat(32),
    fetchTimeoutMs: 1000,
    fill: false,
  });
  const dev = dest.device;
  // Whole blocks: no fetch needed.
  await dev.write(2 * G, [Buffer.alloc(G, 7)], { fua: false });
  hold = new Promise((r) => (release = r));
  const slow = dev.write(5 * G, [Buffer.alloc(G, 9)], { fua: false }); // still running during the flush
  await new Promise((r) => setImmediate(r));
  await dev.flush();
  t.same(seenAtFlush, [undefined], 'when the image was flushed, no map claimed block 2 yet');
  const m1 = saved();
  t.ok(m1 && !m1.isDirty(2), 'after the flush the map claims block 2 (written and flushed)');
  t.ok(m1 && m1.isDirty(5), 'but not block 5, whose write had not completed');
  release();
  await slow;
  await dev.write(7 * G, [Buffer.alloc(G, 1)], { fua: true });
  const m2 = saved();
  t.ok(m2 && !m2.isDirty(5) && !m2.isDirty(7), 'a FUA write saves the map (with block 5 now done) before it is answered');
  t.equal(seenAtFlush.length, 2, 'and flushed the image first');
  await dest.close();

  // A restart reads the map back.
  const again = new PostcopyDestination({
    exportName: 'vm1',
    image: join(dir, 'img'),
    stateDir,
    source: 'nbd://127.0.0.1:1/none',
    local,
    granularity: G,
    exportId: 'b'.repeat(32),
    fetchTimeoutMs: 1000,
    fill: false,
  });
  t.equal(again.status().absentBytes, SIZE - 3 * G, 'the restarted destination knows the three blocks present');
  t.equal(again.exportId, 'a'.repeat(32), 'and keeps its export identity');
  await again.close();
  t.ok(existsSync(join(stateDir, 'postcopy.json')), 'postcopy.json is in the state folder');
});
