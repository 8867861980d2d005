/* nfs.c - the NFS endpoint: a local file's extents written into a file on
 * an NFSv3 server through libnfs's asynchronous API, many calls in flight.
 *
 * A bm_nfs handle holds up to BM_NFS_MAX_CONNS connections, each its own
 * libnfs context (TCP connection, mount, open file handle): libnfs contexts
 * are not thread-safe, so one thread drives one connection. One
 * bm_nfs_copy_extents call runs the source loop every endpoint shares
 * (csrc/endpoint/source_loop.c: the source read a request at a time into a
 * ring of slot buffers, split into data and zero runs, digests, the counts)
 * with this file's callbacks (nfs_ops): raw WRITE3 calls (UNSTABLE) for the
 * data, and the connection's event loop (poll + nfs_service) run only when
 * every slot has a call outstanding. cffi drops the GIL around the call, so
 * a whole batch runs without Python.
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
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include <nfsc/libnfs.h>
#include <nfsc/libnfs-raw.h>
#include <nfsc/libnfs-raw-nfs.h>

#include "source_loop.h" /* and bm_endpoint.h, which bm_nfs.h needs first */
#include "bm_nfs.h"

#define POLL_MS 100                     /* how often a waiting call looks at CANCEL */
#define READ_DEPTH 8                    /* READ3 calls in flight in bm_nfs_pread */

/* bm_nfs.h's constants are the shared loop's. */
_Static_assert(BM_NFS_DST_FRESH == BM_EP_DST_FRESH && BM_NFS_SIDE_SRC == BM_EP_SIDE_SRC &&
               BM_NFS_SIDE_DST == BM_EP_SIDE_DST && BM_NFS_MIN_BLOCK == BM_EP_MIN_BLOCK &&
               BM_NFS_MAX_BLOCK == BM_EP_MAX_BLOCK, "bm_nfs.h and bm_endpoint.h disagree");

struct op {
    int done;
    int err;                            /* errno, 0 on success */
    char msg[256];
    struct nfsfh *fh;                   /* open's result */
    uint64_t size;                      /* fstat's result */
    uint64_t used;                      /* ... and the bytes the server has allocated */
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
    char *read_buf;                     /* bm_nfs_read_extents' pieces, kept between calls */
    uint64_t read_buf_len;
};

struct bm_nfs {
    uint32_t nconns;
    struct conn conn[BM_NFS_MAX_CONNS];
    uint32_t timeout_ms;
    char *file;                         /* the URL's file, "/name" under the export */
    uint64_t write_max, read_max;
};

/* The state of one bm_nfs_copy_extents call: the shared loop's (its slots,
 * counts and zero run) and the NFS side's. */
struct call {
    struct bm_ep_loop loop;
    bm_nfs *h;
    struct conn *k;
    int error;                          /* the first failed call's errno */
    uint64_t error_offset;
    char error_msg[160];
};

/* One WRITE3 or READ3 in flight. */
struct request {
    struct call *call;                  /* writes */
    struct bm_ep_slot *slot;
    struct conn *k;                     /* reads */
    char *buf;
    uint64_t offset;
    uint32_t len;
};

static struct call *call_of(struct bm_ep_loop *loop)
{
    return (struct call *)(void *)((char *)loop - offsetof(struct call, loop));
}

const char *bm_nfs_last_error(void)
{
    return bm_ep_last_error();
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
    return bm_ep_fail(err, "%s", what);
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
        return bm_ep_fail(EINVAL, "no connection %u", conn);
    if (h->conn[conn].failed)
        return bm_ep_fail(h->conn[conn].failed, "the NFS connection failed earlier: %s",
                          strerror(h->conn[conn].failed));
    return 0;
}

/* Run K's loop until *DONE, no longer than the handle's timeout without a
 * socket event. */
static int wait_done(bm_nfs *h, struct conn *k, const int *done, const char *what)
{
    uint64_t deadline = bm_ep_deadline_after(h->timeout_ms);
    while (!*done) {
        int r = pump(k);
        if (r < 0)
            return -1;
        if (r > 0)
            deadline = bm_ep_deadline_after(h->timeout_ms);
        else if (deadline && bm_ep_now_ns() > deadline) {
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
    if (err >= 0) {
        const struct nfs_stat_64 *st = data;
        ((struct op *)private_data)->size = st->nfs_size;
        ((struct op *)private_data)->used = st->nfs_used;
    }
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
        return bm_ep_fail(EIO, "%s: %s", what, nfs_get_error(k->nfs));
    if (wait_done(h, k, &k->op.done, what) < 0)
        return -1;
    if (k->op.err)
        return bm_ep_fail(k->op.err, "%s: %s", what, k->op.msg);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* The handle                                                              */

/* Start mounting URL's export on K (its own context); WHAT (WHAT_LEN
 * bytes) gets the message prefix for its errors. */
static int start_mount(bm_nfs *h, struct conn *k, const char *url, char *what, size_t what_len)
{
    k->nfs = nfs_init_context();
    if (!k->nfs)
        return bm_ep_fail(ENOMEM, "cannot make an NFS context");
    nfs_set_autoreconnect(k->nfs, 0); /* a dead server is an error, not a retry loop */
    struct nfs_url *u = nfs_parse_url_full(k->nfs, url);
    if (!u)
        return bm_ep_fail(EINVAL, "not an NFS URL libnfs takes: %s", nfs_get_error(k->nfs));
    (void)nfs_set_version(k->nfs, NFS_V3);
    if (!h->file && !(h->file = strdup(u->file))) {
        nfs_destroy_url(u);
        return bm_ep_fail(ENOMEM, "out of memory");
    }
    snprintf(what, what_len, "mount %s", u->path);
    int queued = nfs_mount_async(k->nfs, u->server, u->path, op_done, new_op(k));
    nfs_destroy_url(u);
    return queued < 0 ? bm_ep_fail(EIO, "%s: %s", what, nfs_get_error(k->nfs)) : 0;
}

/* Mount on the first N connections at once: each mount is several calls in
 * a row (portmapper, mount, then the NFS service), so one poll loop over
 * them all takes one mount's round trips instead of N times as many. No
 * longer than the handle's timeout without a socket event. */
static int mount_all(bm_nfs *h, const char *url, uint32_t n)
{
    char what[300] = "mount";
    for (uint32_t i = 0; i < n; i++) {
        h->nconns = i + 1;
        if (start_mount(h, &h->conn[i], url, what, sizeof what) < 0)
            return -1;
    }
    uint64_t deadline = bm_ep_deadline_after(h->timeout_ms);
    for (;;) {
        struct pollfd fds[BM_NFS_MAX_CONNS];
        struct conn *of[BM_NFS_MAX_CONNS];
        nfds_t waiting = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct conn *k = &h->conn[i];
            if (k->op.done)
                continue;
            /* The socket changes as the mount moves from service to service. */
            fds[waiting] = (struct pollfd){.fd = nfs_get_fd(k->nfs),
                                           .events = (short)nfs_which_events(k->nfs)};
            of[waiting++] = k;
        }
        if (waiting == 0)
            break;
        int r = poll(fds, waiting, POLL_MS);
        if (r < 0 && errno != EINTR)
            return bm_ep_fail(errno, "%s: poll: %s", what, strerror(errno));
        for (nfds_t w = 0; w < waiting; w++) {
            if (nfs_service(of[w]->nfs, r > 0 ? fds[w].revents : 0) < 0) {
                char why[400];
                snprintf(why, sizeof why, "%s: %s", what, nfs_get_error(of[w]->nfs));
                return lose(of[w], EIO, why);
            }
        }
        if (r > 0)
            deadline = bm_ep_deadline_after(h->timeout_ms);
        else if (deadline && bm_ep_now_ns() > deadline)
            return bm_ep_fail(ETIMEDOUT, "%s: no answer from the NFS server in %u ms", what,
                              h->timeout_ms);
    }
    for (uint32_t i = 0; i < n; i++)
        if (h->conn[i].op.err)
            return bm_ep_fail(h->conn[i].op.err, "%s: %s", what, h->conn[i].op.msg);
    return 0;
}

bm_nfs *bm_nfs_mount(const char *url, uint32_t conns, uint32_t timeout_ms)
{
    if (!url || conns == 0 || conns > BM_NFS_MAX_CONNS) {
        bm_ep_fail(EINVAL, "need a URL and 1 to %d connections", BM_NFS_MAX_CONNS);
        return NULL;
    }
    bm_nfs *h = calloc(1, sizeof *h);
    if (!h) {
        bm_ep_fail(ENOMEM, "out of memory");
        return NULL;
    }
    h->timeout_ms = timeout_ms;
    if (mount_all(h, url, conns) < 0) {
        struct bm_ep_error why;
        bm_ep_save_error(&why);
        bm_nfs_close(h);
        bm_ep_restore_error(&why);
        return NULL;
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
        free(k->read_buf);
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
    int rc = 0;
    struct bm_ep_error first;
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
            bm_ep_save_error(&first);
        }
    }
    if (rc < 0)
        bm_ep_restore_error(&first);
    return rc;
}

int bm_nfs_open_file(bm_nfs *h, const char *path, uint32_t flags, uint32_t mode)
{
    if (!h || !path || (flags != BM_NFS_READ && flags != BM_NFS_CREATE &&
                        flags != BM_NFS_UPDATE))
        return bm_ep_fail(EINVAL, "bad arguments to bm_nfs_open_file");
    if (h->conn[0].fh)
        return bm_ep_fail(EBUSY, "a file is open already");
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
            bm_ep_fail(EPROTO, "open: libnfs gave a file handle this build cannot read");
            goto undo;
        }
    }
    return 0;
undo: {
        struct bm_ep_error why;
        bm_ep_save_error(&why);
        (void)bm_nfs_close_file(h);
        bm_ep_restore_error(&why);
        return -1;
    }
}

static int have_file(bm_nfs *h)
{
    if (usable(h, 0) < 0)
        return -1;
    return h->conn[0].fh ? 0 : bm_ep_fail(EBADF, "no file is open");
}

static int stat_file(bm_nfs *h)
{
    if (have_file(h) < 0)
        return -1;
    struct conn *k = &h->conn[0];
    return finish_op(h, k, nfs_fstat64_async(k->nfs, k->fh, stat_done, new_op(k)), "stat");
}

int64_t bm_nfs_size(bm_nfs *h)
{
    return stat_file(h) < 0 ? -1 : (int64_t)h->conn[0].op.size;
}

int64_t bm_nfs_allocated(bm_nfs *h)
{
    return stat_file(h) < 0 ? -1 : (int64_t)h->conn[0].op.used;
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

/* A raw call's callback: OP is done; 1 (with OP's error and message) if the
 * call itself failed (STATUS, DATA its message), 0 if a reply came. */
static int call_failed(struct op *op, int status, void *data)
{
    op->done = 1;
    if (status == RPC_STATUS_SUCCESS)
        return 0;
    op->err = errno_of_rpc(status);
    snprintf(op->msg, sizeof op->msg, "%s", data && status == RPC_STATUS_ERROR
             ? (const char *)data : strerror(op->err));
    return 1;
}

/* 1 (with OP's error and message) if the server's reply says NFS. */
static int server_refused(struct op *op, nfsstat3 nfs)
{
    if (nfs == NFS3_OK)
        return 0;
    op->err = errno_of(nfs);
    snprintf(op->msg, sizeof op->msg, "the server said %s", strerror(op->err));
    return 1;
}

static void commit_done(struct rpc_context *rpc, int status, void *data, void *private_data)
{
    struct op *op = private_data;
    (void)rpc;
    if (call_failed(op, status, data) || server_refused(op, ((COMMIT3res *)data)->status))
        return;
    memcpy(op->verf, ((COMMIT3res *)data)->COMMIT3res_u.resok.verf, sizeof op->verf);
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
            return bm_ep_fail(EIO, "commit: the NFS server restarted since the data was written "
                              "(its write verifier changed): writes may have been lost");
        k->wrote = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* A writer's WRITE (a TrackedImage that followed a move onto the file)    */

static int same_server_boot(struct conn *k, const char *verf);

static void pwrite_done(struct rpc_context *rpc, int status, void *data, void *private_data)
{
    struct op *op = private_data;
    (void)rpc;
    if (call_failed(op, status, data) || server_refused(op, ((WRITE3res *)data)->status))
        return;
    WRITE3resok *ok = &((WRITE3res *)data)->WRITE3res_u.resok;
    op->size = ok->count;
    memcpy(op->verf, ok->verf, sizeof op->verf);
}

int bm_nfs_pwrite(bm_nfs *h, uint32_t conn, const char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0)
        return -1;
    struct conn *k = &h->conn[conn];
    if (!k->fh)
        return bm_ep_fail(EBADF, "no file is open");
    if (!k->wrote)
        k->have_verf = 0; /* a new run of unstable writes: learn the server's verifier */
    while (len) {
        uint32_t n = len < h->write_max ? (uint32_t)len : (uint32_t)h->write_max;
        struct nfs_fh3 fh = fh3_of(k);
        WRITE3args args = {.file = fh, .offset = offset, .count = n, .stable = UNSTABLE,
                           .data = {.data_len = n, .data_val = (char *)buf}};
        int queued = rpc_nfs3_write_async(nfs_get_rpc_context(k->nfs), pwrite_done, &args,
                                          new_op(k));
        if (finish_op(h, k, queued, "write") < 0)
            return -1;
        if (!same_server_boot(k, k->op.verf))
            return bm_ep_fail(EIO, "write: the NFS server restarted since the last writes "
                              "(its write verifier changed): they may have been lost");
        k->wrote = 1;
        uint64_t done = k->op.size < n ? k->op.size : n;
        if (done == 0)
            return bm_ep_fail(EIO, "write at offset %llu: the server wrote nothing",
                              (unsigned long long)offset);
        buf += done;
        offset += done;
        len -= done;
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
    uint64_t deadline = bm_ep_deadline_after(h->timeout_ms);
    while (k->reads >= most && k->reads > 0) {
        int r = pump(k);
        if (r < 0)
            return -1;
        if (r > 0)
            deadline = bm_ep_deadline_after(h->timeout_ms);
        else if (deadline && bm_ep_now_ns() > deadline)
            return lose(k, ETIMEDOUT, "read: no answer from the NFS server in time");
    }
    return 0;
}

/* LEN bytes at OFFSET of K's open file into BUF, DEPTH READ3 calls in
 * flight; how many calls it took in *CALLS (may be NULL). */
static int read_into(bm_nfs *h, struct conn *k, char *buf, uint64_t len, uint64_t offset,
                     uint32_t depth, uint64_t *calls)
{
    k->read_error = 0;
    for (uint64_t done = 0; done < len;) {
        if (wait_reads(h, k, depth) < 0)
            return -1;
        struct request *r = calloc(1, sizeof *r);
        if (!r)
            return bm_ep_fail(ENOMEM, "out of memory");
        uint64_t n = len - done < h->read_max ? len - done : h->read_max;
        *r = (struct request){.k = k, .buf = buf + done, .offset = offset + done,
                              .len = (uint32_t)n};
        if (issue_read(r) < 0) {
            free(r);
            return lose(k, EIO, "read: libnfs could not queue the call");
        }
        k->reads++;
        if (calls)
            (*calls)++;
        done += n;
    }
    if (wait_reads(h, k, 1) < 0)
        return -1;
    if (k->read_error)
        return bm_ep_fail(k->read_error, "read near offset %llu failed: %s",
                          (unsigned long long)offset, strerror(k->read_error));
    return 0;
}

int bm_nfs_pread(bm_nfs *h, uint32_t conn, char *buf, uint64_t len, uint64_t offset)
{
    if (usable(h, conn) < 0)
        return -1;
    struct conn *k = &h->conn[conn];
    if (!k->fh)
        return bm_ep_fail(EBADF, "no file is open");
    return read_into(h, k, buf, len, offset, READ_DEPTH, NULL);
}

/* ---------------------------------------------------------------------- */
/* READ into a local file (an NFS file as the source of a sync)            */

/* The non-zero BLOCK-sized blocks of BUF[0, LEN), which holds the file's
 * bytes at OFFSET, written to the same offsets of FD: one pwrite per run. */
static int write_data_blocks(int fd, const char *buf, uint64_t len, uint64_t offset,
                             uint32_t block, bm_nfs_copy_stats *st)
{
    for (uint64_t i = 0; i < len;) {
        uint64_t b = len - i < block ? len - i : block;
        if (bm_ep_is_zero(buf + i, b)) {
            st->bytes_zero += b;
            i += b;
            continue;
        }
        uint64_t j = i + b;
        while (j < len) {
            uint64_t c = len - j < block ? len - j : block;
            if (bm_ep_is_zero(buf + j, c))
                break;
            j += c;
        }
        for (uint64_t done = i; done < j;) {
            ssize_t n = pwrite(fd, buf + done, j - done, (off_t)(offset + done));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return bm_ep_fail(n < 0 ? errno : EIO, "write at offset %llu failed: %s",
                                  (unsigned long long)(offset + done),
                                  strerror(n < 0 ? errno : EIO));
            done += (uint64_t)n;
        }
        st->bytes_written += j - i;
        i = j;
    }
    return 0;
}

static int check_args(bm_nfs *h, uint32_t conn, const bm_nfs_extent *extents, uint64_t count,
                      uint32_t block_size, uint64_t request_bytes, uint32_t flags);

/* K's buffer for pieces of LEN bytes: kept between calls, so a piece's
 * pages are not faulted in again for every work item. */
static char *read_buffer(struct conn *k, uint64_t len)
{
    if (k->read_buf_len < len) {
        free(k->read_buf);
        k->read_buf_len = 0;
        k->read_buf = malloc(len);
        if (!k->read_buf) {
            bm_ep_fail(ENOMEM, "out of memory for %llu bytes of reads", (unsigned long long)len);
            return NULL;
        }
        k->read_buf_len = len;
    }
    return k->read_buf;
}

int bm_nfs_read_extents(bm_nfs *h, uint32_t conn, int dst_fd, const bm_nfs_extent *extents,
                        uint64_t count, uint32_t block_size, uint32_t requests,
                        uint64_t request_bytes, bm_nfs_rate_cap *rate_cap,
                        const uint32_t *cancel, bm_nfs_copy_stats *stats)
{
    if (!stats)
        return bm_ep_fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NFS_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NFS_DEFAULT_REQUEST_BYTES;
    if (dst_fd < 0)
        return bm_ep_fail(EINVAL, "the local file must be given");
    if (check_args(h, conn, extents, count, block_size, request_bytes, 0) < 0)
        return -1;
    struct conn *k = &h->conn[conn];
    uint64_t piece_max = (uint64_t)requests * request_bytes;
    char *buf = read_buffer(k, piece_max);
    if (!buf)
        return -1;
    stats->max_in_flight = requests;
    int rc = 0;
    for (uint64_t e = 0; e < count && rc == 0; e++) {
        uint64_t end = extents[e].offset + extents[e].length;
        for (uint64_t off = extents[e].offset; off < end && rc == 0;) {
            if (bm_ep_cancelled(cancel)) {
                rc = bm_ep_fail(ECANCELED, "cancelled");
                break;
            }
            uint64_t n = end - off < piece_max ? end - off : piece_max;
            bm_ep_pace(rate_cap, n);
            if (read_into(h, k, buf, n, off, requests, &stats->requests) < 0) {
                stats->error_side = BM_NFS_SIDE_SRC;
                rc = -1;
                break;
            }
            stats->bytes_read += n;
            if (write_data_blocks(dst_fd, buf, n, off, block_size, stats) < 0) {
                stats->error_side = BM_NFS_SIDE_DST;
                rc = -1;
                break;
            }
            off += n;
        }
    }
    return rc;
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
    bm_ep_loop_release(&c->loop, r->slot);
    free(r);
}

static int issue_write(struct request *r)
{
    struct nfs_fh3 fh = fh3_of(r->call->k);
    WRITE3args args = {.file = fh, .offset = r->offset, .count = r->len, .stable = UNSTABLE,
                       .data = {.data_len = r->len, .data_val = r->buf}};
    return rpc_nfs3_write_async(nfs_get_rpc_context(r->call->k->nfs), write_done, &args, r);
}

/* ---------------------------------------------------------------------- */
/* The NFS side of the shared loop                                         */

/* Wait in the event loop until a call completes (or the timeout). A
 * connection that failed is never serviced again. */
static int wait_some(struct bm_ep_loop *loop)
{
    struct call *c = call_of(loop);
    if (c->k->failed)
        return bm_ep_fail(c->k->failed, "the NFS connection failed: %s",
                          strerror(c->k->failed));
    uint64_t deadline = bm_ep_deadline_after(c->h->timeout_ms);
    uint32_t before = loop->in_flight;
    while (loop->in_flight == before && loop->in_flight > 0) {
        int r = pump(c->k);
        if (r < 0) {
            loop->st->error_side = BM_NFS_SIDE_DST;
            return -1;
        }
        if (r > 0)
            deadline = bm_ep_deadline_after(c->h->timeout_ms);
        else if (deadline && bm_ep_now_ns() > deadline) {
            loop->st->error_side = BM_NFS_SIDE_DST;
            return lose(c->k, ETIMEDOUT, "no reply from the NFS server in time");
        }
        if (!loop->draining && loop->cancel && __atomic_load_n(loop->cancel, __ATOMIC_ACQUIRE))
            return 0; /* the loop sees it before it takes a slot */
    }
    return 0;
}

static int recorded_error(struct bm_ep_loop *loop)
{
    struct call *c = call_of(loop);
    if (c->error) {
        loop->st->error_side = BM_NFS_SIDE_DST;
        return bm_ep_fail(c->error, "NFS write near offset %llu failed: %s",
                          (unsigned long long)c->error_offset, c->error_msg);
    }
    return 0;
}

/* Before each slot is sought, without waiting, let libnfs send what is
 * queued and take the replies that are in: libnfs writes to the socket only
 * from nfs_service, so the wire would idle while the next slot is read. */
static int service(struct bm_ep_loop *loop)
{
    if (pump_for(call_of(loop)->k, 0) < 0) {
        loop->st->error_side = BM_NFS_SIDE_DST;
        return -1;
    }
    return 0;
}

/* One WRITE3 of LEN (at most write_bytes) bytes of BUF at OFFSET, holding
 * slot S until answered. */
static int send_write(struct bm_ep_loop *loop, struct bm_ep_slot *s, const char *buf,
                      uint64_t len, uint64_t offset)
{
    struct call *c = call_of(loop);
    struct request *r = malloc(sizeof *r);
    if (!r)
        return bm_ep_fail(ENOMEM, "out of memory");
    /* WRITE3args takes a char *; the call only reads it. */
    *r = (struct request){.call = c, .slot = s, .buf = (char *)(uintptr_t)buf,
                          .offset = offset, .len = (uint32_t)len};
    if (issue_write(r) < 0) {
        free(r);
        loop->st->error_side = BM_NFS_SIDE_DST;
        return lose(c->k, EIO, "write: libnfs could not queue the call");
    }
    bm_ep_loop_hold(loop, s);
    c->k->wrote = 1;
    bm_ep_loop_issued(loop);
    return 0;
}

/* NFSv3 cannot punch: zero runs not skipped are written as zeros (no zero
 * callback; the loop has a zeros buffer). A call cancelled while its last
 * replies came in still fails with ECANCELED. */
static const struct bm_ep_ops nfs_ops = {
    .write = send_write,
    .service = service,
    .wait = wait_some,
    .recorded_error = recorded_error,
    .cancel_after_drain = 1,
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

/* The connection's call state: its last one, with its buffers when the
 * shape matches (it has nothing in flight: a call that returns with calls
 * outstanding leaves its connection failed), else a new one. */
static struct call *new_call(bm_nfs *h, uint32_t conn, uint32_t requests, uint64_t slot_bytes,
                             uint64_t write_bytes)
{
    struct conn *k = &h->conn[conn];
    struct call *c = k->call;
    if (c && c->loop.in_flight) {
        free_call(c);
        k->call = c = NULL;
    }
    if (!c && !(k->call = c = calloc(1, sizeof *c))) {
        bm_ep_fail(ENOMEM, "cannot allocate %u request buffers", requests);
        return NULL;
    }
    if (bm_ep_loop_buffers(&c->loop, requests, slot_bytes, write_bytes) < 0) {
        free_call(c);
        k->call = NULL;
        return NULL;
    }
    *c = (struct call){.loop = c->loop, .h = h, .k = k};
    c->loop.write_max = c->loop.zero_step = write_bytes;
    return c;
}

static int check_args(bm_nfs *h, uint32_t conn, const bm_nfs_extent *extents, uint64_t count,
                      uint32_t block_size, uint64_t request_bytes, uint32_t flags)
{
    if (!h || (count && !extents))
        return bm_ep_fail(EINVAL, "handle and extents must not be NULL");
    if (bm_ep_check_shape(block_size, request_bytes, flags) < 0 || usable(h, conn) < 0)
        return -1;
    return h->conn[conn].fh ? 0 : bm_ep_fail(EBADF, "no file is open");
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
        return bm_ep_fail(EINVAL, "stats must not be NULL");
    memset(stats, 0, sizeof *stats);
    requests = requests ? requests : BM_NFS_DEFAULT_REQUESTS;
    request_bytes = request_bytes ? request_bytes : BM_NFS_DEFAULT_REQUEST_BYTES;
    if (check_args(h, conn, extents, count, block_size, request_bytes, flags) < 0 ||
        bm_ep_check_sink(sink, extents, count, request_bytes) < 0)
        return -1;
    uint64_t write_bytes = request_bytes < h->write_max ? request_bytes : h->write_max;
    struct call *c = new_call(h, conn, requests, request_bytes, write_bytes);
    if (!c)
        return -1;
    bm_ep_loop_start(&c->loop, &nfs_ops, src_fd, flags, block_size, rate_cap, cancel, sink,
                     stats);
    return bm_ep_loop_copy(&c->loop, extents, count);
}
