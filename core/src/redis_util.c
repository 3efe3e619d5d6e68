/* Distributed mode's pure helpers: addresses, shards, the pub/sub record, IDs. No I/O. */
#include "redis.h"

#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

/* Percent-decodes s[0..len) into out (cap bytes with the NUL). */
static int decode_into(char *out, size_t cap, const char *s, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= len)
                return PUSHLET_EINVAL;
            int hi = pl_hexval(s[i + 1]), lo = pl_hexval(s[i + 2]);
            if (hi < 0 || lo < 0)
                return PUSHLET_EINVAL;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o + 1 >= cap)
            return PUSHLET_EINVAL;
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

static int parse_uint(const char *s, size_t len, long max, long *out)
{
    if (len == 0 || len > 9)
        return PUSHLET_EINVAL;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return PUSHLET_EINVAL;
        v = v * 10 + (s[i] - '0');
    }
    if (v > max)
        return PUSHLET_EINVAL;
    *out = v;
    return 0;
}

/* "host", "host:port", "[v6]", "[v6]:port", or a bare IPv6 address. */
static int parse_hostport(const char *s, size_t len, pl_redis_addr *a)
{
    const char *host = s, *port = NULL;
    size_t host_len = len, port_len = 0;
    if (len > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (close == NULL)
            return PUSHLET_EINVAL;
        host = s + 1;
        host_len = (size_t)(close - host);
        size_t rest = len - (size_t)(close + 1 - s);
        if (rest > 0) {
            if (close[1] != ':')
                return PUSHLET_EINVAL;
            port = close + 2;
            port_len = rest - 1;
        }
    } else {
        const char *colon = memchr(s, ':', len);
        if (colon != NULL && memchr(colon + 1, ':', len - (size_t)(colon + 1 - s)) == NULL) {
            host_len = (size_t)(colon - s);
            port = colon + 1;
            port_len = len - host_len - 1;
        } /* else no port, or several colons: a bare IPv6 address */
    }
    if (host_len == 0 || host_len >= sizeof(a->host))
        return PUSHLET_EINVAL;
    for (size_t i = 0; i < host_len; i++)
        if (host[i] == '/' || host[i] == '@' || host[i] == ' ')
            return PUSHLET_EINVAL;
    memcpy(a->host, host, host_len);
    a->host[host_len] = '\0';
    a->port = 6379;
    if (port != NULL) {
        long v;
        if (parse_uint(port, port_len, 65535, &v) != 0 || v == 0)
            return PUSHLET_EINVAL;
        a->port = (int)v;
    }
    return 0;
}

int pl_redis_parse_address(const char *s, pl_redis_addr *out)
{
    memset(out, 0, sizeof(*out));
    out->db = -1;
    if (s == NULL || s[0] == '\0')
        return PUSHLET_EINVAL;
    size_t len = strlen(s);
    const char *path = NULL;
    if (strncmp(s, "unix:", 5) == 0)
        path = s + 5;
    else if (s[0] == '/')
        path = s;
    if (path != NULL) {
        size_t n = strlen(path);
        if (n == 0 || n >= sizeof(out->host) || n >= 108 /* sun_path */)
            return PUSHLET_EINVAL;
        out->is_unix = true;
        memcpy(out->host, path, n + 1);
        return 0;
    }
    if (strncmp(s, "redis://", 8) != 0)
        return parse_hostport(s, len, out);

    const char *p = s + 8, *end = s + len;
    const char *slash = memchr(p, '/', (size_t)(end - p));
    const char *auth_end = slash != NULL ? slash : end;
    const char *at = NULL;
    for (const char *q = p; q < auth_end; q++)
        if (*q == '@')
            at = q; /* the last '@': a password may hold one only percent-encoded, but be lenient */
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon != NULL) {
            if (decode_into(out->user, sizeof(out->user), p, (size_t)(colon - p)) != 0 ||
                decode_into(out->password, sizeof(out->password), colon + 1,
                            (size_t)(at - colon - 1)) != 0)
                return PUSHLET_EINVAL;
            out->has_password = true;
        } else if (decode_into(out->user, sizeof(out->user), p, (size_t)(at - p)) != 0) {
            return PUSHLET_EINVAL;
        }
        p = at + 1;
    }
    if (parse_hostport(p, (size_t)(auth_end - p), out) != 0)
        return PUSHLET_EINVAL;
    if (slash != NULL && slash + 1 < end) {
        long v;
        if (parse_uint(slash + 1, (size_t)(end - slash - 1), 1000000, &v) != 0)
            return PUSHLET_EINVAL;
        out->db = (int)v;
    }
    return 0;
}

uint32_t pl_redis_shard_of(const char *topic, size_t len, uint32_t nshards)
{
    if (nshards <= 1)
        return 0;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)topic[i];
        h *= 16777619u;
    }
    return h % nshards;
}

static uint64_t parse_base36(const char *s, size_t len, bool *ok)
{
    uint64_t v = 0;
    *ok = len > 0 && len <= 12;
    for (size_t i = 0; *ok && i < len; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'z')
            d = c - 'a' + 10;
        else {
            *ok = false;
            break;
        }
        v = v * 36 + (uint64_t)d;
    }
    return v;
}

static uint64_t parse_dec(const char *s, size_t len, bool *ok)
{
    uint64_t v = 0;
    *ok = len > 0 && len <= 19;
    for (size_t i = 0; *ok && i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            *ok = false;
        else
            v = v * 10 + (uint64_t)(s[i] - '0');
    }
    return v;
}

int pl_redis_parse_id(const char *s, size_t len, uint64_t *epoch, uint64_t *seq)
{
    const char *dash = memchr(s, '-', len);
    if (dash == NULL)
        return PUSHLET_EINVAL;
    bool ok1, ok2;
    *epoch = parse_base36(s, (size_t)(dash - s), &ok1);
    *seq = parse_dec(dash + 1, len - (size_t)(dash + 1 - s), &ok2);
    return ok1 && ok2 ? 0 : PUSHLET_EINVAL;
}

/* The record is decoded by hand, not with msgpack-c's unpacker: that one allocates what an
 * array header declares before reading its elements, so a corrupt header could ask for
 * gigabytes. Here nothing is allocated and every length is checked against the input. */
typedef struct reader {
    const uint8_t *p, *end;
} reader;

static bool read_be(reader *r, size_t n, uint64_t *v)
{
    if ((size_t)(r->end - r->p) < n)
        return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++)
        x = x << 8 | *r->p++;
    *v = x;
    return true;
}

/* str or bin (data may be either). */
static bool read_str(reader *r, const char **s, size_t *len)
{
    if (r->p >= r->end)
        return false;
    uint8_t b = *r->p++;
    uint64_t n;
    if ((b & 0xe0) == 0xa0)
        n = b & 0x1f;
    else if (!read_be(r,
                      b == 0xd9 || b == 0xc4   ? 1
                      : b == 0xda || b == 0xc5 ? 2
                      : b == 0xdb || b == 0xc6 ? 4
                                               : 9 /* no such header: fails */,
                      &n))
        return false;
    if ((uint64_t)(r->end - r->p) < n)
        return false;
    *s = (const char *)r->p;
    *len = (size_t)n;
    r->p += n;
    return true;
}

/* Lua numbers are doubles: Redis's cmsgpack writes integral ones as integers, but accept an
 * integral float too. */
static bool read_int(reader *r, int64_t *v)
{
    if (r->p >= r->end)
        return false;
    uint8_t b = *r->p++;
    uint64_t u;
    if (b <= 0x7f || b >= 0xe0) { /* fixint */
        *v = b <= 0x7f ? (int64_t)b : (int64_t)(int8_t)b;
        return true;
    }
    size_t n = b == 0xcc || b == 0xd0                ? 1
               : b == 0xcd || b == 0xd1              ? 2
               : b == 0xce || b == 0xd2 || b == 0xca ? 4
               : b == 0xcf || b == 0xd3 || b == 0xcb ? 8
                                                     : 0;
    if (n == 0 || !read_be(r, n, &u))
        return false;
    if (b == 0xca || b == 0xcb) {
        double d;
        if (b == 0xca) {
            float f;
            uint32_t w = (uint32_t)u;
            memcpy(&f, &w, sizeof(f));
            d = f;
        } else {
            memcpy(&d, &u, sizeof(d));
        }
        if (!(d >= -9.0e18 && d <= 9.0e18) || d != (double)(int64_t)d) /* NaN fails too */
            return false;
        *v = (int64_t)d;
    } else if (b >= 0xcc && b <= 0xcf) { /* unsigned */
        if (u > INT64_MAX)
            return false;
        *v = (int64_t)u;
    } else { /* signed, sign-extended from n bytes */
        int shift = 64 - 8 * (int)n;
        *v = (int64_t)(u << shift) >> shift;
    }
    return true;
}

int pl_redis_record_decode(const char *buf, size_t len, pl_redis_record *out)
{
    reader r = {(const uint8_t *)buf, (const uint8_t *)buf + len};
    uint64_t count = 0;
    if (len == 0)
        return PUSHLET_EINVAL;
    uint8_t b = *r.p++;
    if ((b & 0xf0) == 0x90)
        count = b & 0x0f;
    else if (!read_be(&r, b == 0xdc ? 2 : b == 0xdd ? 4 : 9, &count))
        return PUSHLET_EINVAL;
    int64_t version, seq, pub;
    const char *epoch;
    size_t epoch_len;
    memset(out, 0, sizeof(*out));
    if (count != 7 || !read_int(&r, &version) || version != 1 ||
        !read_str(&r, &out->topic, &out->topic_len) ||
        !read_str(&r, &out->event, &out->event_len) || !read_str(&r, &out->data, &out->data_len) ||
        !read_str(&r, &epoch, &epoch_len) || !read_int(&r, &seq) || !read_int(&r, &pub) ||
        seq < 0 || r.p != r.end)
        return PUSHLET_EINVAL;
    if (out->topic_len > 0) {
        bool ok;
        out->epoch = parse_base36(epoch, epoch_len, &ok);
        if (!ok || seq == 0)
            return PUSHLET_EINVAL;
    }
    out->seq = (uint64_t)seq;
    out->published_ms = pub;
    return 0;
}

int pl_redis_record_encode(const pl_redis_record *rec, char **out, size_t *out_len)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    char epoch[16];
    size_t epoch_len = 0;
    if (rec->topic_len > 0) {
        char tmp[16];
        uint64_t e = rec->epoch;
        do {
            int d = (int)(e % 36);
            tmp[epoch_len++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
            e /= 36;
        } while (e != 0);
        for (size_t i = 0; i < epoch_len; i++)
            epoch[i] = tmp[epoch_len - 1 - i];
    }
    int rc = msgpack_pack_array(&pk, 7);
    rc |= msgpack_pack_uint8(&pk, 1);
    rc |= msgpack_pack_str_with_body(&pk, rec->topic, rec->topic_len);
    rc |= msgpack_pack_str_with_body(&pk, rec->event, rec->event_len);
    rc |= msgpack_pack_str_with_body(&pk, rec->data, rec->data_len);
    rc |= msgpack_pack_str_with_body(&pk, epoch, epoch_len);
    rc |= msgpack_pack_uint64(&pk, rec->seq);
    rc |= msgpack_pack_int64(&pk, rec->published_ms);
    if (rc != 0 || sb.data == NULL) {
        msgpack_sbuffer_destroy(&sb);
        return PUSHLET_ENOMEM;
    }
    *out_len = sb.size;
    *out = msgpack_sbuffer_release(&sb);
    return 0;
}
