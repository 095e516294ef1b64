// Shared pieces of the migration tests: the writer, ctl; peers, ports and the job wait from test/helpers.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { jobStatus, waitForJob } from '../helpers/admin.js';
import { freePort, waitForPort } from '../helpers/net.js';
import { CLI, REPO_ROOT } from '../helpers/server.js';
import { requirePythonNbd, run, SYSTEM_PYTHON, type RunResult } from '../helpers/tools.js';

export const WRITER = path.join(REPO_ROOT, 'test', 'migration', 'writer.py');

export { freePort, waitForPort };
export { compare, nbdkit, nbdkitArgs, qemuNbd, qemuNbdArgs, startPeer, type Proc } from '../helpers/peers.js';

export interface Writer {
  stop(): Promise<{ writes: number; errors: number; maxLatencyMs: number; firstError: string | null }>;
}

/** Starts the python3-libnbd writer; stop() ends it and returns its counts. */
export async function startWriter(uri: string, shadow: string, dir: string, opts: { block?: number; region?: number; seed?: number } = {}): Promise<Writer> {
  await requirePythonNbd();
  const stopfile = path.join(dir, `stop-${Math.random().toString(36).slice(2)}`);
  const done: Promise<RunResult> = run(SYSTEM_PYTHON, [WRITER, uri, shadow, stopfile, String(opts.block ?? 4096), String(opts.region ?? 0)], {
    timeoutMs: 300_000,
    env: { ...process.env, WRITER_SEED: String(opts.seed ?? 1) },
  });
  return {
    stop: async () => {
      fs.writeFileSync(stopfile, '');
      const r = await done;
      const line = r.stdout.trim().split('\n').pop() ?? '';
      try {
        return JSON.parse(line);
      } catch {
        throw new Error(`writer failed: code ${r.code}\n${r.stderr}\n${r.stdout}`);
      }
    },
  };
}

/** Runs `nbd-migrate ARGS` as the operator would. */
export function cli(args: string[], timeoutMs = 120_000): Promise<RunResult> {
  return run('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, CLI, ...args], { timeoutMs, cwd: REPO_ROOT });
}

export { jobStatus, waitForJob };
