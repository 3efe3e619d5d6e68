/* SSE framing (sse.c) and the name validators. The encoder's output is read back with an
 * EventSource parser that follows the WHATWG rules (testutil.c), so "correct" means "what a
 * browser would dispatch", including for data that tries to end the event early or forge
 * fields. */
#include "internal.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Encode into a buffer of exactly pl_sse_size() bytes (ASan catches any overrun) and check the
 * two agree. The caller frees the result. */
static char *encode(const char *id, const char *event, const char *data, size_t data_len,
                    size_t *out_len)
{
    size_t id_len = id ? strlen(id) : 0, event_len = strlen(event);
    size_t want = pl_sse_size(id, id_len, event, event_len, data, data_len);
    char *out = malloc(want ? want : 1);
    cr_assert_not_null(out);
    size_t got = pl_sse_encode(out, id, id_len, event, event_len, data, data_len);
    cr_assert_eq(got, want, "pl_sse_encode wrote %zu bytes, pl_sse_size said %zu", got, want);
    *out_len = got;
    return out;
}

/* What EventSource makes of `data`: every CRLF, LF or lone CR is one line break, shown as LF. */
static char *normalize(const char *data, size_t len, size_t *out_len)
{
    char *out = malloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '\r') {
            out[o++] = '\n';
            if (i + 1 < len && data[i + 1] == '\n')
                i++;
        } else {
            out[o++] = data[i];
        }
    }
    out[o] = '\0';
    *out_len = o;
    return out;
}

/* Encode, parse back, and require exactly one event with the given fields. */
static void roundtrip(const char *id, const char *event, const char *data, size_t data_len)
{
    size_t wire_len;
    char *wire = encode(id, event, data, data_len, &wire_len);
    cr_assert(wire_len >= 2 && wire[wire_len - 1] == '\n' && wire[wire_len - 2] == '\n',
              "an event must end with a blank line");
    tu_event *evs;
    size_t n = tu_sse_parse_all(wire, wire_len, &evs);
    cr_assert_eq(n, 1, "expected exactly one event, got %zu from:\n%.*s", n, (int)wire_len, wire);
    cr_assert_str_eq(evs[0].id, id ? id : "");
    cr_assert_str_eq(evs[0].event, event);
    size_t want_len;
    char *want = normalize(data, data_len, &want_len);
    cr_assert_eq(evs[0].data_len, want_len, "data length %zu, want %zu", evs[0].data_len, want_len);
    cr_assert(memcmp(evs[0].data, want, want_len) == 0, "data [%s], want [%s]", evs[0].data, want);
    free(want);
    tu_events_free(evs, n);
    free(wire);
}

#define RT(id, ev, s) roundtrip((id), (ev), (s), sizeof(s) - 1)

Test(sse, exact_wire_format)
{
    size_t len;
    char *w = encode("42", "update", "a\nb", 3, &len);
    const char want[] = "id: 42\nevent: update\ndata: a\ndata: b\n\n";
    cr_assert_eq(len, sizeof(want) - 1);
    cr_assert(memcmp(w, want, len) == 0, "[%.*s]", (int)len, w);
    free(w);

    w = encode(NULL, "message", "", 0, &len);
    const char want2[] = "event: message\ndata: \n\n";
    cr_assert_eq(len, sizeof(want2) - 1);
    cr_assert(memcmp(w, want2, len) == 0, "[%.*s]", (int)len, w);
    free(w);
}

Test(sse, single_and_multi_line)
{
    RT("1", "message", "hello");
    RT("2", "message", "line1\nline2\nline3");
    RT("3", "message", "crlf1\r\ncrlf2");
    RT("4", "message", "cr1\rcr2\rcr3");
    RT("5", "message", "mixed\r\n\n\r\r\nend");
    RT("6", "message", "trailing newline\n");
    RT("7", "message", "trailing cr\r");
    RT("8", "message", "trailing crlf\r\n");
    RT("9", "message", "\n\nleading newlines");
    RT("10", "message", " leading space is kept");
    RT("11", "message", "{\"json\": [1, 2, 3]}");
    RT("12", "message", "unicode: \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
    RT(NULL, "message", "no id");
}

Test(sse, empty_data_is_still_one_event)
{
    RT("1", "message", "");
    RT("2", "ping", "\n");
    RT("3", "message", "\r\n");
    RT("4", "message", "\r");
}

Test(sse, data_cannot_forge_fields_or_end_the_event)
{
    RT("7", "message", "x\n\nid: 99\nevent: evil\ndata: forged");
    RT("7", "message", "x\r\rid: 99\revent: evil\r\r");
    RT("7", "message", "x\r\n\r\nretry: 1\r\n: comment\r\n\r\n");
    RT("7", "message", "\n\n\n\n");
    RT("7", "message", "id: 5");
    RT("7", "message", "event: x\ndata: y\n\n");
    RT("7", "message", ":not a comment\n:");
}

Test(sse, data_with_nul_bytes)
{
    const char data[] = {'a', '\0', 'b', '\n', '\0'};
    roundtrip("1", "message", data, sizeof(data));
}

Test(sse, event_names_roundtrip)
{
    RT("1", "a", "x");
    RT("1", "my-event_v1.2:sub", "x");
    RT("18446744073709551615", "message", "max id");
}

Test(sse, size_matches_encode_on_random_inputs)
{
    /* Bytes chosen to hit every branch: line breaks in all their forms, field-like text. */
    static const char alphabet[] = {'a', 'Z', ' ', ':', '\r', '\n', '\0', '\xff', 'd', 'i'};
    unsigned seed = 12345;
    char data[96];
    for (int iter = 0; iter < 20000; iter++) {
        seed = seed * 1103515245u + 12345u;
        size_t len = (seed >> 16) % sizeof(data);
        for (size_t i = 0; i < len; i++) {
            seed = seed * 1103515245u + 12345u;
            data[i] = alphabet[(seed >> 16) % sizeof(alphabet)];
        }
        char id[24];
        snprintf(id, sizeof(id), "%d", iter);
        /* Every 3rd without an ID, every 5th with another event name. */
        roundtrip(iter % 3 ? id : NULL, iter % 5 ? "message" : "ev", data, len);
    }
}

/* ---- Name validators ------------------------------------------------------------------------ */

typedef struct name_case {
    const char *name;
    size_t len; /* 0: strlen */
    bool ok;
} name_case;

static void check_names(bool (*valid)(const char *, size_t), const name_case *cases, size_t n,
                        const char *what)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].name);
        cr_assert_eq(valid(cases[i].name, len), cases[i].ok, "%s [%.*s] (len %zu): want %s", what,
                     (int)len, cases[i].name, len, cases[i].ok ? "valid" : "invalid");
    }
}

static char *repeat(char ch, size_t n)
{
    char *s = malloc(n + 1);
    memset(s, ch, n);
    s[n] = '\0';
    return s;
}

Test(names, event_names)
{
    char *max = repeat('e', 64), *over = repeat('e', 65);
    /* clang-format off */
    name_case cases[] = {
        {"message", 0, true},
        {"a", 0, true},
        {"Update-1_x.y:z", 0, true},
        {max, 0, true},
        {over, 0, false},
        {"", 0, false},
        {"a b", 0, false},
        {"a\r", 0, false},
        {"a\n", 0, false},
        {"a\0b", 3, false},
        {"\xc3\xa9", 0, false},
        {"a,b", 0, false},
        {"a/b", 0, false},
        {"a\tb", 0, false},
        {"\x7f", 0, false},
    };
    /* clang-format on */
    check_names(pl_event_name_valid, cases, sizeof(cases) / sizeof(cases[0]), "event");
    cr_assert_not(pl_event_name_valid("x", 0), "length 0 is invalid whatever the bytes");
    free(max);
    free(over);
}

Test(names, topic_names)
{
    char *max = repeat('t', 128), *over = repeat('t', 129);
    /* clang-format off */
    name_case cases[] = {
        {"default", 0, true},
        {"a", 0, true},
        {"chat/room-1", 0, true},
        {"user@example.com", 0, true},
        {"a-b_c.d:e/f@g~h!i+j=k", 0, true},
        {max, 0, true},
        {over, 0, false},
        {"", 0, false},
        {"a b", 0, false},
        {"a\r", 0, false},
        {"a\n", 0, false},
        {"a\0b", 3, false},
        {"\0", 1, false},
        {"\xc3\xa9t\xc3\xa9", 0, false},
        {"a?b", 0, false},
        {"a&b", 0, false},
        {"a#b", 0, false},
        {"a%20b", 0, false},
        {"a,b", 0, false},
        {"a\tb", 0, false},
        {"\"q\"", 0, false},
    };
    /* clang-format on */
    check_names(pl_topic_name_valid, cases, sizeof(cases) / sizeof(cases[0]), "topic");
    free(max);
    free(over);
}
