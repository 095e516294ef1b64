/**
 * `nbd-migrate copy` started without the command-line library: loading and running
 * yargs cost about 0.1 s of CPU per copy (a CPU profile of `copy`: yargs, cliui,
 * wrap-ansi and their compilation, a third of the start-up), which a one-shot copy
 * pays in full. bin/nbd-migrate asks parseFastCopy() first; only the plain forms are
 * taken here (two operands, the copy options spelled out, each at most once, values
 * that are not options). Anything else (--help, --version, abbreviations, camelCase,
 * a bad choice or number, `--`) returns undefined and goes through main.ts, which
 * gives the same copy or the usual message.
 */
import { configureLogFromOptions, isLevelEnabled, log, LOG_FORMATS, LOG_LEVELS, type Level, type LogFormatOption } from '../util/log.js';
import { COPY_OPTIONS, copyCommand, copyOptionsFrom, type CopyArgs, type CopyCommandOptions } from './copy.js';

export interface FastCopy {
  src: string;
  dst: string;
  opts: CopyCommandOptions;
  logFormat: LogFormatOption;
  logLevel: Level;
}

/** How an option after `copy` is given: with a value (copy's strings and numbers, the log options) or as a flag (its booleans). */
function kindOf(name: string): 'value' | 'flag' | undefined {
  if (name === 'log-format' || name === 'log-level') return 'value';
  if (!Object.hasOwn(COPY_OPTIONS, name)) return undefined;
  return COPY_OPTIONS[name as keyof typeof COPY_OPTIONS].type === 'boolean' ? 'flag' : 'value';
}

/** The arguments after `copy`, when they are a plain copy; undefined otherwise (main.ts decides). */
export function parseFastCopy(args: readonly string[]): FastCopy | undefined {
  const operands: string[] = [];
  const values = new Map<string, string>();
  const flags = new Map<string, boolean>();
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (!a.startsWith('-')) {
      operands.push(a);
      continue;
    }
    const m = /^--([a-z][a-z-]*)(?:=(.*))?$/.exec(a);
    if (!m) return undefined;
    const name = m[1]!;
    if (kindOf(name) === 'value') {
      const v = m[2] ?? args[++i];
      if (v === undefined || v === '' || v.startsWith('-') || values.has(name)) return undefined;
      values.set(name, v);
    } else if (m[2] === undefined && (kindOf(name) === 'flag' || (name.startsWith('no-') && kindOf(name.slice(3)) === 'flag'))) {
      const flag = name.startsWith('no-') ? name.slice(3) : name;
      if (flags.has(flag)) return undefined;
      flags.set(flag, !name.startsWith('no-'));
    } else return undefined;
  }
  if (operands.length !== 2) return undefined;
  const connections = values.get('connections');
  // A count main.ts would take as it is; anything else is main.ts's to refuse, with its message.
  if (connections !== undefined && !/^[1-9]\d{0,5}$/.test(connections)) return undefined;
  const logFormat = values.get('log-format') ?? 'auto';
  const logLevel = values.get('log-level') ?? 'info';
  if (!(LOG_FORMATS as readonly string[]).includes(logFormat) || !(LOG_LEVELS as readonly string[]).includes(logLevel)) return undefined;
  const parsed: CopyArgs = {
    'max-bandwidth': values.get('max-bandwidth'),
    progress: flags.get('progress'),
    'changed-since': values.get('changed-since'),
    json: flags.get('json'),
    connections: connections === undefined ? undefined : Number(connections),
  };
  return { src: operands[0]!, dst: operands[1]!, opts: copyOptionsFrom(parsed), logFormat: logFormat as LogFormatOption, logLevel: logLevel as Level };
}

/** Runs a plain copy and exits as main.ts would; false when the arguments are not plain (or a size is bad: main.ts says why). */
export async function runFastCopy(args: readonly string[]): Promise<boolean> {
  let c: FastCopy | undefined;
  try {
    c = parseFastCopy(args);
  } catch {
    return false;
  }
  if (!c) return false;
  configureLogFromOptions(c.logFormat, c.logLevel);
  try {
    await copyCommand(c.src, c.dst, c.opts);
  } catch (e) {
    const err = e as Error;
    log('error', 'fatal', { cause: err?.message ?? String(e) });
    if (isLevelEnabled('debug')) process.stderr.write(`${err?.stack}\n`);
    process.exit(1);
  }
  return true;
}
