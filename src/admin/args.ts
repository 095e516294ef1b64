/**
 * The arguments an admin command accepts, written as data: each field's kind,
 * whether it is required, and one line of documentation (ctl's option help).
 * `checkArgs` turns a request into typed values or rejects it with EINVAL
 * naming the field; the fields are checked in the order they are written, so
 * the first bad one is the one reported. Fields a command does not know are
 * ignored (the request's "cmd" and "id" among them). An optional field is
 * absent only when undefined: null is a value, and is refused unless allowed.
 */
import { NbdMigrateError } from '../util/errors.js';
import { parseDurationMs, parseSize } from '../util/units.js';

/** A request argument the command cannot use: the reply is EINVAL with this message. */
export class InvalidArgument extends NbdMigrateError {
  override readonly name: string = 'InvalidArgument';
  constructor(message: string, options?: { cause?: unknown }) {
    super('EINVAL', message, options);
  }
}

interface FieldBase {
  /** Checked even when absent (and refused then); otherwise an absent field is left out. */
  readonly required?: true;
  /** One line for ctl's help (what it does, an example value). */
  readonly doc: string;
}

export type ArgSpec =
  /** A non-empty string. */
  | (FieldBase & { readonly kind: 'string' })
  /** A non-negative integer. */
  | (FieldBase & { readonly kind: 'integer' })
  | (FieldBase & { readonly kind: 'boolean' })
  /** Bytes: a number, or a string with an optional K/M/G/T suffix ("200M"); parsed to a number. */
  | (FieldBase & { readonly kind: 'size' })
  /** A duration: milliseconds, or "50ms", "2s", "1m"; parsed to milliseconds. `positive` refuses 0. */
  | (FieldBase & { readonly kind: 'duration'; readonly positive?: true })
  | (FieldBase & { readonly kind: 'enum'; readonly values: readonly string[] })
  /** A list of strings (`of` says of what), or null when `orNull` says what null means. */
  | (FieldBase & { readonly kind: 'list'; readonly of: string; readonly orNull?: string });

export type Schema = Readonly<Record<string, ArgSpec>>;

/** The checked value of one field. */
export type ArgValue<S extends ArgSpec> = S extends { kind: 'string' }
  ? string
  : S extends { kind: 'boolean' }
    ? boolean
    : S extends { kind: 'enum'; values: readonly (infer V)[] }
      ? V
      : S extends { kind: 'list'; orNull: string }
        ? string[] | null
        : S extends { kind: 'list' }
          ? string[]
          : number;

type RequiredKeys<S extends Schema> = { [K in keyof S]: S[K] extends { required: true } ? K : never }[keyof S];

/** A request's checked arguments: required fields always present, optional ones when given. */
export type Args<S extends Schema> = { -readonly [K in RequiredKeys<S>]: ArgValue<S[K]> } & {
  -readonly [K in Exclude<keyof S, RequiredKeys<S>>]?: ArgValue<S[K]>;
};

/** A parse failure of a size or duration (its message names the field) is an invalid argument. */
function parsed<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw new InvalidArgument((e as Error).message, { cause: e });
  }
}

function checkField(key: string, spec: ArgSpec, v: unknown): unknown {
  switch (spec.kind) {
    case 'string':
      if (typeof v !== 'string' || v === '') throw new InvalidArgument(`"${key}" must be a non-empty string`);
      return v;
    case 'integer':
      if (!Number.isInteger(v) || (v as number) < 0) throw new InvalidArgument(`"${key}" must be a non-negative integer`);
      return v;
    case 'boolean':
      if (typeof v !== 'boolean') throw new InvalidArgument(`"${key}" must be true or false`);
      return v;
    case 'size':
      return parsed(() => parseSize(v, key));
    case 'duration': {
      const ms = parsed(() => parseDurationMs(v, key));
      if (spec.positive && !(ms > 0)) throw new InvalidArgument(`"${key}" must be more than 0`);
      return ms;
    }
    case 'enum':
      if (!spec.values.includes(v as string)) throw new InvalidArgument(`"${key}" must be one of ${spec.values.join(', ')}`);
      return v;
    case 'list':
      if (v === null && spec.orNull !== undefined) return null;
      if (!(Array.isArray(v) && v.every((x) => typeof x === 'string')))
        throw new InvalidArgument(`"${key}" must be a list of ${spec.of}${spec.orNull !== undefined ? `, or null ${spec.orNull}` : ''}`);
      return v;
  }
}

/** The request's arguments checked against `schema`, in the schema's order; throws InvalidArgument (EINVAL) at the first bad one. */
export function checkArgs<S extends Schema>(schema: S, request: Readonly<Record<string, unknown>>): Args<S> {
  const out: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(schema)) {
    const v = Object.hasOwn(request, key) ? request[key] : undefined;
    if (v === undefined && !spec.required) continue;
    out[key] = checkField(key, spec, v);
  }
  return out as Args<S>;
}
