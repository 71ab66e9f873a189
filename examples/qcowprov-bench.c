/*
 * qcowprov-bench: qemu-img bench over the libqcowprov C API.
 *
 *   qcowprov-bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w]
 *                  [-t none|writeback] [-i io_uring|threads|auto|sync]
 *                  [--pattern=BYTE] [--flush-interval=N] [-f qcow2|raw] [-q] FILE
 *
 * Defaults as qemu-img bench: 75000 requests of 4096 bytes, depth 64, step =
 * size, offset 0, reads, cache=writeback. As in qemu-img bench, DEPTH requests
 * are in flight on one thread: they are submitted with qcowprov_aio_*, the
 * thread polls the completion descriptor, reaps and submits the next ones
 * (`-i` chooses the backend, the `aio=` open option; default auto). `-i sync`
 * runs DEPTH threads calling the synchronous API instead, each taking the next
 * request index from a shared counter. Request i goes to OFFSET + i*STEP,
 * wrapped as qemu-img bench wraps (modulo image size - request size). `-f raw`
 * runs the thread loop with pread/pwrite on the file (O_DIRECT for -t none):
 * the ceiling to compare against (with `-i sync` on the qcow2 side).
 * `--random` (not in qemu-img bench) sends request i to a pseudo-random offset, a
 * multiple of SIZE below the image size, from a fixed hash of i: every run with the
 * same COUNT writes the same offsets (a bitmap cost measurement compares such runs).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

static const char *prog = "qcowprov-bench";

struct bench {
    /* configuration */
    int count, depth, is_write, pattern, flush_interval, raw, random, sync;
    unsigned char *async_bufs; /* freed after qcowprov_close */
    uint64_t bufsize, step, offset, image_size;
    qcowprov_image *img;
    int fd;
    /* shared state */
    uint64_t next;            /* next request index, taken atomically */
    int failed;               /* set once by the first failing thread */
    pthread_mutex_t lock;
    char error[512];
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w]\n"
            "       [-t none|writeback] [-i io_uring|threads|auto|sync] [--pattern=BYTE]\n"
            "       [--flush-interval=N] [--random] [-f qcow2|raw] [-q] FILE\n",
            prog);
}

static uint64_t request_offset(const struct bench *b, uint64_t i)
{
    uint64_t m;

    if (b->random) {
        /* splitmix64 of the index: a fixed, well spread sequence. */
        uint64_t z = i + 0x9e3779b97f4a7c15ULL * (i + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        return b->image_size < b->bufsize ? 0 : z % (b->image_size / b->bufsize) * b->bufsize;
    }
    if (i == 0)
        return b->offset;
    if (b->image_size <= b->bufsize)
        return 0;
    m = b->image_size - b->bufsize;
    return (uint64_t)(((unsigned __int128)b->offset + (unsigned __int128)i * b->step) % m);
}

/* Record the first failure; the other threads stop at their next request. */
static void fail(struct bench *b, const char *msg)
{
    pthread_mutex_lock(&b->lock);
    if (!b->failed) {
        snprintf(b->error, sizeof b->error, "%s", msg);
        __atomic_store_n(&b->failed, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&b->lock);
}

static void *worker(void *arg)
{
    struct bench *b = arg;
    void *buf = NULL;
    char msg[400];

    if (posix_memalign(&buf, 4096, b->bufsize) != 0) {
        snprintf(msg, sizeof msg, "cannot allocate %" PRIu64 " bytes", b->bufsize);
        fail(b, msg);
        return NULL;
    }
    fill_pattern(buf, b->bufsize, b->pattern);
    while (!__atomic_load_n(&b->failed, __ATOMIC_RELAXED)) {
        uint64_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        uint64_t off;
        int64_t r;

        if (i >= (uint64_t)b->count)
            break;
        off = request_offset(b, i);
        if (b->raw) {
            r = b->is_write ? pwrite(b->fd, buf, b->bufsize, (off_t)off)
                            : pread(b->fd, buf, b->bufsize, (off_t)off);
            if (r < 0)
                r = -errno;
        } else {
            r = b->is_write ? qcowprov_pwrite(b->img, buf, b->bufsize, off, 0)
                            : qcowprov_pread(b->img, buf, b->bufsize, off);
        }
        if (r < 0) {
            snprintf(msg, sizeof msg, "request %" PRIu64 " at offset %" PRIu64 " failed: %s", i, off,
                     b->raw ? strerror((int)-r) : lib_error(r));
            fail(b, msg);
            break;
        }
        if ((uint64_t)r != b->bufsize) {
            snprintf(msg, sizeof msg, "request %" PRIu64 " at offset %" PRIu64 " was short (%" PRId64 " bytes)",
                     i, off, r);
            fail(b, msg);
            break;
        }
        if (b->flush_interval && (i + 1) % (uint64_t)b->flush_interval == 0) {
            int fr = b->raw ? (fdatasync(b->fd) < 0 ? -errno : 0) : qcowprov_flush(b->img);
            if (fr < 0) {
                snprintf(msg, sizeof msg, "flush after request %" PRIu64 " failed: %s", i,
                         b->raw ? strerror(-fr) : lib_error(fr));
                fail(b, msg);
                break;
            }
        }
    }
    free(buf);
    return NULL;
}

/*
 * DEPTH requests in flight on this thread: submit, poll the completion
 * descriptor, reap, submit the next. Flushes (--flush-interval) wait for the
 * requests in flight, as qemu-img bench's do.
 */
static void run_async(struct bench *b)
{
    struct qcowprov_aio_completion done[64];
    unsigned char *bufs = NULL;
    int *free_slots;
    uint64_t issued = 0, completed = 0, since_flush = 0;
    int nfree = b->depth, flushing = 0, fd, i, r;
    char msg[400];

    free_slots = calloc((size_t)b->depth, sizeof *free_slots);
    if (free_slots == NULL || posix_memalign((void **)&bufs, 4096, b->bufsize * (uint64_t)b->depth) != 0) {
        fail(b, "out of memory");
        free(free_slots);
        return;
    }
    for (i = 0; i < b->depth; i++) {
        free_slots[i] = b->depth - 1 - i;
        fill_pattern(bufs + (uint64_t)i * b->bufsize, b->bufsize, b->pattern);
    }
    fd = qcowprov_aio_fd(b->img);
    if (fd < 0) {
        snprintf(msg, sizeof msg, "cannot start the asynchronous queue: %s", lib_error(fd));
        fail(b, msg);
        goto out;
    }
    while (completed < (uint64_t)b->count) {
        /* Fill the queue, unless a flush waits for it to drain. */
        while (!flushing && nfree > 0 && issued < (uint64_t)b->count) {
            int slot = free_slots[nfree - 1];
            unsigned char *buf = bufs + (uint64_t)slot * b->bufsize;
            uint64_t off = request_offset(b, issued);
            r = b->is_write ? qcowprov_aio_pwrite(b->img, buf, b->bufsize, off, 0, (uint64_t)slot)
                            : qcowprov_aio_pread(b->img, buf, b->bufsize, off, (uint64_t)slot);
            if (r < 0) {
                snprintf(msg, sizeof msg, "submitting request %" PRIu64 " at offset %" PRIu64 ": %s", issued,
                         off, lib_error(r));
                fail(b, msg);
                goto out;
            }
            nfree--;
            issued++;
            since_flush++;
            if (b->flush_interval && since_flush == (uint64_t)b->flush_interval) {
                flushing = 1;
                since_flush = 0;
            }
        }
        if (flushing && nfree == b->depth) {
            r = qcowprov_flush(b->img);
            if (r < 0) {
                snprintf(msg, sizeof msg, "flush failed: %s", lib_error(r));
                fail(b, msg);
                goto out;
            }
            flushing = 0;
            continue;
        }
        r = qcowprov_aio_reap(b->img, done, 64);
        if (r < 0) {
            snprintf(msg, sizeof msg, "reap failed: %s", lib_error(r));
            fail(b, msg);
            goto out;
        }
        if (r == 0) {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            if (poll(&p, 1, -1) < 0 && errno != EINTR) {
                snprintf(msg, sizeof msg, "poll failed: %s", strerror(errno));
                fail(b, msg);
                goto out;
            }
            continue;
        }
        for (i = 0; i < r; i++) {
            if (done[i].result != (int64_t)b->bufsize) {
                snprintf(msg, sizeof msg, "a request failed: %s",
                         done[i].result < 0 ? strerror((int)-done[i].result) : "short transfer");
                fail(b, msg);
                goto out;
            }
            free_slots[nfree++] = (int)done[i].cookie;
            completed++;
        }
    }
out:
    /* Requests still in flight finish (or are cancelled) at qcowprov_close, before the
     * buffers are freed: main closes the image first. */
    b->async_bufs = bufs;
    free(free_slots);
}

static int parse_u64_opt(const char *name, const char *v, uint64_t *out)
{
    if (parse_size(v, out) < 0) {
        fprintf(stderr, "%s: Invalid %s specified: '%s'\n", prog, name, v);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option long_opts[] = {
        { "pattern", required_argument, NULL, 'P' },
        { "flush-interval", required_argument, NULL, 'I' },
        { "random", no_argument, NULL, 'R' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct bench b;
    int c, quiet = 0, direct = 0, have_step = 0, ret = 0, r, i;
    const char *file, *aio = "auto";
    char open_opts[64];
    pthread_t *threads;
    double t0, t1;

    memset(&b, 0, sizeof b);
    b.count = 75000;
    b.depth = 64;
    b.bufsize = 4096;
    b.fd = -1;
    pthread_mutex_init(&b.lock, NULL);

    while ((c = getopt_long(argc, argv, "+c:d:s:S:o:wt:i:f:qh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            if (parse_int(optarg, &b.count) < 0 || b.count < 1) {
                fprintf(stderr, "%s: Invalid request count specified: '%s'\n", prog, optarg);
                return 1;
            }
            break;
        case 'd':
            if (parse_int(optarg, &b.depth) < 0 || b.depth < 1 || b.depth > 4096) {
                fprintf(stderr, "%s: Invalid queue depth specified: '%s'\n", prog, optarg);
                return 1;
            }
            break;
        case 's':
            if (parse_u64_opt("buffer size", optarg, &b.bufsize) < 0)
                return 1;
            if (b.bufsize == 0 || b.bufsize > 0x7fffffff) {
                fprintf(stderr, "%s: Invalid buffer size specified: '%s'\n", prog, optarg);
                return 1;
            }
            break;
        case 'S':
            if (parse_u64_opt("step size", optarg, &b.step) < 0)
                return 1;
            if (b.step > 0x7fffffff) {
                fprintf(stderr, "%s: Invalid step size specified: '%s'\n", prog, optarg);
                return 1;
            }
            have_step = 1;
            break;
        case 'o':
            if (parse_u64_opt("offset", optarg, &b.offset) < 0)
                return 1;
            break;
        case 'w': b.is_write = 1; break;
        case 't':
            if (strcmp(optarg, "none") == 0) {
                direct = 1;
            } else if (strcmp(optarg, "writeback") == 0) {
                direct = 0;
            } else {
                fprintf(stderr, "%s: Invalid cache mode '%s' (none or writeback)\n", prog, optarg);
                return 1;
            }
            break;
        case 'i':
            if (strcmp(optarg, "sync") == 0) {
                b.sync = 1;
            } else if (strcmp(optarg, "io_uring") == 0 || strcmp(optarg, "threads") == 0 ||
                       strcmp(optarg, "auto") == 0) {
                b.sync = 0;
                aio = optarg;
            } else {
                fprintf(stderr, "%s: Invalid aio '%s' (io_uring, threads, auto or sync)\n", prog, optarg);
                return 1;
            }
            break;
        case 'f':
            if (strcmp(optarg, "raw") == 0) {
                b.raw = 1;
            } else if (strcmp(optarg, "qcow2") == 0) {
                b.raw = 0;
            } else {
                fprintf(stderr, "%s: Unknown format '%s' (qcow2 or raw)\n", prog, optarg);
                return 1;
            }
            break;
        case 'P':
            if (parse_pattern(optarg, &b.pattern) < 0) {
                fprintf(stderr, "%s: Invalid pattern byte specified: '%s'\n", prog, optarg);
                return 1;
            }
            break;
        case 'I':
            if (parse_int(optarg, &b.flush_interval) < 0) {
                fprintf(stderr, "%s: Invalid flush interval specified: '%s'\n", prog, optarg);
                return 1;
            }
            break;
        case 'R': b.random = 1; break;
        case 'q': quiet = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "%s: Expecting one image file name\n", prog);
        usage(stderr);
        return 1;
    }
    if (b.flush_interval && !b.is_write) {
        fprintf(stderr, "%s: --flush-interval is only available in write tests\n", prog);
        return 1;
    }
    if (b.flush_interval && b.flush_interval < b.depth) {
        fprintf(stderr, "%s: Flush interval can't be smaller than depth\n", prog);
        return 1;
    }
    if (!have_step)
        b.step = b.bufsize;
    file = argv[optind];

    if (b.raw) {
        struct stat st;
        off_t end;
        b.fd = open(file, (b.is_write ? O_RDWR : O_RDONLY) | (direct ? O_DIRECT : 0));
        if (b.fd < 0) {
            fprintf(stderr, "%s: Could not open '%s': %s\n", prog, file, strerror(errno));
            return 1;
        }
        if (fstat(b.fd, &st) < 0 || S_ISDIR(st.st_mode)) {
            fprintf(stderr, "%s: '%s' is not a file or block device\n", prog, file);
            close(b.fd);
            return 1;
        }
        end = lseek(b.fd, 0, SEEK_END);
        if (end < 0) {
            fprintf(stderr, "%s: Could not get the size of '%s': %s\n", prog, file, strerror(errno));
            close(b.fd);
            return 1;
        }
        b.image_size = (uint64_t)end;
    } else {
        struct qcowprov_info info;
        uint32_t flags = (b.is_write ? 0 : QCOWPROV_OPEN_RDONLY) | (direct ? QCOWPROV_OPEN_DIRECT : 0);
        snprintf(open_opts, sizeof open_opts, "aio=%s,aio-queue-depth=%d", aio, b.depth);
        r = qcowprov_open(file, open_opts, flags, &b.img);
        if (r < 0) {
            fprintf(stderr, "%s: %s\n", prog, lib_error(r));
            return 1;
        }
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        r = qcowprov_get_info(b.img, &info);
        if (r < 0) {
            report(prog, "get_info", r);
            qcowprov_close(b.img);
            return 1;
        }
        b.image_size = info.virtual_size;
    }

    if (!quiet) {
        printf("Sending %d %s requests, %" PRIu64 " bytes each, %d in parallel (starting at offset %" PRIu64
               ", step size %" PRIu64 ")\n",
               b.count, b.is_write ? "write" : "read", b.bufsize, b.depth, b.offset, b.step);
        if (b.flush_interval)
            printf("Sending flush every %d requests\n", b.flush_interval);
        fflush(stdout);
    }

    if (!b.raw && !b.sync) {
        t0 = now_sec();
        run_async(&b);
        t1 = now_sec();
        goto done;
    }
    threads = calloc((size_t)b.depth, sizeof *threads);
    if (threads == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        ret = 1;
        goto out;
    }
    t0 = now_sec();
    for (i = 0; i < b.depth; i++) {
        r = pthread_create(&threads[i], NULL, worker, &b);
        if (r != 0) {
            char msg[128];
            snprintf(msg, sizeof msg, "cannot start thread %d: %s", i, strerror(r));
            fail(&b, msg);
            break;
        }
    }
    while (i-- > 0)
        pthread_join(threads[i], NULL);
    t1 = now_sec();
    free(threads);
done:
    if (b.failed) {
        fprintf(stderr, "%s: %s\n", prog, b.error);
        ret = 1;
    } else if (!quiet) {
        printf("Run completed in %3.3f seconds.\n", t1 - t0);
    }
out:
    if (b.raw) {
        close(b.fd);
    } else {
        r = qcowprov_close(b.img);
        if (r < 0) {
            report(prog, "close", r);
            ret = 1;
        }
        free(b.async_bufs);
    }
    pthread_mutex_destroy(&b.lock);
    return ret;
}
