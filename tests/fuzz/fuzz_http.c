/* libFuzzer target: the HTTP request path. The input is cut into chunks at sizes taken from the
 * input itself, so requests split at every possible byte are explored; each complete request is
 * also taken through URL splitting and query decoding, as the router does. */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

static const pl_http_limits limits = {
    .max_url = 512, .max_head = 2048, .max_headers = 16, .max_body = 4096};

static void walk_request(const pl_http_req *r)
{
    const char *path, *query;
    size_t plen, qlen;
    pl_url_split(pl_http_url(r), r->url.len, &path, &plen, &query, &qlen);
    assert(path >= pl_http_url(r) && path + plen <= pl_http_url(r) + r->url.len);
    pl_query_iter it;
    char key[64], val[128];
    size_t klen, vlen;
    pl_query_init(&it, query, qlen);
    int rc;
    while ((rc = pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen)) != 0)
        assert(rc == -1 || (klen < sizeof(key) && vlen < sizeof(val)));
    size_t hlen;
    const char *host = pl_http_header(r, "host", &hlen);
    assert(!host || strlen(host) == hlen);
    (void)pl_http_keep_alive(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t chunk = (size_t)(data[0] % 32) + 1; /* 1..32 bytes per feed */
    data++, size--;
    pl_http_req *r = pl_http_req_new(&limits);
    if (!r)
        return 0;
    /* Copy each chunk to its own allocation so ASan sees any read past what was fed. */
    size_t off = 0;
    while (off < size) {
        size_t n = size - off < chunk ? size - off : chunk;
        char *piece = malloc(n);
        memcpy(piece, data + off, n);
        size_t done = 0;
        int rc = PL_HTTP_INCOMPLETE;
        while (done < n) {
            size_t used;
            rc = pl_http_parse(r, piece + done, n - done, &used);
            done += used;
            if (rc == PL_HTTP_COMPLETE) {
                walk_request(r);
                if (r->parser.upgrade)
                    break;
                pl_http_req_reset(r);
            } else if (rc == PL_HTTP_ERROR) {
                assert(r->error_status >= 400 && r->error_status < 600);
                break;
            }
        }
        free(piece);
        if (rc == PL_HTTP_ERROR || r->parser.upgrade)
            break;
        off += n;
    }
    pl_http_req_free(r);
    return 0;
}
