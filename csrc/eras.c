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
 * the sidecar unclean anyway, I4). */
#include "bm_internal.h"

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

static uint64_t chunks_of(const bm_tracker *t)
{
    return (bm_granules(t, bm_image_size(t)) + BM_CHUNK_GRANULES - 1) / BM_CHUNK_GRANULES;
}

/* Do all chunks match their checksums? */
static int eras_match(const bm_tracker *t)
{
    uint64_t n = chunks_of(t);
    for (uint64_t c = 0; c < n; c++)
        if (bm_era_sum(t, c) != __atomic_load_n(bm_era_sum_slot(t, c), __ATOMIC_RELAXED))
            return 0;
    return 1;
}

void bm_seal_eras(bm_tracker *t)
{
    uint32_t *seal = &t->hdr->era_seal;
    if (__atomic_load_n(seal, __ATOMIC_SEQ_CST) == BM_SEAL_SEALED)
        return;
    if (__atomic_load_n(&t->hdr->flags, __ATOMIC_SEQ_CST) & BM_FLAG_ERAS_DAMAGED)
        return; /* sealing would bless the damage; a reset starts afresh */
    __atomic_store_n(seal, BM_SEAL_SEALING, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&t->hdr->seal_epoch, 1, __ATOMIC_SEQ_CST);
    if (bm_slots_claimed(t) != 0)
        goto abandon;
    uint64_t n = chunks_of(t);
    for (uint64_t c = 0; c < n; c++)
        __atomic_store_n(bm_era_sum_slot(t, c), bm_era_sum(t, c), __ATOMIC_RELAXED);
    /* Dekker with bm_unseal_eras: a writer claims its slot, then reads the
     * seal; we publish SEALING, compute, then read the slots once more. If
     * it arrived meanwhile, either we see its slot here, or it saw SEALING
     * and turned it back to OPEN, so the exchange below fails. */
    if (bm_slots_claimed(t) != 0)
        goto abandon;
    uint32_t sealing = BM_SEAL_SEALING;
    __atomic_compare_exchange_n(seal, &sealing, BM_SEAL_SEALED, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return;
abandon:;
    uint32_t expected = BM_SEAL_SEALING;
    __atomic_compare_exchange_n(seal, &expected, BM_SEAL_OPEN, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
}

void bm_unseal_eras(bm_tracker *t)
{
    uint32_t *seal = &t->hdr->era_seal;
    uint32_t st = __atomic_load_n(seal, __ATOMIC_SEQ_CST);
    if (st == BM_SEAL_OPEN)
        return;
    if (st == BM_SEAL_SEALED && !eras_match(t))
        __atomic_fetch_or(&t->hdr->flags, BM_FLAG_ERAS_DAMAGED, __ATOMIC_SEQ_CST);
    /* Whatever it was (sealed, or a sealer in progress or dead mid-way):
     * a sealer still at work then fails its final exchange. */
    __atomic_store_n(seal, BM_SEAL_OPEN, __ATOMIC_SEQ_CST);
}

int bm_check_eras(bm_tracker *t)
{
    /* A sealed state this handle already checked is not checked again (a
     * reader that opens, then scans, would read every era twice); damage
     * done since then is for the next handle to find. */
    uint32_t epoch = __atomic_load_n(&t->hdr->seal_epoch, __ATOMIC_SEQ_CST) + 1;
    if (__atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST) == BM_SEAL_SEALED &&
        __atomic_load_n(&t->verified_epoch, __ATOMIC_RELAXED) != epoch) {
        int ok = eras_match(t);
        /* Re-read: a writer may have unsealed and written since we looked. */
        int still = __atomic_load_n(&t->hdr->era_seal, __ATOMIC_SEQ_CST) == BM_SEAL_SEALED &&
                    __atomic_load_n(&t->hdr->seal_epoch, __ATOMIC_SEQ_CST) + 1 == epoch;
        if (still && !ok)
            __atomic_fetch_or(&t->hdr->flags, BM_FLAG_ERAS_DAMAGED, __ATOMIC_SEQ_CST);
        else if (still)
            __atomic_store_n(&t->verified_epoch, epoch, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&t->hdr->flags, __ATOMIC_SEQ_CST) & BM_FLAG_ERAS_DAMAGED)
        return bm_fail(EBADMSG, "the sidecar's change-id eras do not match their checksums "
                                "(changed while the image was not tracked): no change id "
                                "can be trusted; take a full copy or a hash resync");
    return 0;
}
