// nbd-migrate native storage helpers: the Linux calls Node's fs does not expose.
// fallocate (punch hole / zero range), the SEEK_DATA/SEEK_HOLE walk and the block
// device ioctls BLKDISCARD/BLKZEROOUT are blocking syscalls, so they run on the libuv thread pool (AsyncWorker);
// flock and the OFD byte-range locks (fcntl) are non-blocking and run inline.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <napi.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <vector>

namespace {

// An Error shaped like Node's own fs errors: message, code ('ENXIO'), errno (negative), syscall.
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall) {
  const char* code = uv_err_name(-err);
  std::string msg = std::string(code) + ": " + strerror(err) + ", " + syscall;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  return e;
}

int64_t ToOffset(const Napi::Value& v) { return static_cast<int64_t>(v.As<Napi::Number>().DoubleValue()); }

class FallocateWorker : public Napi::AsyncWorker {
 public:
  FallocateWorker(Napi::Function cb, int fd, int mode, int64_t offset, int64_t length)
      : Napi::AsyncWorker(cb), fd_(fd), mode_(mode), offset_(offset), length_(length) {}
  void Execute() override {
    int r;
    do {
      r = fallocate(fd_, mode_, offset_, length_);
    } while (r < 0 && errno == EINTR);
    err_ = r < 0 ? errno : 0;
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) Callback().Call({ErrnoError(env, err_, "fallocate").Value()});
    else Callback().Call({env.Null()});
  }

 private:
  int fd_, mode_;
  int64_t offset_, length_;
  int err_ = 0;
};

// BLKDISCARD / BLKZEROOUT on a block device: the kernel may take long (it writes zeros
// itself where the device has no offload), so they run on the thread pool.
class BlockRangeWorker : public Napi::AsyncWorker {
 public:
  BlockRangeWorker(Napi::Function cb, int fd, unsigned long op, const char* name, uint64_t offset, uint64_t length)
      : Napi::AsyncWorker(cb), fd_(fd), op_(op), name_(name), range_{offset, length} {}
  void Execute() override {
    int r;
    do {
      r = ioctl(fd_, op_, range_);
    } while (r < 0 && errno == EINTR);
    err_ = r < 0 ? errno : 0;
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) Callback().Call({ErrnoError(env, err_, name_).Value()});
    else Callback().Call({env.Null()});
  }

 private:
  int fd_;
  unsigned long op_;
  const char* name_;
  uint64_t range_[2];
  int err_ = 0;
};

// Walks [offset, offset+length) with SEEK_DATA/SEEK_HOLE and returns alternating
// runs as a flat array [length0, isHole0, length1, isHole1, ...], at most maxRuns runs.
// ENXIO from SEEK_DATA means "no more data": the rest, to EOF, is one hole.
class ExtentsWorker : public Napi::AsyncWorker {
 public:
  ExtentsWorker(Napi::Function cb, int fd, int64_t offset, int64_t length, int64_t maxRuns)
      : Napi::AsyncWorker(cb), fd_(fd), offset_(offset), length_(length), maxRuns_(maxRuns) {}
  void Execute() override {
    int64_t pos = offset_;
    const int64_t end = offset_ + length_;
    while (pos < end && static_cast<int64_t>(runs_.size() / 2) < maxRuns_) {
      off_t data = lseek(fd_, pos, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) {  // inside the final hole
          Push(end - pos, true);
          break;
        }
        err_ = errno;
        syscall_ = "lseek(SEEK_DATA)";
        return;
      }
      if (data > pos) {
        int64_t holeEnd = data < end ? data : end;
        Push(holeEnd - pos, true);
        pos = holeEnd;
        continue;
      }
      off_t hole = lseek(fd_, pos, SEEK_HOLE);
      if (hole < 0) {
        if (errno == ENXIO) hole = end;  // raced with truncation: report data
        else {
          err_ = errno;
          syscall_ = "lseek(SEEK_HOLE)";
          return;
        }
      }
      int64_t dataEnd = hole < end ? hole : end;
      if (dataEnd <= pos) dataEnd = end;  // defensive: never loop without progress
      Push(dataEnd - pos, false);
      pos = dataEnd;
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) {
      Callback().Call({ErrnoError(env, err_, syscall_).Value()});
      return;
    }
    Napi::Array out = Napi::Array::New(env, runs_.size());
    for (size_t i = 0; i < runs_.size(); i++) out[i] = Napi::Number::New(env, static_cast<double>(runs_[i]));
    Callback().Call({env.Null(), out});
  }

 private:
  void Push(int64_t len, bool hole) {
    size_t n = runs_.size();
    if (n >= 2 && (runs_[n - 1] != 0) == hole) {  // merge with the previous run of the same kind
      runs_[n - 2] += len;
      return;
    }
    runs_.push_back(len);
    runs_.push_back(hole ? 1 : 0);
  }
  int fd_;
  int64_t offset_, length_, maxRuns_;
  std::vector<int64_t> runs_;
  int err_ = 0;
  const char* syscall_ = "";
};

// -1: would block (go to the thread pool); -2: RWF_NOWAIT unsupported on this file; else throw.
Napi::Value NowaitFailure(Napi::Env env, int err, const char* syscall) {
  if (err == EAGAIN) return Napi::Number::New(env, -1);
  if (err == EOPNOTSUPP || err == ENOSYS || err == EINVAL) return Napi::Number::New(env, -2);
  ErrnoError(env, err, syscall).ThrowAsJavaScriptException();
  return env.Undefined();
}

// preadNowait(fd, buffer, at, length, position, memoryBacked) -> bytes read, -1 when
// the data is not in the page cache (EAGAIN), or -2 when RWF_NOWAIT is unsupported. A page-cache
// hit is served inline on the event loop (a memcpy, no thread hand-off); a miss goes to
// the thread pool as usual, so the loop never waits on a disk. On tmpfs/ramfs, which
// refuse RWF_NOWAIT but never touch a disk, a plain pread is just as safe.
Napi::Value PreadNowait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::Buffer<uint8_t> buf = info[1].As<Napi::Buffer<uint8_t>>();
  size_t at = static_cast<size_t>(info[2].As<Napi::Number>().DoubleValue());
  size_t len = static_cast<size_t>(info[3].As<Napi::Number>().DoubleValue());
  int64_t pos = ToOffset(info[4]);
  if (at > buf.Length() || len > buf.Length() - at) {
    Napi::RangeError::New(env, "preadNowait: range outside the buffer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  bool memoryBacked = info.Length() > 5 && info[5].ToBoolean().Value();
  struct iovec iov = {buf.Data() + at, len};
  ssize_t r;
  do {
    r = memoryBacked ? pread(fd, iov.iov_base, len, pos) : preadv2(fd, &iov, 1, pos, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return NowaitFailure(env, errno, "preadv2");
  return Napi::Number::New(env, static_cast<double>(r));
}

// pwritevNowait(fd, buffers[], position, memoryBacked) -> bytes written, -1 (would block:
// use the thread pool) or -2 (RWF_NOWAIT unsupported here: stop trying). As preadNowait.
Napi::Value PwritevNowait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::Array bufs = info[1].As<Napi::Array>();
  int64_t pos = ToOffset(info[2]);
  bool memoryBacked = info[3].ToBoolean().Value();
  uint32_t n = bufs.Length();
  if (n > 64) return Napi::Number::New(env, -1);
  struct iovec iov[64];
  for (uint32_t i = 0; i < n; i++) {
    Napi::Buffer<uint8_t> b = bufs.Get(i).As<Napi::Buffer<uint8_t>>();
    iov[i].iov_base = b.Data();
    iov[i].iov_len = b.Length();
  }
  ssize_t r;
  do {
    r = pwritev2(fd, iov, static_cast<int>(n), pos, memoryBacked ? 0 : RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return NowaitFailure(env, errno, "pwritev2");
  return Napi::Number::New(env, static_cast<double>(r));
}

// memoryBacked(fd): the file lives on tmpfs or ramfs (its reads never wait on a disk).
Napi::Value MemoryBacked(const Napi::CallbackInfo& info) {
  struct statfs sfs;
  if (fstatfs(info[0].As<Napi::Number>().Int32Value(), &sfs) < 0) return Napi::Boolean::New(info.Env(), false);
  return Napi::Boolean::New(info.Env(), sfs.f_type == 0x01021994 /* TMPFS_MAGIC */ || sfs.f_type == 0x858458f6 /* RAMFS_MAGIC */);
}

// blockRange(fd, op, offset, length, callback(err)): op 0 = BLKDISCARD, 1 = BLKZEROOUT.
// Both need offset and length aligned to the logical block size (EINVAL otherwise).
Napi::Value BlockRange(const Napi::CallbackInfo& info) {
  int op = info[1].As<Napi::Number>().Int32Value();
  auto* w = new BlockRangeWorker(info[4].As<Napi::Function>(), info[0].As<Napi::Number>().Int32Value(),
                                 op == 1 ? BLKZEROOUT : BLKDISCARD, op == 1 ? "ioctl(BLKZEROOUT)" : "ioctl(BLKDISCARD)",
                                 static_cast<uint64_t>(ToOffset(info[2])), static_cast<uint64_t>(ToOffset(info[3])));
  w->Queue();
  return info.Env().Undefined();
}

// blockInfo(fd) -> { size, logicalBlockSize }: BLKGETSIZE64 and BLKSSZGET. Both read what the
// kernel already holds in memory (no I/O), so they run inline. Throws ENOTTY on a non-device.
Napi::Value BlockInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint64_t size = 0;
  int lbs = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
    ErrnoError(env, errno, "ioctl(BLKGETSIZE64)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (ioctl(fd, BLKSSZGET, &lbs) < 0) {
    ErrnoError(env, errno, "ioctl(BLKSSZGET)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("size", Napi::Number::New(env, static_cast<double>(size)));
  out.Set("logicalBlockSize", Napi::Number::New(env, lbs));
  return out;
}

// alignedBuffer(size, alignment) -> a zero-filled Buffer whose memory starts on an
// `alignment` boundary (posix_memalign), for O_DIRECT I/O; freed when collected.
Napi::Value AlignedBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t size = static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue());
  size_t align = static_cast<size_t>(info[1].As<Napi::Number>().DoubleValue());
  void* p = nullptr;
  int r = posix_memalign(&p, align, size ? size : align);
  if (r != 0) {
    ErrnoError(env, r, "posix_memalign").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  memset(p, 0, size);
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(p), size, [](Napi::Env, uint8_t* data) { free(data); });
}

// fallocate(fd, mode, offset, length, callback(err))
Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  auto* w = new FallocateWorker(info[4].As<Napi::Function>(), info[0].As<Napi::Number>().Int32Value(),
                                info[1].As<Napi::Number>().Int32Value(), ToOffset(info[2]), ToOffset(info[3]));
  w->Queue();
  return info.Env().Undefined();
}

// extents(fd, offset, length, maxRuns, callback(err, runs))
Napi::Value Extents(const Napi::CallbackInfo& info) {
  auto* w = new ExtentsWorker(info[4].As<Napi::Function>(), info[0].As<Napi::Number>().Int32Value(),
                              ToOffset(info[1]), ToOffset(info[2]), ToOffset(info[3]));
  w->Queue();
  return info.Env().Undefined();
}

// flock(fd, exclusive): non-blocking; throws EWOULDBLOCK when another open file holds it.
Napi::Value Flock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  bool exclusive = info[1].As<Napi::Boolean>().Value();
  int r;
  do {
    r = flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
  } while (r < 0 && errno == EINTR);
  if (r < 0) ErrnoError(env, errno, "flock").ThrowAsJavaScriptException();
  return env.Undefined();
}

// The byte offsets of a lockBytes/checkLockBytes call (a JS array of numbers).
bool ByteList(Napi::Env env, const Napi::Value& v, std::vector<off_t>* out) {
  if (!v.IsArray()) {
    Napi::TypeError::New(env, "expected an array of byte offsets").ThrowAsJavaScriptException();
    return false;
  }
  Napi::Array a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) out->push_back(static_cast<off_t>(a.Get(i).As<Napi::Number>().Int64Value()));
  return true;
}

// lockBytes(fd, bytes[], lock): open-file-description (OFD) byte-range locks, one byte each,
// the kind QEMU's file-posix driver uses for image locking: a shared (read) lock per byte
// when `lock`, else unlock. Non-blocking (F_OFD_SETLK). Throws EAGAIN/EACCES when another
// open file holds a conflicting (write) lock, EINVAL where the kernel has no OFD locks;
// the error's `byte` is the offset that failed (earlier ones stay locked).
// OFD locks belong to the open file, not the process: they go when its last fd closes.
Napi::Value LockBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::vector<off_t> bytes;
  if (!ByteList(env, info[1], &bytes)) return env.Undefined();
  bool lock = info[2].ToBoolean().Value();
  for (off_t b : bytes) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = lock ? F_RDLCK : F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = b;
    fl.l_len = 1;
    int r;
    do {
      r = fcntl(fd, F_OFD_SETLK, &fl);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      Napi::Error e = ErrnoError(env, errno, "fcntl(F_OFD_SETLK)");
      e.Set("byte", Napi::Number::New(env, static_cast<double>(b)));
      e.ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  return env.Undefined();
}

// checkLockBytes(fd, bytes[]) -> the first byte that another open file holds locked
// (F_OFD_GETLK asking for a write lock: any other holder conflicts; our own locks on
// this fd's open file never do), or -1 when none is.
Napi::Value CheckLockBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::vector<off_t> bytes;
  if (!ByteList(env, info[1], &bytes)) return env.Undefined();
  for (off_t b : bytes) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = b;
    fl.l_len = 1;
    int r;
    do {
      r = fcntl(fd, F_OFD_GETLK, &fl);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      ErrnoError(env, errno, "fcntl(F_OFD_GETLK)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (fl.l_type != F_UNLCK) return Napi::Number::New(env, static_cast<double>(b));
  }
  return Napi::Number::New(env, -1);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("fallocate", Napi::Function::New(env, Fallocate));
  exports.Set("extents", Napi::Function::New(env, Extents));
  exports.Set("flock", Napi::Function::New(env, Flock));
  exports.Set("blockRange", Napi::Function::New(env, BlockRange));
  exports.Set("blockInfo", Napi::Function::New(env, BlockInfo));
  exports.Set("alignedBuffer", Napi::Function::New(env, AlignedBuffer));
  exports.Set("lockBytes", Napi::Function::New(env, LockBytes));
  exports.Set("checkLockBytes", Napi::Function::New(env, CheckLockBytes));
  exports.Set("preadNowait", Napi::Function::New(env, PreadNowait));
  exports.Set("memoryBacked", Napi::Function::New(env, MemoryBacked));
  exports.Set("pwritevNowait", Napi::Function::New(env, PwritevNowait));
  exports.Set("FALLOC_FL_KEEP_SIZE", Napi::Number::New(env, FALLOC_FL_KEEP_SIZE));
  exports.Set("FALLOC_FL_PUNCH_HOLE", Napi::Number::New(env, FALLOC_FL_PUNCH_HOLE));
  exports.Set("FALLOC_FL_ZERO_RANGE", Napi::Number::New(env, FALLOC_FL_ZERO_RANGE));
  return exports;
}

}  // namespace

// ---- tcpQuickAck(fd) -> 0 or errno: TCP_QUICKACK on a client socket (mirror target connections).
// qemu-nbd 7.2 sets no TCP_NODELAY: a small reply written while its previous one is unacknowledged
// waits (Nagle) for our ACK, which Linux delays ~40 ms when we have nothing to send. Setting
// TCP_QUICKACK sends a scheduled ACK at once; it is not sticky, so the caller re-arms it per read.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

namespace {

Napi::Value TcpQuickAck(const Napi::CallbackInfo& info) {
  int one = 1;
  int r = setsockopt(info[0].As<Napi::Number>().Int32Value(), IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
  return Napi::Number::New(info.Env(), r < 0 ? errno : 0);
}

}  // namespace

// ---- sendFileReply(socketFd, header, fileFd, position, length, status) -> bytes sent: one
// READ reply straight from the page cache to a non-blocking socket. The header goes with
// MSG_MORE, the data by sendfile, which hands the page cache's pages to the socket instead of
// copying them through a buffer. It stops at the first EAGAIN (the socket is full), at end of
// file or at an error, and returns what went; the caller sends the rest itself. status[0]:
// 0 (all sent, or the socket is full), -1 (end of file), or the errno that stopped it.
#include <sys/sendfile.h>

namespace {

Napi::Value SendFileReply(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = info[0].As<Napi::Number>().Int32Value();
  Napi::Buffer<uint8_t> hdr = info[1].As<Napi::Buffer<uint8_t>>();
  int fd = info[2].As<Napi::Number>().Int32Value();
  off_t pos = static_cast<off_t>(ToOffset(info[3]));
  size_t len = static_cast<size_t>(info[4].As<Napi::Number>().DoubleValue());
  Napi::Int32Array status = info[5].As<Napi::Int32Array>();
  if (status.ElementLength() < 1) {
    Napi::RangeError::New(env, "sendFileReply: status needs one element").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  status[0] = 0;
  size_t hlen = hdr.Length();
  size_t sent = 0;
  while (sent < hlen) {
    ssize_t r = send(sock, hdr.Data() + sent, hlen - sent, MSG_MORE | MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) status[0] = errno;
      return Napi::Number::New(env, static_cast<double>(sent));
    }
    sent += static_cast<size_t>(r);
  }
  size_t done = 0;
  while (done < len) {
    ssize_t r = sendfile(sock, fd, &pos, len - done);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) status[0] = errno;
      break;
    }
    if (r == 0) {
      status[0] = -1;
      break;
    }
    done += static_cast<size_t>(r);
  }
  return Napi::Number::New(env, static_cast<double>(sent + done));
}

}  // namespace

// ---- pageCached(fd, offset, length) -> 1 when every page of the range is in the page cache,
// 0 when some is not, -1 when this kernel or file cannot say (cachestat(2), Linux 6.5). A
// sendfile of a cached range never waits on a disk, so the event loop may make it.
#include <sys/syscall.h>
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

namespace {

struct CachestatRange {
  uint64_t off;
  uint64_t len;
};
struct Cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

Napi::Value PageCached(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t off = ToOffset(info[1]);
  int64_t len = ToOffset(info[2]);
  if (off < 0 || len <= 0) return Napi::Number::New(env, 0);
  static const int64_t page = sysconf(_SC_PAGESIZE);
  CachestatRange range = {static_cast<uint64_t>(off), static_cast<uint64_t>(len)};
  Cachestat cs;
  if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0) return Napi::Number::New(env, errno == EINTR || errno == EAGAIN ? 0 : -1);
  uint64_t pages = static_cast<uint64_t>((off + len + page - 1) / page - off / page);
  return Napi::Number::New(env, cs.nr_cache >= pages ? 1 : 0);
}

}  // namespace

// ---- busyPoll(maxNs) -> the window's bound now in force; busyPollStats(out Float64Array(6)):
// adaptive polling of the event loop, as QEMU's iothreads do (poll-max-ns). When the loop
// handled an event, it stays awake, polling with a zero timeout, for a window before it sleeps
// again, so the next request of a client at queue depth 1 is found without a wake-up. In a VM a
// wake-up of a sleeping CPU costs tens of microseconds, twice per request. The window adapts per
// QEMU's rule: a sleep shorter than maxNs means a longer window would have caught the event, so
// it doubles (from 4 us, up to maxNs); a sleep longer than maxNs halves it (below 4 us: off).
// An idle server therefore sleeps; a busy one spends at most a window per burst. 0 turns it off.
#include <uv.h>

namespace {

struct BusyPoll {
  uv_loop_t* loop = nullptr;
  uv_idle_t idle;
  uv_check_t check;
  uint64_t max_ns = 0;
  uint64_t window_ns = 0;
  uint64_t deadline = 0;
  uint64_t events = 0;
  uint64_t idle_ns = 0;
  bool spinning = false;
  // stats: events found while polling, windows that ran out, grows, shrinks
  double caught = 0, expired = 0, grown = 0, shrunk = 0;
};

constexpr uint64_t kPollStartNs = 4000;

void SpinCb(uv_idle_t*) {}

void CheckCb(uv_check_t* h) {
  BusyPoll* bp = static_cast<BusyPoll*>(h->data);
  uv_metrics_t m;
  if (uv_metrics_info(bp->loop, &m) != 0) return;
  uint64_t idle = uv_metrics_idle_time(bp->loop);
  uint64_t slept = idle - bp->idle_ns;
  bp->idle_ns = idle;
  bool got = m.events != bp->events;
  bp->events = m.events;
  uint64_t now = uv_hrtime();
  if (got) {
    if (bp->spinning) {
      bp->caught++;
    } else if (slept > bp->max_ns) {
      if (bp->window_ns) bp->shrunk++;
      bp->window_ns /= 2;
      if (bp->window_ns < kPollStartNs) bp->window_ns = 0;
    } else if (slept > 0 && bp->window_ns < bp->max_ns) {
      bp->grown++;
      bp->window_ns = bp->window_ns ? bp->window_ns * 2 : kPollStartNs;
      if (bp->window_ns > bp->max_ns) bp->window_ns = bp->max_ns;
    }
    if (bp->window_ns > 0) {
      bp->deadline = now + bp->window_ns;
      if (!bp->spinning) {
        uv_idle_start(&bp->idle, SpinCb);
        bp->spinning = true;
      }
    } else if (bp->spinning) {
      uv_idle_stop(&bp->idle);
      bp->spinning = false;
    }
  } else if (bp->spinning && now >= bp->deadline) {
    uv_idle_stop(&bp->idle);
    bp->spinning = false;
    bp->expired++;
  }
}

BusyPoll* busy_poll = nullptr;

Napi::Value BusyPollSet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double max = info[0].As<Napi::Number>().DoubleValue();
  if (!(max >= 0)) max = 0;
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) return Napi::Number::New(env, -1);
  if (!busy_poll) {
    busy_poll = new BusyPoll();
    busy_poll->loop = loop;
    // The window adapts to the time the loop slept, which libuv counts only when asked. Node asks at
    // start-up; asking again costs nothing and keeps this from depending on it.
    uv_loop_configure(loop, UV_METRICS_IDLE_TIME);
    uv_idle_init(loop, &busy_poll->idle);
    uv_check_init(loop, &busy_poll->check);
    busy_poll->check.data = busy_poll;
    uv_unref(reinterpret_cast<uv_handle_t*>(&busy_poll->idle));
    uv_unref(reinterpret_cast<uv_handle_t*>(&busy_poll->check));
  } else if (loop != busy_poll->loop) {
    return Napi::Number::New(env, -1);  // another thread's loop
  }
  BusyPoll* bp = busy_poll;
  bp->max_ns = static_cast<uint64_t>(max);
  if (bp->window_ns > bp->max_ns) bp->window_ns = bp->max_ns;
  if (bp->max_ns > 0) {
    uv_metrics_t m;
    if (uv_metrics_info(bp->loop, &m) == 0) bp->events = m.events;
    bp->idle_ns = uv_metrics_idle_time(bp->loop);
    uv_check_start(&bp->check, CheckCb);
  } else {
    uv_check_stop(&bp->check);
    if (bp->spinning) uv_idle_stop(&bp->idle);
    bp->spinning = false;
    bp->window_ns = 0;
  }
  return Napi::Number::New(env, static_cast<double>(bp->max_ns));
}

Napi::Value BusyPollStats(const Napi::CallbackInfo& info) {
  Napi::Float64Array out = info[0].As<Napi::Float64Array>();
  if (out.ElementLength() < 6 || !busy_poll) return info.Env().Undefined();
  out[0] = static_cast<double>(busy_poll->window_ns);
  out[1] = busy_poll->caught;
  out[2] = busy_poll->expired;
  out[3] = busy_poll->grown;
  out[4] = busy_poll->shrunk;
  out[5] = static_cast<double>(busy_poll->max_ns);
  return info.Env().Undefined();
}

}  // namespace

// ---- the module: Init's calls (above), and those defined after it.
namespace {

Napi::Object InitAll(Napi::Env env, Napi::Object exports) {
  exports = Init(env, exports);
  exports.Set("tcpQuickAck", Napi::Function::New(env, TcpQuickAck));
  exports.Set("sendFileReply", Napi::Function::New(env, SendFileReply));
  exports.Set("pageCached", Napi::Function::New(env, PageCached));
  exports.Set("busyPoll", Napi::Function::New(env, BusyPollSet));
  exports.Set("busyPollStats", Napi::Function::New(env, BusyPollStats));
  return exports;
}

}  // namespace

NODE_API_MODULE(nbd_native, InitAll)
