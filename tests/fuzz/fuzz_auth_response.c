/* libFuzzer target: pushletd's auth backend response parser and decision (auth_url.c).
 *
 * The first byte chooses where the input is split in two (the rest arrives as two reads, as
 * from a socket), the bytes after it are the backend's answer to a POST. Then the peer closes.
 * A complete answer is mapped to allow/deny for a connection and for a subscription; what comes
 * out must be something pushlet_allow()/pushlet_deny() accept:
 * - the parser reports no more bytes used than it was given, and a body within its buffer;
 * - deny: status 4xx (the backend's) or 503; reason one line of valid UTF-8, <= 120 bytes;
 * - allow: only 2xx; user non-empty, one line, <= 256 bytes; metadata valid JSON text,
 *   <= 4096 bytes; a subscription carries neither. */
#include "auth_url.h"

#include <assert.h>
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int valid_utf8_line(const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    while (*u) {
        unsigned char c = *u;
        size_t n = c < 0x80                 ? 1
                   : c >= 0xC2 && c <= 0xDF ? 2
                   : c >= 0xE0 && c <= 0xEF ? 3
                   : c >= 0xF0 && c <= 0xF4 ? 4
                                            : 0;
        if (n == 0 || (n == 1 && (c < 0x20 || c == 0x7F)))
            return 0;
        for (size_t i = 1; i < n; i++)
            if ((u[i] & 0xC0) != 0x80)
                return 0;
        u += n;
    }
    return 1;
}

static int no_controls(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7F)
            return 0;
    return 1;
}

static void check(const pl_authurl_response *r, int connect)
{
    pl_authurl_answer a;
    pl_authurl_decide(r, connect, &a);
    if (a.allow) {
        assert(r->status >= 200 && r->status < 300);
        assert(strlen(a.user) <= PL_AUTHURL_USER_MAX);
        assert(a.has_user ? a.user[0] != '\0' && no_controls(a.user) : a.user[0] == '\0');
        if (!connect)
            assert(!a.has_user && a.metadata == NULL);
        if (a.metadata) {
            assert(strlen(a.metadata) <= PL_AUTHURL_META_MAX);
            cJSON *j = cJSON_Parse(a.metadata);
            assert(j != NULL);
            cJSON_Delete(j);
        }
    } else {
        assert(a.status == 503 || (a.status >= 400 && a.status < 500 && a.status == r->status));
        assert(strlen(a.reason) <= PL_AUTHURL_REASON_MAX);
        assert(valid_utf8_line(a.reason));
        assert(a.metadata == NULL);
    }
    pl_authurl_answer_clear(&a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t split = data[0];
    const char *in = (const char *)data + 1;
    size_t len = size - 1;
    if (split > len)
        split = len;

    static pl_authurl_response r; /* 16 KiB: not on the stack */
    pl_authurl_response_init(&r);
    size_t used = 0;
    int st = pl_authurl_response_feed(&r, in, split, &used);
    assert(used <= split);
    if (st == PL_AUTHURL_MORE && split > 0) { /* a 0-byte read means the peer closed */
        st = pl_authurl_response_feed(&r, in + split, len - split, &used);
        assert(used <= len - split);
    }
    if (st == PL_AUTHURL_MORE) {
        st = pl_authurl_response_feed(&r, NULL, 0, &used);
        assert(st != PL_AUTHURL_MORE);
    }
    assert(r.body_len <= sizeof(r.body));
    assert(st != PL_AUTHURL_DONE || (r.done && r.status >= 200 && r.status <= 599));
    if (st == PL_AUTHURL_DONE) {
        check(&r, 1);
        check(&r, 0);
    } else {
        check(&r, 1); /* incomplete: must deny */
    }
    return 0;
}
