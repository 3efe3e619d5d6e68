/* Message IDs, resume cursors and history rules as text (cursor.c). */
#include "internal.h"

#include <criterion/criterion.h>
#include <string.h>

static int parse(const char *s, pl_position *pos, int32_t *check)
{
    return pl_cursor_parse(s, strlen(s), pos, PL_CURSOR_MAX_POSITIONS, check);
}

Test(cursor, message_id_round_trip)
{
    char id[PL_ID_MAX];
    size_t n = pl_position_format(id, (pl_position){36 * 36 + 35, 17});
    cr_assert_str_eq(id, "10z-17");
    cr_assert_eq(n, 6);
    n = pl_position_format(id, (pl_position){UINT64_MAX, UINT64_MAX});
    cr_assert_eq(n, strlen("3w5e11264sgsf-18446744073709551615"));
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    int32_t check;
    cr_assert_eq(parse(id, pos, &check), 1);
    cr_assert_eq(pos[0].epoch, UINT64_MAX);
    cr_assert_eq(pos[0].seq, UINT64_MAX);
    cr_assert_eq(check, PL_CURSOR_NO_CHECK);
}

Test(cursor, multi_topic_positions_inherit_the_epoch)
{
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    int32_t check;
    cr_assert_eq(parse("abc-5.7.0~00zz", pos, &check), 3);
    cr_assert_eq(pos[1].epoch, pos[0].epoch);
    cr_assert_eq(pos[2].epoch, pos[0].epoch);
    cr_assert_eq(pos[1].seq, 7);
    cr_assert_eq(pos[2].seq, 0);
    cr_assert_eq(check, 35 * 36 + 35);
    cr_assert_eq(parse("a-1.b-2.3", pos, &check), 3);
    cr_assert_eq(pos[2].epoch, 11); /* b */
    char out[128];
    cr_assert_gt(pl_cursor_format(out, sizeof(out), pos, 3, 42), 0);
    cr_assert_str_eq(out, "a-1.b-2.3~0016");
    cr_assert_eq(pl_cursor_format(out, 8, pos, 3, 42), 0, "too small a buffer is refused");
}

Test(cursor, malformed_input_is_refused)
{
    static const char *bad[] = {
        "",
        "5",
        "-5",
        "a-",
        "a-1.",
        "a-1..2",
        "a-1~zz",
        "a-1~zzzzz",
        "A-1",
        "a-1 ",
        "a-x",
        "a_1",
        "a-1.b-",
        "a-1~",
        "a-18446744073709551616",
        "zzzzzzzzzzzzzz-1",
        "a-1.2.3~zz.z",
        "a-1\n",
    };
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    int32_t check;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(parse(bad[i], pos, &check), -1, "accepted \"%s\"", bad[i]);
    cr_assert_eq(pl_cursor_parse("a-1.2.3", 7, pos, 2, &check), -1, "more positions than room");
}

Test(cursor, check_depends_on_names_and_order)
{
    const char *ab[] = {"a", "b"}, *ba[] = {"b", "a"}, *ab2[] = {"a\nb", ""};
    uint16_t lens[] = {1, 1}, lens2[] = {3, 0};
    int32_t c1 = pl_cursor_check(ab, lens, 2), c2 = pl_cursor_check(ba, lens, 2);
    cr_assert_neq(c1, c2);
    cr_assert_neq(c1, pl_cursor_check(ab2, lens2, 2));
    cr_assert(c1 >= 0 && c1 < 36 * 36 * 36 * 36);
}

Test(cursor, history_rules)
{
    pl_history_rule *r;
    int n = pl_history_rules_parse("chat/*=500:60000,ticker=0,*=10", &r);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(r[0].pattern, "chat/");
    cr_assert(r[0].prefix);
    cr_assert_eq(r[0].keep_max, 500);
    cr_assert_eq(r[0].keep_age_ms, 60000);
    cr_assert_str_eq(r[1].pattern, "ticker");
    cr_assert(!r[1].prefix);
    cr_assert_eq(r[1].keep_age_ms, -1, "no age: the default");
    cr_assert(r[2].prefix && r[2].len == 0, "a lone * matches every topic");
    pl_history_rules_free(r, n);
    cr_assert_eq(pl_history_rules_parse("", &r), 0);
    static const char *bad[] = {
        "chat", "=5", "a=", "a=x", "a=5:", "a=5:x", "a b=5", "a=5,", "a=5;b=6", "a=99999999999"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(pl_history_rules_parse(bad[i], &r), -1, "accepted \"%s\"", bad[i]);
}
