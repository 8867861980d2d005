/* source_loop.h - the source side of an endpoint copy, shared by the NBD
 * (csrc/remote/nbd.c) and NFS (csrc/nfs/nfs.c) endpoints: compiled into
 * each module (both build_ffi.py list source_loop.c), never seen by cffi.
 *
 * One copy call drives one connection from one thread. The loop reads the
 * local source a slot at a time into a ring of buffers (holes found with
 * SEEK_DATA/SEEK_HOLE are not read), splits each slot into data and zero
 * runs by BLOCK-sized blocks, merges zero runs and holes, optionally hashes
 * each whole granule from the slot just read, and counts it all in the
 * call's bm_ep_copy_stats. What goes on the wire is the endpoint's: a small
 * table of callbacks (struct bm_ep_ops, after nbdcopy's rw_ops) queues a
 * write or a zeroing and waits for replies. A slot is reused once every
 * request reading it was answered; the loop waits only when none is free.
 *
 * Error convention, for the loop and the callbacks alike: -1 with errno
 * set and bm_ep_fail's message for the calling thread (each module has its
 * own copy, read through its bm_*_last_error). Every symbol is hidden:
 * two modules loaded in one process never resolve each other's. */
#ifndef BM_SOURCE_LOOP_H
#define BM_SOURCE_LOOP_H

#include <stddef.h>
#include <stdint.h>

#include "bm_endpoint.h"

#define BM_EP_HIDDEN __attribute__((visibility("hidden")))
#define BM_EP_ERROR_BYTES 512

/* ---------------------------------------------------------------------- */
/* What every endpoint file uses                                           */

/* Set the calling thread's message (printf FMT) and errno ERR; returns -1. */
BM_EP_HIDDEN int bm_ep_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The calling thread's message of its last failure; never NULL. */
BM_EP_HIDDEN const char *bm_ep_last_error(void);

/* A failure put aside while cleaning up after it (cleanup may fail too). */
struct bm_ep_error {
    int err;
    char msg[BM_EP_ERROR_BYTES];
};

BM_EP_HIDDEN void bm_ep_save_error(struct bm_ep_error *saved);
BM_EP_HIDDEN void bm_ep_restore_error(const struct bm_ep_error *saved);

BM_EP_HIDDEN uint64_t bm_ep_now_ns(void);

/* TIMEOUT_MS from now on the monotonic clock; 0 (no deadline) for 0. */
BM_EP_HIDDEN uint64_t bm_ep_deadline_after(uint32_t timeout_ms);

/* The checks both endpoints' copy calls make alike: BLOCK_SIZE a power of
 * two in BM_EP_MIN_BLOCK..BM_EP_MAX_BLOCK, REQUEST_BYTES from BLOCK_SIZE to
 * 1 GiB, no unknown FLAGS; SINK (may be NULL) with a hash, a power-of-two
 * granularity dividing REQUEST_BYTES and a slot per granule the extents
 * touch. EINVAL otherwise. */
BM_EP_HIDDEN int bm_ep_check_shape(uint32_t block_size, uint64_t request_bytes,
                                   uint32_t flags);
BM_EP_HIDDEN int bm_ep_check_sink(const bm_ep_digest_sink *sink, const bm_ep_extent *extents,
                                  uint64_t count, uint64_t request_bytes);

/* LEN bytes at BUF are all zero (LEN 0 is). */
BM_EP_HIDDEN int bm_ep_is_zero(const char *buf, uint64_t len);

/* ---------------------------------------------------------------------- */
/* The loop                                                                */

struct bm_ep_loop;

/* One buffer and the requests still reading it (or, in an endpoint's own
 * read pipeline, filling it). */
struct bm_ep_slot {
    struct bm_ep_loop *loop;
    char *buf;
    uint32_t pending;
    uint64_t offset;        /* of its latest request, for messages (the endpoint's) */
    uint64_t len;           /* free for the endpoint (a read's length) */
};

/* One callback per verb; each returns 0, or -1 per the convention above.
 * All run on the copy call's thread. A request is counted with
 * bm_ep_loop_hold on its slot when queued and bm_ep_loop_release when its
 * reply came (or it could not be queued), bm_ep_loop_issued once queued. */
struct bm_ep_ops {
    /* Queue a write of LEN (<= the loop's write_max) bytes of BUF at
     * OFFSET of the destination; BUF lies in slot S or is the loop's
     * zeros. */
    int (*write)(struct bm_ep_loop *loop, struct bm_ep_slot *s, const char *buf, uint64_t len,
                 uint64_t offset);
    /* Queue a request making [OFFSET, OFFSET+LEN) (LEN <= zero_step) read as
     * zeros, counted on slot S. Used only when the loop has no zeros
     * buffer; NULL for an endpoint that always writes zeros as data. */
    int (*zero)(struct bm_ep_loop *loop, struct bm_ep_slot *s, uint64_t offset, uint64_t len);
    /* Without waiting, let queued requests out and replies in; NULL where
     * queueing a request sends it at once. Run before each slot is sought. */
    int (*service)(struct bm_ep_loop *loop);
    /* Wait until a request in flight is answered, or give up with the
     * endpoint's timeout. It may return 0 early on a cancel unless the loop
     * is draining. */
    int (*wait)(struct bm_ep_loop *loop);
    /* -1 per the convention for the first failure a reply recorded, else 0. */
    int (*recorded_error)(struct bm_ep_loop *loop);
    /* Non-zero: a cancel seen once every reply is in still fails the call
     * (ECANCELED); else a call whose requests all succeeded succeeds. */
    int cancel_after_drain;
};

struct bm_ep_loop {
    const struct bm_ep_ops *ops;
    /* The buffers, kept from call to call (bm_ep_loop_buffers). */
    uint32_t nslots;
    uint64_t slot_bytes;
    struct bm_ep_slot *slots;
    char *zeros;            /* zero_bytes of zeros: zero runs go out as writes of it;
                             * NULL: through ops->zero */
    uint64_t zero_bytes;
    /* The endpoint's request sizes, set before bm_ep_loop_copy. */
    uint64_t write_max;     /* the largest write (bm_ep_loop_write splits) */
    uint64_t zero_step;     /* the largest zero request (<= zero_bytes with zeros) */
    /* One call's state (bm_ep_loop_start). */
    int src;
    uint32_t flags, block;
    uint32_t in_flight;     /* requests queued and not yet answered */
    int draining;           /* in bm_ep_loop_drain: a cancel no longer cuts a wait */
    uint64_t zero_start, zero_end;  /* the zero run not sent yet */
    bm_ep_rate_cap *rate_cap;
    const uint32_t *cancel;
    bm_ep_copy_stats *st;
    bm_ep_digest_sink *sink;        /* NULL: no digests */
    uint64_t slot_base;             /* the current extent's first sink slot */
    uint64_t slot_granule;          /* ... and the granule it stands for */
};

/* Give LOOP NSLOTS buffers of SLOT_BYTES and, ZERO_BYTES > 0, a zeros
 * buffer that long, keeping the ones it has when they are that shape (new
 * buffers page-fault on every call). LOOP starts zeroed. ENOMEM leaves it
 * with none. Call with nothing in flight. */
BM_EP_HIDDEN int bm_ep_loop_buffers(struct bm_ep_loop *loop, uint32_t nslots,
                                    uint64_t slot_bytes, uint64_t zero_bytes);
BM_EP_HIDDEN void bm_ep_loop_free(struct bm_ep_loop *loop);

/* Begin a call: clear the last call's state and take these. SRC is read
 * only by bm_ep_loop_copy; RATE_CAP, CANCEL and SINK may be NULL. */
BM_EP_HIDDEN void bm_ep_loop_start(struct bm_ep_loop *loop, const struct bm_ep_ops *ops,
                                   int src, uint32_t flags, uint32_t block,
                                   bm_ep_rate_cap *rate_cap, const uint32_t *cancel,
                                   bm_ep_digest_sink *sink, bm_ep_copy_stats *stats);

/* Copy each extent of the source to the same offsets of the destination
 * (the contract of bm_nbd_copy_extents_hashed / bm_nfs_copy_extents_hashed)
 * and send the last zero run; then bm_ep_loop_drain. */
BM_EP_HIDDEN int bm_ep_loop_copy(struct bm_ep_loop *loop, const bm_ep_extent *extents,
                                 uint64_t count);

/* Wait until nothing is in flight. RC is the call's result so far: a
 * failure there wins over any later one; with RC 0 the first recorded
 * failure (and, per ops, a cancel) is the result. */
BM_EP_HIDDEN int bm_ep_loop_drain(struct bm_ep_loop *loop, int rc);

/* A slot with nothing in flight, waiting for one while all are busy; NULL
 * on a failure recorded or seen meanwhile, or a cancel (ECANCELED). */
BM_EP_HIDDEN struct bm_ep_slot *bm_ep_loop_free_slot(struct bm_ep_loop *loop);

/* Write LEN bytes of BUF (in slot S) at OFFSET in requests of at most
 * write_max. */
BM_EP_HIDDEN int bm_ep_loop_write(struct bm_ep_loop *loop, struct bm_ep_slot *s,
                                  const char *buf, uint64_t len, uint64_t offset);

/* Sleep as the rate cap says LEN more bytes may cost (no cap: no sleep). */
BM_EP_HIDDEN void bm_ep_loop_pace(struct bm_ep_loop *loop, uint64_t len);

/* The same pacing for a caller without a loop: CAP may be NULL (no cap). */
BM_EP_HIDDEN void bm_ep_pace(bm_ep_rate_cap *cap, uint64_t len);

/* Whether the caller's CANCEL flag (may be NULL) is set: the loop's check,
 * for a caller without a loop. */
BM_EP_HIDDEN int bm_ep_cancelled(const uint32_t *cancel);

static inline void bm_ep_loop_hold(struct bm_ep_loop *loop, struct bm_ep_slot *s)
{
    s->pending++;
    loop->in_flight++;
}

static inline void bm_ep_loop_release(struct bm_ep_loop *loop, struct bm_ep_slot *s)
{
    s->pending--;
    loop->in_flight--;
}

/* A request was queued: count it. */
static inline void bm_ep_loop_issued(struct bm_ep_loop *loop)
{
    loop->st->requests++;
    if (loop->in_flight > loop->st->max_in_flight)
        loop->st->max_in_flight = loop->in_flight;
}

#endif
