/*
 * expect.h: the checking scaffold of the C API tests (api-*.c): counters, EXPECT macros
 * that print the library's last error beside a failed expectation, scratch paths and the
 * summary line. Each test program includes it once.
 */
#ifndef QCOWPROV_TESTS_EXPECT_H
#define QCOWPROV_TESTS_EXPECT_H

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "qcowprov.h"

static int checks, failures;

#define EXPECT(cond, ...)                                                            \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            failures++;                                                              \
            printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                  \
            printf(__VA_ARGS__);                                                     \
            printf(" (last error: \"%s\")\n", qcowprov_last_error());               \
        }                                                                            \
    } while (0)

/* A call that must fail with `code`, leaving a message that contains `text` (any
 * message at all for ""). */
#define EXPECT_ERR_TEXT(call, code, text)                                            \
    do {                                                                             \
        int64_t r_ = (call);                                                         \
        const char *m_;                                                              \
        checks++;                                                                    \
        m_ = qcowprov_last_error();                                                  \
        if (r_ != (code)) {                                                          \
            failures++;                                                              \
            printf("FAIL %s:%d: %s returned %" PRId64 " (%s), expected %d (%s): %s\n", \
                   __FILE__, __LINE__, #call, r_, qcowprov_strerror((int)r_), (code), \
                   qcowprov_strerror(code), m_);                                     \
        } else if (m_[0] == '\0' || strstr(m_, (text)) == NULL) {                    \
            failures++;                                                              \
            printf("FAIL %s:%d: %s: message \"%s\" lacks \"%s\"\n", __FILE__, __LINE__, \
                   #call, m_, (text));                                               \
        }                                                                            \
    } while (0)

#define EXPECT_OK(call)                                                              \
    do {                                                                             \
        int64_t r_ = (call);                                                         \
        checks++;                                                                    \
        if (r_ < 0) {                                                                \
            failures++;                                                              \
            printf("FAIL %s:%d: %s returned %" PRId64 ": %s\n", __FILE__, __LINE__,  \
                   #call, r_, qcowprov_last_error());                                \
        }                                                                            \
    } while (0)

/* The scratch directory (the program's argument). */
static char dir[4096];

/* `name` inside the scratch directory (four results live at once). */
static const char *path(const char *name)
{
    static char buf[4][4200];
    static int k;
    char *p = buf[k++ % 4];

    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

/* Print the summary line; the program's exit status. */
static int summary(const char *program)
{
    printf("%s: %d checks, %d failed\n", program, checks, failures);
    return failures ? 1 : 0;
}

#endif
