/* Message IDs and resume cursors as text, and history rules. Pure functions (fuzzed on their
 * own); the grammar is in docs/ARCHITECTURE.md:
 *
 *   cursor   = position *( "." position ) [ "~" check ]
 *   position = [ epoch "-" ] seq     epoch: base 36, seq: decimal; no epoch = the previous one's */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define CHECK_MOD (36u * 36u * 36u * 36u) /* four base-36 digits */

static const char digits36[] = "0123456789abcdefghijklmnopqrstuvwxyz";

static size_t format_base(char *out, uint64_t v, unsigned base)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = digits36[v % base];
        v /= base;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

size_t pl_position_format(char out[PL_ID_MAX], pl_position pos)
{
    size_t n = format_base(out, pos.epoch, 36);
    out[n++] = '-';
    n += format_base(out + n, pos.seq, 10);
    out[n] = '\0';
    return n;
}

static int digit_value(char ch, unsigned base)
{
    int v = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'z' ? ch - 'a' + 10 : 99;
    return v < (int)base ? v : -1;
}

/* Digits of `base` from s[*i] up to a character not a digit; -1 when none or on overflow. */
static int parse_number(const char *s, size_t len, size_t *i, unsigned base, uint64_t *out)
{
    uint64_t v = 0;
    size_t start = *i;
    int d;
    for (; *i < len && (d = digit_value(s[*i], base)) >= 0; (*i)++) {
        if (v > (UINT64_MAX - (uint64_t)d) / base)
            return -1;
        v = v * base + (uint64_t)d;
    }
    if (*i == start || *i - start > 20)
        return -1;
    *out = v;
    return 0;
}

int pl_cursor_parse(const char *s, size_t len, pl_position *out, size_t max, int32_t *check)
{
    size_t i = 0, n = 0;
    *check = PL_CURSOR_NO_CHECK;
    for (;;) {
        /* The part up to '-' is an epoch when a '-' follows before the next '.' or '~'. */
        size_t j = i;
        while (j < len && s[j] != '-' && s[j] != '.' && s[j] != '~')
            j++;
        uint64_t epoch, seq;
        if (j < len && s[j] == '-') {
            if (parse_number(s, len, &i, 36, &epoch) != 0 || i != j)
                return -1;
            i++;
        } else if (n == 0) {
            return -1; /* the first position names its epoch */
        } else {
            epoch = out[n - 1].epoch;
        }
        if (parse_number(s, len, &i, 10, &seq) != 0 || n == max)
            return -1;
        out[n++] = (pl_position){epoch, seq};
        if (i == len)
            return (int)n;
        if (s[i] == '~') {
            uint64_t c;
            i++;
            if (len - i != 4 || parse_number(s, len, &i, 36, &c) != 0 || i != len)
                return -1;
            *check = (int32_t)c;
            return (int)n;
        }
        if (s[i++] != '.')
            return -1;
    }
}

int32_t pl_cursor_check(const char *const *names, const uint16_t *lens, size_t n)
{
    uint32_t h = 2166136261u; /* FNV-1a over the names, each ended by '\n' */
    for (size_t k = 0; k < n; k++) {
        for (size_t i = 0; i < lens[k]; i++)
            h = (h ^ (unsigned char)names[k][i]) * 16777619u;
        h = (h ^ '\n') * 16777619u;
    }
    return (int32_t)(h % CHECK_MOD);
}

size_t pl_cursor_format(char *out, size_t cap, const pl_position *pos, size_t n, int32_t check)
{
    size_t o = 0;
    char tmp[PL_ID_MAX];
    for (size_t k = 0; k < n; k++) {
        size_t len;
        if (k > 0 && pos[k].epoch == pos[k - 1].epoch)
            len = format_base(tmp, pos[k].seq, 10);
        else
            len = pl_position_format(tmp, pos[k]);
        if (o + len + 2 > cap)
            return 0;
        if (k > 0)
            out[o++] = '.';
        memcpy(out + o, tmp, len);
        o += len;
    }
    if (check != PL_CURSOR_NO_CHECK) {
        if (o + 6 > cap)
            return 0;
        out[o++] = '~';
        for (int d = 3; d >= 0; d--) {
            uint32_t v = (uint32_t)check;
            for (int k = 0; k < d; k++)
                v /= 36;
            out[o++] = digits36[v % 36];
        }
    }
    out[o] = '\0';
    return o;
}

/* ---- History rules: "pattern=count[:age_ms],..." ------------------------------------------- */

void pl_history_rules_free(pl_history_rule *rules, int n)
{
    for (int i = 0; i < n; i++)
        free(rules[i].pattern);
    free(rules);
}

static int parse_rule(const char *s, size_t len, pl_history_rule *r)
{
    const char *eq = memchr(s, '=', len);
    if (!eq || eq == s)
        return -1;
    size_t plen = (size_t)(eq - s);
    r->prefix = s[plen - 1] == '*';
    size_t name_len = plen - r->prefix;
    if (name_len > 0 && !pl_topic_name_valid(s, name_len))
        return -1;
    size_t i = plen + 1;
    uint64_t count, age = 0;
    if (parse_number(s, len, &i, 10, &count) != 0 || count > UINT32_MAX)
        return -1;
    bool has_age = i < len && s[i] == ':';
    if (has_age) {
        i++;
        if (parse_number(s, len, &i, 10, &age) != 0 || age > INT64_MAX)
            return -1;
    }
    if (i != len)
        return -1;
    r->pattern = strndup(s, name_len);
    if (!r->pattern)
        return -1;
    r->len = name_len;
    r->keep_max = (uint32_t)count;
    r->keep_age_ms = has_age ? (int64_t)age : -1; /* -1: the broker's default age */
    return 0;
}

int pl_history_rules_parse(const char *spec, pl_history_rule **out)
{
    *out = NULL;
    if (!spec || !*spec)
        return 0;
    int n = 1;
    for (const char *c = spec; *c; c++)
        n += *c == ',';
    pl_history_rule *rules = calloc((size_t)n, sizeof(*rules));
    if (!rules)
        return -1;
    int count = 0;
    for (const char *s = spec;;) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        if (parse_rule(s, len, &rules[count]) != 0) {
            pl_history_rules_free(rules, count);
            return -1;
        }
        count++;
        if (!end)
            break;
        s = end + 1;
    }
    *out = rules;
    return count;
}
