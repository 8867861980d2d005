/* eras.c - checksums of the eras, so change ids are trusted only while the
 * eras are as the writers left them.
 *
 * Eras change with every write, so a checksum can only hold while nobody
 * writes. The last writer out (a clean close with no other writer slot
 * claimed) seals; the next writer in - or any handle about to change eras -
 * checks them before it unseals. A crash, a stray write or a deliberate edit
 * that changes eras while the image is not tracked is then caught
 * (BM_FLAG_ERAS_DAMAGED), and change ids from before it are refused
 * (EBADMSG) instead of yielding an incremental that misses blocks. While
 * writers run the eras are unsealed and trusted as the writer that unsealed
 * them found them (a writer that dies leaves the sidecar unclean anyway, I4).
 *
 * Each chunk's slot holds either a checksum of its eras (SUM: the epoch of
 * the sealing that stored it << 32 | 32 bits of bm_era_sum; 0 for a chunk
 * never written) or a TOUCH mark: a writer raised eras there since
 * (BM_SLOT_TOUCH | the seal word's epoch then << 32). Writers mark after
 * they raise (bm_touch_chunk), so a sealing only computes the chunks marked
 * and the rest of a huge image costs one slot load per chunk: the sealing's
 * cost follows what was written, not the apparent size.
 *
 * Invariant: outside a writer's raise-then-mark window, a SUM slot matches
 * its chunk's eras. Sealers store a SUM only by compare-and-swap from the
 * TOUCH mark they read before reading the eras, and:
 * - a raise after the sealer read the eras is by a writer that unsealed
 *   after the sealer published SEALING(E) (it claimed a slot, which the
 *   sealer's checks would see otherwise), so its mark carries epoch >= E,
 *   differs from every mark older than E, and either fails the sealer's
 *   swap or lands over the SUM after it;
 * - a sealer that finds a mark of epoch >= E knows a writer came in during
 *   its sealing, and gives up (its final exchange would fail anyway).
 * A sealer's epoch is one past the seal word's, and the word only ever
 * moves to a later epoch, so an old mark never comes back (no ABA). Sealers
 * may race (two writers closing at once, or one still computing when a
 * writer came, wrote and left and sealed again): whichever swap lands is
 * right, since both read eras no writer changed since. */
#include "bm_internal.h"

#define SEAL_STATE(w) ((w) & 3u)
#define SEAL_EPOCH(w) ((w) >> 2)
#define SEAL_WORD(epoch, state) (((epoch) << 2) | (state))
#define EPOCH_MASK 0x3fffffffu

/* 0 for all-zero eras (a freshly allocated chunk is valid as it is); any
 * single changed era changes it; a position factor catches values moved
 * between granules. Four lanes so the multiplies overlap. */
uint64_t bm_era_sum(const bm_tracker *t, uint64_t c)
{
    const uint64_t *w = (const uint64_t *)(t->data + c * BM_CHUNK_BYTES + BM_CHUNK_ERAS_OFFSET);
    const uint64_t k = 0x9e3779b97f4a7c15ull;
    uint64_t h[4] = {0, 0, 0, 0};
    for (uint64_t i = 0; i < BM_CHUNK_GRANULES / 2; i += 4)
        for (unsigned j = 0; j < 4; j++) {
            uint64_t x = __atomic_load_n(&w[i + j], __ATOMIC_RELAXED) * k;
            h[j] += (x ^ (x >> 29)) * (2 * (i + j) + 1);
        }
    return h[0] ^ (h[1] * 3) ^ (h[2] * 5) ^ (h[3] * 7);
}

static uint32_t sum32(const bm_tracker *t, uint64_t c)
{
    uint64_t h = bm_era_sum(t, c);
    return (uint32_t)(h ^ (h >> 32));
}

static inline int is_touch(uint64_t slot) { return (slot & BM_SLOT_TOUCH) != 0; }

static inline uint32_t touch_epoch(uint64_t slot)
{
    return (uint32_t)(slot >> 32) & EPOCH_MASK;
}

/* Epoch A is B or later, modulo the wrap: within half the epoch space. */
static inline int epoch_at_least(uint32_t a, uint32_t b)
{
    return ((a - b) & EPOCH_MASK) < (EPOCH_MASK + 1u) / 2u;
}

void bm_touch_chunk(bm_tracker *t, uint64_t c)
{
    uint32_t epoch = SEAL_EPOCH(__atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST));
    uint64_t mark = BM_SLOT_TOUCH | ((uint64_t)epoch << 32);
    uint64_t *slot = bm_era_sum_slot(t, c);
    uint64_t cur = __atomic_load_n(slot, __ATOMIC_SEQ_CST);
    /* A later mark (a newer epoch's writer) stays: it says as much. */
    while (!(is_touch(cur) && epoch_at_least(touch_epoch(cur), epoch)) &&
           !__atomic_compare_exchange_n(slot, &cur, mark, 1, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

int bm_eras_sealed(const bm_tracker *t)
{
    return SEAL_STATE(__atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST)) == BM_SEAL_SEALED;
}

int bm_chunk_sum_zero(const bm_tracker *t, uint64_t c)
{
    uint64_t slot = __atomic_load_n(bm_era_sum_slot(t, c), __ATOMIC_RELAXED);
    return !is_touch(slot) && (uint32_t)slot == 0;
}

static uint64_t chunks_of(const bm_tracker *t)
{
    return (bm_granules(t, bm_image_size(t)) + BM_CHUNK_GRANULES - 1) / BM_CHUNK_GRANULES;
}

void bm_zero_eras(bm_tracker *t)
{
    uint64_t n = chunks_of(t);
    for (uint64_t c = 0; c < n; c++) {
        uint32_t *eras = bm_era(t, c * BM_CHUNK_GRANULES);
        for (unsigned i = 0; i < BM_CHUNK_GRANULES; i++)
            __atomic_store_n(&eras[i], 0, __ATOMIC_RELAXED);
        /* Their checksum is 0 now. A mark stays (its writer may have raised
         * an era after we zeroed it), and a writer raising one from here on
         * marks after us or fails our swap. */
        uint64_t *slot = bm_era_sum_slot(t, c);
        uint64_t old = __atomic_load_n(slot, __ATOMIC_SEQ_CST);
        if (!is_touch(old) && old != 0)
            __atomic_compare_exchange_n(slot, &old, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
}

/* Do all chunks carry the checksum of their eras as they are now?
 *
 * A chunk whose checksum is 0 (all-zero eras when sealed) is not read
 * again: nothing done to its eras since can hide a change from a change id.
 * Raising an era from 0 only adds granules to what changed_since reports (a
 * false positive), and an era cannot go below 0. Only eras sealed non-zero
 * can be lowered into hiding a write, and those chunks are read. So a huge
 * sparse image's check reads the chunks its writes touched, not all its
 * eras (1 GiB at 15 TiB). A TOUCH mark under a seal means eras changed
 * without the seal being opened: no match. */
static int eras_match(const bm_tracker *t)
{
    uint64_t n = chunks_of(t);
    struct bm_forget_walk walk = {0};
    int same = 1;
    for (uint64_t c = 0; c < n && same; c++) {
        uint64_t slot = __atomic_load_n(bm_era_sum_slot(t, c), __ATOMIC_RELAXED);
        if (is_touch(slot))
            same = 0;
        else if ((uint32_t)slot != 0)
            same = sum32(t, c) == (uint32_t)slot;
        bm_forget_behind(t, &walk, c + 1, 0);
    }
    bm_forget_behind(t, &walk, n, 1);
    return same;
}

/* Store the checksum of every chunk marked since the last sealing. 0 if a
 * writer came in meanwhile (a mark of this sealing's EPOCH or later). */
static int sum_touched(bm_tracker *t, uint32_t epoch)
{
    uint64_t n = chunks_of(t);
    struct bm_forget_walk walk = {0};
    int ok = 1;
    for (uint64_t c = 0; c < n && ok; c++) {
        uint64_t *slot = bm_era_sum_slot(t, c);
        uint64_t old = __atomic_load_n(slot, __ATOMIC_SEQ_CST);
        while (is_touch(old)) {
            if (epoch_at_least(touch_epoch(old), epoch)) {
                ok = 0;
                break;
            }
            /* Eras read after this see every raise made before our
             * SEALING was published (C11's rule for seq_cst fences). */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint64_t want = ((uint64_t)epoch << 32) | sum32(t, c);
            if (__atomic_compare_exchange_n(slot, &old, want, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                break;
            /* Another sealer's sum landed (right too), or a newer mark. */
        }
        bm_forget_behind(t, &walk, c + 1, 0);
    }
    bm_forget_behind(t, &walk, n, 1);
    return ok;
}

void bm_seal_eras(bm_tracker *t)
{
    uint32_t *seal = &t->hdr->era_seal;
    uint32_t w = __atomic_load_n(seal, __ATOMIC_SEQ_CST);
    /* Sealed already, or a handle is checking (it holds a writer slot, so
     * there is nothing to seal for us). */
    if (SEAL_STATE(w) == BM_SEAL_SEALED || SEAL_STATE(w) == BM_SEAL_CHECKING)
        return;
    if (__atomic_load_n(&t->hdr->flags, __ATOMIC_SEQ_CST) & BM_FLAG_ERAS_DAMAGED)
        return; /* sealing would bless the damage; a reset starts afresh */
    /* One past the seal word's own epoch, so every mark made before we
     * publish is older than ours and every mark made after is not (a
     * garbage seal word included). Epochs wrap after 2^30 sealings. */
    uint32_t epoch = (SEAL_EPOCH(w) + 1) & EPOCH_MASK;
    __atomic_store_n(&t->hdr->seal_epoch, epoch, __ATOMIC_RELAXED); /* for dumps */
    uint32_t mine = SEAL_WORD(epoch, BM_SEAL_SEALING);
    /* From open, or from another sealer (which then fails its exchange). */
    if (!__atomic_compare_exchange_n(seal, &w, mine, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return;
    if (bm_slots_claimed(t) != 0 || !sum_touched(t, epoch))
        goto abandon;
    /* Dekker with bm_unseal_eras: a writer claims its slot, then reads the
     * seal; we publish SEALING, compute, then read the slots once more. If
     * it arrived meanwhile, either we see its slot here, or it saw our
     * SEALING and opened the seal, so the exchange below fails. */
    if (bm_slots_claimed(t) != 0)
        goto abandon;
    __atomic_compare_exchange_n(seal, &mine, SEAL_WORD(epoch, BM_SEAL_SEALED), 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return;
abandon:
    __atomic_compare_exchange_n(seal, &mine, SEAL_WORD(epoch, BM_SEAL_OPEN), 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static uint64_t check_budget_ns(const bm_tracker *t)
{
    uint64_t budget = 1000000000ull + chunks_of(t) * BM_CHUNK_GRANULES * 4u;
    return budget < BM_MAX_LEASE_NS ? budget : BM_MAX_LEASE_NS;
}

void bm_unseal_eras(bm_tracker *t)
{
    uint32_t *seal = &t->hdr->era_seal;
    uint64_t waited_since = 0;
    for (;;) {
        uint32_t w = __atomic_load_n(seal, __ATOMIC_SEQ_CST);
        uint32_t open = SEAL_WORD(SEAL_EPOCH(w), BM_SEAL_OPEN);
        switch (SEAL_STATE(w)) {
        case BM_SEAL_OPEN:
            return;
        case BM_SEAL_SEALING:
            /* A sealer at work (or dead mid-way) fails its final exchange. */
            if (__atomic_compare_exchange_n(seal, &w, open, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return;
            continue;
        case BM_SEAL_SEALED:
            /* One handle checks; the others wait for it (below), for their
             * writes would look like damage to a check still running. */
            if (!__atomic_compare_exchange_n(seal, &w,
                                             SEAL_WORD(SEAL_EPOCH(w), BM_SEAL_CHECKING), 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                continue;
            if (!eras_match(t))
                __atomic_fetch_or(&t->hdr->flags, BM_FLAG_ERAS_DAMAGED, __ATOMIC_SEQ_CST);
            __atomic_store_n(seal, open, __ATOMIC_SEQ_CST);
            return;
        default: /* BM_SEAL_CHECKING by another handle */
            if (waited_since == 0)
                waited_since = bm_now_ns();
            /* A checker that died holds a writer slot: the sweep marks the
             * sidecar unclean, so opening without its verdict is safe. Wait
             * about as long as a slow check takes (1 s plus 1 ns per byte of
             * eras), never past BM_MAX_LEASE_NS: a damaged seal word must
             * not hold every writer's open for long. */
            if (bm_now_ns() - waited_since > check_budget_ns(t)) {
                __atomic_compare_exchange_n(seal, &w, open, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST);
                continue;
            }
            bm_sleep_ns(1000000);
        }
    }
}

int bm_check_eras(bm_tracker *t)
{
    /* A sealed state this handle already checked is not checked again (a
     * reader that opens, then scans, would read every era twice); damage
     * done since then is for the next handle to find. */
    uint32_t w = __atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST);
    if (SEAL_STATE(w) == BM_SEAL_SEALED && __atomic_load_n(&t->verified_seal, __ATOMIC_RELAXED) != w) {
        int ok = eras_match(t);
        /* Re-read: a writer may have unsealed and written since we looked. */
        int still = __atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST) == w;
        if (still && !ok)
            __atomic_fetch_or(&t->hdr->flags, BM_FLAG_ERAS_DAMAGED, __ATOMIC_SEQ_CST);
        else if (still)
            __atomic_store_n(&t->verified_seal, w, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&t->hdr->flags, __ATOMIC_SEQ_CST) & BM_FLAG_ERAS_DAMAGED)
        return bm_fail(EBADMSG, "the sidecar's change-id eras do not match their checksums "
                                "(changed while the image was not tracked): no change id "
                                "can be trusted; take a full copy or a hash resync");
    return 0;
}
