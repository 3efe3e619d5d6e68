/* Publishing from many threads through the public API, for ThreadSanitizer (Criterion cannot run
 * under TSan, so this is a plain program). 8 threads publish 10,000 messages each to a running
 * broker while a subscriber on 127.0.0.1 reads the SSE stream on its own thread and another
 * thread keeps reading the counters. Every message must arrive exactly once, each producer's in
 * order, with consecutive IDs. Then the broker is restarted and stopped while 8 threads keep
 * publishing. Exit status 0 only when every check passed; the last line says
 * "N passed, N failed". */
#include "pushlet.h"
#include "testutil.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define PRODUCERS       8
#define PER_PRODUCER    10000
#define TOTAL           (PRODUCERS * PER_PRODUCER)
#define RUN_DEADLINE_MS 90000 /* TSan slows everything down; still bounded */

static int passed, failed;

static void check(bool ok, const char *what)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s\n", what);
    }
}

typedef struct shared {
    pushlet_t *p;
    int64_t deadline_ms;
    int producers_done; /* atomic */
    int stats_stop;     /* atomic */
} shared;

/* ---- Producers ------------------------------------------------------------------------------- */

typedef struct producer {
    shared *sh;
    int id;
    int errors;
    uint64_t full_retries;
} producer;

static void producer_main(void *arg)
{
    producer *pr = arg;
    char data[48];
    for (int seq = 0; seq < PER_PRODUCER; seq++) {
        int n = snprintf(data, sizeof(data), "%d:%d", pr->id, seq);
        int rc;
        /* EFULL means "retry later": publishing never blocks, so the caller backs off. */
        while ((rc = pushlet_publish(pr->sh->p, "stress", NULL, data, (size_t)n)) ==
               PUSHLET_EFULL) {
            pr->full_retries++;
            if (tu_now_ms() > pr->sh->deadline_ms)
                break;
            sched_yield();
        }
        if (rc != 0) {
            fprintf(stderr, "producer %d: publish %d: %s\n", pr->id, seq, pushlet_strerror(rc));
            pr->errors++;
            break;
        }
    }
    __atomic_fetch_add(&pr->sh->producers_done, 1, __ATOMIC_RELEASE);
}

/* ---- Subscriber ------------------------------------------------------------------------------ */

typedef struct reader {
    tu_client client;
    shared *sh;
    int next_seq[PRODUCERS];
    uint64_t last_id;
    int received, out_of_order, duplicates_or_gaps, bad_ids, malformed;
    bool timed_out;
} reader;

static void on_event(void *ud, const tu_event *ev)
{
    reader *r = ud;
    int id, seq;
    if (strcmp(ev->event, "message") != 0 || sscanf(ev->data, "%d:%d", &id, &seq) != 2 || id < 0 ||
        id >= PRODUCERS) {
        r->malformed++;
        return;
    }
    /* IDs are EPOCH-SEQ, the sequence per topic: consecutive. */
    const char *dash = strchr(ev->id, '-');
    uint64_t msg_id = dash ? strtoull(dash + 1, NULL, 10) : 0;
    if (r->last_id && msg_id != r->last_id + 1)
        r->bad_ids++;
    r->last_id = msg_id;
    if (seq < r->next_seq[id])
        r->duplicates_or_gaps++;
    else if (seq > r->next_seq[id])
        r->out_of_order++;
    r->next_seq[id] = seq + 1;
    r->received++;
}

static void reader_main(void *arg)
{
    reader *r = arg;
    while (r->received + r->malformed < TOTAL && !r->client.eof) {
        if (tu_now_ms() > r->sh->deadline_ms) {
            r->timed_out = true;
            break;
        }
        if (tu_client_pump(&r->client, 200) == -1)
            break;
    }
}

/* ---- Counter reader -------------------------------------------------------------------------- */

typedef struct stats_reader {
    shared *sh;
    uint64_t reads;
    int regressions; /* a cumulative counter went down */
    int bad_values;
} stats_reader;

static void stats_main(void *arg)
{
    stats_reader *s = arg;
    int64_t last[PUSHLET_STAT_COUNT] = {0};
    const pushlet_stat_t cumulative[] = {PUSHLET_STAT_MESSAGES_IN, PUSHLET_STAT_MESSAGES_OUT,
                                         PUSHLET_STAT_BYTES_OUT, PUSHLET_STAT_CONNECTIONS_TOTAL};
    while (!__atomic_load_n(&s->sh->stats_stop, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < PUSHLET_STAT_COUNT; i++) {
            int64_t v = pushlet_stat(s->sh->p, (pushlet_stat_t)i);
            if (v < 0)
                s->bad_values++;
            s->reads++;
        }
        for (size_t k = 0; k < sizeof(cumulative) / sizeof(cumulative[0]); k++) {
            int64_t v = pushlet_stat(s->sh->p, cumulative[k]);
            if (v < last[cumulative[k]])
                s->regressions++;
            last[cumulative[k]] = v;
        }
        if (pushlet_port(s->sh->p) <= 0)
            s->bad_values++;
        sched_yield();
    }
}

/* ---- Stop while publishing ------------------------------------------------------------------- */

typedef struct racer {
    shared *sh;
    int last_rc;
    uint64_t accepted;
} racer;

/* Publishes until the broker says it stopped; the stop comes from the main thread meanwhile. */
static void racer_main(void *arg)
{
    racer *r = arg;
    int rc;
    do {
        rc = pushlet_publish(r->sh->p, "race", "tick", "payload", 7);
        if (rc == 0)
            r->accepted++;
        else if (rc == PUSHLET_EFULL)
            sched_yield();
    } while ((rc == 0 || rc == PUSHLET_EFULL) && tu_now_ms() < r->sh->deadline_ms);
    r->last_rc = rc;
}

static void stop_while_publishing(shared *sh)
{
    check(pushlet_start(sh->p) == 0, "restart for the stop race");
    racer rs[PRODUCERS];
    uv_thread_t threads[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        rs[i] = (racer){.sh = sh};
        uv_thread_create(&threads[i], racer_main, &rs[i]);
    }
    tu_sleep_ms(50);
    check(pushlet_stop(sh->p) == 0, "pushlet_stop while publishing");
    uint64_t accepted = 0;
    int stopped = 0;
    for (int i = 0; i < PRODUCERS; i++) {
        uv_thread_join(&threads[i]);
        accepted += rs[i].accepted;
        stopped += rs[i].last_rc == PUSHLET_ESTOPPED;
    }
    check(stopped == PRODUCERS, "every racing publisher ended with ESTOPPED");
    check(accepted > 0, "publishes were accepted before the stop");
}

/* ---- Main ------------------------------------------------------------------------------------ */

int main(void)
{
    shared sh = {.deadline_ms = tu_now_ms() + RUN_DEADLINE_MS};
    check(pushlet_new(&sh.p) == 0, "pushlet_new");
    if (!sh.p) {
        printf("%d passed, %d failed\n", passed, failed);
        return 1;
    }
    check(pushlet_listen(sh.p, "127.0.0.1", 0) == 0, "pushlet_listen");
    /* The subscriber reads as fast as it can, but TSan makes it slow: allow a large backlog
     * rather than dropping it as a slow consumer. */
    check(pushlet_set_int(sh.p, PUSHLET_OPT_MAX_OUTPUT_BYTES, 1 << 30) == 0, "max output");
    check(pushlet_set_int(sh.p, PUSHLET_OPT_STOP_TIMEOUT_MS, 5000) == 0, "stop timeout");
    check(pushlet_set_int(sh.p, PUSHLET_OPT_HEARTBEAT_MS, 0) == 0, "no heartbeat");
    check(pushlet_start(sh.p) == 0, "pushlet_start");
    int port = pushlet_port(sh.p);
    check(port > 0, "bound port");

    reader *rd = calloc(1, sizeof(*rd));
    rd->sh = &sh;
    bool subscribed = tu_client_subscribe(&rd->client, port, "stress", 10000);
    check(subscribed, "subscriber connected");
    /* From here on the reader thread owns the client; events go to on_event. */
    rd->client.user_fn = on_event;
    rd->client.user_ud = rd;

    uv_thread_t reader_thread, stats_thread, threads[PRODUCERS];
    stats_reader st = {.sh = &sh};
    producer prs[PRODUCERS];
    if (subscribed)
        uv_thread_create(&reader_thread, reader_main, rd);
    uv_thread_create(&stats_thread, stats_main, &st);
    for (int i = 0; i < PRODUCERS; i++) {
        prs[i] = (producer){.sh = &sh, .id = i};
        uv_thread_create(&threads[i], producer_main, &prs[i]);
    }

    int producer_errors = 0;
    uint64_t retries = 0;
    for (int i = 0; i < PRODUCERS; i++) {
        uv_thread_join(&threads[i]);
        producer_errors += prs[i].errors;
        retries += prs[i].full_retries;
    }
    check(producer_errors == 0, "every publish accepted (EFULL retried)");
    if (subscribed)
        uv_thread_join(&reader_thread);
    __atomic_store_n(&sh.stats_stop, 1, __ATOMIC_RELEASE);
    uv_thread_join(&stats_thread);

    check(!rd->timed_out, "subscriber finished before the deadline");
    check(rd->malformed == 0, "no malformed events");
    check(rd->received == TOTAL, "every message received");
    check(rd->duplicates_or_gaps == 0, "no duplicates");
    check(rd->out_of_order == 0, "per-producer order kept (no gaps)");
    check(rd->bad_ids == 0, "IDs consecutive");
    for (int i = 0; i < PRODUCERS; i++)
        check(rd->next_seq[i] == PER_PRODUCER, "each producer fully delivered");
    check(st.reads > 0, "counters were read concurrently");
    check(st.regressions == 0, "cumulative counters never went down");
    check(st.bad_values == 0, "counter reads valid while running");
    check(pushlet_stat(sh.p, PUSHLET_STAT_MESSAGES_IN) == TOTAL, "messages_in == total");
    check(pushlet_stat(sh.p, PUSHLET_STAT_MESSAGES_OUT) == TOTAL, "messages_out == total");
    check(pushlet_stat(sh.p, PUSHLET_STAT_SLOW_CONSUMER_DROPS) == 0, "no slow-consumer drop");

    check(pushlet_stop(sh.p) == 0, "pushlet_stop");
    if (subscribed)
        check(tu_client_wait_eof(&rd->client, 10000), "stream ended by the stop");
    check(pushlet_publish(sh.p, "stress", NULL, "x", 1) == PUSHLET_ESTOPPED, "ESTOPPED after stop");
    stop_while_publishing(&sh);
    check(pushlet_free(sh.p) == 0, "pushlet_free");
    tu_client_close(&rd->client);

    printf("received %d of %d, %llu EFULL retries, %llu counter reads\n", rd->received, TOTAL,
           (unsigned long long)retries, (unsigned long long)st.reads);
    free(rd);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
