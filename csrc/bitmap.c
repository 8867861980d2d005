/* bitmap.c - the dirty bitmap: one bit per granule in 64-bit words shared by
 * every process that maps the sidecar. Every access is atomic (invariant I2:
 * the copier takes whole words by exchange before it reads their blocks). */
#include "bm_internal.h"

#include <string.h>
#include <sys/mman.h>

static inline uint64_t run_mask(unsigned from, unsigned to_excl)
{
    /* bits [from, to_excl) of a word, 0 <= from < to_excl <= 64 */
    uint64_t hi = to_excl == 64 ? ~0ull : ((1ull << to_excl) - 1);
    return hi & ~((1ull << from) - 1);
}

/* The bits of word W that granules [FIRST, LAST_EXCL) cover (W between the
 * words holding FIRST and LAST_EXCL - 1). */
static inline uint64_t word_mask(uint64_t w, uint64_t first, uint64_t last_excl)
{
    unsigned from = w == first / 64 ? (unsigned)(first % 64) : 0;
    unsigned to = w == (last_excl - 1) / 64 ? (unsigned)((last_excl - 1) % 64) + 1 : 64;
    return run_mask(from, to);
}

/* Raise each granule's era to at least ERA (never lower it: a slow writer
 * holding an older era must not hide a newer write's mark). A chunk where an
 * era rose is marked afterwards, so the next sealing recomputes its checksum
 * (eras.c); re-writing a granule already of this era costs nothing more. */
static void raise_eras(bm_tracker *t, uint64_t first, uint64_t last_excl, uint32_t era)
{
    for (uint64_t g = first; g < last_excl;) {
        uint64_t stop = (g / BM_CHUNK_GRANULES + 1) * BM_CHUNK_GRANULES;
        if (stop > last_excl)
            stop = last_excl;
        int raised = 0;
        for (; g < stop; g++) {
            uint32_t *slot = bm_era(t, g);
            uint32_t cur = __atomic_load_n(slot, __ATOMIC_RELAXED);
            while (cur < era) {
                if (__atomic_compare_exchange_n(slot, &cur, era, 1, __ATOMIC_SEQ_CST,
                                                __ATOMIC_RELAXED)) {
                    raised = 1;
                    break;
                }
            }
        }
        if (raised)
            bm_touch_chunk(t, (stop - 1) / BM_CHUNK_GRANULES);
    }
}

static inline uint32_t current_era(const bm_tracker *t)
{
    uint64_t gen = __atomic_load_n(&t->hdr->generation, __ATOMIC_SEQ_CST);
    return gen > UINT32_MAX ? UINT32_MAX : (uint32_t)gen;
}

/* Set bits [first, last_excl) and stamp their eras. A relaxed look first: a
 * word that already has the bits is left alone, so re-marking a hot range
 * (I1 marks twice) does not bounce its cache line between processes.
 * Skipping is safe because a bit we saw set is cleared only by a copier
 * that reads the block afterwards. */
void bm_mark_granules(bm_tracker *t, uint64_t first, uint64_t last_excl)
{
    if (first >= last_excl)
        return;
    raise_eras(t, first, last_excl, current_era(t));
    for (uint64_t w = first / 64; w <= (last_excl - 1) / 64; w++) {
        uint64_t m = word_mask(w, first, last_excl);
        if ((__atomic_load_n(bm_word(t, w), __ATOMIC_SEQ_CST) & m) != m)
            __atomic_fetch_or(bm_word(t, w), m, __ATOMIC_SEQ_CST);
    }
}

void bm_raise_eras_now(bm_tracker *t, uint64_t first, uint64_t last_excl)
{
    raise_eras(t, first, last_excl, current_era(t));
}

int bm_any_dirty(bm_tracker *t, uint64_t first, uint64_t last_excl)
{
    if (first >= last_excl)
        return 0;
    for (uint64_t w = first / 64; w <= (last_excl - 1) / 64; w++) {
        if (__atomic_load_n(bm_word(t, w), __ATOMIC_SEQ_CST) & word_mask(w, first, last_excl))
            return 1;
    }
    return 0;
}

static int do_mark(bm_tracker *t, uint64_t offset, uint64_t length)
{
    if (length == 0)
        return 0;
    uint64_t size = bm_image_size(t);
    if (offset > size || length > size - offset)
        return bm_fail(EINVAL, "range %llu+%llu is past the image end %llu",
                       (unsigned long long)offset, (unsigned long long)length,
                       (unsigned long long)size);
    bm_mark_granules(t, offset >> t->shift, ((offset + length - 1) >> t->shift) + 1);
    return 0;
}

static int do_clear_range(bm_tracker *t, uint64_t offset, uint64_t length)
{
    /* Clipped to the image, which may have shrunk since the caller listed
     * the range: there is nothing to clear past its end. */
    uint64_t size = bm_image_size(t);
    if (offset >= size)
        return 0;
    if (length > size - offset)
        length = size - offset;
    /* Only granules the range covers whole: a write to the rest of a
     * granule at the edge was not copied with this range, so its bit stays.
     * The granule holding the image's end counts as whole up to the end. */
    uint64_t g_size = (uint64_t)1 << t->shift;
    uint64_t first = (offset + g_size - 1) >> t->shift;
    uint64_t end = offset + length;
    uint64_t last_excl = end == size ? bm_granules(t, size) : end >> t->shift;
    if (first >= last_excl)
        return 0;
    for (uint64_t w = first / 64; w <= (last_excl - 1) / 64; w++) {
        uint64_t m = word_mask(w, first, last_excl);
        if (__atomic_load_n(bm_word(t, w), __ATOMIC_RELAXED) & m)
            __atomic_fetch_and(bm_word(t, w), ~m, __ATOMIC_SEQ_CST);
    }
    return 0;
}

static int do_mark_all(bm_tracker *t)
{
    bm_mark_granules(t, 0, bm_granules(t, bm_image_size(t)));
    return 0;
}

/* See bm_internal.h. The kernel maps pages around each fault (fault-around,
 * 64 KiB by default), so pages just behind the walk come back: drop in 1 MiB
 * steps, a window behind the walk. */
#define FORGET_STEP (1u << 20)
#define FORGET_LAG (1u << 17)

void bm_forget_behind(const bm_tracker *t, struct bm_forget_walk *w, uint64_t next_chunk,
                      int last)
{
    uintptr_t at = (uintptr_t)(t->data + next_chunk * BM_CHUNK_BYTES);
    if (w->done == 0)
        w->done = (uintptr_t)t->data & ~(uintptr_t)(BM_PAGE - 1);
    if (!last && at < w->done + FORGET_STEP + FORGET_LAG)
        return;
    uintptr_t upto = last ? at : at - FORGET_LAG;
    upto = (upto + BM_PAGE - 1) & ~(uintptr_t)(BM_PAGE - 1);
    if (upto > w->done) {
        madvise((void *)w->done, upto - w->done, MADV_DONTNEED);
        w->done = upto;
    }
}

/* The first word in [W, LIMIT) that is not zero, looking no further than
 * the end of W's chunk (returns that end, or LIMIT, if all are zero). A big
 * bitmap is mostly zeros, and stepping a pointer through them is several
 * times cheaper than bm_word() plus the edge checks of the callers' loops
 * (bench/: a clean 1 TiB scan at 64 KiB granules, ~300 -> ~90 us). */
static inline uint64_t skip_zero_words(const bm_tracker *t, uint64_t w, uint64_t limit)
{
    uint64_t stop = (w / BM_CHUNK_WORDS + 1) * BM_CHUNK_WORDS;
    if (stop > limit)
        stop = limit;
    for (const uint64_t *p = bm_word(t, w); w < stop && !__atomic_load_n(p, __ATOMIC_RELAXED);
         p++)
        w++;
    return w;
}

/* Walk the bitmap from granule *CURSOR, turning runs of set bits into byte
 * extents. With CLEAR, each non-zero word is exchanged with zero first, and
 * bits that do not fit in OUT are OR-ed back (re-marking is always safe). */
static int64_t scan(bm_tracker *t, uint64_t *cursor, bm_extent *out, uint64_t max, int clear)
{
    if (*cursor == UINT64_MAX)
        return 0;
    if (max == 0)
        return bm_fail(EINVAL, "extent array has no room");
    uint64_t size = bm_image_size(t);
    uint64_t ngran = bm_granules(t, size);
    uint64_t nwords = bm_words_for(ngran);
    uint64_t n = 0;
    if (*cursor == 0 && clear)
        __atomic_fetch_add(&t->hdr->generation, 1, __ATOMIC_SEQ_CST);

    struct bm_forget_walk walk = {0};
    for (uint64_t w = *cursor / 64; w < nwords; w++) {
        /* Zero words between the first and the last are skipped in bulk;
         * the first and last keep the masks below. */
        if (w != *cursor / 64)
            w = skip_zero_words(t, w, nwords - 1);
        bm_forget_behind(t, &walk, w / BM_CHUNK_WORDS, 0);
        uint64_t valid = ~0ull;
        if (w == *cursor / 64)
            valid &= ~((1ull << (*cursor % 64)) - 1);
        if (w == nwords - 1 && ngran % 64)
            valid &= (1ull << (ngran % 64)) - 1;
        uint64_t bits = __atomic_load_n(bm_word(t, w), __ATOMIC_RELAXED) & valid;
        if (!bits)
            continue;
        if (clear) {
            if (valid == ~0ull)
                bits = __atomic_exchange_n(bm_word(t, w), 0, __ATOMIC_SEQ_CST);
            else
                bits = __atomic_fetch_and(bm_word(t, w), ~valid, __ATOMIC_SEQ_CST) & valid;
        }
        while (bits) {
            unsigned from = (unsigned)__builtin_ctzll(bits);
            uint64_t rest = ~(bits >> from);
            unsigned len = rest ? (unsigned)__builtin_ctzll(rest) : 64 - from;
            uint64_t g0 = w * 64 + from;
            uint64_t off = g0 << t->shift;
            uint64_t end = (g0 + len) << t->shift;
            if (end > size)
                end = size;
            if (n > 0 && out[n - 1].offset + out[n - 1].length == off) {
                out[n - 1].length = end - out[n - 1].offset;
            } else if (n == max) {
                if (clear)
                    __atomic_fetch_or(bm_word(t, w), bits, __ATOMIC_SEQ_CST);
                *cursor = g0;
                bm_forget_behind(t, &walk, w / BM_CHUNK_WORDS, 1);
                return (int64_t)n;
            } else {
                out[n].offset = off;
                out[n].length = end - off;
                n++;
            }
            bits &= ~run_mask(from, from + len);
        }
    }
    *cursor = UINT64_MAX;
    bm_forget_behind(t, &walk, (nwords + BM_CHUNK_WORDS - 1) / BM_CHUNK_WORDS, 1);
    return (int64_t)n;
}

static int64_t do_fetch_and_clear(bm_tracker *t, uint64_t *cursor, bm_extent *out, uint64_t max)
{
    return scan(t, cursor, out, max, 1);
}

static int64_t do_snapshot(bm_tracker *t, uint64_t *cursor, bm_extent *out, uint64_t max)
{
    return scan(t, cursor, out, max, 0);
}

static int64_t do_dirty_bytes(bm_tracker *t)
{
    uint64_t size = bm_image_size(t);
    uint64_t ngran = bm_granules(t, size);
    uint64_t nwords = bm_words_for(ngran);
    uint64_t count = 0;
    struct bm_forget_walk walk = {0};
    for (uint64_t w = 0; w < nwords; w++) {
        w = skip_zero_words(t, w, nwords - 1); /* the last word keeps its mask */
        bm_forget_behind(t, &walk, w / BM_CHUNK_WORDS, 0);
        uint64_t bits = __atomic_load_n(bm_word(t, w), __ATOMIC_RELAXED);
        if (w == nwords - 1 && ngran % 64)
            bits &= (1ull << (ngran % 64)) - 1;
        /* Skip zero words: at -O2 for baseline x86-64 (no POPCNT) the
         * popcount is a libgcc call, and a big bitmap is mostly zeros
         * (bench/: 1 TiB at 0.1 % dirty, 386 -> 259 us). */
        if (bits)
            count += (uint64_t)__builtin_popcountll(bits);
    }
    bm_forget_behind(t, &walk, (nwords + BM_CHUNK_WORDS - 1) / BM_CHUNK_WORDS, 1);
    uint64_t bytes = count << t->shift;
    if (ngran > 0 && (size & (((uint64_t)1 << t->shift) - 1))) {
        uint64_t last = ngran - 1;
        if (__atomic_load_n(bm_word(t, last / 64), __ATOMIC_RELAXED) & (1ull << (last % 64)))
            bytes -= ((uint64_t)1 << t->shift) - (size & (((uint64_t)1 << t->shift) - 1));
    }
    return (int64_t)bytes;
}

static int do_resize(bm_tracker *t, uint64_t new_size)
{
    if (bm_ensure_capacity(t, new_size) < 0)
        return -1;
    uint64_t old = __atomic_exchange_n(&t->hdr->image_size, new_size, __ATOMIC_SEQ_CST);
    uint64_t g_old = bm_granules(t, old), g_new = bm_granules(t, new_size);
    if (new_size > old) {
        /* the old last granule gains bytes too */
        bm_mark_granules(t, old >> t->shift, g_new);
    } else if (new_size < old) {
        for (uint64_t g = g_new; g < g_old;) {
            uint64_t w = g / 64;
            unsigned from = (unsigned)(g % 64);
            unsigned to = (g_old - w * 64) >= 64 ? 64 : (unsigned)(g_old - w * 64);
            __atomic_fetch_and(bm_word(t, w), ~run_mask(from, to), __ATOMIC_SEQ_CST);
            g = (w + 1) * 64;
        }
        if (new_size > 0)
            bm_mark_granules(t, (new_size - 1) >> t->shift, g_new);
    }
    return 0;
}

static int do_new_change_id(bm_tracker *t, uint64_t *generation)
{
    uint64_t gen = __atomic_fetch_add(&t->hdr->generation, 1, __ATOMIC_SEQ_CST);
    if (gen >= UINT32_MAX - 1)
        return bm_fail(EOVERFLOW, "change ids are exhausted in this series; reset the sidecar");
    *generation = gen;
    return 0;
}

/* Append the granules of [G, CHUNK_END) (one chunk) whose era is past LIMIT
 * to OUT (*N used of MAX), merging touching ones. Returns the granule where
 * OUT ran out of room, or CHUNK_END when the chunk is done. */
static uint64_t changed_in_chunk(const bm_tracker *t, uint64_t g, uint64_t chunk_end,
                                 uint32_t limit, bm_extent *out, uint64_t *n, uint64_t max)
{
    uint64_t size = bm_image_size(t);
    const uint32_t *eras = bm_era(t, g);
    uint64_t i = 0, len = chunk_end - g;
    while (i < len) {
        if (__atomic_load_n(&eras[i], __ATOMIC_RELAXED) <= limit) {
            i++;
            continue;
        }
        uint64_t start = i;
        while (i < len && __atomic_load_n(&eras[i], __ATOMIC_RELAXED) > limit)
            i++;
        uint64_t off = (g + start) << t->shift;
        uint64_t end = (g + i) << t->shift;
        if (end > size)
            end = size;
        if (*n > 0 && out[*n - 1].offset + out[*n - 1].length == off) {
            out[*n - 1].length = end - out[*n - 1].offset;
        } else if (*n == max) {
            return g + start;
        } else {
            out[*n].offset = off;
            out[*n].length = end - off;
            (*n)++;
        }
    }
    return chunk_end;
}

static int64_t do_changed_since(bm_tracker *t, uint64_t since, uint64_t *cursor, bm_extent *out,
                         uint64_t max)
{
    if (*cursor == UINT64_MAX)
        return 0;
    if (max == 0)
        return bm_fail(EINVAL, "extent array has no room");
    if (since >= UINT32_MAX)
        return bm_fail(EINVAL, "change id generation %llu is out of range",
                       (unsigned long long)since);
    uint64_t ngran = bm_granules(t, bm_image_size(t));
    uint64_t n = 0;
    struct bm_forget_walk walk = {0};
    /* Sealed, a chunk whose checksum says all-zero eras holds no change:
     * skip it unread, so the query costs what was written, not 1 GiB of
     * eras at 15 TiB. (Open, a writer of an older blockmirror may have
     * raised eras without marking the chunk: read them all.) */
    int skip_unwritten = bm_eras_sealed(t);
    for (uint64_t g = *cursor; g < ngran;) {
        bm_forget_behind(t, &walk, g / BM_CHUNK_GRANULES, 0);
        /* Scan within one chunk: its eras are contiguous. */
        uint64_t chunk_end = (g / BM_CHUNK_GRANULES + 1) * BM_CHUNK_GRANULES;
        if (chunk_end > ngran)
            chunk_end = ngran;
        uint64_t next = skip_unwritten && bm_chunk_sum_zero(t, g / BM_CHUNK_GRANULES)
                            ? chunk_end
                            : changed_in_chunk(t, g, chunk_end, (uint32_t)since, out, &n, max);
        if (next < chunk_end) { /* OUT is full: resume there */
            *cursor = next;
            bm_forget_behind(t, &walk, g / BM_CHUNK_GRANULES, 1);
            return (int64_t)n;
        }
        g = chunk_end;
    }
    *cursor = UINT64_MAX;
    bm_forget_behind(t, &walk, (ngran + BM_CHUNK_GRANULES - 1) / BM_CHUNK_GRANULES, 1);
    return (int64_t)n;
}

/* ---------------------------------------------------------------------- */
/* The public calls: each runs under a SIGBUS guard (guard.c); those that
 * change eras also take part in the era seal (eras.c). */

int bm_mark(bm_tracker *t, uint64_t offset, uint64_t length)
{
    BM_GUARD_BEGIN(t, g, -1);
    int slot = length ? bm_begin_mutation(t) : -1;
    int rc = do_mark(t, offset, length);
    bm_end_mutation(t, slot);
    BM_GUARD_END(g);
    return rc;
}

int bm_clear_range(bm_tracker *t, uint64_t offset, uint64_t length)
{
    BM_GUARDED(int, t, do_clear_range(t, offset, length));
}

int bm_mark_all(bm_tracker *t)
{
    BM_GUARD_BEGIN(t, g, -1);
    int slot = bm_begin_mutation(t);
    int rc = do_mark_all(t);
    bm_end_mutation(t, slot);
    BM_GUARD_END(g);
    return rc;
}

int64_t bm_fetch_and_clear(bm_tracker *t, uint64_t *cursor, bm_extent *out, uint64_t max)
{
    BM_GUARDED(int64_t, t, do_fetch_and_clear(t, cursor, out, max));
}

int64_t bm_snapshot(bm_tracker *t, uint64_t *cursor, bm_extent *out, uint64_t max)
{
    BM_GUARDED(int64_t, t, do_snapshot(t, cursor, out, max));
}

int64_t bm_dirty_bytes(bm_tracker *t)
{
    BM_GUARDED(int64_t, t, do_dirty_bytes(t));
}

int bm_resize(bm_tracker *t, uint64_t new_size)
{
    BM_GUARD_BEGIN(t, g, -1);
    int slot = bm_begin_mutation(t);
    int rc = do_resize(t, new_size);
    bm_end_mutation(t, slot);
    BM_GUARD_END(g);
    return rc;
}

int bm_new_change_id(bm_tracker *t, uint64_t *generation)
{
    BM_GUARD_BEGIN(t, g, -1);
    int rc = bm_check_eras(t);
    if (rc == 0)
        rc = do_new_change_id(t, generation);
    BM_GUARD_END(g);
    return rc;
}

int64_t bm_changed_since(bm_tracker *t, uint64_t since, uint64_t *cursor, bm_extent *out,
                         uint64_t max)
{
    BM_GUARD_BEGIN(t, g, -1);
    /* The full check (every chunk's checksum, if sealed) once per scan;
     * resumed calls look at the flag only. */
    int check = *cursor == 0 ||
                (__atomic_load_n(&t->hdr->flags, __ATOMIC_SEQ_CST) & BM_FLAG_ERAS_DAMAGED);
    int64_t n = check && bm_check_eras(t) < 0 ? -1 : do_changed_since(t, since, cursor, out, max);
    BM_GUARD_END(g);
    return n;
}
