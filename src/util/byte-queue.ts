/**
 * Received chunks, consumed incrementally without joining them: a header that
 * sits inside one chunk is read in place, and a WRITE payload is handed on as
 * slices of the chunks it arrived in (the device writes them with writev).
 *
 * A chunk may have an owner (a receive slab, see server/read-slabs.ts): the queue
 * holds one reference on it per chunk and drops it once the chunk is consumed;
 * takeSlices hands the references of what it returns to the caller (`held`).
 */
export interface ChunkOwner {
  ref(): void;
  unref(): void;
}

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** chunks[i]'s owner, or undefined; kept in step with chunks. */
  private owners: Array<ChunkOwner | undefined> = [];
  private owned = 0;
  /** Offset already consumed inside chunks[0]. */
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  /** Appends a chunk; with an owner, the queue takes a reference on it until the chunk is consumed. */
  push(chunk: Buffer, owner?: ChunkOwner): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.owners.push(owner);
    if (owner) {
      owner.ref();
      this.owned++;
    }
    this.total += chunk.length;
  }

  /** Removes chunks[0], dropping its reference. */
  private shiftChunk(): void {
    this.chunks.shift();
    const o = this.owners.shift();
    if (o) {
      this.owned--;
      o.unref();
    }
    this.head = 0;
  }

  /**
   * The next `n` bytes as one Buffer: a view into the first chunk when it holds
   * them all (the common case for headers), else a copy. Does not consume.
   */
  peek(n: number): Buffer {
    if (n > this.total) throw new RangeError(`peek(${n}) with ${this.total} buffered`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    return this.copyOut(n);
  }

  private copyOut(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    for (let i = 0; copied < n; i++) {
      const c = this.chunks[i]!;
      const from = i === 0 ? this.head : 0;
      const take = Math.min(c.length - from, n - copied);
      c.copy(out, copied, from, from + take);
      copied += take;
    }
    return out;
  }

  /** Consumes `n` bytes and returns them as one Buffer (a view when possible; always a copy of owned chunks, which are reused). */
  take(n: number): Buffer {
    const b = this.owned > 0 && n > 0 ? this.copyOut(n) : this.peek(n);
    this.drop(n);
    return b;
  }

  /**
   * Consumes `n` bytes and returns them as slices of the received chunks: no copy.
   * The owners of the slices' chunks go to `held`, one reference each, which the
   * caller drops (unref) once it is done with the slices; without `held`, owned
   * chunks are refused (their memory would be reused under the slices).
   */
  takeSlices(n: number, held?: ChunkOwner[]): Buffer[] {
    if (n > this.total) throw new RangeError(`takeSlices(${n}) with ${this.total} buffered`);
    if (this.owned > 0 && !held) throw new Error('takeSlices of owned chunks needs a list for their references');
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        out.push(this.head === 0 ? c : c.subarray(this.head));
        left -= avail;
        // The queue's reference passes to the caller.
        this.chunks.shift();
        const o = this.owners.shift();
        if (o) {
          this.owned--;
          held!.push(o);
        }
        this.head = 0;
      } else {
        out.push(c.subarray(this.head, this.head + left));
        const o = this.owners[0];
        if (o) {
          o.ref();
          held!.push(o);
        }
        this.head += left;
        left = 0;
      }
    }
    this.total -= n;
    return out;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  drop(n: number): number {
    let left = Math.min(n, this.total);
    const done = left;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        left -= avail;
        this.shiftChunk();
      } else {
        this.head += left;
        left = 0;
      }
    }
    this.total -= done;
    return done;
  }

  clear(): void {
    if (this.owned > 0) for (const o of this.owners) o?.unref();
    this.chunks = [];
    this.owners = [];
    this.owned = 0;
    this.head = 0;
    this.total = 0;
  }
}
