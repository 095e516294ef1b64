import t from 'tap';
import { configureLog, log, logger } from '../../../src/util/log.js';

/** Runs `fn` with the log captured in `format`; returns the lines. */
function capture(format: 'json' | 'text', fn: () => void): string[] {
  const lines: string[] = [];
  configureLog({ format, level: 'debug', sink: (l) => lines.push(l) });
  try {
    fn();
  } finally {
    configureLog({ format: 'json', level: 'info', sink: (l) => process.stderr.write(l + '\n') });
  }
  return lines;
}

t.test('text logs leave out fields that are undefined (as JSON lines do)', async (t) => {
  // What the server logs for a TCP listener: no export, path or fd.
  const fields = { listener: 'newstyle', export: undefined, address: '127.0.0.1', port: 10809, path: undefined, fd: undefined };
  const [text] = capture('text', () => logger({ conn: 1 }).info('listening', fields));
  t.notMatch(text!, /undefined/, text);
  t.match(text!, / INFO  listening conn=1 listener="newstyle" address="127.0.0.1" port=10809$/);
  const [json] = capture('json', () => log('info', 'listening', fields));
  t.same(Object.keys(JSON.parse(json!)), ['time', 'level', 'event', 'listener', 'address', 'port']);
  // null is a value ("no client certificate"), not an absent field.
  const [withNull] = capture('text', () => log('info', 'tls-established', { clientCert: null }));
  t.match(withNull!, /clientCert=null/);
});

t.test('an errno error is logged with its code once, not "ENOSPC: ENOSPC: ..."', async (t) => {
  const { DeviceError } = await import('../../../src/storage/device.js');
  let fsError: Error | undefined;
  try {
    (await import('node:fs')).readFileSync('/nonexistent/nbd-migrate-test');
  } catch (e) {
    fsError = e as Error;
  }
  // Node's own error, and the storage layer's DeviceError wrapping it (as toDeviceError does).
  const wrapped = new DeviceError('ENOSPC', 'ENOSPC: no space left on device, write');
  const [a, b] = capture('json', () => {
    log('warn', 'request-failed', { cause: fsError });
    log('warn', 'request-failed', { cause: wrapped });
  });
  t.equal(JSON.parse(a!).cause, "ENOENT: no such file or directory, open '/nonexistent/nbd-migrate-test'");
  t.equal(JSON.parse(b!).cause, 'ENOSPC: no space left on device, write');
  // A message that does not carry its code still gets it.
  const [c] = capture('json', () => log('error', 'x', { cause: new DeviceError('EWOULDBLOCK', 'cannot lock disk.img: held by pid 7') }));
  t.equal(JSON.parse(c!).cause, 'EWOULDBLOCK: cannot lock disk.img: held by pid 7');
});
