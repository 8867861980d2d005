/* bm_endpoint.h - the types every endpoint module shares (bm_ep_: the NBD
 * endpoint blockmirror._remote, csrc/remote; the NFS endpoint
 * blockmirror._nfs, csrc/nfs), defined once: each module's header names
 * them again with its own prefix (typedef bm_ep_extent bm_nbd_extent), so
 * Python keeps its names and the layouts cannot drift apart.
 *
 * Like blockmirror.h this file is read verbatim by cffi: each module's
 * build_ffi.py puts it before the module's own header in the cdef. No
 * #include, integer constants only, and no include guard (cffi takes no
 * #ifndef): C files get it once, through source_loop.h. It holds no function: each module
 * compiles its own copy of csrc/endpoint/source_loop.c (the copy loop these
 * types are for), so the two shared objects still share no symbol. */

/* Copy flags (in, per call): the destination reads as zeros over the
 * extents, so zero runs and holes are skipped. */
#define BM_EP_DST_FRESH 1

/* bm_ep_copy_stats.error_side (out). */
#define BM_EP_SIDE_NONE 0
#define BM_EP_SIDE_SRC 1
#define BM_EP_SIDE_DST 2

/* Zero detection block sizes a copy call takes (a power of two between). */
#define BM_EP_MIN_BLOCK 512
#define BM_EP_MAX_BLOCK 16777216

/* The core's bm_extent layout. */
typedef struct {
    uint64_t offset;
    uint64_t length;
} bm_ep_extent;

/* The core's bm_rate_cap, for an endpoint: GCRA over next_ns, shared by
 * every call handed it. Zero-initialise next_ns; 0 bytes_per_s is no cap. */
typedef struct {
    uint64_t bytes_per_s;
    uint64_t next_ns;
} bm_ep_rate_cap;

/* What one endpoint copy call did. Over a successful call:
 *   bytes_read + bytes_hole == the sum of the extent lengths, and
 *   bytes_written + bytes_zero == bytes_read. */
typedef struct {
    uint64_t bytes_read;     /* data bytes read from the local source */
    uint64_t bytes_written;  /* data bytes sent as writes */
    uint64_t bytes_zero;     /* read, found all-zero, not sent as data */
    uint64_t bytes_hole;     /* source holes (and bytes past its end), not read */
    uint64_t bytes_punched;  /* destination bytes made zero (a zeroing command, or
                              * zeros written); never in bytes_written */
    uint64_t requests;       /* requests issued */
    uint32_t max_in_flight;  /* most requests in flight at once on the connection */
    uint32_t error_side;     /* BM_EP_SIDE_* of the failure, when the call failed */
} bm_ep_copy_stats;

/* Hash while copying, as the core's bm_digest_sink (csrc/blockmirror.h):
 * HASH is the caller's (the manifest's xxh3-64, the very function pointer
 * the local copier calls); a result of 0 is stored as 1 (0 means "unknown"
 * to the manifest). */
typedef uint64_t (*bm_ep_hash_fn)(const void *data, size_t len);

typedef struct {
    bm_ep_hash_fn hash;
    uint64_t granularity;   /* a power of two >= BM_EP_MIN_BLOCK, dividing REQUEST_BYTES */
    uint64_t zero_digest;   /* HASH of GRANULARITY zero bytes (for holes) */
    uint64_t count;         /* slots in digests */
    uint64_t *digests;      /* out: one slot per granule each extent touches, extent
                             * after extent (an extent [o, o+n) takes granules
                             * o/g .. (o+n-1)/g); slots of granules not copied whole
                             * are left as they were (the caller zeroes them) */
} bm_ep_digest_sink;
