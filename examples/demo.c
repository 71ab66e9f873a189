/*
 * demo: what discard does to a qcow2 image's size, per provisioning mode.
 *
 * For each mode (provision=off|full|metadata|thin|reuse) and QEMU's own
 * discard=unmap with and without discard-no-unref: create a 32 MiB qcow2 with
 * 64 KiB clusters, write every cluster in a shuffled order, then 150 rounds of
 * "discard 1 MiB at a random cluster-aligned offset, rewrite that 1 MiB";
 * flush and close. Then report the file length and the host space it holds,
 * the number of data extents in the host file, and the time taken; read every
 * image back and compare it with an in-memory model of what was written.
 * With qemu-io on PATH, the same workload also runs through QEMU.
 *
 *   demo [--no-qemu] [--size MIB] [--rounds N] [--seed N] [--keep]
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define CLUSTER (64u * 1024)
#define CHUNK (1024u * 1024)

static const char *prog = "demo";

enum op_kind { OP_WRITE, OP_DISCARD };

struct op {
    enum op_kind kind;
    uint64_t off, len;
    int pattern;
};

struct workload {
    uint64_t size;
    size_t nops;
    struct op *ops;
    unsigned char *model;   /* pattern held by each cluster at the end */
};

struct result {
    const char *label;
    int ok;                 /* the run completed */
    uint64_t file_len, allocated, extents;
    double ms;
    char check[32];         /* qcowprov_check's verdict */
    int verified;           /* read back equal to the model */
};

/* ---- the workload ---- */

static int make_workload(struct workload *w, uint64_t size, int rounds, uint64_t seed)
{
    uint64_t nclusters = size / CLUSTER, i, state = seed, slots;
    uint64_t *order;
    int gen = 0, r;
    size_t k = 0;

    w->size = size;
    w->nops = (size_t)nclusters + 2 * (size_t)rounds;
    w->ops = calloc(w->nops, sizeof *w->ops);
    w->model = calloc((size_t)nclusters, 1);
    order = calloc((size_t)nclusters, sizeof *order);
    if (!w->ops || !w->model || !order) {
        free(order);
        return -1;
    }
    for (i = 0; i < nclusters; i++)
        order[i] = i;
    for (i = nclusters; i > 1; i--) {  /* Fisher-Yates */
        uint64_t j = splitmix64(&state) % i, t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (i = 0; i < nclusters; i++) {
        int p = 1 + gen++ % 255;
        w->ops[k++] = (struct op){ OP_WRITE, order[i] * CLUSTER, CLUSTER, p };
        w->model[order[i]] = (unsigned char)p;
    }
    free(order);
    slots = (size - CHUNK) / CLUSTER + 1;
    for (r = 0; r < rounds; r++) {
        uint64_t off = (splitmix64(&state) % slots) * CLUSTER;
        int p = 1 + gen++ % 255;
        w->ops[k++] = (struct op){ OP_DISCARD, off, CHUNK, 0 };
        w->ops[k++] = (struct op){ OP_WRITE, off, CHUNK, p };
        memset(w->model + off / CLUSTER, p, CHUNK / CLUSTER);
    }
    return 0;
}

/* ---- measuring the host file ---- */

static int measure(const char *path, struct result *res)
{
    struct stat st;
    int fd = open(path, O_RDONLY);
    off_t pos = 0;

    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    res->file_len = (uint64_t)st.st_size;
    res->allocated = (uint64_t)st.st_blocks * 512;
    res->extents = 0;
    for (;;) {
        off_t data = lseek(fd, pos, SEEK_DATA), hole;
        if (data < 0)
            break;  /* ENXIO: no data after pos */
        hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            break;
        res->extents++;
        pos = hole;
    }
    close(fd);
    return 0;
}

/* Reopen the image and compare every byte with the model. */
static int verify(const char *path, const struct workload *w, const char *label)
{
    qcowprov_image *img;
    unsigned char *buf = malloc(CHUNK);
    uint64_t off;
    int r, ret = 0;

    if (buf == NULL)
        return -1;
    r = qcowprov_open(path, NULL, QCOWPROV_OPEN_RDONLY, &img);
    if (r < 0) {
        fprintf(stderr, "%s: %s: reopening %s failed: %s\n", prog, label, path, lib_error(r));
        free(buf);
        return -1;
    }
    for (off = 0; off < w->size && ret == 0; off += CHUNK) {
        uint64_t c;
        int64_t n = qcowprov_pread(img, buf, CHUNK, off);
        if (n != (int64_t)CHUNK) {
            fprintf(stderr, "%s: %s: reading back at %" PRIu64 " failed: %s\n", prog, label, off,
                    n < 0 ? lib_error(n) : "short read");
            ret = -1;
            break;
        }
        for (c = 0; c < CHUNK / CLUSTER; c++) {
            int want = w->model[off / CLUSTER + c];
            size_t bad = find_mismatch(buf + c * CLUSTER, CLUSTER, want);
            if (bad < CLUSTER) {
                fprintf(stderr, "%s: MISMATCH in %s at offset %" PRIu64 ": expected 0x%02x, read 0x%02x\n", prog,
                        label, off + c * CLUSTER + bad, want, buf[c * CLUSTER + bad]);
                ret = -1;
                break;
            }
        }
    }
    qcowprov_close(img);
    free(buf);
    return ret;
}

static void run_check(const char *path, struct result *res)
{
    qcowprov_image *img;
    struct qcowprov_check_result c;
    int r = qcowprov_open(path, NULL, QCOWPROV_OPEN_RDONLY, &img);

    snprintf(res->check, sizeof res->check, "error");
    if (r < 0)
        return;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    r = qcowprov_check(img, 0, &c, NULL, NULL);
    qcowprov_close(img);
    if (r < 0)
        return;
    if (c.corruptions)
        snprintf(res->check, sizeof res->check, "CORRUPT");
    else if (c.leaks)
        snprintf(res->check, sizeof res->check, "%" PRIu64 " leaks", c.leaks);
    else
        snprintf(res->check, sizeof res->check, "clean");
}

/* ---- a run through the library ---- */

static int run_library(const char *path, const char *options, const struct workload *w, struct result *res)
{
    qcowprov_image *img = NULL;
    unsigned char *buf = malloc(CHUNK);
    double t0 = now_sec();
    size_t k;
    int r;

    if (buf == NULL)
        return -1;
    r = qcowprov_create(path, "cluster_size=65536", w->size);
    if (r < 0) {
        fprintf(stderr, "%s: create %s: %s\n", prog, path, lib_error(r));
        free(buf);
        return -1;
    }
    r = qcowprov_open(path, options, 0, &img);
    if (r < 0) {
        fprintf(stderr, "%s: open %s with \"%s\": %s\n", prog, path, options, lib_error(r));
        free(buf);
        return -1;
    }
    for (k = 0; k < w->nops; k++) {
        const struct op *op = &w->ops[k];
        int64_t n;
        if (op->kind == OP_DISCARD) {
            n = qcowprov_discard(img, op->off, op->len);
        } else {
            fill_pattern(buf, op->len, op->pattern);
            n = qcowprov_pwrite(img, buf, op->len, op->off, 0);
        }
        if (n < 0) {
            fprintf(stderr, "%s: %s: %s at %" PRIu64 " failed: %s\n", prog, options,
                    op->kind == OP_DISCARD ? "discard" : "write", op->off, lib_error(n));
            qcowprov_close(img);
            free(buf);
            return -1;
        }
    }
    r = qcowprov_flush(img);
    if (r == 0)
        r = qcowprov_close(img);
    else
        qcowprov_close(img);
    free(buf);
    if (r < 0) {
        fprintf(stderr, "%s: %s: flush/close failed: %s\n", prog, options, lib_error(r));
        return -1;
    }
    res->ms = (now_sec() - t0) * 1000;
    return measure(path, res);
}

/* ---- the same workload through qemu-io ---- */

static int on_path(const char *name)
{
    const char *path = getenv("PATH");
    char buf[4096];

    while (path && *path) {
        const char *colon = strchr(path, ':');
        size_t len = colon ? (size_t)(colon - path) : strlen(path);
        snprintf(buf, sizeof buf, "%.*s/%s", (int)len, path, name);
        if (access(buf, X_OK) == 0)
            return 1;
        path = colon ? colon + 1 : NULL;
    }
    return 0;
}

/* Run argv with stdin from `in` (or /dev/null) and stdout/stderr to /dev/null
 * (stderr kept when show_err). Returns the exit status, or -1. */
static int run_process(char *const argv[], const char *in, int show_err)
{
    pid_t pid = fork();
    int status;

    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fd = open(in ? in : "/dev/null", O_RDONLY);
        int null = open("/dev/null", O_WRONLY);
        if (fd < 0 || null < 0)
            _exit(127);
        dup2(fd, 0);
        dup2(null, 1);
        if (!show_err)
            dup2(null, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    if (waitpid(pid, &status, 0) < 0)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* "a,b" -> "a,,b": QEMU's escaping inside an option string. */
static void escape_commas(const char *s, char *out, size_t n)
{
    size_t k = 0;

    for (; *s && k + 2 < n; s++) {
        if (*s == ',')
            out[k++] = ',';
        out[k++] = *s;
    }
    out[k] = '\0';
}

static int run_qemu(const char *dir, const char *path, const char *options, const struct workload *w,
                    struct result *res)
{
    char cmds[4400], esc[8400], image_opts[8600], size[32];
    FILE *f;
    size_t k;
    double t0;
    int r;

    snprintf(cmds, sizeof cmds, "%s/qemu-io-cmds", dir);
    f = fopen(cmds, "w");
    if (f == NULL)
        return -1;
    for (k = 0; k < w->nops; k++) {
        const struct op *op = &w->ops[k];
        if (op->kind == OP_DISCARD)
            fprintf(f, "discard -q %" PRIu64 " %" PRIu64 "\n", op->off, op->len);
        else
            fprintf(f, "write -q -P %d %" PRIu64 " %" PRIu64 "\n", op->pattern, op->off, op->len);
    }
    fprintf(f, "flush\n");
    if (fclose(f) != 0)
        return -1;
    snprintf(size, sizeof size, "%" PRIu64, w->size);
    escape_commas(path, esc, sizeof esc);
    snprintf(image_opts, sizeof image_opts, "driver=qcow2,file.filename=%s,%s", esc, options);
    t0 = now_sec();
    {
        char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                           (char *)path, size, NULL };
        char *io[] = { "qemu-io", "--image-opts", image_opts, NULL };
        r = run_process(create, NULL, 1);
        if (r != 0) {
            fprintf(stderr, "%s: qemu-img create failed (%d)\n", prog, r);
            return -1;
        }
        r = run_process(io, cmds, 1);
        if (r != 0) {
            fprintf(stderr, "%s: qemu-io %s failed (%d)\n", prog, image_opts, r);
            return -1;
        }
    }
    res->ms = (now_sec() - t0) * 1000;
    unlink(cmds);
    return measure(path, res);
}

/* ---- main ---- */

static void print_row(const struct result *r, uint64_t size)
{
    if (!r->ok) {
        printf("%-42s  %s\n", r->label, "FAILED");
        return;
    }
    printf("%-42s %7.1f%%  %6.1f MiB %6.1f%%  %7" PRIu64 "  %6.0f ms  %-7s %s\n", r->label,
           100.0 * (double)r->file_len / (double)size, (double)r->allocated / (1024.0 * 1024.0),
           100.0 * (double)r->allocated / (double)size, r->extents, r->ms, r->check,
           r->verified ? "ok" : "MISMATCH");
}

int main(int argc, char **argv)
{
    static const char *const modes[] = {
        "provision=off", "provision=full", "provision=metadata", "provision=thin", "provision=reuse",
        "discard=unmap", "discard=unmap,discard-no-unref=on",
    };
    static const char *const qemu_modes[] = { "discard=unmap", "discard=unmap,discard-no-unref=on" };
    static const struct option long_opts[] = {
        { "no-qemu", no_argument, NULL, 'n' },
        { "size", required_argument, NULL, 's' },
        { "rounds", required_argument, NULL, 'r' },
        { "seed", required_argument, NULL, 'S' },
        { "keep", no_argument, NULL, 'k' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const size_t nmodes = sizeof modes / sizeof modes[0], nqemu = sizeof qemu_modes / sizeof qemu_modes[0];
    struct result results[16];
    size_t nres = 0, i;
    struct workload w;
    int use_qemu = 1, keep = 0, rounds = 150, size_mib = 32, c, failed = 0;
    uint64_t seed = 42;
    char tmpl[4096], path[4200];
    int tl;
    const char *tmpdir = getenv("TMPDIR");

    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case 'n': use_qemu = 0; break;
        case 'k': keep = 1; break;
        case 's':
            if (parse_int(optarg, &size_mib) < 0 || size_mib < 1 || size_mib > 65536) {
                fprintf(stderr, "%s: --size takes a number of MiB (1..65536)\n", prog);
                return 1;
            }
            break;
        case 'r':
            if (parse_int(optarg, &rounds) < 0) {
                fprintf(stderr, "%s: --rounds takes a number\n", prog);
                return 1;
            }
            break;
        case 'S':
            if (parse_size(optarg, &seed) < 0) {
                fprintf(stderr, "%s: --seed takes a number\n", prog);
                return 1;
            }
            break;
        case 'h':
            printf("usage: %s [--no-qemu] [--size MIB] [--rounds N] [--seed N] [--keep]\n", prog);
            return 0;
        default:
            fprintf(stderr, "usage: %s [--no-qemu] [--size MIB] [--rounds N] [--seed N] [--keep]\n", prog);
            return 1;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        return 1;
    }
    if (make_workload(&w, (uint64_t)size_mib << 20, rounds, seed) < 0) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    tl = snprintf(tmpl, sizeof tmpl, "%s/qcowprov-demo-XXXXXX", tmpdir && *tmpdir ? tmpdir : "/tmp");
    if (tl < 0 || (size_t)tl >= sizeof tmpl) {
        fprintf(stderr, "%s: TMPDIR is too long\n", prog);
        return 1;
    }
    if (mkdtemp(tmpl) == NULL) {
        fprintf(stderr, "%s: mkdtemp %s: %s\n", prog, tmpl, strerror(errno));
        return 1;
    }
    use_qemu = use_qemu && on_path("qemu-io") && on_path("qemu-img");

    printf("libqcowprov %s: %d MiB qcow2, 64 KiB clusters. Write all %" PRIu64 " clusters in shuffled order,\n"
           "then %d x (discard 1 MiB at a random cluster-aligned offset, rewrite it); seed %" PRIu64 ".\n\n",
           qcowprov_version(), size_mib, w.size / CLUSTER, rounds, seed);
    printf("%-42s %8s  %18s  %7s  %9s  %-7s %s\n", "run", "file len", "host allocated", "extents", "time",
           "check", "data");
    fflush(stdout);

    for (i = 0; i < nmodes + nqemu; i++) {
        struct result *res = &results[nres++];
        int is_qemu = i >= nmodes;
        const char *opts = is_qemu ? qemu_modes[i - nmodes] : modes[i];
        char label[128];

        if (is_qemu && !use_qemu) {
            nres--;
            continue;
        }
        memset(res, 0, sizeof *res);
        snprintf(label, sizeof label, "%s%s", is_qemu ? "qemu-io " : "", opts);
        res->label = strdup(label);
        snprintf(path, sizeof path, "%s/run%zu.qcow2", tmpl, i);
        res->ok = (is_qemu ? run_qemu(tmpl, path, opts, &w, res) : run_library(path, opts, &w, res)) == 0;
        if (res->ok) {
            run_check(path, res);
            res->verified = verify(path, &w, label) == 0;
        }
        if (!res->ok || !res->verified || strcmp(res->check, "clean") != 0)
            failed = 1;
        print_row(res, w.size);
        fflush(stdout);
        if (!keep)
            unlink(path);
    }
    if (!use_qemu)
        printf("(qemu-io not on PATH or --no-qemu: no QEMU rows)\n");
    printf("\nfile len: file length / virtual size; host allocated: st_blocks; extents: data runs (SEEK_DATA/SEEK_HOLE);\n"
           "check: qcowprov_check; data: every byte read back and compared with what was written.\n");
    for (i = 0; i < nres; i++)
        free((char *)results[i].label);
    free(w.ops);
    free(w.model);
    if (keep)
        printf("images kept in %s\n", tmpl);
    else if (rmdir(tmpl) != 0)
        fprintf(stderr, "%s: rmdir %s: %s\n", prog, tmpl, strerror(errno));
    if (failed) {
        fprintf(stderr, "%s: FAILED: a run failed, an image did not check clean, or data did not match\n", prog);
        return 1;
    }
    return 0;
}
