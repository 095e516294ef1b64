import t, { type Test } from 'tap';
import { checkArgs, InvalidArgument, type Schema } from '../../../src/admin/args.js';
import { NbdMigrateError } from '../../../src/util/errors.js';

const schema = {
  name: { kind: 'string', required: true, doc: 'd' },
  count: { kind: 'integer', doc: 'd' },
  flag: { kind: 'boolean', doc: 'd' },
  rate: { kind: 'size', doc: 'd' },
  wait: { kind: 'duration', doc: 'd' },
  timeout: { kind: 'duration', positive: true, doc: 'd' },
  mode: { kind: 'enum', values: ['auto', 'manual'], doc: 'd' },
  allow: { kind: 'list', of: 'addresses', orNull: 'for everyone', doc: 'd' },
  tags: { kind: 'list', of: 'tags', doc: 'd' },
} as const satisfies Schema;

function refusal(t: Test, req: Record<string, unknown>, message: string | RegExp, what: string): void {
  try {
    checkArgs(schema, req);
    t.fail(`${what}: accepted`);
  } catch (e) {
    t.ok(e instanceof InvalidArgument && e instanceof NbdMigrateError, `${what}: an InvalidArgument in the error tree`);
    t.equal((e as InvalidArgument).code, 'EINVAL', `${what}: EINVAL`);
    if (typeof message === 'string') t.equal((e as Error).message, message, what);
    else t.match((e as Error).message, message, what);
  }
}

t.test('values are checked and parsed; absent optional fields are left out', async (t) => {
  const a = checkArgs(schema, { cmd: 'x', id: 7, name: 'vm1', extra: 'ignored' });
  t.same(a, { name: 'vm1' }, 'only the given field, nothing for absent ones, unknown fields dropped');
  t.notOk('count' in a, 'an absent field is not set to undefined');
  const b = checkArgs(schema, {
    name: 'vm1',
    count: 0,
    flag: false,
    rate: '200M',
    wait: '2s',
    timeout: 250,
    mode: 'manual',
    allow: null,
    tags: ['a', 'b'],
  });
  t.same(b, { name: 'vm1', count: 0, flag: false, rate: 200 * 2 ** 20, wait: 2000, timeout: 250, mode: 'manual', allow: null, tags: ['a', 'b'] });
  t.equal(checkArgs(schema, { name: 'x', rate: 0 }).rate, 0, 'a size of 0 is kept (the handler decides what it means)');
  t.equal(checkArgs(schema, { name: 'x', wait: '0ms' }).wait, 0, 'a duration without `positive` may be 0');
  t.same(checkArgs(schema, { name: 'x', allow: ['10.0.0.0/8'] }).allow, ['10.0.0.0/8']);
});

t.test('bad values are refused with EINVAL naming the field', async (t) => {
  refusal(t, {}, '"name" must be a non-empty string', 'required field absent');
  refusal(t, { name: '' }, '"name" must be a non-empty string', 'empty string');
  refusal(t, { name: 5 }, '"name" must be a non-empty string', 'number for a string');
  refusal(t, { name: 'x', count: -1 }, '"count" must be a non-negative integer', 'negative integer');
  refusal(t, { name: 'x', count: 1.5 }, '"count" must be a non-negative integer', 'fraction');
  refusal(t, { name: 'x', count: '3' }, '"count" must be a non-negative integer', 'string for an integer');
  refusal(t, { name: 'x', flag: 'yes' }, '"flag" must be true or false', 'string for a boolean');
  refusal(t, { name: 'x', rate: 'fast' }, /^rate: expected a number with an optional K\/M\/G\/T suffix/, 'bad size');
  refusal(t, { name: 'x', wait: 'soon' }, /^wait: expected e\.g\. 50ms, 2s or 1m/, 'bad duration');
  refusal(t, { name: 'x', timeout: '0s' }, '"timeout" must be more than 0', 'zero for a positive duration');
  refusal(t, { name: 'x', mode: 'sometimes' }, '"mode" must be one of auto, manual', 'not in the enum');
  refusal(t, { name: 'x', allow: 'everyone' }, '"allow" must be a list of addresses, or null for everyone', 'string for a list');
  refusal(t, { name: 'x', allow: [1] }, '"allow" must be a list of addresses, or null for everyone', 'list of numbers');
  refusal(t, { name: 'x', tags: null }, '"tags" must be a list of tags', 'null where null is not allowed');
  refusal(t, { name: 'x', flag: null }, '"flag" must be true or false', 'null is a value, not absence');
  refusal(t, { name: 'x', mode: null }, '"mode" must be one of auto, manual', 'null for an optional enum');
});

t.test('fields are checked in the schema order: the first bad one is reported', async (t) => {
  refusal(t, { count: -1, mode: 'x' }, '"name" must be a non-empty string', 'name comes first');
  refusal(t, { name: 'x', mode: 'x', count: -1 }, '"count" must be a non-negative integer', 'count before mode');
});
