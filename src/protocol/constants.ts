/**
 * NBD wire constants. Every value is from doc/proto.md in NetworkBlockDevice/nbd
 * (section names in comments); all integers travel big-endian.
 */

// ---- Handshake magics ("Newstyle negotiation", "Oldstyle negotiation") ----

/** "NBDMAGIC": first 8 bytes of every greeting, old or new style. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** Second 8 bytes of an oldstyle greeting (cliserv magic). */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** "IHAVEOPT": second 8 bytes of a newstyle greeting, and the prefix of every option request. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;

/** Oldstyle greeting: magic(8) + cliserv magic(8) + size(8) + flags(4) + 124 zero bytes. */
export const OLDSTYLE_GREETING_LENGTH = 152;
/** Zero padding after EXPORT_NAME's reply (and the oldstyle greeting), unless NO_ZEROES. */
export const ZERO_PAD_LENGTH = 124;

// ---- Handshake flags (16 bits, server -> client) ----
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// ---- Client flags (32 bits, client -> server) ----
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;
export const KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---- Transmission flags (16 bits, per export) ----
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options (client -> server, "Option types") ----
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4; // withdrawn; answered ERR_UNSUP
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11; // not implemented: ERR_UNSUP

// ---- Option reply types ("Option reply types"); errors have bit 31 set ----
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const ERR = 0x80000000;
export const NBD_REP_ERR_UNSUP = (ERR | 1) >>> 0;
export const NBD_REP_ERR_POLICY = (ERR | 2) >>> 0;
export const NBD_REP_ERR_INVALID = (ERR | 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (ERR | 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (ERR | 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (ERR | 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (ERR | 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (ERR | 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (ERR | 9) >>> 0;

// ---- Info types inside NBD_REP_INFO (INFO / GO) ----
export const NBD_INFO_EXPORT = 0; // u64 size, u16 transmission flags
export const NBD_INFO_NAME = 1; // export name
export const NBD_INFO_DESCRIPTION = 2; // human-readable description
export const NBD_INFO_BLOCK_SIZE = 3; // u32 minimum, u32 preferred, u32 maximum

// ---- Transmission: request ("Request message") ----
/** Request header: magic(4) flags(2) type(2) cookie(8) offset(8) length(4). */
export const NBD_REQUEST_MAGIC = 0x25609513;
export const REQUEST_HEADER_LENGTH = 28;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disc',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write_zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block_status',
};

// ---- Command flags (16 bits) ----
/** Valid on every command once SEND_FUA is advertised (the server must accept it, even by ignoring it). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** WRITE_ZEROES only: the zeroed range must stay allocated. */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
/** READ only, structured replies only: at most one content chunk. */
export const NBD_CMD_FLAG_DF = 1 << 2;
/** BLOCK_STATUS only: one extent per context is enough. */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
/** WRITE_ZEROES only: fail with ENOTSUP rather than zero slowly. */
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- Replies ----
/** Simple reply: magic(4) error(4) cookie(8), then READ data if error is 0. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const SIMPLE_REPLY_HEADER_LENGTH = 16;
/** Structured reply chunk: magic(4) flags(2) type(2) cookie(8) length(4). */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1; // u64 offset + data
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2; // u64 offset + u32 size
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5; // u32 context id + (u32 length, u32 flags)*
export const NBD_REPLY_TYPE_ERROR = 0x8001; // u32 error, u16 msg length, msg
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002; // ... + u64 offset

// ---- Error values ("Error values"): the only ones allowed on the wire ----
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The POSIX name of each error value the spec defines. */
export const NBD_ERROR_NAMES: Readonly<Record<number, string>> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

// ---- Metadata contexts ----
export const BASE_ALLOCATION = 'base:allocation';
/** base:allocation status flags. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// ---- Limits ----
/** Names and error strings: "MUST be no longer than 4096 bytes". */
export const MAX_STRING_LENGTH = 4096;
/** Largest READ/WRITE payload we accept (advertised as maximum block size). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** QEMU's client (NBD_MAX_MALLOC_PAYLOAD) drops a connection on a non-data payload over 1000 bytes. */
export const MAX_NON_DATA_PAYLOAD = 1000;

// ---- nbd-migrate's own extension, used only between nbd-migrate peers ----
/** Every nbd-migrate context lives in this namespace; LIST_META_CONTEXT with it shows an export's facts. */
export const MIGRATE_NAMESPACE = 'nbd-migrate:';
/**
 * Listed (and selectable, block status always 0) on every nbd-migrate export:
 * `nbd-migrate:export-id:<32 hex digits>`, the export's identity. A mirror
 * reads it to refuse itself as a target, and to know on reconnecting that the
 * same disk is still behind the address. Destinations keep it across restarts.
 */
export const EXPORT_ID_CONTEXT_PREFIX = 'nbd-migrate:export-id:';
