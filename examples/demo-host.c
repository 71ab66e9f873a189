/* demo-host.c: the demo's view of an image file from the host, without the
 * library: its length, allocation and extents, its L2 entries read straight
 * from the file, and which old data is still in it. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "demo.h"

/* Bits 9..55 of L1 and standard L2 entries: the host offset (qcow2 spec). */
#define OFFSET_MASK 0x00fffffffffffe00ull
#define L2_ZERO 1ull
#define L2_COMPRESSED (1ull << 62)
#define INCOMPAT_EXTL2 (1ull << 4)

int host_measure(const char *path, uint64_t *file_len, uint64_t *allocated, uint64_t *extents)
{
    struct stat st;
    int fd = open(path, O_RDONLY);
    off_t pos = 0;

    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "demo: %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    *file_len = (uint64_t)st.st_size;
    *allocated = (uint64_t)st.st_blocks * 512;
    *extents = 0;
    for (;;) {
        off_t data = lseek(fd, pos, SEEK_DATA), hole;
        if (data < 0)
            break;  /* ENXIO: no data after pos */
        hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            break;
        (*extents)++;
        pos = hole;
    }
    close(fd);
    return 0;
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int read_full(int fd, void *buf, size_t len, uint64_t off)
{
    ssize_t n = pread(fd, buf, len, (off_t)off);
    return n == (ssize_t)len ? 0 : -1;
}

uint64_t *l2_entries(const char *path, uint64_t nclusters)
{
    unsigned char h[104], e[8];
    uint64_t *out = calloc((size_t)nclusters, sizeof *out), i, l1_off, per_table;
    uint32_t version, cbits, l1_size;
    int fd = open(path, O_RDONLY);

    if (fd < 0 || out == NULL || read_full(fd, h, sizeof h, 0) < 0)
        goto fail;
    version = be32(h + 4);
    cbits = be32(h + 20);
    l1_size = be32(h + 36);
    l1_off = be64(h + 40);
    if (be32(h) != 0x514649fb || (version != 2 && version != 3) || cbits < 9 || cbits > 21) {
        fprintf(stderr, "demo: %s: not a qcow2 image this reader knows\n", path);
        goto fail_quiet;
    }
    if (version == 3 && (be64(h + 72) & INCOMPAT_EXTL2)) {
        fprintf(stderr, "demo: %s: extended L2 entries are not read here\n", path);
        goto fail_quiet;
    }
    per_table = (1ull << cbits) / 8;
    for (i = 0; i < nclusters; i++) {
        uint64_t l1i = i / per_table, l2;
        if (l1i >= l1_size)
            continue;
        if (read_full(fd, e, 8, l1_off + l1i * 8) < 0)
            goto fail;
        l2 = be64(e) & OFFSET_MASK;
        if (l2 == 0)
            continue;
        if (read_full(fd, e, 8, l2 + (i % per_table) * 8) < 0)
            goto fail;
        out[i] = be64(e);
        if (out[i] & L2_COMPRESSED) {
            fprintf(stderr, "demo: %s: compressed cluster %" PRIu64 " (not expected here)\n", path, i);
            goto fail_quiet;
        }
    }
    close(fd);
    return out;
fail:
    fprintf(stderr, "demo: reading the L2 entries of %s failed\n", path);
fail_quiet:
    if (fd >= 0)
        close(fd);
    free(out);
    return NULL;
}

uint64_t l2_host_offset(uint64_t entry)
{
    return entry & OFFSET_MASK;
}

int l2_is_zero(uint64_t entry)
{
    return (entry & L2_ZERO) != 0;
}

long count_stale(const char *path, const unsigned char *which, const uint64_t *host,
                 const unsigned char *model, uint64_t nclusters)
{
    unsigned char *buf = malloc(CLUSTER);
    int fd = open(path, O_RDONLY);
    long stale = 0;
    uint64_t i;

    if (fd < 0 || buf == NULL) {
        fprintf(stderr, "demo: %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        free(buf);
        return -1;
    }
    for (i = 0; i < nclusters; i++) {
        ssize_t n;
        if (!which[i] || host[i] == 0 || model[i] == 0)
            continue;
        n = pread(fd, buf, CLUSTER, (off_t)host[i]);
        /* Past the end of the file (or a short tail): the old data is not there. */
        if (n == (ssize_t)CLUSTER && find_mismatch(buf, CLUSTER, model[i]) == CLUSTER)
            stale++;
    }
    close(fd);
    free(buf);
    return stale;
}
