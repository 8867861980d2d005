/* nbd.c - the NBD endpoint: a local file's extents written into an NBD
 * export through libnbd's asynchronous API, many requests in flight; and
 * the other way (bm_nbd_read_extents), an export's data read into a new
 * sparse local file the same way, with bm_nbd_map saying from block status
 * which ranges need reading at all.
 *
 * A bm_nbd handle holds up to BM_NBD_MAX_CONNS connections to one export
 * (several only when the server offers multi-conn, as nbdcopy does). One
 * bm_nbd_copy_extents call drives one connection from one thread through
 * the source loop every endpoint shares (csrc/endpoint/source_loop.c: the
 * source read into a ring of slot buffers, zero detection, digests, the
 * counts); this file is its NBD side, the callbacks in nbd_ops: data goes
 * out as NBD_CMD_WRITE, merged zero runs as NBD_CMD_WRITE_ZEROES, and the
 * loop waits in nbd_poll only when every slot has a command outstanding.
 * cffi drops the GIL around the call, so Python runs one call per
 * connection on a thread pool.
 *
 * Reading, a slot holds one NBD_CMD_READ; its completion callback writes
 * the slot's non-zero blocks to the local file (pwrite) before the slot is
 * reused. Completion callbacks run inside nbd_poll on the calling thread, so
 * the call's counters need no atomics. A call that returns with commands still
 * outstanding (a connection that hung past its timeout) leaves its state
 * allocated and the connection marked failed: a late callback never touches
 * freed memory. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libnbd.h>

#include "source_loop.h" /* and bm_endpoint.h, which bm_remote.h needs first */
#include "bm_remote.h"

#define ZERO_REQUEST_MAX (1ull << 30)   /* WRITE_ZEROES carries a 32-bit length */
#define POLL_MS 200                     /* how often a waiting call looks at CANCEL */

/* bm_remote.h's constants are the shared loop's. */
_Static_assert(BM_NBD_DST_FRESH == BM_EP_DST_FRESH && BM_NBD_SIDE_SRC == BM_EP_SIDE_SRC &&
               BM_NBD_SIDE_DST == BM_EP_SIDE_DST && BM_NBD_MIN_BLOCK == BM_EP_MIN_BLOCK &&
               BM_NBD_MAX_BLOCK == BM_EP_MAX_BLOCK, "bm_remote.h and bm_endpoint.h disagree");

struct call;

struct bm_nbd {
    uint32_t nconns;
    struct nbd_handle *conn[BM_NBD_MAX_CONNS];
    int failed[BM_NBD_MAX_CONNS];       /* errno a connection died with, 0 while usable */
    uint64_t size;
    uint32_t caps;
    uint64_t max_request;               /* the export's largest data request */
    uint32_t timeout_ms;
    struct call *spare[BM_NBD_MAX_CONNS]; /* each connection's last call state, reused:
                                           * fresh buffers would page-fault every call */
};

/* The state of one bm_nbd_copy_extents (or bm_nbd_read_extents) call: the
 * shared loop's (its slots, counts and zero run) and the NBD side's. */
struct call {
    struct bm_ep_loop loop;
    bm_nbd *h;
    uint32_t index;
    struct nbd_handle *nbd;
    int local;                          /* reading: the local file written */
    uint32_t export_side;               /* BM_NBD_SIDE_* of the export in this call */
    const char *verb;                   /* what its commands do: "write", "read" */
    int error;                          /* the first failed command's errno */
    uint64_t error_offset;
    int local_error;                    /* the first failed local write's errno (read) */
    uint64_t local_error_offset;
};

static struct call *call_of(struct bm_ep_loop *loop)
{
    return (struct call *)(void *)((char *)loop - offsetof(struct call, loop));
}

const char *bm_nbd_last_error(void)
{
    return bm_ep_last_error();
}

static int fail_nbd(const char *what)
{
    int err = nbd_get_errno();
    const char *msg = nbd_get_error();
    return bm_ep_fail(err ? err : EIO, "%s: %s", what, msg ? msg : "NBD error");
}

/* ---------------------------------------------------------------------- */
/* The handle                                                              */

/* Acknowledge at once what the server sends during the handshake. A server
 * that sends an option's replies in small pieces without TCP_NODELAY
 * (qemu-nbd) holds each next piece until our ACK, which the kernel delays
 * ~40 ms: two such waits made every connection take ~88 ms instead of ~2.
 * The flag does not stick, so it is set before every poll; a unix socket
 * refuses it, which changes nothing. */
static void ack_quickly(struct nbd_handle *nbd)
{
    int fd = nbd_aio_get_fd(nbd);
    int one = 1;
    if (fd >= 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

/* Connect and shake hands, giving up after TIMEOUT_MS (0: never): a host
 * that drops packets would otherwise hold connect(2) for minutes. */
static int connect_within(struct nbd_handle *nbd, const char *uri, uint32_t timeout_ms)
{
    uint64_t deadline = bm_ep_deadline_after(timeout_ms);
    if (nbd_aio_connect_uri(nbd, uri) < 0)
        return fail_nbd("connect");
    while (nbd_aio_is_connecting(nbd) == 1) {
        ack_quickly(nbd);
        int r = nbd_poll(nbd, POLL_MS);
        if (r < 0)
            return fail_nbd("connect");
        if (r == 0 && deadline && bm_ep_now_ns() > deadline)
            return bm_ep_fail(ETIMEDOUT, "connect: no answer from the NBD server in %u ms",
                              timeout_ms);
    }
    if (nbd_aio_is_ready(nbd) != 1)
        return fail_nbd("connect");
    return 0;
}

/* Connect and shake hands on the N handles of NBDS at once, giving up after
 * TIMEOUT_MS (0: never) without progress: the extra connections of a
 * multi-conn export take one handshake's round trips, not N in a row. */
static int connect_all_within(struct nbd_handle **nbds, uint32_t n, const char *uri,
                              uint32_t timeout_ms)
{
    for (uint32_t i = 0; i < n; i++)
        if (nbd_aio_connect_uri(nbds[i], uri) < 0)
            return fail_nbd("connect");
    uint64_t deadline = bm_ep_deadline_after(timeout_ms);
    for (;;) {
        struct pollfd fds[BM_NBD_MAX_CONNS];
        struct nbd_handle *of[BM_NBD_MAX_CONNS];
        nfds_t waiting = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (nbd_aio_is_connecting(nbds[i]) != 1)
                continue;
            int fd = nbd_aio_get_fd(nbds[i]);
            if (fd < 0) /* libnbd makes the socket as it starts connecting */
                return fail_nbd("connect");
            unsigned dir = nbd_aio_get_direction(nbds[i]);
            short events = (short)((dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                                   (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0));
            ack_quickly(nbds[i]);
            fds[waiting] = (struct pollfd){.fd = fd, .events = events};
            of[waiting++] = nbds[i];
        }
        if (waiting == 0)
            break;
        int r = poll(fds, waiting, POLL_MS);
        if (r < 0 && errno != EINTR)
            return bm_ep_fail(errno, "connect: poll: %s", strerror(errno));
        if (r == 0 && deadline && bm_ep_now_ns() > deadline)
            return bm_ep_fail(ETIMEDOUT, "connect: no answer from the NBD server in %u ms",
                              timeout_ms);
        for (nfds_t w = 0; r > 0 && w < waiting; w++) {
            short ev = fds[w].revents;
            if ((ev & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read(of[w]) < 0)
                return fail_nbd("connect");
            if ((ev & POLLOUT) && nbd_aio_notify_write(of[w]) < 0)
                return fail_nbd("connect");
        }
        if (r > 0)
            deadline = bm_ep_deadline_after(timeout_ms);
    }
    for (uint32_t i = 0; i < n; i++)
        if (nbd_aio_is_ready(nbds[i]) != 1)
            return fail_nbd("connect");
    return 0;
}

/* A new handle with our options, not connected. */
static struct nbd_handle *new_handle(void)
{
    struct nbd_handle *nbd = nbd_create();
    if (!nbd) {
        fail_nbd("nbd_create");
        return NULL;
    }
    /* A URI naming a local file (?tls-psk-file=) stays refused, as by default.
     * base:allocation lets bm_nbd_reads_zero ask where the export is zero. */
    if (nbd_set_uri_allow_local_file(nbd, false) < 0 ||
        nbd_add_meta_context(nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0) {
        fail_nbd("connect");
        nbd_close(nbd);
        return NULL;
    }
    return nbd;
}

static int refuse_read_only(struct nbd_handle *nbd, int write)
{
    return write && nbd_is_read_only(nbd) == 1 ? bm_ep_fail(EROFS, "the export is read-only")
                                                : 0;
}

static struct nbd_handle *connect_one(const char *uri, int write, uint32_t timeout_ms)
{
    struct nbd_handle *nbd = new_handle();
    if (!nbd)
        return NULL;
    if (connect_within(nbd, uri, timeout_ms) < 0 || refuse_read_only(nbd, write) < 0) {
        int err = errno;
        nbd_close(nbd);
        errno = err;
        return NULL;
    }
    return nbd;
}

static void learn_caps(bm_nbd *h)
{
    struct nbd_handle *nbd = h->conn[0];
    h->caps = (nbd_is_read_only(nbd) == 0 ? BM_NBD_CAN_WRITE : 0)
              | (nbd_can_flush(nbd) == 1 ? BM_NBD_CAN_FLUSH : 0)
              | (nbd_can_fua(nbd) == 1 ? BM_NBD_CAN_FUA : 0)
              | (nbd_can_trim(nbd) == 1 ? BM_NBD_CAN_TRIM : 0)
              | (nbd_can_zero(nbd) == 1 ? BM_NBD_CAN_ZERO : 0)
              | (nbd_can_multi_conn(nbd) == 1 ? BM_NBD_CAN_MULTI_CONN : 0)
              | (nbd_can_meta_context(nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1
                 ? BM_NBD_CAN_BLOCK_STATUS : 0);
    int64_t most = nbd_get_block_size(nbd, LIBNBD_SIZE_MAXIMUM);
    /* 32 MiB is the largest payload every server takes (the NBD spec's advice). */
    h->max_request = most > 0 && (uint64_t)most < (32u << 20) ? (uint64_t)most : (32u << 20);
}

bm_nbd *bm_nbd_open(const char *uri, uint32_t max_conns, int write, uint32_t timeout_ms)
{
    if (!uri || max_conns == 0 || max_conns > BM_NBD_MAX_CONNS) {
        bm_ep_fail(EINVAL, "need a URI and 1 to %d connections", BM_NBD_MAX_CONNS);
        return NULL;
    }
    bm_nbd *h = calloc(1, sizeof *h);
    if (!h) {
        bm_ep_fail(ENOMEM, "out of memory");
        return NULL;
    }
    h->timeout_ms = timeout_ms;
    h->conn[0] = connect_one(uri, write, timeout_ms);
    if (!h->conn[0]) {
        free(h);
        return NULL;
    }
    h->nconns = 1;
    int64_t size = nbd_get_size(h->conn[0]);
    if (size < 0) {
        fail_nbd("size");
        bm_nbd_close(h);
        return NULL;
    }
    h->size = (uint64_t)size;
    learn_caps(h);
    uint32_t want = (h->caps & BM_NBD_CAN_MULTI_CONN) ? max_conns : 1;
    for (uint32_t i = 1; i < want; i++) {
        h->conn[i] = new_handle();
        if (!h->conn[i]) {
            bm_nbd_close(h);
            return NULL;
        }
        h->nconns++;
    }
    if (want > 1 && connect_all_within(h->conn + 1, want - 1, uri, timeout_ms) < 0) {
        bm_nbd_close(h);
        return NULL;
    }
    for (uint32_t i = 1; i < want; i++) {
        if (refuse_read_only(h->conn[i], write) < 0) {
            bm_nbd_close(h);
            return NULL;
        }
    }
    return h;
}

static void free_call(struct call *c);

void bm_nbd_close(bm_nbd *h)
{
    if (!h)
        return;
    for (uint32_t i = 0; i < h->nconns; i++) {
        free_call(h->spare[i]);
        if (!h->failed[i] && nbd_aio_is_dead(h->conn[i]) == 0)
            (void)nbd_shutdown(h->conn[i], 0);
        nbd_close(h->conn[i]);
    }
    free(h);
}

int64_t bm_nbd_size(const bm_nbd *h)
{
    return (int64_t)h->size;
}

uint32_t bm_nbd_caps(const bm_nbd *h)
{
    return h->caps;
}

uint32_t bm_nbd_connections(const bm_nbd *h)
{
    return h->nconns;
}

static int usable(bm_nbd *h, uint32_t conn)
{
    if (conn >= h->nconns)
        return bm_ep_fail(EINVAL, "no connection %u (the handle has %u)", conn, h->nconns);
    if (h->failed[conn])
        return bm_ep_fail(h->failed[conn], "the NBD connection failed earlier: %s",
                          strerror(h->failed[conn]));
    return 0;
}

/* Wait for the one command COOKIE on connection CONN (issued without a
 * callback), no longer than the handle's timeout without a reply. A
 * connection that times out is failed for good and never driven again, so
 * a late reply can never land in a buffer its caller has freed. */
static int wait_command(bm_nbd *h, uint32_t conn, int64_t cookie, const char *what)
{
    struct nbd_handle *nbd = h->conn[conn];
    if (cookie < 0)
        return fail_nbd(what);
    uint64_t deadline = bm_ep_deadline_after(h->timeout_ms);
    for (;;) {
        int done = nbd_aio_command_completed(nbd, (uint64_t)cookie);
        if (done == 1)
            return 0;
        if (done < 0)
            return fail_nbd(what);
        int r = nbd_poll(nbd, POLL_MS);
        if (r < 0) {
            h->failed[conn] = nbd_get_errno() ? nbd_get_errno() : EIO;
            return fail_nbd(what);
        }
        if (r == 0 && deadline && bm_ep_now_ns() > deadline) {
            h->failed[conn] = ETIMEDOUT;
            return bm_ep_fail(ETIMEDOUT, "%s: no reply from the NBD server in %u ms", what,
                              h->timeout_ms);
        }
    }
}

int bm_nbd_flush(bm_nbd *h)
{
    if (!(h->caps & BM_NBD_CAN_FLUSH))
        return 0;
    for (uint32_t i = 0; i < h->nconns; i++) {
        if (usable(h, i) < 0)
            return -1;
        if (wait_command(h, i, nbd_aio_flush(h->conn[i], NBD_NULL_COMPLETION, 0), "flush") < 0)
            return -1;
        if (h->caps & BM_NBD_CAN_MULTI_CONN)
            break;
    }
    return 0;
}

/* LEN bytes at OFFSET lie inside the export (WHAT names the request). */
static int in_bounds(bm_nbd *h, uint64_t len, uint64_t offset, const char *what)
{
    if (offset > h->size || len > h->size - offset)
        return bm_ep_fail(EINVAL, "%s of %llu bytes at %llu is past the export's end (%llu)", what,
                          (unsigned long long)len, (unsigned long long)offset,
                          (unsigned long long)h->size);
    return 0;
}

int bm_nbd_pread(bm_nbd *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0 || in_bounds(h, len, offset, "read") < 0)
        return -1;
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < h->max_request ? len - done : h->max_request;
        int64_t cookie = nbd_aio_pread(h->conn[conn], buf + done, (size_t)n, offset + done,
                                       NBD_NULL_COMPLETION, 0);
        if (wait_command(h, conn, cookie, "read") < 0)
            return -1;
        done += n;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* A writer's I/O: a TrackedImage whose image was moved onto this export   */
/* (one command at a time, waited for, with the handle's timeout).         */

static int in_export(bm_nbd *h, uint64_t len, uint64_t offset, const char *what)
{
    if (in_bounds(h, len, offset, what) < 0)
        return -1;
    if (!(h->caps & BM_NBD_CAN_WRITE))
        return bm_ep_fail(EROFS, "the export is read-only");
    return 0;
}

int bm_nbd_pwrite(bm_nbd *h, uint32_t conn, const char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0 || in_export(h, len, offset, "write") < 0)
        return -1;
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < h->max_request ? len - done : h->max_request;
        int64_t cookie = nbd_aio_pwrite(h->conn[conn], buf + done, (size_t)n, offset + done,
                                        NBD_NULL_COMPLETION, 0);
        if (wait_command(h, conn, cookie, "write") < 0)
            return -1;
        done += n;
    }
    return 0;
}

int bm_nbd_zero(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len, int may_trim)
{
    if (usable(h, conn) < 0 || in_export(h, len, offset, "write zeroes") < 0)
        return -1;
    if (!(h->caps & BM_NBD_CAN_ZERO)) {
        /* No WRITE_ZEROES: zeros as data (TRIM never promises zeros). */
        uint64_t step = len < h->max_request ? len : h->max_request;
        char *zeros = calloc(1, step ? step : 1);
        if (!zeros)
            return bm_ep_fail(ENOMEM, "out of memory");
        int rc = 0;
        for (uint64_t done = 0; rc == 0 && done < len;) {
            uint64_t n = len - done < step ? len - done : step;
            rc = bm_nbd_pwrite(h, conn, zeros, n, offset + done);
            done += n;
        }
        /* A timed-out connection is never driven again, so ZEROS is not
         * read after this free. */
        free(zeros);
        return rc;
    }
    uint32_t flags = may_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE;
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < ZERO_REQUEST_MAX ? len - done : ZERO_REQUEST_MAX;
        int64_t cookie = nbd_aio_zero(h->conn[conn], n, offset + done, NBD_NULL_COMPLETION,
                                      flags);
        if (wait_command(h, conn, cookie, "write zeroes") < 0)
            return -1;
        done += n;
    }
    return 0;
}

/* What one NBD_CMD_BLOCK_STATUS reply said, for bm_nbd_reads_zero. */
struct zero_scan {
    uint64_t next;      /* the first byte not described yet */
    int all_zero;
};

static int on_extents(void *user_data, const char *context, uint64_t offset,
                      uint32_t *entries, size_t nr_entries, int *error)
{
    struct zero_scan *z = user_data;
    if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || *error)
        return 0;
    uint64_t pos = offset;
    for (size_t i = 0; i + 1 < nr_entries; i += 2) {
        if (!(entries[i + 1] & LIBNBD_STATE_ZERO))
            z->all_zero = 0;
        pos += entries[i];
    }
    if (pos > z->next)
        z->next = pos;
    return 0;
}

int bm_nbd_reads_zero(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len)
{
    if (usable(h, conn) < 0)
        return -1;
    if (!(h->caps & BM_NBD_CAN_BLOCK_STATUS))
        return 0;
    if (offset > h->size || len > h->size - offset)
        return bm_ep_fail(EINVAL, "range %llu+%llu is past the export's end",
                          (unsigned long long)offset, (unsigned long long)len);
    struct zero_scan z = {.next = offset, .all_zero = 1};
    while (z.all_zero && z.next < offset + len) {
        uint64_t at = z.next, n = offset + len - at;
        if (n > (1u << 30))
            n = 1u << 30;
        nbd_extent_callback cb = {.callback = on_extents, .user_data = &z};
        if (nbd_block_status(h->conn[conn], n, at, cb, 0) < 0)
            return fail_nbd("block status");
        if (z.next <= at) /* no progress: a server that describes nothing */
            return 0;
    }
    return z.all_zero;
}

/* ---------------------------------------------------------------------- */
/* Commands in flight: the NBD side of the shared loop                     */

static int command_done(void *user_data, int *error)
{
    struct bm_ep_slot *s = user_data;
    struct call *c = call_of(s->loop);
    if (*error && !c->error) {
        c->error = *error;
        c->error_offset = s->offset;
    }
    bm_ep_loop_release(s->loop, s);
    return 1; /* retire the command */
}

/* The connection is gone or hung: fail it for good. */
static int lose_connection(struct call *c, int err, const char *what)
{
    c->h->failed[c->index] = err;
    c->loop.st->error_side = c->export_side;
    return bm_ep_fail(err, "%s: %s", what, strerror(err));
}

/* Wait in nbd_poll until a command completes (or the timeout). */
static int wait_some(struct bm_ep_loop *loop)
{
    struct call *c = call_of(loop);
    uint64_t deadline = bm_ep_deadline_after(c->h->timeout_ms);
    uint32_t before = loop->in_flight;
    while (loop->in_flight == before && loop->in_flight > 0) {
        int r = nbd_poll(c->nbd, POLL_MS);
        if (r < 0) {
            int err = nbd_get_errno() ? nbd_get_errno() : EIO;
            loop->st->error_side = c->export_side;
            fail_nbd("NBD connection");
            c->h->failed[c->index] = err;
            errno = err;
            return -1;
        }
        if (r == 0 && deadline && bm_ep_now_ns() > deadline)
            return lose_connection(c, ETIMEDOUT, "no reply from the NBD server in time");
    }
    return 0;
}

/* The first failure a completion recorded: a command the export failed, or
 * (reading) a write of the local copy. */
static int recorded_error(struct bm_ep_loop *loop)
{
    struct call *c = call_of(loop);
    if (c->error) {
        loop->st->error_side = c->export_side;
        return bm_ep_fail(c->error, "NBD %s near offset %llu failed: %s", c->verb,
                          (unsigned long long)c->error_offset, strerror(c->error));
    }
    if (c->local_error) {
        loop->st->error_side = c->export_side == BM_NBD_SIDE_SRC ? BM_NBD_SIDE_DST
                                                                 : BM_NBD_SIDE_SRC;
        return bm_ep_fail(c->local_error, "write of %llu+ to the local copy failed: %s",
                          (unsigned long long)c->local_error_offset,
                          strerror(c->local_error));
    }
    return 0;
}

/* Count a command issued on S (or, COOKIE < 0, one libnbd refused). */
static int issued(struct call *c, struct bm_ep_slot *s, int64_t cookie, const char *what)
{
    if (cookie < 0) {
        bm_ep_loop_release(&c->loop, s);
        c->loop.st->error_side = c->export_side;
        int err = nbd_get_errno() ? nbd_get_errno() : EIO;
        if (nbd_aio_is_dead(c->nbd) == 1)
            c->h->failed[c->index] = err;
        return fail_nbd(what);
    }
    bm_ep_loop_issued(&c->loop);
    return 0;
}

/* One NBD_CMD_WRITE (LEN is at most the export's largest request). */
static int send_write(struct bm_ep_loop *loop, struct bm_ep_slot *s, const char *buf,
                      uint64_t len, uint64_t offset)
{
    struct call *c = call_of(loop);
    nbd_completion_callback cb = {.callback = command_done, .user_data = s};
    bm_ep_loop_hold(loop, s);
    s->offset = offset;
    return issued(c, s, nbd_aio_pwrite(c->nbd, buf, (size_t)len, offset, cb, 0), "write");
}

/* One NBD_CMD_WRITE_ZEROES (no NO_HOLE: the server may punch). Exports
 * without it get writes of zeros instead: the loop then has a zeros buffer. */
static int send_zeros(struct bm_ep_loop *loop, struct bm_ep_slot *s, uint64_t offset,
                      uint64_t len)
{
    struct call *c = call_of(loop);
    nbd_completion_callback cb = {.callback = command_done, .user_data = s};
    bm_ep_loop_hold(loop, s);
    s->offset = offset;
    return issued(c, s, nbd_aio_zero(c->nbd, len, offset, cb, 0), "write zeroes");
}

/* libnbd sends a command as it is queued: no service callback. A cancel
 * seen after the last reply does not fail a call that did all its work. */
static const struct bm_ep_ops nbd_ops = {
    .write = send_write,
    .zero = send_zeros,
    .wait = wait_some,
    .recorded_error = recorded_error,
};

/* ---------------------------------------------------------------------- */
/* One call                                                                */

static void free_call(struct call *c)
{
    if (!c)
        return;
    bm_ep_loop_free(&c->loop);
    free(c);
}

/* The connection's call state: its spare (only ever kept with nothing in
 * flight), with its buffers when the shape matches, else a new one. */
static struct call *new_call(bm_nbd *h, uint32_t conn, uint32_t requests, uint64_t request_bytes)
{
    struct call *c = h->spare[conn];
    h->spare[conn] = NULL;
    if (!c && !(c = calloc(1, sizeof *c))) {
        bm_ep_fail(ENOMEM, "cannot allocate %u request buffers", requests);
        return NULL;
    }
    /* Exports without WRITE_ZEROES are sent zeros as data, a slot's worth
     * at a time (TRIM never promises zeros). */
    int can_zero = (h->caps & BM_NBD_CAN_ZERO) != 0;
    if (bm_ep_loop_buffers(&c->loop, requests, request_bytes, can_zero ? 0 : request_bytes) < 0) {
        free_call(c);
        return NULL;
    }
    *c = (struct call){.loop = c->loop, .h = h, .index = conn, .nbd = h->conn[conn],
                       .local = -1};
    c->loop.write_max = h->max_request;
    c->loop.zero_step = can_zero ? ZERO_REQUEST_MAX : request_bytes;
    return c;
}

/* Keep C as its connection's spare, unless a command may still call back
 * into it: then it is left allocated for good (see the top). */
static void end_call(struct call *c)
{
    if (c->loop.in_flight)
        return;
    c->h->spare[c->index] = c;
}

static int check_args(bm_nbd *h, uint32_t conn, const bm_nbd_extent *extents, uint64_t count,
                      uint32_t block_size, uint64_t request_bytes, uint32_t flags)
{
    if (!h || (count && !extents))
        return bm_ep_fail(EINVAL, "handle and extents must not be NULL");
    if (bm_ep_check_shape(block_size, request_bytes, flags) < 0)
        return -1;
    if (!(h->caps & BM_NBD_CAN_WRITE))
        return bm_ep_fail(EROFS, "the export is read-only");
    for (uint64_t i = 0; i < count; i++)
        if (extents[i].offset > h->size || extents[i].length > h->size - extents[i].offset)
            return bm_ep_fail(ENOSPC, "extent %llu+%llu is past the export's end (%llu bytes)",
                              (unsigned long long)extents[i].offset,
                              (unsigned long long)extents[i].length,
                              (unsigned long long)h->size);
    return usable(h, conn);
}

int bm_nbd_copy_extents(bm_nbd *h, uint32_t conn, int src_fd, const bm_nbd_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, uint32_t flags, bm_nbd_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nbd_copy_stats *stats)
{
    return bm_nbd_copy_extents_hashed(h, conn, src_fd, extents, count, block_size, requests,
                                      request_bytes, flags, rate_cap, cancel, NULL, stats);
}

int bm_nbd_copy_extents_hashed(bm_nbd *h, uint32_t conn, int src_fd,
                               const bm_nbd_extent *extents, uint64_t count,
                               uint32_t block_size, uint32_t requests, uint64_t request_bytes,
                               uint32_t flags, bm_nbd_rate_cap *rate_cap,
                               const uint32_t *cancel, bm_nbd_digest_sink *sink,
                               bm_nbd_copy_stats *stats)
{
    if (!stats)
        return bm_ep_fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NBD_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NBD_DEFAULT_REQUEST_BYTES;
    if (check_args(h, conn, extents, count, block_size, request_bytes, flags) < 0 ||
        bm_ep_check_sink(sink, extents, count, request_bytes) < 0)
        return -1;
    struct call *c = new_call(h, conn, requests, request_bytes);
    if (!c)
        return -1;
    c->export_side = BM_NBD_SIDE_DST;
    c->verb = "write";
    bm_ep_loop_start(&c->loop, &nbd_ops, src_fd, flags, block_size, rate_cap, cancel, sink,
                     stats);
    int rc = bm_ep_loop_copy(&c->loop, extents, count);
    int saved = errno;
    end_call(c);
    errno = saved;
    return rc;
}

/* ---------------------------------------------------------------------- */
/* The other way: the export read into a local file                        */

/* Where block status reported data, for bm_nbd_map. */
struct map_scan {
    bm_nbd_extent *out;
    uint64_t max_out, count;
    uint64_t next;      /* the first byte not described yet */
    uint64_t end;       /* the end of the range asked about */
    int full;           /* OUT filled up before the reply's end */
};

/* Note [AT, AT+LEN) as data, merged with the extent before when they touch. */
static int map_data(struct map_scan *m, uint64_t at, uint64_t len)
{
    if (m->count && m->out[m->count - 1].offset + m->out[m->count - 1].length == at) {
        m->out[m->count - 1].length += len;
        return 0;
    }
    if (m->count == m->max_out)
        return -1;
    m->out[m->count].offset = at;
    m->out[m->count].length = len;
    m->count++;
    return 0;
}

static int on_map(void *user_data, const char *context, uint64_t offset, uint32_t *entries,
                  size_t nr_entries, int *error)
{
    struct map_scan *m = user_data;
    if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || *error || m->full)
        return 0;
    uint64_t pos = offset;
    for (size_t i = 0; i + 1 < nr_entries && pos < m->end; i += 2) {
        uint64_t len = entries[i] < m->end - pos ? entries[i] : m->end - pos;
        /* Only NBD_STATE_ZERO promises zeros: a HOLE alone may read as anything. */
        if (!(entries[i + 1] & LIBNBD_STATE_ZERO) && map_data(m, pos, len) < 0) {
            m->full = 1;
            break;
        }
        pos += len;
    }
    if (pos > m->next)
        m->next = pos;
    return 0;
}

int64_t bm_nbd_map(bm_nbd *h, uint32_t conn, uint64_t offset, uint64_t len, bm_nbd_extent *out,
                   uint64_t max_out, uint64_t *described)
{
    if (!h || !out || !described || max_out == 0)
        return bm_ep_fail(EINVAL, "handle, output and described must not be NULL");
    if (usable(h, conn) < 0)
        return -1;
    if (offset > h->size || len > h->size - offset)
        return bm_ep_fail(EINVAL, "range %llu+%llu is past the export's end",
                          (unsigned long long)offset, (unsigned long long)len);
    struct map_scan m = {.out = out, .max_out = max_out, .next = offset, .end = offset + len};
    if (!(h->caps & BM_NBD_CAN_BLOCK_STATUS)) { /* it cannot say: all of it is data */
        *described = offset + len;
        if (len == 0)
            return 0;
        map_data(&m, offset, len);
        return 1;
    }
    while (!m.full && m.next < m.end) {
        uint64_t at = m.next, n = m.end - at < (1u << 30) ? m.end - at : (1u << 30);
        nbd_extent_callback cb = {.callback = on_map, .user_data = &m};
        int64_t cookie = nbd_aio_block_status(h->conn[conn], n, at, cb, NBD_NULL_COMPLETION, 0);
        if (wait_command(h, conn, cookie, "block status") < 0)
            return -1;
        if (m.next <= at) /* a reply that describes nothing: the rest is data */
            if (map_data(&m, at, m.end - at) == 0)
                m.next = m.end;
    }
    *described = m.next;
    return (int64_t)m.count;
}


static int write_local(struct call *c, const char *buf, uint64_t len, uint64_t offset)
{
    for (uint64_t done = 0; done < len;) {
        ssize_t n = pwrite(c->local, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            c->local_error = n < 0 ? errno : EIO;
            c->local_error_offset = offset + done;
            return -1;
        }
        done += (uint64_t)n;
    }
    c->loop.st->bytes_written += len;
    return 0;
}

/* A read landed in S: its data blocks go to the local file; all-zero
 * blocks are left as the (fresh, sparse) file's holes. */
static void land(struct call *c, struct bm_ep_slot *s)
{
    uint64_t bs = c->loop.block, len = s->len, offset = s->offset, i = 0, run = 0;
    int in_data = 0;
    while (i < len && !c->local_error) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        if (end > len)
            end = len;
        if (!bm_ep_is_zero(s->buf + i, end - i)) {
            if (!in_data)
                run = i;
            in_data = 1;
        } else {
            if (in_data && write_local(c, s->buf + run, i - run, offset + run) < 0)
                return;
            in_data = 0;
            c->loop.st->bytes_zero += end - i;
        }
        i = end;
    }
    if (in_data && !c->local_error)
        write_local(c, s->buf + run, len - run, offset + run);
}

/* Runs inside nbd_poll on the calling thread: the local write happens here. */
static int read_done(void *user_data, int *error)
{
    struct bm_ep_slot *s = user_data;
    struct call *c = call_of(s->loop);
    if (*error && !c->error) {
        c->error = *error;
        c->error_offset = s->offset;
    } else if (!*error && !c->error) {
        c->loop.st->bytes_read += s->len;
        if (!c->local_error)
            land(c, s);
    }
    bm_ep_loop_release(s->loop, s);
    return 1;
}

/* [OFFSET, END) of the export, a request per free slot, block-aligned. */
static int read_range(struct call *c, uint64_t offset, uint64_t end)
{
    struct bm_ep_loop *loop = &c->loop;
    uint64_t step = loop->slot_bytes < c->h->max_request ? loop->slot_bytes : c->h->max_request;
    while (offset < end) {
        struct bm_ep_slot *s = bm_ep_loop_free_slot(loop);
        if (!s)
            return -1;
        uint64_t stop = end;
        if (end - offset > step) {
            stop = (offset + step) / loop->block * loop->block;
            if (stop <= offset)
                stop = offset + step;
        }
        bm_ep_loop_pace(loop, stop - offset);
        s->offset = offset;
        s->len = stop - offset;
        nbd_completion_callback cb = {.callback = read_done, .user_data = s};
        bm_ep_loop_hold(loop, s);
        int64_t cookie = nbd_aio_pread(c->nbd, s->buf, (size_t)s->len, offset, cb, 0);
        if (issued(c, s, cookie, "read") < 0)
            return -1;
        offset = stop;
    }
    return 0;
}

int bm_nbd_read_extents(bm_nbd *h, uint32_t conn, int dst_fd, const bm_nbd_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, bm_nbd_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nbd_copy_stats *stats)
{
    if (!stats)
        return bm_ep_fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NBD_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NBD_DEFAULT_REQUEST_BYTES;
    if (!h || (count && !extents) || dst_fd < 0)
        return bm_ep_fail(EINVAL, "handle, extents and the local file must be given");
    if (block_size < BM_NBD_MIN_BLOCK || block_size > BM_NBD_MAX_BLOCK ||
        (block_size & (block_size - 1)) || request_bytes < block_size ||
        request_bytes > (1u << 30))
        return bm_ep_fail(EINVAL, "block size %u or request size %llu out of range", block_size,
                          (unsigned long long)request_bytes);
    for (uint64_t i = 0; i < count; i++)
        if (extents[i].offset > h->size || extents[i].length > h->size - extents[i].offset)
            return bm_ep_fail(EINVAL, "extent %llu+%llu is past the export's end (%llu bytes)",
                              (unsigned long long)extents[i].offset,
                              (unsigned long long)extents[i].length,
                              (unsigned long long)h->size);
    if (usable(h, conn) < 0)
        return -1;
    struct call *c = new_call(h, conn, requests, request_bytes);
    if (!c)
        return -1;
    c->local = dst_fd;
    c->export_side = BM_NBD_SIDE_SRC;
    c->verb = "read";
    bm_ep_loop_start(&c->loop, &nbd_ops, -1, 0, block_size, rate_cap, cancel, NULL, stats);
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++)
        rc = read_range(c, extents[i].offset, extents[i].offset + extents[i].length);
    rc = bm_ep_loop_drain(&c->loop, rc);
    int saved = errno;
    end_call(c);
    errno = saved;
    return rc;
}
