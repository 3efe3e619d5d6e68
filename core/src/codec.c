/* Message encodings for WebSocket: one JSON object or MessagePack map per message,
 *   {"topic","event","data","id","timestamp"}
 * (a host's send to one connection or user has no topic and no id: {"event","data","timestamp"})
 * written straight into a complete binary frame (header + payload) that every WebSocket
 * subscriber using that encoding shares. */
#include "internal.h"

#include <msgpack.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Length of the valid UTF-8 sequence starting at s[0], or 0 when it is not valid. */
static size_t utf8_seq_len(const uint8_t *s, size_t n)
{
    size_t len = s[0] < 0x80 ? 1 : s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : 2;
    if (len > n || (len > 1 && pl_utf8_step(0, s, len) != 0))
        return 0;
    return len;
}

/* Writes `s` as a JSON string body (no quotes) when out != NULL; returns its length. Invalid
 * UTF-8 becomes U+FFFD, so any bytes make valid JSON. */
static size_t json_escape(char *out, const char *str, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *s = (const uint8_t *)str;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        uint8_t ch = s[i];
        const char *esc = NULL;
        char u[7];
        if (ch == '"')
            esc = "\\\"";
        else if (ch == '\\')
            esc = "\\\\";
        else if (ch == '\n')
            esc = "\\n";
        else if (ch == '\r')
            esc = "\\r";
        else if (ch == '\t')
            esc = "\\t";
        else if (ch < 0x20) {
            memcpy(u, "\\u00", 4);
            u[4] = hex[ch >> 4];
            u[5] = hex[ch & 15];
            u[6] = '\0';
            esc = u;
        }
        if (esc) {
            size_t el = strlen(esc);
            if (out)
                memcpy(out + o, esc, el);
            o += el;
            i++;
            continue;
        }
        size_t len = utf8_seq_len(s + i, n - i);
        if (len == 0) {
            if (out)
                memcpy(out + o, "\\ufffd", 6);
            o += 6;
            i++;
            continue;
        }
        if (out)
            memcpy(out + o, s + i, len);
        o += len;
        i += len;
    }
    return o;
}

/* RFC 3339 UTC with milliseconds. */
static size_t format_timestamp(int64_t ms, char out[32])
{
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    return (size_t)snprintf(out, 32, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                            (int)(ms % 1000));
}

/* A frame whose payload is `payload_len` bytes: returns the buffer and where to write them. */
static pl_buf *frame_for(size_t payload_len, char **payload)
{
    uint8_t hdr[PL_WS_MAX_HEADER];
    size_t hlen = pl_ws_frame_header(hdr, PL_WS_BINARY, true, false, payload_len);
    pl_buf *b = pl_buf_new(hlen + payload_len);
    if (!b)
        return NULL;
    memcpy(b->data, hdr, hlen);
    *payload = b->data + hlen;
    return b;
}

static pl_buf *encode_json(const pl_msg *m)
{
    char ts[32];
    const char *id = m->id;
    int id_len = m->id_len;
    size_t ts_len = format_timestamp(m->published_ms, ts);
    /* Topic and event names are validated to need no escaping. */
    size_t n =
        strlen("{\"topic\":\"\",\"event\":\"\",\"data\":\"\",\"id\":\"\",\"timestamp\":\"\"}") +
        m->topic_len + m->event_len + json_escape(NULL, m->data, m->data_len) + (size_t)id_len +
        ts_len;
    bool targeted = m->target != PL_TO_TOPIC;
    if (targeted)
        n -= strlen("\"topic\":\"\",\"id\":\"\",") + m->topic_len + (size_t)id_len;
    char *o;
    pl_buf *b = frame_for(n, &o);
    if (!b)
        return NULL;
    if (targeted)
        o += sprintf(o, "{\"event\":\"%s\",\"data\":\"", m->event);
    else
        o += sprintf(o, "{\"topic\":\"%s\",\"event\":\"%s\",\"data\":\"", m->topic, m->event);
    o += json_escape(o, m->data, m->data_len);
    if (targeted)
        o += sprintf(o, "\",\"timestamp\":\"%s\"", ts);
    else
        o += sprintf(o, "\",\"id\":\"%s\",\"timestamp\":\"%s\"", id, ts);
    *o = '}';
    return b;
}

static void pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static pl_buf *encode_msgpack(const pl_msg *m)
{
    char ts[32];
    const char *id = m->id;
    int id_len = m->id_len;
    size_t ts_len = format_timestamp(m->published_ms, ts);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    bool targeted = m->target != PL_TO_TOPIC;
    msgpack_pack_map(&pk, targeted ? 3 : 5);
    if (!targeted) {
        pack_str(&pk, "topic", 5);
        pack_str(&pk, m->topic, m->topic_len);
    }
    pack_str(&pk, "event", 5);
    pack_str(&pk, m->event, m->event_len);
    pack_str(&pk, "data", 4);
    /* Text stays text; other bytes travel as MessagePack bin, unchanged. */
    if (pl_utf8_valid((const uint8_t *)m->data, m->data_len)) {
        pack_str(&pk, m->data, m->data_len);
    } else {
        msgpack_pack_bin(&pk, m->data_len);
        msgpack_pack_bin_body(&pk, m->data, m->data_len);
    }
    if (!targeted) {
        pack_str(&pk, "id", 2);
        pack_str(&pk, id, (size_t)id_len);
    }
    pack_str(&pk, "timestamp", 9);
    pack_str(&pk, ts, ts_len);
    char *o;
    pl_buf *b = sb.data ? frame_for(sb.size, &o) : NULL;
    if (b)
        memcpy(o, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    return b;
}

/* The compressed form of an encoded WebSocket frame; small payloads stay uncompressed (RSV1 is
 * per message, so both kinds may go to the same connection). */
static pl_buf *compress_frame(pl_buf *plain, pl_deflate *z)
{
    const uint8_t *f = (const uint8_t *)plain->data;
    size_t hlen = (f[1] & 0x7F) == 127 ? 10 : (f[1] & 0x7F) == 126 ? 4 : 2;
    size_t plen = plain->len - hlen;
    pl_buf *b = NULL;
    if (z && plen >= PL_DEFLATE_MIN_BYTES)
        b = pl_deflate_frame(z, f[0] & 0x0F, f + hlen, plen);
    return b ? b : pl_buf_ref(plain);
}

pl_buf *pl_msg_encode(pl_msg *m, int format, pl_deflate *z)
{
    if (m->enc[format])
        return m->enc[format];
    pl_buf *b = NULL;
    if (format == PL_FMT_WS_JSON_Z || format == PL_FMT_WS_MSGPACK_Z) {
        int plain_format = format == PL_FMT_WS_JSON_Z ? PL_FMT_WS_JSON : PL_FMT_WS_MSGPACK;
        pl_buf *plain = pl_msg_encode(m, plain_format, z);
        m->enc[format] = plain ? compress_frame(plain, z) : NULL;
        return m->enc[format];
    }
    if (format == PL_FMT_SSE || format == PL_FMT_SSE_BODY) {
        size_t id_len = format == PL_FMT_SSE ? m->id_len : 0;
        size_t n = pl_sse_size(m->id, id_len, m->event, m->event_len, m->data, m->data_len);
        b = pl_buf_new(n);
        if (b)
            pl_sse_encode(b->data, m->id, id_len, m->event, m->event_len, m->data, m->data_len);
    } else if (format == PL_FMT_WS_JSON) {
        b = encode_json(m);
    } else {
        b = encode_msgpack(m);
    }
    m->enc[format] = b;
    return b;
}
