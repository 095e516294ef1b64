/**
 * `nbd-migrate copy` started without the command-line library: loading and running
 * yargs cost about 0.1 s of CPU per copy (a CPU profile of `copy`: yargs, cliui,
 * wrap-ansi and their compilation, a third of the start-up), which a one-shot copy
 * pays in full. bin/nbd-migrate asks runFastCopy() first; only the plain forms are
 * taken here (plain-args.ts, with exactly two operands). Anything else returns
 * undefined and goes through main.ts, which gives the same copy or the usual message.
 */
import { configureLogFromOptions, type Level, type LogFormatOption } from '../util/log.js';
import { exitFatal } from './fatal.js';
import { LOG_OPTIONS, logOptionsFrom, parsePlainArgs } from './plain-args.js';
import { COPY_OPTIONS, copyCommand, copyOptionsFrom, type CopyArgs, type CopyCommandOptions } from './copy.js';

export interface FastCopy {
  src: string;
  dst: string;
  opts: CopyCommandOptions;
  logFormat: LogFormatOption;
  logLevel: Level;
}

/** The arguments after `copy`, when they are a plain copy; undefined otherwise (main.ts decides). */
export function parseFastCopy(args: readonly string[]): FastCopy | undefined {
  const p = parsePlainArgs(args, { ...COPY_OPTIONS, ...LOG_OPTIONS });
  if (!p || p.operands.length !== 2) return undefined;
  const v = p.values as CopyArgs & Record<string, unknown>;
  const connections = v.connections as unknown as string | undefined;
  // A count main.ts would take as it is; anything else is main.ts's to refuse, with its message.
  if (connections !== undefined && !/^[1-9]\d{0,5}$/.test(connections)) return undefined;
  const parsed: CopyArgs = {
    'max-bandwidth': v['max-bandwidth'],
    progress: v.progress,
    'changed-since': v['changed-since'],
    json: v.json,
    connections: connections === undefined ? undefined : Number(connections),
  };
  return { src: p.operands[0]!, dst: p.operands[1]!, opts: copyOptionsFrom(parsed), ...logOptionsFrom(p.values) };
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
    exitFatal(e);
  }
  return true;
}
