/* The distributed mode's Redis layer (redis.c, redis_uv.c, redis_util.c) against real
 * redis-server processes: each test starts its own on a free loopback port (no persistence, in a
 * temporary directory) and kills it by PID. The client runs on a uv loop in the test thread. */
#include "redis.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Measurements go to stderr: Criterion's own log calls leak in its runner when tests run in
 * parallel (seen under LeakSanitizer). */
#define note(...) (fprintf(stderr, "[info] " __VA_ARGS__), fputc('\n', stderr))

/* ---- redis-server processes (testutil.c), asserted ------------------------------------------ */

typedef tu_redis srv;

static int free_port(void)
{
    int port = tu_free_port();
    cr_assert(port > 0, "no free loopback port");
    return port;
}

/* Runs one command on the server (db `db`); the caller frees the reply. */
static redisReply *srv_cmd(const srv *s, int db, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = tu_redis_vcmd(s, db, fmt, ap);
    va_end(ap);
    cr_assert(rep != NULL, "no reply from redis on port %d", s->port);
    return rep;
}

static long long srv_int(const srv *s, int db, const char *fmt, const char *arg)
{
    redisReply *rep = srv_cmd(s, db, fmt, arg);
    cr_assert(rep->type == REDIS_REPLY_INTEGER, "reply type %d", rep->type);
    long long v = rep->integer;
    freeReplyObject(rep);
    return v;
}

/* "calls=N" of a command in INFO commandstats (0 when never called). */
static long long srv_calls(const srv *s, const char *cmd)
{
    redisReply *rep = srv_cmd(s, 0, "INFO commandstats");
    char key[64];
    snprintf(key, sizeof(key), "cmdstat_%s:calls=", cmd);
    const char *p = strstr(rep->str, key);
    long long v = p ? atoll(p + strlen(key)) : 0;
    freeReplyObject(rep);
    return v;
}

/* Started again on the same port and directory. */
static void srv_spawn(srv *s) { cr_assert(tu_redis_spawn(s, 5000), "%s", s->error); }

/* A new server on `port`, requiring `password` unless NULL. */
static void srv_start(srv *s, const char *password, int port)
{
    memset(s, 0, sizeof(*s));
    s->password = password;
    s->port = port;
    cr_assert(tu_redis_start(s, 5000), "%s", s->error);
}

/* ---- A client on a loop, recording everything -------------------------------------------------
 */

typedef struct msg {
    char topic[130], event[70];
    char *data;
    size_t data_len;
    uint64_t epoch, seq;
    int64_t published_ms;
} msg;

typedef struct result {
    int status;
    char id[PL_ID_MAX];
    uint64_t epoch, seq;
    intptr_t tag;
} result;

typedef struct ctx {
    uv_loop_t *loop;
    pl_redis *r;
    int state;
    int downs, readys, resyncs;
    char error[512];
    msg msgs[512];
    size_t nmsgs;
    result pubs[512];
    size_t npubs;
    /* Last fetch. */
    int fetch_done, fetch_status;
    uint64_t fetch_epoch, fetch_last;
    size_t fetched;
    /* Resync handling: fetch what was missed. */
    bool auto_fetch;
    char topic[64];
    uint64_t known_epoch;
    bool free_on_ready;
} ctx;

static void on_state(pl_redis *r, int state, const char *error, void *ud)
{
    ctx *c = ud;
    c->state = state;
    if (state == PL_REDIS_DOWN) {
        c->downs++;
        snprintf(c->error, sizeof(c->error), "%s", error ? error : "");
    }
    if (state == PL_REDIS_READY) {
        c->readys++;
        if (c->free_on_ready) {
            pl_redis_free(r);
            c->r = NULL;
        }
    }
}

static bool have_seq(const ctx *c, uint64_t epoch, uint64_t seq)
{
    for (size_t i = 0; i < c->nmsgs; i++)
        if (c->msgs[i].epoch == epoch && c->msgs[i].seq == seq)
            return true;
    return false;
}

static void keep(ctx *c, const pl_redis_record *rec)
{
    if (rec->topic_len > 0 && have_seq(c, rec->epoch, rec->seq))
        return; /* live and fetched may overlap */
    cr_assert(c->nmsgs < 512);
    msg *m = &c->msgs[c->nmsgs++];
    snprintf(m->topic, sizeof(m->topic), "%.*s", (int)rec->topic_len, rec->topic);
    snprintf(m->event, sizeof(m->event), "%.*s", (int)rec->event_len, rec->event);
    m->data = malloc(rec->data_len + 1);
    memcpy(m->data, rec->data, rec->data_len);
    m->data[rec->data_len] = '\0';
    m->data_len = rec->data_len;
    m->epoch = rec->epoch;
    m->seq = rec->seq;
    m->published_ms = rec->published_ms;
}

static void on_message(pl_redis *r, const pl_redis_record *rec, void *ud) { keep(ud, rec); }

static void on_fetched(pl_redis *r, int status, uint64_t epoch, uint64_t last,
                       const pl_redis_record *msgs, size_t n, const char *error, void *ud);

static uint64_t last_seq_seen(const ctx *c, uint64_t epoch)
{
    uint64_t s = 0;
    for (size_t i = 0; i < c->nmsgs; i++)
        if (c->msgs[i].epoch == epoch && c->msgs[i].seq > s)
            s = c->msgs[i].seq;
    return s;
}

static void on_fetched(pl_redis *r, int status, uint64_t epoch, uint64_t last,
                       const pl_redis_record *msgs, size_t n, const char *error, void *ud)
{
    ctx *c = ud;
    c->fetch_status = status;
    c->fetch_epoch = epoch;
    c->fetch_last = last;
    if (status == 0 && c->auto_fetch && epoch != c->known_epoch) {
        /* Another epoch: our positions are void, read the new lineage from its start. */
        c->known_epoch = epoch;
        cr_assert(pl_redis_fetch(r, c->topic, strlen(c->topic), 0, 0, on_fetched, c) == 0);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        keep(c, &msgs[i]);
        c->fetched++;
    }
    c->fetch_done++;
}

static void on_resync(pl_redis *r, void *ud)
{
    ctx *c = ud;
    c->resyncs++;
    if (c->auto_fetch)
        cr_assert(pl_redis_fetch(r, c->topic, strlen(c->topic), last_seq_seen(c, c->known_epoch), 0,
                                 on_fetched, c) == 0);
}

static void on_published(pl_redis *r, int status, const char *id, uint64_t epoch, uint64_t seq,
                         const char *error, void *ud)
{
    ctx *c = ud;
    cr_assert(c->npubs < 512);
    result *p = &c->pubs[c->npubs++];
    p->status = status;
    snprintf(p->id, sizeof(p->id), "%s", id);
    p->epoch = epoch;
    p->seq = seq;
}

static void ctx_open(ctx *c, uv_loop_t *loop, pl_redis_options *o)
{
    memset(c, 0, sizeof(*c));
    c->loop = loop;
    c->state = PL_REDIS_CONNECTING;
    pl_redis_callbacks cb = {
        .on_state = on_state, .on_resync = on_resync, .on_message = on_message, .ud = c};
    cr_assert_eq(pl_redis_new(&c->r, loop, o, &cb), 0);
}

static void ctx_close(ctx *c)
{
    pl_redis_free(c->r);
    c->r = NULL;
    for (size_t i = 0; i < c->nmsgs; i++)
        free(c->msgs[i].data);
    c->nmsgs = 0;
}

static void options(pl_redis_options *o, const char *address)
{
    pl_redis_options_init(o);
    o->address = address;
    o->backoff_min_ms = 20;
    o->backoff_max_ms = 100;
}

static void on_tick(uv_timer_t *t) {}

/* Runs the loop until cond() or the timeout; the tick timer bounds each wait. */
static bool run_until(uv_loop_t *loop, bool (*cond)(void *), void *arg, int timeout_ms)
{
    uv_timer_t tick;
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 5, 5);
    int64_t deadline = tu_now_ms() + timeout_ms;
    bool ok;
    while (!(ok = cond(arg)) && tu_now_ms() < deadline)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

static void run_for(uv_loop_t *loop, int ms)
{
    int64_t until = tu_now_ms() + ms;
    uv_timer_t tick;
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 5, 5);
    while (tu_now_ms() < until)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* Every handle closed, nothing left on the loop. */
static void loop_done(uv_loop_t *loop)
{
    int64_t deadline = tu_now_ms() + 2000;
    while (uv_run(loop, UV_RUN_NOWAIT) != 0 && tu_now_ms() < deadline)
        usleep(1000);
    cr_assert_eq(uv_loop_close(loop), 0, "handles left on the loop");
}

static bool is_ready(void *a) { return ((ctx *)a)->state == PL_REDIS_READY; }
static bool is_down(void *a) { return ((ctx *)a)->state == PL_REDIS_DOWN; }
static bool fetch_done(void *a) { return ((ctx *)a)->fetch_done > 0; }

typedef struct want {
    ctx *c;
    size_t pubs, msgs;
} want;

static bool got(void *a)
{
    want *w = a;
    return w->c->npubs >= w->pubs && w->c->nmsgs >= w->msgs;
}

/* Runs the loop until c has `pubs` publish results and `msgs` messages, or the timeout. */
static bool got_within(ctx *c, size_t pubs, size_t msgs, int timeout_ms)
{
    want w = {c, pubs, msgs};
    return run_until(c->loop, got, &w, timeout_ms);
}

/* The data of publish_n()'s i-th message ("m<i>"); valid until the next call. */
static const char *nth_data(size_t i)
{
    static char data[32];
    snprintf(data, sizeof(data), "m%zu", i);
    return data;
}

static void publish_n(ctx *c, const char *topic, int from, int to)
{
    for (int i = from; i < to; i++) {
        const char *data = nth_data((size_t)i);
        cr_assert_eq(pl_redis_publish(c->r, topic, strlen(topic), "upd", 3, data, strlen(data), 0,
                                      on_published, c),
                     0);
    }
}

/* Fetches `topic` after `after_seq` (at most `max`, 0: the client's cap) and runs the loop until
 * the answer: fetch_* and fetched then describe this fetch alone. */
static bool run_fetch(ctx *c, const char *topic, uint64_t after_seq, uint32_t max)
{
    c->fetch_done = 0;
    c->fetched = 0;
    cr_assert_eq(pl_redis_fetch(c->r, topic, strlen(topic), after_seq, max, on_fetched, c), 0);
    return run_until(c->loop, fetch_done, c, 3000);
}

static void wait_ready(ctx *c)
{
    cr_assert(run_until(c->loop, is_ready, c, 3000), "not ready: %s", c->error);
}

/* ---- One test's setup: a server, a loop, the options its clients open with -------------------
 */

typedef struct fixture {
    srv s; /* none when s.dir is "" */
    uv_loop_t loop;
    char addr[160];
    pl_redis_options o; /* what the next client_open() uses */
    ctx *clients[2];    /* what fixture_end() closes */
} fixture;

/* Points the options at an address (printf-style) and sets every other option back to the
 * test defaults of options(). */
__attribute__((format(printf, 2, 3))) static void set_address(fixture *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->addr, sizeof(f->addr), fmt, ap);
    va_end(ap);
    options(&f->o, f->addr);
}

/* A loop, no server and no address yet. */
static void fixture_init(fixture *f)
{
    memset(f, 0, sizeof(*f));
    cr_assert_eq(uv_loop_init(&f->loop), 0);
}

/* A loop and a redis-server on a free port (requiring `password` unless NULL); the options
 * point at it over TCP. */
static void fixture_start(fixture *f, const char *password)
{
    fixture_init(f);
    srv_start(&f->s, password, free_port());
    set_address(f, "127.0.0.1:%d", f->s.port);
}

/* Opens c with the fixture's options; fixture_end() closes it. */
static void client_open(fixture *f, ctx *c)
{
    const size_t max = sizeof(f->clients) / sizeof(f->clients[0]);
    size_t i = 0;
    while (i < max && f->clients[i] != NULL && f->clients[i] != c)
        i++;
    cr_assert(i < max, "more clients than fixture_end() closes");
    f->clients[i] = c;
    ctx_open(c, &f->loop, &f->o);
}

static void client_ready(fixture *f, ctx *c)
{
    client_open(f, c);
    wait_ready(c);
}

/* Closes every client (again is fine), checks that nothing is left on the loop, ends the
 * server. */
static void fixture_end(fixture *f)
{
    for (size_t i = 0; i < sizeof(f->clients) / sizeof(f->clients[0]); i++)
        if (f->clients[i] != NULL)
            ctx_close(f->clients[i]);
    loop_done(&f->loop);
    if (f->s.dir[0] != '\0')
        tu_redis_stop(&f->s);
}

/* Every test is bounded in time: SIGALRM ends a stuck worker, which Criterion reports as a
 * crash. (Criterion 2.4.1's own .timeout leaks in its runner when tests run in parallel, which
 * LeakSanitizer reports and ctest then fails on.) */
static void bound_time(void) { alarm(30); }

TestSuite(redis, .init = bound_time, .fini = tu_redis_stop_all);

/* ---- Pure helpers -----------------------------------------------------------------------------
 */

Test(redis, helpers)
{
    pl_redis_addr a;
    cr_assert_eq(pl_redis_parse_address("127.0.0.1:6380", &a), 0);
    cr_assert(!a.is_unix && strcmp(a.host, "127.0.0.1") == 0 && a.port == 6380 && a.db == -1);
    cr_assert_eq(pl_redis_parse_address("localhost", &a), 0);
    cr_assert(strcmp(a.host, "localhost") == 0 && a.port == 6379);
    cr_assert_eq(pl_redis_parse_address("[::1]:7000", &a), 0);
    cr_assert(strcmp(a.host, "::1") == 0 && a.port == 7000);
    cr_assert_eq(pl_redis_parse_address("redis://:p%40ss@h:1/3", &a), 0);
    cr_assert(a.has_password && strcmp(a.password, "p@ss") == 0 && a.user[0] == '\0');
    cr_assert(strcmp(a.host, "h") == 0 && a.port == 1 && a.db == 3);
    cr_assert_eq(pl_redis_parse_address("redis://bob:pw@h", &a), 0);
    cr_assert(strcmp(a.user, "bob") == 0 && strcmp(a.password, "pw") == 0 && a.port == 6379);
    cr_assert_eq(pl_redis_parse_address("unix:/tmp/r.sock", &a), 0);
    cr_assert(a.is_unix && strcmp(a.host, "/tmp/r.sock") == 0);
    cr_assert_eq(pl_redis_parse_address("/tmp/r.sock", &a), 0);
    cr_assert(a.is_unix);
    const char *bad[] = {"",     "h:0",   "h:70000",   "h:x", "redis://h/x", "redis://:%4@h",
                         "[::1", "unix:", "rediss://h"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(pl_redis_parse_address(bad[i], &a), PUSHLET_EINVAL, "%s", bad[i]);

    /* FNV-1a 32: "a" -> 0xe40c292c. */
    cr_assert_eq(pl_redis_shard_of("a", 1, 0x7fffffff), 0xe40c292cu % 0x7fffffffu);
    cr_assert_eq(pl_redis_shard_of("anything", 8, 1), 0);
    int counts[2] = {0, 0};
    for (int i = 0; i < 1000; i++) {
        char t[16];
        int n = snprintf(t, sizeof(t), "topic%d", i);
        counts[pl_redis_shard_of(t, (size_t)n, 2)]++;
    }
    cr_assert(counts[0] > 400 && counts[1] > 400, "%d/%d", counts[0], counts[1]);

    pl_redis_record in = {.topic = "t",
                          .topic_len = 1,
                          .event = "e",
                          .event_len = 1,
                          .data = "a\0b",
                          .data_len = 3,
                          .epoch = 123456789,
                          .seq = 42,
                          .published_ms = 1700000000000},
                    out;
    char *buf;
    size_t len;
    cr_assert_eq(pl_redis_record_encode(&in, &buf, &len), 0);
    cr_assert_eq(pl_redis_record_decode(buf, len, &out), 0);
    cr_assert(out.topic_len == 1 && out.data_len == 3 && memcmp(out.data, "a\0b", 3) == 0);
    cr_assert(out.epoch == 123456789 && out.seq == 42 && out.published_ms == 1700000000000);
    cr_assert_eq(pl_redis_record_decode(buf, len - 1, &out), PUSHLET_EINVAL);
    free(buf);
    cr_assert_eq(pl_redis_record_decode("\x93\x01\x02\x03", 4, &out), PUSHLET_EINVAL);

    uint64_t e, s;
    cr_assert_eq(pl_redis_parse_id("k3x9q2ab-17", 11, &e, &s), 0);
    cr_assert_eq(s, 17);
    cr_assert_eq(pl_redis_parse_id("K-1", 3, &e, &s), PUSHLET_EINVAL);
}

/* ---- Against redis-server ---------------------------------------------------------------------
 */

Test(redis, publish_and_receive)
{
    fixture f;
    fixture_start(&f, NULL);
    ctx c;
    client_open(&f, &c);
    cr_assert_eq(pl_redis_subscribe(c.r, "news", 4), 0);
    cr_assert_eq(pl_redis_subscribe(c.r, "bad topic", 9), PUSHLET_EINVAL);
    wait_ready(&c);

    int64_t t0 = tu_now_ms();
    publish_n(&c, "news", 0, 19);
    cr_assert_eq(
        pl_redis_publish(c.r, "news", 4, NULL, 0, "line1\nli\0ne2", 12, 1234, on_published, &c), 0);
    cr_assert_eq(pl_redis_publish(c.r, "news", 4, "bad event", 9, "x", 1, 0, NULL, NULL),
                 PUSHLET_EINVAL);
    cr_assert(got_within(&c, 20, 20, 3000), "pubs %zu msgs %zu", c.npubs, c.nmsgs);
    note("20 publishes round trip: %lld ms", (long long)(tu_now_ms() - t0));
    uint64_t epoch = c.pubs[0].epoch;
    cr_assert_neq(epoch, 0);
    for (size_t i = 0; i < 20; i++) {
        cr_assert_eq(c.pubs[i].status, 0);
        cr_assert_eq(c.pubs[i].seq, i + 1, "publish %zu got seq %llu", i,
                     (unsigned long long)c.pubs[i].seq);
        cr_assert_eq(c.pubs[i].epoch, epoch);
        char id[PL_ID_MAX];
        pl_position_format(id, (pl_position){epoch, i + 1});
        cr_assert_str_eq(c.pubs[i].id, id);
        cr_assert_str_eq(c.msgs[i].topic, "news");
        cr_assert_eq(c.msgs[i].seq, i + 1);
        cr_assert_eq(c.msgs[i].epoch, epoch);
    }
    cr_assert_str_eq(c.msgs[0].data, "m0");
    cr_assert_str_eq(c.msgs[0].event, "upd");
    cr_assert_str_eq(c.msgs[19].event, "message");
    cr_assert_eq(c.msgs[19].data_len, 12);
    cr_assert(memcmp(c.msgs[19].data, "line1\nli\0ne2", 12) == 0);
    cr_assert_eq(c.msgs[19].published_ms, 1234);
    cr_assert(c.msgs[0].published_ms > 1600000000000);

    /* Publish-to-all: no history, no ID. */
    cr_assert_eq(pl_redis_publish_all(c.r, "bye", 3, "all", 3, 0, on_published, &c), 0);
    cr_assert(got_within(&c, 21, 21, 3000));
    cr_assert_eq(c.pubs[20].status, 0);
    cr_assert_str_eq(c.pubs[20].id, "");
    cr_assert_str_eq(c.msgs[20].topic, "");
    cr_assert_str_eq(c.msgs[20].data, "all");

    /* History after seq 15: 16..20. */
    cr_assert(run_fetch(&c, "news", 15, 0));
    cr_assert_eq(c.fetch_status, 0);
    cr_assert_eq(c.fetch_epoch, epoch);
    cr_assert_eq(c.fetch_last, 20);
    cr_assert_eq(c.fetched, 5);
    cr_assert_eq(c.nmsgs, 21); /* all were already kept from pub/sub: the same IDs */
    /* A topic never published: same epoch, nothing kept. */
    cr_assert(run_fetch(&c, "quiet", 0, 0));
    cr_assert(c.fetch_status == 0 && c.fetch_epoch == epoch && c.fetch_last == 0);
    cr_assert_eq(srv_int(&f.s, 0, "XLEN %s", "pushlet:h:{news}"), 20);

    pl_redis_stats st;
    pl_redis_get_stats(c.r, &st);
    cr_assert_eq(st.published, 21);
    cr_assert_eq(st.messages_in, 21);
    cr_assert_eq(st.decode_errors, 0);
    fixture_end(&f);
}

/* A fetch that returns records into a fresh context (no pub/sub copies). */
Test(redis, history_fetch_bounds)
{
    fixture f;
    fixture_start(&f, NULL);
    f.o.history_size = 5000;
    ctx c;
    client_ready(&f, &c);
    publish_n(&c, "h", 0, 50);
    cr_assert(got_within(&c, 50, 0, 3000));
    cr_assert(run_fetch(&c, "h", 10, 7));
    cr_assert_eq(c.fetched, 7);
    for (size_t i = 0; i < 7; i++) {
        cr_assert_eq(c.msgs[i].seq, 11 + i);
        cr_assert_str_eq(c.msgs[i].data, nth_data(10 + i));
        cr_assert_str_eq(c.msgs[i].topic, "h");
    }
    fixture_end(&f);
}

Test(redis, password_and_db)
{
    fixture f;
    fixture_start(&f, "s3cret");
    set_address(&f, "redis://:s3cret@127.0.0.1:%d/3", f.s.port);
    ctx c;
    client_open(&f, &c);
    cr_assert_eq(pl_redis_subscribe(c.r, "t", 1), 0);
    wait_ready(&c);
    publish_n(&c, "t", 0, 1);
    cr_assert(got_within(&c, 1, 1, 3000));
    cr_assert_eq(c.pubs[0].status, 0);
    cr_assert_eq(srv_int(&f.s, 3, "XLEN %s", "pushlet:h:{t}"), 1);
    cr_assert_eq(srv_int(&f.s, 0, "EXISTS %s", "pushlet:h:{t}"), 0);
    ctx_close(&c);

    /* Password and db as options instead. */
    set_address(&f, "127.0.0.1:%d", f.s.port);
    f.o.password = "s3cret";
    f.o.db = 2;
    client_ready(&f, &c);
    publish_n(&c, "t", 0, 1);
    cr_assert(got_within(&c, 1, 0, 3000));
    cr_assert_eq(srv_int(&f.s, 2, "XLEN %s", "pushlet:h:{t}"), 1);
    fixture_end(&f);
}

Test(redis, wrong_password)
{
    fixture f;
    fixture_start(&f, "s3cret");
    set_address(&f, "redis://:nope@127.0.0.1:%d", f.s.port);
    ctx c;
    client_open(&f, &c);
    int64_t t0 = tu_now_ms();
    cr_assert(run_until(&f.loop, is_down, &c, 2000), "no error reported");
    int64_t took = tu_now_ms() - t0;
    note("wrong password reported in %lld ms: %s", (long long)took, c.error);
    cr_assert(strstr(c.error, "redis: authentication failed") != NULL, "%s", c.error);
    cr_assert(strstr(c.error, "WRONGPASS") != NULL, "%s", c.error);
    cr_assert_str_eq(pl_redis_last_error(c.r), c.error);
    cr_assert_eq(c.readys, 0);
    /* Publishes wait (bounded) while it keeps retrying. */
    publish_n(&c, "t", 0, 3);
    cr_assert_eq(pl_redis_pending(c.r), 3);
    cr_assert_eq(pl_redis_fetch(c.r, "t", 1, 0, 0, on_fetched, &c), PUSHLET_ESTOPPED);
    run_for(&f.loop, 150);
    cr_assert(c.downs >= 2, "retries: %d", c.downs);
    cr_assert_eq(c.npubs, 0);
    ctx_close(&c);

    /* No password at all against a server that wants one. */
    set_address(&f, "127.0.0.1:%d", f.s.port);
    client_open(&f, &c);
    cr_assert(run_until(&f.loop, is_down, &c, 2000));
    cr_assert(strstr(c.error, "NOAUTH") != NULL, "%s", c.error);
    fixture_end(&f);
}

Test(redis, connection_refused)
{
    fixture f;
    fixture_init(&f);
    set_address(&f, "127.0.0.1:%d", free_port());
    ctx c;
    client_open(&f, &c);
    cr_assert(run_until(&f.loop, is_down, &c, 2000));
    cr_assert(strstr(c.error, "refused") != NULL, "%s", c.error);
    run_for(&f.loop, 300);
    cr_assert(c.downs >= 3, "retried %d times", c.downs);
    cr_assert_eq(c.readys, 0);
    ctx_close(&c);

    /* A unix socket that does not exist fails at once (before any adapter); a name that needs
     * resolving, and one that does not resolve. */
    char local[32];
    snprintf(local, sizeof(local), "localhost:%d", free_port());
    const struct {
        const char *addr, *error;
        int timeout_ms;
    } down[] = {{"unix:/tmp/pl-redis-test-missing/redis.sock", "cannot connect", 2000},
                {local, "refused", 3000},
                {"no-such-host.invalid:6379", "cannot resolve", 5000}};
    for (size_t i = 0; i < sizeof(down) / sizeof(down[0]); i++) {
        set_address(&f, "%s", down[i].addr);
        client_open(&f, &c);
        cr_assert(run_until(&f.loop, is_down, &c, down[i].timeout_ms), "%s", down[i].addr);
        cr_assert(strstr(c.error, down[i].error) != NULL, "%s: %s", down[i].addr, c.error);
        ctx_close(&c);
    }
    fixture_end(&f);
}

/* TOOLCHAIN.md: a context that never finished connecting is freed without onDisconnect; the
 * client must not keep a pointer to it (this double-freed with a naive adapter). */
Test(redis, create_and_free)
{
    fixture f;
    fixture_start(&f, NULL);
    ctx c;
    for (int i = 0; i < 20; i++) {
        client_open(&f, &c);
        ctx_close(&c); /* before the loop ever ran */
    }
    uv_run(&f.loop, UV_RUN_NOWAIT);
    for (int i = 0; i < 20; i++) {
        client_open(&f, &c);
        uv_run(&f.loop, UV_RUN_NOWAIT); /* connect in progress */
        ctx_close(&c);
    }
    uv_run(&f.loop, UV_RUN_NOWAIT);
    /* Freed with publishes in flight and subscriptions: no callback after free. */
    client_open(&f, &c);
    pl_redis_subscribe(c.r, "x", 1);
    wait_ready(&c);
    publish_n(&c, "x", 0, 10);
    ctx_close(&c);
    run_for(&f.loop, 50);
    cr_assert_eq(c.npubs, 0);
    /* Freed from inside its own state callback. */
    client_open(&f, &c);
    c.free_on_ready = true;
    wait_ready(&c);
    cr_assert(c.r == NULL);
    /* Against a refused port, freed while connecting and while down. */
    set_address(&f, "127.0.0.1:%d", free_port());
    client_open(&f, &c);
    ctx_close(&c);
    client_open(&f, &c);
    cr_assert(run_until(&f.loop, is_down, &c, 2000));
    fixture_end(&f);
}

typedef struct seen_wait {
    ctx *c;
    uint64_t epoch, seq;
} seen_wait;

static bool seen_all(void *a)
{
    seen_wait *w = a;
    return last_seq_seen(w->c, w->epoch) >= w->seq;
}

typedef struct pair {
    ctx *a, *b;
    int state;
} pair;

static bool both_state(void *arg)
{
    pair *p = arg;
    return p->a->state == p->state && p->b->state == p->state;
}

/* Redis killed (SIGKILL) mid-stream and restarted on the same port: both clients reconnect,
 * the subscriber resubscribes and resyncs, publishes made during the outage go out in order. */
Test(redis, kill_and_restart)
{
    fixture f;
    fixture_start(&f, NULL);
    f.o.backoff_min_ms = 50;
    f.o.backoff_max_ms = 200;
    ctx sub, pub;
    client_open(&f, &sub);
    client_open(&f, &pub);
    sub.auto_fetch = true;
    snprintf(sub.topic, sizeof(sub.topic), "feed");
    cr_assert_eq(pl_redis_subscribe(sub.r, "feed", 4), 0);
    pair p = {&sub, &pub, PL_REDIS_READY};
    cr_assert(run_until(&f.loop, both_state, &p, 3000));

    publish_n(&pub, "feed", 0, 10);
    cr_assert(got_within(&pub, 10, 0, 3000));
    cr_assert(got_within(&sub, 0, 10, 3000));
    uint64_t old_epoch = pub.pubs[0].epoch;
    sub.known_epoch = old_epoch;

    /* Some publishes in flight at the kill, then more while it is down. */
    publish_n(&pub, "feed", 10, 15);
    tu_redis_kill(&f.s);
    p.state = PL_REDIS_DOWN;
    cr_assert(run_until(&f.loop, both_state, &p, 3000));
    publish_n(&pub, "feed", 15, 25);
    cr_assert(pl_redis_pending(pub.r) >= 10);
    run_for(&f.loop, 300); /* a few failed retries */
    srv_spawn(&f.s);
    int64_t t0 = tu_now_ms();
    p.state = PL_REDIS_READY;
    cr_assert(run_until(&f.loop, both_state, &p, 5000), "no reconnect: %s / %s", sub.error,
              pub.error);
    note("reconnected %lld ms after restart", (long long)(tu_now_ms() - t0));
    cr_assert(got_within(&pub, 25, 0, 5000), "publishes answered: %zu", pub.npubs);
    cr_assert_eq(pl_redis_pending(pub.r), 0);

    /* Every queued publish succeeded, in call order, in the new lineage. */
    uint64_t new_epoch = pub.pubs[24].epoch;
    cr_assert_neq(new_epoch, old_epoch);
    size_t first_new = 10;
    while (first_new < 25 && pub.pubs[first_new].epoch != new_epoch)
        first_new++;
    for (size_t i = 10; i < 25; i++) {
        cr_assert_eq(pub.pubs[i].status, 0);
        if (i >= first_new) {
            cr_assert_eq(pub.pubs[i].epoch, new_epoch);
            cr_assert_eq(pub.pubs[i].seq, i - first_new + 1);
        }
    }
    /* The subscriber has every message of the new lineage, once, in order. */
    uint64_t n_new = pub.pubs[24].seq;
    cr_assert_eq(sub.resyncs, 1);
    seen_wait sw = {&sub, new_epoch, n_new};
    cr_assert(run_until(&f.loop, seen_all, &sw, 3000), "sub has %llu of %llu",
              (unsigned long long)last_seq_seen(&sub, new_epoch), (unsigned long long)n_new);
    uint64_t expect = 1;
    for (size_t i = 0; i < sub.nmsgs; i++) {
        if (sub.msgs[i].epoch != new_epoch)
            continue;
        cr_assert_eq(sub.msgs[i].seq, expect, "got seq %llu, expected %llu",
                     (unsigned long long)sub.msgs[i].seq, (unsigned long long)expect);
        cr_assert_str_eq(sub.msgs[i].data, nth_data(first_new + (size_t)(expect - 1)));
        expect++;
    }
    cr_assert_eq(expect, n_new + 1);
    pl_redis_stats st;
    pl_redis_get_stats(sub.r, &st);
    cr_assert(st.connects == 2 && st.disconnects == 1);
    note("subscriber: %zu live+fetched, %zu via fetch", sub.nmsgs, sub.fetched);
    fixture_end(&f);
}

/* The subscriber alone is cut off (its connections killed) while the publisher goes on: it
 * resyncs and fetches exactly what it missed, same epoch. */
Test(redis, cut_off_subscriber_fetches_missed)
{
    fixture f;
    fixture_start(&f, NULL);
    ctx sub, pub;
    f.o.backoff_min_ms = 400; /* the subscriber stays away a while */
    f.o.backoff_max_ms = 400;
    client_open(&f, &sub);
    options(&f.o, f.addr);
    client_open(&f, &pub);
    sub.auto_fetch = true;
    snprintf(sub.topic, sizeof(sub.topic), "feed");
    pl_redis_subscribe(sub.r, "feed", 4);
    pair p = {&sub, &pub, PL_REDIS_READY};
    cr_assert(run_until(&f.loop, both_state, &p, 3000));
    publish_n(&pub, "feed", 0, 5);
    cr_assert(got_within(&sub, 0, 5, 3000));
    uint64_t epoch = pub.pubs[0].epoch;
    sub.known_epoch = epoch;

    /* Kill every pub/sub connection: both clients drop, the publisher is back first. */
    freeReplyObject(srv_cmd(&f.s, 0, "CLIENT KILL TYPE pubsub"));
    cr_assert(run_until(&f.loop, is_down, &sub, 2000));
    cr_assert(run_until(&f.loop, is_ready, &pub, 2000));
    cr_assert(sub.state != PL_REDIS_READY);
    publish_n(&pub, "feed", 5, 12);
    cr_assert(got_within(&pub, 12, 0, 2000));
    cr_assert(sub.state != PL_REDIS_READY, "the subscriber came back too early");
    size_t live_before = sub.nmsgs;
    cr_assert_eq(live_before, 5);

    seen_wait sw = {&sub, epoch, 12};
    cr_assert(run_until(&f.loop, seen_all, &sw, 5000),
              "state %d resyncs %d fetches %d status %d fetched %zu msgs %zu err %s", sub.state,
              sub.resyncs, sub.fetch_done, sub.fetch_status, sub.fetched, sub.nmsgs, sub.error);
    cr_assert_eq(sub.resyncs, 1);
    cr_assert_eq(sub.fetched, 7, "fetched %zu", sub.fetched);
    for (size_t i = 0; i < sub.nmsgs; i++) {
        cr_assert_eq(sub.msgs[i].seq, i + 1);
        cr_assert_eq(sub.msgs[i].epoch, epoch);
    }
    cr_assert_eq(sub.nmsgs, 12);
    /* And live again afterwards. */
    publish_n(&pub, "feed", 12, 13);
    cr_assert(got_within(&sub, 0, 13, 3000));
    fixture_end(&f);
}

Test(redis, queue_bound)
{
    int port = free_port();
    fixture f;
    fixture_init(&f);
    set_address(&f, "127.0.0.1:%d", port);
    f.o.queue_max_count = 5;
    ctx c;
    client_open(&f, &c);
    cr_assert(run_until(&f.loop, is_down, &c, 2000));
    publish_n(&c, "q", 0, 5);
    cr_assert_eq(pl_redis_publish(c.r, "q", 1, NULL, 0, "x", 1, 0, on_published, &c),
                 PUSHLET_EFULL);
    cr_assert_eq(pl_redis_pending(c.r), 5);

    options(&f.o, f.addr);
    f.o.queue_max_bytes = 700;
    ctx b;
    client_open(&f, &b);
    char big[300];
    memset(big, 'b', sizeof(big));
    cr_assert_eq(pl_redis_publish(b.r, "q", 1, NULL, 0, big, sizeof(big), 0, NULL, NULL), 0);
    cr_assert_eq(pl_redis_publish(b.r, "q", 1, NULL, 0, big, sizeof(big), 0, NULL, NULL),
                 PUSHLET_EFULL);
    ctx_close(&b);

    /* Redis appears: the queue goes out in order. */
    srv_start(&f.s, NULL, port);
    cr_assert(got_within(&c, 5, 0, 3000));
    for (size_t i = 0; i < 5; i++) {
        cr_assert_eq(c.pubs[i].status, 0);
        cr_assert_eq(c.pubs[i].seq, i + 1);
    }
    /* Publishes go out once the command connection is up; fetches need READY. */
    wait_ready(&c);
    cr_assert(run_fetch(&c, "q", 0, 0));
    cr_assert_eq(c.fetched, 5);
    for (size_t i = 0; i < 5; i++)
        cr_assert_str_eq(c.msgs[i].data, nth_data(i));
    /* Room again. */
    cr_assert_eq(pl_redis_publish(c.r, "q", 1, NULL, 0, "x", 1, 0, NULL, NULL), 0);
    fixture_end(&f);
}

typedef struct chan_wait {
    const srv *s;
    long long want;
} chan_wait;

static bool channels_are(void *a)
{
    chan_wait *cw = a;
    redisReply *rep = srv_cmd(cw->s, 0, "PUBSUB CHANNELS %s", "pushlet:c:*");
    long long n = (long long)rep->elements;
    freeReplyObject(rep);
    return n == cw->want;
}

/* Subscribes (or unsubscribes) b0..b299, all in one loop turn. */
static void each_b_topic(ctx *c, int (*op)(pl_redis *r, const char *topic, size_t len))
{
    for (int i = 0; i < 300; i++) {
        char t[16];
        int n = snprintf(t, sizeof(t), "b%d", i);
        cr_assert_eq(op(c->r, t, (size_t)n), 0);
    }
}

Test(redis, subscriptions_are_batched)
{
    fixture f;
    fixture_start(&f, NULL);
    ctx c;
    client_ready(&f, &c);
    long long subs0 = srv_calls(&f.s, "subscribe");

    /* One loop turn: 300 topics, one of them twice, one added and removed again. */
    each_b_topic(&c, pl_redis_subscribe);
    pl_redis_subscribe(c.r, "b7", 2);
    pl_redis_subscribe(c.r, "gone", 4);
    pl_redis_unsubscribe(c.r, "gone", 4);
    chan_wait cw = {&f.s, 300};
    cr_assert(run_until(&f.loop, channels_are, &cw, 3000));
    cr_assert_eq(srv_calls(&f.s, "subscribe") - subs0, 1, "one SUBSCRIBE for 300 channels");
    pl_redis_stats st;
    pl_redis_get_stats(c.r, &st);
    cr_assert_eq(st.channels, 300);

    /* Messages flow on a batch-subscribed channel. */
    publish_n(&c, "b299", 0, 1);
    cr_assert(got_within(&c, 1, 1, 3000));
    cr_assert_str_eq(c.msgs[0].topic, "b299");

    each_b_topic(&c, pl_redis_unsubscribe);
    cw.want = 0;
    cr_assert(run_until(&f.loop, channels_are, &cw, 3000));
    cr_assert_eq(srv_calls(&f.s, "unsubscribe"), 1, "one UNSUBSCRIBE for 300 channels");
    run_for(&f.loop, 20);
    pl_redis_get_stats(c.r, &st);
    cr_assert_eq(st.channels, 0);
    cr_assert_eq(st.subscribe_commands, 2); /* pushlet:all + the batch */
    cr_assert_eq(st.unsubscribe_commands, 1);
    fixture_end(&f);
}

Test(redis, script_reloaded_after_flush)
{
    fixture f;
    fixture_start(&f, NULL);
    ctx c;
    client_ready(&f, &c);
    publish_n(&c, "s", 0, 1);
    cr_assert(got_within(&c, 1, 0, 3000));
    freeReplyObject(srv_cmd(&f.s, 0, "SCRIPT FLUSH"));
    publish_n(&c, "s", 1, 4);
    cr_assert(got_within(&c, 4, 0, 3000));
    for (size_t i = 0; i < 4; i++) {
        cr_assert_eq(c.pubs[i].status, 0, "publish %zu failed", i);
        cr_assert_eq(c.pubs[i].seq, i + 1);
    }
    pl_redis_stats st;
    pl_redis_get_stats(c.r, &st);
    cr_assert_eq(st.script_loads, 4);
    cr_assert(st.resent >= 1);
    cr_assert_eq(st.publish_errors, 0);

    freeReplyObject(srv_cmd(&f.s, 0, "SCRIPT FLUSH"));
    cr_assert(run_fetch(&c, "s", 0, 0));
    cr_assert_eq(c.fetch_status, 0);
    cr_assert_eq(c.fetched, 4);
    fixture_end(&f);
}

Test(redis, unix_socket_and_age_bound)
{
    fixture f;
    fixture_start(&f, NULL);
    set_address(&f, "unix:%s", f.s.sock);
    f.o.history_age_ms = 200;
    ctx c;
    client_ready(&f, &c);
    publish_n(&c, "aged", 0, 3);
    cr_assert(got_within(&c, 3, 0, 3000));
    cr_assert(run_fetch(&c, "aged", 0, 0));
    cr_assert_eq(c.fetched, 3);
    run_for(&f.loop, 300);
    /* Past the age: the fetch returns nothing (last_seq tells the caller it is a gap). */
    cr_assert(run_fetch(&c, "aged", 0, 0));
    cr_assert_eq(c.fetched, 0);
    cr_assert_eq(c.fetch_last, 3);
    /* Old entries are trimmed on the next publish too. */
    publish_n(&c, "aged", 3, 4);
    cr_assert(got_within(&c, 4, 0, 3000));
    cr_assert_eq(srv_int(&f.s, 0, "XLEN %s", "pushlet:h:{aged}"), 1);
    cr_assert_eq(c.pubs[3].seq, 4);
    fixture_end(&f);
}

/* A server that accepts (the kernel completes the handshake) but never answers: the attempt
 * ends at connect_timeout_ms instead of hanging. */
Test(redis, silent_server_times_out)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(fd, 16) == 0);
    socklen_t len = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &len);
    fixture f;
    fixture_init(&f);
    set_address(&f, "127.0.0.1:%d", ntohs(a.sin_port));
    f.o.connect_timeout_ms = 200;
    ctx c;
    client_open(&f, &c);
    int64_t t0 = tu_now_ms();
    cr_assert(run_until(&f.loop, is_down, &c, 2000));
    int64_t took = tu_now_ms() - t0;
    cr_assert(took >= 150 && took < 1000, "%lld ms", (long long)took);
    cr_assert(strstr(c.error, "timed out") != NULL, "%s", c.error);
    fixture_end(&f);
    close(fd);
}
