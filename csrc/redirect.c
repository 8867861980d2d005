/* redirect.c - a move's redirect: the copier sends writers to the new place
 * of the image (bm_redirect), writers reopen it there
 * (bm_open_redirect_target).
 *
 * The redirect target lives in the control block, which whoever can write
 * the sidecar - the image's owner - can edit. A writer may be another, more
 * privileged principal (root running a VM from a user's image), so
 * following the target is where a forged sidecar would let that writer's
 * writes escape into someone else's file. A writer therefore follows only:
 *   - a sidecar bound to the very image it opened (header dev/ino), so a
 *     stale sidecar left beside a new file at the old path steers nothing;
 *   - along a path with no symbolic link in any component (openat2
 *     RESOLVE_NO_SYMLINKS, or a walk of O_NOFOLLOW opens where the kernel
 *     has no openat2), so no folder link can send it elsewhere;
 *   - to a regular file owned by the same uid as the image it came from;
 *   - whose sidecar records the move: bm_redirect draws a random token into
 *     both control blocks, and the target's must match the source's.
 * The copier resolves the target itself (realpath) before it redirects, so a
 * legitimate destination behind a folder link still works.
 *
 * A move onto an NBD export or a file on an NFS server (issue 12) redirects
 * to a URI instead (bm_redirect_uri: "nbd://", "nbd+unix://" or "nfs://",
 * never a path, which always starts with "/"). No sidecar sits beside an export to hold a token, and
 * a URI can reach anything the writer can connect to - another user's
 * disk behind a root-owned socket, a server elsewhere on the network -, so
 * a token would prove nothing. The rule instead (bm_redirect_uri_to_follow):
 *   - the sidecar is bound to the image the writer opened, as above;
 *   - the writer's effective uid is the image's owner. Only the image's
 *     owner (and root) can write its sidecar, which is refused when it is
 *     owned by anyone else or writable by group/others (cbt.c), so a forged
 *     URI can then only come from the writer's own principal, who could
 *     point its own writes anywhere anyway: following it grants nothing.
 *     A writer of any other uid (root running a user's VM) refuses, with
 *     EPERM, and the copier refuses such a move before it starts.
 *   - the URI has no user info and no control characters: nothing secret
 *     is kept in the sidecar, and nothing read from it can smuggle a line
 *     into a log.
 * The redirect itself is a compare-and-swap from FROZEN: a writer that
 * found the freeze's lease over swaps FROZEN back to RUNNING the same way
 * (writer.c), so either the redirect wins and no write reached the source
 * after the final pass, or the writer wins and the redirect fails (the
 * copier then thaws and the source keeps every write). */
#include "bm_internal.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Open the folder holding absolute PATH without following a symbolic link
 * in any component, and copy PATH's last component into BASE (BASE_LEN
 * bytes). Returns an O_PATH directory fd, or -1 with errno (EPERM for a
 * link or a non-folder on the way, EINVAL for a path that is not absolute
 * and plain: no empty, "." or ".." components). */
static int open_parent_nofollow(const char *path, char *base, size_t base_len)
{
    size_t n = strnlen(path, BM_REDIRECT_MAX);
    if (n == 0 || n >= BM_REDIRECT_MAX || path[0] != '/')
        return bm_fail(EINVAL, "redirect target is not an absolute path");
    char copy[BM_REDIRECT_MAX];
    memcpy(copy, path, n + 1);
    char *slash = strrchr(copy, '/');
    const char *last = slash + 1;
    if (*last == '\0' || strcmp(last, ".") == 0 || strcmp(last, "..") == 0 ||
        strlen(last) >= base_len)
        return bm_fail(EINVAL, "redirect target %s does not name a file", path);
    memcpy(base, last, strlen(last) + 1);
    /* The folder part, without its trailing slash; "" for a file in "/". */
    *slash = '\0';
    const char *parent = copy[0] ? copy : "/";
    if (copy[0] == '\0')
        copy[1] = '\0'; /* nothing to walk below "/" */
    /* Only plain components: ".." would let a path climb out of where it
     * seems to lead, and an empty one means a doubled slash. */
    for (char *p = copy + 1; *p;) {
        char *end = strchr(p, '/');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            return bm_fail(EINVAL, "redirect target %s is not a plain absolute path", path);
        p += len + (end ? 1 : 0);
    }

    static int no_openat2 = -1;
    if (no_openat2 < 0)
        no_openat2 = getenv("BLOCKMIRROR_NO_OPENAT2") != NULL; /* tests of the walk */
    if (!no_openat2) {
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
        how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
        long fd = syscall(SYS_openat2, AT_FDCWD, parent, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno == ELOOP || errno == ENOTDIR)
            return bm_fail(EPERM, "redirect target %s: a folder on its path is a symbolic "
                                  "link or no folder; refusing to follow it", path);
        if (errno != ENOSYS && errno != EPERM && errno != E2BIG)
            return bm_fail(errno, "cannot open the folder of redirect target %s: %s", path,
                           strerror(errno));
        /* No openat2 here (old kernel, or a seccomp filter): walk. */
    }
    int dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return bm_fail(errno, "cannot open /: %s", strerror(errno));
    for (char *p = copy + 1; *p;) {
        char *end = strchr(p, '/');
        if (end)
            *end = '\0';
        int next = openat(dir, p, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int e = errno;
        struct stat st;
        if (next >= 0 && (fstat(next, &st) < 0 || !S_ISDIR(st.st_mode))) {
            close(next);
            next = -1;
            e = ENOTDIR;
        }
        close(dir);
        if (next < 0) {
            if (e == ELOOP || e == ENOTDIR)
                return bm_fail(EPERM, "redirect target %s: a folder on its path is a symbolic "
                                      "link or no folder; refusing to follow it", path);
            return bm_fail(e, "cannot open the folder of redirect target %s: %s", path,
                           strerror(e));
        }
        dir = next;
        if (!end)
            break;
        p = end + 1;
    }
    return dir;
}

static int token_is_zero(const uint8_t *token)
{
    uint8_t any = 0;
    for (int i = 0; i < 16; i++)
        any |= token[i];
    return any == 0;
}

/* Check that regular file BASE in DIR (not followed if a link) may receive
 * T's writers: owned by T's image's owner, and not T's image itself. */
static int check_target(bm_tracker *t, int dir, const char *base, const char *path,
                        struct stat *st)
{
    if (fstatat(dir, base, st, AT_SYMLINK_NOFOLLOW) < 0)
        return bm_fail(errno, "cannot stat redirect target %s: %s", path, strerror(errno));
    if (!S_ISREG(st->st_mode))
        return bm_fail(EPERM, "redirect target %s is not a regular file (a symbolic link?); "
                              "refusing to follow it", path);
    if (st->st_uid != t->image_uid)
        return bm_fail(EPERM, "redirect target %s is owned by uid %u, not uid %u (the owner "
                              "of the image it was moved from); refusing to follow it",
                       path, (unsigned)st->st_uid, (unsigned)t->image_uid);
    if ((uint64_t)st->st_dev == t->image_dev && (uint64_t)st->st_ino == t->image_ino)
        return bm_fail(EPERM, "redirect target %s is the image itself", path);
    return 0;
}

/* 1 if DST's sidecar records the move TOKEN, 0 if not, -1 on a SIGBUS. */
static int records_move(bm_tracker *dst, const uint8_t *token)
{
    BM_GUARDED(int, dst, memcmp(dst->ctl->moved_from, token, 16) == 0);
}

/* Store the move TOKEN in DST's control block; -1 on a SIGBUS. */
static int record_move(bm_tracker *dst, const uint8_t *token)
{
    BM_GUARD_BEGIN(dst, g, -1);
    memcpy(dst->ctl->moved_from, token, 16);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    BM_GUARD_END(g);
    return 0;
}

static int publish_redirect(bm_tracker *t);

static int do_redirect(bm_tracker *t, const char *target, bm_tracker *dst)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_FROZEN ||
        !bm_frozen_by_me(t))
        return bm_fail(EINVAL, "redirect needs a freeze held by this process");
    if (!t->have_image || !t->bound)
        return bm_fail(EINVAL, "redirect needs the tracker opened with its own image");
    if (!dst || !dst->have_image || !dst->bound)
        return bm_fail(EINVAL, "redirect needs the target's tracker opened with its image");
    char base[256];
    int dir = open_parent_nofollow(target, base, sizeof base);
    if (dir < 0)
        return -1;
    struct stat st;
    int rc = check_target(t, dir, base, target, &st);
    close(dir);
    if (rc < 0)
        return -1;
    if ((uint64_t)st.st_dev != dst->image_dev || (uint64_t)st.st_ino != dst->image_ino)
        return bm_fail(EINVAL, "redirect target %s is not the image the target tracker "
                               "was opened with", target);
    uint8_t token[16];
    do {
        if (getrandom(token, sizeof token, 0) != (ssize_t)sizeof token)
            return bm_fail(errno ? errno : EIO, "no randomness for a move token");
    } while (token_is_zero(token));
    if (record_move(dst, token) < 0)
        return -1;
    memcpy(t->ctl->move_token, token, sizeof token);
    memcpy(t->ctl->redirect_target, target, strlen(target) + 1);
    return publish_redirect(t);
}

/* Token and target are stored: switch FROZEN -> REDIRECTED in one
 * compare-and-swap (see the header comment), so a writer that sees the
 * state sees them, and no writer that judged the freeze over wrote first. */
static int publish_redirect(bm_tracker *t)
{
    uint32_t frozen = BM_STATE_FROZEN;
    if (!__atomic_compare_exchange_n(&t->ctl->state, &frozen, BM_STATE_REDIRECTED, 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return bm_fail(ETIMEDOUT, "the freeze ended before the redirect (its lease ran "
                                  "out): writers went on against the source");
    __atomic_store_n(&t->ctl->copier_pid, 0, __ATOMIC_SEQ_CST);
    bm_wake_writers(t);
    return 0;
}

int bm_redirect(bm_tracker *t, const char *target, bm_tracker *target_tracker)
{
    BM_GUARDED(int, t, do_redirect(t, target, target_tracker));
}

/* 1 if S (NUL-terminated within BM_REDIRECT_MAX) names an NBD export or an
 * NFS file. */
static int is_export_uri(const char *s)
{
    return strncmp(s, "nbd://", 6) == 0 || strncmp(s, "nbd+unix://", 11) == 0 ||
           strncmp(s, "nfs://", 6) == 0;
}

/* 0 if URI may be stored or followed: an export URI, shorter than
 * BM_REDIRECT_MAX, printable, with no user info; else -1, EINVAL. */
static int check_export_uri(const char *uri)
{
    size_t n = strnlen(uri, BM_REDIRECT_MAX);
    if (n == 0 || n >= BM_REDIRECT_MAX)
        return bm_fail(EINVAL, "redirect URI is empty or %d bytes or longer", BM_REDIRECT_MAX);
    if (!is_export_uri(uri))
        return bm_fail(EINVAL, "redirect URI is not nbd://, nbd+unix:// or nfs://");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)uri[i] < 0x21 || (unsigned char)uri[i] == 0x7f)
            return bm_fail(EINVAL, "redirect URI holds a space or control character");
    const char *authority = strstr(uri, "://") + 3;
    size_t end = strcspn(authority, "/?#");
    if (memchr(authority, '@', end))
        return bm_fail(EINVAL, "redirect URI holds user info; it is never stored");
    return 0;
}

static int do_redirect_uri(bm_tracker *t, const char *uri)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_FROZEN ||
        !bm_frozen_by_me(t))
        return bm_fail(EINVAL, "redirect needs a freeze held by this process");
    if (!t->have_image || !t->bound)
        return bm_fail(EINVAL, "redirect needs the tracker opened with its own image");
    if (check_export_uri(uri) < 0)
        return -1;
    uint8_t token[16];
    do {
        if (getrandom(token, sizeof token, 0) != (ssize_t)sizeof token)
            return bm_fail(errno ? errno : EIO, "no randomness for a move token");
    } while (token_is_zero(token));
    /* The token names the move (a zero one is "no move"); nothing checks it
     * against a target, which has no sidecar. */
    memcpy(t->ctl->move_token, token, sizeof token);
    memset(t->ctl->redirect_target, 0, BM_REDIRECT_MAX);
    memcpy(t->ctl->redirect_target, uri, strlen(uri) + 1);
    return publish_redirect(t);
}

int bm_redirect_uri(bm_tracker *t, const char *uri)
{
    BM_GUARDED(int, t, do_redirect_uri(t, uri));
}

static int do_redirect_uri_to_follow(bm_tracker *t, char *buf, uint64_t len)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_REDIRECTED)
        return bm_fail(ENOENT, "the image was not redirected");
    if (!t->have_image || !t->bound)
        return bm_fail(EPERM, "this sidecar is not bound to the image it was opened with; "
                              "refusing to follow its redirect");
    char uri[BM_REDIRECT_MAX];
    memcpy(uri, t->ctl->redirect_target, sizeof uri);
    uri[sizeof uri - 1] = '\0';
    if (!is_export_uri(uri))
        return bm_fail(EXDEV, "the image was moved to a file, not to an NBD export or NFS file");
    if (check_export_uri(uri) < 0)
        return bm_fail(EPERM, "the redirect to a remote export is malformed; refusing to "
                              "follow it");
    if (token_is_zero(t->ctl->move_token))
        return bm_fail(EPERM, "the redirect to a remote export names no move; refusing to "
                              "follow it");
    if (geteuid() != (uid_t)t->image_uid)
        return bm_fail(EPERM, "the image was moved to a remote export, but this writer runs as "
                              "uid %u, not as the image's owner (uid %u): only the owner's "
                              "own processes follow a move onto an export; refusing to "
                              "follow it", (unsigned)geteuid(), (unsigned)t->image_uid);
    size_t n = strlen(uri);
    if (n + 1 > len)
        return bm_fail(ERANGE, "buffer too small for the redirect URI");
    memcpy(buf, uri, n + 1);
    return 0;
}

int bm_redirect_uri_to_follow(bm_tracker *t, char *buf, uint64_t len)
{
    BM_GUARDED(int, t, do_redirect_uri_to_follow(t, buf, len));
}

/* Open BASE in DIR (PATH in messages, WHAT naming its role) read-write for
 * T's writers: not through a link, a regular file owned by T's image's
 * owner, not T's image. Checked on what was opened (fstat), not on the name
 * again. */
static int open_owned_at(bm_tracker *t, int dir, const char *base, const char *path,
                         const char *what)
{
    int fd = openat(dir, base, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ELOOP)
            return bm_fail(EPERM, "%s %s is a symbolic link; refusing to follow it", what,
                           path);
        return bm_fail(e, "cannot open %s %s: %s", what, path, strerror(e));
    }
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0)
        rc = bm_fail(errno, "cannot stat %s %s: %s", what, path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = bm_fail(EPERM, "%s %s is not a regular file", what, path);
    else if (st.st_uid != t->image_uid)
        rc = bm_fail(EPERM, "%s %s is owned by uid %u, not uid %u (the owner of the image); "
                            "refusing to follow it",
                     what, path, (unsigned)st.st_uid, (unsigned)t->image_uid);
    else if ((uint64_t)st.st_dev == t->image_dev && (uint64_t)st.st_ino == t->image_ino)
        rc = bm_fail(EPERM, "%s %s is the image itself", what, path);
    if (rc < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

int bm_open_owned_target(bm_tracker *t, const char *path, const char *what)
{
    if (!t->have_image)
        return bm_fail(EPERM, "this tracker was opened without its image");
    char base[256];
    int dir = open_parent_nofollow(path, base, sizeof base);
    if (dir < 0)
        return -1;
    int fd = open_owned_at(t, dir, base, path, what);
    int e = errno;
    close(dir);
    errno = e;
    return fd;
}

static bm_tracker *do_open_target(bm_tracker *t, int flags, int *image_fd)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_REDIRECTED) {
        bm_fail(ENOENT, "the image was not redirected");
        return NULL;
    }
    if (!t->have_image || !t->bound) {
        bm_fail(EPERM, "this sidecar is not bound to the image it was opened with; "
                       "refusing to follow its redirect");
        return NULL;
    }
    char target[BM_REDIRECT_MAX];
    uint8_t token[16];
    memcpy(target, t->ctl->redirect_target, sizeof target);
    target[sizeof target - 1] = '\0';
    memcpy(token, t->ctl->move_token, sizeof token);
    if (is_export_uri(target)) {
        bm_fail(EXDEV, "the image was moved to an NBD export or NFS file; this writer cannot follow it "
                       "there (a TrackedImage can)");
        return NULL;
    }
    if (token_is_zero(token)) {
        bm_fail(EPERM, "the redirect to %s names no move; refusing to follow it", target);
        return NULL;
    }
    char base[256];
    int dir = open_parent_nofollow(target, base, sizeof base - sizeof BM_SIDECAR_SUFFIX);
    if (dir < 0)
        return NULL;
    bm_tracker *dst = NULL;
    int fd = open_owned_at(t, dir, base, target, "redirect target");
    if (fd < 0)
        goto out;
    char side_name[256 + sizeof BM_SIDECAR_SUFFIX];
    char side_path[BM_REDIRECT_MAX + sizeof BM_SIDECAR_SUFFIX];
    snprintf(side_name, sizeof side_name, "%s%s", base, BM_SIDECAR_SUFFIX);
    snprintf(side_path, sizeof side_path, "%s%s", target, BM_SIDECAR_SUFFIX);
    int sfd = openat(dir, side_name, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (sfd < 0) {
        int e = errno;
        if (e == ELOOP)
            bm_fail(EPERM, "sidecar %s is a symbolic link; refusing it", side_path);
        else
            bm_fail(e, "cannot open sidecar %s of the redirect target: %s", side_path,
                    strerror(e));
        goto out;
    }
    dst = bm_open_fd(sfd, side_path, flags, fd);
    if (!dst)
        goto out;
    int matches = records_move(dst, token);
    if (matches != 1) {
        bm_close(dst);
        dst = NULL;
        if (matches == 0)
            bm_fail(EPERM, "the sidecar of redirect target %s does not record this move; "
                           "refusing to follow it", target);
        goto out;
    }
    close(dir);
    *image_fd = fd;
    return dst;
out:
    {
        int e = errno;
        if (fd >= 0)
            close(fd);
        close(dir);
        errno = e;
    }
    return NULL;
}

bm_tracker *bm_open_redirect_target(bm_tracker *t, int flags, int *image_fd)
{
    if (!image_fd) {
        bm_fail(EINVAL, "image_fd must not be NULL");
        return NULL;
    }
    *image_fd = -1;
    BM_GUARD_BEGIN(t, g, NULL);
    bm_tracker *dst = do_open_target(t, flags, image_fd);
    BM_GUARD_END(g);
    return dst;
}

static int do_get_redirect(bm_tracker *t, char *buf, uint64_t len)
{
    if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) != BM_STATE_REDIRECTED)
        return bm_fail(ENOENT, "the image was not redirected");
    size_t n = strnlen(t->ctl->redirect_target, BM_REDIRECT_MAX);
    if (n == BM_REDIRECT_MAX)
        n--; /* garbage without a NUL */
    if (n + 1 > len)
        return bm_fail(ERANGE, "buffer too small for the redirect target");
    memcpy(buf, t->ctl->redirect_target, n);
    buf[n] = '\0';
    return 0;
}

int bm_get_redirect(bm_tracker *t, char *buf, uint64_t len)
{
    BM_GUARDED(int, t, do_get_redirect(t, buf, len));
}
