/* Whole-file reading shared by the JSON loaders (graphs, clusters, plans). */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ap_status ap_read_text_file(const char *what, const char *path, size_t max_bytes, char **out,
                            size_t *out_len) {
    *out = NULL;
    if (out_len) *out_len = 0;
    errno = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return ap_error(AUTOPAR_ERR_IO, "%s: cannot open '%s': %s", what, path, strerror(errno));
    /* Chunked reads rather than fseek/ftell, so pipes and /dev/stdin work too. */
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    ap_status st = AUTOPAR_OK;
    while (buf) {
        if (cap - len < 2) {
            if (cap >= max_bytes) {
                st = ap_error(AUTOPAR_ERR_IO, "%s: '%s' is larger than %zu bytes", what, path,
                              max_bytes);
                break;
            }
            char *grown = realloc(buf, cap * 2);
            if (!grown) break;
            buf = grown;
            cap *= 2;
        }
        errno = 0;
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0) {
            if (ferror(f))
                st = ap_error(AUTOPAR_ERR_IO, "%s: cannot read '%s': %s", what, path,
                              errno ? strerror(errno) : "read error");
            break;
        }
    }
    fclose(f);
    if (st == AUTOPAR_OK && !buf)
        st = ap_error(AUTOPAR_ERR_NOMEM, "%s: out of memory reading '%s'", what, path);
    if (st == AUTOPAR_OK) {
        buf[len] = '\0';
        if (strlen(buf) != len)
            st = ap_error(AUTOPAR_ERR_PARSE, "%s: '%s' contains a NUL byte at offset %zu", what,
                          path, strlen(buf));
    }
    if (st != AUTOPAR_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    if (out_len) *out_len = len;
    return AUTOPAR_OK;
}
