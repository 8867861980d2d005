/* bm_nfs.h - blockmirror's NFS endpoint (csrc/nfs/nfs.c) and the cdef of
 * the cffi module blockmirror._nfs (csrc/nfs/build_ffi.py).
 *
 * Built only where libnfs's header is installed (Debian libnfs-dev), so the
 * core never links libnfs. Like blockmirror.h this file is read verbatim by
 * cffi: no #include, integer constants only. It comes after
 * csrc/endpoint/bm_endpoint.h (in the cdef and in C), whose types it names
 * again as bm_nfs_*: the extents, rate cap, copy statistics and digest sink
 * the NBD endpoint has too. It shares no symbol with the core or with
 * blockmirror._remote (the NBD endpoint).
 *
 * NFSv3 only: libnfs 4.0 (Debian 12) fails every NFSv4 WRITE over 4 KiB.
 * Data goes out as raw WRITE3 (UNSTABLE) calls and is made durable by one
 * COMMIT3 per connection, so the server's own status comes back (libnfs's
 * high-level pwrite reports every failed write as EFAULT) and a server that
 * restarted between the writes and the commit (a new write verifier) is
 * caught instead of trusted.
 *
 * Error convention: -1 (or NULL) with errno set, never a print;
 * bm_nfs_last_error() then holds a one-line reason for the calling thread.
 * Messages never hold the URL. */

#define BM_NFS_MAX_CONNS 8
#define BM_NFS_DEFAULT_REQUESTS 16          /* WRITE3 calls in flight per connection */
#define BM_NFS_DEFAULT_REQUEST_BYTES 1048576  /* clipped to the server's largest write */
#define BM_NFS_MIN_BLOCK 512
#define BM_NFS_MAX_BLOCK 16777216

/* bm_nfs_open_file flags. */
#define BM_NFS_READ 0               /* an existing file, read only */
#define BM_NFS_CREATE 1             /* create or truncate to zero, read-write */
#define BM_NFS_UPDATE 2             /* an existing file, read-write, kept as it is
                                     * (an incremental sync updates it in place) */

/* bm_nfs_copy_extents flags (in, per call). */
#define BM_NFS_DST_FRESH 1          /* the file reads as zeros over the extents
                                     * (newly created): zero runs and holes are skipped */

/* bm_nfs_copy_stats.error_side (out). */
#define BM_NFS_SIDE_NONE 0
#define BM_NFS_SIDE_SRC 1
#define BM_NFS_SIDE_DST 2

typedef struct bm_nfs bm_nfs;

typedef bm_ep_extent bm_nfs_extent;

/* GCRA over next_ns, shared by every call handed it (bm_ep_rate_cap, the
 * core's bm_rate_cap). Zero-initialise next_ns; 0 bytes_per_s is no cap. */
typedef bm_ep_rate_cap bm_nfs_rate_cap;

/* What one bm_nfs_copy_extents call did (bm_ep_copy_stats): bytes_written
 * are sent with WRITE3; bytes_punched made zero by writes of zeros (never
 * with BM_NFS_DST_FRESH); requests and max_in_flight count WRITE3 calls. */
typedef bm_ep_copy_stats bm_nfs_copy_stats;

/* The calling thread's reason for its last failure; never NULL. */
const char *bm_nfs_last_error(void);

/* Mount the export of URL (libnfs syntax, nfs://SERVER/EXPORT/FILE[?ARGS]:
 * the export is the path up to the last slash, as QEMU's block/nfs.c takes
 * it) on CONNS connections, each its own TCP connection and mount. No file
 * is opened yet. Any wait for the server longer than TIMEOUT_MS (0: never)
 * fails with ETIMEDOUT, and that connection stays failed; libnfs never
 * reconnects on its own. Nothing is left open on failure. */
bm_nfs *bm_nfs_mount(const char *url, uint32_t conns, uint32_t timeout_ms);

/* Close any open file (errors ignored: call bm_nfs_close_file first to see
 * them), disconnect, free H. NULL is a no-op. No call on H may be running. */
void bm_nfs_close(bm_nfs *h);

/* The URL's file: a path under the export, starting with '/'. */
const char *bm_nfs_url_file(const bm_nfs *h);
uint32_t bm_nfs_connections(const bm_nfs *h);
uint64_t bm_nfs_write_max(const bm_nfs *h);   /* the largest WRITE3 the server takes */

/* Open PATH (under the export) on every connection: BM_NFS_CREATE creates
 * it with MODE or truncates it to zero bytes (on the first connection; the
 * others open it read-write), BM_NFS_UPDATE opens an existing file
 * read-write without changing it, BM_NFS_READ opens an existing file read
 * only (MODE is used only with BM_NFS_CREATE). At most one file is open at
 * a time. */
int bm_nfs_open_file(bm_nfs *h, const char *path, uint32_t flags, uint32_t mode);

/* Close the open file on every connection; the first error wins. */
int bm_nfs_close_file(bm_nfs *h);

/* The open file's size as the server has it (GETATTR), or -1. */
int64_t bm_nfs_size(bm_nfs *h);

/* The bytes the server has allocated to the open file (GETATTR's used),
 * or -1: an upper bound of its data, for a reader's space check. */
int64_t bm_nfs_allocated(bm_nfs *h);

/* Set the open file's size (SETATTR; growing leaves a hole). */
int bm_nfs_truncate(bm_nfs *h, uint64_t size);

/* Make every write completed on any connection durable: COMMIT3 on each
 * connection that wrote, each checked against the write verifier its
 * writes got (a server that restarted meanwhile may have lost them: EIO).
 * Late errors the server reports here (ENOSPC, EDQUOT, EIO) come back as
 * that errno. Call with no copy running. */
int bm_nfs_commit(bm_nfs *h);

/* Bytes an unprivileged writer may still use on the filesystem holding the
 * directory PATH (under the export): FSSTAT's available bytes, or -1. */
int64_t bm_nfs_free_bytes(bm_nfs *h, const char *path);

/* RENAME FROM over TO, and REMOVE PATH (paths under the export), on the
 * first connection. */
int bm_nfs_rename(bm_nfs *h, const char *from, const char *to);
int bm_nfs_unlink(bm_nfs *h, const char *path);

/* Read LEN bytes at OFFSET of the open file into BUF over connection CONN,
 * several READ3 calls in flight; bytes past the file's end read as zeros.
 * One thread per connection at a time. */
int bm_nfs_pread(bm_nfs *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset);

/* Write LEN bytes of BUF at OFFSET of the open file over connection CONN,
 * one WRITE3 (UNSTABLE, at most the server's largest write) at a time: what
 * a writer that followed a move onto the file does. Durable only after
 * bm_nfs_commit, which checks the write verifier these writes got; a
 * verifier that changes between two of them (the server restarted and may
 * have dropped the earlier ones) fails the write with EIO. */
int bm_nfs_pwrite(bm_nfs *h, uint32_t conn, const char *buf, uint64_t len, uint64_t offset);

/* Copy each extent [offset, offset+length) of the local file SRC_FD to the
 * same offset of the open file, over connection CONN, with up to REQUESTS
 * WRITE3 calls of at most REQUEST_BYTES (clipped to the server's largest
 * write) in flight (0: the defaults). Holes of the source (SEEK_DATA /
 * SEEK_HOLE) are not read; data is read a request at a time and checked in
 * BLOCK_SIZE blocks (a power of two in BM_NFS_MIN_BLOCK..BM_NFS_MAX_BLOCK):
 * data runs are written, and zero blocks and holes are skipped with
 * BM_NFS_DST_FRESH (the file stays sparse) or else written as zeros (NFSv3
 * cannot punch). Bytes past the source's end read as zeros; the file is
 * never resized here. RATE_CAP (may be NULL) paces data reads; CANCEL (may
 * be NULL) is polled before each request and while waiting: non-zero stops
 * with ECANCELED. Short writes are sent again for the rest. Returns 0 once
 * every call has been answered, or -1 with errno (the server's status as an
 * errno: ENOSPC, EDQUOT, EIO, ESTALE...), bm_nfs_last_error() naming the
 * operation and offset, STATS (required, zeroed on entry) what was done
 * and error_side the failing side. src is never written. One call per
 * connection at a time; calls on different connections may run in
 * parallel. */
int bm_nfs_copy_extents(bm_nfs *h, uint32_t conn, int src_fd, const bm_nfs_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, uint32_t flags, bm_nfs_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nfs_copy_stats *stats);

/* The other way: each extent of the open file into the same offsets of the
 * local file DST_FD, which must read as zeros there (a new sparse file).
 * Read over connection CONN in pieces of REQUESTS * REQUEST_BYTES, REQUESTS
 * READ3 calls in flight (0: the defaults); each piece checked in BLOCK_SIZE
 * blocks and only its non-zero blocks written (pwrite), so the copy stays
 * sparse. NFSv3 cannot say where the file's holes are: every byte is read.
 * Bytes past the file's end read as zeros. RATE_CAP (may be NULL) paces
 * the reads; CANCEL (may be NULL) is polled before each piece: non-zero
 * stops with ECANCELED. STATS (required, zeroed on entry) as for a copy:
 * bytes_read from the server, bytes_written and bytes_zero of the local
 * file, error_side SRC for the server, DST for the local file. The server
 * is never written. One call per connection at a time. */
int bm_nfs_read_extents(bm_nfs *h, uint32_t conn, int dst_fd, const bm_nfs_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, bm_nfs_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nfs_copy_stats *stats);

/* Hash while copying (bm_ep_hash_fn, bm_ep_digest_sink: the core's
 * bm_digest_sink convention; csrc/endpoint/bm_endpoint.h). */
typedef bm_ep_hash_fn bm_nfs_hash_fn;
typedef bm_ep_digest_sink bm_nfs_digest_sink;

/* bm_nfs_copy_extents, and the digest of every granule of SINK's range that
 * lies wholly inside one extent goes into SINK: hashed from the slot buffer
 * the bytes were read into and sent from (the source is read once), or
 * SINK's zero_digest for a granule wholly in a source hole. Data is read
 * from its granule's start to its granule's end (clipped to the extent;
 * holes inside read as zeros and are treated as zero runs) and slots end on
 * granule boundaries. A granule cut by an extent's edge or by the source's
 * end gets no digest. SINK NULL is bm_nfs_copy_extents; too few slots, or a
 * granularity that does not divide REQUEST_BYTES, is EINVAL. On failure the
 * slots filled are meaningless. */
int bm_nfs_copy_extents_hashed(bm_nfs *h, uint32_t conn, int src_fd,
                               const bm_nfs_extent *extents, uint64_t count,
                               uint32_t block_size, uint32_t requests, uint64_t request_bytes,
                               uint32_t flags, bm_nfs_rate_cap *rate_cap,
                               const uint32_t *cancel, bm_nfs_digest_sink *sink,
                               bm_nfs_copy_stats *stats);
