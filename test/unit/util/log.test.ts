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
