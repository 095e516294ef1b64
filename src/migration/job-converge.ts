/**
 * Switching a mirror job's convergence on and off in the export's stack:
 * write-through (active: guest writes go to both sides) or guest throttling
 * (the rate from convergence.ts guestThrottleRate).
 */
import type { Logger } from '../util/log.js';
import type { HeldRangeLock } from '../dirty/held-ranges.js';
import type { Stack } from '../storage/stack.js';
import { guestThrottleRate } from './convergence.js';
import type { ConvergeMode } from './states.js';
import type { Target } from './target.js';

export interface EngageContext {
  stack: Stack;
  /** The target connection now (write-through needs one). */
  target: Target | undefined;
  locks: HeldRangeLock;
  writeThroughTimeoutMs: number;
  /** The measured copy rate, bytes/s (the throttle is set from it). */
  copyRate: number;
  /** Logged with the switch: 'cutover' when write-through is on only for the sweep before a cutover. */
  reason?: string;
  log: Logger;
}

/** Switches convergence on: write-through (active) or guest throttling. */
export function engage(mode: ConvergeMode, ctx: EngageContext): void {
  const { stack, log } = ctx;
  if (mode === 'active') {
    if (stack.writeThrough.writeThroughActive || !ctx.target) return;
    stack.writeThrough.setWriteThrough({
      target: ctx.target,
      locks: ctx.locks,
      timeoutMs: ctx.writeThroughTimeoutMs,
      onError: (e) => log.warn('write-through-failed', { cause: e, effect: 'range marked dirty; guest unaffected' }),
      onSlow: () => {
        // The target is slow or frozen: guests must not wait on it. The background copy catches up.
        stack.writeThrough.setWriteThrough(undefined);
        log.warn('write-through-slow', {
          timeoutMs: ctx.writeThroughTimeoutMs,
          effect: 'range marked dirty; guests are answered after their local write; back to background copying',
        });
      },
    });
    log.info('mirror-converge', ctx.reason ? { mode: 'active', reason: ctx.reason } : { mode: 'active' });
  } else {
    const rate = guestThrottleRate(ctx.copyRate);
    stack.throttle.setRate(rate);
    log.info('mirror-converge', { mode: 'throttle', guestWriteLimit: rate });
  }
}

/** Write-through and the guest throttle off. */
export function disengage(stack: Stack): void {
  stack.writeThrough.setWriteThrough(undefined);
  stack.throttle.setRate(undefined);
}
