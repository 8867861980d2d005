/* control.c - the copier's side of the control block: freeze with a lease,
 * thaw, throttle (invariant I3). Writers' side is in writer.c, the redirect
 * of a move in redirect.c. */
#include "bm_internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* More writes than this in flight in one process is no count a writer
 * keeps: garbage or forged, so ignored by the drain. */
#define BM_MAX_INFLIGHT_PER_WRITER 65536u

int bm_frozen_by_me(bm_tracker *t)
{
    return __atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE) == (uint32_t)getpid();
}

static void wake_writers(bm_tracker *t)
{
    syscall(SYS_futex, &t->ctl->state, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int do_thaw(bm_tracker *t);

/* Sum in-flight writes of live writer processes. A dead writer's count is
 * ignored: its write died with it, and I1's first mark already recorded it.
 * So is an absurd count, and, with SUSPICIOUS, the count of a live process
 * that does not map this sidecar: the control block is not checksummed, and
 * a forged slot naming some live process must not make every freeze fail. */
static uint32_t inflight_writes(bm_tracker *t, int suspicious, dev_t dev, ino_t ino)
{
    uint32_t sum = 0;
    for (int i = 0; i < BM_MAX_WRITERS; i++) {
        struct bm_writer_slot *s = &t->ctl->slots[i];
        uint32_t n = __atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST);
        if (n == 0 || n > BM_MAX_INFLIGHT_PER_WRITER)
            continue;
        uint32_t pid = __atomic_load_n(&s->pid, __ATOMIC_ACQUIRE);
        if (!pid || !bm_process_alive(pid, __atomic_load_n(&s->start_time, __ATOMIC_ACQUIRE)))
            continue;
        if (suspicious && bm_process_maps(pid, dev, ino) == 0)
            continue;
        sum += n;
    }
    return sum;
}

static int do_freeze(bm_tracker *t, uint64_t lease_ns)
{
    if (lease_ns == 0 || lease_ns > BM_MAX_LEASE_NS)
        return bm_fail(EINVAL, "freeze lease must be between 0 and 60 s");
    uint32_t me = (uint32_t)getpid();
    uint32_t st = __atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST);
    if (st != BM_STATE_RUNNING) {
        uint32_t pid = __atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE);
        uint64_t start = __atomic_load_n(&t->ctl->copier_start_time, __ATOMIC_ACQUIRE);
        uint64_t deadline = __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE);
        if (st == BM_STATE_REDIRECTED)
            return bm_fail(EBUSY, "the image was already moved away");
        if (pid != me && bm_process_alive(pid, start) && bm_now_ns() < deadline)
            return bm_fail(EBUSY, "another copier (pid %u) holds a freeze", pid);
    }
    __atomic_store_n(&t->ctl->copier_start_time, bm_proc_start_time((pid_t)me), __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->copier_pid, me, __ATOMIC_SEQ_CST);
    uint64_t deadline = bm_now_ns() + lease_ns;
    __atomic_store_n(&t->ctl->lease_deadline_ns, deadline, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&t->ctl->freeze_count, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->state, BM_STATE_FREEZING, __ATOMIC_SEQ_CST);

    /* Drain: short naps, because in-flight writes finish in microseconds
     * and every microsecond here is downtime. */
    uint64_t started = bm_now_ns();
    uint64_t nap = 20000;
    while (inflight_writes(t, bm_now_ns() - started > BM_SUSPICIOUS_WAIT_NS, t->sidecar_dev,
                           t->sidecar_ino) != 0) {
        if (bm_now_ns() >= deadline) {
            do_thaw(t);
            return bm_fail(ETIMEDOUT, "in-flight writes did not drain within the lease");
        }
        struct timespec ts = {0, (long)nap};
        nanosleep(&ts, NULL);
        if (nap < 1000000)
            nap *= 2;
    }
    __atomic_store_n(&t->ctl->state, BM_STATE_FROZEN, __ATOMIC_SEQ_CST);
    return 0;
}

static int do_freeze_check(bm_tracker *t)
{
    uint32_t st = __atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST);
    if (st != BM_STATE_FROZEN || !bm_frozen_by_me(t))
        return bm_fail(EINVAL, "not frozen by this process");
    if (bm_now_ns() >= __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE))
        return bm_fail(ETIMEDOUT, "the freeze lease expired; writers may have resumed");
    return 0;
}

static int do_thaw(bm_tracker *t)
{
    uint32_t st = __atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST);
    if (st == BM_STATE_FREEZING || st == BM_STATE_FROZEN) {
        __atomic_store_n(&t->ctl->state, BM_STATE_RUNNING, __ATOMIC_SEQ_CST);
        __atomic_store_n(&t->ctl->lease_deadline_ns, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&t->ctl->copier_pid, 0, __ATOMIC_SEQ_CST);
    }
    wake_writers(t);
    return 0;
}

static int do_set_throttle(bm_tracker *t, uint64_t bytes_per_s)
{
    uint32_t me = bytes_per_s ? (uint32_t)getpid() : 0;
    __atomic_store_n(&t->ctl->throttle_owner_start, me ? bm_proc_start_time((pid_t)me) : 0,
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_owner_pid, me, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_bytes_per_s, bytes_per_s, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_next_ns, 0, __ATOMIC_SEQ_CST);
    return 0;
}

/* The public calls, each under a SIGBUS guard (guard.c). */

int bm_freeze(bm_tracker *t, uint64_t lease_ns)
{
    BM_GUARDED(int, t, do_freeze(t, lease_ns));
}

int bm_freeze_check(bm_tracker *t)
{
    BM_GUARDED(int, t, do_freeze_check(t));
}

int bm_thaw(bm_tracker *t)
{
    BM_GUARDED(int, t, do_thaw(t));
}

int bm_get_state(bm_tracker *t)
{
    BM_GUARDED(int, t, (int)__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST));
}

int bm_set_throttle(bm_tracker *t, uint64_t bytes_per_s)
{
    BM_GUARDED(int, t, do_set_throttle(t, bytes_per_s));
}

void bm_wake_writers(bm_tracker *t) { wake_writers(t); }
