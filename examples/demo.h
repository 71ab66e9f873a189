/* The demo's shared pieces: the workloads, one row's results, and the helpers
 * that look at the host file (demo-host.c) and run QEMU's tools (demo-qemu.c). */
#ifndef QCOWPROV_DEMO_H
#define QCOWPROV_DEMO_H

#include <stddef.h>
#include <stdint.h>

#define CLUSTER (64u * 1024)
#define CHUNK (1024u * 1024)

enum op_kind { OP_WRITE, OP_DISCARD };

struct op {
    enum op_kind kind;
    uint64_t off, len;
    int pattern;
};

/* A list of requests, run in order. */
struct ops {
    size_t n;
    struct op *v;
};

/* Phase 1 (fragmentation) and phase 2 (delete, then rewrite) of one seed. */
struct workload {
    uint64_t size;
    struct ops frag;        /* phase 1 */
    struct ops discard;     /* phase 2: the discards, 1 MiB ranges merged when adjacent */
    struct ops rewrite;     /* phase 2: the same ranges written again, 1 MiB at a time */
    unsigned char *model;   /* pattern of each cluster after phase 1 (0: reads zero) */
    unsigned char *gone;    /* 1 for each cluster phase 2 discards */
    uint64_t ngone;         /* clusters phase 2 discards */
};

/* A check verdict: "clean" or what went wrong. */
struct verdict {
    char text[48];
};

/* One row: an image run through the library or qemu-io. */
struct result {
    const char *label;
    int ok;                     /* every phase ran */
    /* phase 1 */
    uint64_t file_len, allocated, extents;
    double ms;
    /* phase 2, after the discard */
    uint64_t still_alloc, zero, stale;
    uint64_t d_file_len, d_allocated, before_allocated;
    /* phase 2, the rewrite */
    double rw_ms;
    long rw_flushes;            /* -1: not counted */
    uint64_t rw_file_len, rw_allocated;
    struct verdict check1, check2;  /* phase 1; phase 2 (after the discard and the rewrite) */
    int verified1, verified2;       /* read back as the model says */
};

/* ---- demo-host.c: the image file as the host sees it ---- */

/* File length, st_blocks * 512 and data extents (SEEK_DATA/SEEK_HOLE). */
int host_measure(const char *path, uint64_t *file_len, uint64_t *allocated, uint64_t *extents);

/* The L2 entry of every guest cluster, read from the file (big-endian, as on disk;
 * 0 where no L2 table exists). Refuses images this reader does not cover (extended L2,
 * compressed clusters, snapshots are fine). Returns a malloc'ed array or NULL with a
 * message on stderr. */
uint64_t *l2_entries(const char *path, uint64_t nclusters);

/* The host cluster offset an L2 entry names (0: none), and whether it is marked zero. */
uint64_t l2_host_offset(uint64_t entry);
int l2_is_zero(uint64_t entry);

/* How many of the clusters flagged in `which` have their old pattern (model) still in
 * the file at host offset `host[i]` (0: had none). -1 on error. */
long count_stale(const char *path, const unsigned char *which, const uint64_t *host,
                 const unsigned char *model, uint64_t nclusters);

/* ---- demo-qemu.c: QEMU's tools ---- */

/* Whether an executable of that name is on PATH. */
int on_path(const char *name);

/* Run argv with stdin from `in` (or /dev/null), stdout to `out` (or /dev/null),
 * stderr kept when show_err. Returns the exit status, or -1. */
int run_process(char *const argv[], const char *in, const char *out, int show_err);

/* qemu-img check: 0 when clean, else writes the verdict. -1 if it could not run. */
int qemu_img_check(const char *dir, const char *path, struct verdict *v);

/* Host offsets of guest clusters as `qemu-img map --output=json` reports them
 * (0 where none); returns 0 or -1. */
int qemu_img_map_offsets(const char *dir, const char *path, uint64_t *host, uint64_t nclusters);

/* Run `ops` through qemu-io on `path` with the image options, then flush. With
 * `flushes` non-NULL, under strace: *flushes receives the fdatasync/fsync calls of
 * the qemu-io process, or -1 when strace is not installed. *ms gets the wall time. */
int qemu_io_run(const char *dir, const char *path, const char *options, const struct ops *ops,
                double *ms, long *flushes);

/* "a,b" -> "a,,b": QEMU's escaping inside an option string. */
void escape_commas(const char *s, char *out, size_t n);

#endif
