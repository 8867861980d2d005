/* plugin.c - blockmirror's NBD front end: an nbdkit plugin whose writes are
 * the core's tracked writes (bm_pwrite, bm_zero), so a QEMU guest, fio or a
 * database on an NBD client obeys every rule a TrackedImage writer obeys:
 * I1 marks, freezes bounded by their lease, the throttle, and a writer slot
 * held by this process (an nbdkit killed mid-stream leaves the sidecar
 * unclean, I4).
 *
 *   nbdkit [options] .../_nbdkit_plugin*.so image=PATH [readonly=true]
 *
 * One export, shared by every connection (multi-conn is safe: they all write
 * through one fd, and a flush is an fdatasync of it). A `sync --move`
 * redirects the export while clients stay connected: a watcher thread, or
 * the first write answered ESTALE, opens the target and swaps it in under a
 * write lock, so no request ever sees a half-swapped export. The image gets
 * an OFD lock so two front ends never serve it at once.
 *
 * Linked with the core sources into one shared object; the core's symbols
 * stay hidden (-fvisibility=hidden), only plugin_init is exported. */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include "bm_internal.h"

#include <nbdkit-plugin.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The byte of the image the front end locks: far past any image and clear
 * of the bytes QEMU's image locking uses (100..), so neither disturbs the
 * other. Lock type: write for a read-write export, read for a read-only
 * one, so read-only front ends may share an image and nothing else may. */
#define SERVE_LOCK_OFFSET (1ll << 62)
/* How often the watcher looks for a redirect: a moved export's clients pay
 * at most this before their I/O reaches the new image, and the old image's
 * writer slot is given back. */
#define WATCH_INTERVAL_NS 20000000l

static char *image_path;        /* config: image= (absolute) */
static int readonly;            /* config: readonly=true */

/* The export: the current image and its tracker. Requests hold the lock
 * shared; following a redirect holds it exclusively. */
static struct {
    pthread_rwlock_t lock;
    bm_tracker *tracker;
    int fd;
    uint64_t size;              /* the image's size when opened: the export's */
    pthread_t watcher;
    int watching;
    int stop;                   /* atomic: the watcher should leave */
} ex = {PTHREAD_RWLOCK_INITIALIZER, NULL, -1, 0, 0, 0, 0};

static int bm_config(const char *key, const char *value)
{
    if (strcmp(key, "image") == 0) {
        free(image_path);
        image_path = nbdkit_absolute_path(value);
        return image_path ? 0 : -1;
    }
    if (strcmp(key, "readonly") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r < 0)
            return -1;
        readonly = r;
        return 0;
    }
    nbdkit_error("unknown parameter '%s' (expected image= or readonly=)", key);
    return -1;
}

static int bm_config_complete(void)
{
    if (image_path == NULL) {
        nbdkit_error("the image= parameter is required");
        return -1;
    }
    return 0;
}

static void bm_unload(void)
{
    free(image_path);
}

/* Lock FD's serve byte (see SERVE_LOCK_OFFSET); PATH names it in messages. */
static int lock_image(int fd, const char *path)
{
    struct flock fl = {0};
    fl.l_type = readonly ? F_RDLCK : F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = SERVE_LOCK_OFFSET;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0)
        return 0;
    if (errno == EAGAIN || errno == EACCES)
        nbdkit_error("%s is already served by another process", path);
    else
        nbdkit_error("cannot lock %s: %m", path);
    return -1;
}

/* Open the image at PATH for serving and lock it; *SIZE gets its size. */
static int open_image(const char *path, uint64_t *size)
{
    int fd = open(path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        nbdkit_error("cannot open %s: %m", path);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        nbdkit_error("%s is not a regular file", path);
        close(fd);
        return -1;
    }
    if (lock_image(fd, path) < 0) {
        close(fd);
        return -1;
    }
    *size = (uint64_t)st.st_size;
    return fd;
}

/* The sidecar's path beside the image at PATH (freed by nbdkit at unload). */
static const char *sidecar_of(const char *path)
{
    return nbdkit_printf_intern("%s%s", path, bm_sidecar_suffix());
}

/* Checks before nbdkit forks or listens, so a bad image fails the start
 * itself (in after_fork a daemonised nbdkit could only log it). The real
 * open waits for after_fork: the writer slot records this process. */
static int bm_get_ready(void)
{
    uint64_t size;
    int fd = open_image(image_path, &size);
    if (fd < 0)
        return -1;
    close(fd);
    const char *sidecar = sidecar_of(image_path);
    if (sidecar == NULL)
        return -1;
    if (access(sidecar, F_OK) < 0) {
        nbdkit_error("%s has no change-tracking sidecar (%s): enable tracking first "
                     "(blockmirror serve does)", image_path, sidecar);
        return -1;
    }
    return 0;
}

/* Swap in the redirect target of the export's tracker if it is still STALE
 * (another thread may have followed it already). Takes the lock itself. */
static int follow_redirect(bm_tracker *stale)
{
    int rc = 0;
    struct stat st;
    pthread_rwlock_wrlock(&ex.lock);
    if (ex.tracker == stale && bm_get_state(stale) == BM_STATE_REDIRECTED) {
        int fd = -1;
        bm_tracker *t = bm_open_redirect_target(
            stale, readonly ? BM_OPEN_READER : BM_OPEN_WRITER, &fd);
        if (t == NULL) {
            nbdkit_error("the image was moved, but its target cannot be opened: %s",
                         bm_last_error());
            rc = -1;
        } else if (lock_image(fd, "the moved image") < 0 || fstat(fd, &st) < 0) {
            bm_close(t);
            close(fd);
            rc = -1;
        } else {
            char where[BM_REDIRECT_MAX];
            if (bm_get_redirect(stale, where, sizeof where) < 0)
                snprintf(where, sizeof where, "its target");
            nbdkit_debug("the image moved: serving %s", where);
            bm_close(stale);
            close(ex.fd);
            ex.tracker = t;
            ex.fd = fd;
            ex.size = (uint64_t)st.st_size;
        }
    }
    pthread_rwlock_unlock(&ex.lock);
    return rc;
}

/* Follows a move even when no client does I/O, so the old image's writer
 * slot is released and the old sidecar's last writer leaves promptly. */
static void *watch_redirect(void *unused)
{
    (void)unused;
    struct timespec nap = {0, WATCH_INTERVAL_NS};
    while (!__atomic_load_n(&ex.stop, __ATOMIC_ACQUIRE)) {
        pthread_rwlock_rdlock(&ex.lock);
        bm_tracker *t = ex.tracker;
        int moved = bm_get_state(t) == BM_STATE_REDIRECTED;
        pthread_rwlock_unlock(&ex.lock);
        if (moved && follow_redirect(t) < 0)
            nap.tv_sec = 1; /* logged once a second, not fifty times */
        nanosleep(&nap, NULL);
    }
    return NULL;
}

/* The sidecar of the image at PATH, open as FD: as a writer unless READONLY. */
static bm_tracker *open_tracker(const char *path, int read_only, int fd)
{
    const char *sidecar = sidecar_of(path);
    if (sidecar == NULL)
        return NULL;
    bm_tracker *t = bm_open(sidecar, read_only ? BM_OPEN_READER : BM_OPEN_WRITER, fd);
    if (t == NULL)
        nbdkit_error("cannot open the change-tracking sidecar %s: %s", sidecar, bm_last_error());
    return t;
}

static int bm_after_fork(void)
{
    uint64_t size;
    int fd = open_image(image_path, &size);
    if (fd < 0)
        return -1;
    bm_tracker *t = open_tracker(image_path, readonly, fd);
    if (t == NULL) {
        close(fd);
        return -1;
    }
    ex.tracker = t;
    ex.fd = fd;
    ex.size = size;
    int err = pthread_create(&ex.watcher, NULL, watch_redirect, NULL);
    if (err) {
        errno = err;
        nbdkit_error("cannot start the redirect watcher: %m");
        return -1;
    }
    ex.watching = 1;
    return 0;
}

/* Runs once nbdkit stops serving (SIGTERM drains requests first): the
 * writer slot is released cleanly, so the sidecar stays trusted (I4). */
static void bm_cleanup(void)
{
    if (ex.watching) {
        __atomic_store_n(&ex.stop, 1, __ATOMIC_RELEASE);
        pthread_join(ex.watcher, NULL);
        ex.watching = 0;
    }
    if (ex.tracker) {
        bm_close(ex.tracker);
        ex.tracker = NULL;
    }
    if (ex.fd >= 0) {
        close(ex.fd);
        ex.fd = -1;
    }
}

/* ---------------------------------------------------------------------- */
/* Requests. Every connection shares the one export, so the handle is it.  */

static void *bm_open_connection(int read_only)
{
    (void)read_only;
    return &ex;
}

static int64_t bm_get_size(void *h)
{
    (void)h;
    pthread_rwlock_rdlock(&ex.lock);
    uint64_t size = ex.size;
    pthread_rwlock_unlock(&ex.lock);
    return (int64_t)size;
}

static int bm_can_write(void *h) { (void)h; return !readonly; }
static int bm_can_flush(void *h) { (void)h; return 1; }
static int bm_can_trim(void *h) { (void)h; return !readonly; }
static int bm_can_zero(void *h) { (void)h; return !readonly; }
static int bm_can_fast_zero(void *h) { (void)h; return !readonly; }
static int bm_can_extents(void *h) { (void)h; return 1; }
/* Every connection writes through the same fd and a flush is its
 * fdatasync, so what one connection flushes every other one sees. */
static int bm_can_multi_conn(void *h) { (void)h; return 1; }
static int bm_can_fua(void *h) { (void)h; return NBDKIT_FUA_NATIVE; }
static int bm_can_cache(void *h) { (void)h; return NBDKIT_CACHE_NATIVE; }

/* Take the export shared, first following a redirect that has happened
 * (reads must see what writers write to the new image). Returns the
 * tracker held; -1 (lock released) when the redirect cannot be followed. */
static int hold_current(bm_tracker **t)
{
    for (;;) {
        pthread_rwlock_rdlock(&ex.lock);
        *t = ex.tracker;
        if (bm_get_state(*t) != BM_STATE_REDIRECTED)
            return 0;
        pthread_rwlock_unlock(&ex.lock);
        if (follow_redirect(*t) < 0) {
            errno = EIO;
            return -1;
        }
    }
}

static int bm_pread_request(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    (void)flags;
    bm_tracker *t;
    if (hold_current(&t) < 0)
        return -1;
    char *p = buf;
    int err = 0;
    while (count > 0) {
        ssize_t n = pread(ex.fd, p, count, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : EIO;
            break;
        }
        p += n;
        count -= (uint32_t)n;
        offset += (uint64_t)n;
    }
    pthread_rwlock_unlock(&ex.lock);
    if (err) {
        errno = err;
        nbdkit_error("read at %llu failed: %m", (unsigned long long)offset);
        return -1;
    }
    return 0;
}

/* A write-side request: data (BUF), or zeros (BUF NULL) with bm_zero FLAGS. */
struct change {
    const void *buf;
    uint32_t count;
    uint64_t offset;
    uint32_t zero_flags;
    int fua;
};

static int apply_change(bm_tracker *t, int fd, const struct change *c)
{
    if (c->buf != NULL) {
        if (bm_pwrite(t, fd, c->buf, c->count, c->offset) < 0)
            return -1;
    } else if (bm_zero(t, fd, c->offset, c->count, c->zero_flags) < 0) {
        return -1;
    }
    if (c->fua && fdatasync(fd) < 0)
        return bm_fail(errno, "fdatasync after the write failed: %s", strerror(errno));
    return 0;
}

/* Apply C as one tracked write on the current export. A write answered
 * ESTALE raced a move: follow it and write to the new image, once. */
static int tracked_change(const struct change *c)
{
    for (int attempt = 0;; attempt++) {
        bm_tracker *t;
        if (hold_current(&t) < 0)
            return -1;
        /* nbdkit bounds requests by get_size already; this keeps a write
         * from ever growing the image (bm_pwrite would). */
        if (c->offset + c->count > ex.size) {
            uint64_t size = ex.size;
            pthread_rwlock_unlock(&ex.lock);
            nbdkit_error("write of %u bytes at %llu is past the end of the %llu-byte image",
                         c->count, (unsigned long long)c->offset, (unsigned long long)size);
            errno = ENOSPC;
            return -1;
        }
        int rc = apply_change(t, ex.fd, c);
        int err = errno;
        pthread_rwlock_unlock(&ex.lock);
        if (rc == 0)
            return 0;
        if (err == ESTALE && attempt == 0 && follow_redirect(t) == 0)
            continue;
        if (!(err == EOPNOTSUPP && (c->zero_flags & BM_ZERO_FAST)))
            nbdkit_error("%s", bm_last_error());
        /* The client learns EIO for a sidecar that went bad, not a code it
         * would take for a property of the disk. */
        errno = err == EUCLEAN || err == ESTALE ? EIO : err;
        return -1;
    }
}

static int bm_pwrite_request(void *h, const void *buf, uint32_t count, uint64_t offset,
                             uint32_t flags)
{
    (void)h;
    struct change c = {buf, count, offset, 0, (flags & NBDKIT_FLAG_FUA) != 0};
    return tracked_change(&c);
}

static int bm_zero_request(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    uint32_t zf = 0;
    if (flags & NBDKIT_FLAG_MAY_TRIM)
        zf |= BM_ZERO_MAY_TRIM;
    if (flags & NBDKIT_FLAG_FAST_ZERO)
        zf |= BM_ZERO_FAST;
    struct change c = {NULL, count, offset, zf, (flags & NBDKIT_FLAG_FUA) != 0};
    return tracked_change(&c);
}

static int bm_trim_request(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    struct change c = {NULL, count, offset, BM_ZERO_MAY_TRIM, (flags & NBDKIT_FLAG_FUA) != 0};
    return tracked_change(&c);
}

static int bm_flush_request(void *h, uint32_t flags)
{
    (void)h;
    (void)flags;
    bm_tracker *t;
    if (hold_current(&t) < 0)
        return -1;
    int rc = fdatasync(ex.fd);
    pthread_rwlock_unlock(&ex.lock);
    if (rc < 0)
        nbdkit_error("flush: %m");
    return rc;
}

static int bm_cache_request(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    (void)h;
    (void)flags;
    bm_tracker *t;
    if (hold_current(&t) < 0)
        return -1;
    int err = posix_fadvise(ex.fd, (off_t)offset, count, POSIX_FADV_WILLNEED);
    pthread_rwlock_unlock(&ex.lock);
    if (err) {
        errno = err;
        nbdkit_error("cache: %m");
        return -1;
    }
    return 0;
}

/* Data and holes of [OFFSET, OFFSET+COUNT) by SEEK_DATA/SEEK_HOLE (NBD's
 * base:allocation); where the filesystem cannot say, it is all data. */
static int add_extents(int fd, uint64_t offset, uint64_t end, uint32_t flags,
                       struct nbdkit_extents *extents)
{
    uint64_t pos = offset;
    while (pos < end) {
        off_t data = lseek(fd, (off_t)pos, SEEK_DATA);
        if (data < 0 && errno == ENXIO)
            data = (off_t)end; /* only a hole from here on */
        else if (data < 0 && bm_errno_unsupported(BM_OP_SEEK_HOLES, errno))
            return nbdkit_add_extent(extents, pos, end - pos, 0);
        else if (data < 0)
            return -1;
        uint64_t d = (uint64_t)data < end ? (uint64_t)data : end;
        if (d > pos && nbdkit_add_extent(extents, pos, d - pos,
                                         NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) < 0)
            return -1;
        if (d >= end || (flags & NBDKIT_FLAG_REQ_ONE && d > pos))
            return 0;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            return -1;
        uint64_t e = (uint64_t)hole < end ? (uint64_t)hole : end;
        if (nbdkit_add_extent(extents, d, e - d, 0) < 0)
            return -1;
        if (flags & NBDKIT_FLAG_REQ_ONE)
            return 0;
        pos = e;
    }
    return 0;
}

static int bm_extents_request(void *h, uint32_t count, uint64_t offset, uint32_t flags,
                              struct nbdkit_extents *extents)
{
    (void)h;
    bm_tracker *t;
    if (hold_current(&t) < 0)
        return -1;
    int rc = add_extents(ex.fd, offset, offset + count, flags, extents);
    int err = errno;
    pthread_rwlock_unlock(&ex.lock);
    if (rc < 0) {
        errno = err;
        nbdkit_error("extents at %llu: %m", (unsigned long long)offset);
    }
    return rc;
}

static struct nbdkit_plugin plugin = {
    .name = "blockmirror",
    .longname = "blockmirror tracked image",
    .description = "serves an image so every write lands in its change-tracking bitmap",
    .config = bm_config,
    .config_complete = bm_config_complete,
    .config_help = "image=<PATH>     (required) the tracked image\n"
                   "readonly=<BOOL>  serve it read-only",
    .magic_config_key = "image",
    .unload = bm_unload,
    .get_ready = bm_get_ready,
    .after_fork = bm_after_fork,
    .cleanup = bm_cleanup,
    .open = bm_open_connection,
    .get_size = bm_get_size,
    .can_write = bm_can_write,
    .can_flush = bm_can_flush,
    .can_trim = bm_can_trim,
    .can_zero = bm_can_zero,
    .can_fast_zero = bm_can_fast_zero,
    .can_extents = bm_can_extents,
    .can_multi_conn = bm_can_multi_conn,
    .can_fua = bm_can_fua,
    .can_cache = bm_can_cache,
    .pread = bm_pread_request,
    .pwrite = bm_pwrite_request,
    .zero = bm_zero_request,
    .trim = bm_trim_request,
    .flush = bm_flush_request,
    .cache = bm_cache_request,
    .extents = bm_extents_request,
    .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN(plugin)
