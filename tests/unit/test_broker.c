/* The public API (pushlet.h) end to end: lifecycle, options, publishing, the pull event queue,
 * the loop-thread guard, and several brokers in one process. SSE clients are real sockets on
 * 127.0.0.1 (testutil.c); every wait is bounded. */
#include "pushlet.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define WAIT_MS 5000

/* A broker on 127.0.0.1 with a port picked by the kernel and a short stop deadline. */
static pushlet_t *new_broker(void)
{
    pushlet_t *p = NULL;
    cr_assert_eq(pushlet_new(&p), 0);
    cr_assert_not_null(p);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", 0), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_STOP_TIMEOUT_MS, 2000), 0);
    return p;
}

#define PL_TEST_EPOCH_MAX 16

static int start(pushlet_t *p)
{
    int rc = pushlet_start(p);
    cr_assert_eq(rc, 0, "pushlet_start: %s", pushlet_strerror(rc));
    int port = pushlet_port(p);
    cr_assert_gt(port, 0);
    return port;
}

static void publish(pushlet_t *p, const char *topic, const char *data)
{
    int rc = pushlet_publish(p, topic, NULL, data, strlen(data));
    cr_assert_eq(rc, 0, "publish %s: %s", data, pushlet_strerror(rc));
}

/* The next event on `c` must carry `data` (and, when `seq` is not NULL, an ID "EPOCH-SEQ" with
 * that sequence number). */
static void expect_event(tu_client *c, const char *seq, const char *event, const char *data)
{
    tu_event ev;
    int rc = tu_client_next(c, &ev, WAIT_MS);
    cr_assert_eq(rc, 1, "no event (want data %s): %s", data, rc == 0 ? "EOF" : "timeout");
    cr_assert_str_eq(ev.data, data);
    cr_assert_str_eq(ev.event, event);
    if (seq) {
        const char *dash = ev.id ? strchr(ev.id, '-') : NULL;
        cr_assert(dash && dash > ev.id &&
                      strspn(ev.id, "0123456789abcdefghijklmnopqrstuvwxyz") ==
                          (size_t)(dash - ev.id),
                  "event %s: id %s is not EPOCH-SEQ", data, ev.id ? ev.id : "(none)");
        cr_assert_str_eq(dash + 1, seq, "event %s", data);
    }
    tu_event_clear(&ev);
}

static void subscribe(tu_client *c, int port, const char *topic)
{
    cr_assert(tu_client_subscribe(c, port, topic, WAIT_MS), "subscribe to %s on port %d failed",
              topic, port);
}

static bool fd_readable(int fd, int timeout_ms)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, timeout_ms) == 1 && (pfd.revents & POLLIN);
}

/* ---- Handles, versions, errors ------------------------------------------------------------- */

Test(broker, new_and_free)
{
    pushlet_t *p = NULL;
    cr_assert_eq(pushlet_new(&p), 0);
    cr_assert_not_null(p);
    cr_assert_eq(pushlet_port(p), -1, "not bound before start");
    cr_assert_eq(pushlet_free(p), 0);
    cr_assert_eq(pushlet_free(NULL), 0);
    cr_assert_eq(pushlet_new(NULL), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_port(NULL), -1);
    cr_assert_eq(pushlet_stat(NULL, PUSHLET_STAT_CONNECTIONS), -1);
    cr_assert_null(pushlet_event_next(NULL));
    pushlet_event_free(NULL);
}

Test(broker, version)
{
    cr_assert_eq(pushlet_version(), (unsigned)PUSHLET_VERSION_HEX);
    char want[32];
    snprintf(want, sizeof(want), "%d.%d.%d", PUSHLET_VERSION_MAJOR, PUSHLET_VERSION_MINOR,
             PUSHLET_VERSION_PATCH);
    cr_assert_str_eq(pushlet_version_string(), want);
}

Test(broker, strerror_every_code)
{
    const int codes[] = {PUSHLET_OK,         PUSHLET_EINVAL,  PUSHLET_ENOMEM,       PUSHLET_EFULL,
                         PUSHLET_ESTOPPED,   PUSHLET_EBUSY,   PUSHLET_EWRONGTHREAD, PUSHLET_ETOOBIG,
                         PUSHLET_EADDRINUSE, PUSHLET_ELISTEN, PUSHLET_ESYSTEM};
    const size_t n = sizeof(codes) / sizeof(codes[0]);
    const char *unknown = pushlet_strerror(-12345);
    cr_assert_not_null(unknown);
    cr_assert_not_null(pushlet_strerror(1));
    for (size_t i = 0; i < n; i++) {
        const char *m = pushlet_strerror(codes[i]);
        cr_assert_not_null(m, "code %d", codes[i]);
        cr_assert_gt(strlen(m), 0, "code %d", codes[i]);
        cr_assert_null(strchr(m, '\n'), "one line");
        cr_assert_str_neq(m, unknown, "code %d has no message of its own", codes[i]);
        for (size_t j = 0; j < i; j++)
            cr_assert_str_neq(m, pushlet_strerror(codes[j]), "codes %d and %d share [%s]", codes[i],
                              codes[j], m);
    }
}

/* ---- Options -------------------------------------------------------------------------------- */

Test(broker, option_validation)
{
    pushlet_t *p = new_broker();
    cr_assert_eq(pushlet_set_int(p, (pushlet_option_t)9999, 1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, (pushlet_option_t)0, 1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_str(p, (pushlet_option_t)9999, "x"), PUSHLET_EINVAL);
    /* wrong kind */
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_SSE_PATH, 1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_HEARTBEAT_MS, "100"), PUSHLET_EINVAL);
    /* ranges */
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, -1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, 0), 0, "0 disables heartbeats");
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_HEADERS, 0), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_HEADERS, 100000), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_HEADERS, 32), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_CONNECTIONS, 0), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HTTP_PUBLISH, 2), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_MESSAGE_SIZE, INT64_MAX), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_QUEUED_MESSAGES, INT64_MIN), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_heartbeat_interval(p, 1000), 0);
    cr_assert_eq(pushlet_set_heartbeat_interval(p, UINT32_MAX), PUSHLET_EINVAL);
    /* strings: paths start with '/', nothing may break a header line */
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_SSE_PATH, "/stream"), 0);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_SSE_PATH, "stream"), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_SSE_PATH, "/a\r\nX-Evil: 1"), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_CORS_ORIGIN, "https://a.example\r\n"),
                 PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_SSE_PATH, NULL), 0, "NULL restores the default");
    /* addresses */
    cr_assert_eq(pushlet_listen(p, "not-an-ip", 80), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", 70000), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", -1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_listen(p, NULL, 80), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_listen(p, "::1", 0), 0);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", 0), 0);
    /* the pull queue and the logger */
    cr_assert_eq(pushlet_events_enable(p, 1u << 8), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_set_event_handler(p, NULL, PUSHLET_EVENT_LOG, NULL), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_events_enable(p, 0), 0);
    cr_assert_eq(pushlet_set_logger(NULL, NULL, 0, NULL), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_COUNT), -1);
    cr_assert_eq(pushlet_stat(p, (pushlet_stat_t)-1), -1);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_CONNECTIONS), 0);
    cr_assert_eq(pushlet_free(p), 0);
}

Test(broker, ebusy_while_running)
{
    pushlet_t *p = new_broker();
    start(p);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, 1000), PUSHLET_EBUSY);
    cr_assert_eq(pushlet_set_str(p, PUSHLET_OPT_SSE_PATH, "/other"), PUSHLET_EBUSY);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", 0), PUSHLET_EBUSY);
    cr_assert_eq(pushlet_start(p), PUSHLET_EBUSY);
    /* Validation comes first: a bad value is EINVAL whatever the state. */
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, -5), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, 1000), 0, "allowed once stopped");
    cr_assert_eq(pushlet_free(p), 0);
}

/* ---- Listening ------------------------------------------------------------------------------ */

Test(broker, port_zero_picks_a_port)
{
    pushlet_t *p = new_broker();
    cr_assert_eq(pushlet_port(p), -1);
    int port = start(p);
    /* Something really listens there. */
    int fd = tu_connect(port);
    cr_assert_geq(fd, 0, "cannot connect to port %d", port);
    close(fd);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_eq(pushlet_port(p), -1, "unbound after stop");
    cr_assert_eq(pushlet_free(p), 0);
}

Test(broker, eaddrinuse_on_a_taken_port)
{
    pushlet_t *a = new_broker(), *b = new_broker();
    int port = start(a);
    cr_assert_eq(pushlet_listen(b, "127.0.0.1", port), 0);
    cr_assert_eq(pushlet_start(b), PUSHLET_EADDRINUSE);
    cr_assert_eq(pushlet_port(b), -1);
    cr_assert_eq(pushlet_stop(b), PUSHLET_ESTOPPED, "a failed start leaves it stopped");
    cr_assert_eq(pushlet_publish(b, "t", NULL, "x", 1), PUSHLET_ESTOPPED);
    /* The failure did not disturb the broker that holds the port. */
    tu_client c;
    subscribe(&c, port, "t");
    publish(a, "t", "still here");
    expect_event(&c, "1", "message", "still here");
    tu_client_close(&c);
    /* And b can start elsewhere afterwards. */
    cr_assert_eq(pushlet_listen(b, "127.0.0.1", 0), 0);
    start(b);
    cr_assert_eq(pushlet_free(b), 0);
    cr_assert_eq(pushlet_free(a), 0);
}

/* ---- Publishing ------------------------------------------------------------------------------ */

Test(broker, publish_errors)
{
    pushlet_t *p = new_broker();
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_MESSAGE_SIZE, 16), 0);
    cr_assert_eq(pushlet_publish(p, "t", NULL, "x", 1), PUSHLET_ESTOPPED, "before start");
    cr_assert_eq(pushlet_publish_all(p, NULL, "x", 1), PUSHLET_ESTOPPED);
    /* Argument checks do not depend on the state. */
    cr_assert_eq(pushlet_publish(p, "bad topic", NULL, "x", 1), PUSHLET_EINVAL);
    start(p);
    const char *bad_topics[] = {"", "a b", "a\nb", "t\xc3\xa9", NULL};
    for (size_t i = 0; i < sizeof(bad_topics) / sizeof(bad_topics[0]); i++)
        cr_assert_eq(pushlet_publish(p, bad_topics[i], NULL, "x", 1), PUSHLET_EINVAL, "topic %zu",
                     i);
    const char *bad_events[] = {"", "two words", "ev\r", "ev\n"};
    for (size_t i = 0; i < sizeof(bad_events) / sizeof(bad_events[0]); i++) {
        cr_assert_eq(pushlet_publish(p, "t", bad_events[i], "x", 1), PUSHLET_EINVAL, "event %zu",
                     i);
        cr_assert_eq(pushlet_publish_all(p, bad_events[i], "x", 1), PUSHLET_EINVAL);
    }
    cr_assert_eq(pushlet_publish(p, "t", NULL, NULL, 3), PUSHLET_EINVAL, "NULL data, len > 0");
    cr_assert_eq(pushlet_publish(p, "t", NULL, NULL, 0), 0, "NULL data, len 0 is empty data");
    const char seventeen[] = "0123456789abcdefg";
    cr_assert_eq(pushlet_publish(p, "t", NULL, seventeen, 17), PUSHLET_ETOOBIG);
    cr_assert_eq(pushlet_publish_all(p, NULL, seventeen, 17), PUSHLET_ETOOBIG);
    cr_assert_eq(pushlet_publish(p, "t", NULL, seventeen, 16), 0, "the maximum itself is fine");
    cr_assert_geq(pushlet_stat(p, PUSHLET_STAT_PUBLISH_REJECTED), 2);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_eq(pushlet_publish(p, "t", NULL, "x", 1), PUSHLET_ESTOPPED, "after stop");
    cr_assert_eq(pushlet_free(p), 0);
}

Test(broker, delivery_by_topic_and_to_all)
{
    pushlet_t *p = new_broker();
    int port = start(p);
    tu_client a, b;
    subscribe(&a, port, "room/a");
    subscribe(&b, port, "room/b");
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_SSE_CONNECTIONS), 2);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_TOPICS), 2);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_SUBSCRIPTIONS), 2);

    /* Sequences are per topic; publish-to-all events carry no id (they are not resumable). */
    publish(p, "room/a", "for a");
    publish(p, "room/b", "for b\nsecond line");
    cr_assert_eq(pushlet_publish(p, "room/a", "custom-ev", "typed", 5), 0);
    cr_assert_eq(pushlet_publish_all(p, "note", "everyone", 8), 0);
    expect_event(&a, "1", "message", "for a");
    expect_event(&a, "2", "custom-ev", "typed");
    expect_event(&a, NULL, "note", "everyone");
    expect_event(&b, "1", "message", "for b\nsecond line");
    expect_event(&b, NULL, "note", "everyone");
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_MESSAGES_IN), 4);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_MESSAGES_OUT), 5);

    /* The same counters as Prometheus text: sized with cap 0, then written whole. */
    int need = pushlet_metrics(p, NULL, 0);
    cr_assert_gt(need, 0);
    char *text = malloc((size_t)need + 1);
    cr_assert_eq(pushlet_metrics(p, text, (size_t)need + 1), need);
    cr_assert_eq(strlen(text), (size_t)need);
    cr_assert(strstr(text, "\npushlet_messages_in_total 4\n"), "%s", text);
    cr_assert(strstr(text, "pushlet_connections{transport=\"sse\"} 2\n"), "%s", text);
    char small[16];
    cr_assert_eq(pushlet_metrics(p, small, sizeof(small)), need, "truncated, still sized");
    cr_assert_eq(strlen(small), sizeof(small) - 1);
    free(text);
    cr_assert_eq(pushlet_metrics(NULL, NULL, 0), PUSHLET_EINVAL);

    tu_client_close(&a);
    tu_client_close(&b);
    cr_assert_eq(pushlet_free(p), 0);
}

/* Publishes racing with the stop: the loop may be in the middle of dispatching a batch when
 * the stop arrives. Everything accepted before pushlet_stop() must still reach the stream before
 * it ends. Large messages make the loop's encoding slower than the publishing, so the stop
 * usually lands mid-batch; a reader thread keeps the socket drained meanwhile. */
#define STOP_MSGS     200
#define STOP_MSG_SIZE 16384

static void reader_main(void *arg)
{
    tu_client *c = arg;
    int64_t deadline = tu_now_ms() + 3 * WAIT_MS;
    while (!c->eof && tu_now_ms() < deadline)
        if (tu_client_pump(c, 100) == -1)
            break;
}

Test(broker, stop_delivers_what_was_published_before_it, .timeout = 60)
{
    pushlet_t *p = new_broker();
    /* Room for everything at once: this test is about the stop, not the slow-consumer bound. */
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_OUTPUT_BYTES, 64 << 20), 0);
    char *data = malloc(STOP_MSG_SIZE);
    memset(data, 'x', STOP_MSG_SIZE);
    for (int round = 0; round < 10; round++) { /* each round loses with p ~ 0.3 when buggy */
        int port = start(p);
        tu_client c;
        subscribe(&c, port, "t");
        uv_thread_t reader;
        cr_assert_eq(uv_thread_create(&reader, reader_main, &c), 0);
        for (int i = 0; i < STOP_MSGS; i++) {
            int n = snprintf(data, 32, "%d.%d:", round, i);
            data[n] = 'x'; /* overwrite snprintf's NUL */
            cr_assert_eq(pushlet_publish(p, "t", NULL, data, STOP_MSG_SIZE), 0);
        }
        cr_assert_eq(pushlet_stop(p), 0);
        uv_thread_join(&reader);
        cr_assert(c.eof, "round %d: the stream did not end after the stop", round);
        cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_SLOW_CONSUMER_DROPS), 0);
        size_t got = c.qlen - c.qhead;
        cr_assert_eq(got, STOP_MSGS,
                     "round %d: %zu of %d messages published before the stop "
                     "were delivered",
                     round, got, STOP_MSGS);
        for (int i = 0; i < STOP_MSGS; i++) {
            tu_event ev;
            cr_assert_eq(tu_client_next(&c, &ev, 0), 1);
            char prefix[32], id[16];
            snprintf(prefix, sizeof(prefix), "%d.%d:x", round, i);
            snprintf(id, sizeof(id), "%d", i + 1); /* each run has its own epoch */
            cr_assert_eq(ev.data_len, STOP_MSG_SIZE);
            cr_assert(strncmp(ev.data, prefix, strlen(prefix)) == 0, "round %d: message %d", round,
                      i);
            cr_assert_str_eq(strchr(ev.id, '-') + 1, id);
            tu_event_clear(&ev);
        }
        tu_client_close(&c);
    }
    free(data);
    cr_assert_eq(pushlet_free(p), 0);
}

Test(broker, stop_start_stop_again)
{
    pushlet_t *p = new_broker();
    char epoch[3][PL_TEST_EPOCH_MAX] = {{0}};
    for (int round = 0; round < 3; round++) {
        int port = start(p);
        tu_client c;
        subscribe(&c, port, "t");
        char data[32];
        snprintf(data, sizeof(data), "round %d", round);
        publish(p, "t", data);
        /* Each run has a new epoch (history does not survive a stop), so no ID repeats. */
        tu_event ev;
        cr_assert_eq(tu_client_next(&c, &ev, WAIT_MS), 1);
        cr_assert_str_eq(ev.data, data);
        const char *dash = strchr(ev.id, '-');
        cr_assert(dash && dash - ev.id < PL_TEST_EPOCH_MAX && strcmp(dash, "-1") == 0, "%s", ev.id);
        memcpy(epoch[round], ev.id, (size_t)(dash - ev.id));
        for (int k = 0; k < round; k++)
            cr_assert_str_neq(epoch[k], epoch[round], "round %d reuses an epoch", round);
        tu_event_clear(&ev);
        cr_assert_eq(pushlet_stop(p), 0, "round %d", round);
        cr_assert(tu_client_wait_eof(&c, WAIT_MS), "round %d: stream not ended", round);
        tu_client_close(&c);
        cr_assert_eq(pushlet_stop(p), PUSHLET_ESTOPPED);
        cr_assert_eq(pushlet_port(p), -1);
        cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_CONNECTIONS), 0, "round %d", round);
    }
    cr_assert_eq(pushlet_free(p), 0);
}

Test(broker, free_while_running_stops_it)
{
    pushlet_t *p = new_broker();
    int port = start(p);
    tu_client c;
    subscribe(&c, port, "t");
    cr_assert_eq(pushlet_free(p), 0);
    cr_assert(tu_client_wait_eof(&c, WAIT_MS));
    tu_client_close(&c);
}

/* ---- Pull event queue ------------------------------------------------------------------------ */

/* Drain the queue; returns how many events matched (level, component, text fragment). */
static int drain_matching(pushlet_t *p, int level, const char *component, const char *fragment)
{
    int matched = 0;
    pushlet_event_t *e;
    while ((e = pushlet_event_next(p)) != NULL) {
        size_t len = 0;
        const char *text = pushlet_event_text(e, &len);
        cr_assert_eq(pushlet_event_type(e), PUSHLET_EVENT_LOG);
        cr_assert_eq(strlen(text), len);
        if (pushlet_event_log_level(e) == level &&
            strcmp(pushlet_event_component(e), component) == 0 && strstr(text, fragment))
            matched++;
        pushlet_event_free(e);
    }
    return matched;
}

Test(broker, event_queue_pull)
{
    pushlet_t *p = new_broker();
    int fd = pushlet_event_fd(p);
    cr_assert_geq(fd, 0);
    cr_assert_eq(pushlet_events_enable(p, PUSHLET_EVENT_LOG), 0);
    cr_assert_not(fd_readable(fd, 0), "nothing pending before start");
    int port = start(p);
    cr_assert(fd_readable(fd, WAIT_MS), "event fd not readable after start");
    char want[64];
    snprintf(want, sizeof(want), "listening on 127.0.0.1:%d", port);
    cr_assert_eq(drain_matching(p, PUSHLET_LOG_INFO, "server", want), 1);
    cr_assert_null(pushlet_event_next(p));
    cr_assert_not(fd_readable(fd, 0), "fd still readable once drained");

    /* It turns readable again for the next record. */
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert(fd_readable(fd, WAIT_MS), "event fd not readable after stop");
    cr_assert_eq(drain_matching(p, PUSHLET_LOG_INFO, "server", "stopped"), 1);
    cr_assert_not(fd_readable(fd, 0));

    /* Disabled: nothing is queued. */
    cr_assert_eq(pushlet_events_enable(p, 0), 0);
    start(p);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_not(fd_readable(fd, 0));
    cr_assert_null(pushlet_event_next(p));
    cr_assert_eq(pushlet_free(p), 0);
}

/* When the queue overflowed, the next record is preceded by a "dropped" warning. The fd must be
 * readable whenever events are pending, including when that warning is the first of them. */
Test(broker, event_fd_readable_after_overflow_note)
{
    pushlet_t *p = new_broker();
    int fd = pushlet_event_fd(p);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_PENDING_EVENTS, 2), 0);
    cr_assert_eq(pushlet_events_enable(p, PUSHLET_EVENT_LOG), 0);
    start(p);                         /* "listening on" */
    cr_assert_eq(pushlet_stop(p), 0); /* "stopped": the queue is full */
    start(p);                         /* "listening on": dropped */
    int n = 0;
    pushlet_event_t *e;
    while ((e = pushlet_event_next(p)) != NULL) {
        pushlet_event_free(e);
        n++;
    }
    cr_assert_eq(n, 2);
    cr_assert_not(fd_readable(fd, 0));
    cr_assert_eq(pushlet_stop(p), 0); /* queues the "1 events dropped" note, then "stopped" */
    bool readable = fd_readable(fd, 200);
    /* Look at the queue anyway, to show what is pending while the fd says nothing is. */
    cr_expect_eq(drain_matching(p, PUSHLET_LOG_WARN, "events", "dropped"), 1);
    cr_expect(readable, "2 events pending but the event fd is not readable");
    cr_assert_eq(pushlet_free(p), 0);
}

/* ---- Loop-thread guard ----------------------------------------------------------------------- */

typedef struct log_probe {
    pushlet_t *p;
    pthread_t test_thread;
    int loop_calls;       /* atomic */
    int stop_rc, free_rc; /* written once, before loop_calls is published */
    int start_rc;
} log_probe;

static void probe_logger(int level, const char *component, const char *msg, size_t len,
                         void *userdata)
{
    log_probe *lp = userdata;
    (void)level, (void)component, (void)msg, (void)len;
    if (pthread_equal(pthread_self(), lp->test_thread))
        return; /* records logged by our own calls (start/stop) */
    if (__atomic_load_n(&lp->loop_calls, __ATOMIC_ACQUIRE) == 0) {
        lp->stop_rc = pushlet_stop(lp->p);
        lp->free_rc = pushlet_free(lp->p);
        lp->start_rc = pushlet_start(lp->p);
    }
    __atomic_fetch_add(&lp->loop_calls, 1, __ATOMIC_RELEASE);
}

Test(broker, stop_from_loop_thread_is_refused)
{
    pushlet_t *p = new_broker();
    log_probe lp = {.p = p, .test_thread = pthread_self()};
    cr_assert_eq(pushlet_set_logger(p, probe_logger, PUSHLET_LOG_DEBUG, &lp), 0);
    int port = start(p);
    /* A client that connects and hangs up makes the loop log "closing connection" (debug). */
    int fd = tu_connect(port);
    cr_assert_geq(fd, 0);
    close(fd);
    int64_t deadline = tu_now_ms() + WAIT_MS;
    while (__atomic_load_n(&lp.loop_calls, __ATOMIC_ACQUIRE) == 0 && tu_now_ms() < deadline)
        tu_sleep_ms(5);
    cr_assert_gt(__atomic_load_n(&lp.loop_calls, __ATOMIC_ACQUIRE), 0,
                 "no log record on the loop thread");
    cr_assert_eq(lp.stop_rc, PUSHLET_EWRONGTHREAD);
    cr_assert_eq(lp.free_rc, PUSHLET_EWRONGTHREAD);
    cr_assert_eq(lp.start_rc, PUSHLET_EWRONGTHREAD);
    /* The refused calls changed nothing: the broker still serves. */
    tu_client c;
    subscribe(&c, port, "t");
    publish(p, "t", "alive");
    expect_event(&c, NULL, "message", "alive");
    tu_client_close(&c);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_eq(pushlet_set_logger(p, NULL, PUSHLET_LOG_OFF, NULL), 0);
    cr_assert_eq(pushlet_free(p), 0);
}

/* ---- Several brokers in one process ---------------------------------------------------------- */

Test(broker, three_brokers_independent, .timeout = 60)
{
    pushlet_t *b[3];
    tu_client c[3];
    int port[3];
    const char *name[3] = {"A", "B", "C"};
    char data[32];
    for (int i = 0; i < 3; i++)
        b[i] = new_broker();

    /* Start A and B, subscribe, then C: interleaved with use. */
    port[0] = start(b[0]);
    port[1] = start(b[1]);
    subscribe(&c[0], port[0], "t");
    subscribe(&c[1], port[1], "t");
    port[2] = start(b[2]);
    subscribe(&c[2], port[2], "t");
    cr_assert(port[0] != port[1] && port[1] != port[2] && port[0] != port[2]);

    /* Two rounds on every broker: each client sees its own broker's, in order, nothing else. */
    for (int round = 1; round <= 2; round++) {
        for (int i = 0; i < 3; i++) {
            snprintf(data, sizeof(data), "%s%d", name[i], round);
            publish(b[i], "t", data);
        }
        for (int i = 0; i < 3; i++) {
            snprintf(data, sizeof(data), "%s%d", name[i], round);
            char id[8];
            snprintf(id, sizeof(id), "%d", round);
            expect_event(&c[i], id, "message", data);
        }
    }
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pushlet_stat(b[i], PUSHLET_STAT_MESSAGES_IN), 2, "broker %s", name[i]);

    /* Stop B: only B's client ends; A and C keep delivering. */
    cr_assert_eq(pushlet_stop(b[1]), 0);
    cr_assert(tu_client_wait_eof(&c[1], WAIT_MS));
    tu_client_close(&c[1]);
    cr_assert_eq(pushlet_publish(b[1], "t", NULL, "x", 1), PUSHLET_ESTOPPED);
    publish(b[0], "t", "A3");
    publish(b[2], "t", "C3");
    expect_event(&c[0], "3", "message", "A3");
    expect_event(&c[2], "3", "message", "C3");

    /* Stop A, restart B on a new port: C unaffected, B serves again. */
    cr_assert_eq(pushlet_stop(b[0]), 0);
    cr_assert(tu_client_wait_eof(&c[0], WAIT_MS));
    tu_client_close(&c[0]);
    port[1] = start(b[1]);
    subscribe(&c[1], port[1], "t");
    publish(b[2], "t", "C4");
    publish(b[1], "t", "B-again");
    expect_event(&c[2], "4", "message", "C4");
    expect_event(&c[1], "1", "message", "B-again"); /* a new run: a new epoch */

    cr_assert_eq(pushlet_stop(b[2]), 0);
    cr_assert(tu_client_wait_eof(&c[2], WAIT_MS));
    publish(b[1], "t", "B-last");
    expect_event(&c[1], "2", "message", "B-last");
    cr_assert_eq(pushlet_stop(b[1]), 0);
    tu_client_close(&c[1]);
    tu_client_close(&c[2]);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(pushlet_free(b[i]), 0);
}

/* ---- Concurrent stops ------------------------------------------------------------------------ */

static void stop_in_thread(void *arg) { pushlet_stop(arg); }

static uint64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A second stop (or free) while one is under way must wait for it: returning early let
 * pushlet_free destroy a broker whose loop was still running. */
Test(broker, second_stop_waits_for_the_first, .timeout = 60)
{
    pushlet_t *p = new_broker();
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_STOP_TIMEOUT_MS, 1000), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_OUTPUT_BYTES, (int64_t)1 << 30), 0);
    int port = start(p);
    tu_client c;
    subscribe(&c, port, "slow"); /* never reads: the stop has to wait out its deadline */
    static char big[60000];
    memset(big, 'x', sizeof(big));
    /* More than loopback socket buffers absorb, so output is still queued at stop. */
    for (int i = 0; i < 800; i++) {
        int prc;
        while ((prc = pushlet_publish(p, "slow", NULL, big, sizeof(big))) == PUSHLET_EFULL)
            sched_yield();
        cr_assert_eq(prc, 0);
    }
    uv_thread_t first;
    uint64_t t0 = ms_now();
    cr_assert_eq(uv_thread_create(&first, stop_in_thread, p), 0);
    struct timespec pause = {0, 100 * 1000000};
    nanosleep(&pause, NULL);
    int rc = pushlet_stop(p);
    uint64_t waited = ms_now() - t0;
    cr_assert(rc == PUSHLET_ESTOPPED || rc == 0, "second stop: %s", pushlet_strerror(rc));
    cr_assert_geq(waited, 800, "the second stop returned after %llu ms, before the first ended",
                  (unsigned long long)waited);
    uv_thread_join(&first);
    start(p); /* stopped for real: it starts again */
    cr_assert_eq(pushlet_free(p), 0);
    tu_client_close(&c);
}
