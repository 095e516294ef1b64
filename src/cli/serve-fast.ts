/**
 * `nbd-migrate serve` started without the command-line library: yargs took 65-90 ms of
 * every start (plain-args.ts). bin/nbd-migrate asks runFastServe() first; only the plain
 * forms are taken here (plain-args.ts over SERVE_OPTIONS: the IMAGE operands and serve's
 * options spelled out). Anything else returns false and goes through main.ts, which
 * serves the same or gives the usual message.
 */
import { configureLogFromOptions, type Level, type LogFormatOption } from '../util/log.js';
import { serveConfigFrom, type ServeArgs } from './config.js';
import { exitFatal } from './fatal.js';
import { LOG_OPTIONS, logOptionsFrom, parsePlainArgs } from './plain-args.js';
import { SERVE_OPTIONS } from './serve-args.js';

export interface FastServe {
  argv: ServeArgs;
  logFormat: LogFormatOption;
  logLevel: Level;
}

/** The arguments after `serve`, when they are plain; undefined otherwise (main.ts decides). */
export function parseFastServe(args: readonly string[]): FastServe | undefined {
  const p = parsePlainArgs(args, { ...SERVE_OPTIONS, ...LOG_OPTIONS });
  if (!p) return undefined;
  const { 'log-format': _f, 'log-level': _l, ...rest } = p.values;
  return { argv: { ...(rest as ServeArgs), images: p.operands }, ...logOptionsFrom(p.values) };
}

/** Serves until a signal ends it, as main.ts would; false when the arguments are not plain. */
export async function runFastServe(args: readonly string[]): Promise<boolean> {
  const s = parseFastServe(args);
  if (!s) return false;
  configureLogFromOptions(s.logFormat, s.logLevel);
  try {
    const { serveUntilSignal } = await import('./serve.js');
    await serveUntilSignal(serveConfigFrom(s.argv), () => serveConfigFrom(s.argv));
  } catch (e) {
    exitFatal(e);
  }
  return true;
}
