/* Helpers shared by the example programs: sizes with qemu's suffixes, pattern
 * fill, error reporting, small option parser, timing, JSON strings. */
#ifndef QCOWPROV_EXAMPLES_COMMON_H
#define QCOWPROV_EXAMPLES_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stddef.h>

#include "qcowprov.h"

/* Parse a size as qemu does (qemu_strtosz): decimal (a fraction only with a
 * suffix) or 0x hex, optional suffix b/B (bytes), k/K, m/M, g/G, t/T, p/P, e/E
 * (powers of 1024). Returns 0, or -1 on junk or overflow. */
int parse_size(const char *s, uint64_t *out);

/* Parse a pattern byte as qemu-io does (strtol base 0, 0..255). Returns 0 or -1. */
int parse_pattern(const char *s, int *out);

/* Parse a non-negative decimal/hex integer that fits in an int. */
int parse_int(const char *s, int *out);

/* Fill buf with the byte pattern. */
void fill_pattern(void *buf, size_t len, int pattern);

/* Index of the first byte of buf that is not `pattern`, or len if all match. */
size_t find_mismatch(const void *buf, size_t len, int pattern);

/* qemu's cvtstr: "64 KiB", "1.500 MiB", "1000 bytes". */
void cvtstr(double value, char *str, size_t size);

/* The library's message for the last failure on this thread, or strerror(rc)
 * when the library left none. Never NULL. */
const char *lib_error(int64_t rc);

/* Print "prog: what: message" to stderr. */
void report(const char *prog, const char *what, int64_t rc);

/* Monotonic clock in seconds. */
double now_sec(void);

/* Print s as a JSON string (quotes and escapes included). */
void json_string(FILE *f, const char *s);

/* A tiny getopt over an argv that does not touch global state:
 * spec as getopt's ("qP:z"). Returns the option char, -1 at the first
 * non-option (or after "--"), '?' on an unknown option or a missing argument
 * (with *badopt set). *idx starts at 1 and ends at the first operand. */
struct miniopt {
    int idx;        /* next argv index */
    int pos;        /* position inside a clustered option word */
    char *arg;      /* argument of the last option */
    int badopt;     /* offending option char on '?' */
};
int mini_getopt(struct miniopt *st, int argc, char **argv, const char *spec);

/* splitmix64 PRNG. */
uint64_t splitmix64(uint64_t *state);

#endif
