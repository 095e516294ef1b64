/** A one-line progress display on stderr: redrawn in place on a TTY, a line every few seconds otherwise. */
import { formatBytes } from '../util/units.js';

export interface ProgressFigures {
  done: number;
  total: number;
  dirty?: number;
  rate?: number;
  etaSeconds?: number | null;
  pass?: number;
  state?: string;
}

export class ProgressBar {
  private lastPlain = 0;
  private readonly tty = process.stderr.isTTY === true;

  draw(f: ProgressFigures): void {
    const frac = f.total > 0 ? Math.min(1, f.done / f.total) : 1;
    const width = 30;
    const filled = Math.round(frac * width);
    const parts = [
      `[${'#'.repeat(filled)}${' '.repeat(width - filled)}] ${(frac * 100).toFixed(1).padStart(5)}%`,
      `${formatBytes(f.done)}/${formatBytes(f.total)}`,
    ];
    if (f.dirty !== undefined) parts.push(`dirty ${formatBytes(f.dirty)}`);
    if (f.rate) parts.push(`${formatBytes(f.rate)}/s`);
    if (f.etaSeconds !== undefined && f.etaSeconds !== null) parts.push(`ETA ${f.etaSeconds.toFixed(0)}s`);
    if (f.pass) parts.push(`pass ${f.pass}`);
    if (f.state) parts.push(f.state);
    const line = parts.join('  ');
    if (this.tty) process.stderr.write(`\r\x1b[K${line}`);
    else if (Date.now() - this.lastPlain >= 2000) {
      this.lastPlain = Date.now();
      process.stderr.write(line + '\n');
    }
  }

  end(finalLine?: string): void {
    if (this.tty) process.stderr.write('\n');
    if (finalLine) process.stderr.write(finalLine + '\n');
  }
}
