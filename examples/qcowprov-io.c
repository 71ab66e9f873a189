/*
 * qcowprov-io: a qemu-io work-alike over the libqcowprov C API.
 *
 *   qcowprov-io [-o OPTIONS] [-r] [-U] [-c COMMAND]... IMAGE
 *
 * Commands (from -c, or one per line on stdin when no -c is given):
 *   read    [-q] [-P PATTERN] OFF LEN
 *   write   [-q] [-f] [-P PATTERN] OFF LEN      (default pattern 0xcd)
 *   write   [-q] -z [-u] OFF LEN                (write zeroes; -u may unmap)
 *   discard [-q] OFF LEN
 *   flush
 *   truncate OFF                                (grow the virtual size to OFF)
 *   map                                         (qemu-io's map: top-layer allocation)
 *   info                                        (qemu-io's info)
 *   policy                                      (the effective discard policy)
 *   highest                                     (the highest allocated host offset)
 *   quit
 * OFF and LEN take qemu's suffixes (k, M, G, T; 0x hex). The exit status is 1
 * if the image cannot be opened or any command fails; the library's message goes
 * to stderr. As qemu-io, the open takes QEMU's image locks (refused while another
 * program writes the image); -U (force-share, with -r) looks at it anyway.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static const char *prog = "qcowprov-io";

struct io_ctx {
    qcowprov_image *img;
    uint64_t size;
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s [-o OPTIONS] [-r] [-U] [-c COMMAND]... IMAGE\n"
            "  -o OPTIONS  runtime options, e.g. \"discard=unmap,discard-no-unref=on\" or \"provision=thin\"\n"
            "  -r          open read-only\n"
            "  -U          force shared permissions (with -r: look at an image another program writes)\n"
            "  -c COMMAND  run COMMAND (repeatable); without -c, commands are read from stdin\n"
            "commands: read [-q] [-P PAT] OFF LEN | write [-q] [-f] [-P PAT] OFF LEN |\n"
            "          write [-q] -z [-u] OFF LEN | discard [-q] OFF LEN | flush | truncate OFF | map | info | policy |\n"
            "          highest | quit\n",
            prog);
}

/* qemu-io's timestr without VERBOSE_FIXED_TIME. */
static void timestr(double t, char *buf, size_t n)
{
    unsigned secs = (unsigned)t;
    unsigned csecs = (unsigned)((t - secs) * 100);

    if (secs >= 3600)
        snprintf(buf, n, "%u:%02u:%02u.%02u", secs / 3600, (secs / 60) % 60, secs % 60, csecs);
    else if (secs >= 60)
        snprintf(buf, n, "%u:%02u.%02u", secs / 60, secs % 60, csecs);
    else
        snprintf(buf, n, "%02u.%02u sec", secs, csecs);
}

static double tdiv(double v, double t)
{
    return t > 0 ? v / t : v / 1e-9;
}

static void print_report(const char *op, double t, uint64_t offset, uint64_t count)
{
    char s1[64], s2[64], ts[64];

    timestr(t, ts, sizeof ts);
    cvtstr((double)count, s1, sizeof s1);
    cvtstr(tdiv((double)count, t), s2, sizeof s2);
    printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op, count, count, offset);
    printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, 1, ts, s2, tdiv(1.0, t));
}

static int parse_off_len(const char *cmd, int argc, char **argv, int idx, uint64_t *off, uint64_t *len)
{
    if (argc - idx != 2) {
        fprintf(stderr, "bad argument count %d to %s, expected 2 arguments\n", argc - idx, cmd);
        return -1;
    }
    if (parse_size(argv[idx], off) < 0) {
        fprintf(stderr, "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
                argv[idx]);
        return -1;
    }
    if (parse_size(argv[idx + 1], len) < 0) {
        fprintf(stderr, "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
                argv[idx + 1]);
        return -1;
    }
    if (*len > (uint64_t)SIZE_MAX / 2) {
        fprintf(stderr, "length %s is too large\n", argv[idx + 1]);
        return -1;
    }
    return 0;
}

static int bad_option(const char *cmd, int c)
{
    fprintf(stderr, "%s: invalid option -- '%c' (or missing argument)\n", cmd, c);
    return -1;
}

/* -P BYTE of read and write, with qemu-io's message for a bad byte. */
static int pattern_opt(const char *arg, int *pattern, int *have)
{
    if (parse_pattern(arg, pattern) < 0) {
        fprintf(stderr, "%s is not a valid pattern byte\n", arg);
        return -1;
    }
    *have = 1;
    return 0;
}

static int cmd_read(struct io_ctx *ctx, int argc, char **argv)
{
    struct miniopt st = { 0, 0, NULL, 0 };
    int quiet = 0, have_pattern = 0, pattern = 0, c, ret = 0;
    uint64_t off, len;
    unsigned char *buf;
    double t0;
    int64_t r;

    while ((c = mini_getopt(&st, argc, argv, "qP:")) != -1) {
        switch (c) {
        case 'q': quiet = 1; break;
        case 'P':
            if (pattern_opt(st.arg, &pattern, &have_pattern) < 0)
                return -1;
            break;
        default: return bad_option(argv[0], st.badopt);
        }
    }
    if (parse_off_len(argv[0], argc, argv, st.idx, &off, &len) < 0)
        return -1;
    buf = malloc(len ? len : 1);
    if (buf == NULL) {
        fprintf(stderr, "read failed: cannot allocate %" PRIu64 " bytes\n", len);
        return -1;
    }
    t0 = now_sec();
    r = qcowprov_pread(ctx->img, buf, (size_t)len, off);
    if (r < 0) {
        fprintf(stderr, "read failed: %s\n", lib_error(r));
        free(buf);
        return -1;
    }
    if ((uint64_t)r != len) {
        fprintf(stderr, "read failed: short read of %" PRId64 "/%" PRIu64 " bytes\n", r, len);
        free(buf);
        return -1;
    }
    if (have_pattern) {
        size_t bad = find_mismatch(buf, (size_t)len, pattern);
        if (bad < len) {
            /* qemu-io's line on stdout, and the details on stderr */
            printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n",
                   off + bad, len);
            fprintf(stderr, "read failed: pattern verification: byte at offset %" PRIu64
                            " is 0x%02x, expected 0x%02x\n",
                    off + bad, buf[bad], pattern);
            ret = -1;
        }
    }
    if (!quiet)
        print_report("read", now_sec() - t0, off, len);
    free(buf);
    return ret;
}

static int cmd_write(struct io_ctx *ctx, int argc, char **argv)
{
    struct miniopt st = { 0, 0, NULL, 0 };
    int quiet = 0, zero = 0, unmap = 0, fua = 0, have_pattern = 0, pattern = 0xcd, c;
    uint64_t off, len;
    double t0;

    while ((c = mini_getopt(&st, argc, argv, "qP:zuf")) != -1) {
        switch (c) {
        case 'q': quiet = 1; break;
        case 'z': zero = 1; break;
        case 'u': unmap = 1; break;
        case 'f': fua = 1; break;
        case 'P':
            if (pattern_opt(st.arg, &pattern, &have_pattern) < 0)
                return -1;
            break;
        default: return bad_option(argv[0], st.badopt);
        }
    }
    if (zero && have_pattern) {
        fprintf(stderr, "-z and -P cannot be specified at the same time\n");
        return -1;
    }
    if (unmap && !zero) {
        fprintf(stderr, "-u requires -z to be specified\n");
        return -1;
    }
    if (parse_off_len(argv[0], argc, argv, st.idx, &off, &len) < 0)
        return -1;
    t0 = now_sec();
    if (zero) {
        int r = qcowprov_write_zeroes(ctx->img, off, len, unmap ? QCOWPROV_ZERO_MAY_UNMAP : 0);
        if (r == 0 && fua)
            r = qcowprov_flush(ctx->img);
        if (r < 0) {
            fprintf(stderr, "write failed: %s\n", lib_error(r));
            return -1;
        }
    } else {
        unsigned char *buf = malloc(len ? len : 1);
        int64_t r;
        if (buf == NULL) {
            fprintf(stderr, "write failed: cannot allocate %" PRIu64 " bytes\n", len);
            return -1;
        }
        fill_pattern(buf, (size_t)len, pattern);
        r = qcowprov_pwrite(ctx->img, buf, (size_t)len, off, fua ? QCOWPROV_WRITE_FUA : 0);
        free(buf);
        if (r < 0) {
            fprintf(stderr, "write failed: %s\n", lib_error(r));
            return -1;
        }
        if ((uint64_t)r != len) {
            fprintf(stderr, "write failed: short write of %" PRId64 "/%" PRIu64 " bytes\n", r, len);
            return -1;
        }
    }
    if (!quiet)
        print_report("wrote", now_sec() - t0, off, len);
    return 0;
}

static int cmd_discard(struct io_ctx *ctx, int argc, char **argv)
{
    struct miniopt st = { 0, 0, NULL, 0 };
    int quiet = 0, c, r;
    uint64_t off, len;
    double t0;

    while ((c = mini_getopt(&st, argc, argv, "q")) != -1) {
        if (c == 'q')
            quiet = 1;
        else
            return bad_option(argv[0], st.badopt);
    }
    if (parse_off_len(argv[0], argc, argv, st.idx, &off, &len) < 0)
        return -1;
    t0 = now_sec();
    r = qcowprov_discard(ctx->img, off, len);
    /* As QEMU's block layer (bdrv_co_pdiscard): discard is advisory, and a driver
     * that cannot discard here (-ENOTSUP, e.g. a version 2 image with a backing
     * file) completes the request without doing anything. */
    if (r == -ENOTSUP)
        r = 0;
    if (r < 0) {
        fprintf(stderr, "discard failed: %s\n", lib_error(r));
        return -1;
    }
    if (!quiet)
        print_report("discard", now_sec() - t0, off, len);
    return 0;
}

static int cmd_truncate(struct io_ctx *ctx, int argc, char **argv)
{
    uint64_t size;
    int r;

    if (argc != 2) {
        fprintf(stderr, "bad argument count %d to %s, expected 1 arguments\n", argc - 1, argv[0]);
        return -1;
    }
    if (parse_size(argv[1], &size) < 0) {
        fprintf(stderr, "non-numeric length argument -- %s\n", argv[1]);
        return -1;
    }
    r = qcowprov_resize(ctx->img, size);
    if (r < 0) {
        fprintf(stderr, "truncate: %s\n", lib_error(r));
        return -1;
    }
    ctx->size = size;
    return 0;
}

static int no_args(int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "bad argument count %d to %s, expected 0 arguments\n", argc - 1, argv[0]);
        return -1;
    }
    return 0;
}

static int cmd_flush(struct io_ctx *ctx, int argc, char **argv)
{
    int r;

    if (no_args(argc, argv) < 0)
        return -1;
    r = qcowprov_flush(ctx->img);
    if (r < 0) {
        fprintf(stderr, "flush failed: %s\n", lib_error(r));
        return -1;
    }
    return 0;
}

/* Whether the top layer defines [off, off + *n): qemu-io's map_is_allocated,
 * merging successive runs of the same answer. */
static int top_allocated(struct io_ctx *ctx, uint64_t off, uint64_t len, int *alloc, uint64_t *n)
{
    struct qcowprov_status s;
    int first = -1;
    uint64_t done = 0;

    while (done < len) {
        int a, r;
        memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        r = qcowprov_block_status_depth(ctx->img, off + done, len - done, &s);
        if (r < 0)
            return r;
        if (s.len == 0 || s.len > len - done) {
            fprintf(stderr, "map: the library returned a bad length %" PRIu64 " at %" PRIu64 "\n",
                    (uint64_t)s.len, off + done);
            return -1;
        }
        a = (s.flags & QCOWPROV_STATUS_ALLOCATED) && s.depth == 0;
        if (first == -1)
            first = a;
        else if (a != first)
            break;
        done += s.len;
    }
    *alloc = first;
    *n = done;
    return 0;
}

static int cmd_map(struct io_ctx *ctx, int argc, char **argv)
{
    uint64_t off = 0;

    if (no_args(argc, argv) < 0)
        return -1;
    while (off < ctx->size) {
        char s1[64], s2[64];
        uint64_t n;
        int alloc, r = top_allocated(ctx, off, ctx->size - off, &alloc, &n);
        if (r < 0) {
            fprintf(stderr, "map failed: %s\n", r == -1 ? "bad block status" : lib_error(r));
            return -1;
        }
        cvtstr((double)n, s1, sizeof s1);
        cvtstr((double)off, s2, sizeof s2);
        printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n", s1, n,
               alloc ? "    allocated" : "not allocated", s2, off);
        off += n;
    }
    return 0;
}

static int get_info(struct io_ctx *ctx, struct qcowprov_info *info, const char *cmd)
{
    int r;

    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    r = qcowprov_get_info(ctx->img, info);
    if (r < 0) {
        fprintf(stderr, "%s failed: %s\n", cmd, lib_error(r));
        return -1;
    }
    return 0;
}

/* qemu-io's info (qcow2_get_info + qcow2_get_specific_info). */
static int cmd_info(struct io_ctx *ctx, int argc, char **argv)
{
    struct qcowprov_info info;
    char s[64];
    uint64_t l2_entries, per_l1, l1_index;

    if (no_args(argc, argv) < 0 || get_info(ctx, &info, "info") < 0)
        return -1;
    l2_entries = info.cluster_size / ((info.flags & QCOWPROV_INFO_EXTENDED_L2) ? 16 : 8);
    per_l1 = l2_entries * info.cluster_size;
    l1_index = (info.virtual_size + per_l1 - 1) / per_l1;
    printf("format name: qcow2\n");
    cvtstr((double)info.cluster_size, s, sizeof s);
    printf("cluster size: %s\n", s);
    cvtstr((double)(l1_index * per_l1), s, sizeof s);
    printf("vm state offset: %s\n", s);
    printf("Format specific information:\n");
    if (info.version == 2) {
        printf("    compat: 0.10\n");
        printf("    compression type: zlib\n");
        printf("    refcount bits: %u\n", info.refcount_bits);
    } else {
        printf("    compat: 1.1\n");
        printf("    compression type: %s\n",
               (info.flags & QCOWPROV_INFO_COMPRESSION_ZSTD) ? "zstd" : "zlib");
        printf("    lazy refcounts: %s\n", (info.flags & QCOWPROV_INFO_LAZY_REFCOUNTS) ? "true" : "false");
        printf("    refcount bits: %u\n", info.refcount_bits);
        printf("    corrupt: %s\n", (info.incompatible_features & 2) ? "true" : "false");
        printf("    extended l2: %s\n", (info.flags & QCOWPROV_INFO_EXTENDED_L2) ? "true" : "false");
    }
    return 0;
}

static int cmd_policy(struct io_ctx *ctx, int argc, char **argv)
{
    struct qcowprov_info info;

    if (no_args(argc, argv) < 0 || get_info(ctx, &info, "policy") < 0)
        return -1;
    printf("policy: %s\n", info.policy);
    printf("discard granularity: %" PRIu64 "\n", (uint64_t)info.discard_granularity);
    printf("write-zeroes alignment: %" PRIu64 "\n", (uint64_t)info.write_zeroes_alignment);
    return 0;
}

/* The highest allocated host offset (what a stack growing the volume watches). */
static int cmd_highest(struct io_ctx *ctx, int argc, char **argv)
{
    uint64_t end = 0;
    int r;

    if (no_args(argc, argv) < 0)
        return -1;
    r = qcowprov_highest_offset(ctx->img, &end);
    if (r < 0) {
        fprintf(stderr, "highest failed: %s\n", lib_error(r));
        return -1;
    }
    printf("highest offset: %" PRIu64 "\n", end);
    return 0;
}

#define MAX_ARGS 64

/* Runs one command line. Returns 0, -1 on failure, 1 on quit. */
static int run_command(struct io_ctx *ctx, const char *line)
{
    char *copy = strdup(line), *argv[MAX_ARGS], *save = NULL, *tok;
    int argc = 0, ret;

    if (copy == NULL) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return -1;
    }
    for (tok = strtok_r(copy, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
        if (argc == MAX_ARGS) {
            fprintf(stderr, "too many arguments\n");
            free(copy);
            return -1;
        }
        argv[argc++] = tok;
    }
    if (argc == 0) {
        ret = 0;
    } else if (!strcmp(argv[0], "read") || !strcmp(argv[0], "r")) {
        ret = cmd_read(ctx, argc, argv);
    } else if (!strcmp(argv[0], "write") || !strcmp(argv[0], "w")) {
        ret = cmd_write(ctx, argc, argv);
    } else if (!strcmp(argv[0], "discard") || !strcmp(argv[0], "d")) {
        ret = cmd_discard(ctx, argc, argv);
    } else if (!strcmp(argv[0], "flush") || !strcmp(argv[0], "f")) {
        ret = cmd_flush(ctx, argc, argv);
    } else if (!strcmp(argv[0], "truncate") || !strcmp(argv[0], "t")) {
        ret = cmd_truncate(ctx, argc, argv);
    } else if (!strcmp(argv[0], "map")) {
        ret = cmd_map(ctx, argc, argv);
    } else if (!strcmp(argv[0], "info") || !strcmp(argv[0], "i")) {
        ret = cmd_info(ctx, argc, argv);
    } else if (!strcmp(argv[0], "policy")) {
        ret = cmd_policy(ctx, argc, argv);
    } else if (!strcmp(argv[0], "highest")) {
        ret = cmd_highest(ctx, argc, argv);
    } else if (!strcmp(argv[0], "quit") || !strcmp(argv[0], "q")) {
        ret = 1;
    } else {
        fprintf(stderr, "command \"%s\" not found\n", argv[0]);
        ret = -1;
    }
    free(copy);
    return ret;
}

int main(int argc, char **argv)
{
    const char *options = NULL;
    const char **cmds = NULL;
    int ncmds = 0, failed = 0, c, r;
    uint32_t flags = 0;
    struct io_ctx ctx = { NULL, 0 };
    struct qcowprov_info info;

    cmds = calloc((size_t)argc, sizeof *cmds);
    if (cmds == NULL)
        return 1;
    while ((c = getopt(argc, argv, "+o:rUc:h")) != -1) {
        switch (c) {
        case 'o': options = optarg; break;
        case 'r': flags |= QCOWPROV_OPEN_RDONLY; break;
        case 'U': flags |= QCOWPROV_OPEN_FORCE_SHARE; break;
        case 'c': cmds[ncmds++] = optarg; break;
        case 'h': usage(stdout); free(cmds); return 0;
        default: usage(stderr); free(cmds); return 1;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "%s: %s\n", prog, optind >= argc ? "no image given" : "too many arguments");
        usage(stderr);
        free(cmds);
        return 1;
    }
    r = qcowprov_open(argv[optind], options, flags, &ctx.img);
    if (r < 0) {
        /* The library's message names the image (once). */
        fprintf(stderr, "%s: %s\n", prog, lib_error(r));
        free(cmds);
        return 1;
    }
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    r = qcowprov_get_info(ctx.img, &info);
    if (r < 0) {
        report(prog, "get_info", r);
        qcowprov_close(ctx.img);
        free(cmds);
        return 1;
    }
    ctx.size = info.virtual_size;

    if (ncmds > 0) {
        int i;
        for (i = 0; i < ncmds; i++) {
            r = run_command(&ctx, cmds[i]);
            if (r < 0)
                failed = 1;
            else if (r > 0)
                break;
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        while (getline(&line, &cap, stdin) != -1) {
            r = run_command(&ctx, line);
            /* Answer each command at once, as qemu-io does (a driver may wait for it). */
            fflush(stdout);
            if (r < 0)
                failed = 1;
            else if (r > 0)
                break;
        }
        free(line);
    }
    fflush(stdout);
    r = qcowprov_close(ctx.img);
    if (r < 0) {
        report(prog, "close", r);
        failed = 1;
    }
    free(cmds);
    return failed ? 1 : 0;
}
