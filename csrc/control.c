/* control.c - the copier's side of the control block: freeze with a lease,
 * thaw, redirect, throttle (invariant I3). Writers' side is in writer.c. */
#include "bm_internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BM_MAX_LEASE_NS (60ull * 1000000000ull)

static int frozen_by_me(bm_tracker *t)
{
    return __atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE) == (uint32_t)getpid();
}

static void wake_writers(bm_tracker *t)
{
    syscall(SYS_futex, &t->ctl->state, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Sum in-flight writes of live writer processes. A dead writer's count is
 * ignored: its write died with it, and I1's first mark already recorded it. */
static uint32_t inflight_writes(bm_tracker *t)
{
    uint32_t sum = 0;
    for (int i = 0; i < BM_MAX_WRITERS; i++) {
        struct bm_writer_slot *s = &t->ctl->slots[i];
        uint32_t n = __atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST);
        if (n == 0)
            continue;
        uint32_t pid = __atomic_load_n(&s->pid, __ATOMIC_ACQUIRE);
        if (pid && bm_process_alive(pid, __atomic_load_n(&s->start_time, __ATOMIC_ACQUIRE)))
            sum += n;
    }
    return sum;
}

int bm_freeze(bm_tracker *t, uint64_t lease_ns)
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
    uint64_t nap = 20000;
    while (inflight_writes(t) != 0) {
        if (bm_now_ns() >= deadline) {
            bm_thaw(t);
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

int bm_freeze_check(bm_tracker *t)
{
    uint32_t st = __atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST);
    if (st != BM_STATE_FROZEN || !frozen_by_me(t))
        return bm_fail(EINVAL, "not frozen by this process");
    if (bm_now_ns() >= __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE))
        return bm_fail(ETIMEDOUT, "the freeze lease expired; writers may have resumed");
    return 0;
}

int bm_thaw(bm_tracker *t)
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

int bm_redirect(bm_tracker *t, const char *target)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_FROZEN || !frozen_by_me(t))
        return bm_fail(EINVAL, "redirect needs a freeze held by this process");
    size_t n = strlen(target);
    if (n == 0 || n >= BM_REDIRECT_MAX || target[0] != '/')
        return bm_fail(EINVAL, "redirect target must be an absolute path shorter than %d",
                       BM_REDIRECT_MAX);
    memcpy(t->ctl->redirect_target, target, n + 1);
    __atomic_store_n(&t->ctl->state, BM_STATE_REDIRECTED, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->copier_pid, 0, __ATOMIC_SEQ_CST);
    wake_writers(t);
    return 0;
}

int bm_get_state(bm_tracker *t)
{
    return (int)__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST);
}

int bm_get_redirect(bm_tracker *t, char *buf, uint64_t len)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_REDIRECTED)
        return bm_fail(ENOENT, "the image was not redirected");
    size_t n = strnlen(t->ctl->redirect_target, BM_REDIRECT_MAX);
    if (n + 1 > len)
        return bm_fail(ERANGE, "buffer too small for the redirect target");
    memcpy(buf, t->ctl->redirect_target, n);
    buf[n] = '\0';
    return 0;
}

int bm_set_throttle(bm_tracker *t, uint64_t bytes_per_s)
{
    uint32_t me = bytes_per_s ? (uint32_t)getpid() : 0;
    __atomic_store_n(&t->ctl->throttle_owner_start, me ? bm_proc_start_time((pid_t)me) : 0,
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_owner_pid, me, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_bytes_per_s, bytes_per_s, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->throttle_next_ns, 0, __ATOMIC_SEQ_CST);
    return 0;
}
