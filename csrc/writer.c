/* writer.c - the tracked write path. One call does everything a write needs,
 * so Python pays a single cffi crossing per write:
 *
 *   throttle -> enter (wait out a freeze, bounded by its lease; count in
 *   flight) -> mark -> write -> mark again (I1) -> leave,
 *
 * or, while a copier mirrors and the range is clean, enter -> write to the
 * source and the copy -> leave (mirror.c, I7).
 *
 * Entering is a Dekker handshake with bm_freeze: the writer publishes its
 * in-flight count and then reads the state; the copier publishes the state
 * and then reads the counts. With sequentially consistent atomics at least
 * one of them sees the other, so no write slips into a frozen image. */
#include "bm_internal.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>


/* A throttle backlog longer than this is taken for a stale clock (see
 * throttle()); real backlogs are a few writes' worth at the set rate. */
#define BM_THROTTLE_MAX_AHEAD_NS (60ull * 1000000000ull)

/* Does a freeze still bind this writer? Not once its lease has passed, not
 * once the copier that holds it is gone, never past the longest lease a
 * copier may set (BM_MAX_LEASE_NS), whatever the control block says: it is
 * not checksummed, and anyone who can write the sidecar (its owner) could
 * otherwise hold every writer of the image, root's included. A deadline
 * further ahead than any lease is forged or from another boot's clock. */
/* One write's wait for a freeze to end. */
struct freeze_wait {
    uint64_t start;         /* when it began, CLOCK_MONOTONIC; 0: not yet */
    uint32_t checked_pid;   /* the copier whose /proc maps were read; 0: none */
    int maps_sidecar;       /* what bm_process_maps said of it */
};

/* Once a wait outlasts BM_SUSPICIOUS_WAIT_NS (a real final pass may well
 * take longer), the copier named in the control block is asked whether it
 * maps the sidecar at all: a live process that holds no tracker is forged
 * into the control block, and its freeze binds nobody. */
static int freeze_binds(bm_tracker *t, uint64_t now, struct freeze_wait *w)
{
    uint64_t deadline = __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE);
    if (now >= deadline || deadline - now > BM_MAX_LEASE_NS)
        return 0;
    if (now - w->start >= BM_MAX_LEASE_NS)
        return 0;
    uint32_t pid = __atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE);
    uint64_t start = __atomic_load_n(&t->ctl->copier_start_time, __ATOMIC_ACQUIRE);
    if (!bm_process_alive(pid, start))
        return 0;
    if (now - w->start > BM_SUSPICIOUS_WAIT_NS && pid != (uint32_t)getpid()) {
        if (w->checked_pid != pid) {
            w->checked_pid = pid;
            w->maps_sidecar = bm_process_maps(pid, t->sidecar_dev, t->sidecar_ino);
        }
        if (w->maps_sidecar == 0)
            return 0;
    }
    return 1;
}

static void throttle(bm_tracker *t, uint64_t len)
{
    uint64_t rate = __atomic_load_n(&t->ctl->throttle_bytes_per_s, __ATOMIC_ACQUIRE);
    if (rate == 0)
        return;
    /* The throttle binds only while whoever set it lives; look at most every
     * 100 ms (a /proc read), and lift it for everyone once the owner is gone. */
    uint64_t checked = __atomic_load_n(&t->throttle_checked_ns, __ATOMIC_RELAXED);
    uint64_t clock = bm_now_ns();
    if (clock - checked > 100000000u) {
        uint32_t owner = __atomic_load_n(&t->ctl->throttle_owner_pid, __ATOMIC_ACQUIRE);
        uint64_t start = __atomic_load_n(&t->ctl->throttle_owner_start, __ATOMIC_ACQUIRE);
        if (!bm_process_alive(owner, start) ||
            (owner != __atomic_load_n(&t->throttle_owner_seen, __ATOMIC_RELAXED) &&
             owner != (uint32_t)getpid() &&
             bm_process_maps(owner, t->sidecar_dev, t->sidecar_ino) == 0)) {
            /* Gone, or never a tracker's holder (a forged owner). */
            __atomic_compare_exchange_n(&t->ctl->throttle_bytes_per_s, &rate, 0, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            return;
        }
        __atomic_store_n(&t->throttle_owner_seen, owner, __ATOMIC_RELAXED);
        __atomic_store_n(&t->throttle_checked_ns, clock, __ATOMIC_RELAXED);
    }
    /* GCRA over the clock in the control block, shared by all writers. It
     * is CLOCK_MONOTONIC, which restarts at boot while the sidecar persists
     * (and the control block is not checksummed): a clock far ahead of any
     * real backlog is stale, not a queue, and following it put writers to
     * sleep for days; bm_gcra_claim restarts it. */
    uint64_t wait = bm_gcra_claim(&t->ctl->throttle_next_ns, rate, len, BM_THROTTLE_MAX_AHEAD_NS);
    if (wait)
        bm_sleep_ns(wait);
}

/* Count this write in flight, once no freeze binds it. The guard (which
 * must be the caller's, innermost) learns it, so a SIGBUS later in the write
 * still leaves. */
static int writer_enter(bm_tracker *t)
{
    if (t->slot < 0)
        return bm_fail(EBADF, "tracker was not opened for writing");
    uint32_t *inflight = &t->ctl->slots[t->slot].inflight;
    uint32_t *state = &t->ctl->state;
    struct freeze_wait wait = {0, 0, -1};
    for (;;) {
        uint32_t st = __atomic_load_n(state, __ATOMIC_SEQ_CST);
        if (st == BM_STATE_REDIRECTED)
            return bm_fail(ESTALE, "the image was moved; reopen the redirect target");
        if (st == BM_STATE_RUNNING) {
            __atomic_fetch_add(inflight, 1, __ATOMIC_SEQ_CST);
            st = __atomic_load_n(state, __ATOMIC_SEQ_CST);
            if (st == BM_STATE_RUNNING) {
                bm_guard_top->in_flight = 1;
                return 0;
            }
            __atomic_fetch_sub(inflight, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        /* Frozen or freezing: wait, but only while the lease binds. */
        uint64_t now = bm_now_ns();
        if (wait.start == 0)
            wait.start = now;
        if (!freeze_binds(t, now, &wait)) {
            /* The freeze is void (lease over or copier gone): put the state
             * back to running so later writes take the fast path instead of
             * re-checking the copier. A live copier notices in
             * bm_freeze_check and does not switch over. */
            __atomic_compare_exchange_n(state, &st, BM_STATE_RUNNING, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST);
            __atomic_fetch_add(inflight, 1, __ATOMIC_SEQ_CST);
            /* Dekker again, as on the fast path: a new freeze may have begun
             * since we judged the old one void, and its drain may already
             * have read our count as zero. bm_freeze publishes its pid and
             * deadline before its state, so with our count now visible, a
             * fresh look at the state either finds no binding freeze or
             * finds the new one - then back out and wait for it. Without
             * this a write could land inside a freeze that bm_freeze_check
             * still reports as holding. */
            uint32_t st2 = __atomic_load_n(state, __ATOMIC_SEQ_CST);
            if (st2 == BM_STATE_RUNNING ||
                (st2 != BM_STATE_REDIRECTED && !freeze_binds(t, bm_now_ns(), &wait))) {
                bm_guard_top->in_flight = 1;
                return 0;
            }
            __atomic_fetch_sub(inflight, 1, __ATOMIC_SEQ_CST);
            continue;
        }
        uint64_t deadline = __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE);
        uint64_t nap = deadline > now ? deadline - now : 0;
        if (nap > 5000000u)
            nap = 5000000u; /* re-check the copier's liveness every 5 ms */
        struct timespec ts = {0, (long)nap};
        syscall(SYS_futex, state, FUTEX_WAIT, st, &ts, NULL, 0);
    }
}

/* Raise the control block's last_write_ns to now (a max: writers race). It
 * is read after the freeze drained, so it is stored before in-flight drops. */
static void note_write_time(bm_tracker *t)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    uint64_t seen = __atomic_load_n(&t->ctl->last_write_ns, __ATOMIC_RELAXED);
    while (seen < now && !__atomic_compare_exchange_n(&t->ctl->last_write_ns, &seen, now, 1,
                                                      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
        ;
}

/* Writers' bytes, all of them together: a copier reads the write rate off
 * this (mirrored writes leave no dirty bit to count them by). */
static inline void count_written(bm_tracker *t, uint64_t len)
{
    __atomic_fetch_add(&t->ctl->bytes_written, len, __ATOMIC_RELAXED);
}

static void writer_leave(bm_tracker *t)
{
    note_write_time(t);
    __atomic_fetch_sub(&t->ctl->slots[t->slot].inflight, 1, __ATOMIC_SEQ_CST);
    bm_guard_top->in_flight = 0;
}

/* Grow the tracked size to at least END (never shrinks: concurrent writers
 * past the end race here harmlessly). */
static int grow_to(bm_tracker *t, uint64_t end)
{
    uint64_t cur = bm_image_size(t);
    if (end <= cur)
        return 0;
    if (bm_ensure_capacity(t, end) < 0)
        return -1;
    while (cur < end) {
        if (__atomic_compare_exchange_n(&t->hdr->image_size, &cur, end, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            bm_mark_granules(t, cur >> t->shift, bm_granules(t, end));
            break;
        }
    }
    return 0;
}

static inline void mark_range(bm_tracker *t, uint64_t offset, uint64_t len)
{
    bm_mark_granules(t, offset >> t->shift, ((offset + len - 1) >> t->shift) + 1);
}

static int64_t do_pwrite(bm_tracker *t, int fd, const char *buf, uint64_t len, uint64_t offset)
{
    if (len == 0)
        return 0;
    uint64_t limit = bm_max_image_for(t->shift);
    if (offset > limit || len > limit - offset)
        return bm_fail_too_big(t->shift, offset > limit ? offset : offset + len);
    throttle(t, len);
    if (writer_enter(t) < 0)
        return -1;
    if (grow_to(t, offset + len) < 0) {
        writer_leave(t);
        return -1;
    }
    /* While a copier mirrors (mirror.c), a write to a clean range goes to
     * both sides and is done; anything else takes the marked path below. */
    int mirrored = bm_mirrored_write(t, fd, buf, len, offset);
    if (mirrored != 0) {
        if (mirrored > 0)
            count_written(t, len);
        writer_leave(t);
        return mirrored > 0 ? (int64_t)len : -1;
    }
    mark_range(t, offset, len);
    const char *p = buf;
    uint64_t done = 0;
    int err = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, p + done, len - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0) {
            err = EIO;
            break;
        }
        done += (uint64_t)n;
    }
    /* Mark again even on failure: part of the range may have landed. */
    mark_range(t, offset, len);
    count_written(t, done);
    writer_leave(t);
    if (err)
        return bm_fail(err, "write of %llu bytes at %llu failed: %s", (unsigned long long)len,
                       (unsigned long long)offset, strerror(err));
    return (int64_t)len;
}

static int do_zero(bm_tracker *t, int fd, uint64_t offset, uint64_t len, uint32_t flags)
{
    if (flags & ~(uint32_t)(BM_ZERO_MAY_TRIM | BM_ZERO_FAST))
        return bm_fail(EINVAL, "unknown zero flags %#x", flags);
    if (len == 0)
        return 0;
    uint64_t size = bm_image_size(t);
    if (offset > size || len > size - offset)
        return bm_fail(EINVAL, "zeroing %llu+%llu is past the image end %llu",
                       (unsigned long long)offset, (unsigned long long)len,
                       (unsigned long long)size);
    if (writer_enter(t) < 0)
        return -1;
    /* Mirroring: zero the copy too where the range is clean (mirror.c). */
    int mirrored = bm_mirrored_zero(t, fd, offset, len, flags);
    if (mirrored != 0) {
        writer_leave(t);
        return mirrored > 0 ? 0 : -1;
    }
    mark_range(t, offset, len);
    int err = bm_zero_range(fd, offset, len, flags) < 0 ? errno : 0;
    /* Mark again even on failure: part of the range may have changed. */
    mark_range(t, offset, len);
    writer_leave(t);
    if (err)
        return bm_fail(err, "zeroing %llu bytes at %llu failed: %s", (unsigned long long)len,
                       (unsigned long long)offset, strerror(err));
    return 0;
}

static int do_truncate(bm_tracker *t, int fd, uint64_t size)
{
    if (size > bm_max_image_for(t->shift))
        return bm_fail_too_big(t->shift, size);
    if (writer_enter(t) < 0)
        return -1;
    /* Grow the tracker before the file and shrink it after, so the bitmap
     * always covers every byte the file has. */
    int rc = 0;
    uint64_t old = bm_image_size(t);
    if (size > old)
        rc = bm_resize(t, size);
    if (rc == 0 && ftruncate(fd, (off_t)size) < 0)
        rc = bm_fail(errno, "truncate to %llu failed: %s", (unsigned long long)size,
                     strerror(errno));
    if (rc == 0 && size < old)
        rc = bm_resize(t, size);
    writer_leave(t);
    return rc;
}

/* The public calls, each under a SIGBUS guard (guard.c): a sidecar truncated
 * under a running writer fails its writes with EUCLEAN instead of killing
 * the process. */

int64_t bm_pwrite(bm_tracker *t, int fd, const char *buf, uint64_t len, uint64_t offset)
{
    BM_GUARDED(int64_t, t, do_pwrite(t, fd, buf, len, offset));
}

int bm_discard(bm_tracker *t, int fd, uint64_t offset, uint64_t len)
{
    BM_GUARDED(int, t, do_zero(t, fd, offset, len, BM_ZERO_MAY_TRIM));
}

int bm_zero(bm_tracker *t, int fd, uint64_t offset, uint64_t len, uint32_t flags)
{
    BM_GUARDED(int, t, do_zero(t, fd, offset, len, flags));
}

int bm_truncate(bm_tracker *t, int fd, uint64_t size)
{
    BM_GUARDED(int, t, do_truncate(t, fd, size));
}
