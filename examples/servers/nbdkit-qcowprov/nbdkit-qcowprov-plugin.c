/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * nbdkit-qcowprov-plugin: serves a qcow2 image over NBD through libqcowprov's C API.
 *
 *   nbdkit qcowprov file=IMAGE [options=OPTIONS] [readonly=true]
 *
 * One image handle is opened before the server accepts connections and shared by every
 * connection and worker thread (the library's handles are thread-safe), so the plugin
 * runs in nbdkit's parallel thread model and a flush on any connection covers the writes
 * completed on all of them (multi-conn).
 *
 * Each NBD request maps onto one library call with the same meaning:
 *   NBD_CMD_READ                      qcowprov_pread
 *   NBD_CMD_WRITE [FUA]               qcowprov_pwrite [QCOWPROV_WRITE_FUA]
 *   NBD_CMD_FLUSH                     qcowprov_flush
 *   NBD_CMD_TRIM [FUA]                qcowprov_discard [+ flush] (-ENOTSUP: ignored)
 *   NBD_CMD_WRITE_ZEROES [!NO_HOLE]   qcowprov_write_zeroes [QCOWPROV_ZERO_MAY_UNMAP]
 *                [FAST_ZERO]         [QCOWPROV_ZERO_NO_FALLBACK: -ENOTSUP, not zero bytes]
 *   NBD_CMD_BLOCK_STATUS              qcowprov_block_status: hole = no data, zero = reads
 *                                     as zeros (what qemu-nbd reports for base:allocation)
 * Errors go back to the client as the library's errno, with its message logged through
 * nbdkit_error.
 */

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qcowprov.h>

/* What NBD_OPT_INFO reports as the largest request: NBD's customary 32 MiB (as qemu-nbd). */
#define MAX_REQUEST (32u << 20)
/* Extents sent for one block-status request at most (the client asks again for more). */
#define MAX_EXTENTS 16384

static char *file;            /* absolute path (nbdkit may chdir to / when it forks) */
static char *options;         /* the library's runtime options, or NULL */
static int readonly;          /* readonly=true: open the image read-only */
static qcowprov_image *img;   /* one handle for every connection */
static struct qcowprov_info info;

/* Fails a request: the library's errno to the client, its message to the log. */
static int fail(const char *what, int64_t rc)
{
    int err = rc < 0 && rc >= -4095 ? (int) -rc : EIO;

    nbdkit_error("qcowprov: %s: %s", what, qcowprov_last_error());
    nbdkit_set_error(err);
    return -1;
}

static void qp_unload(void)
{
    free(file);
    free(options);
}

static int qp_config(const char *key, const char *value)
{
    if (strcmp(key, "file") == 0) {
        if (file) {
            nbdkit_error("qcowprov: file= given twice");
            return -1;
        }
        /* Resolved now: a missing image is refused at startup, not on the first connection. */
        file = nbdkit_realpath(value);
        if (!file)
            return -1;
    } else if (strcmp(key, "options") == 0) {
        if (options) {
            nbdkit_error("qcowprov: options= given twice (separate options with commas)");
            return -1;
        }
        options = strdup(value);
        if (!options) {
            nbdkit_error("qcowprov: strdup: %m");
            return -1;
        }
    } else if (strcmp(key, "readonly") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r == -1)
            return -1;
        readonly = r;
    } else {
        nbdkit_error("qcowprov: unknown parameter '%s' (expected file=, options= or readonly=; "
                     "see nbdkit qcowprov --help)", key);
        return -1;
    }
    return 0;
}

static int qp_config_complete(void)
{
    if (!file) {
        nbdkit_error("qcowprov: the file=IMAGE parameter is required");
        return -1;
    }
    return 0;
}

#define qp_config_help \
    "file=<IMAGE>        (required) The qcow2 image to serve.\n" \
    "options=<OPTS>      libqcowprov runtime options, comma-separated, e.g.\n" \
    "                      provision=off|full|metadata|thin|reuse\n" \
    "                      discard=ignore|unmap,discard-no-unref=on|off,\n" \
    "                      pass-discard-request|snapshot|other=on|off\n" \
    "                      detect-zeroes=off|on|unmap, cache.direct=on,\n" \
    "                      l2-cache-size=BYTES, refcount-cache-size=BYTES,\n" \
    "                      quarantine-slack=BYTES\n" \
    "                    (default: provision=metadata on qcow2 v3, thin on v2).\n" \
    "readonly=true       Open the image read-only (nbdkit -r alone still opens it\n" \
    "                    read-write and only refuses writes)."

static void qp_dump_plugin(void)
{
    printf("qcowprov_version=%s\n", qcowprov_version());
}

/* Opens the image once, before the server forks and accepts connections, so that a bad
 * image or a bad option string stops nbdkit at startup with the library's message. The
 * library starts no threads and its locks belong to the open file, so fork is safe. */
static int qp_get_ready(void)
{
    uint32_t flags = readonly ? QCOWPROV_OPEN_RDONLY : 0;
    int rc = qcowprov_open(file, options, flags, &img);

    if (rc < 0) {
        nbdkit_error("qcowprov: %s: %s", file, qcowprov_last_error());
        return -1;
    }
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    rc = qcowprov_get_info(img, &info);
    if (rc < 0) {
        nbdkit_error("qcowprov: %s: %s", file, qcowprov_last_error());
        qcowprov_close(img);
        img = NULL;
        return -1;
    }
    nbdkit_debug("qcowprov: %s: %" PRIu64 " bytes, cluster %" PRIu64 ", policy %s%s",
                 file, info.virtual_size, info.cluster_size, info.policy,
                 readonly ? ", read-only" : "");
    return 0;
}

static void qp_cleanup(void)
{
    if (img && qcowprov_close(img) < 0)
        nbdkit_error("qcowprov: closing %s: %s", file, qcowprov_last_error());
    img = NULL;
}

static void *qp_open(int nbd_readonly)
{
    (void) nbd_readonly;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t qp_get_size(void *h)
{
    (void) h;
    return (int64_t) info.virtual_size;
}

static int qp_block_size(void *h, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
    uint64_t pref = 4096;

    (void) h;
    /* Any byte range is served, so the minimum is 1. The preferred size is the one with no
     * hidden cost: discards smaller than the discard granularity (a cluster) are ignored, as
     * in QEMU, and a write smaller than the write-zeroes alignment (a subcluster) into a new
     * cluster fills the rest with zeros. */
    if (info.discard_granularity > pref)
        pref = info.discard_granularity;
    if (info.write_zeroes_alignment > pref)
        pref = info.write_zeroes_alignment;
    if (pref > MAX_REQUEST)
        pref = MAX_REQUEST;
    *minimum = 1;
    *preferred = (uint32_t) pref;
    *maximum = MAX_REQUEST;
    return 0;
}

static int qp_can_write(void *h)
{
    (void) h;
    return !readonly;
}

static int qp_can_flush(void *h)
{
    (void) h;
    return 1;
}

static int qp_is_rotational(void *h)
{
    (void) h;
    return 0;
}

static int qp_can_trim(void *h)
{
    (void) h;
    return 1;
}

static int qp_can_zero(void *h)
{
    (void) h;
    return 1;
}

/* Fast zero (NBD_CMD_FLAG_FAST_ZERO) needs a write-zeroes that fails with -ENOTSUP instead
 * of writing zero bytes (QEMU's BDRV_REQ_NO_FALLBACK): QCOWPROV_ZERO_NO_FALLBACK. Built
 * against a header without it, fast zero is not advertised, so clients do not send it
 * (and nbdkit fails any that come with ENOTSUP itself). */
static int qp_can_fast_zero(void *h)
{
    (void) h;
#ifdef QCOWPROV_ZERO_NO_FALLBACK
    return 1;
#else
    return 0;
#endif
}

/* FUA on writes is the library's own; on trim and zero it is a flush after the call. */
static int qp_can_fua(void *h)
{
    (void) h;
    return NBDKIT_FUA_NATIVE;
}

/* One shared handle: a flush on any connection covers every connection's writes. */
static int qp_can_multi_conn(void *h)
{
    (void) h;
    return 1;
}

static int qp_can_extents(void *h)
{
    (void) h;
    return 1;
}

static int qp_pread(void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    int64_t rc;

    (void) h;
    (void) flags;
    rc = qcowprov_pread(img, buf, count, offset);
    if (rc != (int64_t) count)
        return fail("read", rc);
    return 0;
}

static int qp_pwrite(void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
    uint32_t wflags = (flags & NBDKIT_FLAG_FUA) ? QCOWPROV_WRITE_FUA : 0;
    int64_t rc;

    (void) h;
    rc = qcowprov_pwrite(img, buf, count, offset, wflags);
    if (rc != (int64_t) count)
        return fail("write", rc);
    return 0;
}

static int qp_flush(void *h, uint32_t flags)
{
    int rc;

    (void) h;
    (void) flags;
    rc = qcowprov_flush(img);
    if (rc < 0)
        return fail("flush", rc);
    return 0;
}

static int qp_trim(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    int rc;

    (void) h;
    rc = qcowprov_discard(img, offset, count);
    /* A trim is advice: where the image cannot discard at all (a version 2 image with a
     * backing file), nothing is done and the request succeeds, as in qemu-nbd (QEMU's block
     * layer drops a driver's -ENOTSUP from discard). */
    if (rc == -ENOTSUP) {
        nbdkit_debug("qcowprov: trim ignored: %s", qcowprov_last_error());
        rc = 0;
    }
    if (rc < 0)
        return fail("trim", rc);
    if (flags & NBDKIT_FLAG_FUA) {
        rc = qcowprov_flush(img);
        if (rc < 0)
            return fail("trim (FUA flush)", rc);
    }
    return 0;
}

static int qp_zero(void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
    uint32_t zflags = (flags & NBDKIT_FLAG_MAY_TRIM) ? QCOWPROV_ZERO_MAY_UNMAP : 0;
    int rc;

    (void) h;
    if (flags & NBDKIT_FLAG_FAST_ZERO) {
#ifdef QCOWPROV_ZERO_NO_FALLBACK
        zflags |= QCOWPROV_ZERO_NO_FALLBACK;
#else
        /* Not advertised (see qp_can_fast_zero); refuse rather than write zero bytes. */
        nbdkit_set_error(ENOTSUP);
        return -1;
#endif
    }
    rc = qcowprov_write_zeroes(img, offset, count, zflags);
    if (rc == -ENOTSUP && (flags & NBDKIT_FLAG_FAST_ZERO)) {
        /* The honest answer to a fast zero that would cost data writes: not an error to
         * log, the client falls back to its own writes. */
        nbdkit_set_error(ENOTSUP);
        return -1;
    }
    if (rc < 0)
        return fail("write zeroes", rc);
    if (flags & NBDKIT_FLAG_FUA) {
        rc = qcowprov_flush(img);
        if (rc < 0)
            return fail("write zeroes (FUA flush)", rc);
    }
    return 0;
}

static int qp_extents(void *h, uint32_t count, uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents)
{
    uint64_t end = offset + count;
    int n = 0;

    (void) h;
    while (offset < end && n < MAX_EXTENTS) {
        uint64_t pnum, host;
        uint32_t st, type = 0;
        int rc = qcowprov_block_status(img, offset, end - offset, &pnum, &st, &host);

        if (rc < 0)
            return fail("block status", rc);
        /* As qemu-nbd's base:allocation: a hole is anything without data (unallocated,
         * zero clusters, host holes), zero is anything that reads as zeros. */
        if (!(st & QCOWPROV_STATUS_DATA))
            type |= NBDKIT_EXTENT_HOLE;
        if (st & QCOWPROV_STATUS_ZERO)
            type |= NBDKIT_EXTENT_ZERO;
        if (nbdkit_add_extent(extents, offset, pnum, type) < 0)
            return -1;
        offset += pnum;
        n++;
        if (flags & NBDKIT_FLAG_REQ_ONE)
            break;
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name              = "qcowprov",
    .longname          = "nbdkit qcow2 plugin over libqcowprov",
    .version           = "0.1.0",
    .description       = "Serves a qcow2 image (read/write, discard, zero, block status) "
                       "through libqcowprov.",
    .unload            = qp_unload,
    .config            = qp_config,
    .config_complete   = qp_config_complete,
    .config_help       = qp_config_help,
    .magic_config_key  = "file",
    .dump_plugin       = qp_dump_plugin,
    .get_ready         = qp_get_ready,
    .cleanup           = qp_cleanup,
    .open              = qp_open,
    .get_size          = qp_get_size,
    .block_size        = qp_block_size,
    .can_write         = qp_can_write,
    .can_flush         = qp_can_flush,
    .is_rotational     = qp_is_rotational,
    .can_trim          = qp_can_trim,
    .can_zero          = qp_can_zero,
    .can_fast_zero     = qp_can_fast_zero,
    .can_fua           = qp_can_fua,
    .can_multi_conn    = qp_can_multi_conn,
    .can_extents       = qp_can_extents,
    .pread             = qp_pread,
    .pwrite            = qp_pwrite,
    .flush             = qp_flush,
    .trim              = qp_trim,
    .zero              = qp_zero,
    .extents           = qp_extents,
};

/* Requests run in parallel on nbdkit's worker threads, all on the one handle. */
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN(plugin)
