/* HTTP/1.1 request parsing on top of libhttp-parser. No I/O. It keeps only the request target,
 * the header fields (bounded in count and bytes) and the body (bounded), each in one buffer,
 * so a parser fed one byte at a time sees exactly what a parser fed whole requests sees.
 * Pipelining: the parser pauses at the end of each request and reports how much it consumed. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum { SPAN_NONE, SPAN_URL, SPAN_FIELD, SPAN_VALUE };

static pl_http_req *req_of(http_parser *hp) { return pl_container_of(hp, pl_http_req, parser); }

static int fail(pl_http_req *r, int status)
{
    if (!r->error_status)
        r->error_status = status;
    return -1;
}

/* Append head bytes, keeping one byte free for the NUL that ends the current span. */
static int head_append(pl_http_req *r, const char *at, size_t len, int status_if_full)
{
    if ((size_t)r->head_len + len + 2 > r->head_cap)
        return fail(r, status_if_full);
    memcpy(r->head + r->head_len, at, len);
    r->head_len += (uint32_t)len;
    return 0;
}

static pl_span *current_span(pl_http_req *r, int kind)
{
    if (kind == SPAN_URL)
        return &r->url;
    return kind == SPAN_FIELD ? &r->names[r->nheaders - 1] : &r->values[r->nheaders - 1];
}

/* NUL-terminates the element just finished. A header field whose value never came (http-parser
 * gives no callback for some empty values) gets the empty string that follows its name. */
static void end_span(pl_http_req *r)
{
    if (r->last_span == SPAN_NONE)
        return;
    r->head[r->head_len++] = '\0'; /* head_append always leaves room for it */
    if (r->last_span == SPAN_FIELD)
        r->values[r->nheaders - 1] = (pl_span){r->head_len - 1, 0};
}

/* Pieces of one element arrive in consecutive callbacks of the same kind: an element cut by the
 * end of the input, or a folded value. Two field names can also come back to back (when the
 * value between them got no callback), so a field piece extends the previous name only as the
 * first callback of an execute, i.e. where the input was cut. */
static int add_piece(pl_http_req *r, int kind, const char *at, size_t len)
{
    bool fresh = kind != r->last_span || (kind == SPAN_FIELD && !r->may_continue);
    r->may_continue = false;
    if (fresh) {
        end_span(r);
        if (kind == SPAN_FIELD) {
            uint32_t max = r->limits->max_headers;
            if (max > PL_HTTP_MAX_HEADERS_CAP)
                max = PL_HTTP_MAX_HEADERS_CAP;
            if (r->nheaders >= max)
                return fail(r, 431);
            r->nheaders++;
        }
        *current_span(r, kind) = (pl_span){r->head_len, 0};
        r->last_span = (uint8_t)kind;
    }
    pl_span *sp = current_span(r, kind);
    if (kind == SPAN_URL && sp->len + len > r->limits->max_url)
        return fail(r, 414);
    if (memchr(at, '\0', len))
        return fail(r, 400); /* RFC 9110 5.5: no NUL in a field value (nor in a target) */
    if (head_append(r, at, len, kind == SPAN_URL ? 414 : 431) != 0)
        return -1;
    sp->len += (uint32_t)len;
    return 0;
}

static int on_url(http_parser *hp, const char *at, size_t len)
{
    return add_piece(req_of(hp), SPAN_URL, at, len);
}

/* RFC 9110 token characters. http-parser tolerates whitespace before the colon, which a proxy
 * in front may read differently (request smuggling): RFC 9112 5.1 requires a 400. */
static bool is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

static int on_header_field(http_parser *hp, const char *at, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!is_tchar((unsigned char)at[i]))
            return fail(req_of(hp), 400);
    return add_piece(req_of(hp), SPAN_FIELD, at, len);
}

static int on_header_value(http_parser *hp, const char *at, size_t len)
{
    /* http-parser reports an empty value as a zero-length piece, so every field gets one. */
    return add_piece(req_of(hp), SPAN_VALUE, at, len);
}

static int on_headers_complete(http_parser *hp)
{
    pl_http_req *r = req_of(hp);
    end_span(r);
    r->last_span = SPAN_NONE;
    r->headers_done = true;
    /* Trailing whitespace is not part of a field value (RFC 9110 5.5). */
    for (uint32_t i = 0; i < r->nheaders; i++) {
        pl_span *v = &r->values[i];
        while (v->len &&
               (r->head[v->off + v->len - 1] == ' ' || r->head[v->off + v->len - 1] == '\t'))
            r->head[v->off + --v->len] = '\0';
    }
    if (hp->http_major != 1)
        return fail(r, 505);
    size_t vlen;
    /* Only "chunked" is understood; any other coding would leave the body's end unknown. */
    const char *te = pl_http_header(r, "transfer-encoding", &vlen);
    if (te && strcasecmp(te, "chunked") != 0)
        return fail(r, 501);
    if ((hp->flags & F_CONTENTLENGTH) && hp->content_length > r->limits->max_body)
        return fail(r, 413);
    const char *expect = pl_http_header(r, "expect", &vlen);
    r->expect_continue = expect && strcasecmp(expect, "100-continue") == 0;
    return 0;
}

static int on_body(http_parser *hp, const char *at, size_t len)
{
    pl_http_req *r = req_of(hp);
    if (r->body_len + len > r->limits->max_body)
        return fail(r, 413);
    if (r->body_len + len > r->body_cap) {
        size_t ncap = r->body_cap ? r->body_cap : 1024;
        while (ncap < r->body_len + len)
            ncap *= 2;
        if (ncap > r->limits->max_body)
            ncap = r->limits->max_body;
        char *nb = realloc(r->body, ncap + 1);
        if (!nb)
            return fail(r, 503);
        r->body = nb;
        r->body_cap = ncap;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    return 0;
}

static int on_message_complete(http_parser *hp)
{
    pl_http_req *r = req_of(hp);
    r->complete = true;
    if (r->body)
        r->body[r->body_len] = '\0';
    http_parser_pause(hp, 1);
    return 0;
}

static const http_parser_settings settings = {
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

pl_http_req *pl_http_req_new(const pl_http_limits *limits)
{
    pl_http_req *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->limits = limits;
    r->head_cap = limits->max_head + 2;
    r->head = malloc(r->head_cap);
    if (!r->head) {
        free(r);
        return NULL;
    }
    http_parser_init(&r->parser, HTTP_REQUEST);
    return r;
}

void pl_http_req_free(pl_http_req *r)
{
    if (!r)
        return;
    free(r->head);
    free(r->body);
    free(r);
}

void pl_http_req_reset(pl_http_req *r)
{
    http_parser_init(&r->parser, HTTP_REQUEST);
    r->error_status = 0;
    r->complete = r->headers_done = r->expect_continue = false;
    r->last_span = SPAN_NONE;
    r->nheaders = 0;
    r->url = (pl_span){0, 0};
    r->head_len = 0;
    r->body_len = 0;
}

int pl_http_parse(pl_http_req *r, const char *data, size_t len, size_t *consumed)
{
    *consumed = 0;
    if (r->error_status)
        return PL_HTTP_ERROR;
    if (r->complete)
        return PL_HTTP_COMPLETE;
    if (len == 0)
        return PL_HTTP_INCOMPLETE;
    r->may_continue = true;
    size_t n = http_parser_execute(&r->parser, &settings, data, len);
    *consumed = n;
    if (r->complete)
        return PL_HTTP_COMPLETE;
    enum http_errno err = HTTP_PARSER_ERRNO(&r->parser);
    if (err != HPE_OK || r->error_status) {
        if (!r->error_status)
            r->error_status = err == HPE_HEADER_OVERFLOW ? 431 : 400;
        return PL_HTTP_ERROR;
    }
    if (r->parser.upgrade && r->headers_done) {
        /* http-parser stops at the end of an upgrade request's head; the rest is the new
         * protocol's, which the transport reads itself. */
        r->complete = true;
        return PL_HTTP_COMPLETE;
    }
    return PL_HTTP_INCOMPLETE;
}

const char *pl_http_header(const pl_http_req *r, const char *name, size_t *len)
{
    size_t nlen = strlen(name);
    for (uint32_t i = 0; i < r->nheaders; i++) {
        if (r->names[i].len == nlen && strncasecmp(r->head + r->names[i].off, name, nlen) == 0) {
            if (len)
                *len = r->values[i].len;
            return r->head + r->values[i].off;
        }
    }
    return NULL;
}

bool pl_http_keep_alive(const pl_http_req *r) { return http_should_keep_alive(&r->parser) != 0; }

void pl_url_split(const char *url, size_t len, const char **path, size_t *path_len,
                  const char **query, size_t *query_len)
{
    const char *end = url + len;
    const char *p = url;
    /* Absolute form (RFC 7230 5.3.2): skip scheme and authority. */
    if (len > 7 && (strncasecmp(url, "http://", 7) == 0 || strncasecmp(url, "https://", 8) == 0)) {
        p = url + (url[4] == ':' ? 7 : 8);
        while (p < end && *p != '/' && *p != '?' && *p != '#')
            p++;
    }
    const char *q = memchr(p, '?', (size_t)(end - p));
    const char *hash = memchr(p, '#', (size_t)(end - p));
    if (hash && (!q || hash < q))
        q = NULL, end = hash;
    *path = p;
    *path_len = (size_t)((q ? q : end) - p);
    if (q) {
        const char *qend = memchr(q, '#', (size_t)(end - q));
        *query = q + 1;
        *query_len = (size_t)((qend ? qend : end) - q - 1);
    } else {
        *query = end;
        *query_len = 0;
    }
}

void pl_query_init(pl_query_iter *it, const char *query, size_t len)
{
    it->p = query;
    it->end = query + len;
}

static int decode(const char *s, size_t n, char *out, size_t cap, size_t *out_len)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            if (i + 2 >= n)
                return -1;
            int a = pl_hexval(s[i + 1]), b = pl_hexval(s[i + 2]);
            if (a < 0 || b < 0)
                return -1;
            c = (char)(a * 16 + b);
            i += 2;
        }
        if (o + 1 >= cap)
            return -1;
        out[o++] = c;
    }
    out[o] = '\0';
    *out_len = o;
    return 0;
}

int pl_query_next(pl_query_iter *it, char *key, size_t key_cap, size_t *key_len, char *val,
                  size_t val_cap, size_t *val_len)
{
    while (it->p < it->end) {
        const char *seg = it->p;
        const char *amp = memchr(seg, '&', (size_t)(it->end - seg));
        const char *seg_end = amp ? amp : it->end;
        it->p = amp ? amp + 1 : it->end;
        if (seg_end == seg)
            continue;
        const char *eq = memchr(seg, '=', (size_t)(seg_end - seg));
        const char *kend = eq ? eq : seg_end;
        const char *v = eq ? eq + 1 : seg_end;
        if (decode(seg, (size_t)(kend - seg), key, key_cap, key_len) != 0 ||
            decode(v, (size_t)(seg_end - v), val, val_cap, val_len) != 0) {
            *key_len = *val_len = 0;
            return -1;
        }
        return 1;
    }
    return 0;
}

int pl_query_find(const char *q, size_t qlen, const char *key, char **out, size_t *out_len)
{
    pl_query_iter it;
    char k[64];
    size_t klen, vlen;
    char *val = malloc(qlen + 1);
    if (!val)
        return PUSHLET_ENOMEM;
    pl_query_init(&it, q, qlen);
    int rc;
    while ((rc = pl_query_next(&it, k, sizeof(k), &klen, val, qlen + 1, &vlen)) != 0) {
        if (rc == 1 && klen == strlen(key) && memcmp(k, key, klen) == 0) {
            *out = val;
            *out_len = vlen;
            return 1;
        }
    }
    free(val);
    return 0;
}

const char *pl_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 505: return "HTTP Version Not Supported";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}
