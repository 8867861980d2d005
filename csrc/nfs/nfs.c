/* nfs.c - the NFS endpoint: a local file's extents written into a file on
 * an NFSv3 server through libnfs's asynchronous API, many calls in flight.
 *
 * A bm_nfs handle holds up to BM_NFS_MAX_CONNS connections, each its own
 * libnfs context (TCP connection, mount, open file handle): libnfs contexts
 * are not thread-safe, so one thread drives one connection. One
 * bm_nfs_copy_extents call reads the source a request at a time into a ring
 * of slot buffers, splits each into data and zero runs, and issues raw
 * WRITE3 calls (UNSTABLE) for the data, running the connection's event loop
 * (poll + nfs_service) only when every slot has a call outstanding. cffi
 * drops the GIL around the call, so a whole batch runs without Python.
 *
 * Completion callbacks run inside nfs_service on the calling thread, so
 * counters need no atomics. Every callback's state (a request, a single
 * operation's result) lives in memory the handle frees only after its
 * contexts are destroyed: a connection that timed out is failed for good and
 * never serviced again, and whatever libnfs calls back while it is torn down
 * lands on live memory. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <nfsc/libnfs.h>
#include <nfsc/libnfs-raw.h>
#include <nfsc/libnfs-raw-nfs.h>

#include "bm_nfs.h"

#define POLL_MS 100                     /* how often a waiting call looks at CANCEL */
#define READ_DEPTH 8                    /* READ3 calls in flight in bm_nfs_pread */

/* The result of the one single operation (mount, open, commit...) a
 * connection has outstanding. */
struct op {
    int done;
    int err;                            /* errno, 0 on success */
    char msg[256];
    struct nfsfh *fh;                   /* open's result */
    uint64_t size;                      /* fstat's result */
    char verf[NFS3_WRITEVERFSIZE];      /* commit's write verifier */
};

struct call;

struct conn {
    struct nfs_context *nfs;
    struct nfsfh *fh;                   /* the open file, or NULL */
    int failed;                         /* errno it died with, 0 while usable */
    int wrote;                          /* unstable writes since the last commit */
    int have_verf;
    char verf[NFS3_WRITEVERFSIZE];      /* the server's write verifier for those writes */
    uint32_t reads;                     /* READ3 calls in flight */
    int read_error;
    struct op op;
    struct call *call;                  /* the last copy call's state, reused */
};

struct bm_nfs {
    uint32_t nconns;
    struct conn conn[BM_NFS_MAX_CONNS];
    uint32_t timeout_ms;
    char *file;                         /* the URL's file, "/name" under the export */
    uint64_t write_max, read_max;
};

/* One buffer and the WRITE3 calls still reading it. */
struct slot {
    char *buf;
    uint32_t pending;
};

/* The state of one bm_nfs_copy_extents call. */
struct call {
    bm_nfs *h;
    struct conn *k;
    int src;
    uint32_t flags, block, nslots;
    uint64_t slot_bytes, write_bytes;
    struct slot *slots;
    char *zeros;                        /* write_bytes of zeros, for zero runs not skipped */
    uint32_t in_flight;
    int draining;                       /* waiting for the last replies: CANCEL no longer
                                         * cuts a wait short, the timeout still does */
    int error;                          /* the first failed call's errno */
    uint64_t error_offset;
    char error_msg[160];
    uint64_t zero_start, zero_end;      /* pending zero run */
    bm_nfs_rate_cap *rate_cap;
    const uint32_t *cancel;
    bm_nfs_copy_stats *st;
    bm_nfs_digest_sink *sink;           /* NULL: no digests asked for */
    uint64_t slot_base;                 /* the current extent's first sink slot */
    uint64_t slot_granule;              /* ... and the granule it stands for */
};

/* One WRITE3 or READ3 in flight. */
struct request {
    struct call *call;                  /* writes */
    struct slot *slot;
    struct conn *k;                     /* reads */
    char *buf;
    uint64_t offset;
    uint32_t len;
};

static __thread char last_error[512];

const char *bm_nfs_last_error(void)
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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t deadline_after(uint32_t timeout_ms)
{
    return timeout_ms ? now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
}

/* The errno an NFSv3 status stands for (most share the number). */
static int errno_of(nfsstat3 status)
{
    switch (status) {
    case NFS3ERR_PERM: return EPERM;
    case NFS3ERR_NOENT: return ENOENT;
    case NFS3ERR_NXIO: return ENXIO;
    case NFS3ERR_ACCES: return EACCES;
    case NFS3ERR_EXIST: return EEXIST;
    case NFS3ERR_XDEV: return EXDEV;
    case NFS3ERR_NODEV: return ENODEV;
    case NFS3ERR_NOTDIR: return ENOTDIR;
    case NFS3ERR_ISDIR: return EISDIR;
    case NFS3ERR_INVAL: return EINVAL;
    case NFS3ERR_FBIG: return EFBIG;
    case NFS3ERR_NOSPC: return ENOSPC;
    case NFS3ERR_ROFS: return EROFS;
    case NFS3ERR_NAMETOOLONG: return ENAMETOOLONG;
    case NFS3ERR_DQUOT: return EDQUOT;
    case NFS3ERR_STALE:
    case NFS3ERR_BADHANDLE: return ESTALE;
    case NFS3ERR_NOTSUPP: return EOPNOTSUPP;
    case NFS3ERR_JUKEBOX: return EAGAIN;
    default: return EIO;
    }
}

/* The errno of an RPC that got no NFS reply. */
static int errno_of_rpc(int status)
{
    return status == RPC_STATUS_TIMEOUT ? ETIMEDOUT : status == RPC_STATUS_CANCEL ? ECANCELED
                                                                                  : EIO;
}

/* What nfs_get_fh points at. libnfs 4.0 declares the struct but keeps its
 * body in a private header; this is its layout there (unchanged since
 * libnfs 1.x). bm_nfs_open_file checks each handle's length. */
struct libnfs_fh {
    int len;
    char *val;
};

static const struct libnfs_fh *fh_of(struct conn *k)
{
    return (const struct libnfs_fh *)(const void *)nfs_get_fh(k->fh);
}

static struct nfs_fh3 fh3_of(struct conn *k)
{
    const struct libnfs_fh *fh = fh_of(k);
    struct nfs_fh3 out = {.data = {.data_len = (u_int)fh->len, .data_val = fh->val}};
    return out;
}

/* ---------------------------------------------------------------------- */
/* The event loop                                                          */

/* Connection K is gone or hung: fail it for good (it is never serviced again). */
static int lose(struct conn *k, int err, const char *what)
{
    k->failed = err;
    return fail(err, "%s", what);
}

/* One round of K's event loop: wait up to WAIT_MS for its socket, then let
 * libnfs read, write and call back. 1 if the server sent something (only
 * that counts as an answer: a socket that takes more output says nothing
 * about a server that stopped replying), 0 if not. */
static int pump_for(struct conn *k, int wait_ms)
{
    struct pollfd p = {.fd = nfs_get_fd(k->nfs), .events = (short)nfs_which_events(k->nfs)};
    int r = poll(&p, 1, wait_ms);
    if (r < 0 && errno != EINTR)
        return lose(k, errno, "poll on the NFS connection failed");
    if (nfs_service(k->nfs, r > 0 ? p.revents : 0) < 0) {
        char why[400];
        snprintf(why, sizeof why, "the NFS connection failed: %s", nfs_get_error(k->nfs));
        return lose(k, EIO, why);
    }
    return r > 0 && (p.revents & POLLIN);
}

static int pump(struct conn *k)
{
    return pump_for(k, POLL_MS);
}

static int usable(bm_nfs *h, uint32_t conn)
{
    if (!h || conn >= h->nconns)
        return fail(EINVAL, "no connection %u", conn);
    if (h->conn[conn].failed)
        return fail(h->conn[conn].failed, "the NFS connection failed earlier: %s",
                    strerror(h->conn[conn].failed));
    return 0;
}

/* Run K's loop until *DONE, no longer than the handle's timeout without a
 * socket event. */
static int wait_done(bm_nfs *h, struct conn *k, const int *done, const char *what)
{
    uint64_t deadline = deadline_after(h->timeout_ms);
    while (!*done) {
        int r = pump(k);
        if (r < 0)
            return -1;
        if (r > 0)
            deadline = deadline_after(h->timeout_ms);
        else if (deadline && now_ns() > deadline) {
            char why[200];
            snprintf(why, sizeof why, "%s: no answer from the NFS server in %u ms", what,
                     h->timeout_ms);
            return lose(k, ETIMEDOUT, why);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Single operations: one at a time per connection, result in k->op        */

static void op_done(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct op *op = private_data;
    (void)nfs;
    op->done = 1;
    if (err < 0) {
        op->err = -err;
        snprintf(op->msg, sizeof op->msg, "%s", data ? (const char *)data : strerror(-err));
    }
}

static void open_done(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    op_done(err, nfs, data, private_data);
    if (err >= 0)
        ((struct op *)private_data)->fh = data;
}

static void stat_done(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    op_done(err, nfs, data, private_data);
    if (err >= 0)
        ((struct op *)private_data)->size = ((struct nfs_stat_64 *)data)->nfs_size;
}

static void statvfs_done(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    op_done(err, nfs, data, private_data);
    if (err >= 0) {
        const struct nfs_statvfs_64 *v = data;
        ((struct op *)private_data)->size = v->f_bavail * (v->f_frsize ? v->f_frsize
                                                                       : v->f_bsize);
    }
}

static struct op *new_op(struct conn *k)
{
    memset(&k->op, 0, sizeof k->op);
    return &k->op;
}

/* Wait for the operation just queued (QUEUED: its _async call's result). */
static int finish_op(bm_nfs *h, struct conn *k, int queued, const char *what)
{
    if (queued < 0)
        return fail(EIO, "%s: %s", what, nfs_get_error(k->nfs));
    if (wait_done(h, k, &k->op.done, what) < 0)
        return -1;
    if (k->op.err)
        return fail(k->op.err, "%s: %s", what, k->op.msg);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* The handle                                                              */

static int mount_one(bm_nfs *h, struct conn *k, const char *url)
{
    k->nfs = nfs_init_context();
    if (!k->nfs)
        return fail(ENOMEM, "cannot make an NFS context");
    nfs_set_autoreconnect(k->nfs, 0); /* a dead server is an error, not a retry loop */
    struct nfs_url *u = nfs_parse_url_full(k->nfs, url);
    if (!u)
        return fail(EINVAL, "not an NFS URL libnfs takes: %s", nfs_get_error(k->nfs));
    (void)nfs_set_version(k->nfs, NFS_V3);
    if (!h->file && !(h->file = strdup(u->file))) {
        nfs_destroy_url(u);
        return fail(ENOMEM, "out of memory");
    }
    char what[300];
    snprintf(what, sizeof what, "mount %s", u->path);
    int queued = nfs_mount_async(k->nfs, u->server, u->path, op_done, new_op(k));
    int rc = finish_op(h, k, queued, what);
    nfs_destroy_url(u);
    return rc;
}

bm_nfs *bm_nfs_mount(const char *url, uint32_t conns, uint32_t timeout_ms)
{
    if (!url || conns == 0 || conns > BM_NFS_MAX_CONNS) {
        fail(EINVAL, "need a URL and 1 to %d connections", BM_NFS_MAX_CONNS);
        return NULL;
    }
    bm_nfs *h = calloc(1, sizeof *h);
    if (!h) {
        fail(ENOMEM, "out of memory");
        return NULL;
    }
    h->timeout_ms = timeout_ms;
    for (uint32_t i = 0; i < conns; i++) {
        h->nconns = i + 1;
        if (mount_one(h, &h->conn[i], url) < 0) {
            int err = errno;
            char reason[sizeof last_error];
            memcpy(reason, last_error, sizeof reason);
            bm_nfs_close(h);
            memcpy(last_error, reason, sizeof reason);
            errno = err;
            return NULL;
        }
    }
    h->write_max = nfs_get_writemax(h->conn[0].nfs);
    h->read_max = nfs_get_readmax(h->conn[0].nfs);
    if (h->write_max == 0 || h->write_max > (1u << 24))
        h->write_max = 1u << 20;
    if (h->read_max == 0 || h->read_max > (1u << 24))
        h->read_max = 1u << 20;
    return h;
}

static void free_call(struct call *c);

void bm_nfs_close(bm_nfs *h)
{
    if (!h)
        return;
    for (uint32_t i = 0; i < h->nconns; i++) {
        struct conn *k = &h->conn[i];
        if (k->nfs) {
            if (k->fh && !k->failed)
                (void)nfs_close(k->nfs, k->fh);
            nfs_destroy_context(k->nfs); /* may call back into k->call: freed after */
        }
        free_call(k->call);
    }
    free(h->file);
    free(h);
}

const char *bm_nfs_url_file(const bm_nfs *h)
{
    return h->file ? h->file : "";
}

uint32_t bm_nfs_connections(const bm_nfs *h)
{
    return h->nconns;
}

uint64_t bm_nfs_write_max(const bm_nfs *h)
{
    return h->write_max;
}

int bm_nfs_close_file(bm_nfs *h)
{
    int rc = 0, err = 0;
    char reason[sizeof last_error] = "";
    for (uint32_t i = 0; i < h->nconns; i++) {
        struct conn *k = &h->conn[i];
        if (!k->fh)
            continue;
        struct nfsfh *fh = k->fh;
        k->fh = NULL;
        if (k->failed)
            continue; /* libnfs frees it with the context */
        if (finish_op(h, k, nfs_close_async(k->nfs, fh, op_done, new_op(k)), "close") < 0 &&
            rc == 0) {
            rc = -1;
            err = errno;
            memcpy(reason, last_error, sizeof reason);
        }
    }
    if (rc < 0) {
        memcpy(last_error, reason, sizeof reason);
        errno = err;
    }
    return rc;
}

int bm_nfs_open_file(bm_nfs *h, const char *path, uint32_t flags, uint32_t mode)
{
    if (!h || !path || (flags != BM_NFS_READ && flags != BM_NFS_CREATE &&
                        flags != BM_NFS_UPDATE))
        return fail(EINVAL, "bad arguments to bm_nfs_open_file");
    if (h->conn[0].fh)
        return fail(EBUSY, "a file is open already");
    for (uint32_t i = 0; i < h->nconns; i++) {
        struct conn *k = &h->conn[i];
        if (usable(h, i) < 0)
            goto undo;
        int how = flags == BM_NFS_READ ? O_RDONLY
                  : flags == BM_NFS_CREATE && i == 0 ? O_CREAT | O_TRUNC | O_RDWR : O_RDWR;
        int queued = nfs_open2_async(k->nfs, path, how, (int)mode, open_done, new_op(k));
        if (finish_op(h, k, queued, "open") < 0)
            goto undo;
        k->fh = k->op.fh;
        k->wrote = k->have_verf = 0;
        const struct libnfs_fh *fh = fh_of(k);
        if (!fh || fh->len <= 0 || fh->len > NFS3_FHSIZE || !fh->val) {
            fail(EPROTO, "open: libnfs gave a file handle this build cannot read");
            goto undo;
        }
    }
    return 0;
undo: {
        int err = errno;
        char reason[sizeof last_error];
        memcpy(reason, last_error, sizeof reason);
        (void)bm_nfs_close_file(h);
        memcpy(last_error, reason, sizeof reason);
        errno = err;
        return -1;
    }
}

static int have_file(bm_nfs *h)
{
    if (usable(h, 0) < 0)
        return -1;
    return h->conn[0].fh ? 0 : fail(EBADF, "no file is open");
}

int64_t bm_nfs_size(bm_nfs *h)
{
    if (have_file(h) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    if (finish_op(h, k, nfs_fstat64_async(k->nfs, k->fh, stat_done, new_op(k)), "stat") < 0)
        return -1;
    return (int64_t)k->op.size;
}

int bm_nfs_truncate(bm_nfs *h, uint64_t size)
{
    if (have_file(h) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    return finish_op(h, k, nfs_ftruncate_async(k->nfs, k->fh, size, op_done, new_op(k)),
                     "truncate");
}

int64_t bm_nfs_free_bytes(bm_nfs *h, const char *path)
{
    if (usable(h, 0) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    if (finish_op(h, k, nfs_statvfs64_async(k->nfs, path, statvfs_done, new_op(k)),
                  "statvfs") < 0)
        return -1;
    return k->op.size > INT64_MAX ? INT64_MAX : (int64_t)k->op.size;
}

int bm_nfs_rename(bm_nfs *h, const char *from, const char *to)
{
    if (usable(h, 0) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    return finish_op(h, k, nfs_rename_async(k->nfs, from, to, op_done, new_op(k)), "rename");
}

int bm_nfs_unlink(bm_nfs *h, const char *path)
{
    if (usable(h, 0) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    return finish_op(h, k, nfs_unlink_async(k->nfs, path, op_done, new_op(k)), "remove");
}

/* ---------------------------------------------------------------------- */
/* COMMIT                                                                  */

static void commit_done(struct rpc_context *rpc, int status, void *data, void *private_data)
{
    struct op *op = private_data;
    (void)rpc;
    op->done = 1;
    if (status != RPC_STATUS_SUCCESS) {
        op->err = errno_of_rpc(status);
        snprintf(op->msg, sizeof op->msg, "%s", data && status == RPC_STATUS_ERROR
                 ? (const char *)data : strerror(op->err));
        return;
    }
    COMMIT3res *res = data;
    if (res->status != NFS3_OK) {
        op->err = errno_of(res->status);
        snprintf(op->msg, sizeof op->msg, "the server said %s", strerror(op->err));
        return;
    }
    memcpy(op->verf, res->COMMIT3res_u.resok.verf, sizeof op->verf);
}

int bm_nfs_commit(bm_nfs *h)
{
    if (have_file(h) < 0)
        return -1;
    for (uint32_t i = 0; i < h->nconns; i++) {
        struct conn *k = &h->conn[i];
        if (!k->wrote)
            continue;
        if (usable(h, i) < 0)
            return -1;
        struct nfs_fh3 fh = fh3_of(k);
        COMMIT3args args = {.file = fh, .offset = 0, .count = 0};
        int queued = rpc_nfs3_commit_async(nfs_get_rpc_context(k->nfs), commit_done, &args,
                                           new_op(k));
        if (finish_op(h, k, queued, "commit") < 0)
            return -1;
        if (k->have_verf && memcmp(k->op.verf, k->verf, sizeof k->verf) != 0)
            return fail(EIO, "commit: the NFS server restarted since the data was written "
                        "(its write verifier changed): writes may have been lost");
        k->wrote = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* READ                                                                    */

static int issue_read(struct request *r);

static void read_done(struct rpc_context *rpc, int status, void *data, void *private_data)
{
    struct request *r = private_data;
    struct conn *k = r->k;
    (void)rpc;
    int err = status != RPC_STATUS_SUCCESS ? errno_of_rpc(status) : 0;
    if (!err) {
        READ3res *res = data;
        if (res->status != NFS3_OK) {
            err = errno_of(res->status);
        } else {
            READ3resok *ok = &res->READ3res_u.resok;
            uint32_t n = ok->count < r->len ? ok->count : r->len;
            memcpy(r->buf, ok->data.data_val, n);
            if (n < r->len && ok->eof) {
                memset(r->buf + n, 0, r->len - n); /* past the end: zeros */
            } else if (n < r->len && n > 0) {
                r->buf += n;
                r->offset += n;
                r->len -= n;
                if (issue_read(r) == 0)
                    return; /* the rest is on its way */
                err = EIO;
            } else if (n < r->len) {
                err = EIO;
            }
        }
    }
    if (err && !k->read_error)
        k->read_error = err;
    k->reads--;
    free(r);
}

static int issue_read(struct request *r)
{
    struct nfs_fh3 fh = fh3_of(r->k);
    READ3args args = {.file = fh, .offset = r->offset, .count = r->len};
    return rpc_nfs3_read_async(nfs_get_rpc_context(r->k->nfs), read_done, &args, r);
}

/* Wait until fewer than MOST reads are in flight on K. */
static int wait_reads(bm_nfs *h, struct conn *k, uint32_t most)
{
    uint64_t deadline = deadline_after(h->timeout_ms);
    while (k->reads >= most && k->reads > 0) {
        int r = pump(k);
        if (r < 0)
            return -1;
        if (r > 0)
            deadline = deadline_after(h->timeout_ms);
        else if (deadline && now_ns() > deadline)
            return lose(k, ETIMEDOUT, "read: no answer from the NFS server in time");
    }
    return 0;
}

int bm_nfs_pread(bm_nfs *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0)
        return -1;
    struct conn *k = &h->conn[conn];
    if (!k->fh)
        return fail(EBADF, "no file is open");
    k->read_error = 0;
    for (uint64_t done = 0; done < len;) {
        if (wait_reads(h, k, READ_DEPTH) < 0)
            return -1;
        struct request *r = calloc(1, sizeof *r);
        if (!r)
            return fail(ENOMEM, "out of memory");
        uint64_t n = len - done < h->read_max ? len - done : h->read_max;
        *r = (struct request){.k = k, .buf = buf + done, .offset = offset + done,
                              .len = (uint32_t)n};
        if (issue_read(r) < 0) {
            free(r);
            return lose(k, EIO, "read: libnfs could not queue the call");
        }
        k->reads++;
        done += n;
    }
    if (wait_reads(h, k, 1) < 0)
        return -1;
    if (k->read_error)
        return fail(k->read_error, "read near offset %llu failed: %s",
                    (unsigned long long)offset, strerror(k->read_error));
    return 0;
}

/* ---------------------------------------------------------------------- */
/* WRITE                                                                   */

static int issue_write(struct request *r);

/* Note the first failure of the call (the one the caller hears of). */
static void call_error(struct call *c, int err, uint64_t offset, const char *msg)
{
    if (c->error)
        return;
    c->error = err;
    c->error_offset = offset;
    snprintf(c->error_msg, sizeof c->error_msg, "%s", msg ? msg : strerror(err));
}

/* The reply's write verifier must be the one the connection's earlier
 * unstable writes got: another means the server restarted and may have
 * dropped them. */
static int same_server_boot(struct conn *k, const char *verf)
{
    if (!k->have_verf) {
        memcpy(k->verf, verf, sizeof k->verf);
        k->have_verf = 1;
        return 1;
    }
    return memcmp(k->verf, verf, sizeof k->verf) == 0;
}

static void write_done(struct rpc_context *rpc, int status, void *data, void *private_data)
{
    struct request *r = private_data;
    struct call *c = r->call;
    (void)rpc;
    if (status != RPC_STATUS_SUCCESS) {
        call_error(c, errno_of_rpc(status), r->offset,
                   status == RPC_STATUS_ERROR && data ? (const char *)data : NULL);
    } else {
        WRITE3res *res = data;
        WRITE3resok *ok = &res->WRITE3res_u.resok;
        if (res->status != NFS3_OK) {
            call_error(c, errno_of(res->status), r->offset, NULL);
        } else if (!same_server_boot(c->k, ok->verf)) {
            call_error(c, EIO, r->offset, "the NFS server restarted during the copy");
        } else if (ok->count < r->len && ok->count > 0) { /* short: send the rest */
            r->buf += ok->count;
            r->offset += ok->count;
            r->len -= ok->count;
            if (issue_write(r) == 0)
                return;
            call_error(c, EIO, r->offset, "libnfs could not queue a write");
        } else if (ok->count < r->len) {
            call_error(c, EIO, r->offset, "the server wrote nothing");
        }
    }
    r->slot->pending--;
    c->in_flight--;
    free(r);
}

static int issue_write(struct request *r)
{
    struct nfs_fh3 fh = fh3_of(r->call->k);
    WRITE3args args = {.file = fh, .offset = r->offset, .count = r->len, .stable = UNSTABLE,
                       .data = {.data_len = r->len, .data_val = r->buf}};
    return rpc_nfs3_write_async(nfs_get_rpc_context(r->call->k->nfs), write_done, &args, r);
}

/* Wait in the event loop until a call completes (or the timeout). */
static int wait_some(struct call *c)
{
    uint64_t deadline = deadline_after(c->h->timeout_ms);
    uint32_t before = c->in_flight;
    while (c->in_flight == before && c->in_flight > 0) {
        int r = pump(c->k);
        if (r < 0) {
            c->st->error_side = BM_NFS_SIDE_DST;
            return -1;
        }
        if (r > 0)
            deadline = deadline_after(c->h->timeout_ms);
        else if (deadline && now_ns() > deadline) {
            c->st->error_side = BM_NFS_SIDE_DST;
            return lose(c->k, ETIMEDOUT, "no reply from the NFS server in time");
        }
        if (!c->draining && c->cancel && __atomic_load_n(c->cancel, __ATOMIC_ACQUIRE))
            return 0; /* the caller sees it in check_errors */
    }
    return 0;
}

static int check_errors(struct call *c)
{
    if (c->error) {
        c->st->error_side = BM_NFS_SIDE_DST;
        return fail(c->error, "NFS write near offset %llu failed: %s",
                    (unsigned long long)c->error_offset, c->error_msg);
    }
    if (c->cancel && __atomic_load_n(c->cancel, __ATOMIC_ACQUIRE))
        return fail(ECANCELED, "copy cancelled");
    return 0;
}

/* A slot with nothing outstanding; waits for one if all are busy. First,
 * without waiting, let libnfs send what is queued and take the replies that
 * are in: libnfs writes to the socket only from nfs_service, so the wire
 * would idle while the next slot is read. */
static struct slot *free_slot(struct call *c)
{
    for (;;) {
        if (pump_for(c->k, 0) < 0) {
            c->st->error_side = BM_NFS_SIDE_DST;
            return NULL;
        }
        if (check_errors(c) < 0)
            return NULL;
        for (uint32_t i = 0; i < c->nslots; i++)
            if (c->slots[i].pending == 0)
                return &c->slots[i];
        if (wait_some(c) < 0)
            return NULL;
    }
}

/* Write LEN bytes of BUF (held by slot S until answered) at OFFSET. */
static int send_write(struct call *c, struct slot *s, char *buf, uint64_t len, uint64_t offset)
{
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < c->write_bytes ? len - done : c->write_bytes;
        struct request *r = malloc(sizeof *r);
        if (!r)
            return fail(ENOMEM, "out of memory");
        *r = (struct request){.call = c, .slot = s, .buf = buf + done, .offset = offset + done,
                              .len = (uint32_t)n};
        if (issue_write(r) < 0) {
            free(r);
            c->st->error_side = BM_NFS_SIDE_DST;
            return lose(c->k, EIO, "write: libnfs could not queue the call");
        }
        s->pending++;
        c->in_flight++;
        c->k->wrote = 1;
        c->st->requests++;
        if (c->in_flight > c->st->max_in_flight)
            c->st->max_in_flight = c->in_flight;
        done += n;
    }
    return 0;
}

/* Make [OFFSET, OFFSET+LEN) read as zeros by writing zeros (NFSv3 has no
 * punch); a slot's pending count bounds them like data. */
static int send_zeros(struct call *c, uint64_t offset, uint64_t len)
{
    for (uint64_t done = 0; done < len;) {
        uint64_t n = len - done < c->write_bytes ? len - done : c->write_bytes;
        struct slot *s = free_slot(c);
        if (!s || send_write(c, s, c->zeros, n, offset + done) < 0)
            return -1;
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
    if (len == 0 || (c->flags & BM_NFS_DST_FRESH))
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
    return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, (size_t)(len - 1)) == 0);
}

/* Slot S holds LEN source bytes of OFFSET: data runs out, zero runs noted. */
static int scatter(struct call *c, struct slot *s, uint64_t len, uint64_t offset)
{
    uint64_t bs = c->block, run = 0;
    int run_zero = -1;
    for (uint64_t i = 0;;) {
        uint64_t end = ((offset + i) / bs + 1) * bs - offset;
        end = end > len ? len : end;
        int zero = i < len ? is_zero(s->buf + i, end - i) : -2;
        if (zero != run_zero) {
            if (run_zero == 1) {
                c->st->bytes_zero += i - run;
                if (add_zeros(c, offset + run, i - run) < 0)
                    return -1;
            } else if (run_zero == 0) {
                if (flush_zero_run(c) < 0 ||
                    send_write(c, s, s->buf + run, i - run, offset + run) < 0)
                    return -1;
                c->st->bytes_written += i - run;
            }
            run = i;
            run_zero = zero;
        }
        if (i == len)
            return 0;
        i = end;
    }
}

static void pace(struct call *c, uint64_t len)
{
    bm_nfs_rate_cap *cap = c->rate_cap;
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
            c->st->error_side = BM_NFS_SIDE_SRC;
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
    bm_nfs_digest_sink *k = c->sink;
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
        if (d < 0 && errno != ENXIO && errno != EINVAL && errno != EOPNOTSUPP) {
            c->st->error_side = BM_NFS_SIDE_SRC;
            return fail(errno, "SEEK_DATA at %llu failed: %s", (unsigned long long)offset,
                        strerror(errno));
        }
        uint64_t data = d < 0 ? (errno == ENXIO ? end : offset) : (uint64_t)d;
        data = data > end ? end : data;
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
        off_t hole = seek(c->src, found, SEEK_HOLE);
        uint64_t stop = (hole < 0 || (uint64_t)hole <= found || (uint64_t)hole > end)
                        ? end : (uint64_t)hole;
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

/* The connection's call state: its last one when the shape matches (it
 * has nothing in flight: a call that returns with calls outstanding leaves
 * its connection failed), else a new one. */
static struct call *new_call(bm_nfs *h, uint32_t conn, uint32_t requests, uint64_t slot_bytes,
                             uint64_t write_bytes)
{
    struct conn *k = &h->conn[conn];
    struct call *c = k->call;
    if (c && c->nslots == requests && c->slot_bytes == slot_bytes &&
        c->write_bytes == write_bytes && c->in_flight == 0) {
        struct slot *slots = c->slots;
        char *zeros = c->zeros;
        memset(c, 0, sizeof *c);
        c->slots = slots;
        c->zeros = zeros;
    } else {
        free_call(c);
        k->call = c = calloc(1, sizeof *c);
        if (!c)
            return NULL;
        c->slots = calloc(requests, sizeof *c->slots);
        c->zeros = calloc(1, (size_t)write_bytes);
        int ok = c->slots && c->zeros;
        for (uint32_t i = 0; ok && i < requests; i++)
            ok = (c->slots[i].buf = malloc((size_t)slot_bytes)) != NULL;
        c->nslots = requests; /* before any early return: free_call walks the slots */
        if (!ok) {
            free_call(c);
            k->call = NULL;
            return NULL;
        }
    }
    c->h = h;
    c->k = k;
    c->nslots = requests;
    c->slot_bytes = slot_bytes;
    c->write_bytes = write_bytes;
    for (uint32_t i = 0; i < requests; i++)
        c->slots[i].pending = 0;
    return c;
}

/* Wait until nothing is in flight; the first failure wins. */
static int drain(struct call *c, int rc)
{
    int saved = errno;
    char reason[sizeof last_error];
    memcpy(reason, last_error, sizeof reason);
    c->draining = 1;
    while (c->in_flight > 0 && !c->k->failed)
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
    return check_errors(c);
}

static int check_args(bm_nfs *h, uint32_t conn, const bm_nfs_extent *extents, uint64_t count,
                      uint32_t block_size, uint64_t request_bytes, uint32_t flags)
{
    if (!h || (count && !extents))
        return fail(EINVAL, "handle and extents must not be NULL");
    if (block_size < BM_NFS_MIN_BLOCK || block_size > BM_NFS_MAX_BLOCK ||
        (block_size & (block_size - 1)))
        return fail(EINVAL, "block size %u is not a power of two between %u and %u",
                    block_size, BM_NFS_MIN_BLOCK, BM_NFS_MAX_BLOCK);
    if (request_bytes < block_size || request_bytes > (1u << 30))
        return fail(EINVAL, "request size %llu is below the block size or above 1 GiB",
                    (unsigned long long)request_bytes);
    if (flags & ~(uint32_t)BM_NFS_DST_FRESH)
        return fail(EINVAL, "unknown copy flags %#x", flags);
    if (usable(h, conn) < 0)
        return -1;
    return h->conn[conn].fh ? 0 : fail(EBADF, "no file is open");
}

/* The sink slots extent [OFFSET, OFFSET+LEN) takes: one per granule it touches. */
static uint64_t slots_of(uint64_t g, uint64_t offset, uint64_t len)
{
    return len ? (offset + len + g - 1) / g - offset / g : 0;
}

static int check_sink(const bm_nfs_digest_sink *sink, const bm_nfs_extent *extents,
                      uint64_t count, uint64_t request_bytes)
{
    if (!sink)
        return 0;
    uint64_t g = sink->granularity;
    if (!sink->hash || g < BM_NFS_MIN_BLOCK || (g & (g - 1)) || request_bytes % g)
        return fail(EINVAL, "digest sink needs a hash function and a power-of-two "
                            "granularity of at least %u dividing the request size %llu",
                    BM_NFS_MIN_BLOCK, (unsigned long long)request_bytes);
    uint64_t need = 0;
    for (uint64_t i = 0; i < count; i++)
        need += slots_of(g, extents[i].offset, extents[i].length);
    if (need > sink->count || (need && !sink->digests))
        return fail(EINVAL, "digest sink has %llu slots, the extents need %llu",
                    (unsigned long long)sink->count, (unsigned long long)need);
    return 0;
}

int bm_nfs_copy_extents(bm_nfs *h, uint32_t conn, int src_fd, const bm_nfs_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, uint32_t flags, bm_nfs_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nfs_copy_stats *stats)
{
    return bm_nfs_copy_extents_hashed(h, conn, src_fd, extents, count, block_size, requests,
                                      request_bytes, flags, rate_cap, cancel, NULL, stats);
}

int bm_nfs_copy_extents_hashed(bm_nfs *h, uint32_t conn, int src_fd,
                               const bm_nfs_extent *extents, uint64_t count,
                               uint32_t block_size, uint32_t requests, uint64_t request_bytes,
                               uint32_t flags, bm_nfs_rate_cap *rate_cap,
                               const uint32_t *cancel, bm_nfs_digest_sink *sink,
                               bm_nfs_copy_stats *stats)
{
    if (!stats)
        return fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NFS_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NFS_DEFAULT_REQUEST_BYTES;
    if (check_args(h, conn, extents, count, block_size, request_bytes, flags) < 0 ||
        check_sink(sink, extents, count, request_bytes) < 0)
        return -1;
    uint64_t write_bytes = request_bytes < h->write_max ? request_bytes : h->write_max;
    struct call *c = new_call(h, conn, requests, request_bytes, write_bytes);
    if (!c)
        return fail(ENOMEM, "cannot allocate %u request buffers", requests);
    c->src = src_fd;
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
    return drain(c, rc);
}
