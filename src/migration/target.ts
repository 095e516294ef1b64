/**
 * What the mirror needs of a target connection: a Device plus the NBD
 * connection's facts. NbdClient fits; tests substitute their own. The job,
 * the copy engine and the post-cutover forwarding device all speak it.
 */
import type { NbdClientOptions } from '../client/nbd-client.js';
import type { Device } from '../storage/device.js';

export interface Target extends Device {
  readonly readOnly: boolean;
  readonly structuredReplies: boolean;
  readonly contexts: ReadonlyMap<string, number>;
  /** What the target listed in the nbd-migrate: namespace (its identity, whether it receives a migration, its space). */
  readonly listedContexts?: readonly string[];
  /** The connection is gone (the server closed it, or it failed). */
  readonly closed?: boolean;
  /** A bare command (used for NBD_CMD_MIGRATE_COMPLETE and _RELEASE). */
  request(type: number, flags: number, offset: number, length: number): Promise<void>;
  destroy(): void;
  on(event: 'close', listener: (err?: Error) => void): unknown;
}

/** Opens one connection to a target (default: NbdClient.connect). */
export type ConnectFn = (uri: string, options: NbdClientOptions) => Promise<Target>;
