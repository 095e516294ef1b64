/**
 * Handshakes: oldstyle (one export per port, a 152-byte greeting) and fixed
 * newstyle with option haggling (proto.md "Newstyle negotiation").
 * The option loop is bounded in count, option size and total time; a bad magic
 * or unknown client flag ends the connection.
 */
import * as C from '../protocol/constants.js';
import * as codec from '../protocol/codec.js';
import type { Connection } from './connection.js';
import type { Export, ExportRegistry, MetaContext } from './export.js';
import { BLOCK_SIZE_MINIMUM, BLOCK_SIZE_PREFERRED } from './export.js';

/** What a successful handshake hands to the transmission phase. */
export interface Negotiated {
  export: Export;
  structuredReplies: boolean;
  metaContexts: MetaContext[];
}

export interface HandshakeLimits {
  /** Options accepted before the client is dropped. */
  maxOptions: number;
  /** Option payloads above this are skipped and refused with ERR_TOO_BIG (or ERR_UNSUP when unknown). */
  maxOptionLength: number;
}

/** Option replies queued for a client before its further options wait. */
const MAX_QUEUED_OPTION_REPLIES = 64 * 1024;

export const DEFAULT_HANDSHAKE_LIMITS: HandshakeLimits = { maxOptions: 1024, maxOptionLength: 64 * 1024 };

/** TLS as the server offers it (proto.md "TLS support"): SELECTIVETLS-like "on", or FORCEDTLS "require". */
export interface TlsPolicy {
  mode: 'on' | 'require';
  options: import('node:tls').TLSSocketOptions;
}

/** The server's say on whether this connection may attach to an export now (ACL, limits): a reason to refuse, or undefined. */
export type Admission = (exp: Export, conn: Connection) => string | undefined;

/** Thrown to end the connection with the reason logged. */
export class HandshakeError extends Error {
  override readonly name = 'HandshakeError';
}

export function oldstyleHandshake(conn: Connection, exp: Export): Negotiated {
  conn.send(codec.encodeOldstyleGreeting(exp.size, exp.transmissionFlags(false)));
  return { export: exp, structuredReplies: false, metaContexts: [] };
}

const KNOWN_OPTIONS = new Set([
  C.NBD_OPT_EXPORT_NAME,
  C.NBD_OPT_ABORT,
  C.NBD_OPT_LIST,
  C.NBD_OPT_INFO,
  C.NBD_OPT_GO,
  C.NBD_OPT_STRUCTURED_REPLY,
  C.NBD_OPT_LIST_META_CONTEXT,
  C.NBD_OPT_SET_META_CONTEXT,
]);

/** Runs fixed newstyle negotiation; resolves with the chosen export, or null when the client aborted. */
export async function newstyleHandshake(
  conn: Connection,
  exports: ExportRegistry,
  limits: HandshakeLimits = DEFAULT_HANDSHAKE_LIMITS,
  admit: Admission = () => undefined,
  tlsPolicy?: TlsPolicy,
): Promise<Negotiated | null> {
  /** FORCEDTLS: before TLS, every option but STARTTLS and ABORT gets ERR_TLS_REQD. */
  const tlsRequired = () => tlsPolicy?.mode === 'require' && !conn.tls;
  const refusalFor = (exp: Export, contexts: MetaContext[]) => admit(exp, conn) ?? admissionRefusal(exp, contexts);
  conn.send(codec.encodeNewstyleGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
  const clientFlags = (await conn.read(4)).readUInt32BE(0);
  if (clientFlags & ~C.KNOWN_CLIENT_FLAGS) throw new HandshakeError(`unknown client flags 0x${clientFlags.toString(16)}`);
  const noZeroes = (clientFlags & C.NBD_FLAG_C_NO_ZEROES) !== 0;

  let structuredReplies = false;
  /** Contexts chosen by SET_META_CONTEXT, valid only for the export they were chosen on. */
  let chosen: { exportName: string; contexts: MetaContext[] } | undefined;
  const reply = (option: number, type: number, payload?: Buffer) => conn.send(codec.encodeOptionReply(option, type, payload));
  const refuse = (option: number, type: number, why: string) => {
    conn.log.info('option-refused', { option, reply: type & 0x7fffffff, cause: why });
    conn.send(codec.encodeOptionError(option, type, why));
  };

  /** Decodes an option payload, answering ERR_INVALID when it is malformed. */
  const decodeOrRefuse = <T>(option: number, decode: () => T): T | undefined => {
    try {
      return decode();
    } catch (e) {
      refuse(option, C.NBD_REP_ERR_INVALID, (e as Error).message);
      return undefined;
    }
  };
  /** The export each name stood for when this negotiation first asked about it. */
  const met = new Map<string, Export>();
  const replacedSinceMet = (name: string, exp: Export): boolean => {
    const before = met.get(name);
    return before !== undefined && before !== exp;
  };
  /**
   * Finds the named export, answering ERR_UNKNOWN when there is none, and ERR_POLICY when
   * it is no longer the export this negotiation met under that name (replaced meanwhile, as
   * a post-copy hand-over replaces it): what was listed or chosen for the old one must not
   * meet the new one in transmission, so the client connects again and asks the new one.
   */
  const lookupOrRefuse = (option: number, name: string): Export | undefined => {
    const exp = exports.get(name);
    if (!exp) {
      refuse(option, C.NBD_REP_ERR_UNKNOWN, `no export named ${quoted(name)}`);
      return undefined;
    }
    if (replacedSinceMet(name, exp)) {
      refuse(option, C.NBD_REP_ERR_POLICY, `export ${quoted(name)} changed during this negotiation (it was handed over or replaced): connect again`);
      return undefined;
    }
    met.set(name, exp);
    return exp;
  };

  for (let count = 0; ; count++) {
    if (count >= limits.maxOptions) throw new HandshakeError(`more than ${limits.maxOptions} options`);
    // A client that sends options but never reads the replies is not read from until it does.
    await conn.drained(MAX_QUEUED_OPTION_REPLIES);
    const head = codec.decodeOptionHeader(await conn.read(codec.OPTION_HEADER_LENGTH));
    if (head.magic !== C.NBD_IHAVEOPT) throw new HandshakeError(`bad option magic 0x${head.magic.toString(16)}`);
    const { option, length } = head;

    if (option === C.NBD_OPT_EXPORT_NAME) {
      // No way to answer an error here: an unknown name (or a missing TLS upgrade) ends the connection.
      if (tlsRequired()) throw new HandshakeError('NBD_OPT_EXPORT_NAME without TLS, which this server requires');
      if (length > C.MAX_STRING_LENGTH) throw new HandshakeError(`export name of ${length} bytes`);
      const name = (await conn.read(length)).toString('utf8');
      const exp = exports.get(name);
      if (!exp) throw new HandshakeError(`NBD_OPT_EXPORT_NAME for unknown export ${quoted(name)}`);
      if (replacedSinceMet(name, exp)) throw new HandshakeError(`NBD_OPT_EXPORT_NAME: export ${quoted(name)} changed during this negotiation`);
      const why = refusalFor(exp, contextsFor(chosen, exp));
      if (why) throw new HandshakeError(why);
      conn.send(codec.encodeExportNameReply(exp.size, exp.transmissionFlags(structuredReplies), noZeroes));
      return enter(conn, { export: exp, structuredReplies, metaContexts: contextsFor(chosen, exp) });
    }

    if (length > limits.maxOptionLength) {
      await conn.discard(length);
      if (KNOWN_OPTIONS.has(option)) refuse(option, C.NBD_REP_ERR_TOO_BIG, `option payload of ${length} bytes is too big`);
      else refuse(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
      continue;
    }
    const payload = await conn.read(length);

    if (tlsRequired() && option !== C.NBD_OPT_STARTTLS && option !== C.NBD_OPT_ABORT) {
      refuse(option, C.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      continue;
    }

    switch (option) {
      case C.NBD_OPT_ABORT:
        reply(option, C.NBD_REP_ACK);
        return null;

      case C.NBD_OPT_LIST:
        if (length !== 0) {
          refuse(option, C.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        // Exports this client may not attach to (address lists) are not listed.
        for (const e of exports.list())
          if (e.acl?.allows(conn.remoteAddress) !== false) reply(option, C.NBD_REP_SERVER, codec.encodeServerEntry(e.name, e.description));
        reply(option, C.NBD_REP_ACK);
        break;

      case C.NBD_OPT_STRUCTURED_REPLY:
        if (length !== 0) {
          refuse(option, C.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          break;
        }
        structuredReplies = true;
        reply(option, C.NBD_REP_ACK);
        break;

      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO: {
        const req = decodeOrRefuse(option, () => codec.decodeInfoRequest(payload));
        const exp = req && lookupOrRefuse(option, req.name);
        if (!req || !exp) break;
        const why = refusalFor(exp, contextsFor(chosen, exp));
        if (why) {
          refuse(option, C.NBD_REP_ERR_POLICY, why);
          break;
        }
        reply(option, C.NBD_REP_INFO, codec.encodeInfoExport(exp.size, exp.transmissionFlags(structuredReplies)));
        if (req.infos.includes(C.NBD_INFO_NAME)) reply(option, C.NBD_REP_INFO, codec.encodeInfoString(C.NBD_INFO_NAME, exp.name));
        if (req.infos.includes(C.NBD_INFO_DESCRIPTION) && exp.description)
          reply(option, C.NBD_REP_INFO, codec.encodeInfoString(C.NBD_INFO_DESCRIPTION, exp.description));
        // Sent whether asked or not: our constraints are ones any client already meets.
        reply(option, C.NBD_REP_INFO, codec.encodeInfoBlockSize(BLOCK_SIZE_MINIMUM, BLOCK_SIZE_PREFERRED, C.MAX_PAYLOAD));
        reply(option, C.NBD_REP_ACK);
        if (option === C.NBD_OPT_GO) return enter(conn, { export: exp, structuredReplies, metaContexts: contextsFor(chosen, exp) });
        break;
      }

      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT: {
        const listing = option === C.NBD_OPT_LIST_META_CONTEXT;
        if (!structuredReplies) {
          refuse(option, C.NBD_REP_ERR_INVALID, 'metadata contexts need NBD_OPT_STRUCTURED_REPLY first');
          break;
        }
        const req = decodeOrRefuse(option, () => codec.decodeMetaContextRequest(payload));
        const exp = req && lookupOrRefuse(option, req.name);
        if (!req || !exp) break;
        const found = new Map<number, MetaContext>();
        const queries = listing && req.queries.length === 0 ? [''] : req.queries;
        for (const q of queries) for (const m of exp.matchContexts(q, listing)) found.set(m.id, m);
        for (const m of found.values()) reply(option, C.NBD_REP_META_CONTEXT, codec.encodeMetaContextReply(m.id, m.name));
        if (!listing) chosen = { exportName: exp.name, contexts: [...found.values()] };
        reply(option, C.NBD_REP_ACK);
        break;
      }

      case C.NBD_OPT_STARTTLS:
        if (!tlsPolicy) {
          refuse(option, C.NBD_REP_ERR_UNSUP, 'TLS is not enabled on this server (--tls)');
          break;
        }
        if (conn.tls) {
          refuse(option, C.NBD_REP_ERR_INVALID, 'TLS is already active');
          break;
        }
        if (length !== 0) {
          refuse(option, C.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          break;
        }
        reply(option, C.NBD_REP_ACK);
        try {
          await conn.startTls(tlsPolicy.options);
        } catch (e) {
          throw new HandshakeError(`TLS handshake failed: ${(e as Error).message}`);
        }
        break;

      default:
        refuse(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}

/** Why a client may not attach to this export now, if it may not: the export's own rule (an incoming migration's). */
function admissionRefusal(exp: Export, contexts: MetaContext[]): string | undefined {
  return exp.admission(contexts);
}

/** The connection enters transmission with `exp`: the export's extension hears of it (a migration source binds). */
function enter(conn: Connection, n: Negotiated): Negotiated {
  n.export.attached(n.metaContexts, conn.remoteAddress ?? 'unix socket');
  return n;
}

/** A client-chosen name for messages and logs, cut short: a 4 KiB name per refusal would flood both. */
function quoted(name: string): string {
  return name.length <= 64 ? JSON.stringify(name) : `${JSON.stringify(name.slice(0, 64))}... (${Buffer.byteLength(name)} bytes)`;
}

function contextsFor(chosen: { exportName: string; contexts: MetaContext[] } | undefined, exp: Export): MetaContext[] {
  // Contexts chosen for another export do not carry over (proto.md, NBD_OPT_SET_META_CONTEXT).
  return chosen && chosen.exportName === exp.name ? chosen.contexts : [];
}
