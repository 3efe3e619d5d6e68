/* HTTP request parsing (http.c). Every well-formed request is parsed three ways — whole, one
 * byte at a time, and split in two at every offset — and the three results must be identical,
 * because a socket can cut a request anywhere. */
#include "internal.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const pl_http_limits default_limits = {
    .max_url = 4096, .max_head = 8192, .max_headers = 64, .max_body = 1 << 20};

/* ---- Drivers ------------------------------------------------------------------------------ */

/* Feed `len` bytes in chunks of at most `chunk` bytes, as a connection would; stops at the first
 * result that is not INCOMPLETE. An INCOMPLETE call must have consumed its whole chunk. */
static int feed(pl_http_req *r, const char *data, size_t len, size_t chunk, size_t *consumed)
{
    size_t off = 0;
    int rc = PL_HTTP_INCOMPLETE;
    while (off < len) {
        size_t n = len - off < chunk ? len - off : chunk, used = 0;
        rc = pl_http_parse(r, data + off, n, &used);
        cr_assert_leq(used, n);
        off += used;
        if (rc != PL_HTTP_INCOMPLETE)
            break;
        cr_assert_eq(used, n, "INCOMPLETE after consuming %zu of %zu bytes at offset %zu", used, n,
                     off);
    }
    *consumed = off;
    return rc;
}

/* Feed `data[0..split)` then the rest. */
static int feed_split(pl_http_req *r, const char *data, size_t len, size_t split, size_t *consumed)
{
    size_t used = 0;
    int rc = pl_http_parse(r, data, split, &used);
    if (rc != PL_HTTP_INCOMPLETE) {
        *consumed = used;
        return rc;
    }
    cr_assert_eq(used, split);
    rc = pl_http_parse(r, data + split, len - split, &used);
    *consumed = split + used;
    return rc;
}

static void append_escaped(tu_buf *b, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        char tmp[8];
        if (ch >= 0x20 && ch < 0x7f && ch != '\\')
            tu_buf_append(b, &s[i], 1);
        else
            tu_buf_append(b, tmp, (size_t)snprintf(tmp, sizeof(tmp), "\\x%02x", ch));
    }
}

/* Everything a caller can observe about a parse, as one comparable string. */
static char *snapshot(const pl_http_req *r, int rc, size_t consumed)
{
    tu_buf b = {0};
    char tmp[128];
    if (rc == PL_HTTP_ERROR) {
        /* Where exactly an error is noticed may differ with the chunking: only the status
         * must not. */
        tu_buf_append(&b, tmp, (size_t)snprintf(tmp, sizeof(tmp), "error %d", r->error_status));
        return b.p;
    }
    tu_buf_append(&b, tmp,
                  (size_t)snprintf(tmp, sizeof(tmp), "rc=%d consumed=%zu method=%s url=", rc,
                                   consumed, http_method_str(r->parser.method)));
    append_escaped(&b, pl_http_url(r), r->url.len);
    for (uint32_t i = 0; i < r->nheaders; i++) {
        tu_buf_append(&b, " [", 2);
        append_escaped(&b, r->head + r->names[i].off, r->names[i].len);
        tu_buf_append(&b, "]=[", 3);
        append_escaped(&b, r->head + r->values[i].off, r->values[i].len);
        tu_buf_append(&b, "]", 1);
    }
    tu_buf_append(&b, " body=[", 7);
    if (r->body_len)
        append_escaped(&b, r->body, r->body_len);
    tu_buf_append(&b, tmp,
                  (size_t)snprintf(tmp, sizeof(tmp), "] keep_alive=%d expect=%d headers_done=%d",
                                   pl_http_keep_alive(r), r->expect_continue, r->headers_done));
    return b.p;
}

/* Parse `text` whole and check that byte-by-byte and every two-way split agree with it.
 * Returns the whole-parse request (caller frees) and its result code. */
static pl_http_req *parse_all_ways(const pl_http_limits *lim, const char *text, size_t len,
                                   int *rc_out, size_t *consumed_out)
{
    pl_http_req *whole = pl_http_req_new(lim);
    cr_assert_not_null(whole);
    size_t consumed;
    int rc = feed(whole, text, len, len ? len : 1, &consumed);
    char *want = snapshot(whole, rc, consumed);

    pl_http_req *r = pl_http_req_new(lim);
    int rc1 = feed(r, text, len, 1, &consumed);
    char *got = snapshot(r, rc1, consumed);
    cr_assert_str_eq(got, want, "byte by byte differs from whole");
    free(got);
    pl_http_req_free(r);

    for (size_t split = 1; split < len; split++) {
        r = pl_http_req_new(lim);
        int rc2 = feed_split(r, text, len, split, &consumed);
        got = snapshot(r, rc2, consumed);
        cr_assert_str_eq(got, want, "split at %zu differs from whole", split);
        free(got);
        pl_http_req_free(r);
    }
    free(want);
    *rc_out = rc;
    if (consumed_out)
        *consumed_out = consumed;
    return whole;
}

#define PARSE(lim, text, rcp, consp) parse_all_ways((lim), (text), strlen(text), (rcp), (consp))

static void assert_header(const pl_http_req *r, const char *name, const char *want)
{
    size_t len = 12345;
    const char *v = pl_http_header(r, name, &len);
    cr_assert_not_null(v, "header %s missing", name);
    cr_assert_str_eq(v, want, "header %s", name);
    cr_assert_eq(len, strlen(want), "header %s length", name);
}

static int error_status_all_ways(const pl_http_limits *lim, const char *text, size_t len)
{
    int rc;
    pl_http_req *r = parse_all_ways(lim, text, len, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_ERROR, "expected an error for %.40s", text);
    int status = r->error_status;
    pl_http_req_free(r);
    return status;
}

/* ---- Well-formed requests ------------------------------------------------------------------ */

Test(http, get_with_query)
{
    const char *req = "GET /events?topic=a%20b&x=1 HTTP/1.1\r\n"
                      "Host: localhost:8080\r\n"
                      "Accept: text/event-stream\r\n\r\n";
    int rc;
    size_t consumed;
    pl_http_req *r = PARSE(&default_limits, req, &rc, &consumed);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    cr_assert_eq(consumed, strlen(req));
    cr_assert_eq(r->parser.method, HTTP_GET);
    cr_assert_str_eq(pl_http_url(r), "/events?topic=a%20b&x=1");
    cr_assert_eq(r->url.len, strlen("/events?topic=a%20b&x=1"));
    cr_assert_eq(r->nheaders, 2);
    assert_header(r, "Host", "localhost:8080");
    assert_header(r, "accept", "text/event-stream");
    cr_assert_eq(r->body_len, 0);
    cr_assert(pl_http_keep_alive(r));
    cr_assert_not(r->expect_continue);
    pl_http_req_free(r);
}

Test(http, post_content_length_body)
{
    const char *req = "POST /publish?topic=t HTTP/1.1\r\n"
                      "Host: x\r\n"
                      "Content-Type: text/plain\r\n"
                      "Content-Length: 11\r\n\r\n"
                      "hello world";
    int rc;
    size_t consumed;
    pl_http_req *r = PARSE(&default_limits, req, &rc, &consumed);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    cr_assert_eq(consumed, strlen(req));
    cr_assert_eq(r->parser.method, HTTP_POST);
    cr_assert_eq(r->body_len, 11);
    cr_assert_str_eq(r->body, "hello world"); /* NUL-terminated for the form parser */
    assert_header(r, "content-length", "11");
    pl_http_req_free(r);
}

Test(http, chunked_body)
{
    const char *req = "POST /p HTTP/1.1\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n"
                      "5\r\nhello\r\n"
                      "1;ext=1\r\n \r\n"
                      "A\r\n0123456789\r\n"
                      "0\r\n\r\n";
    int rc;
    size_t consumed;
    pl_http_req *r = PARSE(&default_limits, req, &rc, &consumed);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    cr_assert_eq(consumed, strlen(req));
    cr_assert_eq(r->body_len, 16);
    cr_assert_str_eq(r->body, "hello 0123456789");
    pl_http_req_free(r);
}

/* Two requests in one buffer: the first reports exactly its own length; after a reset the rest
 * parses as the second request. Checked for every way of feeding the first. */
static void check_pipelined(const char *first, const char *second, const char *url1,
                            const char *body1, const char *url2)
{
    char both[1024];
    snprintf(both, sizeof(both), "%s%s", first, second);
    size_t len1 = strlen(first), len = strlen(both);
    size_t chunks[] = {len, 1, 2, 7};
    for (size_t i = 0; i < sizeof(chunks) / sizeof(chunks[0]); i++) {
        pl_http_req *r = pl_http_req_new(&default_limits);
        size_t consumed;
        int rc = feed(r, both, len, chunks[i], &consumed);
        cr_assert_eq(rc, PL_HTTP_COMPLETE, "chunk %zu", chunks[i]);
        cr_assert_eq(consumed, len1, "first request consumed %zu, want %zu (chunk %zu)", consumed,
                     len1, chunks[i]);
        cr_assert_str_eq(pl_http_url(r), url1);
        cr_assert_eq(r->body_len, strlen(body1));
        if (r->body_len)
            cr_assert_str_eq(r->body, body1);

        /* Further calls before the reset keep reporting the finished request. */
        size_t used = 99;
        cr_assert_eq(pl_http_parse(r, both + consumed, len - consumed, &used), PL_HTTP_COMPLETE);
        cr_assert_eq(used, 0);

        pl_http_req_reset(r);
        size_t consumed2;
        rc = feed(r, both + len1, len - len1, chunks[i], &consumed2);
        cr_assert_eq(rc, PL_HTTP_COMPLETE);
        cr_assert_eq(consumed2, len - len1);
        cr_assert_str_eq(pl_http_url(r), url2);
        cr_assert_eq(r->body_len, 0, "the first body must not leak into the second request");
        assert_header(r, "host", "second");
        cr_assert_null(pl_http_header(r, "content-length", NULL));
        pl_http_req_free(r);
    }
}

Test(http, pipelined_two_gets)
{
    check_pipelined("GET /a?x=1 HTTP/1.1\r\nHost: first\r\n\r\n",
                    "GET /b HTTP/1.1\r\nHost: second\r\n\r\n", "/a?x=1", "", "/b");
}

Test(http, pipelined_after_body)
{
    check_pipelined("POST /p HTTP/1.1\r\nHost: first\r\nContent-Length: 3\r\n\r\nabc",
                    "GET /b HTTP/1.1\r\nHost: second\r\n\r\n", "/p", "abc", "/b");
}

Test(http, pipelined_after_chunked_body)
{
    check_pipelined("POST /p HTTP/1.1\r\nHost: first\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "3\r\nabc\r\n0\r\n\r\n",
                    "GET /b HTTP/1.1\r\nHost: second\r\n\r\n", "/p", "abc", "/b");
}

Test(http, empty_header_values)
{
    const char *req = "GET / HTTP/1.1\r\n"
                      "X-Empty:\r\n"
                      "X-Space: \r\n"
                      "Host: h\r\n"
                      "X-Last:\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    cr_assert_eq(r->nheaders, 4);
    assert_header(r, "x-empty", "");
    assert_header(r, "x-space", "");
    assert_header(r, "host", "h");
    assert_header(r, "x-last", "");
    pl_http_req_free(r);
}

Test(http, header_lookup_is_case_insensitive)
{
    const char *req = "GET / HTTP/1.1\r\n"
                      "hOsT: Example.COM\r\n"
                      "X-Pushlet-Secret: s3cr3t\r\n"
                      "X-Pushlet: other\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    assert_header(r, "Host", "Example.COM"); /* values keep their case */
    assert_header(r, "HOST", "Example.COM");
    assert_header(r, "x-pushlet-secret", "s3cr3t");
    assert_header(r, "X-PUSHLET", "other"); /* a prefix of another name is not a match */
    cr_assert_null(pl_http_header(r, "x-pushlet-secre", NULL));
    cr_assert_null(pl_http_header(r, "missing", NULL));
    pl_http_req_free(r);
}

Test(http, folded_header_joins_lines)
{
    /* obs-fold (RFC 7230 3.2.4): the fold must turn into whitespace, never glue words. */
    const char *req = "GET / HTTP/1.1\r\n"
                      "X-Fold: first\r\n"
                      "  second\r\n"
                      "Host: h\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    const char *v = pl_http_header(r, "x-fold", NULL);
    cr_assert_not_null(v);
    cr_assert(strncmp(v, "first", 5) == 0 && strstr(v, "second") && (v[5] == ' ' || v[5] == '\t'),
              "folded value is [%s]", v);
    assert_header(r, "host", "h");
    pl_http_req_free(r);
}

Test(http, header_values_exclude_trailing_whitespace)
{
    /* RFC 7230 3.2.4: OWS around a field value is not part of it. A client that writes
     * "Expect: 100-continue " must still get its 100 Continue. */
    const char *req = "POST /p HTTP/1.1\r\n"
                      "Expect: 100-continue \r\n"
                      "X-Pushlet-Secret: s3cr3t\t\r\n"
                      "Content-Length: 2\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_INCOMPLETE);
    const char *secret = pl_http_header(r, "x-pushlet-secret", NULL);
    cr_expect(secret && strcmp(secret, "s3cr3t") == 0, "secret header is [%s]", secret);
    cr_expect(r->expect_continue, "Expect with trailing OWS not recognised");
    pl_http_req_free(r);
}

static bool keep_alive_of(const char *req)
{
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE, "%s", req);
    bool ka = pl_http_keep_alive(r);
    pl_http_req_free(r);
    return ka;
}

Test(http, keep_alive_semantics)
{
    cr_assert_not(keep_alive_of("GET / HTTP/1.0\r\n\r\n"), "HTTP/1.0 closes by default");
    cr_assert(keep_alive_of("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    cr_assert(keep_alive_of("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    cr_assert(keep_alive_of("GET / HTTP/1.1\r\n\r\n"), "HTTP/1.1 persists by default");
    cr_assert_not(keep_alive_of("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    cr_assert_not(keep_alive_of("GET / HTTP/1.1\r\nconnection: CLOSE\r\n\r\n"));
    cr_assert_not(keep_alive_of("GET / HTTP/1.0\r\nConnection: close\r\n\r\n"));
}

Test(http, expect_100_continue)
{
    const char *head = "POST /publish HTTP/1.1\r\n"
                       "Expect: 100-continue\r\n"
                       "Content-Length: 5\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, head, &rc, NULL);
    /* The head alone: not complete yet, but the transport must be able to answer 100. */
    cr_assert_eq(rc, PL_HTTP_INCOMPLETE);
    cr_assert(r->headers_done);
    cr_assert(r->expect_continue);
    size_t used;
    cr_assert_eq(pl_http_parse(r, "hello", 5, &used), PL_HTTP_COMPLETE);
    cr_assert_eq(used, 5);
    cr_assert_str_eq(r->body, "hello");
    pl_http_req_free(r);

    r = PARSE(&default_limits,
              "POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n", &rc, NULL);
    cr_assert(r->expect_continue, "the expectation token is case-insensitive");
    pl_http_req_free(r);

    r = PARSE(&default_limits, "POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\n", &rc, NULL);
    cr_assert_not(r->expect_continue);
    pl_http_req_free(r);

    /* reset forgets the flag */
    r = PARSE(&default_limits, "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    cr_assert(r->expect_continue);
    pl_http_req_reset(r);
    cr_assert_eq(pl_http_parse(r, "GET / HTTP/1.1\r\n\r\n", 18, &used), PL_HTTP_COMPLETE);
    cr_assert_not(r->expect_continue);
    pl_http_req_free(r);
}

Test(http, limits_are_inclusive)
{
    pl_http_limits lim = {.max_url = 32, .max_head = 256, .max_headers = 4, .max_body = 100};
    char req[1024];
    /* A URL of exactly max_url bytes, four headers, a body of exactly max_body bytes. */
    char url[33], body[101];
    memset(url, 'u', 32);
    url[0] = '/';
    url[32] = '\0';
    memset(body, 'b', 100);
    body[100] = '\0';
    snprintf(req, sizeof(req),
             "POST %s HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nContent-Length: 100\r\n\r\n%s", url,
             body);
    int rc;
    pl_http_req *r = PARSE(&lim, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE, "status %d", r->error_status);
    cr_assert_str_eq(pl_http_url(r), url);
    cr_assert_eq(r->nheaders, 4);
    cr_assert_eq(r->body_len, 100);
    pl_http_req_free(r);
}

/* ---- Errors -------------------------------------------------------------------------------- */

Test(http, garbage_is_400)
{
    const char *bad[] = {
        "HELLO\r\n\r\n",
        "GET\r\n\r\n",
        "GET / XTTP/1.1\r\n\r\n",
        "\x01\x02\x03\x04 / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(error_status_all_ways(&default_limits, bad[i], strlen(bad[i])), 400,
                     "case %zu", i);
}

Test(http, header_name_whitespace_is_400)
{
    /* RFC 9112 5.1: whitespace between a field name and the colon must be refused (a proxy in
     * front may read the field differently). */
    const char *bad[] = {
        "GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        "GET / HTTP/1.1\r\nHost\t: h\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
        "GET / HTTP/1.1\r\nX(y): 1\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(error_status_all_ways(&default_limits, bad[i], strlen(bad[i])), 400,
                     "case %zu", i);
    int rc;
    pl_http_req *r =
        PARSE(&default_limits, "GET / HTTP/1.1\r\nX-a.b~c!#$%&'*+^_`|: 1\r\n\r\n", &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE, "every tchar is allowed in a name");
    pl_http_req_free(r);
}

Test(http, unsupported_version_is_505)
{
    const char *req = "GET / HTTP/2.0\r\nHost: h\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&default_limits, req, strlen(req)), 505);
    req = "GET / HTTP/0.9\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&default_limits, req, strlen(req)), 505);
}

Test(http, unknown_transfer_coding_is_501)
{
    const char *req = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&default_limits, req, strlen(req)), 501);
    req = "POST / HTTP/1.1\r\nTransfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    int rc;
    pl_http_req *r = PARSE(&default_limits, req, &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE, "the coding name is case-insensitive");
    cr_assert_str_eq(r->body, "abc");
    pl_http_req_free(r);
}

Test(http, error_is_sticky)
{
    pl_http_req *r = pl_http_req_new(&default_limits);
    size_t used;
    cr_assert_eq(pl_http_parse(r, "BOGUS\r\n\r\n", 9, &used), PL_HTTP_ERROR);
    cr_assert_eq(pl_http_parse(r, "GET / HTTP/1.1\r\n\r\n", 18, &used), PL_HTTP_ERROR);
    cr_assert_eq(used, 0);
    cr_assert_eq(r->error_status, 400);
    pl_http_req_free(r);
}

Test(http, url_too_long_is_414)
{
    pl_http_limits lim = {.max_url = 32, .max_head = 1024, .max_headers = 8, .max_body = 100};
    char req[256];
    snprintf(req, sizeof(req), "GET /%s HTTP/1.1\r\nHost: h\r\n\r\n",
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"); /* 45 > 32 */
    cr_assert_eq(error_status_all_ways(&lim, req, strlen(req)), 414);
    /* one byte over */
    char url[34];
    memset(url, 'a', 33);
    url[0] = '/';
    url[33] = '\0';
    snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\n\r\n", url);
    cr_assert_eq(error_status_all_ways(&lim, req, strlen(req)), 414);
}

Test(http, head_too_large_is_431)
{
    pl_http_limits lim = {.max_url = 128, .max_head = 256, .max_headers = 64, .max_body = 100};
    char value[400], req[600];
    memset(value, 'v', sizeof(value) - 1);
    value[sizeof(value) - 1] = '\0';
    snprintf(req, sizeof(req), "GET / HTTP/1.1\r\nX-Big: %s\r\n\r\n", value);
    cr_assert_eq(error_status_all_ways(&lim, req, strlen(req)), 431);

    /* Many small headers that add up past max_head. */
    tu_buf b = {0};
    tu_buf_append(&b, "GET / HTTP/1.1\r\n", 16);
    for (int i = 0; i < 30; i++) {
        char line[32];
        tu_buf_append(&b, line, (size_t)snprintf(line, sizeof(line), "X-H%02d: 0123456789\r\n", i));
    }
    tu_buf_append(&b, "\r\n", 2);
    cr_assert_eq(error_status_all_ways(&lim, b.p, b.len), 431);
    tu_buf_free(&b);
}

Test(http, too_many_headers_is_431)
{
    pl_http_limits lim = {.max_url = 128, .max_head = 4096, .max_headers = 4, .max_body = 100};
    const char *five = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&lim, five, strlen(five)), 431);
    /* max_headers above the fixed array size is clamped, never overflows it */
    pl_http_limits big = {
        .max_url = 128, .max_head = 1 << 16, .max_headers = 100000, .max_body = 100};
    tu_buf b = {0};
    tu_buf_append(&b, "GET / HTTP/1.1\r\n", 16);
    for (int i = 0; i < PL_HTTP_MAX_HEADERS_CAP + 1; i++) {
        char line[32];
        tu_buf_append(&b, line, (size_t)snprintf(line, sizeof(line), "X-%d: v\r\n", i));
    }
    tu_buf_append(&b, "\r\n", 2);
    cr_assert_eq(error_status_all_ways(&big, b.p, b.len), 431);
    tu_buf_free(&b);
}

Test(http, content_length_over_max_body_is_413)
{
    pl_http_limits lim = {.max_url = 128, .max_head = 1024, .max_headers = 8, .max_body = 100};
    /* Refused from the head alone, before any body byte is read. */
    const char *req = "POST /p HTTP/1.1\r\nContent-Length: 101\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&lim, req, strlen(req)), 413);
    const char *huge = "POST /p HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&lim, huge, strlen(huge)), 413);
}

Test(http, chunked_body_over_max_body_is_413)
{
    pl_http_limits lim = {.max_url = 128, .max_head = 1024, .max_headers = 8, .max_body = 100};
    tu_buf b = {0};
    const char *head = "POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    tu_buf_append(&b, head, strlen(head));
    char chunk[64];
    memset(chunk, 'c', sizeof(chunk));
    for (int i = 0; i < 2; i++) { /* 2 x 60 bytes > 100 */
        tu_buf_append(&b, "3c\r\n", 4);
        tu_buf_append(&b, chunk, 60);
        tu_buf_append(&b, "\r\n", 2);
    }
    tu_buf_append(&b, "0\r\n\r\n", 5);
    cr_assert_eq(error_status_all_ways(&lim, b.p, b.len), 413);
    tu_buf_free(&b);
}

/* ---- Query strings -------------------------------------------------------------------------- */

typedef struct kv {
    const char *k, *v;
    size_t vlen; /* 0: strlen(v) */
} kv;

/* Iterate `query` and expect exactly the pairs in `want`, then the end. */
static void expect_pairs(const char *query, const kv *want, size_t n)
{
    pl_query_iter it;
    char key[64], val[64];
    size_t klen, vlen;
    pl_query_init(&it, query, strlen(query));
    for (size_t i = 0; i < n; i++) {
        int rc = pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen);
        cr_assert_eq(rc, 1, "%s: pair %zu missing (rc %d)", query, i, rc);
        size_t want_vlen = want[i].vlen ? want[i].vlen : strlen(want[i].v);
        cr_assert_str_eq(key, want[i].k, "%s: key %zu", query, i);
        cr_assert_eq(klen, strlen(want[i].k));
        cr_assert_eq(vlen, want_vlen, "%s: value %zu length", query, i);
        cr_assert(memcmp(val, want[i].v, vlen) == 0, "%s: value %zu is [%s]", query, i, val);
        cr_assert_eq(val[vlen], '\0');
    }
    cr_assert_eq(pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen), 0,
                 "%s: extra pair", query);
    /* and it stays at the end */
    cr_assert_eq(pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen), 0);
}

Test(query, pairs_and_decoding)
{
    expect_pairs("", NULL, 0);
    expect_pairs("a=1&b=2", (kv[]){{"a", "1", 0}, {"b", "2", 0}}, 2);
    expect_pairs("q=hello+world", (kv[]){{"q", "hello world", 0}}, 1);
    expect_pairs("q=a%2Bb%20c%3d%26", (kv[]){{"q", "a+b c=&", 0}}, 1);
    expect_pairs("%74opic=%7e%7E", (kv[]){{"topic", "~~", 0}}, 1);
    expect_pairs("k=%00x", (kv[]){{"k", "\0x", 2}}, 1);
    expect_pairs("utf=%C3%A9", (kv[]){{"utf", "\xc3\xa9", 0}}, 1);
    expect_pairs("a=b=c", (kv[]){{"a", "b=c", 0}}, 1);
}

Test(query, repeated_keys_keep_order)
{
    expect_pairs("topic=a&topic=b&x=1&topic=c",
                 (kv[]){{"topic", "a", 0}, {"topic", "b", 0}, {"x", "1", 0}, {"topic", "c", 0}}, 4);
}

Test(query, empty_segments)
{
    expect_pairs("&&a=1&&b=&", (kv[]){{"a", "1", 0}, {"b", "", 0}}, 2);
    expect_pairs("flag&k=v", (kv[]){{"flag", "", 0}, {"k", "v", 0}}, 2);
    expect_pairs("=v", (kv[]){{"", "v", 0}}, 1);
    expect_pairs("&", NULL, 0);
}

static int first_rc(const char *query, size_t key_cap, size_t val_cap)
{
    pl_query_iter it;
    char key[64], val[64];
    size_t klen, vlen;
    pl_query_init(&it, query, strlen(query));
    return pl_query_next(&it, key, key_cap, &klen, val, val_cap, &vlen);
}

Test(query, bad_escapes)
{
    const char *bad[] = {"a=%", "a=%4", "a=%zz", "a=%4g", "a=%g4", "%=1", "k%2=v", "a=x%"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(first_rc(bad[i], 64, 64), -1, "%s", bad[i]);
    cr_assert_eq(first_rc("a=%41", 64, 64), 1);
}

Test(query, values_that_do_not_fit)
{
    /* The buffers also hold the NUL: cap 4 holds three bytes. */
    cr_assert_eq(first_rc("k=abc", 64, 4), 1);
    cr_assert_eq(first_rc("k=abcd", 64, 4), -1);
    cr_assert_eq(first_rc("k=%41%42%43", 64, 4), 1, "decoded length is what counts");
    cr_assert_eq(first_rc("abc=v", 4, 64), 1);
    cr_assert_eq(first_rc("abcd=v", 4, 64), -1);
    cr_assert_eq(first_rc("k=", 64, 1), 1, "an empty value needs only the NUL");

    /* A failed pair does not stop iteration: the next one is still readable. */
    pl_query_iter it;
    char key[8], val[4];
    size_t klen, vlen;
    const char *q = "k=toolong&x=ok";
    pl_query_init(&it, q, strlen(q));
    cr_assert_eq(pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen), -1);
    cr_assert_eq(pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen), 1);
    cr_assert_str_eq(key, "x");
    cr_assert_str_eq(val, "ok");
}

/* ---- Request targets ------------------------------------------------------------------------ */

static void expect_split(const char *url, const char *path, const char *query)
{
    const char *p, *q;
    size_t plen, qlen;
    pl_url_split(url, strlen(url), &p, &plen, &q, &qlen);
    cr_assert(plen == strlen(path) && memcmp(p, path, plen) == 0, "%s: path [%.*s], want [%s]", url,
              (int)plen, p, path);
    cr_assert(qlen == strlen(query) && memcmp(q, query, qlen) == 0, "%s: query [%.*s], want [%s]",
              url, (int)qlen, q, query);
    cr_assert(p >= url && p + plen <= url + strlen(url), "%s: path outside the input", url);
    cr_assert(q >= url && q + qlen <= url + strlen(url), "%s: query outside the input", url);
}

Test(url, origin_form)
{
    expect_split("/", "/", "");
    expect_split("/events", "/events", "");
    expect_split("/events?", "/events", "");
    expect_split("/events?topic=a&x=1", "/events", "topic=a&x=1");
    expect_split("/events?topic=a#frag", "/events", "topic=a");
    expect_split("/events#frag?topic=a", "/events", "");
    expect_split("/a?b?c", "/a", "b?c");
    expect_split("?x=1", "", "x=1");
    expect_split("", "", "");
}

Test(url, absolute_form)
{
    expect_split("http://example.com/events?topic=a", "/events", "topic=a");
    expect_split("HTTP://example.com:8080/p", "/p", "");
    expect_split("https://h/x/y?q#f", "/x/y", "q");
    expect_split("http://h/", "/", "");
    /* not a scheme we know: left as is */
    expect_split("ftp://h/p", "ftp://h/p", "");
}

Test(url, absolute_form_without_path_keeps_query)
{
    /* RFC 3986: the authority ends at the first '/', '?' or '#'. */
    expect_split("http://example.com?topic=a", "", "topic=a");
    expect_split("http://example.com#f", "", "");
}

Test(http, reason_phrases)
{
    int codes[] = {100, 200, 204, 400, 401, 403, 404, 405, 408,
                   413, 414, 426, 431, 500, 501, 503, 505};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        cr_assert_str_neq(pl_http_reason(codes[i]), "Unknown", "%d", codes[i]);
    cr_assert_str_eq(pl_http_reason(431), "Request Header Fields Too Large");
    cr_assert_str_eq(pl_http_reason(299), "Unknown");
}

/* Regression (fuzz_http): with bare-LF line ends an empty value gets no callback from
 * http-parser; the field must still read as empty, not as stale bytes of an earlier request,
 * and the next field must not be glued onto its name. */
Test(http, empty_values_with_bare_lf)
{
    int rc;
    pl_http_req *r = PARSE(&default_limits, "GET /a HTTP/1.1\nHost:\nX-Next: 1\n\n", &rc, NULL);
    cr_assert_eq(rc, PL_HTTP_COMPLETE);
    assert_header(r, "host", "");
    assert_header(r, "x-next", "1");
    pl_http_req_reset(r);
    size_t used;
    const char *again = "GET /b HTTP/1.1\nAccept:\n\n";
    cr_assert_eq(pl_http_parse(r, again, strlen(again), &used), PL_HTTP_COMPLETE);
    assert_header(r, "accept", "");
    cr_assert_null(pl_http_header(r, "host", NULL));
    pl_http_req_free(r);
}

Test(http, nul_in_header_value_is_400)
{
    static const char req[] = "GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n";
    cr_assert_eq(error_status_all_ways(&default_limits, req, sizeof(req) - 1), 400);
}
