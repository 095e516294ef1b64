/**
 * A server-wide bound on request payload memory: bytes of WRITE payloads
 * being written and of READ data until its reply has left for the kernel.
 * Per-connection limits alone let many connections add up (five clients that
 * never read their 32 MiB READ replies pinned ~550 MiB); past this budget
 * every session stops reading new requests until memory is given back.
 */
export class MemoryBudget {
  used = 0;
  private readonly waiting = new Set<() => void>();

  constructor(readonly max: number) {}

  get exhausted(): boolean {
    return this.used >= this.max;
  }

  charge(bytes: number): void {
    this.used += bytes;
  }

  release(bytes: number): void {
    this.used -= bytes;
    if (!this.exhausted && this.waiting.size > 0) for (const fn of [...this.waiting]) fn();
  }

  /** Calls `fn` whenever memory is given back (until `unwait`). */
  wait(fn: () => void): void {
    this.waiting.add(fn);
  }

  unwait(fn: () => void): void {
    this.waiting.delete(fn);
  }
}
