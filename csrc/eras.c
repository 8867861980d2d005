/* eras.c - checksums of the eras, so change ids are trusted only while the
 * eras are as the writers left them.
 *
 * Eras change with every write, so a checksum can only hold while nobody
 * writes. The last writer out (a clean close with no other writer slot
 * claimed) computes every chunk's checksum and seals; the next writer in -
 * or any handle about to change eras - checks them before it unseals. A
 * crash, a stray write or a deliberate edit that changes eras while the
 * image is not tracked is then caught (BM_FLAG_ERAS_DAMAGED), and change ids
 * from before it are refused (EBADMSG) instead of yielding an incremental
 * that misses blocks. While writers run the eras are unsealed and trusted
 * as the writer that unsealed them found them (a writer that dies leaves
 * the sidecar unclean anyway, I4).
 *
 * Sealers may race (two writers closing at once, or one still computing
 * when a writer came, wrote and left and sealed again), so every sealing
 * has its own epoch: the seal word holds (epoch << 2 | BM_SEAL_*), each
 * chunk's slot holds (epoch << 32 | 32-bit checksum), a sealer only ever
 * raises a slot's epoch, and the seal is valid for epoch E only if every
 * slot carries E. A stale sealer thus can neither overwrite a newer
 * sealing's checksums nor complete its own. */
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

/* A chunk's slot as a sealing of EPOCH writes it. */
static uint64_t slot_value(const bm_tracker *t, uint64_t c, uint32_t epoch)
{
    uint64_t h = bm_era_sum(t, c);
    return ((uint64_t)epoch << 32) | (uint32_t)(h ^ (h >> 32));
}

static uint64_t chunks_of(const bm_tracker *t)
{
    return (bm_granules(t, bm_image_size(t)) + BM_CHUNK_GRANULES - 1) / BM_CHUNK_GRANULES;
}

/* Do all chunks carry the checksum of their eras as sealed in EPOCH?
 *
 * A chunk sealed with all-zero eras (checksum 0) is not read again: nothing
 * done to its eras since can hide a change from a change id. Raising an era
 * from 0 only adds granules to what changed_since reports (a false
 * positive), and an era cannot go below 0. Only eras sealed non-zero can be
 * lowered into hiding a write, and those chunks are read. So a huge sparse
 * image's check reads the chunks its writes touched, not all its eras (1 GiB
 * at 15 TiB). */
static int eras_match(const bm_tracker *t, uint32_t epoch)
{
    uint64_t n = chunks_of(t);
    struct bm_forget_walk walk = {0};
    const uint64_t sealed_zero = (uint64_t)epoch << 32;
    int same = 1;
    for (uint64_t c = 0; c < n && same; c++) {
        uint64_t slot = __atomic_load_n(bm_era_sum_slot(t, c), __ATOMIC_RELAXED);
        if (slot != sealed_zero)
            same = slot_value(t, c, epoch) == slot;
        bm_forget_behind(t, &walk, c + 1, 0);
    }
    bm_forget_behind(t, &walk, n, 1);
    return same;
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
    /* Epochs wrap after 2^30 sealings; a sealer that slept through that
     * many others is not a case worth a wider word. */
    uint32_t epoch = (__atomic_add_fetch(&t->hdr->seal_epoch, 1, __ATOMIC_SEQ_CST)) & EPOCH_MASK;
    uint32_t mine = SEAL_WORD(epoch, BM_SEAL_SEALING);
    /* From open, or from another sealer (which then fails its exchange). */
    if (!__atomic_compare_exchange_n(seal, &w, mine, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return;
    if (bm_slots_claimed(t) != 0)
        goto abandon;
    uint64_t n = chunks_of(t);
    struct bm_forget_walk walk = {0};
    for (uint64_t c = 0; c < n; c++) {
        uint64_t *slot = bm_era_sum_slot(t, c);
        uint64_t want = slot_value(t, c, epoch);
        uint64_t old = __atomic_load_n(slot, __ATOMIC_RELAXED);
        /* Raise only: a later sealing's checksum stays. */
        while ((uint32_t)(old >> 32) <= epoch && old != want &&
               !__atomic_compare_exchange_n(slot, &old, want, 1, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED))
            ;
        bm_forget_behind(t, &walk, c + 1, 0);
    }
    bm_forget_behind(t, &walk, n, 1);
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
            if (!eras_match(t, SEAL_EPOCH(w)))
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
        int ok = eras_match(t, SEAL_EPOCH(w));
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
