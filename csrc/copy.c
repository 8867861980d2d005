/* copy.c - the extent copy engine: one call copies a batch of extents from
 * one file to the same offsets of another, keeping the copy sparse.
 *
 * Per extent: walk the source's data segments (SEEK_DATA/SEEK_HOLE); move
 * each segment with copy_file_range, or read it a buffer at a time, split it
 * into block-aligned zero and data runs, write the data runs. Zero runs and
 * holes are collected in one pending range that grows while they touch, so a
 * long stretch of zeros, holes and extent boundaries costs one punch.
 *
 * A bm_copier handle names the pair of files and remembers what their
 * filesystems refused (punching, SEEK_DATA, copy_file_range): the first
 * refusal clears the capability bit for every later call, on any thread, so
 * nobody asks again (the idea of nbdkit's file plugin's can_punch_hole).
 *
 * Nothing here touches a file offset (pread/pwrite/copy_file_range all take
 * explicit offsets), so many threads may copy disjoint extents of the same
 * pair of fds at once; cffi drops the GIL around the call. */
#include "bm_internal.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

/* copy_file_range is asked for at most this much at a time, so the cancel
 * flag and the rate cap are looked at now and then. */
#define CFR_STEP (8u << 20)
/* Each pwrite is at most this much. Longer writes (1 MiB and up) were
 * bimodal on this VM, 1 GiB cached taking 0.22 s or 1.1-2 s, the time all
 * in copying into the new page-cache folios; 128 KiB writes (cp's size)
 * stayed at the fast mode (bench/README.md, "Cached bulk copy"). */
#define WRITE_STEP (128u << 10)
#define ALL_CAPS (BM_COPIER_CAN_PUNCH | BM_COPIER_CAN_SEEK | BM_COPIER_CAN_FILE_RANGE)
#define ALL_CALL_FLAGS (BM_COPY_DST_FRESH | BM_COPY_START_WRITEBACK)

struct bm_copier {
    int src, dst;            /* not owned */
    uint32_t block;
    uint32_t caps;           /* BM_COPIER_CAN_*; bits are only ever cleared, atomically */
};

/* The state of one bm_copy_extents call (one thread). */
struct copier {
    bm_copier *handle;
    int src, dst;
    uint32_t flags;          /* BM_COPY_* of this call */
    uint32_t caps;           /* the handle's caps at entry, cleared here as things fail */
    uint32_t block;
    char *buf;
    uint64_t buf_len;
    int buf_owned;
    bm_rate_cap *rate_cap;
    const uint32_t *cancel;
    bm_copy_stats *st;
    bm_digest_sink *sink;    /* NULL: no digests asked for */
    uint64_t slot_base;      /* the sink slot of the current extent's first granule */
    uint64_t slot_granule;   /* ... and that granule's index */
    /* pending zero run [zero_start, zero_end) not yet punched */
    uint64_t zero_start, zero_end;
};

bm_copier *bm_copier_new(int src_fd, int dst_fd, uint32_t block_size, uint32_t caps)
{
    if (block_size < BM_COPY_MIN_BLOCK || block_size > BM_COPY_MAX_BLOCK ||
        (block_size & (block_size - 1))) {
        bm_fail(EINVAL, "block size %u is not a power of two between %u and %u", block_size,
                BM_COPY_MIN_BLOCK, BM_COPY_MAX_BLOCK);
        return NULL;
    }
    if (caps & ~(uint32_t)ALL_CAPS) {
        bm_fail(EINVAL, "unknown copier capability bits %#x", caps & ~(uint32_t)ALL_CAPS);
        return NULL;
    }
    if (src_fd < 0 || dst_fd < 0) {
        bm_fail(EBADF, "copier needs two open file descriptors");
        return NULL;
    }
    bm_copier *c = malloc(sizeof *c);
    if (!c) {
        bm_fail(ENOMEM, "out of memory");
        return NULL;
    }
    c->src = src_fd;
    c->dst = dst_fd;
    c->block = block_size;
    c->caps = caps;
    return c;
}

uint32_t bm_copier_caps(const bm_copier *copier)
{
    return __atomic_load_n(&copier->caps, __ATOMIC_ACQUIRE);
}

void bm_copier_free(bm_copier *copier)
{
    free(copier);
}

/* The filesystem refused CAP: stop using it in this call and, for every
 * later call on the handle, in any thread; report STAT_FLAG for this call. */
static void lose_cap(struct copier *c, uint32_t cap, uint32_t stat_flag)
{
    c->caps &= ~cap;
    __atomic_fetch_and(&c->handle->caps, ~cap, __ATOMIC_ACQ_REL);
    c->st->flags |= stat_flag;
}

int bm_buffer_is_zero(const char *buf, uint64_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    if (len < 16) {
        for (uint64_t i = 0; i < len; i++)
            if (p[i])
                return 0;
        return 1;
    }
    uint64_t head[2];
    memcpy(head, p, 16);
    if (head[0] | head[1])
        return 0;
    /* The first 16 bytes are zero and each byte equals the one 16 further
     * on, so by induction all are zero. memcmp is vectorised and stops at the
     * first difference. */
    return memcmp(p, p + 16, (size_t)(len - 16)) == 0;
}

void *bm_library_symbol(const char *path, const char *name)
{
    /* Already loaded by the interpreter, so this only takes a reference;
     * it is never dropped: the address is used for the process's life. */
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    return handle ? dlsym(handle, name) : NULL;
}

int64_t bm_filesystem_type(int fd)
{
    struct statfs sb;
    if (fstatfs(fd, &sb) < 0)
        return -1;
    return (int64_t)sb.f_type;
}

static int fail_on(struct copier *c, int side, int err, const char *what, uint64_t offset,
                   uint64_t len)
{
    c->st->error_side = (uint32_t)side;
    return bm_fail(err, "%s of %llu bytes at offset %llu failed: %s", what,
                   (unsigned long long)len, (unsigned long long)offset, strerror(err));
}

static int check_cancel(struct copier *c)
{
    if (c->cancel && __atomic_load_n(c->cancel, __ATOMIC_ACQUIRE))
        return bm_fail(ECANCELED, "copy cancelled");
    return 0;
}

/* Charge LEN bytes to the rate cap and sleep until they may move. The cap
 * lives in this process's memory, so its clock is never stale. */
static void pace(struct copier *c, uint64_t len)
{
    bm_rate_cap *cap = c->rate_cap;
    if (!cap)
        return;
    uint64_t rate = __atomic_load_n(&cap->bytes_per_s, __ATOMIC_ACQUIRE);
    uint64_t wait = bm_gcra_claim(&cap->next_ns, rate, len, UINT64_MAX);
    if (wait)
        bm_sleep_ns(wait);
}

/* Read up to LEN bytes at OFFSET; fewer only at the source's end. */
static int64_t read_full(struct copier *c, char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(c->src, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail_on(c, BM_COPY_SIDE_SRC, errno, "read", offset + done, len - done);
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

static int write_full(struct copier *c, const char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        uint64_t want = len - done < WRITE_STEP ? len - done : WRITE_STEP;
        ssize_t n = pwrite(c->dst, buf + done, (size_t)want, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail_on(c, BM_COPY_SIDE_DST, errno, "write", offset + done, len - done);
        }
        if (n == 0)
            return fail_on(c, BM_COPY_SIDE_DST, EIO, "write (no progress)", offset + done,
                           len - done);
        done += (uint64_t)n;
    }
    return 0;
}

static int ensure_buffer(struct copier *c)
{
    if (c->buf)
        return 0;
    c->buf = malloc((size_t)c->buf_len);
    if (!c->buf)
        return bm_fail(ENOMEM, "cannot allocate a %llu-byte copy buffer",
                       (unsigned long long)c->buf_len);
    c->buf_owned = 1;
    return 0;
}

/* Zero [OFFSET, OFFSET+LEN) of dst by writing zeros, clipped to dst's
 * current end: past it the file reads as zeros already, and writing there
 * would change its size. */
static int zero_in_place(struct copier *c, uint64_t offset, uint64_t len)
{
    struct stat sb;
    if (fstat(c->dst, &sb) < 0)
        return fail_on(c, BM_COPY_SIDE_DST, errno, "fstat", offset, len);
    uint64_t size = sb.st_size > 0 ? (uint64_t)sb.st_size : 0;
    if (offset >= size)
        return 0;
    if (len > size - offset)
        len = size - offset;
    if (bm_write_zeros(c->dst, offset, len) < 0) {
        c->st->error_side = BM_COPY_SIDE_DST;
        return -1;
    }
    return 0;
}

/* Make dst read as zeros over the pending zero run, then forget it. */
static int flush_zeros(struct copier *c)
{
    uint64_t offset = c->zero_start, len = c->zero_end - c->zero_start;
    c->zero_start = c->zero_end = 0;
    if (len == 0 || (c->flags & BM_COPY_DST_FRESH))
        return 0;
    if (c->caps & BM_COPIER_CAN_PUNCH) {
        if (bm_punch_hole(c->dst, offset, len) == 0) {
            c->st->bytes_punched += len;
            return 0;
        }
        if (errno != EOPNOTSUPP)
            return fail_on(c, BM_COPY_SIDE_DST, errno, "punch hole", offset, len);
        lose_cap(c, BM_COPIER_CAN_PUNCH, BM_COPY_PUNCH_FAILED);
    }
    if (zero_in_place(c, offset, len) < 0)
        return -1;
    c->st->bytes_punched += len;
    return 0;
}

/* Note that [OFFSET, OFFSET+LEN) of dst must read as zeros. */
static int add_zeros(struct copier *c, uint64_t offset, uint64_t len)
{
    if (len == 0)
        return 0;
    if (c->zero_end != c->zero_start && c->zero_end == offset) {
        c->zero_end += len;
        return 0;
    }
    if (flush_zeros(c) < 0)
        return -1;
    c->zero_start = offset;
    c->zero_end = offset + len;
    return 0;
}

/* BM_COPY_START_WRITEBACK: queue [OFFSET, OFFSET+LEN) of dst for writeback
 * now, without waiting. The copy then overlaps with the disk writing, and the
 * caller's final fsync waits only for the tail: it is what lets a durable
 * copy finish near the disk's own speed (nbdcopy does the same per request).
 * Only a hint: an error here (EIO included) is ignored, the fsync reports it. */
static void start_writeback(struct copier *c, uint64_t offset, uint64_t len)
{
    if (c->flags & BM_COPY_START_WRITEBACK)
        (void)sync_file_range(c->dst, (off_t)offset, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

static int write_data(struct copier *c, const char *buf, uint64_t len, uint64_t offset)
{
    /* Data ends the pending zero run (nothing after it can join the run). */
    if (flush_zeros(c) < 0)
        return -1;
    if (write_full(c, buf, len, offset) < 0)
        return -1;
    c->st->bytes_written += len;
    start_writeback(c, offset, len);
    return 0;
}

/* LEN bytes of source data now in BUF belong at OFFSET: write the data
 * blocks, note the zero blocks. Blocks are aligned to file offsets; the
 * first and last may be partial. */
static int scatter_blocks(struct copier *c, const char *buf, uint64_t len, uint64_t offset)
{
    uint64_t bs = c->block;
    uint64_t i = 0;
    uint64_t run_start = 0;
    int run_zero = -1;
    while (i < len) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        if (end > len)
            end = len;
        int zero = bm_buffer_is_zero(buf + i, end - i);
        if (zero != run_zero) {
            if (run_zero == 1) {
                c->st->bytes_zero += i - run_start;
                if (add_zeros(c, offset + run_start, i - run_start) < 0)
                    return -1;
            } else if (run_zero == 0) {
                if (write_data(c, buf + run_start, i - run_start, offset + run_start) < 0)
                    return -1;
            }
            run_start = i;
            run_zero = zero;
        }
        i = end;
    }
    if (run_zero == 1) {
        c->st->bytes_zero += len - run_start;
        return add_zeros(c, offset + run_start, len - run_start);
    }
    if (run_zero == 0)
        return write_data(c, buf + run_start, len - run_start, offset + run_start);
    return 0;
}

/* The digests of the granules wholly inside [OFFSET, OFFSET+LEN) of dst,
 * whose bytes are at BUF (NULL: they are zeros), go into the sink. Granules
 * only partly inside are left alone: this call did not see all of them. */
static void sink_granules(struct copier *c, const char *buf, uint64_t offset, uint64_t len)
{
    bm_digest_sink *s = c->sink;
    if (!s || len == 0)
        return;
    uint64_t g = s->granularity;
    uint64_t first = (offset + g - 1) / g, stop = (offset + len) / g;
    for (uint64_t i = first; i < stop; i++) {
        uint64_t h = s->zero_digest;
        if (buf) {
            h = s->hash(buf + (i * g - offset), (size_t)g);
            if (h == 0) /* 0 means "unknown" to the manifest */
                h = 1;
        }
        s->digests[c->slot_base + (i - c->slot_granule)] = h;
    }
}

/* The source ends before END: the rest reads as zeros. */
static int past_source_end(struct copier *c, uint64_t offset, uint64_t end)
{
    c->st->bytes_hole += end - offset;
    return add_zeros(c, offset, end - offset);
}

/* Copy source data [OFFSET, END) through the buffer with zero detection. */
static int copy_by_reading(struct copier *c, uint64_t offset, uint64_t end)
{
    if (ensure_buffer(c) < 0)
        return -1;
    while (offset < end) {
        if (check_cancel(c) < 0)
            return -1;
        uint64_t step_end = end;
        if (end - offset > c->buf_len) {
            /* End each full buffer on a block boundary so blocks stay whole
             * (and on a granule boundary, so granules are hashed whole). */
            uint64_t align = c->block;
            if (c->sink && c->sink->granularity > align)
                align = c->sink->granularity;
            step_end = (offset + c->buf_len) / align * align;
            if (step_end <= offset)
                step_end = offset + c->buf_len;
        }
        uint64_t want = step_end - offset;
        pace(c, want);
        int64_t got = read_full(c, c->buf, want, offset);
        if (got < 0)
            return -1;
        c->st->bytes_read += (uint64_t)got;
        if (scatter_blocks(c, c->buf, (uint64_t)got, offset) < 0)
            return -1;
        sink_granules(c, c->buf, offset, (uint64_t)got);
        if ((uint64_t)got < want)
            return past_source_end(c, offset + (uint64_t)got, end);
        offset = step_end;
    }
    return 0;
}

/* Copy source data [OFFSET, END) in the kernel, falling back to reading
 * when copy_file_range is refused or stops short. */
static int copy_in_kernel(struct copier *c, uint64_t offset, uint64_t end)
{
    while (offset < end) {
        if (check_cancel(c) < 0)
            return -1;
        uint64_t want = end - offset < CFR_STEP ? end - offset : CFR_STEP;
        pace(c, want);
        loff_t in = (loff_t)offset, out = (loff_t)offset;
        ssize_t n = copy_file_range(c->src, &in, c->dst, &out, (size_t)want, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (bm_errno_unsupported(BM_OP_COPY_RANGE, errno)) {
                lose_cap(c, BM_COPIER_CAN_FILE_RANGE, BM_COPY_FILE_RANGE_FAILED);
                return copy_by_reading(c, offset, end);
            }
            /* Which side failed is not known; EBADF/ENOSPC/EFBIG are dst's
             * usual, EIO could be either. */
            return fail_on(c, errno == EIO ? BM_COPY_SIDE_NONE : BM_COPY_SIDE_DST, errno,
                           "copy_file_range", offset, want);
        }
        if (n == 0) {
            /* The source's end, or a file the kernel cannot copy from:
             * reading tells the two apart. */
            return copy_by_reading(c, offset, end);
        }
        if (flush_zeros(c) < 0)
            return -1;
        c->st->bytes_read += (uint64_t)n;
        c->st->bytes_written += (uint64_t)n;
        start_writeback(c, offset, (uint64_t)n);
        offset += (uint64_t)n;
    }
    return 0;
}

static int copy_data(struct copier *c, uint64_t offset, uint64_t end)
{
    /* Digests need the bytes in our buffer: no copy in the kernel then. */
    if ((c->caps & BM_COPIER_CAN_FILE_RANGE) && !c->sink)
        return copy_in_kernel(c, offset, end);
    return copy_by_reading(c, offset, end);
}

static off_t seek_retry(int fd, uint64_t offset, int whence)
{
    off_t r;
    do {
        r = lseek(fd, (off_t)offset, whence);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* Where the next data at or after OFFSET starts, or END if none before END.
 * Returns OFFSET itself when holes can't be seen. */
static int next_data(struct copier *c, uint64_t offset, uint64_t end, uint64_t *out)
{
    if (!(c->caps & BM_COPIER_CAN_SEEK)) {
        *out = offset;
        return 0;
    }
    off_t r = seek_retry(c->src, offset, SEEK_DATA);
    if (r < 0) {
        if (errno == ENXIO) { /* only holes from here to the source's end */
            *out = end;
            return 0;
        }
        if (bm_errno_unsupported(BM_OP_SEEK_HOLES, errno)) {
            lose_cap(c, BM_COPIER_CAN_SEEK, BM_COPY_SEEK_FAILED);
            *out = offset;
            return 0;
        }
        return fail_on(c, BM_COPY_SIDE_SRC, errno, "SEEK_DATA", offset, end - offset);
    }
    *out = (uint64_t)r < end ? (uint64_t)r : end;
    return 0;
}

/* Where the data starting at OFFSET ends, clipped to END. */
static int data_end(struct copier *c, uint64_t offset, uint64_t end, uint64_t *out)
{
    if (!(c->caps & BM_COPIER_CAN_SEEK)) {
        *out = end;
        return 0;
    }
    off_t r = seek_retry(c->src, offset, SEEK_HOLE);
    if (r < 0) {
        if (errno == ENXIO) { /* truncated since SEEK_DATA: reading finds the end */
            *out = end;
            return 0;
        }
        return fail_on(c, BM_COPY_SIDE_SRC, errno, "SEEK_HOLE", offset, end - offset);
    }
    /* A result at or before OFFSET means the file changed under us; read. */
    *out = ((uint64_t)r <= offset || (uint64_t)r > end) ? end : (uint64_t)r;
    return 0;
}

static int copy_one(struct copier *c, uint64_t offset, uint64_t end)
{
    while (offset < end) {
        if (check_cancel(c) < 0)
            return -1;
        uint64_t found = end;
        if (next_data(c, offset, end, &found) < 0)
            return -1;
        uint64_t data = found;
        if (c->sink && data < end) {
            /* Read from the granule's start, so it is hashed whole. */
            uint64_t down = data / c->sink->granularity * c->sink->granularity;
            data = down > offset ? down : offset;
        }
        if (data > offset) {
            c->st->bytes_hole += data - offset;
            if (add_zeros(c, offset, data - offset) < 0)
                return -1;
            sink_granules(c, NULL, offset, data - offset);
            offset = data;
            continue;
        }
        /* Where the data ends is asked from FOUND, the data itself: OFFSET
         * may be a granule's start inside the hole before it, and SEEK_HOLE
         * there answers OFFSET (read as "no hole seen": the whole rest). */
        uint64_t stop = end;
        if (data_end(c, found, end, &stop) < 0)
            return -1;
        if (c->sink) {
            uint64_t g = c->sink->granularity;
            uint64_t up = stop % g ? (stop / g + 1) * g : stop;
            stop = up < end ? up : end;
        }
        if (copy_data(c, offset, stop) < 0)
            return -1;
        offset = stop;
    }
    return 0;
}

int bm_copy_extents(bm_copier *copier, const bm_extent *extents, uint64_t count, char *buf,
                    uint64_t buf_len, uint32_t flags, bm_rate_cap *rate_cap,
                    const uint32_t *cancel, bm_copy_stats *stats)
{
    return bm_copy_extents_hashed(copier, extents, count, buf, buf_len, flags, rate_cap, cancel,
                                  NULL, stats);
}

/* The sink slots extent [OFFSET, OFFSET+LEN) takes: one per granule it touches. */
static uint64_t slots_of(uint64_t g, uint64_t offset, uint64_t len)
{
    return len ? (offset + len + g - 1) / g - offset / g : 0;
}

static int check_sink(const bm_digest_sink *sink, const bm_extent *extents, uint64_t count)
{
    if (!sink)
        return 0;
    uint64_t g = sink->granularity;
    if (!sink->hash || g < BM_COPY_MIN_BLOCK || (g & (g - 1)))
        return bm_fail(EINVAL, "digest sink needs a hash function and a power-of-two "
                               "granularity of at least %u", BM_COPY_MIN_BLOCK);
    uint64_t need = 0;
    for (uint64_t i = 0; i < count; i++)
        need += slots_of(g, extents[i].offset, extents[i].length);
    if (need > sink->count || (need && !sink->digests))
        return bm_fail(EINVAL, "digest sink has %llu slots, the extents need %llu",
                       (unsigned long long)sink->count, (unsigned long long)need);
    return 0;
}

int bm_copy_extents_hashed(bm_copier *copier, const bm_extent *extents, uint64_t count,
                           char *buf, uint64_t buf_len, uint32_t flags,
                           bm_rate_cap *rate_cap, const uint32_t *cancel,
                           bm_digest_sink *sink, bm_copy_stats *stats)
{
    if (!stats)
        return bm_fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);

    if (!copier)
        return bm_fail(EINVAL, "copier must not be NULL");
    if (count && !extents)
        return bm_fail(EINVAL, "extents must not be NULL");
    if (flags & ~(uint32_t)ALL_CALL_FLAGS)
        return bm_fail(EINVAL, "unknown copy flags %#x", flags & ~(uint32_t)ALL_CALL_FLAGS);
    uint32_t block_size = copier->block;
    if (buf_len == 0 && !buf)
        buf_len = BM_COPY_DEFAULT_BUFFER;
    if (buf_len < block_size)
        return bm_fail(EINVAL, "buffer of %llu bytes is smaller than the %u-byte block",
                       (unsigned long long)buf_len, block_size);
    if (buf_len > (uint64_t)SSIZE_MAX)
        return bm_fail(EINVAL, "buffer of %llu bytes is too large", (unsigned long long)buf_len);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t off = extents[i].offset, len = extents[i].length;
        if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
            return bm_fail(EINVAL, "extent %llu+%llu is past the largest file offset",
                           (unsigned long long)off, (unsigned long long)len);
    }
    if (check_sink(sink, extents, count) < 0)
        return -1;

    struct copier c = {
        .handle = copier,
        .src = copier->src,
        .dst = copier->dst,
        .flags = flags,
        .caps = bm_copier_caps(copier),
        .block = block_size,
        .buf = buf,
        .buf_len = buf_len,
        .buf_owned = 0,
        .rate_cap = rate_cap,
        .cancel = cancel,
        .st = stats,
        .sink = sink,
    };
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++) {
        uint64_t off = extents[i].offset, len = extents[i].length;
        if (sink) {
            c.slot_granule = off / sink->granularity;
            rc = copy_one(&c, off, off + len);
            c.slot_base += slots_of(sink->granularity, off, len);
        } else {
            rc = copy_one(&c, off, off + len);
        }
    }
    if (rc == 0)
        rc = flush_zeros(&c);
    int saved = errno;
    if (c.buf_owned)
        free(c.buf);
    errno = saved;
    return rc;
}

/* Read LEN bytes of FD at OFFSET into BUF; what lies past the file's end
 * reads as zeros (a file that shrank is hashed as the zeros a copy of it
 * holds there). */
static int read_padded(int fd, char *buf, uint64_t len, uint64_t offset)
{
    int64_t done = bm_pread_full(fd, buf, len, offset);
    if (done < 0)
        return -1;
    memset(buf + done, 0, (size_t)(len - (uint64_t)done));
    return 0;
}

/* Digest [POS, END) of FD (POS on a granule boundary) into SINK slots from
 * SLOT on, a buffer of STEP bytes (a multiple of the granularity) at a time. */
static int digest_range(int fd, uint64_t pos, uint64_t end, char *buf, uint64_t step,
                        const uint32_t *cancel, bm_digest_sink *sink, uint64_t slot)
{
    uint64_t g = sink->granularity;
    while (pos < end) {
        if (cancel && __atomic_load_n(cancel, __ATOMIC_ACQUIRE))
            return bm_fail(ECANCELED, "digest cancelled");
        uint64_t want = end - pos < step ? end - pos : step;
        if (read_padded(fd, buf, want, pos) < 0)
            return -1;
        for (uint64_t at = 0; at < want; at += g) {
            uint64_t len = want - at < g ? want - at : g;
            uint64_t h = sink->hash(buf + at, (size_t)len);
            sink->digests[slot++] = h ? h : 1;
        }
        pos += want;
    }
    return 0;
}

int bm_digest_extents(int fd, const bm_extent *extents, uint64_t count, char *buf,
                      uint64_t buf_len, const uint32_t *cancel, bm_digest_sink *sink)
{
    if (!sink || (count && !extents))
        return bm_fail(EINVAL, "sink and extents must not be NULL");
    if (check_sink(sink, extents, count) < 0)
        return -1;
    uint64_t g = sink->granularity;
    if (buf_len == 0 && !buf)
        buf_len = BM_COPY_DEFAULT_BUFFER > g ? BM_COPY_DEFAULT_BUFFER : g;
    if (buf_len < g || buf_len > (uint64_t)SSIZE_MAX)
        return bm_fail(EINVAL, "buffer of %llu bytes does not fit a %llu-byte granule",
                       (unsigned long long)buf_len, (unsigned long long)g);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t off = extents[i].offset, len = extents[i].length;
        if (off % g || off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
            return bm_fail(EINVAL, "extent %llu+%llu does not start on a granule or ends "
                           "past the largest file offset", (unsigned long long)off,
                           (unsigned long long)len);
    }
    int owned = !buf;
    if (owned && !(buf = malloc((size_t)buf_len)))
        return bm_fail(ENOMEM, "cannot allocate a %llu-byte buffer",
                       (unsigned long long)buf_len);
    int rc = 0;
    uint64_t slot = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++) {
        uint64_t off = extents[i].offset, len = extents[i].length;
        rc = digest_range(fd, off, off + len, buf, buf_len / g * g, cancel, sink, slot);
        slot += slots_of(g, off, len);
    }
    int saved = errno;
    if (owned)
        free(buf);
    errno = saved;
    return rc;
}

int64_t bm_data_extents(int fd, uint64_t *cursor, uint64_t end, bm_extent *out, uint64_t max)
{
    if (!cursor || (max && !out))
        return bm_fail(EINVAL, "cursor and out must not be NULL");
    if (end > (uint64_t)INT64_MAX)
        return bm_fail(EINVAL, "end %llu is past the largest file offset",
                       (unsigned long long)end);
    uint64_t pos = *cursor;
    uint64_t n = 0;
    while (n < max && pos < end) {
        off_t d = seek_retry(fd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) {
                pos = end;
                break;
            }
            if (bm_errno_unsupported(BM_OP_SEEK_HOLES, errno)) {
                out[n].offset = pos; /* holes unknown: all data */
                out[n].length = end - pos;
                n++;
                pos = end;
                break;
            }
            return bm_fail(errno, "SEEK_DATA at %llu failed: %s", (unsigned long long)pos,
                           strerror(errno));
        }
        if ((uint64_t)d >= end) {
            pos = end;
            break;
        }
        off_t h = seek_retry(fd, (uint64_t)d, SEEK_HOLE);
        if (h < 0 && errno != ENXIO)
            return bm_fail(errno, "SEEK_HOLE at %llu failed: %s", (unsigned long long)d,
                           strerror(errno));
        uint64_t stop = (h < 0 || (uint64_t)h > end || h <= d) ? end : (uint64_t)h;
        out[n].offset = (uint64_t)d;
        out[n].length = stop - (uint64_t)d;
        n++;
        pos = stop;
    }
    *cursor = pos >= end ? UINT64_MAX : pos;
    return (int64_t)n;
}
