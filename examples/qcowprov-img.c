/*
 * qcowprov-img: qemu-img's create, info, check, map and bitmap over the libqcowprov
 * C API.
 *
 *   qcowprov-img create [-q] [-f qcow2] [-o OPTS] [-b BACKING -F FMT] FILE [SIZE]
 *   qcowprov-img info  [-U] [--output=human|json] FILE
 *   qcowprov-img check [-q] [-U] [-r leaks|all] [--output=human|json] FILE
 *   qcowprov-img map   [-U] [--output=human|json] FILE
 *   qcowprov-img bitmap (--merge SOURCE | --add | --remove | --clear | --enable |
 *                        --disable)... [-f qcow2] [-b SRC_FILE [-F qcow2]] [-g SIZE]
 *                        FILE BITMAP
 *
 * Output follows qemu-img: `map --output=json` and `check --output=json` are
 * byte-for-byte qemu-img's; check exits 0 clean, 2 corruptions, 3 leaks only,
 * 1 when the check itself fails. Opens take QEMU's image locks; -U (force-share)
 * looks at an image another program writes, as qemu-img -U. create refuses an
 * existing regular file and formats an existing block device (qcowprov_format:
 * refused while the device is in use). bitmap runs its actions in order, as
 * qemu-img does, and stops at the first failure ("Operation add on bitmap B
 * failed: ..."), exit 1; info lists persistent bitmaps as qemu-img does. Warnings
 * about an image's bitmaps (left behind by a program without bitmap support, or
 * damaged) go to stderr, as qemu-img's.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common.h"

static const char *prog = "qcowprov-img";

/* The single image name left after the options, or NULL with qemu-img's message. */
static const char *one_file(int argc, char **argv)
{
    if (optind != argc - 1) {
        fprintf(stderr, "%s: Expecting one image file name\n", prog);
        return NULL;
    }
    return argv[optind];
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s create [-q] [-f qcow2] [-o OPTS] [-b BACKING -F FMT] FILE [SIZE]\n"
            "       %s info [-U] [--output=human|json] FILE\n"
            "       %s check [-q] [-U] [-r leaks|all] [--output=human|json] FILE\n"
            "       %s map [-U] [--output=human|json] FILE\n"
            "       %s bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
            "              [-f qcow2] [-b SRC_FILE [-F qcow2]] [-g SIZE] FILE BITMAP\n"
            "  -U  force shared permissions: read an image another program has open for writing\n",
            prog, prog, prog, prog, prog);
}

enum { OUT_HUMAN, OUT_JSON };

/* -f FORMAT: qcow2 is the only format this tool reads and writes. */
static int qcow2_only(const char *format)
{
    if (strcmp(format, "qcow2") == 0)
        return 0;
    fprintf(stderr, "%s: only the qcow2 format is supported, not '%s'\n", prog, format);
    return -1;
}

static int parse_output(const char *v, int *fmt)
{
    if (strcmp(v, "human") == 0) {
        *fmt = OUT_HUMAN;
    } else if (strcmp(v, "json") == 0) {
        *fmt = OUT_JSON;
    } else {
        fprintf(stderr, "%s: --output must be used with human or json as argument.\n", prog);
        return -1;
    }
    return 0;
}

static const struct option long_opts[] = {
    { "output", required_argument, NULL, 'O' },
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
};

/* QCOWPROV_OPEN_FORCE_SHARE when -U was given. */
static uint32_t share_flag;

/* What the library found about an image's bitmaps, as qemu-img's warnings. */
static void bitmap_warnings(qcowprov_image *img)
{
    char buf[1024];

    for (uint32_t i = 0; qcowprov_bitmap_warning(img, i, buf, sizeof buf) >= 0; i++)
        fprintf(stderr, "%s: warning: %s\n", prog, buf);
}

static int open_image(const char *path, uint32_t flags, qcowprov_image **img)
{
    int r = qcowprov_open(path, NULL, flags | share_flag, img);

    /* The library's message names the image (once); a backing file's failure is
     * prefixed with the image, as qemu-img does. */
    if (r < 0) {
        const char *msg = lib_error(r);
        if (strncmp(msg, "Could not open backing file", 27) == 0)
            fprintf(stderr, "%s: Could not open '%s': %s\n", prog, path, msg);
        else
            fprintf(stderr, "%s: %s\n", prog, msg);
    } else {
        bitmap_warnings(*img);
    }
    return r;
}

/* The image's persistent bitmaps (count 0 when there are none). */
struct bitmap_list {
    int count;
    struct qcowprov_bitmap *b;
};

static int list_bitmaps(qcowprov_image *img, struct bitmap_list *l)
{
    int n = qcowprov_bitmap_count(img);

    l->count = 0;
    l->b = NULL;
    if (n < 0) {
        report(prog, "bitmap_count", n);
        return -1;
    }
    if (n == 0)
        return 0;
    l->b = calloc((size_t)n, sizeof *l->b);
    if (l->b == NULL)
        return -1;
    for (int i = 0; i < n; i++) {
        int r;

        l->b[i].struct_size = sizeof l->b[i];
        r = qcowprov_bitmap_get(img, (uint32_t)i, &l->b[i]);
        if (r < 0) {
            report(prog, "bitmap_get", r);
            free(l->b);
            l->b = NULL;
            return -1;
        }
    }
    l->count = n;
    return 0;
}

/* qemu-img's flag names, in its order. */
static int bitmap_flag_names(uint32_t flags, const char *names[2])
{
    int n = 0;

    if (flags & QCOWPROV_BITMAP_IN_USE)
        names[n++] = "in-use";
    if (flags & QCOWPROV_BITMAP_ENABLED)
        names[n++] = "auto";
    return n;
}

static void print_bitmaps_json(const struct bitmap_list *l)
{
    const char *names[2];

    printf("            \"bitmaps\": [\n");
    for (int i = 0; i < l->count; i++) {
        int n = bitmap_flag_names(l->b[i].flags, names);

        printf("                {\n                    \"flags\": [\n");
        for (int k = 0; k < n; k++)
            printf("                        \"%s\"%s\n", names[k], k + 1 < n ? "," : "");
        printf("                    ],\n                    \"name\": ");
        json_string(stdout, l->b[i].name);
        printf(",\n                    \"granularity\": %" PRIu64 "\n", (uint64_t)l->b[i].granularity);
        printf("                }%s\n", i + 1 < l->count ? "," : "");
    }
    printf("            ],\n");
}

static void print_bitmaps_human(const struct bitmap_list *l)
{
    const char *names[2];

    printf("    bitmaps:\n");
    for (int i = 0; i < l->count; i++) {
        int n = bitmap_flag_names(l->b[i].flags, names);

        printf("        [%d]:\n            flags:\n", i);
        for (int k = 0; k < n; k++)
            printf("                [%d]: %s\n", k, names[k]);
        printf("            name: %s\n", l->b[i].name);
        printf("            granularity: %" PRIu64 "\n", (uint64_t)l->b[i].granularity);
    }
}

static int get_info(qcowprov_image *img, struct qcowprov_info *info)
{
    int r;

    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    r = qcowprov_get_info(img, info);
    if (r < 0)
        report(prog, "get_info", r);
    return r;
}

/* ---- create ---- */

/* Append ",key=value" to *buf with commas in value doubled (QEMU's escaping). */
static int append_opt(char **buf, const char *key, const char *value)
{
    size_t old = *buf ? strlen(*buf) : 0, n = old + strlen(key) + 3 + 2 * strlen(value);
    char *p = realloc(*buf, n), *w;

    if (p == NULL)
        return -1;
    w = p + old;
    if (old)
        *w++ = ',';
    w += sprintf(w, "%s=", key);
    for (; *value; value++) {
        if (*value == ',')
            *w++ = ',';
        *w++ = *value;
    }
    *w = '\0';
    *buf = p;
    return 0;
}

static int has_key(const char *opts, const char *key)
{
    size_t k = strlen(key);
    const char *p = opts;

    while (p && *p) {
        if (strncmp(p, key, k) == 0 && p[k] == '=')
            return 1;
        /* skip to the next unescaped comma */
        while (*p) {
            if (*p == ',' && p[1] == ',') {
                p += 2;
            } else if (*p == ',') {
                p++;
                break;
            } else {
                p++;
            }
        }
    }
    return 0;
}

static int cmd_create(int argc, char **argv)
{
    const char *opts = NULL, *backing = NULL, *backing_fmt = NULL, *file;
    char *all = NULL;
    int c, quiet = 0, r;
    uint64_t size = 0;
    qcowprov_image *img;
    struct qcowprov_info info;

    optind = 1;
    while ((c = getopt_long(argc, argv, "+qf:o:b:F:h", long_opts, NULL)) != -1) {
        switch (c) {
        case 'q': quiet = 1; break;
        case 'f':
            if (qcow2_only(optarg) < 0)
                return 1;
            break;
        case 'o': opts = optarg; break;
        case 'b': backing = optarg; break;
        case 'F': backing_fmt = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "%s: Expecting image file name\n", prog);
        return 1;
    }
    file = argv[optind++];
    if (optind < argc) {
        if (parse_size(argv[optind], &size) < 0) {
            fprintf(stderr, "%s: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                            "%s: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
                    prog, prog);
            return 1;
        }
        optind++;
    } else if (!backing && !(opts && (has_key(opts, "size") || has_key(opts, "backing_file")))) {
        fprintf(stderr, "%s: %s: Image creation needs a size parameter\n", prog, file);
        return 1;
    }
    if (optind < argc) {
        fprintf(stderr, "%s: Unexpected argument: %s\n", prog, argv[optind]);
        return 1;
    }
    if (opts && *opts) {
        all = strdup(opts);
        if (all == NULL)
            return 1;
    }
    if ((backing && append_opt(&all, "backing_file", backing) < 0) ||
        (backing_fmt && append_opt(&all, "backing_fmt", backing_fmt) < 0)) {
        free(all);
        return 1;
    }
    {
        /* qemu-img formats an existing block device; a regular file must be new. */
        struct stat st;
        if (stat(file, &st) == 0 && S_ISBLK(st.st_mode))
            r = qcowprov_format(file, all, size);
        else
            r = qcowprov_create(file, all, size);
    }
    free(all);
    if (r < 0) {
        const char *m = lib_error(r);
        /* qemu-img's "FILE: message", naming the file once. */
        if (strstr(m, file))
            fprintf(stderr, "%s: %s\n", prog, m);
        else
            fprintf(stderr, "%s: %s: %s\n", prog, file, m);
        return 1;
    }
    if (quiet)
        return 0;
    if (open_image(file, QCOWPROV_OPEN_RDONLY | QCOWPROV_OPEN_NO_BACKING, &img) < 0)
        return 1;
    r = get_info(img, &info);
    qcowprov_close(img);
    if (r < 0)
        return 1;
    printf("Formatting '%s', fmt=qcow2 cluster_size=%" PRIu64 " extended_l2=%s compression_type=%s size=%" PRIu64,
           file, (uint64_t)info.cluster_size, (info.flags & QCOWPROV_INFO_EXTENDED_L2) ? "on" : "off",
           (info.flags & QCOWPROV_INFO_COMPRESSION_ZSTD) ? "zstd" : "zlib", (uint64_t)info.virtual_size);
    if (info.backing_file[0])
        printf(" backing_file=%s", info.backing_file);
    if (info.backing_format[0])
        printf(" backing_fmt=%s", info.backing_format);
    if (info.version == 2)
        printf(" compat=0.10");
    printf(" lazy_refcounts=%s refcount_bits=%u\n", (info.flags & QCOWPROV_INFO_LAZY_REFCOUNTS) ? "on" : "off",
           info.refcount_bits);
    return 0;
}

/* ---- info ---- */

/* qemu's size_to_str: "196 KiB", "4 MiB", "1.5 GiB". */
static void size_to_str(uint64_t val, char *buf, size_t n)
{
    static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int i;

    frexp((double)val / (1000.0 / 1024.0), &i);
    i = (i - 1) / 10;
    if (i < 0)
        i = 0;
    snprintf(buf, n, "%0.3g %sB", (double)val / (double)(UINT64_C(1) << (i * 10)), suffixes[i]);
}

/* qemu's path_combine: a relative backing name is relative to the image's directory. */
static char *path_combine(const char *base, const char *name)
{
    const char *slash;
    size_t len;
    char *out;

    if (name[0] == '/')
        return strdup(name);
    slash = strrchr(base, '/');
    len = slash ? (size_t)(slash - base + 1) : 0;
    out = malloc(len + strlen(name) + 1);
    if (out == NULL)
        return NULL;
    memcpy(out, base, len);
    strcpy(out + len, name);
    return out;
}

static int cmd_info(int argc, char **argv)
{
    int c, fmt = OUT_HUMAN, r;
    const char *file;
    qcowprov_image *img;
    struct qcowprov_info info;
    struct stat st;
    uint64_t actual = 0;
    char s[64];
    char *full = NULL;
    struct bitmap_list bitmaps = { 0, NULL };

    optind = 1;
    while ((c = getopt_long(argc, argv, "+Uh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'U': share_flag = QCOWPROV_OPEN_FORCE_SHARE; break;
        case 'O':
            if (parse_output(optarg, &fmt) < 0)
                return 1;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (!(file = one_file(argc, argv)))
        return 1;
    if (open_image(file, QCOWPROV_OPEN_RDONLY | QCOWPROV_OPEN_NO_BACKING, &img) < 0)
        return 1;
    r = get_info(img, &info);
    if (r == 0)
        r = list_bitmaps(img, &bitmaps);
    qcowprov_close(img);
    if (r < 0)
        return 1;
    if (stat(file, &st) == 0)
        actual = (uint64_t)st.st_blocks * 512;
    if (info.backing_file[0]) {
        full = path_combine(file, info.backing_file);
        if (full == NULL)
            return 1;
    }

    if (fmt == OUT_JSON) {
        printf("{\n");
        if (info.backing_format[0]) {
            printf("    \"backing-filename-format\": ");
            json_string(stdout, info.backing_format);
            printf(",\n");
        }
        printf("    \"virtual-size\": %" PRIu64 ",\n", (uint64_t)info.virtual_size);
        printf("    \"filename\": ");
        json_string(stdout, file);
        printf(",\n    \"cluster-size\": %" PRIu64 ",\n", (uint64_t)info.cluster_size);
        printf("    \"format\": \"qcow2\",\n");
        printf("    \"actual-size\": %" PRIu64 ",\n", actual);
        printf("    \"format-specific\": {\n        \"type\": \"qcow2\",\n        \"data\": {\n");
        if (info.version == 2) {
            printf("            \"compat\": \"0.10\",\n");
            printf("            \"compression-type\": \"zlib\",\n");
            printf("            \"refcount-bits\": %u\n", info.refcount_bits);
        } else {
            printf("            \"compat\": \"1.1\",\n");
            printf("            \"compression-type\": \"%s\",\n",
                   (info.flags & QCOWPROV_INFO_COMPRESSION_ZSTD) ? "zstd" : "zlib");
            printf("            \"lazy-refcounts\": %s,\n",
                   (info.flags & QCOWPROV_INFO_LAZY_REFCOUNTS) ? "true" : "false");
            if (bitmaps.count > 0)
                print_bitmaps_json(&bitmaps);
            printf("            \"refcount-bits\": %u,\n", info.refcount_bits);
            printf("            \"corrupt\": %s,\n", (info.incompatible_features & 2) ? "true" : "false");
            printf("            \"extended-l2\": %s\n", (info.flags & QCOWPROV_INFO_EXTENDED_L2) ? "true" : "false");
        }
        printf("        }\n    },\n");
        if (full) {
            printf("    \"full-backing-filename\": ");
            json_string(stdout, full);
            printf(",\n    \"backing-filename\": ");
            json_string(stdout, info.backing_file);
            printf(",\n");
        }
        printf("    \"libqcowprov\": {\n");
        printf("        \"subcluster-size\": %" PRIu64 ",\n", (uint64_t)info.subcluster_size);
        printf("        \"discard-granularity\": %" PRIu64 ",\n", (uint64_t)info.discard_granularity);
        printf("        \"write-zeroes-alignment\": %" PRIu64 ",\n", (uint64_t)info.write_zeroes_alignment);
        printf("        \"snapshots\": %u,\n", info.snapshots);
        printf("        \"default-policy\": ");
        json_string(stdout, info.policy);
        printf("\n    },\n");
        printf("    \"dirty-flag\": false\n}\n");
    } else {
        printf("image: %s\n", file);
        printf("file format: qcow2\n");
        size_to_str(info.virtual_size, s, sizeof s);
        printf("virtual size: %s (%" PRIu64 " bytes)\n", s, (uint64_t)info.virtual_size);
        size_to_str(actual, s, sizeof s);
        printf("disk size: %s\n", s);
        printf("cluster_size: %" PRIu64 "\n", (uint64_t)info.cluster_size);
        if (full) {
            if (strcmp(full, info.backing_file) != 0)
                printf("backing file: %s (actual path: %s)\n", info.backing_file, full);
            else
                printf("backing file: %s\n", info.backing_file);
        }
        if (info.backing_format[0])
            printf("backing file format: %s\n", info.backing_format);
        printf("Format specific information:\n");
        if (info.version == 2) {
            printf("    compat: 0.10\n    compression type: zlib\n    refcount bits: %u\n", info.refcount_bits);
        } else {
            printf("    compat: 1.1\n");
            printf("    compression type: %s\n", (info.flags & QCOWPROV_INFO_COMPRESSION_ZSTD) ? "zstd" : "zlib");
            printf("    lazy refcounts: %s\n", (info.flags & QCOWPROV_INFO_LAZY_REFCOUNTS) ? "true" : "false");
            if (bitmaps.count > 0)
                print_bitmaps_human(&bitmaps);
            printf("    refcount bits: %u\n", info.refcount_bits);
            printf("    corrupt: %s\n", (info.incompatible_features & 2) ? "true" : "false");
            printf("    extended l2: %s\n", (info.flags & QCOWPROV_INFO_EXTENDED_L2) ? "true" : "false");
        }
        printf("libqcowprov %s:\n", qcowprov_version());
        printf("    subcluster size: %" PRIu64 "\n", (uint64_t)info.subcluster_size);
        printf("    discard granularity: %" PRIu64 "\n", (uint64_t)info.discard_granularity);
        printf("    snapshots: %u\n", info.snapshots);
        printf("    default policy: %s\n", info.policy);
    }
    free(full);
    free(bitmaps.b);
    return 0;
}

/* ---- check ---- */

static void json_field(int *first, const char *key, uint64_t v)
{
    printf("%s\n    \"%s\": %" PRIu64, *first ? "" : ",", key, v);
    *first = 0;
}

/* qemu-img check --output=json: QAPI ImageCheck; optional members appear only
 * when non-zero, in the order QEMU's QDict hashing puts them. */
static void dump_json_check(const struct qcowprov_check_result *c, const char *file)
{
    int first = 1;

    printf("{");
    if (c->image_end_offset)
        json_field(&first, "image-end-offset", c->image_end_offset);
    if (c->compressed_clusters)
        json_field(&first, "compressed-clusters", c->compressed_clusters);
    if (c->total_clusters)
        json_field(&first, "total-clusters", c->total_clusters);
    if (c->corruptions)
        json_field(&first, "corruptions", c->corruptions);
    if (c->corruptions_fixed)
        json_field(&first, "corruptions-fixed", c->corruptions_fixed);
    json_field(&first, "check-errors", c->check_errors);
    if (c->leaks)
        json_field(&first, "leaks", c->leaks);
    if (c->leaks_fixed)
        json_field(&first, "leaks-fixed", c->leaks_fixed);
    if (c->allocated_clusters)
        json_field(&first, "allocated-clusters", c->allocated_clusters);
    printf(",\n    \"filename\": ");
    json_string(stdout, file);
    printf(",\n    \"format\": \"qcow2\"");
    if (c->fragmented_clusters)
        printf(",\n    \"fragmented-clusters\": %" PRIu64, c->fragmented_clusters);
    printf("\n}\n");
}

static void dump_human_check(const struct qcowprov_check_result *c)
{
    if (!(c->corruptions || c->leaks || c->check_errors)) {
        printf("No errors were found on the image.\n");
    } else {
        if (c->corruptions)
            printf("\n%" PRIu64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   c->corruptions);
        if (c->leaks)
            printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   c->leaks);
        if (c->check_errors)
            printf("\n%" PRIu64 " internal errors have occurred during the check.\n", c->check_errors);
    }
    if (c->total_clusters != 0 && c->allocated_clusters != 0)
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
               c->allocated_clusters, c->total_clusters,
               (double)c->allocated_clusters * 100.0 / (double)c->total_clusters,
               (double)c->fragmented_clusters * 100.0 / (double)c->allocated_clusters,
               (double)c->compressed_clusters * 100.0 / (double)c->allocated_clusters);
    if (c->image_end_offset)
        printf("Image end offset: %" PRIu64 "\n", c->image_end_offset);
}

static int run_check(qcowprov_image *img, uint32_t fix, struct qcowprov_check_result *res)
{
    int r;

    memset(res, 0, sizeof *res);
    res->struct_size = sizeof *res;
    r = qcowprov_check(img, fix, res, NULL, NULL);
    if (r < 0)
        fprintf(stderr, "%s: Check failed: %s\n", prog, lib_error(r));
    return r;
}

static int cmd_check(int argc, char **argv)
{
    int c, fmt = OUT_HUMAN, quiet = 0, r;
    uint32_t fix = 0;
    const char *file;
    qcowprov_image *img;
    struct qcowprov_check_result res;

    optind = 1;
    while ((c = getopt_long(argc, argv, "+qr:f:Uh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'q': quiet = 1; break;
        case 'U': share_flag = QCOWPROV_OPEN_FORCE_SHARE; break;
        case 'f':
            if (qcow2_only(optarg) < 0)
                return 1;
            break;
        case 'r':
            if (strcmp(optarg, "leaks") == 0) {
                fix = QCOWPROV_CHECK_FIX_LEAKS;
            } else if (strcmp(optarg, "all") == 0) {
                fix = QCOWPROV_CHECK_FIX_ALL;
            } else {
                fprintf(stderr, "%s: Unknown option for -r (expecting 'leaks' or 'all'): %s\n", prog, optarg);
                return 1;
            }
            break;
        case 'O':
            if (parse_output(optarg, &fmt) < 0)
                return 1;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (!(file = one_file(argc, argv)))
        return 1;
    /* As qemu-img: a check-open (which accepts what only a repair can mend, e.g. no
     * refcount table), read-only unless repairing, with the backing chain (a missing
     * backing file fails the check, exit 1). */
    if (open_image(file, QCOWPROV_OPEN_CHECK | (fix ? 0 : QCOWPROV_OPEN_RDONLY), &img) < 0)
        return 1;
    if (run_check(img, fix, &res) < 0) {
        qcowprov_close(img);
        return 1;
    }
    if (fix && (res.leaks_fixed || res.corruptions_fixed)) {
        uint64_t leaks_fixed = res.leaks_fixed, corruptions_fixed = res.corruptions_fixed;
        if (fmt == OUT_HUMAN && !quiet)
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %" PRIu64 " leaked clusters\n"
                   "    %" PRIu64 " corruptions\n\n"
                   "Double checking the fixed image now...\n",
                   leaks_fixed, corruptions_fixed);
        if (run_check(img, 0, &res) < 0) {
            qcowprov_close(img);
            return 1;
        }
        res.leaks_fixed = leaks_fixed;
        res.corruptions_fixed = corruptions_fixed;
    }
    r = qcowprov_close(img);
    if (r < 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, file, lib_error(r));
        return 1;
    }
    if (!quiet) {
        if (fmt == OUT_JSON)
            dump_json_check(&res, file);
        else
            dump_human_check(&res);
    }
    if (res.check_errors) {
        fprintf(stderr, "%s: Check failed\n", prog);
        return 1;
    }
    if (res.corruptions)
        return 2;
    if (res.leaks)
        return 3;
    return 0;
}

/* ---- map ---- */

struct map_entry {
    uint64_t start, length, offset;
    uint32_t depth;
    int present, zero, data, compressed, has_offset;
};

static int mergeable(const struct map_entry *a, const struct map_entry *b)
{
    if (a->length == 0)
        return 0;
    if (a->zero != b->zero || a->data != b->data || a->compressed != b->compressed ||
        a->depth != b->depth || a->present != b->present || a->has_offset != b->has_offset)
        return 0;
    if (a->has_offset && a->offset + a->length != b->offset)
        return 0;
    return 1;
}

#define MAX_CHAIN 64

/* File names of the layers of the chain, as qemu-img map's human output shows them. */
struct chain {
    char *names[MAX_CHAIN];
    int n;
};

static void chain_build(struct chain *ch, const char *file)
{
    ch->n = 0;
    ch->names[ch->n++] = strdup(file);
    while (ch->n < MAX_CHAIN && ch->names[ch->n - 1]) {
        qcowprov_image *img;
        struct qcowprov_info info;
        const char *cur = ch->names[ch->n - 1];
        int r;

        if (qcowprov_open(cur, NULL, QCOWPROV_OPEN_RDONLY | QCOWPROV_OPEN_NO_BACKING | share_flag, &img) < 0)
            break;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        r = qcowprov_get_info(img, &info);
        qcowprov_close(img);
        if (r < 0 || !info.backing_file[0])
            break;
        ch->names[ch->n++] = path_combine(cur, info.backing_file);
        if (strcmp(info.backing_format, "qcow2") != 0)
            break;
    }
}

static void chain_free(struct chain *ch)
{
    int i;

    for (i = 0; i < ch->n; i++)
        free(ch->names[i]);
}

static int dump_map_entry(int fmt, const struct map_entry *e, struct map_entry *next, const struct chain *ch)
{
    if (fmt == OUT_JSON) {
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, \"zero\": %s,"
               " \"data\": %s, \"compressed\": %s",
               e->start, e->length, e->depth, e->present ? "true" : "false", e->zero ? "true" : "false",
               e->data ? "true" : "false", e->compressed ? "true" : "false");
        if (e->has_offset)
            printf(", \"offset\": %" PRIu64, e->offset);
        putchar('}');
        if (next)
            puts(",");
        return 0;
    }
    if (e->data && !e->has_offset) {
        fprintf(stderr, "%s: File contains external, encrypted or compressed clusters.\n", prog);
        return -1;
    }
    if (e->data && !e->zero) {
        const char *name = (e->has_offset && e->depth < (uint32_t)ch->n && ch->names[e->depth])
                               ? ch->names[e->depth] : "";
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
               e->has_offset ? e->offset : 0, name);
    }
    /* The human format ignores the difference between 0, ZERO and ZERO|DATA. */
    if (next && (!next->data || next->zero)) {
        next->data = 0;
        next->zero = 1;
    }
    return 0;
}

static int cmd_map(int argc, char **argv)
{
    int c, fmt = OUT_HUMAN, r, ret = 0;
    const char *file;
    qcowprov_image *img;
    struct qcowprov_info info;
    struct map_entry curr, next;
    struct chain ch;
    uint64_t off;

    optind = 1;
    while ((c = getopt_long(argc, argv, "+f:Uh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'U': share_flag = QCOWPROV_OPEN_FORCE_SHARE; break;
        case 'f':
            if (qcow2_only(optarg) < 0)
                return 1;
            break;
        case 'O':
            if (parse_output(optarg, &fmt) < 0)
                return 1;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (!(file = one_file(argc, argv)))
        return 1;
    if (open_image(file, QCOWPROV_OPEN_RDONLY, &img) < 0)
        return 1;
    if (get_info(img, &info) < 0) {
        qcowprov_close(img);
        return 1;
    }
    memset(&ch, 0, sizeof ch);
    if (fmt == OUT_HUMAN) {
        chain_build(&ch, file);
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    } else {
        printf("[");
    }
    memset(&curr, 0, sizeof curr);
    for (off = 0; off < info.virtual_size; off += next.length) {
        struct qcowprov_status st;
        uint64_t n = info.virtual_size - off;

        if (n > (UINT64_C(1) << 30))
            n = UINT64_C(1) << 30; /* qemu-img map probes up to 1 GiB at a time */
        memset(&st, 0, sizeof st);
        st.struct_size = sizeof st;
        r = qcowprov_block_status_depth(img, off, n, &st);
        if (r < 0) {
            fprintf(stderr, "%s: Could not read file metadata: %s\n", prog, lib_error(r));
            ret = 1;
            goto out;
        }
        if (st.len == 0 || st.len > n) {
            fprintf(stderr, "%s: block status returned %" PRIu64 " bytes at %" PRIu64 " for a request of %" PRIu64 "\n",
                    prog, (uint64_t)st.len, off, n);
            ret = 1;
            goto out;
        }
        next.start = off;
        next.length = st.len;
        next.depth = st.depth;
        next.present = !!(st.flags & QCOWPROV_STATUS_ALLOCATED);
        next.zero = !!(st.flags & QCOWPROV_STATUS_ZERO);
        next.data = !!(st.flags & QCOWPROV_STATUS_DATA);
        next.compressed = !!(st.flags & QCOWPROV_STATUS_COMPRESSED);
        next.has_offset = !!(st.flags & QCOWPROV_STATUS_OFFSET_VALID);
        next.offset = next.has_offset ? st.host_offset : 0;
        if (mergeable(&curr, &next)) {
            curr.length += next.length;
            continue;
        }
        if (curr.length > 0 && dump_map_entry(fmt, &curr, &next, &ch) < 0) {
            ret = 1;
            goto out;
        }
        curr = next;
    }
    if (dump_map_entry(fmt, &curr, NULL, &ch) < 0)
        ret = 1;
out:
    if (fmt == OUT_JSON)
        puts("]");
    chain_free(&ch);
    r = qcowprov_close(img);
    if (r < 0 && ret == 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, file, lib_error(r));
        ret = 1;
    }
    return ret;
}

/* ---- bitmap ---- */

enum { B_ADD = 1, B_REMOVE, B_CLEAR, B_ENABLE, B_DISABLE, B_MERGE };

struct bitmap_action {
    int act;
    const char *src; /* --merge */
};

static const char *const bitmap_op_names[] = {
    "", "add", "remove", "clear", "enable", "disable", "merge",
};

static int cmd_bitmap(int argc, char **argv)
{
    static const struct option opts[] = {
        { "help", no_argument, NULL, 'h' },
        { "add", no_argument, NULL, 'A' },
        { "remove", no_argument, NULL, 'R' },
        { "clear", no_argument, NULL, 'C' },
        { "enable", no_argument, NULL, 'E' },
        { "disable", no_argument, NULL, 'D' },
        { "merge", required_argument, NULL, 'M' },
        { "granularity", required_argument, NULL, 'g' },
        { "source-file", required_argument, NULL, 'b' },
        { "source-format", required_argument, NULL, 'F' },
        { "format", required_argument, NULL, 'f' },
        { NULL, 0, NULL, 0 },
    };
    struct bitmap_action *acts;
    int nacts = 0, c, ret = 1, add = 0, merge = 0;
    uint64_t granularity = 0;
    const char *src_file = NULL, *src_fmt = NULL, *file, *name;
    qcowprov_image *img = NULL, *src = NULL;

    acts = calloc((size_t)argc, sizeof *acts);
    if (acts == NULL)
        return 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "+:b:f:F:g:h", opts, NULL)) != -1) {
        switch (c) {
        case 'A': acts[nacts++].act = B_ADD; add = 1; break;
        case 'R': acts[nacts++].act = B_REMOVE; break;
        case 'C': acts[nacts++].act = B_CLEAR; break;
        case 'E': acts[nacts++].act = B_ENABLE; break;
        case 'D': acts[nacts++].act = B_DISABLE; break;
        case 'M':
            acts[nacts].act = B_MERGE;
            acts[nacts++].src = optarg;
            merge = 1;
            break;
        case 'g':
            if (parse_size(optarg, &granularity) < 0) {
                fprintf(stderr, "%s: Invalid granularity specified\n", prog);
                goto out;
            }
            break;
        case 'b': src_file = optarg; break;
        case 'F': src_fmt = optarg; break;
        case 'f':
            if (qcow2_only(optarg) < 0)
                goto out;
            break;
        case 'h': usage(stdout); ret = 0; goto out;
        case ':':
            fprintf(stderr, "%s: option '%s' requires an argument\n", prog, argv[optind - 1]);
            goto out;
        default:
            fprintf(stderr, "%s: unrecognized option '%s'\n", prog, argv[optind - 1]);
            goto out;
        }
    }
    if (nacts == 0) {
        fprintf(stderr, "%s: Need at least one of --add, --remove, --clear, --enable, "
                        "--disable, or --merge\n", prog);
        goto out;
    }
    if (granularity && !add) {
        fprintf(stderr, "%s: granularity only supported with --add\n", prog);
        goto out;
    }
    if (src_fmt && !src_file) {
        fprintf(stderr, "%s: -F only supported with -b\n", prog);
        goto out;
    }
    if (src_file && !merge) {
        fprintf(stderr, "%s: Merge bitmap source file only supported with --merge\n", prog);
        goto out;
    }
    if (src_fmt && qcow2_only(src_fmt) < 0)
        goto out;
    if (optind != argc - 2) {
        fprintf(stderr, "%s: Expecting filename and bitmap name\n", prog);
        goto out;
    }
    file = argv[optind];
    name = argv[optind + 1];
    if (open_image(file, 0, &img) < 0)
        goto out;
    if (src_file && open_image(src_file, QCOWPROV_OPEN_RDONLY, &src) < 0)
        goto out;
    for (int i = 0; i < nacts; i++) {
        int r = 0;

        switch (acts[i].act) {
        case B_ADD: r = qcowprov_bitmap_add(img, name, granularity, 0); break;
        case B_REMOVE: r = qcowprov_bitmap_remove(img, name); break;
        case B_CLEAR: r = qcowprov_bitmap_clear(img, name); break;
        case B_ENABLE: r = qcowprov_bitmap_enable(img, name); break;
        case B_DISABLE: r = qcowprov_bitmap_disable(img, name); break;
        case B_MERGE: r = qcowprov_bitmap_merge(img, name, src, acts[i].src); break;
        }
        if (r < 0) {
            fprintf(stderr, "%s: Operation %s on bitmap %s failed: %s\n", prog,
                    bitmap_op_names[acts[i].act], name, lib_error(r));
            goto out;
        }
    }
    ret = 0;
out:
    if (src)
        qcowprov_close(src);
    if (img) {
        int r = qcowprov_close(img);

        if (r < 0 && ret == 0) {
            report(prog, "close", r);
            ret = 1;
        }
    }
    free(acts);
    return ret;
}

int main(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    cmd = argv[1];
    if (strcmp(cmd, "create") == 0)
        return cmd_create(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0)
        return cmd_info(argc - 1, argv + 1);
    if (strcmp(cmd, "check") == 0)
        return cmd_check(argc - 1, argv + 1);
    if (strcmp(cmd, "map") == 0)
        return cmd_map(argc - 1, argv + 1);
    if (strcmp(cmd, "bitmap") == 0)
        return cmd_bitmap(argc - 1, argv + 1);
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "%s: Command not found: %s\n", prog, cmd);
    usage(stderr);
    return 1;
}
