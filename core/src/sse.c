/* Server-Sent Events framing. Pure functions: the transport side lives in conn.c/router.c.
 *
 * Every line terminator the EventSource parser knows (\r\n, \n, a lone \r) starts a new `data:`
 * line, so no data can end an event early or forge a field. */
#include "internal.h"

#include <string.h>

bool pl_event_name_valid(const char *name, size_t len)
{
    return pl_name_valid(name, len, 64, "-_.:");
}

/* Lines in `data` and the bytes they hold without their terminators. */
static size_t count_lines(const char *data, size_t len, size_t *line_bytes)
{
    size_t lines = 1, bytes = 0;
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '\r') {
            lines++;
            if (i + 1 < len && data[i + 1] == '\n')
                i++;
        } else if (data[i] == '\n') {
            lines++;
        } else {
            bytes++;
        }
    }
    *line_bytes = bytes;
    return lines;
}

size_t pl_sse_size(const char *id, size_t id_len, const char *event, size_t event_len,
                   const char *data, size_t data_len)
{
    (void)id;
    (void)event;
    size_t line_bytes;
    size_t lines = count_lines(data, data_len, &line_bytes);
    return (id_len ? 4 + id_len + 1 : 0) + 7 + event_len + 1 + lines * 7 + line_bytes + 1;
}

static char *put(char *out, const char *s, size_t n)
{
    memcpy(out, s, n);
    return out + n;
}

size_t pl_sse_encode(char *out, const char *id, size_t id_len, const char *event, size_t event_len,
                     const char *data, size_t data_len)
{
    char *o = out;
    if (id_len) {
        o = put(o, "id: ", 4);
        o = put(o, id, id_len);
        *o++ = '\n';
    }
    o = put(o, "event: ", 7);
    o = put(o, event, event_len);
    *o++ = '\n';
    size_t start = 0;
    for (size_t i = 0; i <= data_len; i++) {
        bool end = i == data_len;
        if (!end && data[i] != '\r' && data[i] != '\n')
            continue;
        o = put(o, "data: ", 6);
        o = put(o, data + start, i - start);
        *o++ = '\n';
        if (!end && data[i] == '\r' && i + 1 < data_len && data[i + 1] == '\n')
            i++;
        start = i + 1;
    }
    *o++ = '\n';
    return (size_t)(o - out);
}
