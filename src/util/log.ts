/**
 * Structured logging: JSON lines when stderr is not a TTY (or when asked), readable text on a TTY.
 * Every line carries an `event` name so tests and log pipelines can match on it.
 */
export type Level = 'debug' | 'info' | 'warn' | 'error';
const LEVELS: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type Fields = Record<string, unknown>;

export interface LogConfig {
  level: Level;
  format: 'json' | 'text';
  sink: (line: string) => void;
}

const config: LogConfig = {
  level: 'info',
  format: process.stderr.isTTY ? 'text' : 'json',
  sink: (line) => process.stderr.write(line + '\n'),
};

export function configureLog(c: Partial<LogConfig>): void {
  Object.assign(config, c);
}

/** The command line's --log-format and --log-level values (every command has them). */
export const LOG_FORMATS = ['auto', 'json', 'text'] as const;
export const LOG_LEVELS: readonly Level[] = ['debug', 'info', 'warn', 'error'];
export type LogFormatOption = (typeof LOG_FORMATS)[number];

/** Logging as --log-format and --log-level ask: `auto` is text on a TTY, JSON lines otherwise. */
export function configureLogFromOptions(format: LogFormatOption, level: Level): void {
  configureLog({ format: format === 'auto' ? (process.stderr.isTTY ? 'text' : 'json') : format, level });
}

export function isLevelEnabled(level: Level): boolean {
  return LEVELS[level] >= LEVELS[config.level];
}

function serialise(v: unknown): unknown {
  if (v instanceof Error) {
    const e = v as Error & { code?: string };
    // Node's fs errors (and the native addon's, shaped like them) already begin "ENOSPC: ...".
    return e.code && !e.message.startsWith(`${e.code}:`) ? `${e.code}: ${e.message}` : e.message;
  }
  if (typeof v === 'bigint') return v.toString();
  return v;
}

export function log(level: Level, event: string, fields: Fields = {}): void {
  if (!isLevelEnabled(level)) return;
  if (config.format === 'json') {
    const rec: Fields = { time: new Date().toISOString(), level, event };
    for (const [k, v] of Object.entries(fields)) if (v !== undefined) rec[k] = serialise(v);
    config.sink(JSON.stringify(rec));
    return;
  }
  // Fields that do not apply (undefined) are left out, as JSON.stringify leaves them out of JSON lines.
  const parts = Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${JSON.stringify(serialise(v))}`);
  config.sink(`${new Date().toISOString()} ${level.toUpperCase().padEnd(5)} ${event}${parts.length ? ' ' + parts.join(' ') : ''}`);
}

/** A logger whose every line carries the given fields (connection id, export name, ...). */
export interface Logger {
  debug(event: string, fields?: Fields): void;
  info(event: string, fields?: Fields): void;
  warn(event: string, fields?: Fields): void;
  error(event: string, fields?: Fields): void;
  child(fields: Fields): Logger;
}

export function logger(base: Fields = {}): Logger {
  const at = (level: Level) => (event: string, fields?: Fields) => {
    if (isLevelEnabled(level)) log(level, event, fields ? { ...base, ...fields } : base);
  };
  return {
    debug: at('debug'),
    info: at('info'),
    warn: at('warn'),
    error: at('error'),
    child: (fields) => logger({ ...base, ...fields }),
  };
}
