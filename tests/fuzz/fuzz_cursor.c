/* libFuzzer target: resume cursors and message IDs (Last-Event-ID, ?last_event_id=, "since")
 * and history rules. Whatever parses must format back to text that parses to the same
 * positions; nothing may read outside the input. */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *copy = malloc(size ? size : 1); /* its own allocation: over-reads are caught */
    memcpy(copy, data, size);
    pl_position pos[PL_CURSOR_MAX_POSITIONS], again[PL_CURSOR_MAX_POSITIONS];
    int32_t check, check2;
    int n = pl_cursor_parse(copy, size, pos, PL_CURSOR_MAX_POSITIONS, &check);
    assert(n == -1 || (n >= 1 && n <= PL_CURSOR_MAX_POSITIONS));
    if (n > 0) {
        assert(check == PL_CURSOR_NO_CHECK || (check >= 0 && check < 36 * 36 * 36 * 36));
        char text[PL_CURSOR_MAX_POSITIONS * 36 + 8];
        size_t len = pl_cursor_format(text, sizeof(text), pos, (size_t)n, check);
        assert(len > 0 && strlen(text) == len);
        int m = pl_cursor_parse(text, len, again, PL_CURSOR_MAX_POSITIONS, &check2);
        assert(m == n && check2 == check);
        for (int i = 0; i < n; i++)
            assert(again[i].epoch == pos[i].epoch && again[i].seq == pos[i].seq);
    }
    /* History rules take a NUL-terminated string. */
    char *spec = malloc(size + 1);
    memcpy(spec, data, size);
    spec[size] = '\0';
    pl_history_rule *rules;
    int r = pl_history_rules_parse(spec, &rules);
    assert(r >= -1);
    for (int i = 0; i < r; i++)
        assert(rules[i].len <= 128 && strlen(rules[i].pattern) == rules[i].len);
    if (r > 0)
        pl_history_rules_free(rules, r);
    free(spec);
    free(copy);
    return 0;
}
