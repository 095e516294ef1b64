/**
 * `npm run bench`: nbd-migrate against qemu-nbd and nbdkit's file plugin,
 * serving the same random-filled raw image on tmpfs over 127.0.0.1, measured
 * with the same fio nbd-engine jobs. Prints a table of medians and ratios,
 * writes the samples as JSON. A benchmark, not a test: it asserts nothing
 * (except that the mirror suite's copies equal their source: a mismatch makes
 * the run exit 1).
 *
 * Two suites (BENCH_SUITES): "fio" (below) and "mirror" (mirror.ts: copy
 * speed against nbdcopy and qemu-img, cutover pause under load, bitmap memory).
 *
 * Each sample starts the server fresh, runs one fio job, and stops it. Servers
 * are interleaved job by job, and the server order rotates every round, so
 * slow drifts in the (noisy, 2-core) machine's speed spread over all of them.
 * Settings: see config.ts (BENCH_SERVERS, BENCH_JOBS, BENCH_REPEAT, ...).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { qemuNbdArgs } from '../test/helpers/peers.js';
import { run, which } from '../test/helpers/tools.js';
import { BenchConfigError, loadConfig, type BenchConfig } from './config.js';
import { sampleRounds } from './fio-sample.js';
import { createImage, removeBenchFiles, removeImage } from './image.js';
import { COPY_METHOD_TOOLS, copyCommand } from './copyspeed.js';
import { cutoverFioArgs } from './cutover.js';
import { cutover4Settings } from './cutover4.js';
import { estimateMirrorSec, formatMirrorResults, runMirrorSuite, type MirrorResults } from './mirror.js';
import { MIRROR_EXPORT, QEMU_NBD_TARGET_SETTINGS, removeSocketDir } from './mirrorjob.js';
import { firstLine, Interrupted, runningCommands } from './proc.js';
import { formatResults, summarise, type Sample } from './report.js';
import { freePort, SERVER_TOOLS, serverCommand, startServer, type ServerName } from './servers.js';
import { estimateBlockdevSec, formatBlockdev, runBlockdevSuite, type BlockdevResults } from './blockdev.js';
import { estimateDiskSec, formatDisk, runDiskSuite, type DiskResults } from './disk.js';

/** Seconds of overhead per sample besides fio's runtime (server start/stop, fio start), for the time estimate. */
const SAMPLE_OVERHEAD_SEC = 1;
/** Allowance for fio's start-up and handshake before its ramp time begins. */

let interrupted = false;
let imagePath: string | undefined;

function fail(message: string, code = 2): never {
  process.stderr.write(`bench: ${message}\n`);
  process.exit(code);
}

/** The tools this run needs, by path; exits naming the Debian package of any that is missing. */
async function requireTools(cfg: BenchConfig): Promise<{ fio: string }> {
  const fioSuite = cfg.suites.includes('fio');
  const mirror = cfg.suites.includes('mirror') ? cfg.mirror.rows : [];
  const needed: { cmd: string; pkg: string; why: string }[] = [];
  if (fioSuite || mirror.includes('cutover') || mirror.includes('bitmap')) needed.push({ cmd: 'fio', pkg: 'fio', why: '' });
  if (fioSuite) for (const s of cfg.servers) if (s !== 'nbd-migrate') needed.push({ ...SERVER_TOOLS[s], why: 'or leave that server out with BENCH_SERVERS=...' });
  if (mirror.includes('copy') || (mirror.includes('cutover') && cfg.mirror.cutoverTarget === 'qemu-nbd'))
    needed.push({ cmd: 'qemu-nbd', pkg: 'qemu-utils', why: 'the mirror target; or BENCH_SUITES=fio' });
  if (mirror.includes('cutover4') && cutover4Settings().targets.includes('qemu-nbd'))
    needed.push({ cmd: 'qemu-nbd', pkg: 'qemu-utils', why: 'a cutover4 target; or BENCH_CUTOVER4_TARGETS=nbd-migrate' });
  if (mirror.includes('readcache') || mirror.includes('fill')) needed.push({ cmd: 'nbdkit', pkg: 'nbdkit', why: 'the readcache target and the fill source; or leave those rows out with BENCH_MIRROR_ROWS=...' });
  if (mirror.includes('fill')) {
    needed.push({ cmd: 'nbdcopy', pkg: 'libnbd-bin', why: 'a copier of the fill row; or leave it out with BENCH_MIRROR_ROWS=...' });
    needed.push({ cmd: 'qemu-img', pkg: 'qemu-utils', why: 'a copier of the fill row, and qemu-img compare; or leave it out with BENCH_MIRROR_ROWS=...' });
  }
  if (mirror.includes('cutover') && cfg.mirror.cutoverTarget === 'nbdkit') needed.push({ cmd: 'nbdkit', pkg: 'nbdkit', why: 'the cutover target; or BENCH_CUTOVER_TARGET=qemu-nbd' });
  if (mirror.includes('copy')) {
    needed.push({ cmd: 'qemu-img', pkg: 'qemu-utils', why: 'qemu-img compare verifies the copies; or BENCH_SUITES=fio' });
    for (const m of cfg.mirror.copyMethods) {
      const t = COPY_METHOD_TOOLS[m];
      if (t) needed.push({ ...t, why: 'or leave that copier out with BENCH_COPY_METHODS=...' });
    }
  }
  const unique = needed.filter((t, i) => needed.findIndex((u) => u.cmd === t.cmd) === i);
  const found = await Promise.all(unique.map((t) => which(t.cmd)));
  const missing = unique.filter((_, i) => found[i] === null);
  if (missing.length)
    fail(
      missing
        .map((t) => `${t.cmd} not found on PATH; install the Debian package "${t.pkg}" (apt-get install ${t.pkg})${t.why ? `\n       (${t.why})` : ''}`)
        .join('\n       '),
    );
  if ((fioSuite && cfg.servers.includes('nbd-migrate')) || mirror.length > 0) {
    if (!fs.existsSync(cfg.nbdMigrateBin)) fail(`nbd-migrate not found at ${cfg.nbdMigrateBin}`);
    const main = path.join(path.dirname(cfg.nbdMigrateBin), '..', 'dist', 'src', 'cli', 'main.js');
    if (!fs.existsSync(main)) fail(`nbd-migrate is not built (${main} is missing); run \`npm run build\` first`);
  }
  return { fio: (await which('fio')) ?? 'fio' };
}

async function gitDescribe(repoRoot: string): Promise<{ commit: string | null; dirty: boolean | null }> {
  try {
    const commit = await run('git', ['rev-parse', 'HEAD'], { cwd: repoRoot });
    const status = await run('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: repoRoot });
    if (commit.code !== 0 || status.code !== 0) return { commit: null, dirty: null };
    return { commit: commit.stdout.trim(), dirty: status.stdout.trim() !== '' };
  } catch {
    return { commit: null, dirty: null };
  }
}

/** A server of the fio suite serving `image`, started for one sample (a server that cannot start ends the run: a setup problem, not a data point). */
async function startFioServer(cfg: BenchConfig, image: string, server: ServerName) {
  return startServer(server, { image, port: await freePort(), nbdMigrateBin: cfg.nbdMigrateBin });
}

/**
 * Stops the commands still running and deletes the files; safe to call more
 * than once. Each sample stops its servers itself, and the test helpers kill
 * any still alive when the process exits.
 */
async function cleanUp(): Promise<void> {
  for (const c of runningCommands) c.kill('SIGKILL');
  removeSocketDir();
  removeBenchFiles();
  if (imagePath) {
    removeImage(imagePath);
    imagePath = undefined;
  }
}

/** Last resort on process exit: synchronous, so only signals and unlink (the helpers SIGKILL their servers). */
function cleanUpSync(): void {
  for (const c of runningCommands) c.kill('SIGKILL');
  removeSocketDir();
  removeBenchFiles();
  if (imagePath) removeImage(imagePath);
}

function onSignal(sig: NodeJS.Signals): void {
  if (interrupted) {
    // Second signal: do not wait for graceful shutdowns.
    cleanUpSync();
    process.exit(130);
  }
  interrupted = true;
  process.stderr.write(`\nbench: ${sig}: stopping servers and removing the image (again to force)\n`);
  for (const c of runningCommands) c.kill('SIGTERM');
}

async function main(): Promise<void> {
  let cfg: BenchConfig;
  try {
    cfg = loadConfig();
    if (cfg.suites.includes('mirror') && cfg.mirror.rows.includes('cutover4')) cutover4Settings(); // BENCH_CUTOVER4_* checked here, before anything starts
  } catch (e) {
    if (e instanceof BenchConfigError) fail(e.message);
    throw e;
  }
  const { fio } = await requireTools(cfg);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', cleanUpSync);

  const fioSuite = cfg.suites.includes('fio');
  const mirrorSuite = cfg.suites.includes('mirror') && cfg.mirror.rows.length > 0;
  const total = fioSuite ? cfg.repeat * cfg.jobs.length * cfg.servers.length : 0;
  const blockdevSuite = cfg.suites.includes('blockdev');
  const diskSuite = cfg.suites.includes('disk');
  const estimate =
    total * (cfg.runtimeSec + cfg.rampSec + SAMPLE_OVERHEAD_SEC) +
    (mirrorSuite ? estimateMirrorSec(cfg.mirror) : 0) +
    (blockdevSuite ? estimateBlockdevSec(cfg) : 0) +
    (diskSuite ? estimateDiskSec(cfg) : 0);
  const gib = cfg.imageSize / 1024 ** 3;
  const header = fioSuite
    ? `nbd-migrate benchmark: fio ${cfg.jobs.join(', ')} via the nbd engine (1 connection, iodepth ${cfg.iodepth}, ` +
      `${cfg.runtimeSec} s + ${cfg.rampSec} s ramp) against ${cfg.servers.join(', ')}; ` +
      `${gib >= 1 ? `${gib} GiB` : `${cfg.imageSize / 1024 ** 2} MiB`} random raw image on tmpfs; ${os.cpus().length} CPUs`
    : `nbd-migrate benchmark: ${[mirrorSuite ? `mirror suite (${cfg.mirror.rows.join(', ')})` : '', blockdevSuite ? 'blockdev suite' : '', diskSuite ? 'disk suite' : ''].filter(Boolean).join(' and ')} only; ${os.cpus().length} CPUs`;
  const runs = [
    fioSuite ? `${total} fio runs` : '',
    mirrorSuite ? `mirror rows ${cfg.mirror.rows.join(', ')}` : '',
    blockdevSuite ? `${cfg.repeat * cfg.jobs.length * 2} blockdev fio runs` : '',
    diskSuite ? `${cfg.repeat * cfg.jobs.length * 2} disk fio runs` : '',
  ]
    .filter(Boolean)
    .join(' + ');
  process.stderr.write(`${header}\n${runs}, about ${Math.ceil(estimate / 60)} min\n`);

  const t0 = Date.now();
  const loadBefore = os.loadavg();
  const samples: Sample[] = [];
  const mirror: MirrorResults = { mismatches: [] };
  const bdev: { blockdev?: BlockdevResults } = {};
  const disk: { disk?: DiskResults } = {};
  const partial = () => {
    if (samples.length) process.stdout.write(formatResults(summarise(samples, cfg.jobs, cfg.servers), samples, cfg.servers, cfg.repeat) + '\n');
    if (mirror.copy || mirror.cutover || mirror.cutover4 || mirror.bitmap || mirror.actlog) process.stdout.write('\n' + formatMirrorResults(mirror) + '\n');
  };

  try {
    if (fioSuite) {
      imagePath = await createImage(cfg.imageSize);
      process.stderr.write(`image ${imagePath} written in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
      const image = imagePath;
      await sampleRounds(
        { cfg, fio, stopRequested: () => interrupted, progress: (line) => process.stderr.write(line + '\n') },
        '',
        cfg.servers,
        (server) => startFioServer(cfg, image, server),
        (all) => samples.splice(0, samples.length, ...all),
      );
      // The fio image is not needed by the mirror suite: free the tmpfs space now.
      removeImage(imagePath);
      imagePath = undefined;
    }
    if (mirrorSuite) {
      await runMirrorSuite(
        { cfg, fio, stopRequested: () => interrupted, progress: (line) => process.stderr.write(line + '\n') },
        mirror,
      );
    }
    if (blockdevSuite) await runBlockdevSuite({ cfg, fio, stopRequested: () => interrupted, progress: (line) => process.stderr.write(line + '\n') }, bdev);
    if (diskSuite) await runDiskSuite({ cfg, fio, stopRequested: () => interrupted, progress: (line) => process.stderr.write(line + '\n') }, disk);
  } catch (e) {
    await cleanUp();
    if (e instanceof Interrupted || interrupted) {
      if (samples.length || mirror.copy || mirror.cutover || mirror.cutover4 || mirror.bitmap || mirror.actlog) {
        process.stdout.write(`\n(interrupted${fioSuite ? ` after ${samples.length}/${total} fio runs` : ''}; partial results, nothing written)\n`);
        partial();
      }
      process.exit(130);
    }
    fail(e instanceof Error ? (e.stack ?? e.message) : String(e), 1);
  }
  await cleanUp();

  const rows = summarise(samples, cfg.jobs, cfg.servers);
  process.stdout.write(`\n${header}\n`);
  if (fioSuite) process.stdout.write(formatResults(rows, samples, cfg.servers, cfg.repeat) + '\n');
  if (mirrorSuite) process.stdout.write((fioSuite ? '\n' : '') + formatMirrorResults(mirror) + '\n');
  if (bdev.blockdev) process.stdout.write('\n' + formatBlockdev(bdev.blockdev) + '\n');
  if (disk.disk) process.stdout.write('\n' + formatDisk(disk.disk) + '\n');

  const placeholder = { image: 'IMAGE', port: 0, nbdMigrateBin: cfg.nbdMigrateBin };
  const doc = {
    date: new Date(t0).toISOString(),
    durationSec: Math.round((Date.now() - t0) / 1000),
    // The checkout whose nbd-migrate was measured (BENCH_NBD_MIGRATE may point outside this one).
    git: await gitDescribe(path.resolve(path.dirname(cfg.nbdMigrateBin), '..')),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? null, memBytes: os.totalmem(), loadavgBefore: loadBefore, loadavgAfter: os.loadavg() },
    versions: {
      node: process.version,
      fio: (await firstLine(fio, ['--version'])) ?? null,
      qemuNbd: (await firstLine('qemu-nbd', ['--version'])) ?? null,
      nbdkit: (await firstLine('nbdkit', ['--version'])) ?? null,
      qemuImg: (await firstLine('qemu-img', ['--version'])) ?? null,
      nbdcopy: (await firstLine('nbdcopy', ['--version'])) ?? null,
    },
    settings: {
      suites: cfg.suites,
      servers: cfg.servers,
      jobs: cfg.jobs,
      repeat: cfg.repeat,
      nbdMigrateBin: cfg.nbdMigrateBin,
      runtimeSec: cfg.runtimeSec,
      rampSec: cfg.rampSec,
      iodepth: cfg.iodepth,
      imageSize: cfg.imageSize,
      image: 'random data on tmpfs',
      units: { bw: 'MB/s = 10^6 bytes/s', iops: 'IO/s', copy: 'seconds, wall clock', latency: 'ms' },
      commands: Object.fromEntries(cfg.servers.map((s) => [s, serverCommand(s, placeholder)])),
      mirror: {
        ...cfg.mirror,
        commands: {
          target: { cmd: 'qemu-nbd', args: qemuNbdArgs('DST', MIRROR_EXPORT, 0, QEMU_NBD_TARGET_SETTINGS) },
          source: { cmd: 'node', args: [cfg.nbdMigrateBin, 'serve', 'SRC', '--name', MIRROR_EXPORT, '--admin-socket', 'SOCK', '--listen', '127.0.0.1', '--port', '0', '--log-format', 'json'] },
          copiers: Object.fromEntries(cfg.mirror.copyMethods.map((m) => [m, copyCommand(m, 'SRC', 'nbd://127.0.0.1:PORT/vm1', cfg.nbdMigrateBin) ?? 'admin socket: {"cmd":"mirror","export":"vm1","target":"nbd://127.0.0.1:PORT/vm1","cutover":"auto"}'])),
          cutoverFio: ['fio', ...cutoverFioArgs('nbd://127.0.0.1:PORT/vm1', cfg.mirror.cutoverRuntimeSec, cfg.mirror.cutoverIodepth, 'LOGDIR/cut')],
        },
      },
    },
    rows,
    samples,
    mirror: mirrorSuite ? mirror : null,
    blockdev: bdev.blockdev ?? null,
    disk: disk.disk ?? null,
  };
  fs.mkdirSync(path.dirname(cfg.outFile), { recursive: true });
  fs.writeFileSync(cfg.outFile, JSON.stringify(doc, null, 2) + '\n');
  const rel = path.relative(process.cwd(), cfg.outFile);
  process.stdout.write(`\nresults: ${rel && !rel.startsWith('..') ? rel : cfg.outFile}\n`);
  if (mirror.mismatches.length) {
    process.stderr.write(`bench: ${mirror.mismatches.length} copy verification failure(s):\n${mirror.mismatches.map((x) => `  ${x}`).join('\n')}\n`);
    process.exit(1);
  }
}

await main();
