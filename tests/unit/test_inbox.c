/* Cross-thread inbox (inbox.c). The concurrent test runs a real libuv loop that drains the inbox
 * from its async callback while 8 producer threads push, with a small bound so producers keep
 * hitting EFULL and retrying: every message must arrive exactly once and each producer's
 * messages in order. Leaks of queued messages are caught by ASan's leak checker. */
#include "internal.h"

#include <criterion/criterion.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pl_msg *make_msg(const char *data, size_t len)
{
    pl_msg *m = pl_msg_new("topic", 5, "message", 7, data, len);
    cr_assert_not_null(m);
    return m;
}

/* A loop with an async handle, for the single-threaded tests (nobody waits for the wake). */
typedef struct fixture {
    uv_loop_t loop;
    uv_async_t async;
    pl_inbox q;
} fixture;

static void noop_async(uv_async_t *a) { (void)a; }

static void fixture_open(fixture *f, size_t max_count, size_t max_bytes, size_t max_data)
{
    cr_assert_eq(uv_loop_init(&f->loop), 0);
    cr_assert_eq(uv_async_init(&f->loop, &f->async, noop_async), 0);
    cr_assert_eq(pl_inbox_init(&f->q), 0);
    pl_inbox_open(&f->q, &f->async, max_count, max_bytes, max_data);
}

static void fixture_close(fixture *f)
{
    pl_inbox_destroy(&f->q); /* frees whatever is still queued */
    uv_close((uv_handle_t *)&f->async, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&f->loop), 0);
}

static size_t free_list(pl_msg *m)
{
    size_t n = 0;
    while (m) {
        pl_msg *next = m->next;
        pl_msg_unref(m);
        m = next;
        n++;
    }
    return n;
}

/* ---- Bounds and states ----------------------------------------------------------------------- */

Test(inbox, fifo_and_take_all_resets)
{
    fixture f;
    fixture_open(&f, 100, 1 << 20, 1024);
    char data[16];
    for (int i = 0; i < 5; i++) {
        int n = snprintf(data, sizeof(data), "m%d", i);
        cr_assert_eq(pl_inbox_push(&f.q, make_msg(data, (size_t)n)), 0);
    }
    cr_assert_eq(f.q.count, 5);
    pl_msg *list = pl_inbox_take_all(&f.q);
    cr_assert_eq(f.q.count, 0);
    cr_assert_eq(f.q.bytes, 0);
    int i = 0;
    for (pl_msg *m = list; m; m = m->next, i++) {
        snprintf(data, sizeof(data), "m%d", i);
        cr_assert_str_eq(m->data, data, "oldest first");
        cr_assert_str_eq(m->topic, "topic");
        cr_assert_str_eq(m->event, "message");
    }
    cr_assert_eq(i, 5);
    free_list(list);
    cr_assert_null(pl_inbox_take_all(&f.q), "empty after take_all");
    /* The tail was reset too: pushing again starts a fresh list. */
    cr_assert_eq(pl_inbox_push(&f.q, make_msg("again", 5)), 0);
    list = pl_inbox_take_all(&f.q);
    cr_assert_not_null(list);
    cr_assert_str_eq(list->data, "again");
    cr_assert_null(list->next);
    free_list(list);
    fixture_close(&f);
}

Test(inbox, efull_at_max_count)
{
    fixture f;
    fixture_open(&f, 3, 1 << 20, 1024);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pl_inbox_push(&f.q, make_msg("x", 1)), 0);
    pl_msg *m = make_msg("y", 1);
    cr_assert_eq(pl_inbox_push(&f.q, m), PUSHLET_EFULL);
    cr_assert_eq(f.q.count, 3, "a refused message is not queued");
    cr_assert_eq(free_list(pl_inbox_take_all(&f.q)), 3);
    /* Room again after the loop drained it; the refused message is still the caller's. */
    cr_assert_eq(pl_inbox_push(&f.q, m), 0);
    cr_assert_eq(free_list(pl_inbox_take_all(&f.q)), 1);
    fixture_close(&f);
}

Test(inbox, efull_at_max_bytes)
{
    char big[1000];
    memset(big, 'b', sizeof(big));
    fixture f;
    /* One 1000-byte message fits in 1500 bytes, two do not; small ones still do. */
    fixture_open(&f, 1000, 1500, 4096);
    cr_assert_eq(pl_inbox_push(&f.q, make_msg(big, sizeof(big))), 0);
    pl_msg *m = make_msg(big, sizeof(big));
    cr_assert_eq(pl_inbox_push(&f.q, m), PUSHLET_EFULL);
    cr_assert_eq(pl_inbox_push(&f.q, make_msg("s", 1)), 0, "the bound is in bytes, not count");
    pl_msg_unref(m);
    cr_assert_eq(free_list(pl_inbox_take_all(&f.q)), 2);
    cr_assert_eq(f.q.bytes, 0);
    fixture_close(&f);
}

Test(inbox, etoobig_over_max_data)
{
    char data[101];
    memset(data, 'd', sizeof(data));
    fixture f;
    fixture_open(&f, 1000, 1 << 20, 100);
    pl_msg *m = make_msg(data, 101);
    cr_assert_eq(pl_inbox_push(&f.q, m), PUSHLET_ETOOBIG);
    pl_msg_unref(m); /* not taken on failure */
    cr_assert_eq(pl_inbox_push(&f.q, make_msg(data, 100)), 0, "max_data itself is allowed");
    cr_assert_eq(pl_inbox_push(&f.q, make_msg("", 0)), 0);
    cr_assert_eq(free_list(pl_inbox_take_all(&f.q)), 2);
    fixture_close(&f);
}

Test(inbox, estopped_before_open_and_after_close)
{
    pl_inbox q;
    cr_assert_eq(pl_inbox_init(&q), 0);
    pl_msg *m = make_msg("x", 1);
    cr_assert_eq(pl_inbox_push(&q, m), PUSHLET_ESTOPPED, "not open yet");
    pl_msg_unref(m);
    pl_inbox_destroy(&q);

    fixture f;
    fixture_open(&f, 100, 1 << 20, 1024);
    cr_assert_eq(pl_inbox_push(&f.q, make_msg("kept", 4)), 0);
    pl_inbox_close(&f.q);
    m = make_msg("late", 4);
    cr_assert_eq(pl_inbox_push(&f.q, m), PUSHLET_ESTOPPED);
    pl_msg_unref(m);
    /* What was accepted before the close is still there for the loop to deliver. */
    pl_msg *list = pl_inbox_take_all(&f.q);
    cr_assert_not_null(list);
    cr_assert_str_eq(list->data, "kept");
    cr_assert_null(list->next);
    free_list(list);
    /* Reopening (a broker restart) accepts again. */
    pl_inbox_open(&f.q, &f.async, 100, 1 << 20, 1024);
    cr_assert_eq(pl_inbox_push(&f.q, make_msg("again", 5)), 0);
    cr_assert_eq(free_list(pl_inbox_take_all(&f.q)), 1);
    fixture_close(&f);
}

Test(inbox, destroy_frees_what_is_queued)
{
    fixture f;
    fixture_open(&f, 100, 1 << 20, 1 << 16);
    char data[4096];
    memset(data, 'q', sizeof(data));
    for (int i = 0; i < 50; i++)
        cr_assert_eq(pl_inbox_push(&f.q, make_msg(data, sizeof(data))), 0);
    /* Encoded form attached too, as after a dispatch: destroy must release it as well. */
    pl_msg *m = make_msg("enc", 3);
    cr_assert_not_null(pl_msg_encode(m, PL_FMT_SSE, NULL));
    cr_assert_eq(pl_inbox_push(&f.q, m), 0);
    pl_inbox_close(&f.q);
    fixture_close(&f); /* LeakSanitizer reports anything left behind */
}

/* ---- Many producers, one loop ---------------------------------------------------------------- */

#define PRODUCERS 8
#define PER_PRODUCER 10000
#define TOTAL (PRODUCERS * PER_PRODUCER)

typedef struct stress {
    uv_loop_t loop;
    uv_async_t async;
    uv_timer_t deadline;
    pl_inbox q;
    /* Loop thread only. */
    uint32_t next_seq[PRODUCERS];
    uint32_t received, out_of_order, malformed, wakes;
    bool timed_out;
    /* Producer side; failures are counted because assertions only work on the test thread. */
    int producer_errors;   /* atomic */
    uint64_t full_retries; /* atomic */
} stress;

typedef struct producer {
    stress *st;
    int id;
} producer;

static void producer_main(void *arg)
{
    producer *pr = arg;
    stress *st = pr->st;
    char data[32];
    for (uint32_t seq = 0; seq < PER_PRODUCER; seq++) {
        int n = snprintf(data, sizeof(data), "%d:%u", pr->id, seq);
        pl_msg *m = pl_msg_new("t", 1, "message", 7, data, (size_t)n);
        if (!m) {
            __atomic_fetch_add(&st->producer_errors, 1, __ATOMIC_RELAXED);
            return;
        }
        int rc;
        /* Bounded: the loop drains continuously; stop retrying if it has given up. */
        while ((rc = pl_inbox_push(&st->q, m)) == PUSHLET_EFULL) {
            __atomic_fetch_add(&st->full_retries, 1, __ATOMIC_RELAXED);
            sched_yield();
        }
        if (rc != 0) {
            pl_msg_unref(m);
            __atomic_fetch_add(&st->producer_errors, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

static void on_stress_wake(uv_async_t *a)
{
    stress *st = a->data;
    st->wakes++;
    pl_msg *m = pl_inbox_take_all(&st->q);
    while (m) {
        pl_msg *next = m->next;
        int id;
        unsigned seq;
        if (sscanf(m->data, "%d:%u", &id, &seq) != 2 || id < 0 || id >= PRODUCERS) {
            st->malformed++;
        } else {
            if (seq != st->next_seq[id])
                st->out_of_order++;
            st->next_seq[id] = seq + 1;
            st->received++;
        }
        pl_msg_unref(m);
        m = next;
    }
    if (st->received + st->malformed >= TOTAL) {
        uv_close((uv_handle_t *)&st->async, NULL);
        uv_close((uv_handle_t *)&st->deadline, NULL);
    }
}

static void on_stress_deadline(uv_timer_t *t)
{
    stress *st = t->data;
    st->timed_out = true;
    pl_inbox_close(&st->q); /* producers still pushing get ESTOPPED and quit */
    uv_close((uv_handle_t *)&st->async, NULL);
    uv_close((uv_handle_t *)&st->deadline, NULL);
}

Test(inbox, eight_producers_exactly_once_in_order, .timeout = 60)
{
    stress *st = calloc(1, sizeof(*st));
    cr_assert_eq(uv_loop_init(&st->loop), 0);
    cr_assert_eq(uv_async_init(&st->loop, &st->async, on_stress_wake), 0);
    cr_assert_eq(uv_timer_init(&st->loop, &st->deadline), 0);
    st->async.data = st->deadline.data = st;
    uv_timer_start(&st->deadline, on_stress_deadline, 30000, 0);
    cr_assert_eq(pl_inbox_init(&st->q), 0);
    /* A small bound, so producers really contend with the drain and see EFULL. */
    pl_inbox_open(&st->q, &st->async, 256, 1 << 20, 1024);

    uv_thread_t threads[PRODUCERS];
    producer prs[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        prs[i] = (producer){st, i};
        cr_assert_eq(uv_thread_create(&threads[i], producer_main, &prs[i]), 0);
    }
    uv_run(&st->loop, UV_RUN_DEFAULT);
    pl_inbox_close(&st->q);
    for (int i = 0; i < PRODUCERS; i++)
        uv_thread_join(&threads[i]);

    cr_assert_not(st->timed_out, "timed out after %u of %d messages", st->received, TOTAL);
    cr_assert_eq(st->producer_errors, 0);
    cr_assert_eq(st->malformed, 0);
    cr_assert_eq(st->out_of_order, 0, "%u messages out of producer order", st->out_of_order);
    cr_assert_eq(st->received, TOTAL, "received %u, want %d", st->received, TOTAL);
    for (int i = 0; i < PRODUCERS; i++)
        cr_assert_eq(st->next_seq[i], PER_PRODUCER, "producer %d: %u delivered", i,
                     st->next_seq[i]);
    cr_assert_null(pl_inbox_take_all(&st->q), "nothing left over");
    cr_assert_lt(st->wakes, (uint32_t)TOTAL, "wakes are coalesced, not one per message");
    pl_inbox_destroy(&st->q);
    cr_assert_eq(uv_loop_close(&st->loop), 0);
    free(st);
}
