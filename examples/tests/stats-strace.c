/*
 * stats-strace IMAGE OPTIONS: a small workload (writes, a discard, rewrites,
 * flushes) on an existing image, then qcowprov_get_stats printed as
 * "flushes=N discards=N zeroes=N" and an exit
 * without closing the image, so that every fdatasync the process made is one
 * the counters saw. t-stats.sh runs it under strace and compares.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#define MIB (1024u * 1024)

int main(int argc, char **argv)
{
    struct qcowprov_stats s;
    qcowprov_image *img;
    unsigned char *buf = malloc(2 * MIB);
    int r;

    if (argc != 3 || buf == NULL) {
        fprintf(stderr, "usage: stats-strace IMAGE OPTIONS\n");
        return 2;
    }
    r = qcowprov_open(argv[1], argv[2], 0, &img);
    if (r < 0) {
        report("stats-strace", argv[1], r);
        return 1;
    }
    fill_pattern(buf, 2 * MIB, 0x5a);
    if (qcowprov_pwrite(img, buf, 2 * MIB, 0, 0) < 0 || qcowprov_flush(img) < 0 ||
        qcowprov_discard(img, MIB / 2, MIB) < 0 || qcowprov_flush(img) < 0 ||
        qcowprov_pwrite(img, buf, MIB / 4, MIB / 2, 0) < 0 ||
        qcowprov_pwrite(img, buf, MIB / 4, 3 * MIB / 2 - MIB / 4, QCOWPROV_WRITE_FUA) < 0 ||
        qcowprov_discard(img, 0, MIB / 2) < 0 || qcowprov_flush(img) < 0) {
        report("stats-strace", "workload", -1);
        return 1;
    }
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    r = qcowprov_get_stats(img, &s);
    if (r < 0) {
        report("stats-strace", "get_stats", r);
        return 1;
    }
    printf("flushes=%llu discards=%llu zeroes=%llu\n", (unsigned long long)s.host_flushes,
           (unsigned long long)s.host_discards, (unsigned long long)s.host_zeroes);
    fflush(stdout);
    /* No qcowprov_close: its flush would be an fdatasync after the counters were read. */
    _exit(0);
}
