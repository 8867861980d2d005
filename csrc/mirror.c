/* mirror.c - active mirroring (`sync --converge mirror`, invariant I7).
 *
 * Once the copier has copied every range at least once, it turns mirroring
 * on: a tracked write to a range with no dirty granule then goes to the
 * source and to the copy in the same call and is not marked dirty, so the
 * dirty set shrinks however fast writers write. A write to a dirty range is
 * only marked: the copier will take it anyway.
 *
 * The race to close is a copier that read a block before a mirrored write
 * and lands its stale bytes on the copy after it: no dirty bit would say so.
 * The stripes (struct bm_stripe in bm_internal.h) are the interlock: a
 * mirrored write holds its stripes exclusively and a copier counts itself
 * into the stripes it reads, each publishing before it looks at the other,
 * so one of them always sees the other. The writer that sees a copier (or
 * another mirrored write on a stripe: two racing writes could land on the
 * two sides in opposite orders) falls back to the marked path; the copier
 * that sees a mirrored write waits for it to finish before it reads.
 *
 * A destination failure never fails the writer's write: its range is
 * marked dirty and mirroring is off for everyone from then on. A writer
 * that dies mid-write leaves its slot behind, which makes the sidecar
 * unclean (I4), so the copy it may have left behind is never trusted. */
#include "bm_internal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How often a writer checks that the copier that started mirroring lives. */
#define OWNER_CHECK_NS 100000000ull
/* Longest a copier waits for mirrored writes on its stripes; they take
 * microseconds to milliseconds, so this is a writer that died mid-write. */
#define CLAIM_WAIT_NS 2000000000ull
#define STOP_WAIT_NS 1000000000ull

static inline struct bm_stripe *stripe_of(bm_tracker *t, uint64_t granule)
{
    return &t->stripes[granule % BM_STRIPES];
}

/* How many distinct stripes granules [FIRST, LAST_EXCL) touch. */
static inline uint64_t stripes_in(uint64_t first, uint64_t last_excl)
{
    uint64_t n = last_excl - first;
    return n < BM_STRIPES ? n : BM_STRIPES;
}

static inline uint64_t last_granule_excl(bm_tracker *t, uint64_t offset, uint64_t len)
{
    return ((offset + len - 1) >> t->shift) + 1;
}

/* Mirroring binds only while the copier that started it lives: one that
 * died must not leave writers writing into a copy nobody will use. */
static int mirror_on(bm_tracker *t)
{
    if (__atomic_load_n(&t->ctl->mirror_state, __ATOMIC_SEQ_CST) != BM_MIRROR_ON)
        return 0;
    uint64_t now = bm_now_ns();
    if (now - __atomic_load_n(&t->mirror_checked_ns, __ATOMIC_RELAXED) > OWNER_CHECK_NS) {
        uint32_t pid = __atomic_load_n(&t->ctl->mirror_owner_pid, __ATOMIC_ACQUIRE);
        uint64_t start = __atomic_load_n(&t->ctl->mirror_owner_start, __ATOMIC_ACQUIRE);
        if (!bm_process_alive(pid, start)) {
            uint32_t on = BM_MIRROR_ON;
            __atomic_compare_exchange_n(&t->ctl->mirror_state, &on, BM_MIRROR_OFF, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            return 0;
        }
        __atomic_store_n(&t->mirror_checked_ns, now, __ATOMIC_RELAXED);
    }
    return 1;
}

/* Turn mirroring off for everyone after a destination failure ERR. */
static void mirror_failed(bm_tracker *t, int err)
{
    uint32_t on = BM_MIRROR_ON;
    if (__atomic_compare_exchange_n(&t->ctl->mirror_state, &on, BM_MIRROR_FAILED, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        __atomic_store_n(&t->ctl->mirror_errno, err, __ATOMIC_SEQ_CST);
}

/* This process's fd of the current mirror target, or -1 (mirroring is then
 * failed: this writer cannot mirror, and the copier must hear of it). The
 * fd number stays the same across epochs: a new target is dup3'ed over it,
 * so a thread still writing through the old one is never handed a closed
 * or reused descriptor. */
static int mirror_fd(bm_tracker *t)
{
    uint32_t epoch = __atomic_load_n(&t->ctl->mirror_epoch, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&t->mirror_fd_epoch, __ATOMIC_ACQUIRE) == epoch && t->mirror_fd >= 0)
        return t->mirror_fd;
    pthread_mutex_lock(&t->mirror_lock);
    int fd = -1;
    if (t->mirror_fd_epoch == epoch && t->mirror_fd >= 0) {
        fd = t->mirror_fd;
        goto out;
    }
    char target[BM_REDIRECT_MAX];
    memcpy(target, t->ctl->mirror_target, sizeof target);
    target[sizeof target - 1] = '\0';
    int nfd = bm_open_owned_target(t, target, "mirror target");
    struct stat st;
    if (nfd >= 0 && (fstat(nfd, &st) < 0 ||
                     (uint64_t)st.st_dev != __atomic_load_n(&t->ctl->mirror_dev, __ATOMIC_ACQUIRE) ||
                     (uint64_t)st.st_ino != __atomic_load_n(&t->ctl->mirror_ino, __ATOMIC_ACQUIRE))) {
        close(nfd);
        nfd = -1;
        errno = ESTALE; /* another file than the copier's now has that name */
    }
    if (nfd < 0) {
        mirror_failed(t, errno);
        goto out;
    }
    if (t->mirror_fd < 0) {
        t->mirror_fd = nfd;
    } else {
        dup3(nfd, t->mirror_fd, O_CLOEXEC);
        close(nfd);
    }
    __atomic_store_n(&t->mirror_fd_epoch, epoch, __ATOMIC_RELEASE);
    fd = t->mirror_fd;
out:
    pthread_mutex_unlock(&t->mirror_lock);
    return fd;
}

static void release_stripes(bm_tracker *t, uint64_t first, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        __atomic_fetch_sub(&stripe_of(t, first + i)->mirroring, 1, __ATOMIC_SEQ_CST);
}

/* Claim the stripes of granules [FIRST, LAST_EXCL) for one mirrored write:
 * 1 when it may go to both sides, 0 (nothing held) when it must be marked
 * instead. */
static int claim_for_mirror(bm_tracker *t, uint64_t first, uint64_t last_excl)
{
    uint64_t n = stripes_in(first, last_excl);
    for (uint64_t i = 0; i < n; i++) {
        if (__atomic_fetch_add(&stripe_of(t, first + i)->mirroring, 1, __ATOMIC_SEQ_CST)) {
            release_stripes(t, first, i + 1);   /* another mirrored write is there */
            return 0;
        }
    }
    /* Published; now look. A copier or a stop that came first is seen here;
     * one that comes later sees our claim and waits for it. */
    int ok = __atomic_load_n(&t->ctl->mirror_state, __ATOMIC_SEQ_CST) == BM_MIRROR_ON;
    for (uint64_t i = 0; ok && i < n; i++)
        ok = __atomic_load_n(&stripe_of(t, first + i)->copying, __ATOMIC_SEQ_CST) == 0;
    /* A dirty range will be copied anyway: mirroring it would only spend the
     * destination's bandwidth twice. */
    if (ok)
        ok = !bm_any_dirty(t, first, last_excl);
    if (!ok)
        release_stripes(t, first, n);
    return ok;
}

/* Write all of BUF at OFFSET of FD; 0 or the errno. */
static int write_all(int fd, const char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        done += (uint64_t)n;
    }
    return 0;
}

/* One change to apply to both sides: data (BUF), or zeros (BUF NULL, with
 * bm_zero's flags). */
struct change {
    const char *buf;
    uint32_t zero_flags;
};

/* Apply C over [OFFSET, OFFSET+LEN) of FD; 0 or the errno. */
static int apply(int fd, const struct change *c, uint64_t len, uint64_t offset)
{
    if (c->buf != NULL)
        return write_all(fd, c->buf, len, offset);
    return bm_zero_range(fd, offset, len, c->zero_flags) < 0 ? errno : 0;
}

static int mirrored(bm_tracker *t, int fd, const struct change *c, uint64_t len,
                    uint64_t offset)
{
    if (!mirror_on(t))
        return 0;
    int mfd = mirror_fd(t);
    if (mfd < 0)
        return 0;
    uint64_t first = offset >> t->shift, last = last_granule_excl(t, offset, len);
    if (!claim_for_mirror(t, first, last)) {
        __atomic_fetch_add(&t->ctl->mirror_fallbacks, 1, __ATOMIC_RELAXED);
        return 0;
    }
    /* Eras before and after, as I1 marks: a backup tool's change id sees the
     * write even though no dirty bit does. */
    bm_raise_eras_now(t, first, last);
    int err = apply(fd, c, len, offset);
    if (err == 0) {
        /* The copy may refuse a hole or fast zeroing the source allowed:
         * plain zeros do there (the bytes are what must match). */
        struct change dc = *c;
        dc.zero_flags &= ~(uint32_t)BM_ZERO_FAST;
        int derr = apply(mfd, &dc, len, offset);
        if (derr) {
            bm_mark_granules(t, first, last);
            mirror_failed(t, derr);
        } else {
            __atomic_fetch_add(&t->ctl->mirrored_bytes, len, __ATOMIC_RELAXED);
        }
    } else {
        bm_mark_granules(t, first, last); /* part of it may have landed */
    }
    bm_raise_eras_now(t, first, last);
    release_stripes(t, first, stripes_in(first, last));
    if (err)
        return bm_fail(err, "%s of %llu bytes at %llu failed: %s",
                       c->buf ? "write" : "zeroing", (unsigned long long)len,
                       (unsigned long long)offset, strerror(err));
    return 1;
}

int bm_mirrored_write(bm_tracker *t, int fd, const char *buf, uint64_t len, uint64_t offset)
{
    struct change c = {buf, 0};
    return mirrored(t, fd, &c, len, offset);
}

int bm_mirrored_zero(bm_tracker *t, int fd, uint64_t offset, uint64_t len, uint32_t flags)
{
    struct change c = {NULL, flags};
    return mirrored(t, fd, &c, len, offset);
}

/* ---------------------------------------------------------------------- */
/* The copier's side                                                       */

void bm_clear_stripes(bm_tracker *t)
{
    for (uint32_t i = 0; i < BM_STRIPES; i++) {
        __atomic_store_n(&t->stripes[i].mirroring, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&t->stripes[i].copying, 0, __ATOMIC_SEQ_CST);
    }
}

static int owned_by_live_other(bm_tracker *t)
{
    uint32_t pid = __atomic_load_n(&t->ctl->mirror_owner_pid, __ATOMIC_ACQUIRE);
    uint64_t start = __atomic_load_n(&t->ctl->mirror_owner_start, __ATOMIC_ACQUIRE);
    return pid != (uint32_t)getpid() && bm_process_alive(pid, start);
}

static int do_mirror_start(bm_tracker *t, const char *target)
{
    if (__atomic_load_n(&t->ctl->mirror_state, __ATOMIC_SEQ_CST) == BM_MIRROR_ON &&
        owned_by_live_other(t))
        return bm_fail(EBUSY, "another copier (pid %u) is mirroring this image",
                       __atomic_load_n(&t->ctl->mirror_owner_pid, __ATOMIC_ACQUIRE));
    size_t n = strnlen(target, BM_REDIRECT_MAX);
    if (n >= BM_REDIRECT_MAX)
        return bm_fail(ENAMETOOLONG, "mirror target path is too long");
    int fd = bm_open_owned_target(t, target, "mirror target");
    if (fd < 0)
        return -1;
    struct stat st;
    int rc = fstat(fd, &st);
    close(fd);
    if (rc < 0)
        return bm_fail(errno, "cannot stat mirror target %s: %s", target, strerror(errno));
    /* Off while the fields change, so no writer pairs the old target with
     * the new epoch. Copiers' counts left by a dead copier are cleared: the
     * caller is the image's only copier (it holds the sidecar's lock). */
    __atomic_store_n(&t->ctl->mirror_state, BM_MIRROR_OFF, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < BM_STRIPES; i++)
        __atomic_store_n(&t->stripes[i].copying, 0, __ATOMIC_SEQ_CST);
    memset(t->ctl->mirror_target, 0, sizeof t->ctl->mirror_target);
    memcpy(t->ctl->mirror_target, target, n);
    __atomic_store_n(&t->ctl->mirror_dev, (uint64_t)st.st_dev, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirror_ino, (uint64_t)st.st_ino, __ATOMIC_SEQ_CST);
    uint32_t me = (uint32_t)getpid();
    __atomic_store_n(&t->ctl->mirror_owner_start, bm_proc_start_time((pid_t)me),
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirror_owner_pid, me, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirror_errno, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirrored_bytes, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirror_fallbacks, 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&t->ctl->mirror_epoch, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&t->ctl->mirror_state, BM_MIRROR_ON, __ATOMIC_SEQ_CST);
    return 0;
}

/* Wait until no stripe holds a mirrored write, up to WAIT_NS. */
static int drain_mirrored(bm_tracker *t, uint64_t first, uint64_t n, uint64_t wait_ns)
{
    uint64_t deadline = bm_now_ns() + wait_ns;
    long nap = 10000;
    for (uint64_t i = 0; i < n; i++) {
        while (__atomic_load_n(&stripe_of(t, first + i)->mirroring, __ATOMIC_SEQ_CST) != 0) {
            if (bm_now_ns() >= deadline)
                return -1;
            struct timespec ts = {0, nap};
            nanosleep(&ts, NULL);
            if (nap < 1000000)
                nap *= 2;
        }
    }
    return 0;
}

static int do_mirror_stop(bm_tracker *t)
{
    if (owned_by_live_other(t))
        return bm_fail(EPERM, "the mirror belongs to another copier");
    uint32_t on = BM_MIRROR_ON;
    /* A failed mirror stays FAILED, so its status still says why. */
    __atomic_compare_exchange_n(&t->ctl->mirror_state, &on, BM_MIRROR_OFF, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    if (drain_mirrored(t, 0, BM_STRIPES, STOP_WAIT_NS) < 0)
        return bm_fail(ETIMEDOUT, "a mirrored write is still in flight after %u ms",
                       (unsigned)(STOP_WAIT_NS / 1000000));
    return 0;
}

void bm_mirror_release(bm_tracker *t)
{
    if (__atomic_load_n(&t->ctl->mirror_owner_pid, __ATOMIC_ACQUIRE) == (uint32_t)getpid() &&
        __atomic_load_n(&t->ctl->mirror_state, __ATOMIC_SEQ_CST) == BM_MIRROR_ON)
        do_mirror_stop(t);
}

static int do_mirror_status(bm_tracker *t, bm_mirror_info *out)
{
    memset(out, 0, sizeof *out);
    uint32_t st = __atomic_load_n(&t->ctl->mirror_state, __ATOMIC_SEQ_CST);
    out->state = st <= BM_MIRROR_FAILED ? st : BM_MIRROR_FAILED;
    out->error = __atomic_load_n(&t->ctl->mirror_errno, __ATOMIC_SEQ_CST);
    out->mirrored_bytes = __atomic_load_n(&t->ctl->mirrored_bytes, __ATOMIC_SEQ_CST);
    out->fallbacks = __atomic_load_n(&t->ctl->mirror_fallbacks, __ATOMIC_SEQ_CST);
    return 0;
}

/* Test seam: BLOCKMIRROR_TEST_NO_INTERLOCK=1 in a copier's environment
 * makes its claims no-ops, so tests/test_mirror.py can show the race the
 * interlock closes. Read once per process. */
static int interlock_disabled(void)
{
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *e = getenv("BLOCKMIRROR_TEST_NO_INTERLOCK");
        v = e != NULL && strcmp(e, "1") == 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

static int do_copy_release(bm_tracker *t, uint64_t offset, uint64_t len)
{
    if (len == 0 || interlock_disabled())
        return 0;
    uint64_t first = offset >> t->shift;
    uint64_t n = stripes_in(first, last_granule_excl(t, offset, len));
    for (uint64_t i = 0; i < n; i++)
        __atomic_fetch_sub(&stripe_of(t, first + i)->copying, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int do_copy_claim(bm_tracker *t, uint64_t offset, uint64_t len)
{
    if (len == 0 || interlock_disabled())
        return 0;
    if (offset > UINT64_MAX - len)
        return bm_fail(EINVAL, "range %llu+%llu overflows", (unsigned long long)offset,
                       (unsigned long long)len);
    uint64_t first = offset >> t->shift;
    uint64_t n = stripes_in(first, last_granule_excl(t, offset, len));
    for (uint64_t i = 0; i < n; i++)
        __atomic_fetch_add(&stripe_of(t, first + i)->copying, 1, __ATOMIC_SEQ_CST);
    if (drain_mirrored(t, first, n, CLAIM_WAIT_NS) < 0) {
        do_copy_release(t, offset, len);
        return bm_fail(ETIMEDOUT, "a mirrored write over %llu+%llu did not finish in %u ms "
                                  "(a writer died mid-write?)",
                       (unsigned long long)offset, (unsigned long long)len,
                       (unsigned)(CLAIM_WAIT_NS / 1000000));
    }
    return 0;
}

/* The public calls, each under a SIGBUS guard (guard.c). */

int bm_mirror_start(bm_tracker *t, const char *target)
{
    BM_GUARDED(int, t, do_mirror_start(t, target));
}

int bm_mirror_stop(bm_tracker *t)
{
    BM_GUARDED(int, t, do_mirror_stop(t));
}

int bm_mirror_status(bm_tracker *t, bm_mirror_info *out)
{
    BM_GUARDED(int, t, do_mirror_status(t, out));
}

int bm_copy_claim(bm_tracker *t, uint64_t offset, uint64_t len)
{
    BM_GUARDED(int, t, do_copy_claim(t, offset, len));
}

int bm_copy_release(bm_tracker *t, uint64_t offset, uint64_t len)
{
    BM_GUARDED(int, t, do_copy_release(t, offset, len));
}
