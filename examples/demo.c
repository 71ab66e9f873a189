/*
 * demo: what discard does to a qcow2 image, per provisioning mode, beside QEMU.
 *
 * Each row is one 32 MiB qcow2 image (64 KiB clusters) run through the library
 * with provision=off|full|metadata|thin|reuse or QEMU's discard=unmap with and
 * without discard-no-unref, and through qemu-io with QEMU's two options.
 *
 * Phase 1, fragmentation: write every cluster in a shuffled order, then 150
 * rounds of "discard 1 MiB at a random cluster-aligned offset, rewrite it";
 * report file length, host allocation, data extents and time.
 *
 * Phase 2, a guest deleting files: discard half of the disk (random 1 MiB
 * ranges, adjacent ones merged as fstrim sends them) without rewriting it, then
 * report what stayed: clusters still allocated and marked zero (read from the
 * L2 entries in the file), host allocation, file length, and how many of the
 * discarded clusters' old host bytes still hold the old data. Then rewrite the
 * same ranges and report time, host flushes and growth.
 *
 * Every image is checked (qcowprov_check, and qemu-img check when installed)
 * and read back against a model of what it must hold after every phase.
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
#include <unistd.h>

#include "common.h"
#include "demo.h"

static const char *prog = "demo";

/* One row: its options, and the (qcow2 layer, host layer) pair of the mode table. */
struct run_spec {
    const char *options;
    int qemu;
    const char *layers;
};

static const struct run_spec RUNS[] = {
    { "provision=off", 0, "full/full" },
    { "provision=full", 0, "anchor/anchor" },
    { "provision=metadata", 0, "anchor/unmap" },
    { "provision=thin", 0, "unmap/unmap" },
    { "provision=reuse", 0, "unmap/full" },
    { "discard=unmap", 0, "unmap/unmap" },
    { "discard=unmap,discard-no-unref=on", 0, "anchor/unmap" },
    { "discard=unmap", 1, "unmap/unmap" },
    { "discard=unmap,discard-no-unref=on", 1, "anchor/unmap" },
};
#define NRUNS (sizeof RUNS / sizeof RUNS[0])

/* What each mode is for, printed under the tables: name, layers, purpose. */
static const char *const PURPOSE[][3] = {
    { "provision=off", "full/full", "discards ignored: deleted data stays, in qcow2 and on the host" },
    { "provision=full", "anchor/anchor", "keeps preallocated files preallocated: zeroed, nothing freed" },
    { "provision=metadata", "anchor/unmap", "keeps qcow2 clusters (no refragmenting), gives host space back" },
    { "provision=thin", "unmap/unmap", "fully thin-provisioned: clusters freed, host space released" },
    { "provision=reuse", "unmap/full", "frees clusters for reuse, keeps host space: old bytes stay" },
    { "discard=unmap", "unmap/unmap", "QEMU's discard: as thin" },
    { "discard=unmap,discard-no-unref=on", "anchor/unmap", "QEMU's discard-no-unref: as metadata" },
};

/* ---- the workloads ---- */

static int push(struct ops *o, size_t cap, struct op op)
{
    if (o->n >= cap)
        return -1;
    o->v[o->n++] = op;
    return 0;
}

static int make_workload(struct workload *w, uint64_t size, int rounds, uint64_t seed)
{
    uint64_t nclusters = size / CLUSTER, nchunks = size / CHUNK, i, state = seed, slots;
    uint64_t *order = calloc((size_t)(nclusters > nchunks ? nclusters : nchunks), sizeof *order);
    size_t cap1 = (size_t)nclusters + 2 * (size_t)rounds, cap2 = (size_t)nchunks;
    int gen = 0, r;

    memset(w, 0, sizeof *w);
    w->size = size;
    w->frag.v = calloc(cap1, sizeof *w->frag.v);
    w->discard.v = calloc(cap2, sizeof *w->discard.v);
    w->rewrite.v = calloc(cap2, sizeof *w->rewrite.v);
    w->model = calloc((size_t)nclusters, 1);
    w->gone = calloc((size_t)nclusters, 1);
    if (!order || !w->frag.v || !w->discard.v || !w->rewrite.v || !w->model || !w->gone) {
        free(order);
        return -1;
    }
    /* Phase 1: every cluster in shuffled order, then discard + rewrite rounds. */
    for (i = 0; i < nclusters; i++)
        order[i] = i;
    for (i = nclusters; i > 1; i--) {  /* Fisher-Yates */
        uint64_t j = splitmix64(&state) % i, t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (i = 0; i < nclusters; i++) {
        int p = 1 + gen++ % 255;
        push(&w->frag, cap1, (struct op){ OP_WRITE, order[i] * CLUSTER, CLUSTER, p });
        w->model[order[i]] = (unsigned char)p;
    }
    slots = (size - CHUNK) / CLUSTER + 1;
    for (r = 0; r < rounds; r++) {
        uint64_t off = (splitmix64(&state) % slots) * CLUSTER;
        int p = 1 + gen++ % 255;
        push(&w->frag, cap1, (struct op){ OP_DISCARD, off, CHUNK, 0 });
        push(&w->frag, cap1, (struct op){ OP_WRITE, off, CHUNK, p });
        memset(w->model + off / CLUSTER, p, CHUNK / CLUSTER);
    }
    /* Phase 2: half of the 1 MiB chunks, chosen at random, as deleted files. */
    for (i = 0; i < nchunks; i++)
        order[i] = i;
    for (i = 0; i < nchunks / 2; i++) {  /* partial Fisher-Yates: the first half */
        uint64_t j = i + splitmix64(&state) % (nchunks - i), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (i = 0; i < nchunks / 2; i++)
        memset(w->gone + order[i] * (CHUNK / CLUSTER), 1, CHUNK / CLUSTER);
    for (i = 0; i < nchunks; i++) {
        uint64_t off = i * CHUNK;
        struct op *last = w->discard.n ? &w->discard.v[w->discard.n - 1] : NULL;
        if (!w->gone[off / CLUSTER])
            continue;
        if (last && last->off + last->len == off)
            last->len += CHUNK;  /* adjacent free ranges: one request, as fstrim */
        else
            push(&w->discard, cap2, (struct op){ OP_DISCARD, off, CHUNK, 0 });
        push(&w->rewrite, cap2, (struct op){ OP_WRITE, off, CHUNK, 1 + gen++ % 255 });
        w->ngone += CHUNK / CLUSTER;
    }
    free(order);
    return 0;
}

static void free_workload(struct workload *w)
{
    free(w->frag.v);
    free(w->discard.v);
    free(w->rewrite.v);
    free(w->model);
    free(w->gone);
}

/* ---- reading back and checking ---- */

/* Reopen the image and compare every cluster with the model (0: reads zero). */
static int verify(const char *path, uint64_t size, const unsigned char *model, const char *what)
{
    qcowprov_image *img;
    unsigned char *buf = malloc(CHUNK);
    uint64_t off;
    int r, ret = 0;

    if (buf == NULL)
        return -1;
    r = qcowprov_open(path, NULL, QCOWPROV_OPEN_RDONLY, &img);
    if (r < 0) {
        fprintf(stderr, "%s: %s: reopening %s failed: %s\n", prog, what, path, lib_error(r));
        free(buf);
        return -1;
    }
    for (off = 0; off < size && ret == 0; off += CHUNK) {
        uint64_t c, len = size - off < CHUNK ? size - off : CHUNK;
        int64_t n = qcowprov_pread(img, buf, len, off);
        if (n != (int64_t)len) {
            fprintf(stderr, "%s: %s: reading back at %" PRIu64 " failed: %s\n", prog, what, off,
                    n < 0 ? lib_error(n) : "short read");
            ret = -1;
            break;
        }
        for (c = 0; c < len / CLUSTER; c++) {
            int want = model[off / CLUSTER + c];
            size_t bad = find_mismatch(buf + c * CLUSTER, CLUSTER, want);
            if (bad < CLUSTER) {
                fprintf(stderr, "%s: MISMATCH in %s at offset %" PRIu64 ": expected 0x%02x, read 0x%02x\n",
                        prog, what, off + c * CLUSTER + bad, want, buf[c * CLUSTER + bad]);
                ret = -1;
                break;
            }
        }
    }
    qcowprov_close(img);
    free(buf);
    return ret;
}

/* qcowprov_check, then qemu-img check when installed; the first problem wins. */
static void check(const char *dir, const char *path, struct verdict *v)
{
    qcowprov_image *img;
    struct qcowprov_check_result c;
    int r;

    if (strcmp(v->text, "clean") != 0)
        return;
    r = qcowprov_open(path, NULL, QCOWPROV_OPEN_RDONLY, &img);
    if (r < 0) {
        snprintf(v->text, sizeof v->text, "error");
        return;
    }
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    r = qcowprov_check(img, 0, &c, NULL, NULL);
    qcowprov_close(img);
    if (r < 0)
        snprintf(v->text, sizeof v->text, "error");
    else if (c.corruptions)
        snprintf(v->text, sizeof v->text, "CORRUPT");
    else if (c.leaks)
        snprintf(v->text, sizeof v->text, "%" PRIu64 " leaks", c.leaks);
    else if (on_path("qemu-img") && qemu_img_check(dir, path, v) < 0)
        snprintf(v->text, sizeof v->text, "qemu-img failed");
}

/* ---- the runs ---- */

/* Open with `options`, run `ops`, flush, close. *ms covers open to close; with
 * `flushes`, the host flushes from the first request through the flush. */
static int lib_run(const char *path, const char *options, const struct ops *ops, double *ms, long *flushes)
{
    struct qcowprov_stats s0, s1;
    qcowprov_image *img = NULL;
    unsigned char *buf = malloc(CHUNK);
    double t0 = now_sec();
    size_t k;
    int r;

    if (buf == NULL)
        return -1;
    memset(&s0, 0, sizeof s0);
    memset(&s1, 0, sizeof s1);
    s0.struct_size = s1.struct_size = sizeof s0;
    r = qcowprov_open(path, options, 0, &img);
    if (r < 0) {
        fprintf(stderr, "%s: open %s with \"%s\": %s\n", prog, path, options, lib_error(r));
        free(buf);
        return -1;
    }
    r = qcowprov_get_stats(img, &s0);
    for (k = 0; k < ops->n && r >= 0; k++) {
        const struct op *op = &ops->v[k];
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
            r = (int)n;
        }
    }
    if (r >= 0)
        r = qcowprov_flush(img);
    if (r >= 0)
        r = qcowprov_get_stats(img, &s1);
    if (r >= 0)
        r = qcowprov_close(img);
    else
        qcowprov_close(img);
    free(buf);
    if (r < 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, options, lib_error(r));
        return -1;
    }
    *ms = (now_sec() - t0) * 1000;
    if (flushes)
        *flushes = (long)(s1.host_flushes - s0.host_flushes);
    return 0;
}

/* Host offsets of every cluster through the library's block status. */
static int lib_offsets(const char *path, uint64_t *host, uint64_t nclusters)
{
    qcowprov_image *img;
    uint64_t c;
    int r = qcowprov_open(path, NULL, QCOWPROV_OPEN_RDONLY, &img);

    if (r < 0)
        return -1;
    for (c = 0; c < nclusters && r == 0; c++) {
        uint64_t pnum, off;
        uint32_t flags;
        r = qcowprov_block_status(img, c * CLUSTER, CLUSTER, &pnum, &flags, &off);
        host[c] = r == 0 && (flags & QCOWPROV_STATUS_OFFSET_VALID) ? off : 0;
    }
    qcowprov_close(img);
    return r < 0 ? -1 : 0;
}

/* One row: phase 1, then phase 2 on the same image. */
static int run(const struct run_spec *spec, const char *dir, const char *path, const struct workload *w,
               const unsigned char *after_discard, const unsigned char *after_rewrite, struct result *res)
{
    uint64_t n = w->size / CLUSTER, c, ext;
    uint64_t *entries = NULL, *host = NULL, *seen = calloc((size_t)n, sizeof *seen);
    const char *what = res->label;
    long stale;
    double ms;
    int ret = -1;

    if (seen == NULL)
        return -1;
    /* Phase 1. */
    if (spec->qemu) {
        char size[32];
        char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                           (char *)path, size, NULL };
        double t0 = now_sec();
        snprintf(size, sizeof size, "%" PRIu64, w->size);
        if (run_process(create, NULL, NULL, 1) != 0 || qemu_io_run(dir, path, spec->options, &w->frag, &ms, NULL) < 0)
            goto out;
        res->ms = (now_sec() - t0) * 1000;
    } else {
        double t0 = now_sec();
        int r = qcowprov_create(path, "cluster_size=65536", w->size);
        if (r < 0) {
            fprintf(stderr, "%s: create %s: %s\n", prog, path, lib_error(r));
            goto out;
        }
        if (lib_run(path, spec->options, &w->frag, &ms, NULL) < 0)
            goto out;
        res->ms = (now_sec() - t0) * 1000;
    }
    if (host_measure(path, &res->file_len, &res->allocated, &res->extents) < 0)
        goto out;
    check(dir, path, &res->check1);
    res->verified1 = verify(path, w->size, w->model, what) == 0;

    /* Phase 2: where the clusters to discard live, from the L2 entries in the file,
     * confirmed by the implementation that wrote the image. */
    entries = l2_entries(path, n);
    if (entries == NULL)
        goto out;
    host = calloc((size_t)n, sizeof *host);
    if (host == NULL)
        goto out;
    for (c = 0; c < n; c++)
        host[c] = l2_host_offset(entries[c]);
    if ((spec->qemu ? qemu_img_map_offsets(dir, path, seen, n) : lib_offsets(path, seen, n)) < 0)
        goto out;
    for (c = 0; c < n; c++) {
        if (w->gone[c] && seen[c] != host[c]) {
            fprintf(stderr, "%s: %s: cluster %" PRIu64 ": the L2 entry says host offset 0x%" PRIx64
                    ", %s says 0x%" PRIx64 "\n", prog, what, c, host[c],
                    spec->qemu ? "qemu-img map" : "qcowprov_block_status", seen[c]);
            goto out;
        }
    }
    res->before_allocated = res->allocated;
    if ((spec->qemu ? qemu_io_run(dir, path, spec->options, &w->discard, &ms, NULL)
                    : lib_run(path, spec->options, &w->discard, &ms, NULL)) < 0)
        goto out;
    if (host_measure(path, &res->d_file_len, &res->d_allocated, &ext) < 0)
        goto out;
    free(entries);
    entries = l2_entries(path, n);
    if (entries == NULL)
        goto out;
    for (c = 0; c < n; c++) {
        if (!w->gone[c])
            continue;
        res->still_alloc += l2_host_offset(entries[c]) != 0;
        res->zero += l2_is_zero(entries[c]);
    }
    stale = count_stale(path, w->gone, host, w->model, n);
    if (stale < 0)
        goto out;
    res->stale = (uint64_t)stale;
    check(dir, path, &res->check2);
    res->verified2 = verify(path, w->size, after_discard, what) == 0;

    /* Phase 2: the same ranges written again. */
    if ((spec->qemu ? qemu_io_run(dir, path, spec->options, &w->rewrite, &res->rw_ms, &res->rw_flushes)
                    : lib_run(path, spec->options, &w->rewrite, &res->rw_ms, &res->rw_flushes)) < 0)
        goto out;
    if (host_measure(path, &res->rw_file_len, &res->rw_allocated, &ext) < 0)
        goto out;
    check(dir, path, &res->check2);
    res->verified2 = res->verified2 && verify(path, w->size, after_rewrite, what) == 0;
    ret = 0;
out:
    free(entries);
    free(host);
    free(seen);
    return ret;
}

/* ---- printing ---- */

static double mib(uint64_t b)
{
    return (double)b / (1024.0 * 1024.0);
}

static double smib(uint64_t after, uint64_t before)
{
    return after >= before ? mib(after - before) : -mib(before - after);
}

static void print_phase1(const struct result *r, uint64_t size)
{
    if (!r->ok) {
        printf("%-42s  FAILED\n", r->label);
        return;
    }
    printf("%-42s %7.1f%%  %6.1f MiB %6.1f%%  %7" PRIu64 "  %6.0f ms  %-7s %s\n", r->label,
           100.0 * (double)r->file_len / (double)size, mib(r->allocated),
           100.0 * (double)r->allocated / (double)size, r->extents, r->ms, r->check1.text,
           r->verified1 ? "ok" : "MISMATCH");
}

static void print_discard(const struct result *r, uint64_t size)
{
    if (!r->ok) {
        printf("%-42s  FAILED\n", r->label);
        return;
    }
    printf("%-42s %5" PRIu64 " %5" PRIu64 " %5" PRIu64 "  %6.1f MiB  %+6.1f MiB  %7.1f%%\n", r->label,
           r->still_alloc, r->zero, r->stale, mib(r->d_allocated), smib(r->d_allocated, r->before_allocated),
           100.0 * (double)r->d_file_len / (double)size);
}

static void print_rewrite(const struct result *r)
{
    char fl[24];

    if (!r->ok) {
        printf("%-42s  FAILED\n", r->label);
        return;
    }
    if (r->rw_flushes < 0)
        snprintf(fl, sizeof fl, "-");
    else
        snprintf(fl, sizeof fl, "%ld", r->rw_flushes);
    printf("%-42s %6.0f ms %7s  %+7.1f MiB  %+7.1f MiB  %-7s %s\n", r->label, r->rw_ms, fl,
           smib(r->rw_file_len, r->d_file_len), smib(r->rw_allocated, r->d_allocated), r->check2.text,
           r->verified2 ? "ok" : "MISMATCH");
}

/* ---- main ---- */

static void usage(FILE *f)
{
    fprintf(f, "usage: %s [--no-qemu] [--size MIB] [--rounds N] [--seed N] [--keep]\n", prog);
}

int main(int argc, char **argv)
{
    static const struct option long_opts[] = {
        { "no-qemu", no_argument, NULL, 'n' },
        { "size", required_argument, NULL, 's' },
        { "rounds", required_argument, NULL, 'r' },
        { "seed", required_argument, NULL, 'S' },
        { "keep", no_argument, NULL, 'k' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct result results[NRUNS];
    size_t nres = 0, i;
    struct workload w;
    unsigned char *after_discard = NULL, *ignored = NULL, *after_rewrite = NULL;
    int use_qemu = 1, keep = 0, rounds = 150, size_mib = 32, c, failed = 0, qemu_rows = 0;
    uint64_t seed = 42, nclusters, k;
    char tmpl[4096], path[4200];
    const char *tmpdir = getenv("TMPDIR");
    double base_ms = 0;
    long base_flushes = -1;
    int tl;

    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case 'n': use_qemu = 0; break;
        case 'k': keep = 1; break;
        case 's':
            if (parse_int(optarg, &size_mib) < 0 || size_mib < 2 || size_mib > 65536) {
                fprintf(stderr, "%s: --size takes a number of MiB (2..65536)\n", prog);
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
            usage(stdout);
            return 0;
        default:
            usage(stderr);
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
    /* What every image must read after the discard (discards ignored or not) and after
     * the rewrite. */
    nclusters = w.size / CLUSTER;
    after_discard = malloc((size_t)nclusters);
    ignored = malloc((size_t)nclusters);
    after_rewrite = malloc((size_t)nclusters);
    if (!after_discard || !ignored || !after_rewrite) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    memcpy(ignored, w.model, (size_t)nclusters);
    memcpy(after_rewrite, w.model, (size_t)nclusters);
    for (k = 0; k < nclusters; k++)
        after_discard[k] = w.gone[k] ? 0 : w.model[k];
    for (k = 0; k < w.rewrite.n; k++)
        memset(after_rewrite + w.rewrite.v[k].off / CLUSTER, w.rewrite.v[k].pattern, CHUNK / CLUSTER);

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

    printf("libqcowprov %s: %d MiB qcow2 images, 64 KiB clusters, seed %" PRIu64 ". One image per row, run through\n"
           "libqcowprov with the options shown, or through qemu-io with QEMU's own driver.\n\n",
           qcowprov_version(), size_mib, seed);
    printf("Phase 1, fragmentation: write all %" PRIu64 " clusters in shuffled order, then %d x (discard 1 MiB\n"
           "at a random cluster-aligned offset, rewrite it).\n\n", nclusters, rounds);
    printf("%-42s %8s  %18s  %7s  %9s  %-7s %s\n", "run", "file len", "host allocated", "extents", "time",
           "check", "data");
    fflush(stdout);

    for (i = 0; i < NRUNS; i++) {
        const struct run_spec *spec = &RUNS[i];
        struct result *res;
        char label[128];

        if (spec->qemu && !use_qemu)
            continue;
        res = &results[nres++];
        memset(res, 0, sizeof *res);
        snprintf(label, sizeof label, "%s%s", spec->qemu ? "qemu-io " : "", spec->options);
        res->label = strdup(label);
        snprintf(res->check1.text, sizeof res->check1.text, "clean");
        snprintf(res->check2.text, sizeof res->check2.text, "clean");
        res->rw_flushes = -1;
        snprintf(path, sizeof path, "%s/run%zu.qcow2", tmpl, i);
        /* A mode whose qcow2 layer is "full" ignores discards: the data stays. */
        res->ok = run(spec, tmpl, path, &w, strncmp(spec->layers, "full/", 5) == 0 ? ignored : after_discard,
                      after_rewrite, res) == 0;
        if (!res->ok || !res->verified1 || !res->verified2 || strcmp(res->check1.text, "clean") != 0 ||
            strcmp(res->check2.text, "clean") != 0)
            failed = 1;
        if (res->ok && spec->qemu && qemu_rows++ == 0) {
            /* What starting qemu-io costs: open, flush and close the same image. */
            struct ops none = { 0, NULL };
            if (qemu_io_run(tmpl, path, spec->options, &none, &base_ms, &base_flushes) < 0)
                failed = 1;
        }
        print_phase1(res, w.size);
        fflush(stdout);
        if (!keep)
            unlink(path);
    }
    if (!use_qemu)
        printf("(qemu-io not on PATH or --no-qemu: no QEMU rows)\n");

    printf("\nPhase 2, a guest deletes files: discard %" PRIu64 " MiB (%" PRIu64 " clusters) in %zu requests, random\n"
           "1 MiB ranges merged as fstrim sends them, without rewriting them. Then rewrite those ranges.\n\n",
           w.ngone * CLUSTER >> 20, w.ngone, w.discard.n);
    printf("%-42s %5s %5s %5s  %10s  %10s  %8s\n", "after the discard", "alloc", "zero", "stale", "host alloc",
           "change", "file len");
    for (i = 0; i < nres; i++)
        print_discard(&results[i], w.size);
    printf("\n%-42s %9s %7s  %11s  %11s  %-7s %s\n", "rewriting the discarded ranges", "time", "flushes",
           "file growth", "host growth", "check", "data");
    for (i = 0; i < nres; i++)
        print_rewrite(&results[i]);

    printf("\nfile len: file length / virtual size; host alloc(ated): st_blocks; extents: data runs\n"
           "(SEEK_DATA/SEEK_HOLE); check: qcowprov_check%s after every phase;\n"
           "data: every byte read back and compared with what the guest wrote (discarded ranges read\n"
           "zero unless discards are ignored).\n",
           on_path("qemu-img") ? " and qemu-img check" : "");
    printf("alloc, zero: discarded clusters whose L2 entry (read from the file) still names a host\n"
           "cluster / has the zero flag; stale: discarded clusters whose old data is still in the file\n"
           "at the host offset they had, readable by anyone who can read the host file or device.\n"
           "flushes: host flushes from the first write through the final flush (qcowprov_get_stats;\n"
           "for qemu-io, its fdatasync/fsync calls counted by strace).\n");
    if (qemu_rows && base_flushes >= 0)
        printf("qemu-io rows include starting qemu-io: opening, flushing and closing the image alone\n"
               "takes %.0f ms and %ld flushes here.\n", base_ms, base_flushes);
    else if (qemu_rows)
        printf("qemu-io flushes not counted: strace is not installed (a qemu-io run that only opens,\n"
               "flushes and closes the image takes %.0f ms here).\n", base_ms);

    printf("\nWhat each mode is for (qcow2 layer/host layer: full ignores a discard, anchor zeroes the\n"
           "range but keeps it allocated, unmap releases it):\n");
    for (i = 0; i < sizeof PURPOSE / sizeof PURPOSE[0]; i++) {
        int w = strncmp(PURPOSE[i][0], "provision=", 10) == 0 ? 19 : 34;
        printf("  %-*s %-14s %s\n", w, PURPOSE[i][0], PURPOSE[i][1], PURPOSE[i][2]);
    }

    for (i = 0; i < nres; i++)
        free((char *)results[i].label);
    free_workload(&w);
    free(after_discard);
    free(ignored);
    free(after_rewrite);
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
