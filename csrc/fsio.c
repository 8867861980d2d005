/* fsio.c - file operations more than one C area needs: deciding whether an
 * errno means "this filesystem does not do that" (so the caller falls back
 * and stops asking) or a real failure, punching holes, and writing zeros.
 *
 * Which errnos mean "unsupported" differs per call, so there is one table
 * here, keyed by the operation, instead of a list at every call site (they
 * had drifted: one punch site took ENODEV from old kernels' block devices
 * for a failure, another took EINVAL from SEEK_DATA for unsupported, a third
 * did not). */
#include "bm_internal.h"

#include <fcntl.h>
#include <string.h>
#include <unistd.h>

int bm_errno_unsupported(int op, int err)
{
    /* Linux has ENOTSUP == EOPNOTSUPP; other libcs may not. */
    int not_supp = err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS;
    switch (op) {
    case BM_OP_PUNCH:
        /* Kernels before 4.9 answer ENODEV for a block device. EINVAL is a
         * bad range, not a missing feature. */
        return not_supp || err == ENODEV;
    case BM_OP_SEEK_HOLES:
        /* Kernels or filesystems without SEEK_DATA reject the whence value
         * itself (EINVAL); ENXIO (only holes from here) is an answer. */
        return not_supp || err == EINVAL;
    case BM_OP_COPY_RANGE:
        /* Different filesystems (before 5.3, and some after), files the
         * kernel cannot splice (EINVAL), or no such syscall. */
        return not_supp || err == EXDEV || err == EINVAL;
    default:
        return 0;
    }
}

/* fallocate MODE over [OFFSET, OFFSET+LEN), retrying EINTR; an errno that
 * means the filesystem can't becomes EOPNOTSUPP. */
static int fallocate_range(int fd, int mode, uint64_t offset, uint64_t len)
{
    int rc;
    do {
        rc = fallocate(fd, mode, (off_t)offset, (off_t)len);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0 && bm_errno_unsupported(BM_OP_PUNCH, errno))
        errno = EOPNOTSUPP;
    return rc;
}

int bm_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    return fallocate_range(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
}

int bm_zero_in_place(int fd, uint64_t offset, uint64_t len)
{
    return fallocate_range(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
}

int bm_write_zeros(int fd, uint64_t offset, uint64_t len)
{
    /* Read-only and shared by every thread: never written, so no race. */
    static const char zeros[BM_ZERO_CHUNK];
    while (len) {
        size_t chunk = len < sizeof zeros ? (size_t)len : sizeof zeros;
        ssize_t n = pwrite(fd, zeros, chunk, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return bm_fail(errno, "writing %llu zero bytes at %llu failed: %s",
                           (unsigned long long)len, (unsigned long long)offset,
                           strerror(errno));
        }
        if (n == 0)
            return bm_fail(EIO, "writing zeros at %llu made no progress",
                           (unsigned long long)offset);
        offset += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

int bm_zero_range(int fd, uint64_t offset, uint64_t len, uint32_t flags)
{
    if ((flags & BM_ZERO_MAY_TRIM) && bm_punch_hole(fd, offset, len) == 0)
        return 0;
    if ((flags & BM_ZERO_MAY_TRIM) && errno != EOPNOTSUPP)
        return -1;
    if (bm_zero_in_place(fd, offset, len) == 0)
        return 0;
    if (errno != EOPNOTSUPP)
        return -1;
    if (flags & BM_ZERO_FAST)
        return -1;
    return bm_write_zeros(fd, offset, len);
}

int64_t bm_pread_full(int fd, char *buf, uint64_t len, uint64_t offset)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, (size_t)(len - done), (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int err = errno;
            return bm_fail(err, "read of %llu bytes at offset %llu failed: %s",
                           (unsigned long long)(len - done),
                           (unsigned long long)(offset + done), strerror(err));
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}
