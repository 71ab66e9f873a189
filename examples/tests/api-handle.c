/*
 * api-handle: the handle and the API a hypervisor needs, called directly from C:
 * closed and foreign handles (-EBADF, never "corrupt"), double close, image locks
 * between two handles of one process (-EBUSY, force-share, locking=off),
 * qcowprov_open_fd and qcowprov_format(_fd), set_options merging keys, every
 * runtime option in qcowprov_get_info (old and new struct sizes), the highest
 * allocated offset, and messages worded as a C library's.
 *
 *   api-handle DIR      (DIR: an empty scratch directory)
 *
 * Prints each failed expectation and a summary; exits 1 if any failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#include "expect.h"

#define EXPECT_ERR(call, code, text) EXPECT_ERR_TEXT(call, code, text)

static uint64_t file_size(const char *p)
{
    struct stat st;

    return stat(p, &st) == 0 ? (uint64_t)st.st_size : UINT64_MAX;
}

static int get_info(qcowprov_image *img, struct qcowprov_info *info)
{
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    return qcowprov_get_info(img, info);
}

static void test_closed_and_foreign_handles(void)
{
    const char *a = path("closed.qcow2");
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    char buf[512];
    uint64_t end = 0;
    uint64_t junk[8];

    EXPECT_OK(qcowprov_create(a, NULL, 1 << 20));
    EXPECT_OK(qcowprov_open(a, NULL, 0, &img));
    EXPECT_OK(qcowprov_close(img));
    /* Every call on the closed handle: -EBADF naming the mistake, never "corrupt". */
    EXPECT_ERR(qcowprov_pread(img, buf, sizeof buf, 0), -EBADF, "closed");
    EXPECT(strstr(qcowprov_last_error(), "corrupt") == NULL, "a healthy image was called corrupt");
    EXPECT_ERR(qcowprov_pwrite(img, buf, sizeof buf, 0, 0), -EBADF, "closed");
    EXPECT_ERR(qcowprov_flush(img), -EBADF, "closed");
    EXPECT_ERR(get_info(img, &info), -EBADF, "closed");
    EXPECT_ERR(qcowprov_highest_offset(img, &end), -EBADF, "closed");
    EXPECT_ERR(qcowprov_set_options(img, "provision=thin"), -EBADF, "closed");
    /* A double close is an error, not an abort. */
    EXPECT_ERR(qcowprov_close(img), -EBADF, "closed");
    /* A pointer that never was a handle, aligned or not. */
    memset(junk, 0x5a, sizeof junk);
    EXPECT_ERR(qcowprov_pread((qcowprov_image *)junk, buf, sizeof buf, 0), -EBADF, "not a qcowprov_image");
    EXPECT_ERR(qcowprov_close((qcowprov_image *)junk), -EBADF, "not a qcowprov_image");
    EXPECT_ERR(qcowprov_flush((qcowprov_image *)((char *)junk + 1)), -EBADF, "not a qcowprov_image");
    /* The file is fine and opens again. */
    EXPECT_OK(qcowprov_open(a, NULL, 0, &img));
    EXPECT_OK(qcowprov_close(img));
}

static void test_locks_between_handles(void)
{
    const char *a = path("locked.qcow2");
    qcowprov_image *w = NULL, *r = NULL, *u = NULL, *out = (qcowprov_image *)&out;
    struct qcowprov_info info;
    char msg[8192];

    EXPECT_OK(qcowprov_create(a, NULL, 1 << 20));
    EXPECT_OK(qcowprov_open(a, NULL, 0, &w));
    EXPECT_OK(get_info(w, &info));
    EXPECT(info.flags & QCOWPROV_INFO_LOCKED, "a read/write open holds locks (flags %#x)", info.flags);

    /* Two handles in one process exclude each other as two processes do. */
    EXPECT_ERR(qcowprov_open(a, NULL, 0, &out), -EBUSY, "Failed to get \"write\" lock");
    EXPECT(out == (qcowprov_image *)&out, "a refused open wrote *out");
    snprintf(msg, sizeof msg, "%s", qcowprov_last_error());
    EXPECT(strstr(msg, a) != NULL && strstr(msg, "force-share") != NULL,
           "the message names the image and the way out: %s", msg);
    EXPECT(strstr(msg, "os error") == NULL, "a Rust suffix in: %s", msg);
    EXPECT_ERR(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &r), -EBUSY, "Failed to get shared \"write\" lock");
    /* force-share: a read-only look; not for read/write opens. */
    EXPECT_OK(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY | QCOWPROV_OPEN_FORCE_SHARE, &u));
    EXPECT_OK(get_info(u, &info));
    EXPECT(info.flags & QCOWPROV_INFO_FORCE_SHARE, "force-share reported (flags %#x)", info.flags);
    EXPECT_OK(qcowprov_close(u));
    EXPECT_OK(qcowprov_open(a, "force-share=on,read-only=on", 0, &u));
    EXPECT_OK(qcowprov_close(u));
    EXPECT_ERR(qcowprov_open(a, NULL, QCOWPROV_OPEN_FORCE_SHARE, &u), -EINVAL, "read-only");
    /* locking=off neither takes nor tests. */
    EXPECT_OK(qcowprov_open(a, "locking=off", QCOWPROV_OPEN_RDONLY, &u));
    EXPECT_OK(get_info(u, &info));
    EXPECT(!(info.flags & QCOWPROV_INFO_LOCKED), "locking=off holds no lock (flags %#x)", info.flags);
    EXPECT_OK(qcowprov_close(u));
    EXPECT_ERR(qcowprov_open(a, "locking=sometimes", 0, &u), -EINVAL, "locking");
    /* The lock goes with the handle. */
    EXPECT_OK(qcowprov_close(w));
    EXPECT_OK(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &r));
    EXPECT_OK(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &u));
    EXPECT_ERR(qcowprov_open(a, NULL, 0, &w), -EBUSY, "Failed to get \"write\" lock");
    EXPECT_OK(qcowprov_close(r));
    EXPECT_OK(qcowprov_close(u));
    EXPECT_OK(qcowprov_open(a, NULL, 0, &w));
    EXPECT_OK(qcowprov_close(w));
}

static void test_format(void)
{
    const char *a = path("format.qcow2"), *fresh = path("fresh.qcow2");
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    unsigned char buf[4096];
    uint64_t before;
    int fd;

    EXPECT_OK(qcowprov_create(a, NULL, 4 << 20));
    EXPECT_OK(qcowprov_open(a, NULL, 0, &img));
    memset(buf, 0x11, sizeof buf);
    EXPECT_OK(qcowprov_pwrite(img, buf, sizeof buf, 0, QCOWPROV_WRITE_FUA));
    before = file_size(a);
    /* An image in use is refused and left intact. */
    EXPECT_ERR(qcowprov_format(a, NULL, 8 << 20), -EBUSY, "Failed to get \"write\" lock");
    EXPECT(file_size(a) == before, "the image in use was truncated (%" PRIu64 " -> %" PRIu64 ")", before,
           file_size(a));
    EXPECT(qcowprov_pread(img, buf, sizeof buf, 0) == (int64_t)sizeof buf && find_mismatch(buf, sizeof buf, 0x11) == sizeof buf,
           "the data of the image in use changed");
    EXPECT_OK(qcowprov_close(img));
    /* An existing file is formatted anew (create refuses it). */
    EXPECT_ERR(qcowprov_create(a, NULL, 8 << 20), -EEXIST, "File exists");
    EXPECT_OK(qcowprov_format(a, "cluster_size=4k", 8 << 20));
    EXPECT_OK(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &img));
    EXPECT_OK(get_info(img, &info));
    EXPECT(info.virtual_size == 8 << 20 && info.cluster_size == 4096, "formatted: size %" PRIu64 ", cluster %" PRIu64,
           (uint64_t)info.virtual_size, (uint64_t)info.cluster_size);
    EXPECT(qcowprov_pread(img, buf, sizeof buf, 0) == (int64_t)sizeof buf && find_mismatch(buf, sizeof buf, 0) == sizeof buf,
           "the new image reads zeros");
    EXPECT_OK(qcowprov_close(img));
    /* A missing file is created. */
    EXPECT_OK(qcowprov_format(fresh, NULL, 1 << 20));
    EXPECT(file_size(fresh) != UINT64_MAX, "format did not create a missing file");
    EXPECT_ERR(qcowprov_format(fresh, "bogus=1", 1 << 20), -EINVAL, "bogus");

    /* Through a descriptor: the caller keeps its fd. */
    fd = open(a, O_RDWR | O_CLOEXEC);
    EXPECT(fd >= 0, "open %s", a);
    EXPECT_OK(qcowprov_format_fd(fd, NULL, 2 << 20));
    EXPECT(fcntl(fd, F_GETFD) >= 0, "the caller's fd was closed");
    EXPECT_OK(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &img));
    EXPECT_OK(get_info(img, &info));
    EXPECT(info.virtual_size == 2 << 20, "formatted through the fd: %" PRIu64, (uint64_t)info.virtual_size);
    /* ...and while a reader has it, formatting through the fd is refused too. */
    EXPECT_ERR(qcowprov_format_fd(fd, NULL, 2 << 20), -EBUSY, "lock");
    EXPECT_OK(qcowprov_close(img));
    close(fd);
    EXPECT_ERR(qcowprov_format_fd(-1, NULL, 1 << 20), -EBADF, "fd");
    EXPECT_ERR(qcowprov_format_fd(fd, NULL, 1 << 20), -EBADF, "descriptor");
    fd = open(a, O_RDONLY | O_CLOEXEC);
    EXPECT_ERR(qcowprov_format_fd(fd, NULL, 1 << 20), -EBADF, "read-only");
    close(fd);
}

static void test_open_fd(void)
{
    const char *a = path("byfd.qcow2");
    qcowprov_image *img = NULL, *other = NULL;
    unsigned char buf[4096];
    int fd;

    EXPECT_OK(qcowprov_create(a, NULL, 4 << 20));
    fd = open(a, O_RDWR | O_CLOEXEC);
    EXPECT_OK(qcowprov_open_fd(fd, NULL, 0, &img));
    /* The caller may close its fd at once: the library has its own. */
    close(fd);
    memset(buf, 0x22, sizeof buf);
    EXPECT(qcowprov_pwrite(img, buf, sizeof buf, 65536, 0) == (int64_t)sizeof buf, "write through an fd handle");
    EXPECT_ERR(qcowprov_open(a, NULL, QCOWPROV_OPEN_RDONLY, &other), -EBUSY, "lock");
    EXPECT_OK(qcowprov_close(img));

    /* The caller keeps its fd: the locks still go with the handle. */
    fd = open(a, O_RDWR | O_CLOEXEC);
    EXPECT_OK(qcowprov_open_fd(fd, NULL, 0, &img));
    EXPECT_OK(qcowprov_close(img));
    EXPECT_OK(qcowprov_open(a, NULL, 0, &other));
    EXPECT(qcowprov_pread(other, buf, sizeof buf, 65536) == (int64_t)sizeof buf
               && find_mismatch(buf, sizeof buf, 0x22) == sizeof buf,
           "data written through the fd handle");
    EXPECT_OK(qcowprov_close(other));
    close(fd);

    /* What the descriptor allows. */
    fd = open(a, O_RDONLY | O_CLOEXEC);
    EXPECT_ERR(qcowprov_open_fd(fd, NULL, 0, &img), -EBADF, "read-only");
    EXPECT_OK(qcowprov_open_fd(fd, NULL, QCOWPROV_OPEN_RDONLY, &img));
    EXPECT_OK(qcowprov_close(img));
    EXPECT_ERR(qcowprov_open_fd(fd, NULL, QCOWPROV_OPEN_RDONLY | QCOWPROV_OPEN_DIRECT, &img), -EINVAL,
               "O_DIRECT");
    close(fd);
    fd = open(a, O_RDWR | O_APPEND | O_CLOEXEC);
    EXPECT_ERR(qcowprov_open_fd(fd, NULL, 0, &img), -EINVAL, "O_APPEND");
    close(fd);
    EXPECT_ERR(qcowprov_open_fd(-5, NULL, 0, &img), -EBADF, "-5");
    EXPECT_ERR(qcowprov_open_fd(fd, NULL, 0, &img), -EBADF, "descriptor");
    EXPECT_ERR(qcowprov_open_fd(0, NULL, 0, NULL), -EINVAL, "out");
}

static void test_options(void)
{
    const char *a = path("options.qcow2");
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    unsigned char raw[sizeof(struct qcowprov_info) + 16];
    struct qcowprov_info *old = (struct qcowprov_info *)raw;
    size_t i;

    EXPECT_OK(qcowprov_create(a, NULL, 64 << 20));
    EXPECT_OK(qcowprov_open(a, "provision=thin", 0, &img));
    /* Only the keys given change. */
    EXPECT_OK(qcowprov_set_options(img, "detect-zeroes=on"));
    EXPECT_OK(get_info(img, &info));
    EXPECT(info.provision == QCOWPROV_PROVISION_THIN && info.detect_zeroes == QCOWPROV_DETECT_ZEROES_ON,
           "provision %u, detect-zeroes %u", info.provision, info.detect_zeroes);
    EXPECT(strncmp(info.options, "provision=thin,detect-zeroes=on,", 32) == 0, "options \"%s\"", info.options);
    EXPECT(strstr(info.options, "locking=on") && strstr(info.options, "read-only=off")
               && strstr(info.options, "l2-cache-size=") && strstr(info.options, "cache.direct=off"),
           "every runtime option: \"%s\"", info.options);
    EXPECT_OK(qcowprov_set_options(img, "discard=unmap"));
    EXPECT_OK(get_info(img, &info));
    EXPECT(info.provision == QCOWPROV_PROVISION_QEMU && info.detect_zeroes == QCOWPROV_DETECT_ZEROES_ON,
           "discard=unmap replaced provision, kept detect-zeroes: %u %u", info.provision, info.detect_zeroes);
    /* A caller built against the first version of the struct gets that part only. */
    memset(raw, 0xee, sizeof raw);
    old->struct_size = 1272;
    EXPECT_OK(qcowprov_get_info(img, old));
    EXPECT(old->version == 3 && old->struct_size == 1272, "v1 fields filled");
    for (i = 1272; i < sizeof raw && raw[i] == 0xee; i++)
        ;
    EXPECT(i == sizeof raw, "byte %zu past a 1272-byte struct was written", i);
    EXPECT_OK(qcowprov_close(img));
    /* What get_info reports opens the image the same way. */
    EXPECT_OK(qcowprov_open(a, info.options, 0, &img));
    {
        struct qcowprov_info again;
        EXPECT_OK(get_info(img, &again));
        EXPECT(strcmp(again.options, info.options) == 0, "reopened with \"%s\": \"%s\"", info.options,
               again.options);
    }
    EXPECT_OK(qcowprov_close(img));
}

static void test_highest_offset(void)
{
    const char *a = path("highest.qcow2");
    qcowprov_image *img = NULL;
    uint64_t fresh = 0, grown = 0, shrunk = 0, top = 0;
    static unsigned char buf[1 << 20];

    EXPECT_OK(qcowprov_create(a, NULL, 64 << 20));
    EXPECT_OK(qcowprov_open(a, "provision=thin", 0, &img));
    EXPECT_OK(qcowprov_highest_offset(img, &fresh));
    /* A new image: header, refcount table and block, L1 table (its last cluster is only
     * partly written, so the file is shorter than the clusters in use). */
    EXPECT(fresh == 4 * 65536 && file_size(a) > 3 * 65536, "a new image ends after 4 clusters: %" PRIu64
           " (file %" PRIu64 ")", fresh, file_size(a));
    memset(buf, 0x33, sizeof buf);
    EXPECT(qcowprov_pwrite(img, buf, sizeof buf, 32 << 20, 0) == (int64_t)sizeof buf, "write");
    EXPECT_OK(qcowprov_highest_offset(img, &grown));
    EXPECT(grown >= fresh + sizeof buf, "grew from %" PRIu64 " to %" PRIu64, fresh, grown);
    EXPECT(qcowprov_pwrite(img, buf, 65536, 0, 0) == 65536, "write");
    EXPECT_OK(qcowprov_highest_offset(img, &top));
    /* The cluster written last is the top one: freeing it (thin) lowers the end. */
    EXPECT_OK(qcowprov_discard(img, 0, 65536));
    /* Freed clusters count until the next flush releases them (an entry on disk may still
     * point at them until then). */
    EXPECT_OK(qcowprov_flush(img));
    EXPECT_OK(qcowprov_highest_offset(img, &shrunk));
    EXPECT(shrunk < top, "freeing the top clusters (thin) lowers it: %" PRIu64 " -> %" PRIu64, top, shrunk);
    EXPECT_ERR(qcowprov_highest_offset(img, NULL), -EINVAL, "end");
    EXPECT_OK(qcowprov_close(img));
}

static void test_messages(void)
{
    const char *missing = path("missing.qcow2");
    qcowprov_image *img = NULL;
    char want[4400];

    EXPECT_ERR(qcowprov_open(missing, NULL, 0, &img), -ENOENT, "No such file or directory");
    snprintf(want, sizeof want, "Could not open '%s': No such file or directory", missing);
    EXPECT(strcmp(qcowprov_last_error(), want) == 0, "message \"%s\", expected \"%s\"", qcowprov_last_error(),
           want);
    EXPECT_ERR(qcowprov_open(dir, NULL, 0, &img), -EISDIR, dir);
    EXPECT(strstr(qcowprov_last_error(), "os error") == NULL, "Rust suffix: %s", qcowprov_last_error());
    EXPECT_ERR(qcowprov_create(path("nodir/x.qcow2"), NULL, 1 << 20), -ENOENT, "No such file or directory");
    EXPECT(strstr(qcowprov_last_error(), "os error") == NULL, "Rust suffix: %s", qcowprov_last_error());
    EXPECT_ERR(qcowprov_create(path("big.qcow2"), "cluster_size=512,size=100T", 0), -EFBIG,
               "size 100T is too large for cluster_size 512: at most 128G");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    test_closed_and_foreign_handles();
    test_locks_between_handles();
    test_format();
    test_open_fd();
    test_options();
    test_highest_offset();
    test_messages();
    return summary("api-handle");
}
