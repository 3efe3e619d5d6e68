/* libFuzzer target: the WebSocket frame parser (ws_frame.c) reading a client's byte stream. The
 * first input byte picks the feed size (bits 0-4: 1..32 bytes), whether permessage-deflate may set
 * RSV1 (bit 5) and the message size limit (bit 6: 200 bytes, else 64 KiB); the rest is fed in
 * pieces, each copied to its own allocation so ASan sees any read past what was fed. The oracle is
 * the calling contract, the frame rules, and that parsing the same bytes in one piece observes
 * the same messages, control frames and error. */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SMALL 200
#define MAX_LARGE 65536

/* What a caller observes: complete messages and control frames in order, then the error. */
typedef struct outcome {
    uint64_t hash;
    size_t events;
    unsigned error; /* the ERROR's close code, 0 when none */
} outcome;

static void mix(uint64_t *h, const void *p, size_t n)
{
    const uint8_t *s = p;
    for (size_t i = 0; i < n; i++)
        *h = (*h ^ s[i]) * 1099511628211ull;
}

/* An independent UTF-8 check (code point arithmetic, not a state table). */
static bool ref_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k + 1;
    }
    return true;
}

static uint8_t msg[MAX_LARGE];

static outcome parse(const uint8_t *data, size_t size, size_t chunk, uint64_t max, bool rsv1)
{
    pl_ws_parser ps;
    pl_ws_parser_init(&ps, max, rsv1);
    outcome out = {.hash = 14695981039346656037ull};
    size_t msg_len = 0;
    bool open = false, compressed = false;
    uint8_t opcode = 0;
    for (size_t off = 0; off < size && !out.error;) {
        size_t n = size - off < chunk ? size - off : chunk;
        uint8_t *piece = malloc(n);
        if (!piece)
            abort();
        memcpy(piece, data + off, n);
        for (size_t done = 0; done < n && !out.error;) {
            size_t used = (size_t)-1;
            pl_ws_event ev;
            int rc = pl_ws_parse(&ps, piece + done, n - done, &used, &ev);
            assert(used <= n - done);
            if (rc == PL_WS_NEED_MORE) {
                assert(used == n - done);
                break;
            }
            assert(used > 0);
            uint8_t tag = (uint8_t)rc;
            if (rc == PL_WS_DATA) {
                assert(ev.data >= piece + done && ev.data + ev.len <= piece + done + used);
                assert(ev.opcode == PL_WS_TEXT || ev.opcode == PL_WS_BINARY);
                assert(!ev.compressed || rsv1);
                if (!open) {
                    open = true;
                    opcode = ev.opcode;
                    compressed = ev.compressed;
                    msg_len = 0;
                }
                assert(ev.opcode == opcode && ev.compressed == compressed);
                assert(msg_len + ev.len <= max);
                memcpy(msg + msg_len, ev.data, ev.len);
                msg_len += ev.len;
                bool checked = opcode == PL_WS_TEXT && !compressed;
                if (checked) /* a prefix that can no longer become valid must have failed */
                    assert(pl_utf8_step(0, msg, msg_len) != ~0u);
                if (ev.message_end) {
                    if (checked) {
                        assert(pl_utf8_valid(msg, msg_len));
                        assert(ref_utf8_valid(msg, msg_len));
                    }
                    mix(&out.hash, &tag, 1);
                    mix(&out.hash, &opcode, 1);
                    mix(&out.hash, &compressed, 1);
                    mix(&out.hash, &msg_len, sizeof(msg_len));
                    mix(&out.hash, msg, msg_len);
                    out.events++;
                    open = false;
                }
            } else if (rc == PL_WS_CONTROL) {
                assert(ev.opcode == PL_WS_CLOSE || ev.opcode == PL_WS_PING ||
                       ev.opcode == PL_WS_PONG);
                assert(ev.len <= 125);
                if (ev.opcode == PL_WS_CLOSE && ev.len > 0) {
                    assert(ev.len >= 2);
                    assert(pl_ws_close_code_valid((unsigned)ev.data[0] << 8 | ev.data[1]));
                    assert(ref_utf8_valid(ev.data + 2, ev.len - 2));
                }
                mix(&out.hash, &tag, 1);
                mix(&out.hash, &ev.opcode, 1);
                mix(&out.hash, &ev.len, sizeof(ev.len));
                mix(&out.hash, &open, 1); /* whether it came inside a message */
                mix(&out.hash, ev.data, ev.len);
                out.events++;
            } else {
                assert(rc == PL_WS_ERROR);
                assert(ev.close_code == 1002 || ev.close_code == 1007 || ev.close_code == 1009);
                out.error = ev.close_code;
            }
            done += used;
        }
        free(piece);
        off += n;
    }
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t chunk = (size_t)(data[0] % 32) + 1;
    bool rsv1 = data[0] & 0x20;
    uint64_t max = (data[0] & 0x40) ? MAX_SMALL : MAX_LARGE;
    data++, size--;
    assert(pl_utf8_valid(data, size) == ref_utf8_valid(data, size));
    outcome pieces = parse(data, size, chunk, max, rsv1);
    outcome whole = parse(data, size, size ? size : 1, max, rsv1);
    assert(pieces.hash == whole.hash && pieces.events == whole.events);
    assert(pieces.error == whole.error);
    return 0;
}
