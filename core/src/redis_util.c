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

static bool obj_str(const msgpack_object *o, const char **p, size_t *len)
{
    if (o->type == MSGPACK_OBJECT_STR) {
        *p = o->via.str.ptr;
        *len = o->via.str.size;
        return true;
    }
    if (o->type == MSGPACK_OBJECT_BIN) {
        *p = o->via.bin.ptr;
        *len = o->via.bin.size;
        return true;
    }
    return false;
}

/* Lua numbers are doubles: Redis's cmsgpack writes integral ones as integers, but accept an
 * integral float too. */
static bool obj_int(const msgpack_object *o, int64_t *v)
{
    switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        if (o->via.u64 > INT64_MAX)
            return false;
        *v = (int64_t)o->via.u64;
        return true;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *v = o->via.i64; return true;
    case MSGPACK_OBJECT_FLOAT64:
    case MSGPACK_OBJECT_FLOAT32:
        if (o->via.f64 != (double)(int64_t)o->via.f64)
            return false;
        *v = (int64_t)o->via.f64;
        return true;
    default: return false;
    }
}

int pl_redis_record_decode(const char *buf, size_t len, pl_redis_record *out)
{
    /* A record is small and flat: a fixed zone on the stack would do, but msgpack-c's unpacker
     * wants its own; the pointers it gives refer into `buf` for str/bin. */
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    int rc = PUSHLET_EINVAL;
    if (msgpack_unpack_next(&u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len)
        goto out;
    const msgpack_object *o = &u.data;
    if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 7)
        goto out;
    const msgpack_object *f = o->via.array.ptr;
    int64_t version, seq, pub;
    const char *epoch;
    size_t epoch_len;
    memset(out, 0, sizeof(*out));
    if (!obj_int(&f[0], &version) || version != 1 ||
        !obj_str(&f[1], &out->topic, &out->topic_len) ||
        !obj_str(&f[2], &out->event, &out->event_len) ||
        !obj_str(&f[3], &out->data, &out->data_len) || !obj_str(&f[4], &epoch, &epoch_len) ||
        !obj_int(&f[5], &seq) || !obj_int(&f[6], &pub) || seq < 0)
        goto out;
    if (out->topic_len > 0) {
        bool ok;
        out->epoch = parse_base36(epoch, epoch_len, &ok);
        if (!ok || seq == 0)
            goto out;
    }
    out->seq = (uint64_t)seq;
    out->published_ms = pub;
    /* The strings must outlive the unpacker: they point into `buf` only when the unpacker did
     * not copy them, so check. */
    if ((out->topic_len && (out->topic < buf || out->topic + out->topic_len > buf + len)) ||
        (out->event_len && (out->event < buf || out->event + out->event_len > buf + len)) ||
        (out->data_len && (out->data < buf || out->data + out->data_len > buf + len)))
        goto out;
    rc = 0;
out:
    msgpack_unpacked_destroy(&u);
    return rc;
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
