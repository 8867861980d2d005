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
#include <pthread.h>

#include "blockmirror.h"

#define BM_MAGIC "BMCBT\r\n\032"     /* 8 bytes; \r\n catches text-mode mangling */
#define BM_PAGE 4096u
#define BM_CONTROL_OFFSET 4096u
#define BM_BITMAP_OFFSET 8192u

/* From BM_BITMAP_OFFSET the sidecar is a row of chunks, each covering
 * BM_CHUNK_GRANULES granules: their dirty bits (64-bit words), then their
 * eras (one uint32 per granule: the generation current when the granule was
 * last written). Chunks let both arrays grow in place when the image grows,
 * and keep each array contiguous within a chunk for fast scans. */
#define BM_CHUNK_GRANULES 4096u
#define BM_CHUNK_WORDS (BM_CHUNK_GRANULES / 64u)
#define BM_CHUNK_BYTES (BM_CHUNK_WORDS * 8u + BM_CHUNK_GRANULES * 4u)

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
    uint64_t checksum;          /* FNV-1a 64 of the bytes above */
    /* dynamic */
    uint64_t image_size;
    uint64_t generation;        /* bumped by change ids and full scans; eras record it */
    uint32_t flags;
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
};

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

/* cbt.c */
int bm_fail_too_big(uint32_t shift, uint64_t size);
int bm_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t bm_now_ns(void);
uint64_t bm_proc_start_time(pid_t pid);
int bm_process_alive(uint32_t pid, uint64_t start_time);
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
                        BM_CHUNK_WORDS * 8u) + (g % BM_CHUNK_GRANULES);
}
void bm_mark_granules(bm_tracker *t, uint64_t first, uint64_t last_excl);

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

/* Most bytes bm_write_zeros hands one pwrite. */
#define BM_ZERO_CHUNK (256u << 10)

/* Write LEN zero bytes at OFFSET of FD (extending it if the range passes its
 * end), retrying short writes and EINTR. -1 with errno and bm_fail on
 * failure, part of the range then written. Thread-safe. */
int bm_write_zeros(int fd, uint64_t offset, uint64_t len);

#endif
