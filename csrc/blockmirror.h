/* blockmirror.h - the public C API of blockmirror's core, and its cffi cdef.
 *
 * csrc/build_ffi.py reads this file verbatim as the cdef, so it holds only
 * what cffi's parser accepts: no #include, no include guard, no function-like
 * macros, integer constants only. C sources include bm_internal.h, which
 * pulls in the system headers first and then this file.
 *
 * Error convention: every function returns -1 (or NULL) with errno set on
 * failure and never prints; bm_last_error() then holds a one-line reason for
 * the calling thread. Every symbol carries the bm_ prefix.
 *
 * The first bm_open installs a SIGBUS handler (csrc/guard.c): a sidecar
 * truncated under the process then fails calls with EUCLEAN instead of
 * killing it; faults outside a tracker's mapping go to the handler that was
 * installed before.
 */

/* ---------------------------------------------------------------------- */
/* Sidecar format and limits                                               */

/* 3: the header binds the image (dev, ino), each chunk keeps its eras
 * checksum, the control block keeps move tokens. 4: the mirror interlock
 * pages and the mirror's control fields. 5: a writer that raises eras in a
 * chunk marks its checksum slot, and a seal sums only marked chunks (eras.c):
 * a writer of format 4 would raise without marking and leave a stale sum, so
 * the version says the two must not share a sidecar. Other versions are
 * refused (EUCLEAN, saying so). */
#define BM_FORMAT_VERSION 5
#define BM_DEFAULT_GRANULARITY 65536
#define BM_MIN_GRANULARITY 4096
#define BM_MAX_GRANULARITY 67108864
/* Largest image a sidecar can describe: 1 PiB, and at most 2^34 granules
 * (so 64 TiB at 4 KiB granules). Bounds the address space each handle
 * reserves for the bitmap, so the bitmap can grow in place. */
#define BM_MAX_IMAGE_SIZE 1125899906842624
#define BM_MAX_WRITERS 64
#define BM_REDIRECT_MAX 1024
/* The longest freeze lease a copier may set, and so the longest any writer
 * waits in one freeze, whatever the control block says (I3). */
#define BM_MAX_LEASE_NS 60000000000

/* Control-block states (the freeze protocol, invariant I3). */
#define BM_STATE_RUNNING 0
#define BM_STATE_FREEZING 1
#define BM_STATE_FROZEN 2
#define BM_STATE_REDIRECTED 3

/* Header flags. */
#define BM_FLAG_UNCLEAN 1   /* a writer died with the sidecar open (I4) */
#define BM_FLAG_ERAS_DAMAGED 2  /* eras changed while sealed: change ids untrusted */
/* In bm_info.flags only, for this handle: the sidecar names another file
 * than the image it was opened with (its bitmap is not about this image). */
#define BM_FLAG_NOT_THIS_IMAGE 4

/* bm_open flags. */
#define BM_OPEN_READER 0
#define BM_OPEN_WRITER 1    /* claim a writer slot: the sidecar is in use */

typedef struct bm_tracker bm_tracker;

typedef struct {
    uint64_t offset;
    uint64_t length;
} bm_extent;

typedef struct {
    uint32_t version;
    uint32_t granularity;
    uint64_t image_size;
    uint64_t generation;
    uint8_t series[16];
    uint32_t flags;          /* BM_FLAG_* */
    uint32_t state;          /* BM_STATE_* */
    uint32_t live_writers;   /* writer slots claimed, as the control block holds them:
                              * a writer that died since the last sweep still counts
                              * (bm_sweep_writers, or bm_open, frees its slot) */
    uint32_t copier_pid;     /* 0 when no copier holds a freeze */
    uint64_t throttle_bytes_per_s;
    uint64_t lease_deadline_ns;  /* CLOCK_MONOTONIC */
    uint64_t last_write_ns;      /* CLOCK_REALTIME when the latest tracked write ended */
    uint64_t bytes_written;      /* bytes bm_pwrite wrote, all writers, since creation
                                  * (wraps; differences give the write rate) */
} bm_info;

/* The calling thread's reason for its last failure; never NULL. */
const char *bm_last_error(void);

/* ---------------------------------------------------------------------- */
/* Sidecar lifetime (cbt.c)                                                */

/* Create a new sidecar at PATH for the image open as IMAGE_FD (any fd of it,
 * O_PATH will do; not kept), tracking IMAGE_SIZE bytes in GRANULARITY-byte
 * granules (a power of two within the limits above). The sidecar records the
 * image's device and inode: it binds that file only. The file is created
 * exclusively (EEXIST if present), mode 0600, without following a symlink,
 * owned by the image's owner (chowned when that is not the caller, I5), and
 * starts with every granule clean, generation 0 and its eras sealed. Nothing
 * is left behind on failure. */
int bm_create(const char *path, int image_fd, uint64_t image_size, uint32_t granularity);

/* Open and validate an existing sidecar for the image open as IMAGE_FD (not
 * kept; -1 for a reader that has no image, which then cannot follow or make
 * a redirect). Refuses (EPERM) a file not owned by the image's owner or
 * writable by group or others, and (EUCLEAN) one that is truncated, of
 * another format version, or corrupt. With BM_OPEN_WRITER (IMAGE_FD
 * required) a writer slot is claimed, so a crash of this process is
 * detectable later (I4), and a sidecar that records another file than
 * IMAGE_FD's is refused (EUCLEAN): it is left over from a file that was at
 * this path before. A reader may open such a sidecar (bm_info.flags then
 * holds BM_FLAG_NOT_THIS_IMAGE) to bm_reset it. Any slot held by a dead
 * process marks the sidecar BM_FLAG_UNCLEAN. A writer's open checks sealed
 * eras (BM_FLAG_ERAS_DAMAGED on a mismatch) and unseals them. The handle is
 * safe to share between threads of one process; each process opens its own.
 * A SIGBUS handler is installed on first use (see bm_pwrite). */
bm_tracker *bm_open(const char *path, int flags, int image_fd);

/* Release the writer slot (a clean close; the last writer out seals the
 * eras' checksums), thaw a freeze this process holds, unmap. Always frees
 * T. */
int bm_close(bm_tracker *t);

/* What the header and control block hold now, into OUT. Reads only: it
 * neither checks writers' liveness nor changes anything, so a writer killed
 * since the last sweep is still in live_writers and not yet in
 * BM_FLAG_UNCLEAN; call bm_sweep_writers first where that matters (I4).
 * Thread-safe (atomic loads; the fields are not one snapshot). */
int bm_get_info(bm_tracker *t, bm_info *out);

/* The size a sidecar for an image of IMAGE_SIZE bytes at GRANULARITY has on
 * disk (header, control block and every chunk, in whole pages), so callers
 * can reserve room for one; EINVAL or EFBIG like bm_create. */
int64_t bm_sidecar_bytes(uint64_t image_size, uint32_t granularity);

/* Start a new series: new series id, generation 0, UNCLEAN and ERAS_DAMAGED
 * cleared, dead writer slots freed and every granule marked dirty. This is
 * how a consumer acknowledges an unclean sidecar: nothing from before is
 * trusted. A sidecar opened with an image it does not record is bound to
 * that image from now on (and a redirect it held, about the old file, is
 * dropped). */
int bm_reset(bm_tracker *t);

/* 0 if change ids can be trusted as far as the eras go: not flagged
 * damaged and, while sealed (no writer since the last one left), matching
 * their checksums - a mismatch sets BM_FLAG_ERAS_DAMAGED. -1 with EBADMSG
 * otherwise. Reads every era of a sealed sidecar. */
int bm_verify_eras(bm_tracker *t);

/* The suffix that names an image's sidecar: IMAGE + ".cbt". */
const char *bm_sidecar_suffix(void);

/* ---------------------------------------------------------------------- */
/* The dirty bitmap (bitmap.c). Thread- and process-safe: atomics only.    */

/* Mark [OFFSET, OFFSET+LENGTH) dirty, rounding outward to granules. Zero
 * length is a no-op; a range past the image size is EINVAL. */
int bm_mark(bm_tracker *t, uint64_t offset, uint64_t length);

/* Clear the dirty bits of the granules lying wholly inside [OFFSET,
 * OFFSET+LENGTH) (the image's last granule counts as whole up to its end),
 * just before the caller reads that range (I2): the bulk pass clears each
 * range as it reaches it, so a block written ahead of it is copied once, not
 * twice. Bits of granules the range only partly covers stay set. The range
 * is clipped to the image (it may have shrunk since it was listed). */
int bm_clear_range(bm_tracker *t, uint64_t offset, uint64_t length);

/* Mark every granule of the image dirty. */
int bm_mark_all(bm_tracker *t);

/* Atomically take the dirty set: whole bitmap words are exchanged with zero
 * (I2: clear before read), and their runs returned as merged byte extents,
 * clipped to the image size, in ascending order. *CURSOR starts at 0; the
 * call fills at most MAX extents and advances *CURSOR; it returns the count
 * and sets *CURSOR to UINT64_MAX once the whole bitmap has been scanned.
 * Bits taken but not returned for lack of room are put back, so nothing is
 * ever lost between calls. Increments the generation once per full scan
 * that starts at cursor 0. */
int64_t bm_fetch_and_clear(bm_tracker *t, uint64_t *cursor, bm_extent *out,
                           uint64_t max);

/* Like bm_fetch_and_clear, but leaves the bitmap untouched. */
int64_t bm_snapshot(bm_tracker *t, uint64_t *cursor, bm_extent *out,
                    uint64_t max);

/* Dirty bytes now (dirty granules, the last one clipped to the image). */
int64_t bm_dirty_bytes(bm_tracker *t);

/* Change the tracked size. Growing marks the new range dirty; shrinking
 * clears bits past the end and marks the new last granule dirty. Sizes past
 * BM_MAX_IMAGE_SIZE are EFBIG. */
int bm_resize(bm_tracker *t, uint64_t new_size);

/* Change ids (eras, as dm-era keeps them): every granule records the
 * generation current when it was last marked. A change id is a generation
 * handed out with bm_new_change_id, which then moves the generation on, so
 * every write marked afterwards carries a larger era. Independent of the
 * dirty bitmap: fetch-and-clear by a copier never hides a change from a
 * backup tool holding a change id, and any number of them can hold one. */

/* Take a change id: *GENERATION gets the current generation, which is then
 * incremented. EOVERFLOW once eras (uint32) would wrap: reset the sidecar.
 * EBADMSG when the eras cannot be trusted (bm_verify_eras). */
int bm_new_change_id(bm_tracker *t, uint64_t *generation);

/* Every granule marked after change id SINCE was taken (era > SINCE), as
 * merged byte extents clipped to the image, resumable like bm_snapshot.
 * False positives are possible (granules marked with a later era by a write
 * racing the id), misses are not - as long as the sidecar is clean. Fails
 * with EBADMSG when the eras cannot be trusted (checked as bm_verify_eras
 * does at cursor 0). */
int64_t bm_changed_since(bm_tracker *t, uint64_t since, uint64_t *cursor, bm_extent *out,
                         uint64_t max);

/* ---------------------------------------------------------------------- */
/* The tracked writer (writer.c)                                           */

/* Write LEN bytes of BUF at OFFSET of FD, as one tracked write: wait while a
 * freeze lease holds (never past the lease, never longer than
 * BM_MAX_LEASE_NS), count as in flight, mark the range dirty, write it all
 * (retrying short writes and EINTR), mark it again (I1), leave. Honours the
 * shared throttle. Fails with ESTALE once the image was redirected (the
 * caller reopens the target with bm_open_redirect_target). Writes past the
 * tracked size grow it first. Returns LEN or -1.
 * If the sidecar is truncated under the process, the SIGBUS its mapping
 * raises is caught: the call fails with EUCLEAN and so does every later one
 * on T (reopen). This holds for every call on a tracker. */
int64_t bm_pwrite(bm_tracker *t, int fd, const char *buf, uint64_t len,
                  uint64_t offset);

/* Punch a hole over [OFFSET, OFFSET+LEN) as a tracked write (zeros written
 * where the filesystem cannot punch holes). */
int bm_discard(bm_tracker *t, int fd, uint64_t offset, uint64_t len);

/* bm_zero flags. */
#define BM_ZERO_MAY_TRIM 1  /* the range may become a hole (punched) */
#define BM_ZERO_FAST 2      /* fail with EOPNOTSUPP rather than write zeros */

/* Make [OFFSET, OFFSET+LEN) of FD read as zeros, as a tracked write (the
 * freeze, I1 marks, redirect and SIGBUS rules of bm_pwrite): punched with
 * BM_ZERO_MAY_TRIM, else zeroed in place (FALLOC_FL_ZERO_RANGE), else zeros
 * written - or, with BM_ZERO_FAST, EOPNOTSUPP instead of writing them (the
 * range is then marked dirty but unchanged). A range past the tracked size
 * is EINVAL. bm_discard is bm_zero with BM_ZERO_MAY_TRIM. */
int bm_zero(bm_tracker *t, int fd, uint64_t offset, uint64_t len, uint32_t flags);

/* Truncate FD to SIZE as a tracked write and resize the tracker. */
int bm_truncate(bm_tracker *t, int fd, uint64_t size);

/* ---------------------------------------------------------------------- */
/* The copier's side of the control block (control.c)                      */

/* Freeze writers: record this process as the copier, set the lease deadline
 * LEASE_NS from now, stop new writes and wait until in-flight writes of
 * live writers drain. Fails with ETIMEDOUT (and thaws) if they do not drain
 * before the lease ends; EBUSY if another live copier holds a freeze. */
int bm_freeze(bm_tracker *t, uint64_t lease_ns);

/* 0 while this process's freeze still binds writers; ETIMEDOUT once its
 * lease has passed (writers may have resumed, so the final copy is not a
 * point-in-time copy and must not be switched to). */
int bm_freeze_check(bm_tracker *t);

/* Let writers go on against the source. Idempotent. */
int bm_thaw(bm_tracker *t);

/* Send writers to TARGET, an absolute path without symbolic links or "."
 * and ".." components, naming the image TARGET_TRACKER was opened with
 * (both T and TARGET_TRACKER must have been opened with their images; the
 * target must be owned by the same uid as T's image). A random move token
 * goes into both control blocks; then writers' next write fails with ESTALE
 * so they reopen the target. Only valid while frozen by this process. */
int bm_redirect(bm_tracker *t, const char *target, bm_tracker *target_tracker);

/* Send writers to the NBD export URI (nbd:// or nbd+unix://, shorter than
 * BM_REDIRECT_MAX, no user info) instead of a file: a move onto an export.
 * Only valid while frozen by this process; ETIMEDOUT when the freeze ended
 * first (writers went on against the source). See csrc/redirect.c. */
int bm_redirect_uri(bm_tracker *t, const char *uri);

/* A writer's check before it follows a redirect to an export: copy the URI
 * into BUF (LEN bytes with the NUL) only if T is bound to its image, the
 * redirect names a move, and this process's effective uid owns the image
 * (EPERM otherwise); EXDEV if the redirect is to a file, ENOENT if none. */
int bm_redirect_uri_to_follow(bm_tracker *t, char *buf, uint64_t len);

/* Follow T's redirect: open the target image (O_RDWR, into *IMAGE_FD) and
 * its sidecar (bm_open with FLAGS), and return the new tracker. Refuses
 * (EPERM, nothing left open) unless T is bound to the image it was opened
 * with, the target path has no symbolic link in any component, the target
 * is a regular file owned by T's image's owner, and its sidecar records the
 * move token T's holds; ENOENT if T was not redirected. */
bm_tracker *bm_open_redirect_target(bm_tracker *t, int flags, int *image_fd);

/* The control-block state (BM_STATE_*), cheaply: one atomic load. */
int bm_get_state(bm_tracker *t);

/* Copy the redirect target into BUF (at most LEN bytes with the NUL). */
int bm_get_redirect(bm_tracker *t, char *buf, uint64_t len);

/* Limit all writers together to BYTES_PER_S (0: no limit). */
int bm_set_throttle(bm_tracker *t, uint64_t bytes_per_s);

/* Sweep the writer slots: each slot whose process is gone (looked up in
 * /proc, by pid and start time) is freed and, if that writer had the
 * sidecar open, the sidecar is marked BM_FLAG_UNCLEAN (I4). Returns the
 * number of live writer slots. bm_open sweeps too; bm_get_info never does.
 * Thread- and process-safe (compare-and-swap per slot). */
int bm_sweep_writers(bm_tracker *t);

/* ---------------------------------------------------------------------- */
/* Active mirroring (mirror.c), invariant I7                               */

/* Start mirroring T's image to TARGET (an absolute path without symbolic
 * links, a regular file owned by the image's owner, already holding a copy
 * of every range not dirty): from now on a tracked write to a range with no
 * dirty granule goes to the image and to TARGET in the same call, and is
 * not marked dirty; a write to a dirty range, or one that meets a copier
 * reading it (bm_copy_claim) or another mirrored write on its stripes, is
 * marked dirty as before. A destination write that fails marks its range
 * dirty and turns mirroring off for everyone (bm_mirror_status says why);
 * the writer's call still succeeds. Mirroring binds only while this process
 * lives. T must be opened with its image. */
int bm_mirror_start(bm_tracker *t, const char *target);

/* Stop mirroring and wait (up to 1 s) until no mirrored write is in flight.
 * Idempotent. ETIMEDOUT if one is still in flight (a writer died mid-write:
 * its sidecar slot then makes the sidecar unclean). */
int bm_mirror_stop(bm_tracker *t);

typedef struct {
    uint32_t state;          /* 0 off, 1 on, 2 failed */
    int32_t error;           /* errno of the destination write that failed it */
    uint64_t mirrored_bytes; /* written to both sides since it started */
    uint64_t fallbacks;      /* writes that met a copier or a conflict and were marked */
} bm_mirror_info;

int bm_mirror_status(bm_tracker *t, bm_mirror_info *out);

/* The copier's side of the interlock: call bm_copy_claim before reading
 * [OFFSET, OFFSET+LEN) of the source to copy it, and bm_copy_release after
 * its bytes are on the destination. Claiming waits (up to 2 s: ETIMEDOUT)
 * until no mirrored write on the range's stripes is in flight; a mirrored
 * write that starts later sees the claim and marks its range dirty
 * instead. Any thread; claims of several threads may overlap. */
int bm_copy_claim(bm_tracker *t, uint64_t offset, uint64_t len);
int bm_copy_release(bm_tracker *t, uint64_t offset, uint64_t len);

/* ---------------------------------------------------------------------- */
/* Extent copy (copy.c)                                                    */

/* A copier: one source and one destination file and what their filesystems
 * turned out not to support. Capability bits (bm_copier_new, bm_copier_caps)
 * say what the copier still uses; a bit is cleared by the first call that
 * meets a refusal and stays cleared for every later call on the handle. */
typedef struct bm_copier bm_copier;

#define BM_COPIER_CAN_PUNCH 1       /* punch zero runs out of dst (else write zeros) */
#define BM_COPIER_CAN_SEEK 2        /* ask src for holes (SEEK_DATA/SEEK_HOLE; else all
                                     * of it is data) */
#define BM_COPIER_CAN_FILE_RANGE 4  /* move data segments with copy_file_range(2); those
                                     * bytes get no zero detection */

/* bm_copy_extents flags (in, per call). */
#define BM_COPY_DST_FRESH 1     /* dst holds only zeros over the extents (a new sparse
                                 * file): zero blocks and source holes are skipped, never
                                 * punched */
#define BM_COPY_START_WRITEBACK 2  /* after each data write to dst, start writing those
                                   * pages back (sync_file_range SYNC_FILE_RANGE_WRITE,
                                   * no wait), so a later fsync finds them on their way to
                                   * disk instead of starting it all then; for callers that
                                   * fsync at the end anyway. A hint: failures are ignored */

/* bm_copy_stats.flags (out): what this call found unsupported (the handle
 * has already dropped the matching BM_COPIER_CAN_* bit). */
#define BM_COPY_FILE_RANGE_FAILED 1  /* copy_file_range refused; read/write used */
#define BM_COPY_PUNCH_FAILED 2       /* punching refused; zeros were written */
#define BM_COPY_SEEK_FAILED 4        /* SEEK_DATA refused; everything treated as data */

/* bm_copy_stats.error_side (out): which file the failing syscall was on. */
#define BM_COPY_SIDE_NONE 0
#define BM_COPY_SIDE_SRC 1
#define BM_COPY_SIDE_DST 2

#define BM_COPY_MIN_BLOCK 512
#define BM_COPY_MAX_BLOCK 16777216
#define BM_COPY_DEFAULT_BUFFER 1048576

/* What one bm_copy_extents call did. Over a successful call:
 *   bytes_read + bytes_hole == the sum of the extent lengths, and
 *   bytes_written + bytes_zero == bytes_read. */
typedef struct {
    uint64_t bytes_read;     /* data bytes taken from src (read(2) or copy_file_range) */
    uint64_t bytes_written;  /* data bytes put into dst */
    uint64_t bytes_zero;     /* read, found all-zero, not written */
    uint64_t bytes_hole;     /* source holes (and bytes past the source's end), not read */
    uint64_t bytes_punched;  /* dst bytes made zero by punching (or by writing zeros where
                              * punching is unsupported); never counted in bytes_written */
    uint32_t flags;          /* BM_COPY_*_FAILED */
    uint32_t error_side;     /* BM_COPY_SIDE_* of the failure, when the call failed */
} bm_copy_stats;

/* A rate cap on a copy (--bwlimit), shared by every call handed the same
 * struct (any thread, any copier): data segments are charged before they
 * are moved; holes cost nothing. Not the writers' throttle (bm_set_throttle),
 * which slows the image's writers. Zero-initialise next_ns; 0 bytes_per_s
 * means no cap. */
typedef struct {
    uint64_t bytes_per_s;
    uint64_t next_ns;        /* GCRA virtual time, CLOCK_MONOTONIC; updated atomically */
} bm_rate_cap;

/* A copier from SRC_FD to DST_FD with zero-detection blocks of BLOCK_SIZE
 * bytes (aligned to file offsets; a power of two, BM_COPY_MIN_BLOCK ..
 * BM_COPY_MAX_BLOCK), starting with the BM_COPIER_CAN_* bits of CAPS. The
 * fds stay the caller's: they must stay open while the copier is used and
 * are never closed by it. NULL with EINVAL on a bad block size or unknown
 * bits. Free with bm_copier_free. */
bm_copier *bm_copier_new(int src_fd, int dst_fd, uint32_t block_size, uint32_t caps);

/* The BM_COPIER_CAN_* bits still in use: one atomic load, any thread. */
uint32_t bm_copier_caps(const bm_copier *copier);

/* Free COPIER (NULL is a no-op). No call on it may be running. */
void bm_copier_free(bm_copier *copier);

/* Copy each extent [offset, offset+length) of COPIER's src to the same
 * offset of its dst: after success, dst reads back exactly what src held
 * there when it was read (bytes past the source's end read as zeros).
 *
 * Holes: with BM_COPIER_CAN_SEEK, source holes inside the extents are found
 * with SEEK_DATA/SEEK_HOLE and not read. Where the filesystem reports the
 * whole file as data (FUSE, NFS before 4.2) that costs nothing and zero
 * detection still keeps dst sparse.
 * Zeros: data read is checked in the copier's blocks; all-zero blocks are
 * not written. Adjacent zero blocks and holes merge into one run, adjacent
 * data blocks into one write. With BM_COPY_DST_FRESH zero runs are skipped;
 * otherwise they are punched in dst (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE) with
 * BM_COPIER_CAN_PUNCH, or overwritten with zeros up to dst's current end
 * (never extending it). Data is written with pwrite, which extends dst; a
 * zero run at the end is not written, so sizing dst is the caller's job.
 * copy_file_range: with BM_COPIER_CAN_FILE_RANGE, data segments are moved in
 * the kernel (no zero detection).
 * Refusals: an errno meaning "unsupported" (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL
 * for copy_file_range; EOPNOTSUPP, ENOSYS, ENODEV for punching; EINVAL,
 * EOPNOTSUPP, ENOSYS for SEEK_DATA) clears the capability on the handle,
 * reports BM_COPY_*_FAILED in STATS and falls back, for the rest of this call
 * and every later one.
 * Buffer: BUF of BUF_LEN bytes (>= the block size) is caller-owned scratch,
 * used only during the call; with BUF NULL the call mallocs BUF_LEN bytes
 * (BM_COPY_DEFAULT_BUFFER if 0) when it first needs them and frees them.
 * RATE_CAP (may be NULL) caps the rate. CANCEL (may be NULL) is polled before
 * each buffer-sized step: once another thread stores non-zero there the call
 * stops with ECANCELED. FLAGS are BM_COPY_* (others: EINVAL).
 * Short reads/writes and EINTR are retried. On failure returns -1 with errno
 * set, bm_last_error() naming the operation and offset, STATS holding what
 * was done and error_side the failing file; dst is then partly copied. src is
 * never written. STATS (required) is zeroed on entry. Thread-safe: calls on
 * the same copier may run in parallel on disjoint extents: all I/O takes
 * explicit offsets (lseek moves src's file offset; only its result is used)
 * and the capability bits are atomic. */
int bm_copy_extents(bm_copier *copier, const bm_extent *extents, uint64_t count, char *buf,
                    uint64_t buf_len, uint32_t flags, bm_rate_cap *rate_cap,
                    const uint32_t *cancel, bm_copy_stats *stats);

/* Hash while copying: where a bm_copy_extents_hashed call puts the digest
 * of each granule it copied whole. HASH is the caller's (the manifest's
 * xxh3-64, so both agree by construction); a result of 0 is stored as 1, as
 * the manifest does (0 means "unknown" there). */
typedef uint64_t (*bm_hash_fn)(const void *data, size_t len);

typedef struct {
    bm_hash_fn hash;
    uint64_t granularity;   /* a power of two >= BM_COPY_MIN_BLOCK */
    uint64_t zero_digest;   /* HASH of GRANULARITY zero bytes (for holes) */
    uint64_t count;         /* slots in digests */
    uint64_t *digests;      /* out: one slot per granule each extent touches, extent
                             * after extent (an extent [o, o+n) takes granules
                             * o/g .. (o+n-1)/g); slots of granules not copied whole
                             * are left as they were (the caller zeroes them) */
} bm_digest_sink;

/* bm_copy_extents, and the digest of every granule of SINK's range that lies
 * wholly inside one extent goes into SINK: hashed from the buffer the bytes
 * were just read into (so the data is read once), or SINK's zero_digest for
 * a granule wholly in a source hole. To see granules whole the call reads
 * data segments from their granule's start to their granule's end (clipped
 * to the extent; holes read as zeros and stay holes in dst), ends buffers on
 * granule boundaries (so BUF_LEN should be a multiple of the granularity),
 * and never uses copy_file_range. A granule cut by an extent's edge, by the
 * source's end or by a buffer smaller than a granule gets no digest. SINK
 * NULL is bm_copy_extents; too few slots for the extents is EINVAL. On
 * failure the slots filled are meaningless. */
int bm_copy_extents_hashed(bm_copier *copier, const bm_extent *extents, uint64_t count,
                           char *buf, uint64_t buf_len, uint32_t flags,
                           bm_rate_cap *rate_cap, const uint32_t *cancel,
                           bm_digest_sink *sink, bm_copy_stats *stats);

/* The digest (SINK's hash) of every granule of EXTENTS of FD, into SINK's
 * slots (one per granule each extent touches, extent after extent; no slot is
 * left unset). Each extent starts on a granule boundary (else EINVAL); its
 * last granule may be short (the extent's end cuts it) and is hashed as it
 * is; bytes past FD's end read as zeros. Read BUF_LEN bytes at a time into
 * BUF (caller's scratch; NULL: malloc'd for the call; BUF_LEN >= the
 * granularity). SINK's zero_digest is not used. CANCEL as for
 * bm_copy_extents. Never writes FD; thread-safe (pread only). For the
 * manifest's reads of a copy and a hash resync's of a source: no Python per
 * granule, and the GIL is released for the whole call. */
int bm_digest_extents(int fd, const bm_extent *extents, uint64_t count, char *buf,
                      uint64_t buf_len, const uint32_t *cancel, bm_digest_sink *sink);

/* The data extents of FD over [*CURSOR, END), by SEEK_DATA/SEEK_HOLE, in
 * ascending order, clipped to END. Fills at most MAX extents into OUT and
 * returns the count, advancing *CURSOR; sets *CURSOR to UINT64_MAX once END
 * is reached. Where the filesystem does not report holes the whole range is
 * one extent. */
int64_t bm_data_extents(int fd, uint64_t *cursor, uint64_t end, bm_extent *out,
                        uint64_t max);

/* 1 if LEN bytes at BUF are all zero, else 0. */
int bm_buffer_is_zero(const char *buf, uint64_t len);

/* The address of symbol NAME in the shared object at PATH (loaded if it is
 * not yet; never unloaded), or NULL: how the copy finds the manifest's
 * digest in the xxhash module's library without Python's ctypes. */
void *bm_library_symbol(const char *path, const char *name);

/* The filesystem type (statfs f_type) FD is on, or -1 with errno set. */
int64_t bm_filesystem_type(int fd);

/* ---------------------------------------------------------------------- */
/* Block comparison (compare.c): the verify kernel                         */

/* bm_compare_extents *error_side (out): which file the failing read was on. */
#define BM_COMPARE_SIDE_NONE 0
#define BM_COMPARE_SIDE_A 1
#define BM_COMPARE_SIDE_B 2

#define BM_COMPARE_DEFAULT_BUFFER 524288

/* Compare A_FD with B_FD over each extent [offset, offset+length) of EXTENTS
 * (ascending, not overlapping): both are read BUF_LEN/2 bytes at a time into
 * the two halves of BUF (caller-owned scratch, or NULL: the call mallocs
 * BUF_LEN bytes, BM_COMPARE_DEFAULT_BUFFER if 0, and frees them) and compared.
 * Small halves (a few hundred KiB) stay in the CPU cache: that is the speed.
 * Writes to OUT the BLOCK_SIZE blocks (aligned to file offsets, a power of two
 * between BM_COPY_MIN_BLOCK and BM_COPY_MAX_BLOCK; clipped to their extent)
 * that hold a difference, ascending, touching ones merged, and returns their
 * count: 0 means identical over the extents. A side that ends early (a short
 * read: the file is shorter, or shrank) differs wherever the other still has
 * bytes; where both have ended nothing differs.
 * OUT holds MAX extents; needing more fails with EOVERFLOW (the sum over the
 * extents of length / BLOCK_SIZE + 2 always suffices). CANCEL (may be NULL) is
 * polled before each read: non-zero stops the call with ECANCELED.
 * On failure returns -1 with errno set, bm_last_error() naming the read and
 * its offset, and *ERROR_SIDE (required) the BM_COMPARE_SIDE_* that failed;
 * OUT then holds nothing useful. Never writes either file. Thread-safe: all
 * I/O is pread, so calls on the same fds may run in parallel. */
int64_t bm_compare_extents(int a_fd, int b_fd, const bm_extent *extents, uint64_t count,
                           char *buf, uint64_t buf_len, uint32_t block_size,
                           const uint32_t *cancel, bm_extent *out, uint64_t max,
                           uint32_t *error_side);
