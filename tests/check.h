/*
 * CHECK and TRY for the single-process tests: a failed check prints the file, line, condition
 * and a message on stderr and counts a failure in g_failures; the test reports and exits
 * non-zero from that count. (MPI tests use test_util.h, whose messages name the rank.)
 */
#ifndef AUTOPAR_TEST_CHECK_H
#define AUTOPAR_TEST_CHECK_H

#include "autopar.h"

#include <stdio.h>

static int g_failures = 0;

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
            g_failures++;                                                                  \
        }                                                                                  \
    } while (0)

/* What TRY also does on failure before jumping (a test may define it before including). */
#ifndef TRY_ON_FAIL
#define TRY_ON_FAIL
#endif

/* Checks a library call; on failure prints the library's message, counts it and jumps to the
 * calling function's `cleanup` label. */
#define TRY(call)                                                                          \
    do {                                                                                   \
        autopar_status s_ = (call);                                                        \
        if (s_ != AUTOPAR_OK) {                                                            \
            fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,       \
                    autopar_status_str(s_), autopar_last_error());                         \
            g_failures++;                                                                  \
            TRY_ON_FAIL;                                                                   \
            goto cleanup;                                                                  \
        }                                                                                  \
    } while (0)

#endif
