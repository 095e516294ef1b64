// The admin command table (src/admin/commands.ts) against what stands on it: the
// socket's replies and error codes, ctl's subcommands and options, and the README's
// "Admin socket protocol" section.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import yargs from 'yargs';
import { checkArgs } from '../../../src/admin/args.js';
import { ADMIN_COMMANDS, adminHandlers, type AdminCommand, type AdminCommandName, type AdminContext } from '../../../src/admin/commands.js';
import { AdminServer, adminRequest } from '../../../src/admin/server.js';
import { ctlCommand, ctlOptionName, ctlPositionals, CTL_SUBCOMMANDS } from '../../../src/cli/ctl.js';
import { Acl } from '../../../src/server/acl.js';
import { NbdMigrateError } from '../../../src/util/errors.js';
import { configureLog } from '../../../src/util/log.js';
import { REPO_ROOT, tmpDir } from '../../helpers/server.js';

type Call = [method: string, ...args: unknown[]];

configureLog({ level: 'error' }); // every refusal below is logged at info

/** A controller and server that record what the table's handlers ask of them. */
function fakeContext(): { ctx: AdminContext; calls: Call[] } {
  const calls: Call[] = [];
  const job = (name: string) => ({ export: name, state: 'completed', convergence: 'none', size: 1, dirtyBytes: 0, dataBytes: 1, zeroBytes: 0, skippedBytes: 0, pauseMs: 1 });
  const controller = {
    status: () => (calls.push(['status']), { exports: [], jobs: [] }),
    jobStatus: (name: string) => {
      calls.push(['jobStatus', name]);
      if (name === 'nope') throw new NbdMigrateError('ENOENT', 'no export named "nope"');
      return job(name);
    },
    mirror: async (name: string, opts: unknown) => (calls.push(['mirror', name, opts]), job(name)),
    cutover: (name: string) => (calls.push(['cutover', name]), job(name)),
    abort: async (name: string) => (calls.push(['abort', name]), job(name)),
    setSpeed: (name: string, rate: unknown) => (calls.push(['setSpeed', name, rate]), job(name)),
    checkpoint: (action: string, name: string, checkpoint: unknown) => (calls.push(['checkpoint', action, name, checkpoint]), action === 'list' ? [] : { name: checkpoint }),
    evacuations: {
      start: (opts: { to: string; parallel: number }) => (
        calls.push(['evacuate', opts]), { id: 'evac-1', to: opts.to, parallel: opts.parallel, exports: [{ export: 'vm1' }] }
      ),
      cutoverAll: () => (calls.push(['cutoverAll']), { requested: [], notReady: [] }),
      setSpeed: (id: string, rate: unknown) => (
        calls.push(['evacuationSpeed', id, rate]), { id, maxBandwidth: rate ?? null, counts: { queued: 1 }, exports: [{ export: 'vm1', state: 'copying' }] }
      ),
    },
  };
  const server = { setAcl: (name: string, acl: Acl | undefined) => (calls.push(['setAcl', name, acl?.entries ?? null]), 0) };
  const handOver = async (name: string, o: { target: string; handoff: string }) => (calls.push(['handOver', name, o]), { export: name, destination: o.target, handoff: o.handoff, pauseMs: 0 });
  return { ctx: { controller: controller as unknown as AdminContext['controller'], server, handOver }, calls };
}

async function adminAt(t: Test): Promise<{ socket: string; calls: Call[] }> {
  const dir = await tmpDir(t, 'nbd-migrate-admin-table-');
  const socket = path.join(dir, 'admin.sock');
  const { ctx, calls } = fakeContext();
  const admin = new AdminServer(socket, adminHandlers(ctx));
  await admin.listen();
  t.teardown(() => admin.close());
  return { socket, calls };
}

t.test('requests reach the controller with checked, parsed arguments', async (t) => {
  const { socket, calls } = await adminAt(t);
  await adminRequest(socket, {
    cmd: 'mirror',
    export: 'vm1',
    target: 'nbd://dst/vm1',
    maxBandwidth: '200M',
    cutover: 'auto',
    maxDowntime: '2s',
    converge: 'throttle',
    handoff: 'disconnect',
    maxRetries: 3,
    targetTimeout: '30s',
    cutoverTimeout: 5000,
    writeThroughTimeout: '1s',
    force: true,
    requireSpace: false,
  });
  await adminRequest(socket, { cmd: 'mirror', export: 'vm2', target: 'nbd://dst/vm2', maxBandwidth: 0 });
  await adminRequest(socket, { cmd: 'status' });
  await adminRequest(socket, { cmd: 'status', export: 'vm1' });
  await adminRequest(socket, { cmd: 'cutover', export: 'vm1' });
  await adminRequest(socket, { cmd: 'abort', export: 'vm1' });
  await adminRequest(socket, { cmd: 'set-speed', export: 'vm1', rate: '500M' });
  await adminRequest(socket, { cmd: 'set-speed', export: 'vm1', rate: 0 });
  t.same(await adminRequest(socket, { cmd: 'set-acl', export: 'vm1', allow: ['10.0.0.0/8'] }), { disconnected: 0 });
  await adminRequest(socket, { cmd: 'set-acl', export: 'vm1', allow: null });
  await adminRequest(socket, { cmd: 'evacuate', to: 'nbd://dst/{name}', exports: ['a', 'b'], parallel: 3, maxBandwidth: '40M', cutover: 'auto' });
  await adminRequest(socket, { cmd: 'evacuate', to: 'nbd://dst/{name}', maxBandwidth: 0 });
  await adminRequest(socket, {
    cmd: 'evacuate',
    to: 'nbd://dst/{name}',
    maxDowntime: '2s',
    handoff: 'disconnect',
    targetTimeout: '10s',
    cutoverTimeout: '7s',
    converge: 'throttle',
    maxRetries: 2,
    writeThroughTimeout: 300,
    force: true,
    requireSpace: true,
  });
  await adminRequest(socket, { cmd: 'cutover', all: true });
  await adminRequest(socket, { cmd: 'set-speed', evacuation: 'evac-1', rate: '8M' });
  await adminRequest(socket, { cmd: 'set-speed', evacuation: 'evac-1', rate: 0 });
  t.strictSame(calls, [
    [
      'mirror',
      'vm1',
      {
        target: 'nbd://dst/vm1',
        maxBandwidth: 200 * 2 ** 20,
        maxDowntimeMs: 2000,
        cutover: 'auto',
        converge: 'throttle',
        handoff: 'disconnect',
        maxRetries: 3,
        targetTimeoutMs: 30_000,
        cutoverTimeoutMs: 5000,
        writeThroughTimeoutMs: 1000,
        force: true,
        requireSpace: false,
      },
    ],
    // 0 lifts the limit; what was not given is not set at all (the job's defaults apply).
    ['mirror', 'vm2', { target: 'nbd://dst/vm2', maxBandwidth: undefined }],
    ['status'],
    ['jobStatus', 'vm1'],
    ['cutover', 'vm1'],
    ['abort', 'vm1'],
    ['setSpeed', 'vm1', 500 * 2 ** 20],
    ['setSpeed', 'vm1', undefined],
    ['setAcl', 'vm1', ['10.0.0.0/8']],
    ['setAcl', 'vm1', null],
    ['evacuate', { to: 'nbd://dst/{name}', exports: ['a', 'b'], parallel: 3, maxBandwidth: 40 * 2 ** 20, cutover: 'auto' }],
    // The defaults: every export, 2 at a time, unlimited (0 lifts the limit), manual cutover.
    ['evacuate', { to: 'nbd://dst/{name}', parallel: 2, cutover: 'manual' }],
    // The per-job mirror options go to every job, parsed as ctl mirror's are.
    [
      'evacuate',
      {
        to: 'nbd://dst/{name}',
        parallel: 2,
        cutover: 'manual',
        job: {
          maxDowntimeMs: 2000,
          converge: 'throttle',
          handoff: 'disconnect',
          maxRetries: 2,
          targetTimeoutMs: 10_000,
          cutoverTimeoutMs: 7000,
          writeThroughTimeoutMs: 300,
          force: true,
          requireSpace: true,
        },
      },
    ],
    ['cutoverAll'],
    ['evacuationSpeed', 'evac-1', 8 * 2 ** 20],
    ['evacuationSpeed', 'evac-1', undefined],
  ]);
  t.notOk(Object.hasOwn((calls[1]![2] as object), 'maxDowntimeMs'), 'an absent option is not passed as undefined');
});

t.test('bad requests are refused with the codes and messages of before, and reach nothing', async (t) => {
  const { socket, calls } = await adminAt(t);
  const m = { cmd: 'mirror', export: 'vm1', target: 'nbd://dst/vm1' };
  const refusals: [Record<string, unknown>, string, string | RegExp][] = [
    [{ cmd: 'mirror', export: 'vm1' }, 'EINVAL', '"target" must be a non-empty string'],
    [{ cmd: 'mirror', target: 'nbd://dst/vm1' }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'mirror' }, 'EINVAL', '"target" must be a non-empty string'],
    [{ ...m, export: '' }, 'EINVAL', '"export" must be a non-empty string'],
    [{ ...m, maxBandwidth: 'fast' }, 'EINVAL', /^maxBandwidth: expected a number with an optional K\/M\/G\/T suffix, got "fast"$/],
    [{ ...m, maxDowntime: 'soon' }, 'EINVAL', /^maxDowntime: expected e\.g\. 50ms, 2s or 1m, got "soon"$/],
    [{ ...m, cutover: 'sometimes' }, 'EINVAL', '"cutover" must be one of auto, manual'],
    [{ ...m, converge: 'x' }, 'EINVAL', '"converge" must be one of active, throttle'],
    [{ ...m, handoff: 'x' }, 'EINVAL', '"handoff" must be one of forward, disconnect'],
    [{ ...m, maxRetries: -1 }, 'EINVAL', '"maxRetries" must be a non-negative integer'],
    [{ ...m, maxRetries: '10' }, 'EINVAL', '"maxRetries" must be a non-negative integer'],
    [{ ...m, targetTimeout: 0 }, 'EINVAL', '"targetTimeout" must be more than 0'],
    [{ ...m, targetTimeout: 'soon' }, 'EINVAL', /^targetTimeout: expected e\.g\./],
    [{ ...m, cutoverTimeout: '0s' }, 'EINVAL', '"cutoverTimeout" must be more than 0'],
    [{ ...m, writeThroughTimeout: 0 }, 'EINVAL', '"writeThroughTimeout" must be more than 0'],
    [{ ...m, force: 'yes' }, 'EINVAL', '"force" must be true or false'],
    [{ ...m, requireSpace: 1 }, 'EINVAL', '"requireSpace" must be true or false'],
    [{ ...m, cutover: null }, 'EINVAL', '"cutover" must be one of auto, manual'],
    [{ cmd: 'status', export: '' }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'cutover' }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'cutover', export: 'vm1', all: true }, 'EINVAL', 'give "export" or "all", not both'],
    [{ cmd: 'cutover', all: 'yes' }, 'EINVAL', '"all" must be true or false'],
    [{ cmd: 'evacuate' }, 'EINVAL', '"to" must be a non-empty string'],
    [{ cmd: 'evacuate', to: 'nbd://dst/{name}', exports: 'a,b' }, 'EINVAL', '"exports" must be a list of export names'],
    [{ cmd: 'evacuate', to: 'nbd://dst/{name}', parallel: '2' }, 'EINVAL', '"parallel" must be a non-negative integer'],
    [{ cmd: 'evacuate', to: 'nbd://dst/{name}', cutover: 'later' }, 'EINVAL', '"cutover" must be one of auto, manual'],
    [{ cmd: 'abort', export: 7 }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'set-speed', export: 'vm1' }, 'EINVAL', /^rate: expected a number .*, got undefined$/],
    [{ cmd: 'set-speed', rate: '1M' }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'set-speed', export: 'vm1', evacuation: 'evac-1', rate: '1M' }, 'EINVAL', 'give "export" or "evacuation", not both'],
    [{ cmd: 'set-speed', evacuation: '', rate: '1M' }, 'EINVAL', '"evacuation" must be a non-empty string'],
    [{ cmd: 'evacuate', to: 'nbd://dst/{name}', handoff: 'later' }, 'EINVAL', '"handoff" must be one of forward, disconnect'],
    [{ cmd: 'evacuate', to: 'nbd://dst/{name}', targetTimeout: 0 }, 'EINVAL', '"targetTimeout" must be more than 0'],
    [{ cmd: 'set-acl', export: 'vm1' }, 'EINVAL', '"allow" must be a list of addresses/CIDRs, or null to admit everyone'],
    [{ cmd: 'set-acl', export: 'vm1', allow: '10.0.0.0/8' }, 'EINVAL', '"allow" must be a list of addresses/CIDRs, or null to admit everyone'],
    [{ cmd: 'set-acl', export: 'vm1', allow: ['bogus'] }, 'EINVAL', 'allow-list entry "bogus" is not an address or CIDR'],
    [{ cmd: 'set-acl', allow: null }, 'EINVAL', '"export" must be a non-empty string'],
    [{ cmd: 'explode' }, 'ENOSYS', 'unknown command "explode"; known: status, mirror, cutover, abort, set-speed, checkpoint, postcopy, set-acl, evacuate'],
    [{ cmd: 'toString' }, 'ENOSYS', /^unknown command "toString"/],
  ];
  for (const [req, code, message] of refusals)
    await t.rejects(adminRequest(socket, req), { code, message, refused: true }, JSON.stringify(req));
  t.same(calls, [], 'no refused request reached the controller or the server');
  // A handler's own error keeps its code.
  await t.rejects(adminRequest(socket, { cmd: 'status', export: 'nope' }), { code: 'ENOENT', message: 'no export named "nope"' });
});

/** Runs `nbd-migrate ctl ARGS` in this process against `socket`; returns what it printed. */
async function ctl(socket: string, args: string[]): Promise<string> {
  let printed = '';
  const write = process.stdout.write;
  process.stdout.write = ((s: string) => ((printed += s), true)) as typeof process.stdout.write;
  try {
    await yargs(['ctl', '--socket', socket, ...args])
      .command('ctl', 'ctl', (y) => ctlCommand(y))
      .strict()
      .exitProcess(false)
      .fail((msg, err) => {
        throw err ?? new Error(msg);
      })
      .parseAsync();
  } finally {
    process.stdout.write = write;
  }
  return printed;
}

t.test('every table command has a ctl subcommand or is socket-only; ctl sends what the table accepts', async (t) => {
  t.same(Object.keys(CTL_SUBCOMMANDS).sort(), Object.keys(ADMIN_COMMANDS).sort(), 'ctl has an entry for every command, and no other');
  const { socket, calls } = await adminAt(t);
  const sample: Record<string, string> = { export: 'vm1', target: 'nbd://dst/vm1', rate: '1M', action: 'list' };
  // What a subcommand needs besides its required positionals (cutover: an export or --all; evacuate: --to).
  const needs: Partial<Record<AdminCommandName, string[]>> = { cutover: ['vm1'], evacuate: ['--to', 'nbd://dst/{name}'], 'set-speed': ['vm1', '1M'] };
  for (const name of Object.keys(ADMIN_COMMANDS) as AdminCommandName[]) {
    const sub = CTL_SUBCOMMANDS[name];
    if (sub === 'socket-only') continue;
    const required = ctlPositionals(sub).filter((p) => p.required).map((p) => p.name);
    for (const p of required) t.ok(sample[p], `${name}: a sample value for <${p}>`);
    const before = calls.length;
    await ctl(socket, [name, ...required.map((p) => sample[p]!), ...(needs[name] ?? [])]);
    t.equal(calls.length, before + (name === 'cutover' ? 2 : 1), `ctl ${name} with its defaults is accepted by the table and reaches the controller`);
  }
  // Every table argument of mirror is a ctl option, with ctl's defaults for what is not given.
  calls.length = 0;
  const printed = await ctl(socket, ['mirror', 'vm1', 'nbd://dst/vm1', '--max-bandwidth', '200M', '--write-through-timeout', '2s', '--force']);
  t.equal(printed, 'mirror of vm1 to nbd://dst/vm1 started\n');
  t.strictSame(calls, [
    [
      'mirror',
      'vm1',
      {
        target: 'nbd://dst/vm1',
        maxBandwidth: 200 * 2 ** 20,
        maxDowntimeMs: 50,
        cutover: 'manual',
        converge: 'active',
        handoff: 'forward',
        maxRetries: 10,
        targetTimeoutMs: 30_000,
        cutoverTimeoutMs: 5000,
        writeThroughTimeoutMs: 2000,
        force: true,
        requireSpace: false,
      },
    ],
  ]);
  calls.length = 0;
  await ctl(socket, ['status']);
  await ctl(socket, ['set-speed', 'vm1', '0']);
  t.strictSame(calls, [['status'], ['setSpeed', 'vm1', undefined]], 'status without an export, set-speed 0 lifts the limit');
  calls.length = 0;
  const evac = await ctl(socket, ['evacuate', '--to', 'nbd://dst/{name}', '--exports', 'a,b', '--exports', 'c', '--parallel', '3', '--max-bandwidth', '40M']);
  t.equal(evac, 'evacuation evac-1 of vm1 to nbd://dst/{name} started (parallel 3)\n');
  await ctl(socket, ['cutover', '--all', '--no-wait']);
  t.strictSame(
    calls,
    [['evacuate', { to: 'nbd://dst/{name}', exports: ['a', 'b', 'c'], parallel: 3, maxBandwidth: 40 * 2 ** 20, cutover: 'manual' }], ['cutoverAll']],
    'ctl evacuate: --exports takes commas, ctl defaults to manual cutover; cutover --all',
  );
  // The per-job options are ctl mirror's, sent only when given (the job defaults apply otherwise).
  calls.length = 0;
  await ctl(socket, ['evacuate', '--to', 'nbd://dst/{name}', '--max-downtime', '2s', '--handoff', 'disconnect', '--target-timeout', '10s', '--cutover-timeout', '7s']);
  t.strictSame(calls, [
    ['evacuate', { to: 'nbd://dst/{name}', parallel: 2, cutover: 'manual', job: { maxDowntimeMs: 2000, handoff: 'disconnect', targetTimeoutMs: 10_000, cutoverTimeoutMs: 7000 } }],
  ]);
  await t.rejects(ctl(socket, ['evacuate', '--to', 'nbd://dst/{name}', '--handoff', 'later']), /Invalid values/, 'evacuate\'s --handoff choices are mirror\'s');
  // set-speed --evacuation ID RATE: the one positional is the rate.
  calls.length = 0;
  const sp = await ctl(socket, ['set-speed', '--evacuation', 'evac-1', '8M']);
  await ctl(socket, ['set-speed', 'vm1', '2M']);
  t.strictSame(calls, [['evacuationSpeed', 'evac-1', 8 * 2 ** 20], ['setSpeed', 'vm1', 2 * 2 ** 20]]);
  t.equal(sp, 'budget of evacuation evac-1 set to 8.0 MiB/s (shared by 1 running job, 1 queued)\n');
  await t.rejects(ctl(socket, ['mirror', 'vm1', 'nbd://dst/vm1', '--cutover', 'later']), /Invalid values/, 'enum choices come from the table');
});

/** The README's "Admin socket protocol" section: its text, and each table row's request. */
function readmeProtocol(): { text: string; ctlText: string; rows: { request: Record<string, unknown>; result: string }[] } {
  const readme = fs.readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
  const start = readme.indexOf('### Admin socket protocol');
  const end = readme.indexOf('\n## ', start);
  const text = readme.slice(start, end);
  const rows = [...text.matchAll(/^\| `(\{.*?\})` \| (.*) \|$/gm)].map((m) => ({ request: JSON.parse(m[1]!) as Record<string, unknown>, result: m[2]! }));
  return { text, ctlText: readme, rows };
}

t.test('the README documents every command and every argument the table accepts, and nothing else', async (t) => {
  const { text, ctlText, rows } = readmeProtocol();
  t.ok(text.length > 0 && rows.length > 0, 'the section and its table are found');
  for (const [name, c] of Object.entries(ADMIN_COMMANDS) as [AdminCommandName, AdminCommand][]) {
    const own = rows.filter((r) => r.request.cmd === name);
    t.ok(own.length > 0, `${name} has a row`);
    const documented = new Set(own.flatMap((r) => Object.keys(r.request)).filter((k) => k !== 'cmd'));
    t.same([...documented].sort(), Object.keys(c.args).sort(), `${name}: the README's arguments are exactly the table's`);
    for (const r of own) t.doesNotThrow(() => checkArgs(c.args, r.request), `${name}: the README's example ${JSON.stringify(r.request)} is accepted`);
    if (CTL_SUBCOMMANDS[name] === 'socket-only') t.ok(own.some((r) => /socket only/.test(r.result)), `${name} is documented as socket only`);
    else {
      const positionals = ctlPositionals(CTL_SUBCOMMANDS[name]).map((p) => p.name);
      for (const arg of Object.keys(c.args))
        if (!positionals.includes(arg))
          t.match(ctlText, `\`--${ctlOptionName(arg)}`, `ctl ${name} --${ctlOptionName(arg)} is in the README`);
    }
  }
  for (const r of rows) t.ok(Object.hasOwn(ADMIN_COMMANDS, r.request.cmd as string), `the README's ${String(r.request.cmd)} is a table command`);
});
