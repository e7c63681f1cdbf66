/* Pieces shared by the example programs: flag values, timing, and planning for the job. */
#ifndef AUTOPAR_EXAMPLE_UTIL_H
#define AUTOPAR_EXAMPLE_UTIL_H

#include "autopar.h"

/* Monotonic wall-clock time in seconds. */
double example_now_s(void);

/* Parses a --method value ("auto", "shard", "dp", "zero2"); returns 0 on success. */
int example_parse_method(const char *text, autopar_method *out);

/* One "--name value" flag of an example and where its value goes. */
typedef enum example_flag_kind {
    EXAMPLE_INT,      /* int *                                                               */
    EXAMPLE_I64,      /* int64_t *                                                           */
    EXAMPLE_U64,      /* uint64_t *                                                          */
    EXAMPLE_DOUBLE,   /* double *                                                            */
    EXAMPLE_STRING,   /* const char ** (points into argv)                                    */
    EXAMPLE_METHOD,   /* autopar_method * (example_parse_method)                             */
} example_flag_kind;

typedef struct example_flag {
    const char        *name;   /* "--steps"                                                  */
    example_flag_kind  kind;
    void              *dst;
} example_flag;

/* Parses "--name value" pairs of argv against flags[0..n). Returns 0 on success; 1 on -h /
 * --help, an unknown flag, a missing or malformed value (a message naming the program, flag and
 * value is printed on stderr for the latter three). */
int example_parse_flags(int argc, char **argv, const example_flag *flags, int n);

/* Plans training graph g for this job: the cluster is read from cluster_path, or is the "cpu"
 * preset with one host of `size` devices; autopar_parallelize with `method` and `micro`
 * micro-batches per step (the automatic method may then choose several pipeline stages). On success *cl and *plan belong to the caller;
 * on failure both are NULL and autopar_last_error() says why. */
autopar_status example_plan(const autopar_graph *g, const char *cluster_path,
                            autopar_method method, int micro, int size,
                            autopar_cluster **cl, autopar_plan **plan);

#endif
