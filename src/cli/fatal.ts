import { isLevelEnabled, log } from '../util/log.js';

/**
 * How a command that failed ends (main.ts, and the plain copy and serve): one `fatal`
 * log line that says what is wrong, the stack only at --log-level debug and never for a
 * configuration error (its message is the whole story), exit status 1. ConfigError is
 * known by its name, so that `copy` need not load the serve configuration's modules.
 */
export function exitFatal(e: unknown): never {
  const err = e as Error | undefined;
  log('error', 'fatal', { cause: err?.message ?? String(e) });
  if (err?.name !== 'ConfigError' && isLevelEnabled('debug')) process.stderr.write(`${err?.stack}\n`);
  process.exit(1);
}
