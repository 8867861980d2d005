/* guard.c - surviving a sidecar that is truncated under a running process.
 *
 * Every process maps the sidecar MAP_SHARED over a reservation sized for the
 * largest image (cbt.c). If someone truncates the file, a load or store to a
 * page past its new end raises SIGBUS, which by default kills the process: a
 * writer (a VM, a database) would die because its owner shortened a small
 * file beside its image. Checking the file size before each access would
 * cost an fstat per write and still race with the truncate, so instead every
 * public function that touches the mapping runs under a guard (see
 * BM_GUARD_BEGIN in bm_internal.h): a sigsetjmp, a thread-local pointer, and
 * a SIGBUS handler that jumps back when the faulting address lies in a
 * guarded mapping of this thread. Faults anywhere else go to whatever
 * handler was installed before (Python's faulthandler, or the default
 * action), so the library never swallows a crash that is not its own. */
#include "bm_internal.h"

#include <signal.h>
#include <string.h>

__thread struct bm_guard *bm_guard_top __attribute__((tls_model("initial-exec")));

static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_errno;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    const unsigned char *addr = info->si_addr;
    for (struct bm_guard *g = bm_guard_top; g; g = g->prev)
        if (addr >= g->lo && addr < g->hi) {
            bm_guard_top = g;
            siglongjmp(g->jump, 1);
        }
    /* Not ours: behave as if we were never installed. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
        return;
    }
    if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* Returning re-runs the faulting access, now with the default
         * action (SIGBUS from a fault cannot be ignored usefully). */
        signal(sig, SIG_DFL);
        return;
    }
    previous.sa_handler(sig);
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    /* NODEFER: the handler leaves by siglongjmp without restoring the
     * signal mask, so SIGBUS must not be blocked while it runs. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) < 0)
        install_errno = errno ? errno : EINVAL;
}

int bm_guard_install(void)
{
    pthread_once(&install_once, install);
    if (install_errno)
        return bm_fail(install_errno, "cannot install the SIGBUS guard: %s",
                       strerror(install_errno));
    return 0;
}

int bm_fail_broken(void)
{
    return bm_fail(EUCLEAN, "the sidecar was truncated under this process (its mapping "
                            "raised SIGBUS); close the image and reopen it");
}

int bm_guard_fault(struct bm_guard *g)
{
    bm_tracker *t = g->tracker;
    __atomic_store_n(&t->broken, 1, __ATOMIC_RELAXED);
    /* Best effort, each under a guard of its own: leave the in-flight count
     * (a freeze would otherwise wait for this write until its lease ends)
     * and mark the sidecar unclean (I4), where those pages still exist. */
    struct bm_guard again;
    bm_guard_push(&again, t);
    if (sigsetjmp(again.jump, 0) == 0) {
        if (g->in_flight && t->slot >= 0)
            __atomic_fetch_sub(&t->ctl->slots[t->slot].inflight, 1, __ATOMIC_SEQ_CST);
        __atomic_fetch_or(&t->hdr->flags, BM_FLAG_UNCLEAN, __ATOMIC_SEQ_CST);
    }
    bm_guard_pop(&again);
    return bm_fail_broken();
}
