/* Whole-file reading and JSON parse errors shared by the JSON loaders (graphs, clusters,
 * plans). */
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

ap_status ap_json_parse_error(const char *label, const char *text, const char *at) {
    size_t text_len = text ? strlen(text) : 0;
    size_t off = (at && text && at >= text && (size_t)(at - text) <= text_len)
                     ? (size_t)(at - text) : text_len;
    int line = 1, col = 1;
    for (size_t i = 0; i < off; i++) {
        if (text[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    if (off >= text_len)
        return ap_error(AUTOPAR_ERR_PARSE,
                        "%s: malformed JSON: unexpected end of input at offset %zu (line %d, "
                        "column %d)", label, off, line, col);
    char ctx[48];
    size_t k = 0;
    for (size_t i = off; i < text_len && k + 1 < sizeof ctx && k < 32; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch == '\n' || ch == '\r') break;
        ctx[k++] = (ch < 0x20 || ch >= 0x7f) ? '?' : (char)ch;
    }
    ctx[k] = '\0';
    return ap_error(AUTOPAR_ERR_PARSE,
                    "%s: malformed JSON at offset %zu (line %d, column %d) near \"%s\"", label, off,
                    line, col, ctx);
}
