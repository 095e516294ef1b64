// QEMU-compatible image locks (OFD byte-range locks on QEMU's permission bytes),
// against each other in one process: OFD locks belong to the open file, so two
// fds of one image conflict just as two processes do.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FileDevice } from '../../../src/storage/file-device.js';
import { fallbackOps, ImageLockConflict, qemuLockBytes, sparseOps } from '../../../src/storage/native.js';

const native = sparseOps().ops;
t.equal(native.kind, 'native', 'native addon loads');

function tmpImage(t: Tap): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-ql-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const p = path.join(dir, 'disk.img');
  fs.writeFileSync(p, Buffer.alloc(65536));
  return p;
}
/** What the helpers need of a test: somewhere to register cleanup. */
type Tap = { teardown(fn: () => unknown): void };

/** Opens `p`; the fd is closed by closeFd or at teardown, whichever comes first. */
const open = new Set<number>();
function openFd(t: Tap, p: string, flags: string): number {
  const fd = fs.openSync(p, flags);
  open.add(fd);
  t.teardown(() => closeFd(fd));
  return fd;
}
function closeFd(fd: number): void {
  if (open.delete(fd)) fs.closeSync(fd);
}

t.test('the bytes: CONSISTENT_READ=bit 0, WRITE=1, WRITE_UNCHANGED=2, RESIZE=3; 100+bit held, 200+bit not shared', async (t) => {
  t.same(qemuLockBytes(true), { lock: [100, 101, 201, 203], test: [101, 103, 200, 201] }, 'read-write: holds read+write, shares neither write nor resize');
  t.same(qemuLockBytes(false), { lock: [100, 201, 203], test: [101, 103, 200] }, 'read-only: holds read, shares neither write nor resize');
});

t.test('a writer keeps writers and readers off; readers share; a refused attempt leaves nothing locked', async (t) => {
  const img = tmpImage(t);
  const rw = openFd(t, img, 'r+');
  t.equal(native.qemuLock(rw, img, true), true, 'the writer takes its locks');

  const rw2 = openFd(t, img, 'r+');
  const e1 = (() => {
    try {
      native.qemuLock(rw2, img, true);
    } catch (e) {
      return e;
    }
  })();
  t.type(e1, ImageLockConflict, 'a second writer is refused');
  t.equal((e1 as ImageLockConflict).byte, 101, 'found the write permission held');
  t.match((e1 as ImageLockConflict).message, `${img} is in use: another process (for example QEMU) holds it for writing`);

  const ro = openFd(t, img, 'r');
  t.throws(() => native.qemuLock(ro, img, false), { code: 'EBUSY', byte: 101 }, 'a reader is refused while it is written');

  closeFd(rw);
  // rw2 and ro were refused: had they kept any byte, these would fail.
  const ro2 = openFd(t, img, 'r');
  t.equal(native.qemuLock(ro2, img, false), true, 'a reader once the writer has gone');
  const ro3 = openFd(t, img, 'r');
  t.equal(native.qemuLock(ro3, img, false), true, 'readers share');

  const rw3 = openFd(t, img, 'r+');
  t.throws(
    () => native.qemuLock(rw3, img, true),
    { code: 'EBUSY', byte: 201, holder: 'another process (for example QEMU) has it open and does not share "write" access' },
    'a writer is refused while readers hold it',
  );
  closeFd(ro2);
  closeFd(ro3);
  t.equal(native.qemuLock(rw3, img, true), true, 'locks go with the fd: the writer gets it');
});

t.test('FileDevice takes the QEMU locks at open and drops them at close', async (t) => {
  const img = tmpImage(t);
  const d = await FileDevice.open(img, { readOnly: false, ops: native });
  const probe = openFd(t, img, 'r');
  t.throws(() => native.qemuLock(probe, img, false), { name: 'DeviceError', code: 'EBUSY', byte: 101 }, 'held while open');
  await d.close();
  t.equal(native.qemuLock(probe, img, false), true, 'released on close');
  await t.rejects(FileDevice.open(img, { readOnly: false, ops: native }), { code: 'EBUSY', byte: 201 }, 'and an open refused by a QEMU-style reader');
});

t.test('the fallback takes no QEMU locks (Node has no fcntl)', async (t) => {
  const img = tmpImage(t);
  const fd = openFd(t, img, 'r+');
  t.equal(fallbackOps.qemuLock(fd, img, true), false);
});
