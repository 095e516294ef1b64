/**
 * Whether `p` resolves within `ms`: true if it does, false if the time runs out first (`p`
 * goes on; the caller decides what to do about it). Rejects if `p` rejects in time. The
 * timer is cleared either way.
 */
export async function settledWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p.then(() => true), new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
