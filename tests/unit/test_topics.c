/* Topic registry (topics.c). After every operation the two-sided index must hold: each
 * subscription is recorded on the subscriber and on the topic, each side pointing at the other's
 * entry. The table itself must keep every live topic reachable by probing, through growth and
 * backward-shift deletions, which a random run is checked against a plain reference model. */
#include "internal.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Invariants ---------------------------------------------------------------------------- */

static void check_subscriber(const pl_subscriber *s)
{
    cr_assert_leq(s->nsubs, s->cap);
    for (uint32_t k = 0; k < s->nsubs; k++) {
        const pl_topic *tp = s->subs[k].topic;
        uint32_t idx = s->subs[k].index;
        cr_assert_not_null(tp);
        cr_assert_lt(idx, tp->nsubs, "subscriber entry %u points past its topic's array", k);
        cr_assert_eq(tp->subs[idx].sub, s, "topic entry does not point back to the subscriber");
        cr_assert_eq(tp->subs[idx].slot, k, "topic entry has slot %u, want %u", tp->subs[idx].slot,
                     k);
        for (uint32_t j = 0; j < k; j++)
            cr_assert_neq(s->subs[j].topic, tp, "subscribed twice to one topic");
    }
}

/* Every slot's topic is found by probing from its home, nothing is empty, the counts add up. */
static void check_table(const pl_topics *t)
{
    uint32_t live = 0;
    uint64_t subs = 0;
    for (uint32_t i = 0; i < t->cap; i++) {
        const pl_topic *tp = t->slots[i];
        if (!tp)
            continue;
        live++;
        cr_assert_gt(tp->nsubs, 0, "topic %.*s kept with no subscriber", tp->name_len, tp->name);
        cr_assert_leq(tp->nsubs, tp->cap);
        cr_assert_eq(pl_topics_find(t, tp->name, tp->name_len), tp,
                     "topic %.*s in slot %u is not reachable by probing", tp->name_len, tp->name,
                     i);
        for (uint32_t j = 0; j < tp->nsubs; j++) {
            const pl_subscriber *s = tp->subs[j].sub;
            uint32_t slot = tp->subs[j].slot;
            cr_assert_lt(slot, s->nsubs);
            cr_assert_eq(s->subs[slot].topic, tp);
            cr_assert_eq(s->subs[slot].index, j);
        }
        subs += tp->nsubs;
    }
    cr_assert_eq(live, t->count, "%u topics in slots, count says %u", live, t->count);
    cr_assert_eq(subs, t->subscriptions);
    if (t->cap)
        cr_assert_leq((uint64_t)t->count * 4, (uint64_t)t->cap * 3, "load factor over 3/4");
}

static void check_all(const pl_topics *t, const pl_subscriber *subs, size_t nsubs)
{
    check_table(t);
    uint64_t total = 0;
    for (size_t i = 0; i < nsubs; i++) {
        check_subscriber(&subs[i]);
        total += subs[i].nsubs;
    }
    cr_assert_eq(total, t->subscriptions);
}

static int sub(pl_topics *t, pl_subscriber *s, const char *name)
{
    return pl_topics_subscribe(t, s, name, strlen(name));
}

static int unsub(pl_topics *t, pl_subscriber *s, const char *name)
{
    return pl_topics_unsubscribe(t, s, name, strlen(name));
}

static const pl_topic *find(const pl_topics *t, const char *name)
{
    return pl_topics_find(t, name, strlen(name));
}

/* ---- Basic behaviour ----------------------------------------------------------------------- */

Test(topics, empty_registry)
{
    pl_topics t;
    pl_topics_init(&t);
    cr_assert_null(find(&t, "x"));
    pl_subscriber s = {0};
    cr_assert_eq(unsub(&t, &s, "x"), 1);
    pl_topics_unsubscribe_all(&t, &s);
    cr_assert_eq(t.count, 0);
    pl_topics_destroy(&t);
}

Test(topics, subscribe_unsubscribe_return_codes)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber ab[2] = {{0}};
    pl_subscriber *a = &ab[0], *b = &ab[1];
    cr_assert_eq(sub(&t, a, "news"), 0);
    cr_assert_eq(sub(&t, a, "news"), 1, "a second subscribe reports 'already'");
    cr_assert_eq(sub(&t, b, "news"), 0);
    const pl_topic *tp = find(&t, "news");
    cr_assert_not_null(tp);
    cr_assert_eq(tp->nsubs, 2);
    cr_assert_eq(t.subscriptions, 2);
    cr_assert_null(find(&t, "new"), "a prefix is another topic");
    cr_assert_null(find(&t, "newsx"));

    cr_assert_eq(unsub(&t, a, "sport"), 1);
    cr_assert_eq(unsub(&t, a, "news"), 0);
    cr_assert_eq(unsub(&t, a, "news"), 1);
    cr_assert_not_null(find(&t, "news"), "b still holds it");
    check_all(&t, ab, 2);
    cr_assert_eq(unsub(&t, b, "news"), 0);
    cr_assert_null(find(&t, "news"), "freed with its last subscriber");
    cr_assert_eq(t.count, 0);
    cr_assert_eq(t.subscriptions, 0);
    pl_topics_unsubscribe_all(&t, a);
    pl_topics_unsubscribe_all(&t, b);
    cr_assert_null(a->subs);
    cr_assert_eq(a->cap, 0);
    pl_topics_destroy(&t);
}

#define NSUBS 60
#define NTOPICS 300

static void topic_name(char *buf, size_t cap, int i) { snprintf(buf, cap, "topic/%d", i); }

/* Subscriber i takes the topics j with (j % (i + 1)) == 0, and everyone takes "hot", so topic
 * arrays of very different sizes (and their shrinking) are exercised. Checked after each step. */
Test(topics, many_subscribers_every_step_checked)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber *subs = calloc(NSUBS, sizeof(*subs));
    char name[32];
    uint64_t expected = 0;
    for (int i = 0; i < NSUBS; i++) {
        cr_assert_eq(sub(&t, &subs[i], "hot"), 0);
        expected++;
        for (int j = 0; j < NTOPICS; j += i + 1) {
            topic_name(name, sizeof(name), j);
            cr_assert_eq(sub(&t, &subs[i], name), 0);
            expected++;
            check_subscriber(&subs[i]);
        }
        check_all(&t, subs, NSUBS);
    }
    cr_assert_eq(t.subscriptions, expected);
    cr_assert_eq(t.count, NTOPICS + 1, "every topic is held by subscriber 0");
    cr_assert_eq(find(&t, "hot")->nsubs, NSUBS);

    /* Unsubscribe one by one, odd subscribers first, checking the whole structure each time. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = pass ? 0 : 1; i < NSUBS; i += 2) {
            for (int j = 0; j < NTOPICS; j += i + 1) {
                topic_name(name, sizeof(name), j);
                cr_assert_eq(unsub(&t, &subs[i], name), 0);
                expected--;
                check_all(&t, subs, NSUBS);
            }
            cr_assert_eq(subs[i].nsubs, 1, "only 'hot' is left");
            cr_assert_eq(t.subscriptions, expected);
        }
    }
    cr_assert_eq(t.count, 1);
    for (int j = 0; j < NTOPICS; j++) {
        topic_name(name, sizeof(name), j);
        cr_assert_null(find(&t, name), "%s should be freed", name);
    }
    for (int i = 0; i < NSUBS; i++) {
        pl_topics_unsubscribe_all(&t, &subs[i]);
        check_all(&t, subs, NSUBS);
    }
    cr_assert_null(find(&t, "hot"));
    cr_assert_eq(t.count, 0);
    cr_assert_eq(t.subscriptions, 0);
    pl_topics_destroy(&t);
    free(subs);
}

Test(topics, unsubscribe_all_in_the_middle)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber s[3] = {{0}};
    char name[32];
    for (int j = 0; j < 40; j++) {
        topic_name(name, sizeof(name), j);
        for (int i = 0; i < 3; i++)
            cr_assert_eq(sub(&t, &s[i], name), 0);
    }
    pl_topics_unsubscribe_all(&t, &s[1]);
    check_all(&t, s, 3);
    cr_assert_eq(s[1].nsubs, 0);
    cr_assert_eq(t.count, 40);
    cr_assert_eq(t.subscriptions, 80);
    cr_assert_eq(sub(&t, &s[1], "topic/7"), 0, "a subscriber can come back after leaving");
    check_all(&t, s, 3);
    for (int i = 0; i < 3; i++)
        pl_topics_unsubscribe_all(&t, &s[i]);
    cr_assert_eq(t.count, 0);
    pl_topics_destroy(&t);
}

Test(topics, table_grows_past_hundreds_of_topics)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber s[4] = {{0}};
    char name[32];
    const int n = 2000; /* 500 per subscriber */
    for (int j = 0; j < n; j++) {
        topic_name(name, sizeof(name), j);
        cr_assert_eq(sub(&t, &s[j % 4], name), 0);
        if (j % 97 == 0)
            check_all(&t, s, 4);
    }
    check_all(&t, s, 4);
    cr_assert_eq(t.count, (uint32_t)n);
    cr_assert_geq(t.cap, 2048u);
    for (int j = 0; j < n; j++) {
        topic_name(name, sizeof(name), j);
        const pl_topic *tp = find(&t, name);
        cr_assert_not_null(tp, "%s lost after growth", name);
        cr_assert_eq(tp->nsubs, 1);
        cr_assert_eq(tp->subs[0].sub, &s[j % 4]);
    }
    for (int i = 0; i < 4; i++)
        pl_topics_unsubscribe_all(&t, &s[i]);
    cr_assert_eq(t.count, 0);
    pl_topics_destroy(&t);
}

/* ---- Collisions ------------------------------------------------------------------------------ */

/* The registry hashes with FNV-1a; generating names with chosen home slots makes long probe
 * chains that wrap around the end of the table. Should the hash change, the test still checks
 * correctness, with fewer collisions. */
static uint32_t fnv1a(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

Test(topics, deletion_under_collisions)
{
    /* 12 topics stay in a 16-slot table (it grows above 3/4 full). Homes 14, 15, 0 and 1. */
    enum { N = 12 };
    static const uint32_t homes[] = {15, 14, 15, 0, 15, 1, 14, 15, 0, 15, 15, 1};
    char names[N][16];
    int found = 0;
    for (int cand = 0; found < N && cand < 1000000; cand++) {
        char buf[16];
        int len = snprintf(buf, sizeof(buf), "c%d", cand);
        if ((fnv1a(buf, (size_t)len) & 15) == homes[found])
            memcpy(names[found++], buf, (size_t)len + 1);
    }
    cr_assert_eq(found, N);

    unsigned seed = 99;
    for (int round = 0; round < 300; round++) {
        pl_topics t;
        pl_topics_init(&t);
        pl_subscriber s = {0};
        for (int i = 0; i < N; i++)
            cr_assert_eq(sub(&t, &s, names[i]), 0);
        cr_assert_eq(t.cap, 16u, "the table was expected to stay at 16 slots");

        /* Remove in a random order; every remaining name must stay reachable. */
        int order[N];
        for (int i = 0; i < N; i++)
            order[i] = i;
        for (int i = N - 1; i > 0; i--) {
            seed = seed * 1103515245u + 12345u;
            int j = (int)((seed >> 16) % (unsigned)(i + 1));
            int tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        bool gone[N] = {false};
        for (int k = 0; k < N; k++) {
            cr_assert_eq(unsub(&t, &s, names[order[k]]), 0);
            gone[order[k]] = true;
            for (int i = 0; i < N; i++) {
                const pl_topic *tp = find(&t, names[i]);
                if (gone[i])
                    cr_assert_null(tp, "round %d: %s still found", round, names[i]);
                else
                    cr_assert_not_null(tp, "round %d: %s lost after removing %s", round, names[i],
                                       names[order[k]]);
            }
            check_table(&t);
            check_subscriber(&s);
            /* Re-adding a removed name in the middle exercises insertion into a shifted chain. */
            if (k == N / 2) {
                cr_assert_eq(sub(&t, &s, names[order[0]]), 0);
                cr_assert_eq(unsub(&t, &s, names[order[0]]), 0);
                check_table(&t);
            }
        }
        cr_assert_eq(t.count, 0);
        pl_topics_unsubscribe_all(&t, &s);
        pl_topics_destroy(&t);
    }
}

/* ---- Random operations against a reference model --------------------------------------------- */

#define RS 32  /* subscribers */
#define RT 400 /* topic names */

Test(topics, random_ops_match_model, .timeout = 60)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber *subs = calloc(RS, sizeof(*subs));
    static bool model[RS][RT];
    memset(model, 0, sizeof(model));
    int holders[RT] = {0};
    char names[RT][16];
    for (int j = 0; j < RT; j++)
        snprintf(names[j], sizeof(names[j]), "r%d", j);

    unsigned seed = 20240601;
    uint32_t peak = 0;
    const int ops = 20000;
    for (int op = 0; op < ops; op++) {
        seed = seed * 1103515245u + 12345u;
        unsigned r = seed >> 8;
        int s = (int)(r % RS), j = (int)((r / RS) % RT);
        unsigned kind = (r / RS / RT) % 100;
        /* Grow for the first half, shrink for the second. */
        unsigned sub_pct = op < ops / 2 ? 70 : 30;
        if (kind < sub_pct) {
            int rc = sub(&t, &subs[s], names[j]);
            cr_assert_eq(rc, model[s][j] ? 1 : 0, "op %d: subscribe(%d, %s)", op, s, names[j]);
            if (!model[s][j])
                holders[j]++;
            model[s][j] = true;
        } else if (kind < 98) {
            int rc = unsub(&t, &subs[s], names[j]);
            cr_assert_eq(rc, model[s][j] ? 0 : 1, "op %d: unsubscribe(%d, %s)", op, s, names[j]);
            if (model[s][j])
                holders[j]--;
            model[s][j] = false;
        } else {
            pl_topics_unsubscribe_all(&t, &subs[s]);
            for (int k = 0; k < RT; k++) {
                if (model[s][k])
                    holders[k]--;
                model[s][k] = false;
            }
        }

        check_all(&t, subs, RS);
        uint32_t live = 0;
        for (int k = 0; k < RT; k++) {
            const pl_topic *tp = find(&t, names[k]);
            if (holders[k]) {
                live++;
                cr_assert_not_null(tp, "op %d: %s lost", op, names[k]);
                cr_assert_eq(tp->nsubs, (uint32_t)holders[k], "op %d: %s", op, names[k]);
            } else {
                cr_assert_null(tp, "op %d: %s should be gone", op, names[k]);
            }
        }
        cr_assert_eq(t.count, live);
        if (live > peak)
            peak = live;
        for (int i = 0; i < RS; i++) {
            int n = 0;
            for (int k = 0; k < RT; k++)
                n += model[i][k];
            cr_assert_eq(subs[i].nsubs, n, "op %d: subscriber %d", op, i);
        }
    }
    cr_assert_gt(peak, 300u, "the run should reach hundreds of live topics (peak %u)", peak);
    for (int i = 0; i < RS; i++)
        pl_topics_unsubscribe_all(&t, &subs[i]);
    cr_assert_eq(t.count, 0);
    cr_assert_eq(t.subscriptions, 0);
    pl_topics_destroy(&t);
    free(subs);
}

/* ---- Limits of the subscriber side ---------------------------------------------------------- */

/* pl_subscriber counts with uint16_t. One subscriber taking very many topics must either
 * succeed or get a clean PUSHLET_ENOMEM with its existing subscriptions intact — never a
 * wrapped-around capacity. (The broker caps topics per connection at 64; the registry's own
 * contract has no such limit.) */
Test(topics, subscriber_with_more_than_32768_topics)
{
    pl_topics t;
    pl_topics_init(&t);
    pl_subscriber s = {0};
    char name[32];
    int ok = 0;
    for (int j = 0; j < 40000; j++) {
        snprintf(name, sizeof(name), "m%d", j);
        int rc = sub(&t, &s, name);
        cr_assert(rc == 0 || rc == PUSHLET_ENOMEM, "subscribe %d returned %d", j, rc);
        if (rc == 0) {
            cr_assert_eq(ok, j, "a subscribe succeeded after an earlier refusal");
            ok++;
        }
        cr_assert_eq(s.nsubs, (uint32_t)ok, "subscribe %d: nsubs %u, want %d", j, s.nsubs, ok);
    }
    cr_assert_geq(ok, 32768, "refused at %d subscriptions", ok);
    check_subscriber(&s);
    check_table(&t);
    pl_topics_unsubscribe_all(&t, &s);
    cr_assert_eq(t.count, 0);
    pl_topics_destroy(&t);
}
