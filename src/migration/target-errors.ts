/** The target-error predicates live with the client's errors; re-exported for the migration layer's imports. */
export { CONNECTION_LOST, PERMANENT, targetErrorKind, type TargetErrorKind } from '../client/errors.js';
