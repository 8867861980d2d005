/* bm_remote.h - blockmirror's NBD endpoint (csrc/remote/nbd.c: an export
 * written from a local file, or read into one) and the cdef
 * of the second cffi module, blockmirror._remote (csrc/remote/build_ffi.py).
 *
 * Built only where libnbd's header is installed (Debian libnbd-dev), so the
 * core (blockmirror._core) never links libnbd. Like blockmirror.h this file
 * is read verbatim by cffi: no #include, integer constants only. It comes
 * after csrc/endpoint/bm_endpoint.h (in the cdef and in C), whose types it
 * names again as bm_nbd_*: the extents, rate cap, copy statistics and
 * digest sink the NFS endpoint has too. It shares no symbol with the core.
 *
 * Error convention: -1 (or NULL) with errno set, never a print;
 * bm_nbd_last_error() then holds a one-line reason for the calling thread
 * (libnbd's own message where libnbd failed). */

#define BM_NBD_MAX_CONNS 16
#define BM_NBD_DEFAULT_REQUESTS 16      /* requests in flight per connection */
#define BM_NBD_DEFAULT_REQUEST_BYTES 262144
#define BM_NBD_MIN_BLOCK 512
#define BM_NBD_MAX_BLOCK 16777216

/* bm_nbd_caps: what the export said in the handshake. */
#define BM_NBD_CAN_WRITE 1          /* not read-only */
#define BM_NBD_CAN_FLUSH 2
#define BM_NBD_CAN_FUA 4
#define BM_NBD_CAN_TRIM 8
#define BM_NBD_CAN_ZERO 16          /* NBD_CMD_WRITE_ZEROES */
#define BM_NBD_CAN_MULTI_CONN 32    /* a flush on one connection covers all */
#define BM_NBD_CAN_BLOCK_STATUS 64  /* base:allocation: the export says where it is zero */

/* bm_nbd_copy_extents flags (in, per call). */
#define BM_NBD_DST_FRESH 1          /* the export reads as zeros over the extents:
                                     * zero runs and holes are skipped */

/* bm_nbd_copy_stats.error_side (out). */
#define BM_NBD_SIDE_NONE 0
#define BM_NBD_SIDE_SRC 1
#define BM_NBD_SIDE_DST 2

typedef struct bm_nbd bm_nbd;

typedef bm_ep_extent bm_nbd_extent;

/* The core's bm_rate_cap (bm_ep_rate_cap): zero-initialise next_ns; 0
 * bytes_per_s is no cap. */
typedef bm_ep_rate_cap bm_nbd_rate_cap;

/* What one bm_nbd_copy_extents call did (bm_ep_copy_stats): bytes_written
 * are sent with NBD_CMD_WRITE; bytes_punched made zero with
 * NBD_CMD_WRITE_ZEROES or, where the export cannot, zeros written;
 * requests and max_in_flight count NBD commands. */
typedef bm_ep_copy_stats bm_nbd_copy_stats;

/* The calling thread's reason for its last failure; never NULL. */
const char *bm_nbd_last_error(void);

/* Connect to the export URI (nbd://, nbd+unix://; what libnbd's
 * nbd_connect_uri takes, local files refused) with up to MAX_CONNS
 * connections: all of them when the export offers multi-conn, else one.
 * WRITE asks for a writable export (EROFS if it is read-only). Connecting,
 * and any call with requests outstanding, gives up with ETIMEDOUT after
 * TIMEOUT_MS (0: never) without an answer; the connection is then failed
 * for good. Nothing is left open on failure. Free with bm_nbd_close. */
bm_nbd *bm_nbd_open(const char *uri, uint32_t max_conns, int write, uint32_t timeout_ms);

/* Disconnect every connection (a soft NBD_CMD_DISC where it is still up) and
 * free H. NULL is a no-op. No call on H may be running. */
void bm_nbd_close(bm_nbd *h);

int64_t bm_nbd_size(const bm_nbd *h);
uint32_t bm_nbd_caps(const bm_nbd *h);       /* BM_NBD_CAN_* */
uint32_t bm_nbd_connections(const bm_nbd *h);

/* Make every write completed on any connection durable: NBD_CMD_FLUSH on
 * each connection (one is enough with multi-conn; a server without flush has
 * no cache and needs none). Call with no copy running. */
int bm_nbd_flush(bm_nbd *h);

/* 1 when the export says [OFFSET, OFFSET+LEN) reads as zeros (NBD block
 * status, base:allocation, NBD_STATE_ZERO throughout), 0 when it does not
 * or cannot say, -1 on error. Over connection CONN, one thread at a time. */
int bm_nbd_reads_zero(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len);

/* Read LEN bytes at OFFSET of the export into BUF over connection CONN
 * (requests split at the export's largest size). One thread per connection
 * at a time. */
int bm_nbd_pread(bm_nbd *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset);

/* A writer's I/O, for a TrackedImage whose image was moved onto the export
 * (issue 12): write LEN bytes of BUF at OFFSET, or make [OFFSET, OFFSET+LEN)
 * read as zeros (NBD_CMD_WRITE_ZEROES; with MAY_TRIM the server may punch
 * it, else NO_HOLE keeps it allocated; zeros written where the export has
 * no WRITE_ZEROES). Each returns once the server answered, or -1 with
 * errno (EINVAL past the export's end, which is never resized; EROFS on a
 * read-only export; ETIMEDOUT after the handle's timeout, the connection
 * then failed for good). One thread per connection at a time. */
int bm_nbd_pwrite(bm_nbd *h, uint32_t conn, const char *buf, uint64_t len, uint64_t offset);
int bm_nbd_zero(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len, int may_trim);

/* Copy each extent [offset, offset+length) of the local file SRC_FD to the
 * same offset of the export, over connection CONN, with up to REQUESTS
 * commands of at most REQUEST_BYTES in flight (0: the defaults).
 * Holes of the source (SEEK_DATA/SEEK_HOLE) are not read; data is read a
 * request at a time and checked in BLOCK_SIZE blocks (aligned to offsets, a
 * power of two in BM_NBD_MIN_BLOCK..BM_NBD_MAX_BLOCK): data runs go out as
 * NBD_CMD_WRITE, zero blocks and holes merge into runs that, unless
 * BM_NBD_DST_FRESH, go out as NBD_CMD_WRITE_ZEROES (the server may punch
 * them: no NO_HOLE flag) or, where the export lacks it, as writes of zeros.
 * TRIM is never used to zero: NBD does not promise a trimmed range reads
 * back as zeros. Bytes past the source's end read as zeros; the export is
 * never resized. RATE_CAP (may be NULL) paces data reads; CANCEL (may be
 * NULL) is polled before each request: non-zero stops with ECANCELED.
 * Returns 0 once every command of the call has completed, or -1 with errno,
 * bm_nbd_last_error() naming the operation and offset, STATS (required,
 * zeroed on entry) what was done and error_side the failing side. A
 * connection that died or timed out stays failed for later calls. src is
 * never written. One call per connection at a time; calls on different
 * connections may run in parallel. */
int bm_nbd_copy_extents(bm_nbd *h, uint32_t conn, int src_fd, const bm_nbd_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, uint32_t flags, bm_nbd_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nbd_copy_stats *stats);

/* Hash while copying (bm_ep_hash_fn, bm_ep_digest_sink: the core's
 * bm_digest_sink convention; csrc/endpoint/bm_endpoint.h). */
typedef bm_ep_hash_fn bm_nbd_hash_fn;
typedef bm_ep_digest_sink bm_nbd_digest_sink;

/* bm_nbd_copy_extents, and the digest of every granule of SINK's range that
 * lies wholly inside one extent goes into SINK: hashed from the slot buffer
 * the bytes were just read into (the bytes sent; the data is read once), or
 * SINK's zero_digest for a granule wholly in a source hole. To see granules
 * whole, data segments are read from their granule's start to their
 * granule's end (clipped to the extent; holes read as zeros and go out as
 * zero runs) and slots end on granule boundaries. A granule cut by an
 * extent's edge or by the source's end gets no digest. SINK NULL is
 * bm_nbd_copy_extents; too few slots, or a granularity that does not divide
 * REQUEST_BYTES, is EINVAL. On failure the slots filled are meaningless. */
int bm_nbd_copy_extents_hashed(bm_nbd *h, uint32_t conn, int src_fd,
                               const bm_nbd_extent *extents, uint64_t count,
                               uint32_t block_size, uint32_t requests, uint64_t request_bytes,
                               uint32_t flags, bm_nbd_rate_cap *rate_cap,
                               const uint32_t *cancel, bm_nbd_digest_sink *sink,
                               bm_nbd_copy_stats *stats);

/* The parts of [OFFSET, OFFSET+LEN) of the export that may hold data: what
 * NBD block status (base:allocation) does not flag NBD_STATE_ZERO, merged,
 * in order, into OUT (up to MAX_OUT extents). Without block status the
 * whole range is data. Returns how many extents were stored, and in
 * DESCRIBED the first byte not yet described (OFFSET+LEN once the range is
 * done; less when OUT filled up: call again from there). Over connection
 * CONN, one thread at a time, with the handle's timeout. */
int64_t bm_nbd_map(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len, bm_nbd_extent *out,
                   uint64_t max_out, uint64_t *described);

/* Read each extent of the export into the same offsets of the local file
 * DST_FD over connection CONN, with up to REQUESTS reads of at most
 * REQUEST_BYTES (and the export's largest request) in flight (0: the
 * defaults). The local file must read as zeros over the extents (a new
 * sparse file): each read, as it lands, is checked in BLOCK_SIZE blocks
 * and only its data runs are written (pwrite); zero blocks stay holes.
 * STATS: bytes_read from the export, bytes_written and bytes_zero to and not
 * to the file; error_side BM_NBD_SIDE_SRC for the export, BM_NBD_SIDE_DST
 * for the local file (ENOSPC there). RATE_CAP, CANCEL and the timeout as for
 * bm_nbd_copy_extents; the export is never written. One call per connection
 * at a time; calls on different connections may run in parallel. */
int bm_nbd_read_extents(bm_nbd *h, uint32_t conn, int dst_fd, const bm_nbd_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, bm_nbd_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nbd_copy_stats *stats);
