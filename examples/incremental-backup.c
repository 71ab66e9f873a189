/*
 * incremental-backup: keep a backup of a qcow2 image up to date by copying only what a
 * persistent dirty bitmap marks, then clearing it: the backup tool's loop (libvirt,
 * oVirt, Proxmox and KubeVirt do it through QEMU) over the libqcowprov C API.
 *
 *   incremental-backup [-f raw|qcow2] [-q] IMAGE BITMAP TARGET
 *
 * The first run (TARGET missing) creates TARGET (a raw file, or with -f qcow2 a
 * qcow2 image) of IMAGE's virtual size, adds BITMAP to IMAGE if it has none, and
 * copies every allocated byte (a full backup). Every later run copies the runs
 * BITMAP marks dirty (qcowprov_bitmap_dirty, walked like qcowprov_block_status),
 * flushes TARGET, and only then clears BITMAP. Then it verifies: TARGET must read
 * exactly as IMAGE, byte for byte. IMAGE is opened read/write, which takes QEMU's
 * write lock: nothing else writes it meanwhile, so the copy and the clear see the
 * same content (a live backup would first swap in a new bitmap, as QEMU's backup
 * jobs do).
 *
 * Prints one line: "full|incremental: copied N of V bytes in E extents, verified".
 * Exit status 0 on success, 1 on any failure (TARGET is then not trustworthy: run
 * a full backup again).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static const char *prog = "incremental-backup";

#define CHUNK (1 << 20)

/* The backup target: a raw file or a qcow2 image. */
struct target {
    int fd;                 /* raw */
    qcowprov_image *img;    /* qcow2 */
};

static int target_write(struct target *t, const void *buf, size_t len, uint64_t off)
{
    if (t->img) {
        int64_t r = qcowprov_pwrite(t->img, buf, len, off, 0);
        if (r < 0) {
            report(prog, "writing the target", r);
            return -1;
        }
        return 0;
    }
    for (size_t done = 0; done < len;) {
        ssize_t n = pwrite(t->fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("writing the target");
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static int target_read(struct target *t, void *buf, size_t len, uint64_t off)
{
    if (t->img) {
        int64_t r = qcowprov_pread(t->img, buf, len, off);
        if (r < 0) {
            report(prog, "reading the target", r);
            return -1;
        }
        return 0;
    }
    for (size_t done = 0; done < len;) {
        ssize_t n = pread(t->fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "%s: reading the target: %s\n", prog, n < 0 ? strerror(errno) : "short file");
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

/* Copy [off, off + len) from the image to the target. */
static int copy_range(qcowprov_image *img, struct target *t, char *buf, uint64_t off, uint64_t len)
{
    while (len > 0) {
        size_t n = len < CHUNK ? (size_t)len : CHUNK;
        int64_t r = qcowprov_pread(img, buf, n, off);

        if (r < 0) {
            report(prog, "reading the image", r);
            return -1;
        }
        if (target_write(t, buf, n, off) < 0)
            return -1;
        off += n;
        len -= n;
    }
    return 0;
}

/* The next run from `off` that a full backup copies: allocated in the image (data or
 * zero clusters; unallocated ranges read zero, which a new target holds already). */
static int next_allocated(qcowprov_image *img, uint64_t off, uint64_t len, uint64_t *n, int *copy)
{
    uint64_t host;
    uint32_t flags;
    int r = qcowprov_block_status(img, off, len, n, &flags, &host);

    if (r < 0) {
        report(prog, "block_status", r);
        return -1;
    }
    *copy = (flags & QCOWPROV_STATUS_DATA) != 0;
    return 0;
}

int main(int argc, char **argv)
{
    const char *fmt = "raw", *image, *bitmap, *target_path;
    qcowprov_image *img = NULL;
    struct target t = { -1, NULL };
    struct qcowprov_info info;
    uint64_t size, off, copied = 0, extents = 0;
    int full, quiet = 0, ret = 1, c, r;
    char *buf = NULL, *buf2 = NULL;

    while ((c = getopt(argc, argv, "f:qh")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'q': quiet = 1; break;
        case 'h':
            printf("usage: %s [-f raw|qcow2] [-q] IMAGE BITMAP TARGET\n", prog);
            return 0;
        default:
            fprintf(stderr, "usage: %s [-f raw|qcow2] [-q] IMAGE BITMAP TARGET\n", prog);
            return 1;
        }
    }
    if (argc - optind != 3 || (strcmp(fmt, "raw") != 0 && strcmp(fmt, "qcow2") != 0)) {
        fprintf(stderr, "usage: %s [-f raw|qcow2] [-q] IMAGE BITMAP TARGET\n", prog);
        return 1;
    }
    image = argv[optind];
    bitmap = argv[optind + 1];
    target_path = argv[optind + 2];
    buf = malloc(CHUNK);
    buf2 = malloc(CHUNK);
    if (buf == NULL || buf2 == NULL)
        goto out;

    r = qcowprov_open(image, NULL, 0, &img);
    if (r < 0) {
        fprintf(stderr, "%s: %s\n", prog, lib_error(r));
        goto out;
    }
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    r = qcowprov_get_info(img, &info);
    if (r < 0) {
        report(prog, "get_info", r);
        goto out;
    }
    size = info.virtual_size;

    /* A missing target means a full backup (and a new bitmap if there is none). */
    full = access(target_path, F_OK) != 0;
    if (full) {
        r = qcowprov_bitmap_add(img, bitmap, 0, 0);
        if (r < 0 && r != -EEXIST) {
            report(prog, "adding the bitmap", r);
            goto out;
        }
        if (strcmp(fmt, "qcow2") == 0) {
            r = qcowprov_create(target_path, NULL, size);
            if (r < 0) {
                report(prog, "creating the target", r);
                goto out;
            }
        } else {
            t.fd = open(target_path, O_RDWR | O_CREAT | O_EXCL, 0644);
            if (t.fd < 0 || ftruncate(t.fd, (off_t)size) < 0) {
                perror("creating the target");
                goto out;
            }
        }
    }
    if (strcmp(fmt, "qcow2") == 0) {
        r = qcowprov_open(target_path, NULL, 0, &t.img);
        if (r < 0) {
            fprintf(stderr, "%s: %s\n", prog, lib_error(r));
            goto out;
        }
    } else if (t.fd < 0) {
        t.fd = open(target_path, O_RDWR);
        if (t.fd < 0) {
            perror(target_path);
            goto out;
        }
    }

    /* Copy: the allocated runs for a full backup, the dirty runs otherwise. */
    for (off = 0; off < size;) {
        uint64_t n;
        int copy;
        uint32_t dirty;

        if (full) {
            if (next_allocated(img, off, size - off, &n, &copy) < 0)
                goto out;
        } else {
            r = qcowprov_bitmap_dirty(img, bitmap, off, size - off, &n, &dirty);
            if (r < 0) {
                report(prog, "bitmap_dirty", r);
                goto out;
            }
            copy = dirty != 0;
        }
        if (copy) {
            if (copy_range(img, &t, buf, off, n) < 0)
                goto out;
            copied += n;
            extents++;
        }
        off += n;
    }

    /* The target first, durably; only then may the bitmap forget. */
    if (t.img)
        r = qcowprov_flush(t.img);
    else
        r = fsync(t.fd) < 0 ? -errno : 0;
    if (r < 0) {
        report(prog, "flushing the target", r);
        goto out;
    }
    r = qcowprov_bitmap_clear(img, bitmap);
    if (r < 0) {
        report(prog, "clearing the bitmap", r);
        goto out;
    }

    /* Verify: the target reads as the image, everywhere. */
    for (off = 0; off < size;) {
        size_t n = size - off < CHUNK ? (size_t)(size - off) : CHUNK;
        int64_t rr = qcowprov_pread(img, buf, n, off);

        if (rr < 0) {
            report(prog, "reading the image", rr);
            goto out;
        }
        if (target_read(&t, buf2, n, off) < 0)
            goto out;
        if (memcmp(buf, buf2, n) != 0) {
            size_t i = 0;
            while (buf[i] == buf2[i])
                i++;
            fprintf(stderr, "%s: verification failed: the target differs at offset %" PRIu64 "\n",
                    prog, off + i);
            goto out;
        }
        off += n;
    }
    if (!quiet)
        printf("%s: copied %" PRIu64 " of %" PRIu64 " bytes in %" PRIu64 " extents, verified\n",
               full ? "full" : "incremental", copied, size, extents);
    ret = 0;
out:
    if (t.img && qcowprov_close(t.img) < 0)
        ret = 1;
    if (t.fd >= 0)
        close(t.fd);
    if (img && qcowprov_close(img) < 0)
        ret = 1;
    free(buf);
    free(buf2);
    return ret;
}
