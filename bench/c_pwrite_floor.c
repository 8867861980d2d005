/* c_pwrite_floor.c - what the tracking itself costs, with no Python at all:
 * bm_pwrite against pwrite(2), 4 KiB writes into a pre-written 64 MiB file in
 * the page cache. Blocks of tracked and plain writes alternate (ABBA order,
 * same positions in opposite halves of the file, as test_pwrite_interleaved
 * does from Python) and each pair of blocks gives one ratio; it prints the
 * median pair ratio. The pytest suite shows the cost as Python sees it; this
 * is its floor. Build and run from the repository root (argument: a
 * directory on the filesystem to test):
 */
//   gcc -std=gnu11 -O2 -Icsrc bench/c_pwrite_floor.c csrc/*.c -o /tmp/c_pwrite_floor
//   /tmp/c_pwrite_floor /tmp
#include "bm_internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REGION (64u << 20)
#define HALF (REGION / 2)
#define WRITE 4096u
#define BLOCK 256u /* writes per block: one 1 MiB folio's worth */
#define PAIRS 1000

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    char img[4000], cbt[4096];
    snprintf(img, sizeof img, "%s/c_pwrite_floor.%d.img", dir, (int)getpid());
    snprintf(cbt, sizeof cbt, "%s.cbt", img);

    static char buf[1u << 20];
    memset(buf, 0xa5, sizeof buf);
    int fd = open(img, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        perror(img);
        return 1;
    }
    for (uint64_t off = 0; off < REGION; off += sizeof buf)
        if (pwrite(fd, buf, sizeof buf, (off_t)off) != (ssize_t)sizeof buf) {
            perror("pre-write");
            return 1;
        }
    fsync(fd);
    bm_tracker *t = NULL;
    if (bm_create(cbt, fd, REGION, BM_DEFAULT_GRANULARITY) < 0 ||
        !(t = bm_open(cbt, BM_OPEN_WRITER, fd))) {
        fprintf(stderr, "sidecar: %s\n", bm_last_error());
        return 1;
    }

    static double ratio[PAIRS], tracked_ns[PAIRS], plain_ns[PAIRS];
    uint64_t next = 0;
    for (int i = 0; i < PAIRS; i++) {
        uint64_t low = next, high = next + HALF;
        next = (next + BLOCK * WRITE) % HALF;
        uint64_t mine = (i / 2) % 2 ? low : high, theirs = (i / 2) % 2 ? high : low;
        double tracked = 0, plain = 0;
        for (int side = 0; side < 2; side++) {
            int do_tracked = (side == 0) == (i % 2 == 0);
            double s = now();
            for (uint64_t k = 0; k < BLOCK; k++) {
                if (do_tracked) {
                    if (bm_pwrite(t, fd, buf, WRITE, mine + k * WRITE) < 0) {
                        fprintf(stderr, "bm_pwrite: %s\n", bm_last_error());
                        return 1;
                    }
                } else if (pwrite(fd, buf, WRITE, (off_t)(theirs + k * WRITE)) != (ssize_t)WRITE) {
                    perror("pwrite");
                    return 1;
                }
            }
            *(do_tracked ? &tracked : &plain) = now() - s;
        }
        ratio[i] = tracked / plain;
        tracked_ns[i] = tracked / BLOCK * 1e9;
        plain_ns[i] = plain / BLOCK * 1e9;
    }
    qsort(ratio, PAIRS, sizeof *ratio, cmp);
    qsort(tracked_ns, PAIRS, sizeof *tracked_ns, cmp);
    qsort(plain_ns, PAIRS, sizeof *plain_ns, cmp);
    printf("4 KiB page-cache writes, %d interleaved pairs of %u-write blocks:\n", PAIRS, BLOCK);
    printf("  pwrite(2)  median %.0f ns\n  bm_pwrite  median %.0f ns\n", plain_ns[PAIRS / 2],
           tracked_ns[PAIRS / 2]);
    printf("  median pair ratio %.3fx [IQR %.3f - %.3f]\n", ratio[PAIRS / 2], ratio[PAIRS / 4],
           ratio[3 * PAIRS / 4]);

    bm_close(t);
    close(fd);
    unlink(cbt);
    unlink(img);
    return 0;
}
