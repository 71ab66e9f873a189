/*
 * api-edge: the C API's edge cases, called directly: NULL and out-of-range
 * arguments, out-parameters left alone on failure, thread-local messages,
 * read-only handles, struct_size checks, and one handle shared by threads.
 *
 *   api-edge DIR      (DIR: an empty scratch directory)
 *
 * Prints each failed expectation and a summary; exits 1 if any failed.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#include "expect.h"

#define EXPECT_ERR(call, code) EXPECT_ERR_TEXT(call, code, "")

static void test_static_strings(void)
{
    const char *v = qcowprov_version();

    EXPECT(v != NULL && v[0] != '\0', "version is empty");
    EXPECT(qcowprov_strerror(-EINVAL) != NULL && qcowprov_strerror(-EINVAL)[0], "strerror(-EINVAL)");
    EXPECT(strcmp(qcowprov_strerror(EINVAL), qcowprov_strerror(-EINVAL)) == 0, "strerror sign");
    EXPECT(qcowprov_strerror(0) != NULL, "strerror(0)");
    EXPECT(qcowprov_strerror(999999) != NULL, "strerror(unknown)");
    EXPECT(qcowprov_strerror(-2147483647 - 1) != NULL, "strerror(INT_MIN)");
    EXPECT(qcowprov_last_error() != NULL, "last_error is NULL");
}

static void test_create(void)
{
    EXPECT_ERR(qcowprov_create(NULL, NULL, 1 << 20), -EINVAL);
    EXPECT_ERR(qcowprov_create(path("bogus.qcow2"), "bogus=1", 1 << 20), -EINVAL);
    EXPECT(strstr(qcowprov_last_error(), "bogus") != NULL, "the message names the option");
    EXPECT(access(path("bogus.qcow2"), F_OK) != 0, "a failed create leaves no file");
    EXPECT_ERR(qcowprov_create(path("cs.qcow2"), "cluster_size=3000", 1 << 20), -EINVAL);
    EXPECT_ERR(qcowprov_create(path("nodir/x.qcow2"), NULL, 1 << 20), -ENOENT);
    EXPECT_OK(qcowprov_create(path("a.qcow2"), NULL, 4 << 20));
    EXPECT_ERR(qcowprov_create(path("a.qcow2"), NULL, 4 << 20), -EEXIST);
    EXPECT_OK(qcowprov_create(path("b.qcow2"), "", 4 << 20));
    EXPECT_OK(qcowprov_create(path("v2.qcow2"), "compat=0.10", 4 << 20));
    EXPECT_OK(qcowprov_create(path("opt.qcow2"), "size=2M,cluster_size=4k", 0));
    EXPECT_OK(qcowprov_create(path("ovl.qcow2"), "backing_file=a.qcow2,backing_fmt=qcow2", 0));
}

static void test_open(void)
{
    qcowprov_image *sentinel = (qcowprov_image *)(uintptr_t)0x1, *img = sentinel;

    EXPECT_ERR(qcowprov_open(NULL, NULL, 0, &img), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("a.qcow2"), NULL, 0, NULL), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("a.qcow2"), NULL, 0x80, &img), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("a.qcow2"), "provision=thin,discard=unmap", 0, &img), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("a.qcow2"), "bogus=1", 0, &img), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("missing.qcow2"), NULL, 0, &img), -ENOENT);
    EXPECT_ERR(qcowprov_open(dir, NULL, 0, &img), -EISDIR);
    EXPECT_ERR(qcowprov_open(path("v2.qcow2"), "discard=unmap,discard-no-unref=on", 0, &img), -EINVAL);
    EXPECT_ERR(qcowprov_open(path("v2.qcow2"), "provision=metadata", 0, &img), -EINVAL);
    EXPECT(img == sentinel, "a failed open wrote *out");
    EXPECT_ERR(qcowprov_close(NULL), -EINVAL);
    EXPECT_ERR(qcowprov_flush(NULL), -EINVAL);
}

static void test_io(void)
{
    qcowprov_image *img = NULL;
    unsigned char buf[8192], a[100], b[200], c[300];
    struct iovec iov[3] = { { a, sizeof a }, { NULL, 0 }, { b, sizeof b } };
    struct iovec wiov[2] = { { c, sizeof c }, { c, sizeof c } };
    const uint64_t size = 4 << 20;

    EXPECT_OK(qcowprov_open(path("a.qcow2"), "discard=unmap", 0, &img));
    if (img == NULL)
        return;
    EXPECT_ERR(qcowprov_pread(NULL, buf, 1, 0), -EINVAL);
    EXPECT_ERR(qcowprov_pread(img, NULL, 1, 0), -EINVAL);
    EXPECT_ERR(qcowprov_pread(img, NULL, 0, 0), -EINVAL);
    EXPECT_ERR(qcowprov_pread(img, buf, 1, size), -EINVAL);
    EXPECT_ERR(qcowprov_pread(img, buf, 2, size - 1), -EINVAL);
    EXPECT_ERR(qcowprov_pread(img, buf, 512, UINT64_MAX - 100), -EINVAL);
    EXPECT(qcowprov_pread(img, buf, 0, size) == 0, "zero-length read at the end");
    EXPECT_ERR(qcowprov_pwrite(img, buf, 1, 0, 0x80), -EINVAL);
    EXPECT_ERR(qcowprov_pwrite(img, NULL, 1, 0, 0), -EINVAL);
    EXPECT_ERR(qcowprov_pwrite(img, buf, 512, size, 0), -EINVAL);

    memset(buf, 0x5a, sizeof buf);
    EXPECT(qcowprov_pwrite(img, buf, sizeof buf, 1000, QCOWPROV_WRITE_FUA) == (int64_t)sizeof buf, "FUA write");
    memset(c, 0x33, sizeof c);
    EXPECT(qcowprov_pwritev(img, wiov, 2, 70000, 0) == 600, "pwritev");
    EXPECT(qcowprov_preadv(img, iov, 3, 70000 - 50) == 300, "preadv with an empty middle buffer");
    EXPECT(find_mismatch(a + 50, 50, 0x33) == 50 && find_mismatch(b, 200, 0x33) == 200, "preadv data");
    EXPECT(find_mismatch(a, 50, 0) == 50, "preadv zeros before the write");
    EXPECT_ERR(qcowprov_preadv(img, iov, -1, 0), -EINVAL);
    EXPECT_ERR(qcowprov_preadv(img, NULL, 1, 0), -EINVAL);
    {
        struct iovec badv[1] = { { NULL, 10 } };
        EXPECT_ERR(qcowprov_preadv(img, badv, 1, 0), -EINVAL);
        EXPECT_ERR(qcowprov_pwritev(img, badv, 1, 0, 0), -EINVAL);
    }
    EXPECT(qcowprov_preadv(img, iov, 0, 0) == 0, "preadv of no buffers");

    EXPECT_ERR(qcowprov_discard(NULL, 0, 65536), -EINVAL);
    EXPECT_ERR(qcowprov_discard(img, size, 65536), -EINVAL);
    EXPECT_ERR(qcowprov_discard(img, UINT64_MAX - 65535, 65536), -EINVAL);
    EXPECT_OK(qcowprov_discard(img, 0, 0));
    EXPECT_ERR(qcowprov_write_zeroes(img, 0, 512, 0x80), -EINVAL);
    EXPECT_ERR(qcowprov_write_zeroes(img, size - 512, 1024, 0), -EINVAL);
    EXPECT_OK(qcowprov_write_zeroes(img, 1000, 3000, QCOWPROV_ZERO_MAY_UNMAP));
    EXPECT(qcowprov_pread(img, buf, 5000, 0) == 5000, "read back");
    EXPECT(find_mismatch(buf, 4000, 0) == 4000 && find_mismatch(buf + 4000, 1000, 0x5a) == 1000,
           "write_zeroes zeroed exactly its range");

    {
        uint64_t pnum = 77, host = 77;
        uint32_t flags = 77;
        struct qcowprov_status st;
        EXPECT_ERR(qcowprov_block_status(img, 0, 0, &pnum, &flags, &host), -EINVAL);
        EXPECT_ERR(qcowprov_block_status(img, size, 1, &pnum, &flags, &host), -EINVAL);
        EXPECT_ERR(qcowprov_block_status(img, 0, 1, NULL, &flags, &host), -EINVAL);
        EXPECT_ERR(qcowprov_block_status(img, 0, 1, &pnum, NULL, &host), -EINVAL);
        EXPECT_ERR(qcowprov_block_status(img, 0, 1, &pnum, &flags, NULL), -EINVAL);
        EXPECT(pnum == 77 && flags == 77 && host == 77, "failed block_status wrote out-parameters");
        EXPECT_OK(qcowprov_block_status(img, 0, size, &pnum, &flags, &host));
        EXPECT(pnum >= 1 && pnum <= size, "pnum %" PRIu64 " out of range", pnum);
        EXPECT((flags & QCOWPROV_STATUS_DATA) && (flags & QCOWPROV_STATUS_OFFSET_VALID) && host != 0,
               "cluster 0 holds data (flags 0x%x)", flags);
        memset(&st, 0xee, sizeof st);
        st.struct_size = 4;
        EXPECT_ERR(qcowprov_block_status_depth(img, 0, 1, &st), -EINVAL);
        EXPECT(st.flags == 0xeeeeeeee, "failed block_status_depth wrote *st");
        st.struct_size = sizeof st;
        EXPECT_ERR(qcowprov_block_status_depth(img, 0, 1, NULL), -EINVAL);
        EXPECT_OK(qcowprov_block_status_depth(img, 2 << 20, 4096, &st));
        EXPECT(st.struct_size == sizeof st, "struct_size changed");
        EXPECT(st.len >= 1 && st.len <= 4096 && !(st.flags & QCOWPROV_STATUS_ALLOCATED) && st.depth == 0
                   && st._reserved == 0,
               "unallocated range: len %" PRIu64 " flags 0x%x depth %u", (uint64_t)st.len, st.flags, st.depth);
    }

    {
        struct qcowprov_info info;
        memset(&info, 0xee, sizeof info);
        info.struct_size = 8;
        EXPECT_ERR(qcowprov_get_info(img, &info), -EINVAL);
        EXPECT(info.version == 0xeeeeeeee, "failed get_info wrote *info");
        EXPECT_ERR(qcowprov_get_info(img, NULL), -EINVAL);
        EXPECT_ERR(qcowprov_get_info(NULL, &info), -EINVAL);
        info.struct_size = sizeof info;
        EXPECT_OK(qcowprov_get_info(img, &info));
        EXPECT(info.version == 3 && info.virtual_size == size && info.cluster_size == 65536
                   && info.provision == QCOWPROV_PROVISION_QEMU,
               "info: version %u size %" PRIu64 " provision %u", info.version, (uint64_t)info.virtual_size,
               info.provision);
        EXPECT_OK(qcowprov_set_options(img, "provision=thin"));
        EXPECT_OK(qcowprov_get_info(img, &info));
        EXPECT(info.provision == QCOWPROV_PROVISION_THIN && strcmp(info.policy, "provision=thin") == 0,
               "policy after set_options: %u \"%s\"", info.provision, info.policy);
        EXPECT_ERR(qcowprov_set_options(img, "bogus=1"), -EINVAL);
        EXPECT_ERR(qcowprov_set_options(img, "provision=thin,discard=unmap"), -EINVAL);
        EXPECT_ERR(qcowprov_set_options(img, NULL), -EINVAL);
        EXPECT_OK(qcowprov_get_info(img, &info));
        EXPECT(strcmp(info.policy, "provision=thin") == 0, "a failed set_options changed the policy: \"%s\"",
               info.policy);
        EXPECT_OK(qcowprov_set_options(img, ""));
        EXPECT_OK(qcowprov_get_info(img, &info));
        EXPECT(info.provision == QCOWPROV_PROVISION_THIN, "\"\" changes nothing (got %u, \"%s\")",
               info.provision, info.policy);
        EXPECT_OK(qcowprov_set_options(img, "provision=metadata"));
        EXPECT_OK(qcowprov_get_info(img, &info));
        EXPECT(info.provision == QCOWPROV_PROVISION_METADATA, "back to the default (got %u, \"%s\")",
               info.provision, info.policy);
    }

    EXPECT_ERR(qcowprov_resize(img, size + 100), -EINVAL);
    EXPECT_ERR(qcowprov_resize(img, size / 2), -ENOTSUP);
    EXPECT_OK(qcowprov_resize(img, 2 * size));
    EXPECT(qcowprov_pread(img, buf, 512, 2 * size - 512) == 512 && find_mismatch(buf, 512, 0) == 512,
           "the grown range reads zeros");
    EXPECT_OK(qcowprov_close(img));
}

static int progress_calls;
static double progress_last = -1;
static int progress_bad;

static void progress(double pct, void *user)
{
    progress_calls++;
    if (pct < progress_last || pct < 0 || pct > 100 || user != &progress_calls)
        progress_bad = 1;
    progress_last = pct;
}

static void test_check_and_readonly(void)
{
    qcowprov_image *img = NULL;
    struct qcowprov_check_result res;
    unsigned char buf[512];

    EXPECT_OK(qcowprov_open(path("a.qcow2"), NULL, QCOWPROV_OPEN_RDONLY, &img));
    if (img == NULL)
        return;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    EXPECT_ERR(qcowprov_check(img, 0, NULL, NULL, NULL), -EINVAL);
    EXPECT_ERR(qcowprov_check(NULL, 0, &res, NULL, NULL), -EINVAL);
    EXPECT_ERR(qcowprov_check(img, 0x80, &res, NULL, NULL), -EINVAL);
    EXPECT_ERR(qcowprov_check(img, QCOWPROV_CHECK_FIX_LEAKS, &res, NULL, NULL), -EROFS);
    res.struct_size = 4;
    EXPECT_ERR(qcowprov_check(img, 0, &res, NULL, NULL), -EINVAL);
    res.struct_size = sizeof res;
    EXPECT_OK(qcowprov_check(img, 0, &res, progress, &progress_calls));
    EXPECT(res.exit_code == 0 && res.corruptions == 0 && res.leaks == 0, "check: exit %u", res.exit_code);
    EXPECT(progress_calls > 0 && !progress_bad && progress_last == 100.0,
           "progress: %d calls, last %.1f, bad %d", progress_calls, progress_last, progress_bad);
    memset(buf, 1, sizeof buf);
    EXPECT_ERR(qcowprov_pwrite(img, buf, sizeof buf, 0, 0), -EROFS);
    EXPECT_ERR(qcowprov_discard(img, 0, 65536), -EROFS);
    EXPECT_ERR(qcowprov_write_zeroes(img, 0, 512, 0), -EROFS);
    EXPECT_ERR(qcowprov_resize(img, 16 << 20), -EROFS);
    EXPECT(qcowprov_pread(img, buf, sizeof buf, 1000) == (int64_t)sizeof buf, "read on a read-only handle");
    EXPECT_OK(qcowprov_close(img));
}

/* Messages are per thread: a failure on another thread leaves ours alone. */
static void *fail_elsewhere(void *arg)
{
    qcowprov_image *img;
    int *ok = arg;

    *ok = qcowprov_open(NULL, NULL, 0, &img) == -EINVAL && qcowprov_last_error()[0] != '\0';
    return NULL;
}

static void test_thread_local_errors(void)
{
    pthread_t t;
    int ok = 0;
    char before[256];

    qcowprov_create(path("a.qcow2"), NULL, 1 << 20); /* fails: exists */
    snprintf(before, sizeof before, "%s", qcowprov_last_error());
    pthread_create(&t, NULL, fail_elsewhere, &ok);
    pthread_join(t, NULL);
    EXPECT(ok, "the other thread saw its own error");
    EXPECT(strcmp(before, qcowprov_last_error()) == 0, "our message changed: \"%s\" -> \"%s\"", before,
           qcowprov_last_error());
}

/* One handle, many threads: each writes its own clusters, then verifies them. */
#define THREADS 8
#define WRITES 64

struct worker {
    qcowprov_image *img;
    int id, bad;
};

static void *worker(void *arg)
{
    struct worker *w = arg;
    unsigned char buf[65536];
    int i;

    for (i = 0; i < WRITES; i++) {
        uint64_t off = (uint64_t)(i * THREADS + w->id) * 65536;
        memset(buf, w->id + 1 + i % 7, sizeof buf);
        if (qcowprov_pwrite(w->img, buf, sizeof buf, off, 0) != (int64_t)sizeof buf)
            w->bad++;
        if (i % 16 == 15 && qcowprov_discard(w->img, off, 65536) != 0)
            w->bad++;
    }
    for (i = 0; i < WRITES; i++) {
        uint64_t off = (uint64_t)(i * THREADS + w->id) * 65536;
        int want = i % 16 == 15 ? 0 : w->id + 1 + i % 7;
        if (qcowprov_pread(w->img, buf, sizeof buf, off) != (int64_t)sizeof buf ||
            find_mismatch(buf, sizeof buf, want) != sizeof buf)
            w->bad++;
    }
    return NULL;
}

static void test_threads(void)
{
    qcowprov_image *img = NULL;
    pthread_t t[THREADS];
    struct worker w[THREADS];
    struct qcowprov_check_result res;
    int i, bad = 0;

    EXPECT_OK(qcowprov_create(path("mt.qcow2"), NULL, (uint64_t)THREADS * WRITES * 65536));
    EXPECT_OK(qcowprov_open(path("mt.qcow2"), "provision=thin", 0, &img));
    if (img == NULL)
        return;
    for (i = 0; i < THREADS; i++) {
        w[i] = (struct worker){ img, i, 0 };
        pthread_create(&t[i], NULL, worker, &w[i]);
    }
    for (i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        bad += w[i].bad;
    }
    EXPECT(bad == 0, "%d failed or wrong requests across threads", bad);
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    EXPECT_OK(qcowprov_check(img, 0, &res, NULL, NULL));
    EXPECT(res.exit_code == 0, "check after the threads: exit %u, %" PRIu64 " corruptions, %" PRIu64 " leaks",
           res.exit_code, (uint64_t)res.corruptions, (uint64_t)res.leaks);
    EXPECT_OK(qcowprov_close(img));
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    test_static_strings();
    test_create();
    test_open();
    test_io();
    test_check_and_readonly();
    test_thread_local_errors();
    test_threads();
    return summary("api-edge");
}
