/** Transitional (issue 10): the range lock lives in src/util/range-lock.ts, shared by the storage filters and the copy engine. */
export { RangeLock } from '../util/range-lock.js';
