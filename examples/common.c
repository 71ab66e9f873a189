#include "common.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int suffix_shift(char c, unsigned *shift)
{
    switch (c) {
    case 'b': case 'B': *shift = 0; return 0;
    case 'k': case 'K': *shift = 10; return 0;
    case 'm': case 'M': *shift = 20; return 0;
    case 'g': case 'G': *shift = 30; return 0;
    case 't': case 'T': *shift = 40; return 0;
    case 'p': case 'P': *shift = 50; return 0;
    case 'e': case 'E': *shift = 60; return 0;
    default: return -1;
    }
}

int parse_size(const char *s, uint64_t *out)
{
    const char *p = s;
    uint64_t integral = 0;
    double fraction = 0.0;
    int have_fraction = 0, digits = 0;
    unsigned shift = 0;

    if (s == NULL || *s == '\0')
        return -1;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        p += 2;
        while (isxdigit((unsigned char)*p)) {
            unsigned d = isdigit((unsigned char)*p) ? (unsigned)(*p - '0')
                                                    : (unsigned)(tolower((unsigned char)*p) - 'a' + 10);
            if (integral > (UINT64_MAX - d) / 16)
                return -1;
            integral = integral * 16 + d;
            p++;
            digits++;
        }
    } else {
        while (isdigit((unsigned char)*p)) {
            unsigned d = (unsigned)(*p - '0');
            if (integral > (UINT64_MAX - d) / 10)
                return -1;
            integral = integral * 10 + d;
            p++;
            digits++;
        }
        if (*p == '.') {
            double scale = 0.1;
            p++;
            have_fraction = 1;
            while (isdigit((unsigned char)*p)) {
                fraction += (*p - '0') * scale;
                scale /= 10;
                p++;
                digits++;
            }
        }
    }
    if (digits == 0)
        return -1;
    if (*p != '\0') {
        if (suffix_shift(*p, &shift) < 0 || p[1] != '\0')
            return -1;
    } else if (have_fraction && fraction != 0.0) {
        return -1; /* a fraction of a byte */
    }
    if (shift && integral > (UINT64_MAX >> shift))
        return -1;
    integral <<= shift;
    if (have_fraction) {
        double extra = fraction * (double)(UINT64_C(1) << shift);
        if ((double)(UINT64_MAX - integral) < extra)
            return -1;
        integral += (uint64_t)extra;
    }
    *out = integral;
    return 0;
}

int parse_pattern(const char *s, int *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 0);
    if (errno || end == s || *end != '\0' || v < 0 || v > 255)
        return -1;
    *out = (int)v;
    return 0;
}

int parse_int(const char *s, int *out)
{
    uint64_t v;

    if (parse_size(s, &v) < 0 || v > 0x7fffffff)
        return -1;
    *out = (int)v;
    return 0;
}

void fill_pattern(void *buf, size_t len, int pattern)
{
    memset(buf, pattern, len);
}

size_t find_mismatch(const void *buf, size_t len, int pattern)
{
    const unsigned char *b = buf;
    const unsigned char want = (unsigned char)pattern;
    size_t i = 0;
    uint64_t word;

    memset(&word, want, sizeof word);
    /* Compare a word at a time, then find the byte. */
    while (i + sizeof word <= len) {
        uint64_t w;
        memcpy(&w, b + i, sizeof w);
        if (w != word)
            break;
        i += sizeof w;
    }
    while (i < len && b[i] == want)
        i++;
    return i;
}

void cvtstr(double value, char *str, size_t size)
{
    static const char *const suffixes[] = { " EiB", " PiB", " TiB", " GiB", " MiB", " KiB" };
    const char *suffix = " bytes";
    double unit = 1152921504606846976.0; /* 2^60 */
    size_t i;
    char *trim;

    for (i = 0; i < 6; i++, unit /= 1024) {
        if (value >= unit) {
            suffix = suffixes[i];
            value /= unit;
            break;
        }
    }
    snprintf(str, size > 6 ? size - 6 : size, "%.3f", value);
    trim = strstr(str, ".000");
    if (trim)
        *trim = '\0';
    strncat(str, suffix, size - strlen(str) - 1);
}

const char *lib_error(int64_t rc)
{
    const char *m = qcowprov_last_error();

    if (m != NULL && *m != '\0')
        return m;
    return qcowprov_strerror((int)rc);
}

void report(const char *prog, const char *what, int64_t rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, what, lib_error(rc));
}

double now_sec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void json_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    fputc('"', f);
    for (; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (*p < 0x20)
                fprintf(f, "\\u%04x", *p);
            else
                fputc(*p, f);
        }
    }
    fputc('"', f);
}

int mini_getopt(struct miniopt *st, int argc, char **argv, const char *spec)
{
    const char *word, *o;
    char c;

    if (st->idx <= 0) {
        st->idx = 1;
        st->pos = 0;
    }
    st->arg = NULL;
    if (st->pos == 0) {
        if (st->idx >= argc)
            return -1;
        word = argv[st->idx];
        if (word[0] != '-' || word[1] == '\0')
            return -1;
        if (strcmp(word, "--") == 0) {
            st->idx++;
            return -1;
        }
        st->pos = 1;
    }
    word = argv[st->idx];
    c = word[st->pos++];
    o = strchr(spec, c);
    if (c == ':' || o == NULL) {
        st->badopt = c;
        if (word[st->pos] == '\0') {
            st->idx++;
            st->pos = 0;
        }
        return '?';
    }
    if (o[1] == ':') {
        if (word[st->pos] != '\0') {
            st->arg = (char *)&word[st->pos];
        } else if (st->idx + 1 < argc) {
            st->arg = argv[++st->idx];
        } else {
            st->badopt = c;
            st->idx++;
            st->pos = 0;
            return '?';
        }
        st->idx++;
        st->pos = 0;
        return c;
    }
    if (word[st->pos] == '\0') {
        st->idx++;
        st->pos = 0;
    }
    return c;
}

uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}
