/* demo-qemu.c: the demo's use of QEMU's tools: qemu-io runs the same requests
 * on a twin image (optionally under strace to count its host flushes),
 * qemu-img map gives its host offsets, qemu-img check judges every image. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "demo.h"

int on_path(const char *name)
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

int run_process(char *const argv[], const char *in, const char *out, int show_err)
{
    pid_t pid;
    int status;

    fflush(stdout);
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fd = open(in ? in : "/dev/null", O_RDONLY);
        int o = out ? open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644) : open("/dev/null", O_WRONLY);
        int null = open("/dev/null", O_WRONLY);
        if (fd < 0 || o < 0 || null < 0)
            _exit(127);
        dup2(fd, 0);
        dup2(o, 1);
        if (!show_err)
            dup2(null, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    if (waitpid(pid, &status, 0) < 0)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void escape_commas(const char *s, char *out, size_t n)
{
    size_t k = 0;

    for (; *s && k + 2 < n; s++) {
        if (*s == ',')
            out[k++] = ',';
        out[k++] = *s;
    }
    out[k] = '\0';
}

int qemu_img_check(const char *dir, const char *path, struct verdict *v)
{
    char out[4200];
    char *argv[] = { "qemu-img", "check", "-q", "-f", "qcow2", (char *)path, NULL };
    int r;

    snprintf(out, sizeof out, "%s/qemu-img-check.out", dir);
    r = run_process(argv, NULL, out, 0);
    unlink(out);
    if (r < 0 || r == 127)
        return -1;
    if (r == 0)
        return 0;
    /* qemu-img check's exit codes: 2 corruptions, 3 leaks, 1 check failed. */
    snprintf(v->text, sizeof v->text, "%s", r == 2 ? "qemu-img:CORRUPT" : r == 3 ? "qemu-img:leaks" : "qemu-img:error");
    return 1;
}

/* The number after `"key": ` in a qemu-img map JSON line. */
static int json_u64(const char *line, const char *key, uint64_t *v)
{
    char pat[32];
    const char *p;

    snprintf(pat, sizeof pat, "\"%s\": ", key);
    p = strstr(line, pat);
    if (p == NULL)
        return -1;
    return sscanf(p + strlen(pat), "%" SCNu64, v) == 1 ? 0 : -1;
}

int qemu_img_map_offsets(const char *dir, const char *path, uint64_t *host, uint64_t nclusters)
{
    char out[4200], line[512];
    char *argv[] = { "qemu-img", "map", "--output=json", "-f", "qcow2", (char *)path, NULL };
    FILE *f;
    int r;

    snprintf(out, sizeof out, "%s/qemu-img-map.json", dir);
    r = run_process(argv, NULL, out, 1);
    if (r != 0) {
        fprintf(stderr, "demo: qemu-img map %s failed (%d)\n", path, r);
        unlink(out);
        return -1;
    }
    memset(host, 0, (size_t)nclusters * sizeof *host);
    f = fopen(out, "r");
    if (f == NULL)
        return -1;
    /* One object per line: { "start": S, "length": L, ..., "offset": O} */
    while (fgets(line, sizeof line, f)) {
        uint64_t start, len, off, c;
        if (json_u64(line, "start", &start) < 0 || json_u64(line, "length", &len) < 0)
            continue;
        if (json_u64(line, "offset", &off) < 0)
            continue;
        for (c = start / CLUSTER; c < (start + len) / CLUSTER && c < nclusters; c++)
            host[c] = off + (c * CLUSTER - start);
    }
    fclose(f);
    unlink(out);
    return 0;
}

/* fdatasync/fsync calls in an strace -o file; -1 unless the trace saw the process
 * exit (proof that tracing worked). */
static long count_flushes(const char *trace)
{
    char line[1024];
    long n = 0;
    int exited = 0;
    FILE *f = fopen(trace, "r");

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f)) {
        if (strstr(line, "fdatasync(") || strstr(line, "fsync("))
            n++;
        if (strstr(line, "exit_group("))
            exited = 1;
    }
    fclose(f);
    return exited ? n : -1;
}

int qemu_io_run(const char *dir, const char *path, const char *options, const struct ops *ops,
                double *ms, long *flushes)
{
    char cmds[4200], trace[4200], esc[8400], image_opts[8600];
    int traced = flushes != NULL && on_path("strace");
    FILE *f;
    size_t k;
    double t0;
    int r;

    snprintf(cmds, sizeof cmds, "%s/qemu-io-cmds", dir);
    snprintf(trace, sizeof trace, "%s/qemu-io-trace", dir);
    f = fopen(cmds, "w");
    if (f == NULL)
        return -1;
    for (k = 0; k < ops->n; k++) {
        const struct op *op = &ops->v[k];
        if (op->kind == OP_DISCARD)
            fprintf(f, "discard -q %" PRIu64 " %" PRIu64 "\n", op->off, op->len);
        else
            fprintf(f, "write -q -P %d %" PRIu64 " %" PRIu64 "\n", op->pattern, op->off, op->len);
    }
    fprintf(f, "flush\n");
    if (fclose(f) != 0)
        return -1;
    escape_commas(path, esc, sizeof esc);
    snprintf(image_opts, sizeof image_opts, "driver=qcow2,file.filename=%s,%s", esc, options);
    {
        char *io[] = { "qemu-io", "--image-opts", image_opts, NULL };
        char *st[] = { "strace", "-f", "-qq", "-o", trace, "-e", "trace=fdatasync,fsync,exit_group",
                       "qemu-io", "--image-opts", image_opts, NULL };
        t0 = now_sec();
        r = run_process(traced ? st : io, cmds, NULL, 1);
        *ms = (now_sec() - t0) * 1000;
    }
    unlink(cmds);
    if (r != 0) {
        fprintf(stderr, "demo: qemu-io %s failed (%d)\n", image_opts, r);
        unlink(trace);
        return -1;
    }
    if (flushes != NULL) {
        *flushes = traced ? count_flushes(trace) : -1;
        unlink(trace);
        if (traced && *flushes < 0) {
            fprintf(stderr, "demo: strace did not trace qemu-io to its end\n");
            return -1;
        }
    }
    return 0;
}
