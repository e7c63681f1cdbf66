/*
 * CHECK(cond) for the cluster, cost-model and sharding tests: a failed condition prints the file,
 * line and condition and counts a failure in g_failures; each test exits non-zero from that
 * count. (tests/check.h is the variant with a message; MPI tests use test_util.h.)
 */
#ifndef AUTOPAR_TEST_CHECK_COND_H
#define AUTOPAR_TEST_CHECK_COND_H

#include <stdio.h>

static int g_failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
            g_failures++;                                                             \
        }                                                                             \
    } while (0)

#endif
