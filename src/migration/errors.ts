import { NbdMigrateError } from '../util/errors.js';

/** Errors of the migration layer: a stable `code`, and whether retrying could help. */
export class JobError extends NbdMigrateError {
  override readonly name: string = 'JobError';
  /** Retrying will not help (a wrong target, one bound to another job, no space): the job fails at once. */
  readonly permanent: boolean;
  constructor(code: string, message: string, options?: { cause?: unknown; permanent?: boolean }) {
    super(code, message, options);
    this.permanent = options?.permanent ?? false;
  }
}
