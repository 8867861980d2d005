/* pace.c - time helpers shared by the writers' throttle (writer.c) and the
 * copier's rate cap (copy.c): a nanosleep that finishes its time, and GCRA
 * (the generic cell rate algorithm), which paces any number of threads or
 * processes with one shared 64-bit word and no lock. */
#include "bm_internal.h"

#include <time.h>

void bm_sleep_ns(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

uint64_t bm_gcra_claim(uint64_t *next_ns, uint64_t bytes_per_s, uint64_t len,
                       uint64_t max_ahead_ns)
{
    if (bytes_per_s == 0)
        return 0;
    uint64_t cost = (uint64_t)((double)len * 1e9 / (double)bytes_per_s);
    uint64_t now = bm_now_ns();
    uint64_t next = __atomic_load_n(next_ns, __ATOMIC_ACQUIRE);
    uint64_t start;
    do {
        start = next > now ? next : now;
        if (start - now > max_ahead_ns)
            start = now;
    } while (!__atomic_compare_exchange_n(next_ns, &next, start + cost, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return start - now;
}
