/* permessage-deflate (RFC 7692) with zlib. Both directions are negotiated without context
 * takeover: every message is compressed on its own, so a message is compressed once for all
 * its subscribers, and no connection keeps a compression window (32 KiB each otherwise). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <zlib.h>

struct pl_deflate {
    z_stream def, inf;
    bool def_ok, inf_ok;
};

pl_deflate *pl_deflate_new(void)
{
    pl_deflate *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    /* Raw deflate (negative window bits): the extension carries no zlib header. */
    d->def_ok = deflateInit2(&d->def, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) == Z_OK;
    d->inf_ok = inflateInit2(&d->inf, -15) == Z_OK;
    if (!d->def_ok || !d->inf_ok) {
        pl_deflate_free(d);
        return NULL;
    }
    return d;
}

void pl_deflate_free(pl_deflate *d)
{
    if (!d)
        return;
    if (d->def_ok)
        deflateEnd(&d->def);
    if (d->inf_ok)
        inflateEnd(&d->inf);
    free(d);
}

pl_buf *pl_deflate_frame(pl_deflate *d, uint8_t opcode, const uint8_t *data, size_t len)
{
    size_t cap = deflateBound(&d->def, len) + 16;
    uint8_t *tmp = malloc(cap);
    if (!tmp)
        return NULL;
    deflateReset(&d->def);
    d->def.next_in = (Bytef *)(uintptr_t)data;
    d->def.avail_in = (uInt)len;
    d->def.next_out = tmp;
    d->def.avail_out = (uInt)cap;
    int rc = deflate(&d->def, Z_SYNC_FLUSH);
    size_t n = cap - d->def.avail_out;
    if (rc != Z_OK || d->def.avail_in != 0 || n < 4) {
        free(tmp);
        return NULL;
    }
    n -= 4; /* the sync flush's 00 00 ff ff tail is implied by the extension (RFC 7692 7.2.1) */
    uint8_t hdr[PL_WS_MAX_HEADER];
    size_t hlen = pl_ws_frame_header(hdr, opcode, true, true, n);
    pl_buf *b = pl_buf_new(hlen + n);
    if (b) {
        memcpy(b->data, hdr, hlen);
        memcpy(b->data + hlen, tmp, n);
    }
    free(tmp);
    return b;
}

int pl_inflate_message(pl_deflate *d, const uint8_t *data, size_t len, size_t max, uint8_t **out,
                       size_t *out_len)
{
    static const uint8_t tail[4] = {0x00, 0x00, 0xff, 0xff};
    size_t cap = len * 4 + 64;
    if (cap > max + 1)
        cap = max + 1;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return 1011;
    inflateReset(&d->inf);
    size_t n = 0;
    int status = 0;
    bool ended = false; /* a final deflate block was seen: the rest is ignored */
    /* Feed the message, then the implied tail; stop as soon as the output passes `max`, so a
     * small bomb never costs more than max + 1 bytes. */
    for (int part = 0; part < 2 && !status && !ended; part++) {
        d->inf.next_in = (Bytef *)(uintptr_t)(part == 0 ? data : tail);
        d->inf.avail_in = (uInt)(part == 0 ? len : sizeof(tail));
        while (d->inf.avail_in > 0 && !status && !ended) {
            if (n == cap) {
                size_t ncap = cap * 2 > max + 1 ? max + 1 : cap * 2;
                uint8_t *nb = ncap > cap ? realloc(buf, ncap) : NULL;
                if (!nb) {
                    status = ncap > cap ? 1011 : 1009;
                    break;
                }
                buf = nb;
                cap = ncap;
            }
            d->inf.next_out = buf + n;
            d->inf.avail_out = (uInt)(cap - n);
            int rc = inflate(&d->inf, Z_SYNC_FLUSH);
            n = cap - d->inf.avail_out;
            if (n > max)
                status = 1009;
            else if (rc == Z_STREAM_END)
                ended = true;
            else if (rc == Z_BUF_ERROR && d->inf.avail_out > 0)
                break; /* no progress with input left: nothing more can come out */
            else if (rc != Z_OK && rc != Z_BUF_ERROR)
                status = 1007;
        }
    }
    if (status) {
        free(buf);
        return status;
    }
    *out = buf;
    *out_len = n;
    return 0;
}
