/*
 * api-aio-bad: bad and edge-case submissions to the asynchronous API, on one backend
 * (io_uring or threads). Each gets the error the header documents, never a crash:
 *  - NULL handle, buffers, iovec arrays, iov_base with a length, completion array,
 *    callback; a negative iovcnt;
 *  - ranges past the virtual size, ending exactly at it, and whose end overflows;
 *  - zero-length reads, writes (also FUA and vectored with no bytes), discards and
 *    write-zeroes: accepted, completing with result 0 (a NULL buffer is still -EINVAL);
 *  - a full queue at the default depth (1024) and at depth 1, with reap and with a
 *    callback; aio-queue-depth outside 1..65536 refused at open;
 *  - with O_DIRECT: unaligned buffers, lengths and offsets of reads and writes, and of
 *    single iovecs, refused; unaligned discards and write-zeroes accepted and done;
 *  - every aio call on a closed handle: -EBADF;
 *  - close with requests in flight and nothing reaped: close succeeds, the completions
 *    are dropped, and the library never writes a read buffer again; close while a
 *    callback keeps resubmitting: its submissions are refused once close began (-EBADF,
 *    or -ESHUTDOWN when it checked the handle just before), every accepted request is
 *    delivered, close returns.
 *
 *   api-aio-bad DIR AIO     (DIR: an empty scratch directory; AIO: io_uring or threads)
 *
 * Leaves DIR/bad.qcow2 for the script's qemu-img check. Prints each failed expectation
 * and a summary; exits 1 if any failed.
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

#define EXPECT_RC(call, code)                                                        \
    do {                                                                             \
        int64_t r_ = (call);                                                         \
        EXPECT(r_ == (code), "%s returned %" PRId64 ", expected %d", #call, r_, (code)); \
    } while (0)

#define SIZE (4u << 20)

static char image[4200];
static const char *aio;
static unsigned char buf[65536] __attribute__((aligned(4096)));

static qcowprov_image *open_with(const char *extra, uint32_t flags)
{
    char opts[256];
    qcowprov_image *img = NULL;
    int r;

    snprintf(opts, sizeof opts, "aio=%s%s%s", aio, *extra ? "," : "", extra);
    r = qcowprov_open(image, opts, flags, &img);
    EXPECT(r == 0, "open %s: %d", opts, r);
    return r == 0 ? img : NULL;
}

/* Reap exactly n completions (polling the descriptor); returns how many came. */
static int reap_n(qcowprov_image *img, struct qcowprov_aio_completion *out, int n)
{
    int got = 0, fd = qcowprov_aio_fd(img);

    while (got < n) {
        int r = qcowprov_aio_reap(img, out + got, (uint32_t)(n - got));
        if (r < 0)
            return r;
        if (r == 0) {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            if (poll(&p, 1, 30000) == 0)
                return got;
        }
        got += r;
    }
    return got;
}

/* One request's completion: the result. */
static int64_t result_of_one(qcowprov_image *img, uint64_t cookie)
{
    struct qcowprov_aio_completion c = { 0, 0 };
    int n = reap_n(img, &c, 1);

    EXPECT(n == 1 && c.cookie == cookie, "completion of %" PRIu64 ": %d, cookie %" PRIu64, cookie, n,
           c.cookie);
    return n == 1 ? c.result : -ETIMEDOUT;
}

static void null_arguments(qcowprov_image *img)
{
    struct iovec iov[2] = { { buf, 4096 }, { NULL, 512 } };
    struct qcowprov_aio_completion c;

    EXPECT_RC(qcowprov_aio_fd(NULL), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(NULL, buf, 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(NULL, iov, 1, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(NULL, buf, 512, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(NULL, iov, 1, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_discard(NULL, 0, 512, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_write_zeroes(NULL, 0, 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_flush(NULL, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_reap(NULL, &c, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_wait(NULL, 1, 0), -EINVAL);
    EXPECT_RC(qcowprov_aio_in_flight(NULL), -EINVAL);
    EXPECT_RC(qcowprov_aio_set_callback(NULL, NULL, NULL), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, NULL, 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, NULL, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, NULL, 512, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, NULL, 0, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, NULL, 1, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, NULL, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(img, NULL, 1, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, iov, 2, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(img, iov, 2, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, iov, -1, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(img, iov, -1, 0, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_reap(img, NULL, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_set_callback(img, NULL, NULL), -EINVAL);
    EXPECT_RC(qcowprov_aio_in_flight(img), 0);
}

static void ranges(qcowprov_image *img)
{
    struct iovec iov[2] = { { buf, 4096 }, { buf + 8192, 4096 } };
    const uint64_t huge = UINT64_MAX - 1000;

    /* past the end, straddling it, and overflowing */
    EXPECT_RC(qcowprov_aio_pread(img, buf, 4096, SIZE - 512, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 1, SIZE, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 4096, huge, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_preadv(img, iov, 2, SIZE - 4096, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 4096, SIZE - 512, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 4096, huge, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(img, iov, 2, SIZE - 4096, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_discard(img, SIZE - 512, 4096, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_discard(img, huge, 4096, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_discard(img, 4096, UINT64_MAX, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, SIZE, 1, 0, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, huge, 4096, QCOWPROV_ZERO_MAY_UNMAP, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, 0, 4096, 0x80, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 4096, 0, 0x80, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_pwritev(img, iov, 2, 0, 0x80, 1), -EINVAL);
    EXPECT_RC(qcowprov_aio_in_flight(img), 0);
    /* ending exactly at the end is fine */
    memset(buf, 0x5a, 8192);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 8192, SIZE - 8192, 0, 2), 0);
    EXPECT(result_of_one(img, 2) == 8192, "write ending at the end");
    memset(buf, 0, 8192);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 8192, SIZE - 8192, 3), 0);
    EXPECT(result_of_one(img, 3) == 8192 && buf[0] == 0x5a && buf[8191] == 0x5a, "read ending at the end");
}

static void zero_length(qcowprov_image *img)
{
    struct iovec empty[2] = { { buf, 0 }, { NULL, 0 } };
    struct qcowprov_aio_completion c[8];
    int i, n;

    memset(buf, 0x77, 16);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 0, 0, 10), 0);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 0, SIZE, 11), 0);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 0, 4096, 0, 12), 0);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 0, 4096, QCOWPROV_WRITE_FUA, 13), 0);
    EXPECT_RC(qcowprov_aio_preadv(img, empty, 2, 0, 14), 0);
    EXPECT_RC(qcowprov_aio_pwritev(img, empty, 0, 0, 0, 15), 0);
    EXPECT_RC(qcowprov_aio_discard(img, 4096, 0, 16), 0);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, SIZE, 0, QCOWPROV_ZERO_MAY_UNMAP, 17), 0);
    n = reap_n(img, c, 8);
    EXPECT(n == 8, "zero-length completions: %d", n);
    for (i = 0; i < (n > 0 ? n : 0); i++)
        EXPECT(c[i].cookie >= 10 && c[i].cookie <= 17 && c[i].result == 0,
               "zero-length request %" PRIu64 ": result %" PRId64, c[i].cookie, c[i].result);
    EXPECT(buf[0] == 0x77, "a zero-length read wrote its buffer");
}

static int cb_calls, cb_odd;

/* Counts deliveries: done (0) or cancelled by close (-ECANCELED). */
static void count_cb(void *opaque, uint64_t cookie, int64_t result)
{
    (void)opaque;
    (void)cookie;
    __atomic_add_fetch(&cb_calls, 1, __ATOMIC_SEQ_CST);
    if (result != 0 && result != -ECANCELED)
        __atomic_add_fetch(&cb_odd, 1, __ATOMIC_SEQ_CST);
}

static void full_queue(void)
{
    static struct qcowprov_aio_completion c[1100];
    qcowprov_image *img = open_with("", 0);
    struct qcowprov_info info;
    int i, ok = 0, n;

    if (img == NULL)
        return;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT_RC(qcowprov_get_info(img, &info), 0);
    EXPECT(info.aio_queue_depth == 1024, "default depth %u", info.aio_queue_depth);
    /* zero-length discards hold no memory: fill the default depth with them */
    for (i = 0; i < 1024; i++)
        ok += qcowprov_aio_discard(img, 0, 0, (uint64_t)i) == 0;
    EXPECT(ok == 1024, "accepted %d of 1024", ok);
    EXPECT_RC(qcowprov_aio_discard(img, 0, 0, 5000), -EAGAIN);
    EXPECT_RC(qcowprov_aio_flush(img, 5001), -EAGAIN);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 5002), -EAGAIN);
    EXPECT_RC(qcowprov_aio_in_flight(img), 1024);
    /* every request completes; reaping one frees one slot */
    EXPECT(qcowprov_aio_wait(img, 1024, 30000) == 1024, "wait for 1024");
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 5003), -EAGAIN);
    EXPECT_RC(qcowprov_aio_reap(img, c, 1), 1);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 5004), 0);
    EXPECT_RC(qcowprov_aio_discard(img, 0, 0, 5005), -EAGAIN);
    n = reap_n(img, c, 1024);
    EXPECT(n == 1024, "reaped %d", n);
    EXPECT_RC(qcowprov_aio_in_flight(img), 0);
    EXPECT_RC(qcowprov_close(img), 0);

    /* depth 1 with a callback: the slot frees when the callback got the completion */
    img = open_with("aio-queue-depth=1", 0);
    if (img == NULL)
        return;
    EXPECT_RC(qcowprov_aio_set_callback(img, count_cb, NULL), 0);
    ok = 0;
    for (i = 0; i < 200 && ok < 50; i++) {
        int r = qcowprov_aio_discard(img, 0, 0, (uint64_t)i);
        EXPECT(r == 0 || r == -EAGAIN, "depth 1: %d", r);
        if (r == 0)
            ok++;
        else
            usleep(1000);
    }
    EXPECT_RC(qcowprov_close(img), 0);
    EXPECT(cb_calls == ok && cb_odd == 0, "depth 1: %d accepted, %d delivered, %d neither done nor cancelled",
           ok, cb_calls, cb_odd);

    /* depths outside 1..65536 are refused at open */
    {
        char opts[128];
        qcowprov_image *bad = NULL;
        snprintf(opts, sizeof opts, "aio=%s,aio-queue-depth=0", aio);
        EXPECT_RC(qcowprov_open(image, opts, 0, &bad), -EINVAL);
        snprintf(opts, sizeof opts, "aio=%s,aio-queue-depth=65537", aio);
        EXPECT_RC(qcowprov_open(image, opts, 0, &bad), -EINVAL);
        EXPECT(bad == NULL, "out-param written on failure");
        snprintf(opts, sizeof opts, "aio=%s,aio-queue-depth=65536", aio);
        EXPECT_RC(qcowprov_open(image, opts, 0, &bad), 0);
        if (bad)
            EXPECT_RC(qcowprov_close(bad), 0);
    }
}

static void direct(void)
{
    qcowprov_image *img = NULL;
    struct qcowprov_info info;
    char opts[128];
    uint64_t a;
    int r;

    snprintf(opts, sizeof opts, "aio=%s", aio);
    r = qcowprov_open(image, opts, QCOWPROV_OPEN_DIRECT, &img);
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
    a = info.aio_alignment;
    EXPECT(a >= 512 && a <= 4096, "aio_alignment %" PRIu64, a);
    if (a < 512 || a > 4096)
        goto out;
    {
        struct iovec mis_base[2] = { { buf, a }, { buf + a + 8, a } };
        struct iovec mis_len[2] = { { buf, a + 100 }, { buf + 2 * a, a - 100 } };
        struct iovec good[2] = { { buf + 2 * a, a }, { buf, a } };

        EXPECT_RC(qcowprov_aio_pread(img, buf + 1, a, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pread(img, buf, a, a / 2, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pread(img, buf, a + 1, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pwrite(img, buf + 512 / 2, a, 0, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pwrite(img, buf, a, 1, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pwrite(img, buf, 100, 0, QCOWPROV_WRITE_FUA, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_preadv(img, mis_base, 2, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pwritev(img, mis_base, 2, 0, 0, 1), -EINVAL);
        /* the total is aligned, the parts are not */
        EXPECT_RC(qcowprov_aio_preadv(img, mis_len, 2, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_pwritev(img, mis_len, 2, 0, 0, 1), -EINVAL);
        EXPECT_RC(qcowprov_aio_in_flight(img), 0);
        /* aligned vectored I/O works; discard and write-zeroes take any range */
        memset(buf, 0x31, 3 * a);
        memset(buf + 2 * a, 0x32, a);
        EXPECT_RC(qcowprov_aio_pwritev(img, good, 2, 65536, 0, 20), 0);
        EXPECT(result_of_one(img, 20) == (int64_t)(2 * a), "aligned pwritev");
        EXPECT_RC(qcowprov_aio_write_zeroes(img, 65536 + 100, 300, 0, 21), 0);
        EXPECT(result_of_one(img, 21) == 0, "unaligned write-zeroes");
        EXPECT_RC(qcowprov_aio_discard(img, 65536 + a + 7, 1000, 22), 0);
        EXPECT(result_of_one(img, 22) == 0, "unaligned discard");
        memset(buf, 0, 3 * a);
        EXPECT_RC(qcowprov_aio_pread(img, buf, 2 * a, 65536, 23), 0);
        EXPECT(result_of_one(img, 23) == (int64_t)(2 * a), "aligned pread");
        EXPECT(buf[0] == 0x32 && buf[99] == 0x32 && buf[100] == 0 && buf[399] == 0 && buf[400] == 0x32 &&
                   buf[a] == 0x31,
               "content after unaligned zeroing: %x %x %x %x %x", buf[0], buf[100], buf[399], buf[400],
               buf[a]);
    }
out:
    EXPECT_RC(qcowprov_close(img), 0);
}

static void closed_handle(void)
{
    qcowprov_image *img = open_with("", 0);
    struct iovec iov[1] = { { buf, 512 } };
    struct qcowprov_aio_completion c;

    if (img == NULL)
        return;
    EXPECT(qcowprov_aio_fd(img) >= 0, "fd");
    EXPECT_RC(qcowprov_close(img), 0);
    EXPECT_RC(qcowprov_aio_fd(img), -EBADF);
    EXPECT_RC(qcowprov_aio_pread(img, buf, 512, 0, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_preadv(img, iov, 1, 0, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_pwrite(img, buf, 512, 0, 0, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_pwritev(img, iov, 1, 0, 0, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_discard(img, 0, 512, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_write_zeroes(img, 0, 512, 0, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_flush(img, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_reap(img, &c, 1), -EBADF);
    EXPECT_RC(qcowprov_aio_wait(img, 1, 0), -EBADF);
    EXPECT_RC(qcowprov_aio_in_flight(img), -EBADF);
    EXPECT_RC(qcowprov_aio_set_callback(img, count_cb, NULL), -EBADF);
}

/* Close with 48 requests in flight and nothing reaped: afterwards the read buffers are
 * never written again. */
static void close_unreaped(void)
{
    static unsigned char rbuf[16][65536] __attribute__((aligned(4096)));
    static unsigned char wbuf[16][65536] __attribute__((aligned(4096)));
    qcowprov_image *img = open_with("discard=unmap", 0);
    int i, ok = 0;

    if (img == NULL)
        return;
    for (i = 0; i < 16; i++) {
        uint64_t off = (uint64_t)i * 131072;
        memset(wbuf[i], 0x40 + i, sizeof wbuf[i]);
        ok += qcowprov_aio_pwrite(img, wbuf[i], 65536, off, i % 4 ? 0 : QCOWPROV_WRITE_FUA, (uint64_t)i) == 0;
        ok += qcowprov_aio_pread(img, rbuf[i], 65536, off + 65536, 100 + (uint64_t)i) == 0;
        ok += qcowprov_aio_write_zeroes(img, 2u << 20 | off, 65536, QCOWPROV_ZERO_MAY_UNMAP, 200 + (uint64_t)i) == 0;
    }
    EXPECT(ok == 48, "submitted %d of 48", ok);
    EXPECT_RC(qcowprov_close(img), 0);
    for (i = 0; i < 16; i++)
        memset(rbuf[i], 0xee, sizeof rbuf[i]);
    usleep(200000);
    for (i = 0; i < 16; i++)
        EXPECT(find_mismatch(rbuf[i], sizeof rbuf[i], 0xee) == sizeof rbuf[i],
               "read buffer %d written after close", i);
}

/* A callback that resubmits until close refuses it. */
static qcowprov_image *resub_img;
static int resub_accepted, resub_delivered, resub_refused, resub_odd;

static void resubmit_cb(void *opaque, uint64_t cookie, int64_t result)
{
    int r;

    (void)opaque;
    __atomic_add_fetch(&resub_delivered, 1, __ATOMIC_SEQ_CST);
    if (result != 4096 && result != -ECANCELED)
        __atomic_add_fetch(&resub_odd, 1, __ATOMIC_SEQ_CST);
    r = qcowprov_aio_pwrite(resub_img, buf + (cookie % 8) * 4096, 4096, (cookie % 64) * 4096, 0, cookie + 1);
    if (r == 0)
        __atomic_add_fetch(&resub_accepted, 1, __ATOMIC_SEQ_CST);
    else if (r == -EBADF || r == -ESHUTDOWN)
        __atomic_add_fetch(&resub_refused, 1, __ATOMIC_SEQ_CST);
    else
        __atomic_add_fetch(&resub_odd, 1, __ATOMIC_SEQ_CST);
}

static void close_while_resubmitting(void)
{
    int i;

    resub_img = open_with("", 0);
    if (resub_img == NULL)
        return;
    memset(buf, 0x66, 8 * 4096);
    EXPECT_RC(qcowprov_aio_set_callback(resub_img, resubmit_cb, NULL), 0);
    for (i = 0; i < 8; i++)
        if (qcowprov_aio_pwrite(resub_img, buf + i * 4096, 4096, (uint64_t)i * 4096 * 8, 0,
                                (uint64_t)i * 1000) == 0)
            __atomic_add_fetch(&resub_accepted, 1, __ATOMIC_SEQ_CST);
    usleep(20000);
    EXPECT_RC(qcowprov_close(resub_img), 0);
    EXPECT(resub_odd == 0, "%d unexpected results or submission errors", resub_odd);
    EXPECT(resub_refused > 0, "no resubmission was refused");
    EXPECT(resub_delivered == resub_accepted, "%d accepted, %d delivered", resub_accepted, resub_delivered);
    printf("close while resubmitting: %d accepted, %d refused\n", resub_accepted, resub_refused);
}

int main(int argc, char **argv)
{
    qcowprov_image *img;
    int r;

    if (argc != 3) {
        fprintf(stderr, "usage: api-aio-bad DIR io_uring|threads\n");
        return 2;
    }
    snprintf(dir, sizeof dir, "%s", argv[1]);
    snprintf(image, sizeof image, "%s", path("bad.qcow2"));
    aio = argv[2];
    r = qcowprov_create(image, "cluster_size=65536", SIZE);
    EXPECT(r == 0, "create: %d", r);
    img = open_with("", 0);
    if (img != NULL) {
        null_arguments(img);
        ranges(img);
        zero_length(img);
        EXPECT_RC(qcowprov_close(img), 0);
    }
    full_queue();
    direct();
    closed_handle();
    close_unreaped();
    close_while_resubmitting();
    return summary("api-aio-bad");
}
