/* cbt.c - the sidecar file: create, validate, map, writer slots, reset.
 *
 * The sidecar is mapped MAP_SHARED over a reservation sized for the largest
 * image (bm_max_image_for), not just the current file: when any process
 * grows the file, every other process's mapping already covers the new pages,
 * so nobody ever remaps and no pointer ever moves under a concurrent writer.
 */
#include "bm_internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

static __thread char last_error[512] = "no error";

const char *bm_last_error(void) { return last_error; }

int bm_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

int bm_fail_too_big(uint32_t shift, uint64_t size)
{
    uint64_t limit = bm_max_image_for(shift);
    if (limit == BM_MAX_IMAGE_SIZE)
        return bm_fail(EFBIG, "size %llu is past the 1 PiB limit", (unsigned long long)size);
    return bm_fail(EFBIG, "size %llu is past the %llu TiB limit for %u-byte granules",
                   (unsigned long long)size, (unsigned long long)(limit >> 40), 1u << shift);
}

uint64_t bm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Read /proc/PID/stat: the state letter (field 3) and the start time in
 * clock ticks since boot (field 22). Together pid and start time name one
 * process for the life of the machine. Returns -1 when there is no such
 * process. */
static int proc_stat(pid_t pid, char *state, uint64_t *start_time)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    /* The command name may hold spaces and parentheses: count from the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -1;
    *state = p[2];
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    *start_time = strtoull(p, NULL, 10);
    return 0;
}

/* Start time of PID (see proc_stat), or 0 when the process does not exist. */
uint64_t bm_proc_start_time(pid_t pid)
{
    char state;
    uint64_t start;
    return proc_stat(pid, &state, &start) < 0 ? 0 : start;
}

/* Does PID still have a thread besides its (exited) leader? A process whose
 * main thread called pthread_exit shows as a zombie in /proc/PID/stat while
 * its other threads run on. */
static int has_other_threads(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL)
        if (e->d_name[0] != '.' && strtol(e->d_name, NULL, 10) != (long)pid)
            found = 1;
    closedir(d);
    return found;
}

/* Is the process that was PID with START_TIME still running? A zombie is
 * not: it was killed or exited and only waits for its parent to reap it, so
 * it will never finish a write or thaw a freeze. Treating it as alive left a
 * SIGKILLed writer's sidecar looking clean (I4) and kept writers frozen
 * behind a SIGKILLed copier (I3) until the parent happened to reap them. */
int bm_process_alive(uint32_t pid, uint64_t start_time)
{
    if (pid == 0)
        return 0;
    char state;
    uint64_t now_start;
    if (proc_stat((pid_t)pid, &state, &now_start) < 0 || now_start != start_time)
        return 0;
    if (state == 'Z' || state == 'X' || state == 'x')
        return has_other_threads((pid_t)pid);
    return 1;
}

/* Does process PID map the file DEV:INO (a line of /proc/PID/maps)? 1 yes,
 * 0 no, -1 unknown (no permission to look, or the process is gone). Every
 * real writer maps its sidecar for as long as it holds its slot. */
int bm_process_maps(uint32_t pid, dev_t dev, ino_t ino)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%u/maps", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    int found = 0, at_start = 1, any = 0;
    while (!found && fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        int starts = at_start;
        at_start = n > 0 && line[n - 1] == '\n';
        if (!starts)
            continue; /* the rest of a long path */
        any = 1;
        unsigned maj, min;
        unsigned long long inode;
        if (sscanf(line, "%*s %*s %*s %x:%x %llu", &maj, &min, &inode) == 3 &&
            inode == (unsigned long long)ino && maj == major(dev) && min == minor(dev))
            found = 1;
    }
    fclose(f);
    /* Reading another user's maps without ptrace rights yields nothing. */
    return found ? 1 : any ? 0 : -1;
}

/* Is some process PID running (whatever its start time)? */
static int pid_running(uint32_t pid)
{
    uint64_t start = bm_proc_start_time((pid_t)pid);
    return start != 0 && bm_process_alive(pid, start);
}

static uint64_t fnv1a64(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t header_checksum(const struct bm_header *h)
{
    return fnv1a64(h, offsetof(struct bm_header, checksum));
}

/* Bytes of chunks (bits and eras) needed for an image of IMAGE_SIZE. */
static uint64_t bitmap_bytes_for(uint64_t image_size, uint32_t shift)
{
    uint64_t granules = (image_size + ((uint64_t)1 << shift) - 1) >> shift;
    uint64_t chunks = (granules + BM_CHUNK_GRANULES - 1) / BM_CHUNK_GRANULES;
    uint64_t bytes = chunks * BM_CHUNK_BYTES;
    return (bytes + BM_PAGE - 1) / BM_PAGE * BM_PAGE;
}

static int shift_of(uint32_t granularity);

int64_t bm_sidecar_bytes(uint64_t image_size, uint32_t granularity)
{
    int shift = shift_of(granularity);
    if (shift < 0)
        return bm_fail(EINVAL, "granularity %u is not a power of two in range", granularity);
    if (image_size > bm_max_image_for((uint32_t)shift))
        return bm_fail_too_big((uint32_t)shift, image_size);
    return (int64_t)(BM_BITMAP_OFFSET + bitmap_bytes_for(image_size, (uint32_t)shift));
}

static size_t reservation_for(uint32_t shift)
{
    return BM_BITMAP_OFFSET + bitmap_bytes_for(bm_max_image_for(shift), shift);
}

static int shift_of(uint32_t granularity)
{
    if (granularity < BM_MIN_GRANULARITY || granularity > BM_MAX_GRANULARITY ||
        (granularity & (granularity - 1)) != 0)
        return -1;
    return __builtin_ctz(granularity);
}

int bm_image_identity(int fd, struct stat *st, uint64_t *btime_ns)
{
    if (fstat(fd, st) < 0)
        return -1;
    *btime_ns = 0;
    struct statx sx;
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT, STATX_BTIME, &sx) == 0 &&
        (sx.stx_mask & STATX_BTIME))
        *btime_ns = (uint64_t)sx.stx_btime.tv_sec * 1000000000u + sx.stx_btime.tv_nsec;
    return 0;
}

int bm_create(const char *path, int image_fd, uint64_t image_size, uint32_t granularity)
{
    int shift = shift_of(granularity);
    if (shift < 0)
        return bm_fail(EINVAL, "granularity %u is not a power of two between %u and %u",
                       granularity, BM_MIN_GRANULARITY, BM_MAX_GRANULARITY);
    if (image_size > bm_max_image_for((uint32_t)shift))
        return bm_fail_too_big((uint32_t)shift, image_size);
    struct stat img;
    uint64_t btime;
    if (bm_image_identity(image_fd, &img, &btime) < 0)
        return bm_fail(errno, "cannot stat the image of sidecar %s: %s", path, strerror(errno));
    if (!S_ISREG(img.st_mode))
        return bm_fail(EINVAL, "the image of sidecar %s is not a regular file", path);

    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return bm_fail(errno, "cannot create sidecar %s: %s", path, strerror(errno));

    struct bm_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, BM_MAGIC, 8);
    h.version = BM_FORMAT_VERSION;
    h.header_size = BM_PAGE;
    h.granularity = granularity;
    h.granularity_shift = (uint32_t)shift;
    h.control_offset = BM_CONTROL_OFFSET;
    h.bitmap_offset = BM_BITMAP_OFFSET;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h.created_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    h.image_dev = (uint64_t)img.st_dev;
    h.image_ino = (uint64_t)img.st_ino;
    h.image_btime_ns = btime;
    int err = 0;
    if (getrandom(h.series, sizeof h.series, 0) != (ssize_t)sizeof h.series) {
        err = errno ? errno : EIO;
        goto fail;
    }
    h.checksum = header_checksum(&h);
    h.image_size = image_size;
    /* All eras are zero and so are their checksums: sealed from the start. */
    h.era_seal = BM_SEAL_SEALED;

    /* Allocate, don't just extend: a store into a sparse page of a full
     * filesystem would kill the writer with SIGBUS instead of an ENOSPC. */
    err = posix_fallocate(fd, 0, (off_t)(BM_BITMAP_OFFSET + bitmap_bytes_for(image_size, (uint32_t)shift)));
    if (err != 0)
        goto fail;
    if (pwrite(fd, &h, sizeof h, 0) != (ssize_t)sizeof h) {
        err = errno ? errno : EIO;
        goto fail;
    }
    /* The sidecar belongs to the image's owner (I5). */
    if (img.st_uid != geteuid() && fchown(fd, img.st_uid, (gid_t)-1) < 0) {
        err = errno;
        goto fail;
    }
    if (fsync(fd) < 0) {
        err = errno;
        goto fail;
    }
    if (close(fd) < 0) {
        err = errno;
        unlink(path);
        return bm_fail(err, "cannot write sidecar %s: %s", path, strerror(err));
    }
    return 0;
fail:
    close(fd);
    unlink(path);
    return bm_fail(err, "cannot write sidecar %s: %s", path, strerror(err));
}

int bm_slots_claimed(const bm_tracker *t)
{
    int n = 0;
    for (int i = 0; i < BM_MAX_WRITERS; i++)
        if (__atomic_load_n(&t->ctl->slots[i].pid, __ATOMIC_SEQ_CST) != 0)
            n++;
    return n;
}

/* Scan the writer slots: free those of dead processes and, if any, mark the
 * sidecar unclean (I4). Returns the number of live slots. */
static int sweep_slots(bm_tracker *t)
{
    int live = 0;
    for (int i = 0; i < BM_MAX_WRITERS; i++) {
        struct bm_writer_slot *s = &t->ctl->slots[i];
        uint32_t pid = __atomic_load_n(&s->pid, __ATOMIC_ACQUIRE);
        if (pid == 0)
            continue;
        uint64_t start = __atomic_load_n(&s->start_time, __ATOMIC_ACQUIRE);
        if (start == 0) {
            /* Being claimed (or released) right now - unless the claimant
             * died inside bm_open, between taking the slot and stamping its
             * start time. Such a slot used to count as a live writer for
             * ever. Its owner never wrote, so freeing it is no crash (I4). */
            if (pid_running(pid))
                live++;
            else
                __atomic_compare_exchange_n(&s->pid, &pid, 0, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST);
        } else if (bm_process_alive(pid, start))
            live++;
        else {
            __atomic_fetch_or(&t->hdr->flags, BM_FLAG_UNCLEAN, __ATOMIC_SEQ_CST);
            __atomic_store_n(&s->inflight, 0, __ATOMIC_RELEASE);
            __atomic_compare_exchange_n(&s->pid, &pid, 0, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST);
        }
    }
    return live;
}

int bm_sweep_writers(bm_tracker *t)
{
    BM_GUARDED(int, t, sweep_slots(t));
}

static int claim_slot(bm_tracker *t)
{
    uint32_t me = (uint32_t)getpid();
    for (int i = 0; i < BM_MAX_WRITERS; i++) {
        struct bm_writer_slot *s = &t->ctl->slots[i];
        uint32_t expected = 0;
        if (__atomic_compare_exchange_n(&s->pid, &expected, me, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&s->inflight, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&s->start_time, t->my_start_time, __ATOMIC_RELEASE);
            return i;
        }
    }
    return -1;
}

static void release_slot(bm_tracker *t, int slot)
{
    struct bm_writer_slot *s = &t->ctl->slots[slot];
    __atomic_store_n(&s->start_time, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->inflight, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->pid, 0, __ATOMIC_SEQ_CST);
}

int bm_begin_mutation(bm_tracker *t)
{
    if (t->slot >= 0 && t->owner_pid == getpid())
        return -1; /* a writer: its slot already keeps the eras unsealed */
    int slot = t->owner_pid == getpid() ? claim_slot(t) : -1;
    bm_unseal_eras(t); /* with no free slot, still open the seal */
    return slot;
}

void bm_end_mutation(bm_tracker *t, int slot)
{
    if (slot >= 0)
        release_slot(t, slot);
}

/* The first touches of a new handle's mapping: sweep, and for a writer
 * claim a slot and unseal the eras (checking them first: they were at
 * rest). */
static int join(bm_tracker *t, int flags)
{
    BM_GUARD_BEGIN(t, g, -1);
    sweep_slots(t);
    if (flags & BM_OPEN_WRITER) {
        t->slot = claim_slot(t);
        if (t->slot >= 0)
            bm_unseal_eras(t);
    }
    BM_GUARD_END(g);
    return 0;
}

/* What bm_open_fd learns about a sidecar and its image before it maps it. */
struct opening {
    struct stat st;         /* the sidecar */
    struct stat img;        /* its image (when opened with one) */
    uint64_t btime;         /* the image's birth time, 0 where unknown */
    struct bm_header h;     /* the header as read */
    int shift;              /* log2(granularity) */
    int bound;              /* the header names this image */
};

/* The sidecar file itself (I5): a regular file, owned by the image's owner,
 * writable by nobody else. */
static int check_sidecar_file(int fd, const char *path, int flags, int image_fd,
                              struct opening *o)
{
    if ((flags & ~(BM_OPEN_WRITER)) != 0)
        return bm_fail(EINVAL, "unknown bm_open flags %#x", (unsigned)flags);
    if (image_fd < 0 && (flags & BM_OPEN_WRITER))
        return bm_fail(EBADF, "a writer must open sidecar %s with its image", path);
    if (image_fd >= 0 && bm_image_identity(image_fd, &o->img, &o->btime) < 0)
        return bm_fail(errno, "cannot stat the image of sidecar %s: %s", path, strerror(errno));
    if (fstat(fd, &o->st) < 0)
        return bm_fail(errno, "cannot stat sidecar %s: %s", path, strerror(errno));
    if (!S_ISREG(o->st.st_mode))
        return bm_fail(EPERM, "sidecar %s is not a regular file", path);
    if (image_fd >= 0 && o->st.st_uid != o->img.st_uid)
        return bm_fail(EPERM, "sidecar %s is owned by uid %u, not the image's owner uid %u",
                       path, (unsigned)o->st.st_uid, (unsigned)o->img.st_uid);
    if (o->st.st_mode & (S_IWGRP | S_IWOTH))
        return bm_fail(EPERM, "sidecar %s is writable by group or others (mode %04o); "
                       "it can redirect writers, so it must be 0600", path,
                       (unsigned)(o->st.st_mode & 07777));
    return 0;
}

/* The header: magic, format version, checksum, layout, and a file long
 * enough for the bitmap it describes. */
static int check_header(int fd, const char *path, struct opening *o)
{
    struct bm_header *h = &o->h;
    if ((uint64_t)o->st.st_size < BM_BITMAP_OFFSET || pread(fd, h, sizeof *h, 0) != (ssize_t)sizeof *h)
        return bm_fail(EUCLEAN, "sidecar %s is truncated (%lld bytes)", path,
                       (long long)o->st.st_size);
    if (memcmp(h->magic, BM_MAGIC, 8) != 0)
        return bm_fail(EUCLEAN, "%s is not a blockmirror sidecar (bad magic)", path);
    if (h->version != BM_FORMAT_VERSION)
        return bm_fail(EUCLEAN, "sidecar %s has format version %u; this build reads only %u%s",
                       path, h->version, BM_FORMAT_VERSION,
                       h->version < BM_FORMAT_VERSION
                           ? " (made by an older blockmirror: remove it and enable tracking "
                             "again, then take a full copy)"
                           : "");
    o->shift = shift_of(h->granularity);
    if (h->checksum != header_checksum(h) || o->shift < 0 ||
        (uint32_t)o->shift != h->granularity_shift || h->header_size != BM_PAGE ||
        h->control_offset != BM_CONTROL_OFFSET || h->bitmap_offset != BM_BITMAP_OFFSET)
        return bm_fail(EUCLEAN, "sidecar %s header is corrupt (checksum mismatch)", path);
    if (h->image_size > bm_max_image_for((uint32_t)o->shift) ||
        (uint64_t)o->st.st_size < BM_BITMAP_OFFSET + bitmap_bytes_for(h->image_size,
                                                                       (uint32_t)o->shift))
        return bm_fail(EUCLEAN, "sidecar %s is truncated: its bitmap cannot cover %llu bytes",
                       path, (unsigned long long)h->image_size);
    return 0;
}

/* Does the header name the image (dev, ino, birth time)? A writer may only
 * open a sidecar of its own image: one left beside a new file at the old
 * path (a move killed after its redirect, an image replaced by rename) has a
 * bitmap, and maybe a redirect, about another file. */
static int check_binding(const char *path, int flags, int image_fd, struct opening *o)
{
    const struct bm_header *h = &o->h;
    o->bound = image_fd >= 0 && h->image_dev == (uint64_t)o->img.st_dev &&
               h->image_ino == (uint64_t)o->img.st_ino && h->image_btime_ns == o->btime;
    if ((flags & BM_OPEN_WRITER) && !o->bound)
        return bm_fail(EUCLEAN, "sidecar %s was made for another file (device %llu, inode "
                       "%llu, born %llu), not this image (device %llu, inode %llu, born "
                       "%llu): remove it, or accept it with blockmirror track reset", path,
                       (unsigned long long)h->image_dev, (unsigned long long)h->image_ino,
                       (unsigned long long)h->image_btime_ns,
                       (unsigned long long)o->img.st_dev, (unsigned long long)o->img.st_ino,
                       (unsigned long long)o->btime);
    return 0;
}

static void free_handle(bm_tracker *t)
{
    if (t->map)
        munmap(t->map, t->map_len);
    pthread_mutex_destroy(&t->grow_lock);
    pthread_mutex_destroy(&t->mirror_lock);
    free(t);
}

/* A handle on the checked sidecar FD, mapped; NULL with bm_fail on failure
 * (FD is the caller's to close then). */
static bm_tracker *new_handle(int fd, const char *path, int flags, int image_fd,
                              const struct opening *o)
{
    bm_tracker *t = calloc(1, sizeof *t);
    if (!t) {
        bm_fail(ENOMEM, "out of memory");
        return NULL;
    }
    t->fd = fd;
    t->flags = flags;
    t->owner_pid = getpid();
    t->my_start_time = bm_proc_start_time(t->owner_pid);
    t->sidecar_dev = o->st.st_dev;
    t->sidecar_ino = o->st.st_ino;
    t->slot = -1;
    t->shift = (uint32_t)o->shift;
    t->map_len = reservation_for((uint32_t)o->shift);
    if (image_fd >= 0) {
        t->have_image = 1;
        t->bound = o->bound;
        t->image_dev = (uint64_t)o->img.st_dev;
        t->image_ino = (uint64_t)o->img.st_ino;
        t->image_btime_ns = o->btime;
        t->image_uid = (uint32_t)o->img.st_uid;
    }
    pthread_mutex_init(&t->grow_lock, NULL);
    pthread_mutex_init(&t->mirror_lock, NULL);
    t->mirror_fd = -1;
    void *m = mmap(NULL, t->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (m == MAP_FAILED) {
        bm_fail(errno, "cannot map sidecar %s: %s", path, strerror(errno));
        free_handle(t);
        return NULL;
    }
    /* Scans read a word or a slot per chunk (16 KiB apart): on a cold big
     * sidecar, readahead around each would pull in all of it (1 GiB at
     * 15 TiB: seconds, and a peak of mapped pages), so there the kernel is
     * told to fault in only what is touched. A small one is cheap to read
     * whole once, and readahead's large folios make its later scans fault
     * less. Advice only: a refusal changes nothing. */
    if ((uint64_t)o->st.st_size >= BM_RANDOM_ACCESS_BYTES)
        (void)madvise(m, t->map_len, MADV_RANDOM);
    t->map = m;
    t->hdr = (struct bm_header *)t->map;
    t->ctl = (struct bm_control *)(t->map + BM_CONTROL_OFFSET);
    t->data = t->map + BM_BITMAP_OFFSET;
    t->stripes = (struct bm_stripe *)(t->map + BM_INTERLOCK_OFFSET);
    return t;
}

bm_tracker *bm_open_fd(int fd, const char *path, int flags, int image_fd)
{
    struct opening o;
    memset(&o, 0, sizeof o);
    bm_tracker *t = NULL;
    if (bm_guard_install() < 0 || check_sidecar_file(fd, path, flags, image_fd, &o) < 0 ||
        check_header(fd, path, &o) < 0 || check_binding(path, flags, image_fd, &o) < 0 ||
        (t = new_handle(fd, path, flags, image_fd, &o)) == NULL) {
        int e = errno;
        close(fd);
        errno = e;
        return NULL;
    }
    if (join(t, flags) < 0) {
        bm_close(t);
        return NULL;
    }
    if ((flags & BM_OPEN_WRITER) && t->slot < 0) {
        bm_fail(EBUSY, "sidecar %s already has %d writers", path, BM_MAX_WRITERS);
        bm_close(t);
        return NULL;
    }
    return t;
}

bm_tracker *bm_open(const char *path, int flags, int image_fd)
{
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ELOOP)
            bm_fail(EPERM, "sidecar %s is a symbolic link; refusing it", path);
        else
            bm_fail(e, "cannot open sidecar %s: %s", path, strerror(e));
        return NULL;
    }
    return bm_open_fd(fd, path, flags, image_fd);
}

/* What a closing handle owes the sidecar, under a guard. Only the process
 * that claimed the slot may release it: a forked child closing an inherited
 * handle must not make its parent look gone. */
static int leave(bm_tracker *t)
{
    BM_GUARD_BEGIN(t, g, -1);
    if (t->slot >= 0) {
        release_slot(t, t->slot);
        t->slot = -1;
        bm_seal_eras(t); /* if this was the last writer out */
    }
    bm_mirror_release(t);
    /* A copier that closes while holding a freeze must never leave writers
     * frozen (I3/I6). */
    uint32_t me = (uint32_t)getpid();
    if (__atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE) == me) {
        uint32_t st = __atomic_load_n(&t->ctl->state, __ATOMIC_ACQUIRE);
        if (st == BM_STATE_FREEZING || st == BM_STATE_FROZEN)
            bm_thaw(t);
    }
    BM_GUARD_END(g);
    return 0;
}

int bm_close(bm_tracker *t)
{
    if (!t)
        return 0;
    if (!__atomic_load_n(&t->broken, __ATOMIC_RELAXED) && t->owner_pid == getpid())
        leave(t);
    if (t->mirror_fd >= 0)
        close(t->mirror_fd);
    int rc = close(t->fd);
    int e = errno;
    free_handle(t);
    if (rc < 0)
        return bm_fail(e, "closing sidecar failed: %s", strerror(e));
    return 0;
}

int bm_get_info(bm_tracker *t, bm_info *out)
{
    memset(out, 0, sizeof *out);
    BM_GUARD_BEGIN(t, g, -1);
    out->version = t->hdr->version;
    out->granularity = t->hdr->granularity;
    out->image_size = bm_image_size(t);
    out->generation = __atomic_load_n(&t->hdr->generation, __ATOMIC_ACQUIRE);
    memcpy(out->series, t->hdr->series, sizeof out->series);
    /* What the slots say, without asking /proc: a read must not change the
     * sidecar (bm_sweep_writers does that, explicitly). */
    out->live_writers = (uint32_t)bm_slots_claimed(t);
    out->flags = __atomic_load_n(&t->hdr->flags, __ATOMIC_ACQUIRE);
    if (t->have_image && !t->bound)
        out->flags |= BM_FLAG_NOT_THIS_IMAGE;
    out->state = __atomic_load_n(&t->ctl->state, __ATOMIC_ACQUIRE);
    out->copier_pid = __atomic_load_n(&t->ctl->copier_pid, __ATOMIC_ACQUIRE);
    out->throttle_bytes_per_s = __atomic_load_n(&t->ctl->throttle_bytes_per_s, __ATOMIC_ACQUIRE);
    out->lease_deadline_ns = __atomic_load_n(&t->ctl->lease_deadline_ns, __ATOMIC_ACQUIRE);
    out->last_write_ns = __atomic_load_n(&t->ctl->last_write_ns, __ATOMIC_ACQUIRE);
    out->bytes_written = __atomic_load_n(&t->ctl->bytes_written, __ATOMIC_RELAXED);
    BM_GUARD_END(g);
    return 0;
}

static int reset_locked(bm_tracker *t)
{
    /* Mark first, then publish the new series: a reader that sees the new
     * series id also sees every granule dirty. The series lives in the
     * checksummed part, so rewrite the checksum too. */
    bm_mark_granules(t, 0, bm_granules(t, bm_image_size(t)));
    /* Forget the old series' eras so they raise no false positives later. A
     * writer racing with this can only leave an era too high (a false
     * positive), never too low: eras are raised with compare-and-swap. */
    bm_zero_eras(t);
    uint8_t series[16];
    if (getrandom(series, sizeof series, 0) != (ssize_t)sizeof series)
        return bm_fail(errno ? errno : EIO, "no randomness for a new series id");
    memcpy(t->hdr->series, series, sizeof series);
    if (t->have_image && !t->bound) {
        /* Accepting a sidecar found beside another file: it tracks this
         * image from now on, and a redirect it held was about the old one. */
        t->hdr->image_dev = t->image_dev;
        t->hdr->image_ino = t->image_ino;
        t->hdr->image_btime_ns = t->image_btime_ns;
        if (__atomic_load_n(&t->ctl->state, __ATOMIC_SEQ_CST) == BM_STATE_REDIRECTED) {
            memset(t->ctl->move_token, 0, sizeof t->ctl->move_token);
            memset(t->ctl->redirect_target, 0, sizeof t->ctl->redirect_target);
            __atomic_store_n(&t->ctl->state, BM_STATE_RUNNING, __ATOMIC_SEQ_CST);
        }
        t->bound = 1;
    }
    t->hdr->checksum = header_checksum(t->hdr);
    bm_clear_stripes(t);
    __atomic_store_n(&t->hdr->generation, 0, __ATOMIC_SEQ_CST);
    sweep_slots(t);
    __atomic_fetch_and(&t->hdr->flags, ~(uint32_t)(BM_FLAG_UNCLEAN | BM_FLAG_ERAS_DAMAGED),
                       __ATOMIC_SEQ_CST);
    return 0;
}

int bm_reset(bm_tracker *t)
{
    BM_GUARD_BEGIN(t, g, -1);
    int slot = bm_begin_mutation(t);
    int rc = reset_locked(t);
    bm_end_mutation(t, slot);
    if (rc == 0)
        bm_seal_eras(t); /* all zero again; seals only if no writer is in */
    BM_GUARD_END(g);
    if (rc == 0 && msync(t->map, BM_PAGE, MS_SYNC) < 0)
        return bm_fail(errno, "cannot persist sidecar header: %s", strerror(errno));
    return rc;
}

int bm_verify_eras(bm_tracker *t)
{
    BM_GUARDED(int, t, bm_check_eras(t));
}

const char *bm_sidecar_suffix(void) { return BM_SIDECAR_SUFFIX; }

/* Make the sidecar file long enough for a bitmap covering IMAGE_SIZE. The
 * mapping already spans the reservation, so growing the file is all it takes
 * for every process to see the new words. */
int bm_ensure_capacity(bm_tracker *t, uint64_t image_size)
{
    if (image_size > bm_max_image_for(t->shift))
        return bm_fail_too_big(t->shift, image_size);
    off_t want = (off_t)(BM_BITMAP_OFFSET + bitmap_bytes_for(image_size, t->shift));
    pthread_mutex_lock(&t->grow_lock);
    struct stat st;
    int rc = 0;
    if (fstat(t->fd, &st) < 0)
        rc = bm_fail(errno, "cannot stat sidecar: %s", strerror(errno));
    else if (st.st_size < want) {
        /* fallocate, not ftruncate: a store into a sparse page of a full
         * filesystem would SIGBUS the writer; fallocate reports ENOSPC here. */
        int err = posix_fallocate(t->fd, st.st_size, want - st.st_size);
        if (err != 0)
            rc = bm_fail(err, "cannot grow sidecar: %s", strerror(err));
    }
    pthread_mutex_unlock(&t->grow_lock);
    return rc;
}
