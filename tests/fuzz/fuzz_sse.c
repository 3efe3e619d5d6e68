/* libFuzzer target: SSE framing. Whatever the data and event name, the encoding must be exactly
 * pl_sse_size() bytes and an EventSource parser must see exactly one event carrying the data
 * (line breaks normalised to \n) — nothing a publisher sends may forge a field or an event. */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

/* Minimal WHATWG-style parse of one encoded event; returns the number of dispatched events. */
static int parse_events(const char *s, size_t n, char *data_out, size_t *data_len, int *ids)
{
    int events = 0;
    size_t dl = 0;
    bool has_data = false;
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        while (i < n && s[i] != '\n' && s[i] != '\r')
            i++;
        size_t len = i - start;
        if (i < n && s[i] == '\r' && i + 1 < n && s[i + 1] == '\n')
            i++;
        i++;
        const char *line = s + start;
        if (len == 0) {
            if (has_data)
                events++;
            has_data = false;
            continue;
        }
        if (len >= 6 && memcmp(line, "data: ", 6) == 0) {
            if (has_data)
                data_out[dl++] = '\n';
            memcpy(data_out + dl, line + 6, len - 6);
            dl += len - 6;
            has_data = true;
        } else if (len >= 4 && memcmp(line, "id: ", 4) == 0) {
            (*ids)++;
        } else {
            assert(len >= 7 && memcmp(line, "event: ", 7) == 0);
        }
    }
    *data_len = dl;
    return events;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *d = (const char *)data;
    size_t need = pl_sse_size("7", 1, "message", 7, d, size);
    char *out = malloc(need);
    size_t wrote = pl_sse_encode(out, "7", 1, "message", 7, d, size);
    assert(wrote == need);
    char *got = malloc(size + 1);
    size_t got_len = 0;
    int ids = 0;
    assert(parse_events(out, wrote, got, &got_len, &ids) == 1);
    assert(ids == 1);
    /* Expected: the data with CRLF / CR turned into LF. */
    size_t k = 0;
    for (size_t i = 0; i < size; i++) {
        char c = d[i];
        if (c == '\r') {
            if (i + 1 < size && d[i + 1] == '\n')
                i++;
            c = '\n';
        }
        assert(k < got_len && got[k] == c);
        k++;
    }
    assert(k == got_len);
    free(got);
    free(out);
    return 0;
}
