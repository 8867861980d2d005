/* compare.c - the verify kernel: compare two files over a batch of extents
 * and say which blocks differ.
 *
 * Why C: comparing page-cached images is bound by memory bandwidth. Done in
 * Python, every step allocates fresh multi-MiB buffers (page faults, zeroing)
 * and holds the GIL for the memcmp, so it only matched `qemu-img compare`.
 * Here both sides are read into one small scratch buffer that stays in the
 * CPU's cache (256 KiB a side by default) and compared there, with no GIL,
 * so two threads run two calls at full speed.
 *
 * Nothing here touches a file offset (pread only), so many threads may
 * compare disjoint extents of the same pair of fds at once. */
#include "bm_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct comparer {
    uint32_t block;
    bm_extent *out;
    uint64_t max, n;
};

/* Read up to LEN bytes at OFFSET; fewer only at the file's end. */
static int64_t read_side(int fd, char *buf, uint64_t len, uint64_t offset, uint32_t side,
                         uint32_t *error_side)
{
    int64_t done = bm_pread_full(fd, buf, len, offset);
    if (done < 0)
        *error_side = side;
    return done;
}

/* [START, END) differs: add it to the output, merged with the last extent
 * when they touch or overlap (a block split across two reads). */
static int add_diff(struct comparer *c, uint64_t start, uint64_t end)
{
    if (end <= start)
        return 0;
    if (c->n) {
        bm_extent *last = &c->out[c->n - 1];
        if (start <= last->offset + last->length) {
            if (end > last->offset + last->length)
                last->length = end - last->offset;
            return 0;
        }
    }
    if (c->n == c->max)
        return bm_fail(EOVERFLOW, "more than %llu differing extents",
                       (unsigned long long)c->max);
    c->out[c->n].offset = start;
    c->out[c->n].length = end - start;
    c->n++;
    return 0;
}

/* The blocks (aligned to file offsets, clipped to [LO, HI)) that hold a
 * difference between A and B, LEN bytes read at OFFSET. */
static int diff_blocks(struct comparer *c, const char *a, const char *b, uint64_t len,
                       uint64_t offset, uint64_t lo, uint64_t hi)
{
    uint64_t bs = c->block;
    uint64_t i = 0;
    while (i < len) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        if (end > len)
            end = len;
        if (memcmp(a + i, b + i, (size_t)(end - i)) != 0) {
            uint64_t start = (offset + i) / bs * bs;
            if (add_diff(c, start < lo ? lo : start,
                         start + bs > hi ? hi : start + bs) < 0)
                return -1;
        }
        i = end;
    }
    return 0;
}

static int compare_one(struct comparer *c, int a_fd, int b_fd, char *a, char *b, uint64_t half,
                       uint64_t lo, uint64_t hi, const uint32_t *cancel, uint32_t *error_side)
{
    uint64_t bs = c->block;
    uint64_t offset = lo;
    while (offset < hi) {
        if (cancel && __atomic_load_n(cancel, __ATOMIC_ACQUIRE))
            return bm_fail(ECANCELED, "compare cancelled");
        uint64_t step_end = hi;
        if (hi - offset > half) {
            /* End each full read on a block boundary so blocks stay whole. */
            step_end = (offset + half) / bs * bs;
            if (step_end <= offset)
                step_end = offset + half;
        }
        uint64_t want = step_end - offset;
        int64_t got_a = read_side(a_fd, a, want, offset, BM_COMPARE_SIDE_A, error_side);
        if (got_a < 0)
            return -1;
        int64_t got_b = read_side(b_fd, b, want, offset, BM_COMPARE_SIDE_B, error_side);
        if (got_b < 0)
            return -1;
        uint64_t both = (uint64_t)(got_a < got_b ? got_a : got_b);
        uint64_t either = (uint64_t)(got_a < got_b ? got_b : got_a);
        if (both && memcmp(a, b, (size_t)both) != 0 &&
            diff_blocks(c, a, b, both, offset, lo, hi) < 0)
            return -1;
        /* One side ended (it shrank under us): what only the other holds
         * differs, in whole blocks. */
        if (either > both) {
            uint64_t start = (offset + both) / bs * bs;
            uint64_t end = (offset + either + bs - 1) / bs * bs;
            if (add_diff(c, start < lo ? lo : start, end > hi ? hi : end) < 0)
                return -1;
        }
        if (either < want)
            break; /* both sides ended */
        offset = step_end;
    }
    return 0;
}

int64_t bm_compare_extents(int a_fd, int b_fd, const bm_extent *extents, uint64_t count,
                           char *buf, uint64_t buf_len, uint32_t block_size,
                           const uint32_t *cancel, bm_extent *out, uint64_t max,
                           uint32_t *error_side)
{
    if (!error_side)
        return bm_fail(EINVAL, "error_side must not be NULL");
    *error_side = BM_COMPARE_SIDE_NONE;
    if ((count && !extents) || (max && !out))
        return bm_fail(EINVAL, "extents and out must not be NULL");
    if (block_size < BM_COPY_MIN_BLOCK || block_size > BM_COPY_MAX_BLOCK ||
        (block_size & (block_size - 1)))
        return bm_fail(EINVAL, "block size %u is not a power of two between %u and %u",
                       block_size, BM_COPY_MIN_BLOCK, BM_COPY_MAX_BLOCK);
    if (buf_len == 0 && !buf)
        buf_len = BM_COMPARE_DEFAULT_BUFFER;
    if (buf_len < 2 || buf_len / 2 > (uint64_t)SSIZE_MAX)
        return bm_fail(EINVAL, "a compare buffer of %llu bytes is unusable",
                       (unsigned long long)buf_len);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t off = extents[i].offset, len = extents[i].length;
        if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
            return bm_fail(EINVAL, "extent %llu+%llu is past the largest file offset",
                           (unsigned long long)off, (unsigned long long)len);
    }
    int owned = 0;
    if (!buf) {
        buf = malloc((size_t)buf_len);
        if (!buf)
            return bm_fail(ENOMEM, "cannot allocate a %llu-byte compare buffer",
                           (unsigned long long)buf_len);
        owned = 1;
    }
    uint64_t half = buf_len / 2;
    struct comparer c = {.block = block_size, .out = out, .max = max, .n = 0};
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++)
        rc = compare_one(&c, a_fd, b_fd, buf, buf + half, half, extents[i].offset,
                         extents[i].offset + extents[i].length, cancel, error_side);
    int saved = errno;
    if (owned)
        free(buf);
    errno = saved;
    return rc < 0 ? -1 : (int64_t)c.n;
}
