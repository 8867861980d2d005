/* source_loop.c - the source side of an endpoint copy (see source_loop.h):
 * reading the local file into slot buffers, zero detection, granule
 * digests, the counts, and which slot has requests in flight. Nothing here
 * knows a protocol: requests go out through the endpoint's bm_ep_ops.
 *
 * The zero detection and the digest convention are copy.c's (a digest of
 * 0 is stored as 1; a granule in a hole gets the sink's zero digest), so a
 * manifest written after a copy onto an endpoint matches one of a local
 * copy. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "source_loop.h"

/* ---------------------------------------------------------------------- */
/* What every endpoint file uses                                           */

static __thread char last_error[BM_EP_ERROR_BYTES];

const char *bm_ep_last_error(void)
{
    return last_error;
}

int bm_ep_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

void bm_ep_save_error(struct bm_ep_error *saved)
{
    saved->err = errno;
    memcpy(saved->msg, last_error, sizeof saved->msg);
}

void bm_ep_restore_error(const struct bm_ep_error *saved)
{
    memcpy(last_error, saved->msg, sizeof last_error);
    errno = saved->err;
}

uint64_t bm_ep_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t bm_ep_deadline_after(uint32_t timeout_ms)
{
    return timeout_ms ? bm_ep_now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
}

int bm_ep_check_shape(uint32_t block_size, uint64_t request_bytes, uint32_t flags)
{
    if (block_size < BM_EP_MIN_BLOCK || block_size > BM_EP_MAX_BLOCK ||
        (block_size & (block_size - 1)))
        return bm_ep_fail(EINVAL, "block size %u is not a power of two between %u and %u",
                          block_size, BM_EP_MIN_BLOCK, BM_EP_MAX_BLOCK);
    if (request_bytes < block_size || request_bytes > (1u << 30))
        return bm_ep_fail(EINVAL, "request size %llu is below the block size or above 1 GiB",
                          (unsigned long long)request_bytes);
    if (flags & ~(uint32_t)BM_EP_DST_FRESH)
        return bm_ep_fail(EINVAL, "unknown copy flags %#x", flags);
    return 0;
}

/* The sink slots extent [OFFSET, OFFSET+LEN) takes: one per granule it touches. */
static uint64_t slots_of(uint64_t g, uint64_t offset, uint64_t len)
{
    return len ? (offset + len + g - 1) / g - offset / g : 0;
}

int bm_ep_check_sink(const bm_ep_digest_sink *sink, const bm_ep_extent *extents,
                     uint64_t count, uint64_t request_bytes)
{
    if (!sink)
        return 0;
    uint64_t g = sink->granularity;
    if (!sink->hash || g < BM_EP_MIN_BLOCK || (g & (g - 1)) || request_bytes % g)
        return bm_ep_fail(EINVAL, "digest sink needs a hash function and a power-of-two "
                                  "granularity of at least %u dividing the request size %llu",
                          BM_EP_MIN_BLOCK, (unsigned long long)request_bytes);
    uint64_t need = 0;
    for (uint64_t i = 0; i < count; i++)
        need += slots_of(g, extents[i].offset, extents[i].length);
    if (need > sink->count || (need && !sink->digests))
        return bm_ep_fail(EINVAL, "digest sink has %llu slots, the extents need %llu",
                          (unsigned long long)sink->count, (unsigned long long)need);
    return 0;
}

int bm_ep_is_zero(const char *buf, uint64_t len)
{
    return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, (size_t)(len - 1)) == 0);
}

/* ---------------------------------------------------------------------- */
/* Buffers and slots                                                       */

void bm_ep_loop_free(struct bm_ep_loop *loop)
{
    for (uint32_t i = 0; loop->slots && i < loop->nslots; i++)
        free(loop->slots[i].buf);
    free(loop->slots);
    free(loop->zeros);
    loop->slots = NULL;
    loop->zeros = NULL;
    loop->nslots = 0;
    loop->slot_bytes = loop->zero_bytes = 0;
}

int bm_ep_loop_buffers(struct bm_ep_loop *loop, uint32_t nslots, uint64_t slot_bytes,
                       uint64_t zero_bytes)
{
    if (loop->slots && loop->nslots == nslots && loop->slot_bytes == slot_bytes &&
        loop->zero_bytes == zero_bytes)
        return 0;
    bm_ep_loop_free(loop);
    loop->slots = calloc(nslots, sizeof *loop->slots);
    loop->zeros = zero_bytes ? calloc(1, (size_t)zero_bytes) : NULL;
    int ok = loop->slots && (loop->zeros || !zero_bytes);
    loop->nslots = loop->slots ? nslots : 0; /* before any failure: free walks the slots */
    for (uint32_t i = 0; ok && i < nslots; i++) {
        loop->slots[i].loop = loop;
        ok = (loop->slots[i].buf = malloc((size_t)slot_bytes)) != NULL;
    }
    if (!ok) {
        bm_ep_loop_free(loop);
        return bm_ep_fail(ENOMEM, "cannot allocate %u request buffers", nslots);
    }
    loop->slot_bytes = slot_bytes;
    loop->zero_bytes = zero_bytes;
    return 0;
}

void bm_ep_loop_start(struct bm_ep_loop *loop, const struct bm_ep_ops *ops, int src,
                      uint32_t flags, uint32_t block, bm_ep_rate_cap *rate_cap,
                      const uint32_t *cancel, bm_ep_digest_sink *sink, bm_ep_copy_stats *stats)
{
    loop->ops = ops;
    loop->src = src;
    loop->flags = flags;
    loop->block = block;
    loop->in_flight = 0;
    loop->draining = 0;
    loop->zero_start = loop->zero_end = 0;
    loop->rate_cap = rate_cap;
    loop->cancel = cancel;
    loop->st = stats;
    loop->sink = sink;
    loop->slot_base = loop->slot_granule = 0;
    for (uint32_t i = 0; i < loop->nslots; i++)
        loop->slots[i].pending = 0;
}

int bm_ep_cancelled(const uint32_t *cancel)
{
    return cancel && __atomic_load_n(cancel, __ATOMIC_ACQUIRE);
}

static int cancelled(const struct bm_ep_loop *loop)
{
    return bm_ep_cancelled(loop->cancel);
}

/* A failure a reply recorded, else a cancel. */
static int check_errors(struct bm_ep_loop *loop)
{
    if (loop->ops->recorded_error(loop) < 0)
        return -1;
    if (cancelled(loop))
        return bm_ep_fail(ECANCELED, "copy cancelled");
    return 0;
}

struct bm_ep_slot *bm_ep_loop_free_slot(struct bm_ep_loop *loop)
{
    for (;;) {
        if (loop->ops->service && loop->ops->service(loop) < 0)
            return NULL;
        if (check_errors(loop) < 0)
            return NULL;
        for (uint32_t i = 0; i < loop->nslots; i++)
            if (loop->slots[i].pending == 0)
                return &loop->slots[i];
        if (loop->ops->wait(loop) < 0)
            return NULL;
    }
}

int bm_ep_loop_drain(struct bm_ep_loop *loop, int rc)
{
    struct bm_ep_error first;
    bm_ep_save_error(&first);
    loop->draining = 1;
    while (loop->in_flight > 0)
        if (loop->ops->wait(loop) < 0) {
            if (rc == 0)
                return -1;
            break;
        }
    if (rc < 0) {
        bm_ep_restore_error(&first);
        return -1;
    }
    return loop->ops->cancel_after_drain ? check_errors(loop) : loop->ops->recorded_error(loop);
}

int bm_ep_loop_write(struct bm_ep_loop *loop, struct bm_ep_slot *s, const char *buf,
                     uint64_t len, uint64_t offset)
{
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < loop->write_max ? len - done : loop->write_max;
        if (loop->ops->write(loop, s, buf + done, n, offset + done) < 0)
            return -1;
        done += n;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Zero runs                                                               */

/* Make [OFFSET, OFFSET+LEN) of the destination read as zeros: writes of
 * the zeros buffer, or the endpoint's zeroing requests. A slot's pending
 * count bounds them like data. */
static int send_zeros(struct bm_ep_loop *loop, uint64_t offset, uint64_t len)
{
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < loop->zero_step ? len - done : loop->zero_step;
        struct bm_ep_slot *s = bm_ep_loop_free_slot(loop);
        if (!s)
            return -1;
        int rc = loop->zeros ? bm_ep_loop_write(loop, s, loop->zeros, n, offset + done)
                             : loop->ops->zero(loop, s, offset + done, n);
        if (rc < 0)
            return -1;
        loop->st->bytes_punched += n;
        done += n;
    }
    return 0;
}

static int flush_zero_run(struct bm_ep_loop *loop)
{
    uint64_t offset = loop->zero_start, len = loop->zero_end - loop->zero_start;
    loop->zero_start = loop->zero_end = 0;
    if (len == 0 || (loop->flags & BM_EP_DST_FRESH))
        return 0;
    return send_zeros(loop, offset, len);
}

/* [OFFSET, OFFSET+LEN) reads as zeros: merged into the pending run. */
static int add_zeros(struct bm_ep_loop *loop, uint64_t offset, uint64_t len)
{
    if (len == 0)
        return 0;
    if (loop->zero_end != loop->zero_start && loop->zero_end == offset) {
        loop->zero_end += len;
        return 0;
    }
    if (flush_zero_run(loop) < 0)
        return -1;
    loop->zero_start = offset;
    loop->zero_end = offset + len;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Reading the source                                                      */

/* Slot S holds LEN source bytes of OFFSET: data runs out, zero runs noted. */
static int scatter(struct bm_ep_loop *loop, struct bm_ep_slot *s, uint64_t len,
                   uint64_t offset)
{
    uint64_t bs = loop->block, run = 0;
    int run_zero = -1;
    for (uint64_t i = 0;;) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        end = end > len ? len : end;
        int zero = i < len ? bm_ep_is_zero(s->buf + i, end - i) : -2;
        if (zero != run_zero) {
            if (run_zero == 1) {
                loop->st->bytes_zero += i - run;
                if (add_zeros(loop, offset + run, i - run) < 0)
                    return -1;
            } else if (run_zero == 0) {
                if (flush_zero_run(loop) < 0 ||
                    bm_ep_loop_write(loop, s, s->buf + run, i - run, offset + run) < 0)
                    return -1;
                loop->st->bytes_written += i - run;
            }
            run = i;
            run_zero = zero;
        }
        if (i == len)
            return 0;
        i = end;
    }
}

void bm_ep_loop_pace(struct bm_ep_loop *loop, uint64_t len)
{
    bm_ep_pace(loop->rate_cap, len);
}

void bm_ep_pace(bm_ep_rate_cap *cap, uint64_t len)
{
    if (!cap || !__atomic_load_n(&cap->bytes_per_s, __ATOMIC_ACQUIRE))
        return;
    uint64_t cost = (uint64_t)((double)len * 1e9 / (double)cap->bytes_per_s);
    uint64_t now = bm_ep_now_ns(), next = __atomic_load_n(&cap->next_ns, __ATOMIC_ACQUIRE);
    uint64_t start;
    do {
        start = next > now ? next : now;
    } while (!__atomic_compare_exchange_n(&cap->next_ns, &next, start + cost, 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    if (start > now) {
        struct timespec ts = {(time_t)((start - now) / 1000000000u),
                              (long)((start - now) % 1000000000u)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
}

/* LEN bytes of the source at OFFSET into BUF: how many there were (fewer
 * at the source's end), or -1. */
static int64_t read_full(struct bm_ep_loop *loop, char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(loop->src, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            loop->st->error_side = BM_EP_SIDE_SRC;
            return bm_ep_fail(errno, "read of %llu bytes at offset %llu failed: %s",
                              (unsigned long long)(len - done),
                              (unsigned long long)(offset + done), strerror(errno));
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

/* The digests of the granules wholly inside [OFFSET, OFFSET+LEN), whose
 * bytes are at BUF (NULL: they are zeros), go into the sink. Granules only
 * partly inside are left alone: this call did not see all of them. */
static void sink_granules(struct bm_ep_loop *loop, const char *buf, uint64_t offset,
                          uint64_t len)
{
    bm_ep_digest_sink *k = loop->sink;
    if (!k || len == 0)
        return;
    uint64_t g = k->granularity;
    uint64_t first = (offset + g - 1) / g, stop = (offset + len) / g;
    for (uint64_t i = first; i < stop; i++) {
        uint64_t d = k->zero_digest;
        if (buf) {
            d = k->hash(buf + (i * g - offset), (size_t)g);
            if (d == 0) /* 0 means "unknown" to the manifest */
                d = 1;
        }
        k->digests[loop->slot_base + (i - loop->slot_granule)] = d;
    }
}

/* Source data [OFFSET, END): a slot at a time, whole blocks (and, hashing,
 * whole granules) per slot. */
static int copy_data(struct bm_ep_loop *loop, uint64_t offset, uint64_t end)
{
    uint64_t align = loop->block;
    if (loop->sink && loop->sink->granularity > align)
        align = loop->sink->granularity;
    while (offset < end) {
        struct bm_ep_slot *s = bm_ep_loop_free_slot(loop);
        if (!s)
            return -1;
        uint64_t stop = end;
        if (end - offset > loop->slot_bytes) {
            stop = (offset + loop->slot_bytes) / align * align;
            if (stop <= offset)
                stop = offset + loop->slot_bytes;
        }
        bm_ep_loop_pace(loop, stop - offset);
        int64_t got = read_full(loop, s->buf, stop - offset, offset);
        if (got < 0)
            return -1;
        loop->st->bytes_read += (uint64_t)got;
        if (scatter(loop, s, (uint64_t)got, offset) < 0)
            return -1;
        /* After the writes are queued (they only read the slot): the
         * digest is of exactly the bytes sent. */
        sink_granules(loop, s->buf, offset, (uint64_t)got);
        if ((uint64_t)got < stop - offset) { /* the source ends here: the rest is zeros */
            loop->st->bytes_hole += end - offset - (uint64_t)got;
            return add_zeros(loop, offset + (uint64_t)got, end - offset - (uint64_t)got);
        }
        offset = stop;
    }
    return 0;
}

static off_t seek(int fd, uint64_t offset, int whence)
{
    off_t r;
    do {
        r = lseek(fd, (off_t)offset, whence);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* Where the data at or after OFFSET (and before END) starts: END when
 * there is none; OFFSET on a filesystem without SEEK_DATA (all data). */
static int64_t next_data(struct bm_ep_loop *loop, uint64_t offset, uint64_t end)
{
    off_t d = seek(loop->src, offset, SEEK_DATA);
    if (d < 0 && errno != ENXIO && errno != EINVAL && errno != EOPNOTSUPP) {
        loop->st->error_side = BM_EP_SIDE_SRC;
        return bm_ep_fail(errno, "SEEK_DATA at %llu failed: %s", (unsigned long long)offset,
                          strerror(errno));
    }
    uint64_t data = d < 0 ? (errno == ENXIO ? end : offset) : (uint64_t)d;
    return (int64_t)(data > end ? end : data);
}

/* One extent: holes by SEEK_DATA/SEEK_HOLE (a filesystem without them has
 * none: everything is data), data through copy_data. Hashing, a data run
 * is read from its first granule's start to its last granule's end
 * (clipped to the extent), so each granule is hashed whole; its end is
 * still sought from where the data itself starts, not from the granule's
 * start (there, in the hole, SEEK_HOLE would answer at once and the whole
 * rest of the extent would be read). */
static int copy_one(struct bm_ep_loop *loop, uint64_t offset, uint64_t end)
{
    while (offset < end) {
        int64_t found = next_data(loop, offset, end);
        if (found < 0)
            return -1;
        uint64_t data = (uint64_t)found;
        if (loop->sink && data < end) { /* from its granule's start */
            uint64_t down = data / loop->sink->granularity * loop->sink->granularity;
            data = down > offset ? down : offset;
        }
        if (data > offset) {
            loop->st->bytes_hole += data - offset;
            if (add_zeros(loop, offset, data - offset) < 0)
                return -1;
            sink_granules(loop, NULL, offset, data - offset);
            offset = data;
            continue;
        }
        off_t hole = seek(loop->src, (uint64_t)found, SEEK_HOLE);
        uint64_t stop = (hole < 0 || hole <= found || (uint64_t)hole > end) ? end
                                                                           : (uint64_t)hole;
        if (loop->sink) { /* ... to its granule's end */
            uint64_t g = loop->sink->granularity;
            uint64_t up = stop % g ? (stop / g + 1) * g : stop;
            stop = up < end ? up : end;
        }
        if (copy_data(loop, offset, stop) < 0)
            return -1;
        offset = stop;
    }
    return 0;
}

int bm_ep_loop_copy(struct bm_ep_loop *loop, const bm_ep_extent *extents, uint64_t count)
{
    bm_ep_digest_sink *sink = loop->sink;
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++) {
        if (sink)
            loop->slot_granule = extents[i].offset / sink->granularity;
        rc = copy_one(loop, extents[i].offset, extents[i].offset + extents[i].length);
        if (sink)
            loop->slot_base += slots_of(sink->granularity, extents[i].offset,
                                        extents[i].length);
    }
    if (rc == 0)
        rc = flush_zero_run(loop);
    return bm_ep_loop_drain(loop, rc);
}
