/* bm_internal.h - what the C files share and Python never sees: the sidecar's
 * on-disk layout, the handle, and small helpers. Include this, never
 * blockmirror.h directly (that file is also the cffi cdef and so carries no
 * #include of its own). */
#ifndef BM_INTERNAL_H
#define BM_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <pthread.h>
#include <setjmp.h>

#include "blockmirror.h"

#define BM_MAGIC "BMCBT\r\n\032"     /* 8 bytes; \r\n catches text-mode mangling */
#define BM_SIDECAR_SUFFIX ".cbt"     /* IMAGE.cbt beside IMAGE (bm_sidecar_suffix) */
#define BM_PAGE 4096u
#define BM_CONTROL_OFFSET 4096u
/* Pages 2..9: the mirror interlock (I7), see struct bm_stripe. */
#define BM_INTERLOCK_OFFSET 8192u
#define BM_STRIPES 4096u
#define BM_BITMAP_OFFSET (BM_INTERLOCK_OFFSET + BM_STRIPES * 8u)

/* From BM_BITMAP_OFFSET the sidecar is a row of chunks, each covering
 * BM_CHUNK_GRANULES granules: their dirty bits (64-bit words), then their
 * eras (one uint32 per granule: the generation current when the granule was
 * last written), then the eras' checksum (bm_era_sum; 0 for all-zero eras,
 * so a freshly allocated chunk is valid). Chunks let the arrays grow in
 * place when the image grows, and keep each array contiguous within a chunk
 * for fast scans. */
#define BM_CHUNK_GRANULES 4096u
#define BM_CHUNK_WORDS (BM_CHUNK_GRANULES / 64u)
#define BM_CHUNK_ERAS_OFFSET (BM_CHUNK_WORDS * 8u)
#define BM_CHUNK_SUM_OFFSET (BM_CHUNK_ERAS_OFFSET + BM_CHUNK_GRANULES * 4u)
#define BM_CHUNK_BYTES (BM_CHUNK_SUM_OFFSET + 8u)

/* The state in header.era_seal (its low two bits): whether the chunks' era
 * checksums hold (invariant I4 for change ids: a crash or a stray write that
 * changes eras while nobody tracks must not go unnoticed). */
#define BM_SEAL_OPEN 0      /* eras may be changing: checksums mean nothing */
#define BM_SEAL_SEALING 1   /* a last writer out is computing them */
#define BM_SEAL_SEALED 2    /* every chunk's checksum matches its eras */
#define BM_SEAL_CHECKING 3  /* the first handle in checks them; others wait */

/* Page 0. Fields up to `checksum` are written once at creation and covered
 * by the checksum; the ones after it change while the sidecar is in use and
 * are touched with atomics only. */
struct bm_header {
    char magic[8];
    uint32_t version;
    uint32_t header_size;       /* BM_PAGE */
    uint32_t granularity;
    uint32_t granularity_shift;
    uint64_t control_offset;
    uint64_t bitmap_offset;
    uint8_t series[16];
    uint64_t created_ns;        /* CLOCK_REALTIME, for people reading dumps */
    /* The image this sidecar tracks (its st_dev and st_ino): a sidecar left
     * beside another file at the same path binds nothing (issue 13). Set at
     * creation, rebound by bm_reset. */
    uint64_t image_dev;
    uint64_t image_ino;
    uint64_t image_btime_ns;    /* its birth time (statx), 0 where unknown: inode
                                 * numbers are reused at once by a new file */
    uint64_t checksum;          /* FNV-1a 64 of the bytes above */
    /* dynamic */
    uint64_t image_size;
    uint64_t generation;        /* bumped by change ids and full scans; eras record it */
    uint32_t flags;
    uint32_t era_seal;          /* epoch << 2 | BM_SEAL_* (eras.c) */
    uint32_t seal_epoch;        /* the latest sealing's epoch (for dumps only) */
    uint32_t reserved0;
};

/* One per process that has the sidecar open for writing. A slot whose
 * process is gone (pid absent, or reused with another start time) is the
 * evidence of a crash that invariant I4 needs. */
struct bm_writer_slot {
    uint32_t pid;
    uint32_t inflight;          /* writes of this process between enter and leave */
    uint64_t start_time;        /* /proc/PID/stat field 22 */
};

/* Page 1: the freeze protocol (I3), throttle and redirect. */
struct bm_control {
    uint32_t state;
    uint32_t copier_pid;
    uint64_t copier_start_time;
    uint64_t lease_deadline_ns;     /* CLOCK_MONOTONIC */
    uint64_t heartbeat_ns;
    uint64_t throttle_bytes_per_s;
    uint64_t throttle_next_ns;      /* GCRA virtual time shared by all writers */
    uint64_t freeze_count;
    char redirect_target[BM_REDIRECT_MAX];
    struct bm_writer_slot slots[BM_MAX_WRITERS];
    /* Who set the throttle: it binds writers only while that process lives,
     * so a copier that dies mid-sync never leaves writers slowed (I6). */
    uint32_t throttle_owner_pid;
    uint32_t reserved1;
    uint64_t throttle_owner_start;
    /* A move: bm_redirect draws a random token and stores it in the source's
     * move_token and the destination sidecar's moved_from; a writer follows
     * a redirect only to a sidecar whose moved_from matches (so a redirect
     * forged into one sidecar cannot steer writers into another image). */
    uint8_t move_token[16];
    uint8_t moved_from[16];
    /* CLOCK_REALTIME when the latest tracked write, discard or truncate
     * ended (raised with an atomic max): the image's mtime moving past it
     * means a write that bypassed the tracker. */
    uint64_t last_write_ns;
    /* Active mirroring (mirror.c): while ON and its owner (the copier that
     * started it) lives, writes to ranges not dirty also go to
     * mirror_target, the file whose st_dev/st_ino are recorded here. */
    uint32_t mirror_state;          /* BM_MIRROR_* */
    uint32_t mirror_epoch;          /* bumped by every bm_mirror_start */
    uint32_t mirror_owner_pid;
    uint32_t reserved2;
    uint64_t mirror_owner_start;
    uint64_t mirror_dev, mirror_ino;
    uint64_t mirrored_bytes;        /* written to both sides since the start */
    uint64_t mirror_fallbacks;      /* writes that met a copier or a conflict */
    int32_t mirror_errno;           /* why it FAILED */
    uint32_t reserved3;
    char mirror_target[BM_REDIRECT_MAX];
    uint64_t bytes_written;         /* by tracked writes (bm_pwrite), ever: a rate gauge */
};

/* The mirror interlock (invariant I7): granule G belongs to stripe
 * G % BM_STRIPES. A writer about to mirror a write claims each stripe of its
 * range (mirroring 0 -> 1; any other count, or a copier on the stripe, and
 * it falls back to marking dirty); a copier about to read a range counts
 * itself in (copying) and waits until no mirrored write holds its stripes.
 * Both publish, then look (sequentially consistent), as the freeze does, so
 * a copier's read either follows every mirrored write it overlaps or the
 * write sees the copier and leaves its range dirty. Not persistent: counts
 * a crashed process left behind only make writers fall back and copiers
 * time out; bm_reset and a new mirror clear them. */
struct bm_stripe {
    uint32_t mirroring;         /* mirrored writes in flight (0 or 1 when sane) */
    uint32_t copying;           /* copier reads in flight */
};

/* Mirror states (control block mirror_state). */
#define BM_MIRROR_OFF 0
#define BM_MIRROR_ON 1
#define BM_MIRROR_FAILED 2      /* a destination write failed: off for everyone */

struct bm_tracker {
    int fd;
    int flags;
    pid_t owner_pid;            /* the process that opened this handle */
    int slot;                   /* claimed writer slot, or -1 */
    unsigned char *map;         /* whole reservation; valid up to file size */
    size_t map_len;
    struct bm_header *hdr;
    struct bm_control *ctl;
    unsigned char *data;        /* the first chunk (map + BM_BITMAP_OFFSET) */
    uint32_t shift;             /* log2(granularity) */
    uint64_t throttle_checked_ns;   /* when this handle last saw the throttle's owner alive */
    pthread_mutex_t grow_lock;  /* serialises ftruncate of the sidecar in this process */
    /* The image this handle was opened with (bm_open's IMAGE_FD), if any. */
    int have_image;
    int bound;                  /* the header names that image (dev, ino, btime) */
    uint64_t image_dev, image_ino, image_btime_ns;
    uint32_t image_uid;
    uint64_t my_start_time;     /* this process's /proc start time */
    dev_t sidecar_dev;          /* the sidecar's own st_dev and st_ino */
    ino_t sidecar_ino;
    uint32_t throttle_owner_seen;   /* throttle owner pid found mapping the sidecar */
    int broken;                 /* a SIGBUS hit the mapping: touch it no more */
    uint32_t verified_seal;     /* the era_seal word (sealed) this handle checked and
                                 * found intact (0: none) */
    struct bm_stripe *stripes;  /* the interlock (map + BM_INTERLOCK_OFFSET) */
    /* This process's fd of the mirror target, opened on the first mirrored
     * write of each mirror epoch (mirror.c). */
    pthread_mutex_t mirror_lock;
    int mirror_fd;
    uint32_t mirror_fd_epoch;
    uint64_t mirror_checked_ns; /* when its owner was last seen alive */
};

/* At most 2^34 granules per sidecar: the largest image is 1 PiB at 64 KiB
 * granules and above, 64 TiB at 4 KiB. Bounds the address space each handle
 * reserves (about 70 GB), so a process can hold thousands of trackers. */
#define BM_MAX_GRANULE_SHIFT 34u
static inline uint64_t bm_max_image_for(uint32_t shift)
{
    uint64_t by_granules = (uint64_t)1 << (shift + BM_MAX_GRANULE_SHIFT);
    return by_granules < BM_MAX_IMAGE_SIZE ? by_granules : BM_MAX_IMAGE_SIZE;
}

/* cbt.c: sidecars from this size up (an image of about 4 TiB at 64 KiB
 * granules) are mapped for random access (no readahead, see new_handle). */
#define BM_RANDOM_ACCESS_BYTES (256ull << 20)

/* cbt.c */
int bm_fail_too_big(uint32_t shift, uint64_t size);
int bm_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t bm_now_ns(void);
uint64_t bm_proc_start_time(pid_t pid);
int bm_process_alive(uint32_t pid, uint64_t start_time);
/* Does process PID map the file DEV:INO (its /proc/PID/maps)? 1 yes, 0 no,
 * -1 unknown (no right to look, or gone). Every process holding a tracker
 * maps its sidecar, so a live pid in the control block that does not is
 * forged (or reused). Reads a /proc file: not for hot paths. */
int bm_process_maps(uint32_t pid, dev_t dev, ino_t ino);
/* A wait longer than this makes writers and the drain ask whether the
 * process named in the control block maps the sidecar at all. */
#define BM_SUSPICIOUS_WAIT_NS (50ull * 1000000ull)
int bm_ensure_capacity(bm_tracker *t, uint64_t image_size);

/* bitmap.c */
static inline uint64_t bm_granules(const bm_tracker *t, uint64_t size)
{
    return (size + ((uint64_t)1 << t->shift) - 1) >> t->shift;
}
static inline uint64_t bm_words_for(uint64_t granules) { return (granules + 63) / 64; }
static inline uint64_t bm_image_size(const bm_tracker *t)
{
    return __atomic_load_n(&t->hdr->image_size, __ATOMIC_ACQUIRE);
}
static inline uint64_t *bm_word(const bm_tracker *t, uint64_t w)
{
    return (uint64_t *)(t->data + (w / BM_CHUNK_WORDS) * BM_CHUNK_BYTES) + (w % BM_CHUNK_WORDS);
}
static inline uint32_t *bm_era(const bm_tracker *t, uint64_t g)
{
    return (uint32_t *)(t->data + (g / BM_CHUNK_GRANULES) * BM_CHUNK_BYTES +
                        BM_CHUNK_ERAS_OFFSET) + (g % BM_CHUNK_GRANULES);
}
/* Chunk C's era checksum slot: the sealing epoch << 32 | a 32-bit checksum,
 * or a writer's mark, BM_SLOT_TOUCH | epoch << 32 (eras.c). */
#define BM_SLOT_TOUCH (1ull << 63)
static inline uint64_t *bm_era_sum_slot(const bm_tracker *t, uint64_t c)
{
    return (uint64_t *)(t->data + c * BM_CHUNK_BYTES + BM_CHUNK_SUM_OFFSET);
}
void bm_mark_granules(bm_tracker *t, uint64_t first, uint64_t last_excl);

/* eras.c: the era checksums (header.era_seal). All thread- and
 * process-safe; the seal and the check load one slot per chunk and read the
 * eras of the chunks written (marked, or sealed non-zero), so none is for a
 * hot path but bm_touch_chunk. */

/* Every era of the image to 0 (a reset; the caller opened the seal), and
 * the checksums with them. */
void bm_zero_eras(bm_tracker *t);
/* 1 while the eras are sealed: every chunk's checksum then holds (the
 * last seal stored it, and a writer opens the seal before it raises). */
int bm_eras_sealed(const bm_tracker *t);
/* 1 if chunk C's checksum is that of all-zero eras (and no mark): with the
 * eras sealed, none of its granules was written in this series. */
int bm_chunk_sum_zero(const bm_tracker *t, uint64_t c);
/* After raising eras in chunk C (the caller holds a writer slot, or opened
 * the seal): mark its slot so the next sealing recomputes its checksum. */
void bm_touch_chunk(bm_tracker *t, uint64_t c);

/* 64-bit checksum of chunk C's eras as they are now (0 when all are zero). */
uint64_t bm_era_sum(const bm_tracker *t, uint64_t c);
/* Last one out: if no writer slot is claimed, store the checksum of every
 * chunk marked since the last sealing and mark the eras sealed (a Dekker
 * handshake with bm_unseal_eras keeps a writer arriving meanwhile from being
 * sealed over). */
void bm_seal_eras(bm_tracker *t);
/* About to change eras (the caller holds a writer slot): if they were
 * sealed, check them first (a mismatch sets BM_FLAG_ERAS_DAMAGED), then open
 * the seal. Waits while another handle is checking (about as long as a slow
 * check takes, at most BM_MAX_LEASE_NS). */
void bm_unseal_eras(bm_tracker *t);
/* 0 if the eras can be trusted now: not flagged damaged and, if sealed,
 * matching their checksums (else flagged). -1 with EBADMSG otherwise. */
int bm_check_eras(bm_tracker *t);

/* cbt.c: for a handle without a writer slot, a slot held just while it
 * changes eras (bm_mark, bm_resize, bm_reset...), so the seal protocol sees
 * it; returns the slot to pass to bm_end_mutation (-1: none was needed or
 * none was free). */
int bm_begin_mutation(bm_tracker *t);
void bm_end_mutation(bm_tracker *t, int slot);
int bm_slots_claimed(const bm_tracker *t);

/* guard.c: surviving a sidecar truncated under a running process. Stores to
 * a MAP_SHARED page past the file's end raise SIGBUS; every public function
 * that touches the mapping runs under a guard whose SIGBUS handler jumps
 * back out (siglongjmp) when the fault is inside a guarded tracker's
 * mapping, and chains to the previous handler otherwise. The handle is then
 * marked broken: every later call fails with EUCLEAN without touching the
 * mapping. */
struct bm_guard {
    sigjmp_buf jump;
    const unsigned char *lo, *hi;   /* the guarded mapping */
    bm_tracker *tracker;
    struct bm_guard *prev;
    volatile int in_flight;         /* the writer counted itself in flight */
};
extern __thread struct bm_guard *bm_guard_top __attribute__((tls_model("initial-exec")));
int bm_guard_install(void);
int bm_guard_fault(struct bm_guard *g);
int bm_fail_broken(void);
static inline void bm_guard_push(struct bm_guard *g, bm_tracker *t)
{
    g->lo = t->map;
    g->hi = t->map + t->map_len;
    g->tracker = t;
    g->prev = bm_guard_top;
    g->in_flight = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    bm_guard_top = g;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}
static inline void bm_guard_pop(struct bm_guard *g)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    bm_guard_top = g->prev;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}
/* Open a guarded region in a function returning FAULT_VALUE on failure:
 * declares guard G; on a SIGBUS inside T's mapping control comes back here
 * and the function returns FAULT_VALUE with errno EUCLEAN. Close it with
 * BM_GUARD_END(G) on every return path after it. */
#define BM_GUARD_BEGIN(t, g, fault_value)                                  \
    struct bm_guard g;                                                     \
    if (__atomic_load_n(&(t)->broken, __ATOMIC_RELAXED))                 \
        return (bm_fail_broken(), (fault_value));                         \
    bm_guard_push(&g, (t));                                                \
    if (sigsetjmp(g.jump, 0) != 0) {                                       \
        bm_guard_pop(&g);                                                  \
        bm_guard_fault(&g);                                                \
        return (fault_value);                                              \
    }
#define BM_GUARD_END(g) bm_guard_pop(&(g))

/* The whole body of a public call: CALL (of TYPE) under the guard, its value
 * returned; -1 (EUCLEAN) if the sidecar's mapping faults meanwhile. */
#define BM_GUARDED(type, t, call)                                          \
    do {                                                                   \
        BM_GUARD_BEGIN(t, g, -1);                                          \
        type guarded_result_ = (call);                                     \
        BM_GUARD_END(g);                                                   \
        return guarded_result_;                                            \
    } while (0)

/* bitmap.c: raise the eras of granules [FIRST, LAST_EXCL) to the current
 * generation without touching their dirty bits (a mirrored write: the
 * destination has it, but a backup tool's change id must still see it). */
void bm_raise_eras_now(bm_tracker *t, uint64_t first, uint64_t last_excl);
/* bitmap.c: unmapping what a walk over the chunks has read behind it. A
 * scan or an era check reads every chunk (1 GiB of eras for 15 TiB at
 * 64 KiB granules); on a MAP_SHARED file mapping MADV_DONTNEED only unmaps
 * pages - the bytes stay in the file and the page cache, and the next access
 * (another thread's atomic op included) maps the same page again - so a
 * sync of a huge sparse image need not keep its sidecar resident. Start
 * with a zeroed walk; call with the chunk the walk reaches next, and once
 * with LAST when it ends there. */
struct bm_forget_walk {
    uintptr_t done;     /* pages below this were unmapped */
};
void bm_forget_behind(const bm_tracker *t, struct bm_forget_walk *w, uint64_t next_chunk,
                      int last);

/* bitmap.c: 1 if any granule of [FIRST, LAST_EXCL) is dirty. */
int bm_any_dirty(bm_tracker *t, uint64_t first, uint64_t last_excl);

/* mirror.c: the writer's side. Write BUF to the source FD and the mirror
 * target when mirroring is on and the range may be mirrored; returns 1 when
 * done that way (LEN bytes on the source; a destination failure only turned
 * mirroring off and left the range dirty), 0 when the caller must take the
 * marked path instead (nothing written), -1 with errno when the source write
 * failed (the range is then marked dirty). */
int bm_mirrored_write(bm_tracker *t, int fd, const char *buf, uint64_t len, uint64_t offset);
/* mirror.c: the same for making a range zeros (bm_zero's FLAGS), on both sides. */
int bm_mirrored_zero(bm_tracker *t, int fd, uint64_t offset, uint64_t len, uint32_t flags);
/* mirror.c: release what a handle holds (its mirror fd; a mirror it owns). */
void bm_mirror_release(bm_tracker *t);
/* mirror.c: zero every stripe count (bm_reset: nothing from before counts). */
void bm_clear_stripes(bm_tracker *t);

/* redirect.c: open absolute PATH read-write for T's writers: no symbolic
 * link in any component, a regular file owned by T's image's owner, not
 * T's image. WHAT names it in messages ("redirect target"). Returns the fd,
 * or -1 with errno and bm_fail (EPERM for a refusal). */
int bm_open_owned_target(bm_tracker *t, const char *path, const char *what);

/* control.c */
int bm_frozen_by_me(bm_tracker *t);
void bm_wake_writers(bm_tracker *t);

/* cbt.c: the identity a sidecar binds: FD's stat, and its birth time in ns
 * (0 where the filesystem keeps none). -1 with errno on failure. */
int bm_image_identity(int fd, struct stat *st, uint64_t *btime_ns);

/* cbt.c: bm_open on an open sidecar FD (taken over: closed on failure too);
 * PATH only names it in messages. */
bm_tracker *bm_open_fd(int fd, const char *path, int flags, int image_fd);

/* pace.c */

/* Sleep NS nanoseconds, resuming after signals. */
void bm_sleep_ns(uint64_t ns);

/* GCRA: claim LEN bytes at BYTES_PER_S of the virtual clock *NEXT_NS
 * (CLOCK_MONOTONIC ns; shared by every caller pacing against it, updated
 * with compare-and-swap, so any threads or processes may call at once) and
 * return how long the caller must sleep before its claim starts (0: go now;
 * also for BYTES_PER_S 0). A clock more than MAX_AHEAD_NS ahead of now is
 * taken for stale (CLOCK_MONOTONIC restarts at boot while a sidecar holding
 * it persists) and restarted from now. */
uint64_t bm_gcra_claim(uint64_t *next_ns, uint64_t bytes_per_s, uint64_t len,
                       uint64_t max_ahead_ns);

/* fsio.c */

/* Operations whose refusal means "the filesystem can't", for
 * bm_errno_unsupported. */
#define BM_OP_PUNCH 1           /* fallocate(FALLOC_FL_PUNCH_HOLE) */
#define BM_OP_SEEK_HOLES 2      /* lseek(SEEK_DATA / SEEK_HOLE) */
#define BM_OP_COPY_RANGE 3      /* copy_file_range */

/* 1 if ERR from operation OP (BM_OP_*) means the filesystem does not support
 * it (the caller falls back for good), 0 if it is a real failure. The one
 * place that decides this. */
int bm_errno_unsupported(int op, int err);

/* Punch [OFFSET, OFFSET+LEN) of FD (PUNCH_HOLE|KEEP_SIZE), retrying EINTR.
 * -1 with errno EOPNOTSUPP when the filesystem can't (whatever errno it
 * gave), else its errno; sets no bm_fail message (callers name the range). */
int bm_punch_hole(int fd, uint64_t offset, uint64_t len);

/* Zero [OFFSET, OFFSET+LEN) of FD where it lies, keeping it allocated
 * (FALLOC_FL_ZERO_RANGE|KEEP_SIZE), retrying EINTR; errno EOPNOTSUPP when
 * the filesystem can't, as bm_punch_hole. */
int bm_zero_in_place(int fd, uint64_t offset, uint64_t len);

/* Make [OFFSET, OFFSET+LEN) of FD read as zeros: punch it (BM_ZERO_MAY_TRIM),
 * else zero it in place (FALLOC_FL_ZERO_RANGE), else write zeros - unless
 * BM_ZERO_FAST says the caller would rather hear EOPNOTSUPP than wait for
 * that (NBD's fast-zero). -1 with errno on failure. */
int bm_zero_range(int fd, uint64_t offset, uint64_t len, uint32_t flags);

/* Read up to LEN bytes of FD at OFFSET into BUF, retrying short reads and
 * EINTR: fewer only at the file's end. The count, or -1 with errno and a
 * bm_fail message naming the offset. */
int64_t bm_pread_full(int fd, char *buf, uint64_t len, uint64_t offset);

/* Most bytes bm_write_zeros hands one pwrite. */
#define BM_ZERO_CHUNK (256u << 10)

/* Write LEN zero bytes at OFFSET of FD (extending it if the range passes its
 * end), retrying short writes and EINTR. -1 with errno and bm_fail on
 * failure, part of the range then written. Thread-safe. */
int bm_write_zeros(int fd, uint64_t offset, uint64_t len);

#endif
