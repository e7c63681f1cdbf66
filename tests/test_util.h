/*
 * Check macros shared by the tests: a failed check prints the rank (for MPI tests), the line and
 * a message, and counts a failure; the test then exits non-zero from test_failures. Up to 40
 * failures are printed so one broken invariant does not flood the log.
 */
#ifndef AUTOPAR_TEST_UTIL_H
#define AUTOPAR_TEST_UTIL_H

#include "autopar.h"

#include <stdarg.h>
#include <stdio.h>

static int test_failures;
static int test_rank;   /* set by MPI tests; 0 otherwise */

static void test_fail_at(int line, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void test_fail_at(int line, const char *fmt, ...) {
    char msg[1400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (test_failures < 40) fprintf(stderr, "rank %d: FAIL line %d: %s\n", test_rank, line, msg);
    test_failures++;
}

#define EXPECT(cond, ...)                                                                       \
    do {                                                                                        \
        if (!(cond)) test_fail_at(__LINE__, __VA_ARGS__);                                       \
    } while (0)

#define EXPECT_OK(expr)                                                                         \
    do {                                                                                        \
        autopar_status s_ = (expr);                                                             \
        if (s_ != AUTOPAR_OK)                                                                   \
            test_fail_at(__LINE__, "%s -> %s: %s", #expr, autopar_status_str(s_),               \
                         autopar_last_error());                                                 \
    } while (0)

#endif
