/*
 * api-aio: the asynchronous API from C, as an event loop uses it, on each backend
 * (io_uring and threads): DEPTH requests in flight on one thread, the completion
 * descriptor polled, completions reaped and checked (cookie, byte count, content
 * against a model); vectored requests; discard, write-zeroes, flush; a completion
 * callback; bad submissions (NULL buffers, past the end, unknown flags, a full queue,
 * unaligned O_DIRECT buffers, writes to a read-only image, a closed handle), and
 * close with requests in flight (every callback delivered: done or -ECANCELED).
 *
 *   api-aio DIR AIO     (DIR: an empty scratch directory; AIO: io_uring or threads)
 *
 * Leaves DIR/aio.qcow2 and DIR/cmds (the same writes as qemu-io commands, for the
 * script's twin). Prints each failed expectation and a summary; exits 1 if any failed.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common.h"

#include "expect.h"

/* A call that must return exactly `code` (a message is not required). */
#define EXPECT_RC(call, code)                                                        \
    do {                                                                             \
        int64_t r_ = (call);                                                         \
        EXPECT(r_ == (code), "%s returned %" PRId64 ", expected %d", #call, r_, (code)); \
    } while (0)

#define SIZE (8u << 20)
#define DEPTH 32
#define BS 65536u
#define ROUNDS 20

static unsigned char model[SIZE];

/* Wait for and reap exactly `n` completions; returns them in `out`. */
static int reap_n(qcowprov_image *img, int fd, struct qcowprov_aio_completion *out, int n)
{
    int got = 0;

    while (got < n) {
        int r = qcowprov_aio_reap(img, out + got, (uint32_t)(n - got));
        if (r < 0)
            return r;
        if (r == 0) {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            if (poll(&p, 1, 30000) == 0)
                return -ETIMEDOUT;
        }
        got += r;
    }
    return got;
}

static void event_loop(qcowprov_image *img, FILE *cmds)
{
    struct qcowprov_aio_completion done[DEPTH];
    static unsigned char bufs[DEPTH][BS] __attribute__((aligned(4096)));
    uint64_t offs[DEPTH], lens[DEPTH];
    int kinds[DEPTH];
    int fd = qcowprov_aio_fd(img), round, i, n;
    unsigned seed = 7;

    EXPECT(fd >= 0, "qcowprov_aio_fd: %d", fd);
    if (fd < 0)
        return;
    for (round = 0; round < ROUNDS; round++) {
        /* DEPTH requests on distinct 256 KiB chunks: no two overlap. */
        for (i = 0; i < DEPTH; i++) {
            uint64_t chunk = (uint64_t)((round * 7 + i * 13) % 32) * (256u << 10);
            uint64_t off = chunk + (uint64_t)(rand_r(&seed) % 4) * BS;
            int kind = round == 0 ? 1 : rand_r(&seed) % 4;
            int r = 0;

            offs[i] = off;
            lens[i] = BS;
            kinds[i] = kind;
            if (kind == 0) {
                r = qcowprov_aio_pread(img, bufs[i], BS, off, (uint64_t)i);
            } else if (kind == 1) {
                memset(bufs[i], 1 + (round * DEPTH + i) % 250, BS);
                r = qcowprov_aio_pwrite(img, bufs[i], BS, off, i % 8 == 0 ? QCOWPROV_WRITE_FUA : 0,
                                        (uint64_t)i);
                fprintf(cmds, "write -P %d %" PRIu64 " %u\n", bufs[i][0], off, BS);
            } else if (kind == 2) {
                /* vectored: two halves, the second first in memory */
                struct iovec iov[2] = {
                    { bufs[i] + BS / 2, BS / 2 },
                    { bufs[i], BS / 2 },
                };
                memset(bufs[i], 0xa0 + i, BS / 2);
                memset(bufs[i] + BS / 2, 0x50 + i, BS / 2);
                r = qcowprov_aio_pwritev(img, iov, 2, off, 0, (uint64_t)i);
                fprintf(cmds, "write -P %d %" PRIu64 " %u\n", 0x50 + i, off, BS / 2);
                fprintf(cmds, "write -P %d %" PRIu64 " %u\n", 0xa0 + i, off + BS / 2, BS / 2);
            } else {
                lens[i] = 0;
                r = i % 2 ? qcowprov_aio_write_zeroes(img, off, BS, QCOWPROV_ZERO_MAY_UNMAP, (uint64_t)i)
                          : qcowprov_aio_discard(img, off, BS, (uint64_t)i);
                fprintf(cmds, i % 2 ? "write -z -u %" PRIu64 " %u\n" : "discard %" PRIu64 " %u\n", off, BS);
            }
            EXPECT(r == 0, "round %d: submitting request %d (kind %d): %d", round, i, kind, r);
        }
        EXPECT(qcowprov_aio_in_flight(img) == DEPTH, "in flight: %" PRId64, qcowprov_aio_in_flight(img));
        n = reap_n(img, fd, done, DEPTH);
        EXPECT(n == DEPTH, "round %d: reaped %d", round, n);
        for (i = 0; i < (n > 0 ? n : 0); i++) {
            uint64_t c = done[i].cookie;
            EXPECT(c < DEPTH, "cookie %" PRIu64, c);
            if (c >= DEPTH)
                continue;
            EXPECT(done[i].result == (int64_t)lens[c], "round %d: request %" PRIu64 ": result %" PRId64,
                   round, c, done[i].result);
            if (kinds[c] == 0)
                EXPECT(memcmp(bufs[c], model + offs[c], BS) == 0, "round %d: read at %" PRIu64
                       " differs from the model", round, offs[c]);
        }
        for (i = 0; i < DEPTH; i++) {
            if (kinds[i] == 1)
                memcpy(model + offs[i], bufs[i], BS);
            else if (kinds[i] == 2) {
                memcpy(model + offs[i], bufs[i] + BS / 2, BS / 2);
                memcpy(model + offs[i] + BS / 2, bufs[i], BS / 2);
            } else if (kinds[i] == 3)
                memset(model + offs[i], 0, BS);
        }
        /* the descriptor is not readable once everything was reaped */
        {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            EXPECT(poll(&p, 1, 0) == 0, "round %d: fd readable with nothing to reap", round);
        }
    }
    EXPECT_RC(qcowprov_aio_flush(img, 99), 0);
    n = reap_n(img, fd, done, 1);
    EXPECT(n == 1 && done[0].cookie == 99 && done[0].result == 0, "flush completion");
    /* preadv of the whole disk against the model */
    {
        unsigned char *a = malloc(SIZE / 2), *b = malloc(SIZE / 2);
        struct iovec iov[2] = { { a, SIZE / 2 }, { b, SIZE / 2 } };
        EXPECT_RC(qcowprov_aio_preadv(img, iov, 2, 0, 5), 0);
        n = reap_n(img, fd, done, 1);
        EXPECT(n == 1 && done[0].result == SIZE, "preadv completion %" PRId64, done[0].result);
        EXPECT(memcmp(a, model, SIZE / 2) == 0 && memcmp(b, model + SIZE / 2, SIZE / 2) == 0,
               "the disk differs from the model");
        free(a);
        free(b);
    }
}

static void bad_submissions(qcowprov_image *img)
{
    static unsigned char buf[8192] __attribute__((aligned(4096)));
    struct qcowprov_aio_completion c[8];
    int i, r, fd = qcowprov_aio_fd(img);

    EXPECT_RC(qcowprov_aio_pread(NULL, buf, 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, NULL, 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, NULL, 512, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 4096, SIZE - 512, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 4096, 0, 0x80, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, 0, 4096, 0x80, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_discard(img, SIZE, 4096, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, NULL, 1, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_reap(img, NULL, 4), -EINVAL);
    EXPECT_RC(qcowprov_aio_set_callback(img, NULL, NULL), -EINVAL);
    /* the queue is 4 deep here: the fifth submission is refused until a reap */
    for (i = 0; i < 4; i++)
        EXPECT_RC(qcowprov_aio_pread(img, buf + i * 2048, 2048, 0, (uint64_t)i), 0);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 9), -EAGAIN);
    EXPECT(strstr(qcowprov_last_error(), "full") != NULL, "message: %s", qcowprov_last_error());
    r = reap_n(img, fd, c, 4);
    EXPECT(r == 4, "reaped %d", r);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 9), 0);
    EXPECT(reap_n(img, fd, c, 1) == 1, "reap after EAGAIN");
    EXPECT_RC(qcowprov_aio_in_flight(img), 0);
}

static void direct_alignment(const char *aio)
{
    static unsigned char buf[8192] __attribute__((aligned(4096)));
    char opts[128];
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    int r;

    snprintf(opts, sizeof opts, "aio=%s", aio);
    r = qcowprov_open(path("aio.qcow2"), opts, QCOWPROV_OPEN_DIRECT, &img);
    if (r == -EINVAL && strstr(qcowprov_last_error(), "O_DIRECT")) {
        printf("note: no O_DIRECT on this filesystem\n");
        return;
    }
    EXPECT(r == 0, "open with O_DIRECT: %d", r);
    if (r < 0)
        return;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_RC(qcowprov_get_info(img, &info), 0);
    EXPECT(info.aio_alignment >= 512, "aio_alignment %" PRIu64, info.aio_alignment);
    EXPECT_RC(qcowprov_aio_pread(img, buf + 1, 4096, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 4096, 1, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 100, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 4096, 0, 1), 0);
    EXPECT_RC(qcowprov_close(img), 0);
}

static int delivered, cancelled, other;

static void on_done(void *opaque, uint64_t cookie, int64_t result)
{
    (void)cookie;
    __atomic_add_fetch(&delivered, 1, __ATOMIC_SEQ_CST);
    if (result == -ECANCELED)
        __atomic_add_fetch(&cancelled, 1, __ATOMIC_SEQ_CST);
    else if (result != (int64_t)(uintptr_t)opaque)
        __atomic_add_fetch(&other, 1, __ATOMIC_SEQ_CST);
}

static void callback_and_close(const char *aio)
{
    static unsigned char buf[64][4096] __attribute__((aligned(4096)));
    char opts[128];
    qcowprov_image *img = NULL;
    int i, submitted = 0;

    snprintf(opts, sizeof opts, "aio=%s", aio);
    EXPECT_RC(qcowprov_open(path("aio.qcow2"), opts, 0, &img), 0);
    if (img == NULL)
        return;
    EXPECT_RC(qcowprov_aio_set_callback(img, on_done, (void *)(uintptr_t)4096), 0);
    EXPECT_RC(qcowprov_aio_set_callback(img, on_done, NULL), -EBUSY);
    for (i = 0; i < 64; i++) {
        memset(buf[i], 0x11, 4096);
        /* writes over data the event loop wrote: their content is checked by the script */
        if (qcowprov_aio_pwrite(img, buf[i], 4096, (uint64_t)(SIZE - 64 * 4096) + (uint64_t)i * 4096, 0,
                                (uint64_t)i) == 0)
            submitted++;
    }
    EXPECT(submitted == 64, "submitted %d", submitted);
    /* close right away: every request is delivered, done or cancelled */
    EXPECT_RC(qcowprov_close(img), 0);
    EXPECT(delivered == 64, "callbacks: %d", delivered);
    EXPECT(other == 0, "%d callbacks with a result neither 4096 nor -ECANCELED", other);
    printf("close with 64 in flight: %d cancelled\n", cancelled);
    /* a closed handle */
    EXPECT_RC(qcowprov_aio_pread(img, buf[0], 512, 0, 1), -EBADF);
}

int main(int argc, char **argv)
{
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    char opts[128];
    FILE *cmds;
    int r;

    if (argc != 3) {
        fprintf(stderr, "usage: api-aio DIR io_uring|threads\n");
        return 2;
    }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    cmds = fopen(path("cmds"), "w");
    if (cmds == NULL) {
        perror("cmds");
        return 2;
    }
    r = qcowprov_create(path("aio.qcow2"), "cluster_size=65536", SIZE);
    EXPECT(r == 0, "create: %d", r);
    snprintf(opts, sizeof opts, "discard=unmap,aio=%s,l2-cache-size=64K", argv[2]);
    r = qcowprov_open(path("aio.qcow2"), opts, 0, &img);
    EXPECT(r == 0, "open %s: %d", opts, r);
    if (r < 0)
        goto out;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_RC(qcowprov_get_info(img, &info), 0);
    EXPECT(info.aio == (strcmp(argv[2], "io_uring") == 0 ? QCOWPROV_AIO_IO_URING : QCOWPROV_AIO_THREADS),
           "info.aio %u", info.aio);
    EXPECT(info.aio_queue_depth == 1024 && info.aio_alignment == 1, "depth %u alignment %" PRIu64,
           info.aio_queue_depth, info.aio_alignment);
    EXPECT(strstr(info.options, "aio=") != NULL, "options: %s", info.options);
    event_loop(img, cmds);
    EXPECT_RC(qcowprov_close(img), 0);
    fclose(cmds);
    cmds = NULL;

    snprintf(opts, sizeof opts, "aio=%s,aio-queue-depth=4", argv[2]);
    EXPECT_RC(qcowprov_open(path("aio.qcow2"), opts, 0, &img), 0);
    bad_submissions(img);
    EXPECT_RC(qcowprov_close(img), 0);
    snprintf(opts, sizeof opts, "aio=%s", argv[2]);
    EXPECT_RC(qcowprov_open(path("aio.qcow2"), opts, QCOWPROV_OPEN_RDONLY, &img), 0);
    {
        static unsigned char b[512];
        EXPECT_RC(qcowprov_aio_pwrite(img, b, 512, 0, 0, 1), -EROFS);
        EXPECT_RC(qcowprov_aio_discard(img, 0, 65536, 1), -EROFS);
    }
    EXPECT_RC(qcowprov_close(img), 0);
    direct_alignment(argv[2]);
    callback_and_close(argv[2]);
out:
    if (cmds)
        fclose(cmds);
    return summary("api-aio");
}
