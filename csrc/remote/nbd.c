/* nbd.c - the NBD endpoint: a local file's extents written into an NBD
 * export through libnbd's asynchronous API, many requests in flight; and
 * the other way (bm_nbd_read_extents), an export's data read into a new
 * sparse local file the same way, with bm_nbd_map saying from block status
 * which ranges need reading at all.
 *
 * A bm_nbd handle holds up to BM_NBD_MAX_CONNS connections to one export
 * (several only when the server offers multi-conn, as nbdcopy does). One
 * bm_nbd_copy_extents call drives one connection from one thread: it reads
 * the source a request at a time into a ring of slot buffers, splits each
 * into data and zero runs (the zero detection of copy.c), and issues
 * NBD_CMD_WRITE for data and NBD_CMD_WRITE_ZEROES for merged zero runs,
 * waiting in nbd_poll only when every slot has a command outstanding. cffi
 * drops the GIL around the call, so Python runs one call per connection on
 * a thread pool. With a digest sink (bm_nbd_copy_extents_hashed) each whole
 * granule is hashed from its slot once the slot's writes are queued: the
 * digest is of the bytes sent, and the source is read once.
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
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "bm_remote.h"

#define ZERO_REQUEST_MAX (1ull << 30)   /* WRITE_ZEROES carries a 32-bit length */
#define POLL_MS 200                     /* how often a waiting call looks at CANCEL */

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

/* One buffer and the commands still reading it (its writes) or counted on
 * it (a zero run it was taken for). */
struct slot {
    struct call *call;
    char *buf;
    uint32_t pending;
    uint64_t offset;                    /* of the latest command, for messages */
    uint64_t len;                       /* a read's length (the read pipeline) */
};

/* The state of one bm_nbd_copy_extents call. */
struct call {
    bm_nbd *h;
    uint32_t index;
    struct nbd_handle *nbd;
    int src;                            /* the local file: read (copy) or written (read) */
    uint32_t export_side;               /* BM_NBD_SIDE_* of the export in this call */
    const char *verb;                   /* what its commands do: "write", "read" */
    uint32_t flags, block, nslots;
    uint64_t slot_bytes;
    struct slot *slots;
    char *zeros;                        /* slot_bytes of zeros, for exports without WRITE_ZEROES */
    uint32_t in_flight;
    int error;                          /* the first failed command's errno */
    uint64_t error_offset;
    int local_error;                    /* the first failed local write's errno (read) */
    uint64_t local_error_offset;
    uint64_t zero_start, zero_end;      /* pending zero run */
    bm_nbd_rate_cap *rate_cap;
    const uint32_t *cancel;
    bm_nbd_copy_stats *st;
    bm_nbd_digest_sink *sink;           /* NULL: no digests asked for */
    uint64_t slot_base;                 /* the current extent's first sink slot */
    uint64_t slot_granule;              /* ... and the granule it stands for */
};

static __thread char last_error[512];

const char *bm_nbd_last_error(void)
{
    return last_error;
}

static int fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

/* libnbd failed: keep its one-line reason and errno (EIO when it has none). */
static int fail_nbd(const char *what)
{
    int err = nbd_get_errno();
    const char *msg = nbd_get_error();
    return fail(err ? err : EIO, "%s: %s", what, msg ? msg : "NBD error");
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------------- */
/* The handle                                                              */

static uint64_t deadline_after(uint32_t timeout_ms)
{
    return timeout_ms ? now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
}

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
    uint64_t deadline = deadline_after(timeout_ms);
    if (nbd_aio_connect_uri(nbd, uri) < 0)
        return fail_nbd("connect");
    while (nbd_aio_is_connecting(nbd) == 1) {
        ack_quickly(nbd);
        int r = nbd_poll(nbd, POLL_MS);
        if (r < 0)
            return fail_nbd("connect");
        if (r == 0 && deadline && now_ns() > deadline)
            return fail(ETIMEDOUT, "connect: no answer from the NBD server in %u ms", timeout_ms);
    }
    if (nbd_aio_is_ready(nbd) != 1)
        return fail_nbd("connect");
    return 0;
}

static struct nbd_handle *connect_one(const char *uri, int write, uint32_t timeout_ms)
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
    if (connect_within(nbd, uri, timeout_ms) < 0) {
        int err = errno;
        nbd_close(nbd);
        errno = err;
        return NULL;
    }
    if (write && nbd_is_read_only(nbd) == 1) {
        nbd_close(nbd);
        fail(EROFS, "the export is read-only");
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
        fail(EINVAL, "need a URI and 1 to %d connections", BM_NBD_MAX_CONNS);
        return NULL;
    }
    bm_nbd *h = calloc(1, sizeof *h);
    if (!h) {
        fail(ENOMEM, "out of memory");
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
    while (h->nconns < want) {
        struct nbd_handle *more = connect_one(uri, write, timeout_ms);
        if (!more) {
            bm_nbd_close(h);
            return NULL;
        }
        h->conn[h->nconns++] = more;
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
        return fail(EINVAL, "no connection %u (the handle has %u)", conn, h->nconns);
    if (h->failed[conn])
        return fail(h->failed[conn], "the NBD connection failed earlier: %s",
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
    uint64_t deadline = deadline_after(h->timeout_ms);
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
        if (r == 0 && deadline && now_ns() > deadline) {
            h->failed[conn] = ETIMEDOUT;
            return fail(ETIMEDOUT, "%s: no reply from the NBD server in %u ms", what,
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

int bm_nbd_pread(bm_nbd *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0)
        return -1;
    if (offset > h->size || len > h->size - offset)
        return fail(EINVAL, "read of %llu bytes at %llu is past the export's end (%llu)",
                    (unsigned long long)len, (unsigned long long)offset,
                    (unsigned long long)h->size);
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
        return fail(EINVAL, "range %llu+%llu is past the export's end",
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
/* Commands in flight                                                      */

static int command_done(void *user_data, int *error)
{
    struct slot *s = user_data;
    struct call *c = s->call;
    if (*error && !c->error) {
        c->error = *error;
        c->error_offset = s->offset;
    }
    s->pending--;
    c->in_flight--;
    return 1; /* retire the command */
}

/* The connection is gone or hung: fail it for good. */
static int lose_connection(struct call *c, int err, const char *what)
{
    c->h->failed[c->index] = err;
    c->st->error_side = c->export_side;
    return fail(err, "%s: %s", what, strerror(err));
}

/* Wait in nbd_poll until a command completes (or the timeout, or CANCEL). */
static int wait_some(struct call *c)
{
    uint64_t deadline = deadline_after(c->h->timeout_ms);
    uint32_t before = c->in_flight;
    while (c->in_flight == before && c->in_flight > 0) {
        int r = nbd_poll(c->nbd, POLL_MS);
        if (r < 0) {
            int err = nbd_get_errno() ? nbd_get_errno() : EIO;
            c->st->error_side = c->export_side;
            fail_nbd("NBD connection");
            c->h->failed[c->index] = err;
            errno = err;
            return -1;
        }
        if (r == 0 && deadline && now_ns() > deadline)
            return lose_connection(c, ETIMEDOUT, "no reply from the NBD server in time");
    }
    return 0;
}

/* The first failure a completion recorded: a command the export failed, or
 * (reading) a write of the local copy. */
static int recorded_error(struct call *c)
{
    if (c->error) {
        c->st->error_side = c->export_side;
        return fail(c->error, "NBD %s near offset %llu failed: %s", c->verb,
                    (unsigned long long)c->error_offset, strerror(c->error));
    }
    if (c->local_error) {
        c->st->error_side = c->export_side == BM_NBD_SIDE_SRC ? BM_NBD_SIDE_DST
                                                              : BM_NBD_SIDE_SRC;
        return fail(c->local_error, "write of %llu+ to the local copy failed: %s",
                    (unsigned long long)c->local_error_offset, strerror(c->local_error));
    }
    return 0;
}

static int check_errors(struct call *c)
{
    if (recorded_error(c) < 0)
        return -1;
    if (c->cancel && __atomic_load_n(c->cancel, __ATOMIC_ACQUIRE))
        return fail(ECANCELED, "copy cancelled");
    return 0;
}

/* A slot with nothing outstanding; waits for one if all are busy. */
static struct slot *free_slot(struct call *c)
{
    for (;;) {
        if (check_errors(c) < 0)
            return NULL;
        for (uint32_t i = 0; i < c->nslots; i++)
            if (c->slots[i].pending == 0)
                return &c->slots[i];
        if (wait_some(c) < 0)
            return NULL;
    }
}

/* Count a command issued on S (or, COOKIE < 0, one libnbd refused). */
static int issued(struct call *c, struct slot *s, int64_t cookie, const char *what)
{
    if (cookie < 0) {
        s->pending--;
        c->in_flight--;
        c->st->error_side = c->export_side;
        int err = nbd_get_errno() ? nbd_get_errno() : EIO;
        if (nbd_aio_is_dead(c->nbd) == 1)
            c->h->failed[c->index] = err;
        return fail_nbd(what);
    }
    c->st->requests++;
    if (c->in_flight > c->st->max_in_flight)
        c->st->max_in_flight = c->in_flight;
    return 0;
}

static int send_write(struct call *c, struct slot *s, const char *buf, uint64_t len,
                      uint64_t offset)
{
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < c->h->max_request ? len - done : c->h->max_request;
        nbd_completion_callback cb = {.callback = command_done, .user_data = s};
        s->pending++;
        c->in_flight++;
        s->offset = offset + done;
        int64_t cookie = nbd_aio_pwrite(c->nbd, buf + done, (size_t)n, offset + done, cb, 0);
        if (issued(c, s, cookie, "write") < 0)
            return -1;
        done += n;
    }
    return 0;
}

/* Make [OFFSET, OFFSET+LEN) of the export read as zeros. */
static int send_zeros(struct call *c, uint64_t offset, uint64_t len)
{
    int can_zero = (c->h->caps & BM_NBD_CAN_ZERO) != 0;
    uint64_t step = can_zero ? ZERO_REQUEST_MAX : c->slot_bytes;
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < step ? len - done : step;
        struct slot *s = free_slot(c);
        if (!s)
            return -1;
        if (!can_zero) {
            if (send_write(c, s, c->zeros, n, offset + done) < 0)
                return -1;
        } else {
            nbd_completion_callback cb = {.callback = command_done, .user_data = s};
            s->pending++;
            c->in_flight++;
            s->offset = offset + done;
            if (issued(c, s, nbd_aio_zero(c->nbd, n, offset + done, cb, 0), "write zeroes") < 0)
                return -1;
        }
        c->st->bytes_punched += n;
        done += n;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Reading the source                                                      */

static int flush_zero_run(struct call *c)
{
    uint64_t offset = c->zero_start, len = c->zero_end - c->zero_start;
    c->zero_start = c->zero_end = 0;
    if (len == 0 || (c->flags & BM_NBD_DST_FRESH))
        return 0;
    return send_zeros(c, offset, len);
}

static int add_zeros(struct call *c, uint64_t offset, uint64_t len)
{
    if (len == 0)
        return 0;
    if (c->zero_end != c->zero_start && c->zero_end == offset) {
        c->zero_end += len;
        return 0;
    }
    if (flush_zero_run(c) < 0)
        return -1;
    c->zero_start = offset;
    c->zero_end = offset + len;
    return 0;
}

static int is_zero(const char *buf, uint64_t len)
{
    if (len == 0)
        return 1;
    if (buf[0])
        return 0;
    return memcmp(buf, buf + 1, (size_t)(len - 1)) == 0;
}

/* Slot S holds LEN source bytes of OFFSET: data runs out, zero runs noted. */
static int scatter(struct call *c, struct slot *s, uint64_t len, uint64_t offset)
{
    uint64_t bs = c->block, i = 0, run = 0;
    int run_zero = -1;
    while (i <= len) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        if (end > len)
            end = len;
        int zero = i < len ? is_zero(s->buf + i, end - i) : -2;
        if (zero != run_zero) {
            if (run_zero == 1) {
                c->st->bytes_zero += i - run;
                if (add_zeros(c, offset + run, i - run) < 0)
                    return -1;
            } else if (run_zero == 0) {
                if (flush_zero_run(c) < 0 || send_write(c, s, s->buf + run, i - run,
                                                        offset + run) < 0)
                    return -1;
                c->st->bytes_written += i - run;
            }
            run = i;
            run_zero = zero;
        }
        if (i == len)
            break;
        i = end;
    }
    return 0;
}

static void pace(struct call *c, uint64_t len)
{
    bm_nbd_rate_cap *cap = c->rate_cap;
    if (!cap || !__atomic_load_n(&cap->bytes_per_s, __ATOMIC_ACQUIRE))
        return;
    uint64_t cost = (uint64_t)((double)len * 1e9 / (double)cap->bytes_per_s);
    uint64_t now = now_ns(), next = __atomic_load_n(&cap->next_ns, __ATOMIC_ACQUIRE), start;
    do {
        start = next > now ? next : now;
    } while (!__atomic_compare_exchange_n(&cap->next_ns, &next, start + cost, 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    if (start > now) {
        struct timespec ts = {(time_t)((start - now) / 1000000000u),
                              (long)((start - now) % 1000000000u)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
}

static int64_t read_full(struct call *c, char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(c->src, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            c->st->error_side = BM_NBD_SIDE_SRC;
            return fail(errno, "read of %llu bytes at offset %llu failed: %s",
                        (unsigned long long)(len - done), (unsigned long long)(offset + done),
                        strerror(errno));
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

/* The digests of the granules wholly inside [OFFSET, OFFSET+LEN), whose
 * bytes are at BUF (NULL: they are zeros), go into the sink. Granules only
 * partly inside are left alone: this call did not see all of them. */
static void sink_granules(struct call *c, const char *buf, uint64_t offset, uint64_t len)
{
    bm_nbd_digest_sink *k = c->sink;
    if (!k || len == 0)
        return;
    uint64_t g = k->granularity;
    uint64_t first = (offset + g - 1) / g, stop = (offset + len) / g;
    for (uint64_t i = first; i < stop; i++) {
        uint64_t d = k->zero_digest;
        if (buf) {
            d = k->hash(buf + (i * g - offset), (size_t)g);
            if (d == 0) /* 0 means "unknown" to the manifest */
                d = 1;
        }
        k->digests[c->slot_base + (i - c->slot_granule)] = d;
    }
}

/* Source data [OFFSET, END): a slot at a time, whole blocks (and, hashing,
 * whole granules) per slot. */
static int copy_data(struct call *c, uint64_t offset, uint64_t end)
{
    uint64_t align = c->block;
    if (c->sink && c->sink->granularity > align)
        align = c->sink->granularity;
    while (offset < end) {
        struct slot *s = free_slot(c);
        if (!s)
            return -1;
        uint64_t stop = end;
        if (end - offset > c->slot_bytes) {
            stop = (offset + c->slot_bytes) / align * align;
            if (stop <= offset)
                stop = offset + c->slot_bytes;
        }
        pace(c, stop - offset);
        int64_t got = read_full(c, s->buf, stop - offset, offset);
        if (got < 0)
            return -1;
        c->st->bytes_read += (uint64_t)got;
        if (scatter(c, s, (uint64_t)got, offset) < 0)
            return -1;
        /* After the writes are queued (they only read the slot): the
         * digest is of exactly the bytes sent. */
        sink_granules(c, s->buf, offset, (uint64_t)got);
        if ((uint64_t)got < stop - offset) { /* the source ends here: the rest is zeros */
            c->st->bytes_hole += end - offset - (uint64_t)got;
            return add_zeros(c, offset + (uint64_t)got, end - offset - (uint64_t)got);
        }
        offset = stop;
    }
    return 0;
}

static off_t seek(int fd, uint64_t offset, int whence)
{
    off_t r;
    do {
        r = lseek(fd, (off_t)offset, whence);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* One extent: holes by SEEK_DATA/SEEK_HOLE (a filesystem without them has
 * none: everything is data), data through copy_data. */
static int copy_one(struct call *c, uint64_t offset, uint64_t end)
{
    while (offset < end) {
        off_t d = seek(c->src, offset, SEEK_DATA);
        uint64_t data = d < 0 ? (errno == ENXIO ? end : offset) : (uint64_t)d;
        if (d < 0 && errno != ENXIO && errno != EINVAL && errno != EOPNOTSUPP) {
            c->st->error_side = BM_NBD_SIDE_SRC;
            return fail(errno, "SEEK_DATA at %llu failed: %s", (unsigned long long)offset,
                        strerror(errno));
        }
        if (data > end)
            data = end;
        uint64_t found = data; /* where the data itself starts */
        if (c->sink && data < end) {
            /* Read from the granule's start, so it is hashed whole. */
            uint64_t down = data / c->sink->granularity * c->sink->granularity;
            data = down > offset ? down : offset;
        }
        if (data > offset) {
            c->st->bytes_hole += data - offset;
            if (add_zeros(c, offset, data - offset) < 0)
                return -1;
            sink_granules(c, NULL, offset, data - offset);
            offset = data;
            continue;
        }
        /* From FOUND: OFFSET may be a granule start inside the hole before it. */
        off_t h = seek(c->src, found, SEEK_HOLE);
        uint64_t stop = (h < 0 || (uint64_t)h <= found || (uint64_t)h > end) ? end : (uint64_t)h;
        if (c->sink) { /* ... and to its end */
            uint64_t g = c->sink->granularity;
            uint64_t up = stop % g ? (stop / g + 1) * g : stop;
            stop = up < end ? up : end;
        }
        if (copy_data(c, offset, stop) < 0)
            return -1;
        offset = stop;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* One call                                                                */

static void free_call(struct call *c)
{
    if (!c)
        return;
    for (uint32_t i = 0; c->slots && i < c->nslots; i++)
        free(c->slots[i].buf);
    free(c->slots);
    free(c->zeros);
    free(c);
}

/* The connection's call state: its spare when the shape matches (the spare
 * is only ever kept with nothing in flight), else a new one. */
static struct call *new_call(bm_nbd *h, uint32_t conn, uint32_t requests, uint64_t request_bytes)
{
    struct call *spare = h->spare[conn];
    h->spare[conn] = NULL;
    if (spare && spare->nslots == requests && spare->slot_bytes == request_bytes) {
        struct slot *slots = spare->slots;
        char *zeros = spare->zeros;
        memset(spare, 0, sizeof *spare);
        spare->slots = slots;
        spare->zeros = zeros;
        spare->h = h;
        spare->index = conn;
        spare->nbd = h->conn[conn];
        spare->nslots = requests;
        spare->slot_bytes = request_bytes;
        for (uint32_t i = 0; i < requests; i++)
            spare->slots[i].pending = 0;
        return spare;
    }
    free_call(spare);
    struct call *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->h = h;
    c->index = conn;
    c->nbd = h->conn[conn];
    c->nslots = requests;
    c->slot_bytes = request_bytes;
    c->slots = calloc(requests, sizeof *c->slots);
    c->zeros = (h->caps & BM_NBD_CAN_ZERO) ? NULL : calloc(1, (size_t)request_bytes);
    int ok = c->slots && (c->zeros || (h->caps & BM_NBD_CAN_ZERO));
    for (uint32_t i = 0; ok && i < requests; i++) {
        c->slots[i].call = c;
        c->slots[i].buf = malloc((size_t)request_bytes);
        ok = c->slots[i].buf != NULL;
    }
    if (ok)
        return c;
    free_call(c);
    return NULL;
}

/* Keep C as its connection's spare, unless a command may still call back
 * into it: then it is left allocated for good (see the top). */
static void end_call(struct call *c)
{
    if (c->in_flight)
        return;
    c->h->spare[c->index] = c;
}

/* Wait until nothing is in flight; the first failure wins. */
static int drain(struct call *c, int rc)
{
    int saved = errno;
    char reason[sizeof last_error];
    memcpy(reason, last_error, sizeof reason);
    while (c->in_flight > 0)
        if (wait_some(c) < 0) {
            if (rc == 0)
                return -1;
            break;
        }
    if (rc < 0) {
        memcpy(last_error, reason, sizeof reason);
        errno = saved;
        return -1;
    }
    return recorded_error(c);
}

static int check_args(bm_nbd *h, uint32_t conn, const bm_nbd_extent *extents, uint64_t count,
                      uint32_t block_size, uint64_t request_bytes, uint32_t flags)
{
    if (!h || (count && !extents))
        return fail(EINVAL, "handle and extents must not be NULL");
    if (block_size < BM_NBD_MIN_BLOCK || block_size > BM_NBD_MAX_BLOCK ||
        (block_size & (block_size - 1)))
        return fail(EINVAL, "block size %u is not a power of two between %u and %u",
                    block_size, BM_NBD_MIN_BLOCK, BM_NBD_MAX_BLOCK);
    if (request_bytes < block_size || request_bytes > (1u << 30))
        return fail(EINVAL, "request size %llu is below the block size or above 1 GiB",
                    (unsigned long long)request_bytes);
    if (flags & ~(uint32_t)BM_NBD_DST_FRESH)
        return fail(EINVAL, "unknown copy flags %#x", flags);
    if (!(h->caps & BM_NBD_CAN_WRITE))
        return fail(EROFS, "the export is read-only");
    for (uint64_t i = 0; i < count; i++)
        if (extents[i].offset > h->size || extents[i].length > h->size - extents[i].offset)
            return fail(ENOSPC, "extent %llu+%llu is past the export's end (%llu bytes)",
                        (unsigned long long)extents[i].offset,
                        (unsigned long long)extents[i].length, (unsigned long long)h->size);
    return usable(h, conn);
}

/* The sink slots extent [OFFSET, OFFSET+LEN) takes: one per granule it touches. */
static uint64_t slots_of(uint64_t g, uint64_t offset, uint64_t len)
{
    return len ? (offset + len + g - 1) / g - offset / g : 0;
}

static int check_sink(const bm_nbd_digest_sink *sink, const bm_nbd_extent *extents,
                      uint64_t count, uint64_t request_bytes)
{
    if (!sink)
        return 0;
    uint64_t g = sink->granularity;
    if (!sink->hash || g < BM_NBD_MIN_BLOCK || (g & (g - 1)) || request_bytes % g)
        return fail(EINVAL, "digest sink needs a hash function and a power-of-two "
                            "granularity of at least %u dividing the request size %llu",
                    BM_NBD_MIN_BLOCK, (unsigned long long)request_bytes);
    uint64_t need = 0;
    for (uint64_t i = 0; i < count; i++)
        need += slots_of(g, extents[i].offset, extents[i].length);
    if (need > sink->count || (need && !sink->digests))
        return fail(EINVAL, "digest sink has %llu slots, the extents need %llu",
                    (unsigned long long)sink->count, (unsigned long long)need);
    return 0;
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
        return fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NBD_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NBD_DEFAULT_REQUEST_BYTES;
    if (check_args(h, conn, extents, count, block_size, request_bytes, flags) < 0 ||
        check_sink(sink, extents, count, request_bytes) < 0)
        return -1;
    struct call *c = new_call(h, conn, requests, request_bytes);
    if (!c)
        return fail(ENOMEM, "cannot allocate %u request buffers", requests);
    c->src = src_fd;
    c->export_side = BM_NBD_SIDE_DST;
    c->verb = "write";
    c->flags = flags;
    c->block = block_size;
    c->rate_cap = rate_cap;
    c->cancel = cancel;
    c->st = stats;
    c->sink = sink;
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++) {
        if (sink)
            c->slot_granule = extents[i].offset / sink->granularity;
        rc = copy_one(c, extents[i].offset, extents[i].offset + extents[i].length);
        if (sink)
            c->slot_base += slots_of(sink->granularity, extents[i].offset, extents[i].length);
    }
    if (rc == 0)
        rc = flush_zero_run(c);
    rc = drain(c, rc);
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
        return fail(EINVAL, "handle, output and described must not be NULL");
    if (usable(h, conn) < 0)
        return -1;
    if (offset > h->size || len > h->size - offset)
        return fail(EINVAL, "range %llu+%llu is past the export's end",
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
        ssize_t n = pwrite(c->src, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            c->local_error = n < 0 ? errno : EIO;
            c->local_error_offset = offset + done;
            return -1;
        }
        done += (uint64_t)n;
    }
    c->st->bytes_written += len;
    return 0;
}

/* A read landed in S: its data blocks go to the local file; all-zero
 * blocks are left as the (fresh, sparse) file's holes. */
static void land(struct call *c, struct slot *s)
{
    uint64_t bs = c->block, len = s->len, offset = s->offset, i = 0, run = 0;
    int in_data = 0;
    while (i < len && !c->local_error) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        if (end > len)
            end = len;
        if (!is_zero(s->buf + i, end - i)) {
            if (!in_data)
                run = i;
            in_data = 1;
        } else {
            if (in_data && write_local(c, s->buf + run, i - run, offset + run) < 0)
                return;
            in_data = 0;
            c->st->bytes_zero += end - i;
        }
        i = end;
    }
    if (in_data && !c->local_error)
        write_local(c, s->buf + run, len - run, offset + run);
}

/* Runs inside nbd_poll on the calling thread: the local write happens here. */
static int read_done(void *user_data, int *error)
{
    struct slot *s = user_data;
    struct call *c = s->call;
    if (*error && !c->error) {
        c->error = *error;
        c->error_offset = s->offset;
    } else if (!*error && !c->error) {
        c->st->bytes_read += s->len;
        if (!c->local_error)
            land(c, s);
    }
    s->pending--;
    c->in_flight--;
    return 1;
}

/* [OFFSET, END) of the export, a request per free slot, block-aligned. */
static int read_range(struct call *c, uint64_t offset, uint64_t end)
{
    uint64_t step = c->slot_bytes < c->h->max_request ? c->slot_bytes : c->h->max_request;
    while (offset < end) {
        struct slot *s = free_slot(c);
        if (!s)
            return -1;
        uint64_t stop = end;
        if (end - offset > step) {
            stop = (offset + step) / c->block * c->block;
            if (stop <= offset)
                stop = offset + step;
        }
        pace(c, stop - offset);
        s->offset = offset;
        s->len = stop - offset;
        nbd_completion_callback cb = {.callback = read_done, .user_data = s};
        s->pending++;
        c->in_flight++;
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
        return fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NBD_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NBD_DEFAULT_REQUEST_BYTES;
    if (!h || (count && !extents) || dst_fd < 0)
        return fail(EINVAL, "handle, extents and the local file must be given");
    if (block_size < BM_NBD_MIN_BLOCK || block_size > BM_NBD_MAX_BLOCK ||
        (block_size & (block_size - 1)) || request_bytes < block_size ||
        request_bytes > (1u << 30))
        return fail(EINVAL, "block size %u or request size %llu out of range", block_size,
                    (unsigned long long)request_bytes);
    for (uint64_t i = 0; i < count; i++)
        if (extents[i].offset > h->size || extents[i].length > h->size - extents[i].offset)
            return fail(EINVAL, "extent %llu+%llu is past the export's end (%llu bytes)",
                        (unsigned long long)extents[i].offset,
                        (unsigned long long)extents[i].length, (unsigned long long)h->size);
    if (usable(h, conn) < 0)
        return -1;
    struct call *c = new_call(h, conn, requests, request_bytes);
    if (!c)
        return fail(ENOMEM, "cannot allocate %u request buffers", requests);
    c->src = dst_fd;
    c->export_side = BM_NBD_SIDE_SRC;
    c->verb = "read";
    c->block = block_size;
    c->rate_cap = rate_cap;
    c->cancel = cancel;
    c->st = stats;
    int rc = 0;
    for (uint64_t i = 0; i < count && rc == 0; i++)
        rc = read_range(c, extents[i].offset, extents[i].offset + extents[i].length);
    rc = drain(c, rc);
    int saved = errno;
    end_call(c);
    errno = saved;
    return rc;
}
