/** Transitional (issue 10): the rate limiter lives in src/util/token-bucket.ts, shared by the throttle filter and the copy engine. */
export { TokenBucket } from '../util/token-bucket.js';
