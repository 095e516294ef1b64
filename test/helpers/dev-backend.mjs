// TEMPORARY (development only, never to be committed): emulate the nbd-migrate
// CLI contract with qemu-nbd (newstyle, first export) and nbdkit (unix socket,
// oldstyle) to validate test logic before the real server exists.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';

async function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); });
    s.on('error', rej);
  });
}
const args = process.argv.slice(3);
const exps = [];
let positional, name = '', ro = false, desc, oldstyle = false, socket;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--name') name = args[++i];
  else if (a === '--read-only') ro = true;
  else if (a === '--description') desc = args[++i];
  else if (a === '--oldstyle-port') { oldstyle = true; i++; }
  else if (a === '--socket') socket = args[++i];
  else if (a === '--export') {
    const spec = args[++i]; const eq = spec.indexOf('=');
    const parts = spec.slice(eq + 1).split(',');
    const e = { name: spec.slice(0, eq), path: parts[0], ro: false };
    for (const p of parts.slice(1)) {
      if (p === 'read-only') e.ro = true;
      else if (p.startsWith('description=')) e.desc = p.slice(12);
      else if (p.startsWith('oldstyle-port=')) e.oldstyle = true;
    }
    exps.push(e);
  } else if (a.startsWith('--')) i++;
  else positional = a;
}
if (positional) exps.unshift({ name, path: positional, ro, desc, oldstyle });
const procs = [];
const first = exps[0];
const port = await freePort();
const qa = ['-f', 'raw', '-x', first.name, '-b', '127.0.0.1', '-p', String(port), '--persistent', '--shared=8', '--cache=writeback', '--discard=unmap'];
if (first.ro) qa.push('-r');
if (first.desc) qa.push('-D', first.desc);
qa.push(first.path);
procs.push(spawn('qemu-nbd', qa, { stdio: 'inherit' }));
const out = (o) => process.stderr.write(JSON.stringify(o) + '\n');
out({ event: 'listening', listener: 'newstyle', address: '127.0.0.1', port });
if (socket) {
  procs.push(spawn('nbdkit', ['-f', '-U', socket, 'file', first.path, ...(first.ro ? ['-r'] : [])], { stdio: 'inherit' }));
  out({ event: 'listening', listener: 'unix', path: socket });
}
for (const e of exps) {
  if (!e.oldstyle) continue;
  const p = await freePort();
  procs.push(spawn('nbdkit', ['-f', '-o', '-i', '127.0.0.1', '-p', String(p), 'file', e.path, ...(e.ro ? ['-r'] : [])], { stdio: 'inherit' }));
  out({ event: 'listening', listener: 'oldstyle', export: e.name, address: '127.0.0.1', port: p });
}
await new Promise((r) => setTimeout(r, 700));
out({ event: 'ready' });
process.on('SIGTERM', () => { for (const p of procs) p.kill('SIGTERM'); setTimeout(() => process.exit(0), 300); });
