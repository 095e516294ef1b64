/**
 * Per-export allow-lists of client addresses (IPv4 and IPv6 CIDRs), like
 * flexnbd's ACL. An export without a list admits everyone; Unix-socket clients
 * are local and not subject to address lists (the socket's file mode governs).
 */
import * as net from 'node:net';
import { NbdMigrateError } from '../util/errors.js';

export class AclError extends NbdMigrateError {
  override readonly name: string = 'AclError';
  constructor(message: string) {
    super('EINVAL', message);
  }
}

export class Acl {
  private readonly list = new net.BlockList();

  private constructor(readonly entries: readonly string[]) {}

  /** Parses "10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1"; a bad entry throws naming it. */
  static parse(entries: readonly string[]): Acl {
    const acl = new Acl(entries.map((e) => e.trim()));
    for (const entry of acl.entries) {
      const [addr, bits, extra] = entry.split('/');
      const family = net.isIPv4(addr ?? '') ? 'ipv4' : net.isIPv6(addr ?? '') ? 'ipv6' : undefined;
      if (!family || extra !== undefined) throw new AclError(`allow-list entry "${entry}" is not an address or CIDR`);
      const max = family === 'ipv4' ? 32 : 128;
      const prefix = bits === undefined ? max : Number(bits);
      if (!Number.isInteger(prefix) || prefix < 0 || prefix > max || (bits !== undefined && !/^\d+$/.test(bits)))
        throw new AclError(`allow-list entry "${entry}": prefix length must be 0-${max}`);
      acl.list.addSubnet(addr!, prefix, family);
    }
    return acl;
  }

  /** Whether a client at `address` (as a socket reports it) may attach. */
  allows(address: string | undefined): boolean {
    if (address === undefined) return true; // Unix socket
    // An IPv4 client on a dual-stack listener appears as ::ffff:a.b.c.d.
    const v4 = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)?.[1];
    if (v4) return this.list.check(v4, 'ipv4') || this.list.check(address, 'ipv6');
    return this.list.check(address, net.isIPv4(address) ? 'ipv4' : 'ipv6');
  }
}
