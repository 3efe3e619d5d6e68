/* WebSocket (RFC 6455) codec. Pure: no I/O, no allocation. The parser is resumable at any byte:
 * it keeps at most a frame header and a control frame's payload; data payloads are unmasked in
 * place in the caller's buffer and handed back as chunks. */
#include "internal.h"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <string.h>

/* ---- UTF-8 validation (incremental) ---------------------------------------------------------
 * State: 0 = at a character boundary; otherwise the number of continuation bytes still expected
 * in the low byte, and the allowed range for the next one in the upper bytes. */
#define UTF8_BAD 0xFFFFFFFFu

static uint32_t utf8_state(uint32_t need, uint8_t lo, uint8_t hi)
{
    return need | (uint32_t)lo << 8 | (uint32_t)hi << 16;
}

uint32_t pl_utf8_step(uint32_t state, const uint8_t *s, size_t len)
{
    for (size_t i = 0; i < len && state != UTF8_BAD; i++) {
        uint8_t c = s[i];
        if (state == 0) {
            if (c < 0x80)
                continue;
            if (c >= 0xC2 && c <= 0xDF)
                state = utf8_state(1, 0x80, 0xBF);
            else if (c == 0xE0)
                state = utf8_state(2, 0xA0, 0xBF);
            else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
                state = utf8_state(2, 0x80, 0xBF);
            else if (c == 0xED) /* no UTF-16 surrogates */
                state = utf8_state(2, 0x80, 0x9F);
            else if (c == 0xF0)
                state = utf8_state(3, 0x90, 0xBF);
            else if (c >= 0xF1 && c <= 0xF3)
                state = utf8_state(3, 0x80, 0xBF);
            else if (c == 0xF4)
                state = utf8_state(3, 0x80, 0x8F);
            else
                state = UTF8_BAD;
            continue;
        }
        uint8_t lo = (uint8_t)(state >> 8), hi = (uint8_t)(state >> 16);
        if (c < lo || c > hi) {
            state = UTF8_BAD;
            continue;
        }
        uint32_t need = (state & 0xFF) - 1;
        state = need ? utf8_state(need, 0x80, 0xBF) : 0;
    }
    return state;
}

bool pl_utf8_valid(const uint8_t *s, size_t len) { return pl_utf8_step(0, s, len) == 0; }

/* ---- Handshake helpers ---------------------------------------------------------------------- */

bool pl_ws_key_valid(const char *key, size_t len)
{
    /* 16 bytes in base64: 22 alphabet characters and "==" (EVP_DecodeBlock alone would take '='
     * anywhere as a zero digit). */
    if (len != 24 || key[22] != '=' || key[23] != '=')
        return false;
    for (size_t i = 0; i < 22; i++) {
        unsigned char ch = (unsigned char)key[i];
        bool b64 = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                   (ch >= '0' && ch <= '9') || ch == '+' || ch == '/';
        if (!b64)
            return false;
    }
    return true;
}

void pl_ws_accept_key(const char *key, size_t len, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char digest[SHA_DIGEST_LENGTH], input[64 + sizeof(guid)];
    if (len > 64) /* callers pass a validated 24-byte key */
        len = 64;
    memcpy(input, key, len);
    memcpy(input + len, guid, sizeof(guid) - 1);
    SHA1(input, len + sizeof(guid) - 1, digest);
    EVP_EncodeBlock((unsigned char *)out, digest, SHA_DIGEST_LENGTH);
}

/* ---- Frames --------------------------------------------------------------------------------- */

size_t pl_ws_frame_header(uint8_t out[PL_WS_MAX_HEADER], uint8_t opcode, bool fin, bool rsv1,
                          uint64_t len)
{
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | (opcode & 0x0F));
    if (len < 126) {
        out[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        return 4;
    }
    out[1] = 127;
    for (int i = 0; i < 8; i++)
        out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    return 10;
}

bool pl_ws_close_code_valid(unsigned code)
{
    if (code >= 3000 && code <= 4999)
        return true;
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014);
}

void pl_ws_parser_init(pl_ws_parser *ps, uint64_t max_message, bool allow_rsv1)
{
    memset(ps, 0, sizeof(*ps));
    ps->max_message = max_message;
    ps->allow_rsv1 = allow_rsv1;
}

static int fail(pl_ws_event *ev, uint16_t code)
{
    ev->close_code = code;
    return PL_WS_ERROR;
}

/* Bytes of header still missing, from what is buffered so far. */
static size_t header_need(const pl_ws_parser *ps)
{
    if (ps->hdr_len < 2)
        return 2 - ps->hdr_len;
    size_t n = 2 + 4; /* every client frame is masked */
    uint8_t len7 = ps->hdr[1] & 0x7F;
    n += len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
    return n > ps->hdr_len ? n - ps->hdr_len : 0;
}

/* The first two header bytes decide most errors: fail on them at once rather than waiting for
 * a mask or length that may never come. */
static int check_start(const pl_ws_parser *ps, pl_ws_event *ev)
{
    uint8_t b0 = ps->hdr[0], b1 = ps->hdr[1];
    bool fin = b0 & 0x80, rsv1 = b0 & 0x40;
    uint8_t opcode = b0 & 0x0F;
    if (b0 & 0x30)
        return fail(ev, 1002); /* RSV2/RSV3: no extension defines them */
    if (!(b1 & 0x80))
        return fail(ev, 1002); /* client frames must be masked */
    if (opcode & 0x08) {
        if (opcode != PL_WS_CLOSE && opcode != PL_WS_PING && opcode != PL_WS_PONG)
            return fail(ev, 1002);
        if (!fin || (b1 & 0x7F) > 125 || rsv1)
            return fail(ev, 1002);
    } else if (opcode == PL_WS_CONT) {
        if (!ps->msg_opcode || rsv1)
            return fail(ev, 1002);
    } else if (opcode == PL_WS_TEXT || opcode == PL_WS_BINARY) {
        if (ps->msg_opcode)
            return fail(ev, 1002); /* a new message inside a fragmented one */
        if (rsv1 && !ps->allow_rsv1)
            return fail(ev, 1002);
    } else {
        return fail(ev, 1002);
    }
    return PL_WS_NEED_MORE;
}

/* A complete header is buffered (check_start passed): start the frame. */
static int start_frame(pl_ws_parser *ps, pl_ws_event *ev)
{
    uint8_t b0 = ps->hdr[0], b1 = ps->hdr[1];
    bool fin = b0 & 0x80, rsv1 = b0 & 0x40;
    uint8_t opcode = b0 & 0x0F;
    uint64_t len = b1 & 0x7F;
    const uint8_t *p = ps->hdr + 2;
    if (len == 126) {
        len = (uint64_t)p[0] << 8 | p[1];
        p += 2;
    } else if (len == 127) {
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | p[i];
        if (len >> 63)
            return fail(ev, 1002);
        p += 8;
    }
    memcpy(ps->mask, p, 4);
    bool control = opcode & 0x08;
    if (opcode == PL_WS_TEXT || opcode == PL_WS_BINARY) {
        ps->msg_opcode = opcode;
        ps->msg_compressed = rsv1;
        ps->msg_len = 0;
        ps->utf8 = 0;
    }
    if (!control) {
        if (len > ps->max_message || ps->msg_len + len > ps->max_message)
            return fail(ev, 1009);
        ps->msg_len += len;
    }
    ps->opcode = opcode;
    ps->fin = fin;
    ps->remaining = len;
    ps->offset = 0;
    ps->ctl_len = 0;
    ps->in_payload = true;
    return PL_WS_NEED_MORE;
}

static void unmask(pl_ws_parser *ps, uint8_t *data, size_t n)
{
    for (size_t i = 0; i < n; i++)
        data[i] ^= ps->mask[(ps->offset + i) & 3];
    ps->offset += n;
}

static int finish_control(pl_ws_parser *ps, pl_ws_event *ev)
{
    ev->opcode = ps->opcode;
    ev->data = ps->ctl;
    ev->len = ps->ctl_len;
    ev->message_end = true;
    if (ps->opcode == PL_WS_CLOSE && ps->ctl_len > 0) {
        if (ps->ctl_len == 1)
            return fail(ev, 1002);
        unsigned code = (unsigned)ps->ctl[0] << 8 | ps->ctl[1];
        if (!pl_ws_close_code_valid(code))
            return fail(ev, 1002);
        if (!pl_utf8_valid(ps->ctl + 2, ps->ctl_len - 2u))
            return fail(ev, 1007);
    }
    return PL_WS_CONTROL;
}

int pl_ws_parse(pl_ws_parser *ps, uint8_t *data, size_t len, size_t *consumed, pl_ws_event *ev)
{
    size_t used = 0;
    memset(ev, 0, sizeof(*ev));
    for (;;) {
        if (!ps->in_payload) {
            size_t need = header_need(ps);
            while (need > 0 && used < len) {
                ps->hdr[ps->hdr_len++] = data[used++];
                if (ps->hdr_len == 2 && check_start(ps, ev) == PL_WS_ERROR) {
                    ps->hdr_len = 0;
                    *consumed = used;
                    return PL_WS_ERROR;
                }
                need = header_need(ps);
            }
            if (need > 0) {
                *consumed = used;
                return PL_WS_NEED_MORE;
            }
            int rc = start_frame(ps, ev);
            ps->hdr_len = 0;
            if (rc == PL_WS_ERROR) {
                *consumed = used;
                return rc;
            }
        }
        size_t n = len - used < ps->remaining ? len - used : (size_t)ps->remaining;
        uint8_t *chunk = data + used;
        unmask(ps, chunk, n);
        used += n;
        ps->remaining -= n;
        bool frame_done = ps->remaining == 0;
        if (ps->opcode & 0x08) {
            memcpy(ps->ctl + ps->ctl_len, chunk, n);
            ps->ctl_len = (uint8_t)(ps->ctl_len + n);
            if (!frame_done) {
                *consumed = used;
                return PL_WS_NEED_MORE;
            }
            ps->in_payload = false;
            *consumed = used;
            return finish_control(ps, ev);
        }
        if (frame_done)
            ps->in_payload = false;
        bool message_done = frame_done && ps->fin;
        if (ps->msg_opcode == PL_WS_TEXT && !ps->msg_compressed) {
            ps->utf8 = pl_utf8_step(ps->utf8, chunk, n);
            if (ps->utf8 == UTF8_BAD || (message_done && ps->utf8 != 0)) {
                *consumed = used;
                return fail(ev, 1007);
            }
        }
        if (n == 0 && !message_done) {
            if (used == len || !frame_done) {
                *consumed = used;
                return PL_WS_NEED_MORE;
            }
            continue; /* an empty non-final fragment: nothing to report */
        }
        ev->opcode = ps->msg_opcode;
        ev->compressed = ps->msg_compressed;
        ev->data = chunk;
        ev->len = n;
        ev->message_end = message_done;
        if (message_done)
            ps->msg_opcode = 0;
        *consumed = used;
        return PL_WS_DATA;
    }
}
