/**
 * The plain forms of a command line, parsed without yargs. Loading yargs costs a
 * command 65-90 ms before it can start (its ESM build evaluates string-width, whose
 * Intl.Segmenter and Unicode tables are built at import; `serve` spawn to `ready`:
 * 260-279 ms with it against 189-226 ms without, interleaved). `copy` (copy-fast.ts)
 * and `serve` (serve-fast.ts) try this first and fall back to main.ts, which uses
 * yargs, for anything this does not take as yargs would.
 *
 * Taken: operands (not starting with `-`); `--name VALUE` and `--name=VALUE` for the
 * options of the table that take a value, each at most once unless the option is an
 * array (repeatable); `--flag` and `--no-flag` for its booleans, at most once each, not
 * followed by a literal `true` or `false` (yargs would take it as the flag's value). An
 * array option's value must be followed by another option or the end: yargs would take
 * the operands after it as more values. Anything else gives undefined: --help,
 * --version, short and unknown options, camelCase or abbreviated names, `--`, a value
 * that is empty or starts with `-`, a choice not offered, a value its coerce refuses
 * (main.ts then names the error as it always has).
 */

import { LOG_FORMATS, LOG_LEVELS, type Level, type LogFormatOption } from '../util/log.js';

/** One option, in the shape yargs takes it (the fields this parser needs). */
export interface PlainOption {
  readonly type?: 'string' | 'number' | 'boolean';
  readonly array?: boolean;
  readonly choices?: readonly string[];
  readonly coerce?: (v: never) => unknown;
}

export interface PlainArgs {
  operands: string[];
  /** By option name as written (kebab-case): a string, a string[] (arrays), a boolean, or what coerce made of it. */
  values: Record<string, unknown>;
}

const OPTION = /^--([a-z][a-z0-9-]*)(?:=(.*))?$/s;

export function parsePlainArgs(args: readonly string[], table: Readonly<Record<string, PlainOption>>): PlainArgs | undefined {
  const operands: string[] = [];
  const raw = new Map<string, string | string[] | boolean>();
  const known = (name: string) => Object.hasOwn(table, name);
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (!a.startsWith('-')) {
      operands.push(a);
      continue;
    }
    const m = OPTION.exec(a);
    if (!m) return undefined;
    const name = m[1]!;
    const o = known(name) ? table[name]! : undefined;
    if (o && o.type !== 'boolean') {
      const v = m[2] ?? args[++i];
      if (v === undefined || v === '' || v.startsWith('-')) return undefined;
      if (o.choices && !o.choices.includes(v)) return undefined;
      if (o.array) {
        const next = args[i + 1];
        if (next !== undefined && !next.startsWith('-')) return undefined;
        const list = (raw.get(name) as string[] | undefined) ?? [];
        list.push(v);
        raw.set(name, list);
      } else {
        if (raw.has(name)) return undefined;
        raw.set(name, v);
      }
      continue;
    }
    if (m[2] !== undefined) return undefined;
    const flag = o ? name : name.startsWith('no-') && known(name.slice(3)) && table[name.slice(3)]!.type === 'boolean' ? name.slice(3) : undefined;
    if (flag === undefined || raw.has(flag)) return undefined;
    // yargs takes a literal true or false after a flag as its value, not as an operand.
    const next = args[i + 1];
    if (next === 'true' || next === 'false') return undefined;
    raw.set(flag, flag === name);
  }
  const values: Record<string, unknown> = {};
  for (const [name, v] of raw) {
    const coerce = table[name]!.coerce as ((v: unknown) => unknown) | undefined;
    if (!coerce) {
      values[name] = v;
      continue;
    }
    try {
      values[name] = coerce(v);
    } catch {
      return undefined;
    }
  }
  return { operands, values };
}

/** The options every command has (main.ts's common(), and the plain parsers). */
export const LOG_OPTIONS = {
  'log-format': { type: 'string', choices: LOG_FORMATS, default: 'auto', describe: 'Log format on stderr (auto: text on a TTY, JSON lines otherwise)' },
  'log-level': { type: 'string', choices: LOG_LEVELS, default: 'info', describe: 'Least severe level logged' },
} as const;

/** The log options as parsed, defaults filled in. */
export function logOptionsFrom(values: Record<string, unknown>): { logFormat: LogFormatOption; logLevel: Level } {
  return {
    logFormat: (values['log-format'] ?? LOG_OPTIONS['log-format'].default) as LogFormatOption,
    logLevel: (values['log-level'] ?? LOG_OPTIONS['log-level'].default) as Level,
  };
}
