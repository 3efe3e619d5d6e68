/* Distributed mode through the public API (pushlet_enable_distributed_mode() and the brokers
 * that use it) against real redis-server processes: each test starts its own on a free loopback
 * port, in a temporary directory, and kills it by PID. Subscribers are raw SSE sockets
 * (testutil.c); Redis is inspected with a hiredis sync client. Every wait is bounded. */
#define _GNU_SOURCE /* strcasestr */
#include "pushlet.h"
#include "redis.h" /* pl_redis_shard_of: which shard a topic lives on */
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MS 5000

/* Measurements go to stderr: Criterion's own log calls leak in its runner when tests run in
 * parallel (seen under LeakSanitizer). */
#define note(...) (fprintf(stderr, "[info] " __VA_ARGS__), fputc('\n', stderr))

/* ---- redis-server processes (testutil.c), asserted ------------------------------------------ */

typedef tu_redis srv;

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

/* A string value ("" when the key is missing) or an integer, read into `out`. */
static void srv_get(const srv *s, int db, const char *key, char *out, size_t cap)
{
    redisReply *rep = srv_cmd(s, db, "GET %s", key);
    out[0] = '\0';
    if (rep->type == REDIS_REPLY_STRING)
        snprintf(out, cap, "%s", rep->str);
    freeReplyObject(rep);
}

static long long srv_int(const srv *s, int db, const char *fmt, const char *arg)
{
    redisReply *rep = srv_cmd(s, db, fmt, arg);
    cr_assert(rep->type == REDIS_REPLY_INTEGER, "reply type %d", rep->type);
    long long v = rep->integer;
    freeReplyObject(rep);
    return v;
}

/* How many keys match `pattern` in db `db`. */
static size_t srv_count_keys(const srv *s, int db, const char *pattern)
{
    redisReply *rep = srv_cmd(s, db, "KEYS %s", pattern);
    cr_assert(rep->type == REDIS_REPLY_ARRAY);
    size_t n = rep->elements;
    freeReplyObject(rep);
    return n;
}

/* Started again on the same port and directory. */
static void srv_spawn(srv *s) { cr_assert(tu_redis_spawn(s, 5000), "%s", s->error); }

/* A new server on a free port, requiring `password` unless NULL. */
static void srv_start(srv *s, const char *password, bool aof)
{
    memset(s, 0, sizeof(*s));
    s->password = password;
    s->aof = aof;
    cr_assert(tu_redis_start(s, 5000), "%s", s->error);
}

/* Every test is bounded in time: SIGALRM ends a stuck worker, which Criterion reports as a
 * crash. (Criterion 2.4.1's own .timeout leaks in its runner when tests run in parallel, which
 * LeakSanitizer reports and ctest then fails on.) */
static void bound_time(void)
{
    alarm(30);
    signal(SIGPIPE, SIG_IGN);
}

TestSuite(distributed, .init = bound_time, .fini = tu_redis_stop_all);

/* ---- Brokers ----------------------------------------------------------------------------------
 */

/* What the broker logged, kept to check the reasons it gives (and that passwords stay out). */
typedef struct logcap {
    pthread_mutex_t mu;
    char text[32768];
    size_t len;
} logcap;

static void capture(int level, const char *component, const char *msg, size_t len, void *ud)
{
    (void)level;
    logcap *l = ud;
    pthread_mutex_lock(&l->mu);
    int n = snprintf(l->text + l->len, sizeof(l->text) - l->len, "[%s] %.*s\n", component, (int)len,
                     msg);
    if (n > 0)
        l->len = l->len + (size_t)n < sizeof(l->text) ? l->len + (size_t)n : sizeof(l->text) - 1;
    pthread_mutex_unlock(&l->mu);
}

static bool logged(logcap *l, const char *what)
{
    pthread_mutex_lock(&l->mu);
    bool found = strstr(l->text, what) != NULL;
    pthread_mutex_unlock(&l->mu);
    return found;
}

static void logcap_init(logcap *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
}

/* A broker on 127.0.0.1 (a port picked by the kernel) logging into `l` when given. */
static pushlet_t *new_broker(logcap *l)
{
    pushlet_t *p = NULL;
    cr_assert_eq(pushlet_new(&p), 0);
    cr_assert_eq(pushlet_listen(p, "127.0.0.1", 0), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_STOP_TIMEOUT_MS, 2000), 0);
    if (l)
        cr_assert_eq(pushlet_set_logger(p, capture, PUSHLET_LOG_DEBUG, l), 0);
    return p;
}

static void enable(pushlet_t *p, const char *address, const char *password, int db)
{
    int rc = pushlet_enable_distributed_mode(p, address, password, db);
    cr_assert_eq(rc, 0, "enable_distributed_mode(%s): %s", address, pushlet_strerror(rc));
}

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
    int rc = pushlet_publish(p, topic, "upd", data, strlen(data));
    cr_assert_eq(rc, 0, "publish %s: %s", data, pushlet_strerror(rc));
}

/* Waits until a counter or gauge has `value`. */
static bool wait_stat(pushlet_t *p, pushlet_stat_t which, int64_t value, int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;
    while (pushlet_stat(p, which) != value) {
        if (tu_now_ms() > deadline)
            return false;
        tu_sleep_ms(5);
    }
    return true;
}

static void subscribe(tu_client *c, int port, const char *topic)
{
    cr_assert(tu_client_subscribe(c, port, topic, WAIT_MS), "subscribe to %s: status %d", topic,
              c->status);
}

/* The next event on `c` must be `event` with `data`; its id goes to `id` (when given). */
static void expect_event(tu_client *c, const char *event, const char *data, char *id, size_t cap)
{
    tu_event ev;
    int rc = tu_client_next(c, &ev, WAIT_MS);
    cr_assert_eq(rc, 1, "no event (want %s %s): %s", event, data, rc == 0 ? "EOF" : "timeout");
    cr_assert_str_eq(ev.event, event, "event %s (data %s), want %s", ev.event, ev.data, event);
    cr_assert_str_eq(ev.data, data);
    if (id)
        snprintf(id, cap, "%s", ev.id);
    tu_event_clear(&ev);
}

/* Nothing more arrives on `c` within `ms`. */
static void expect_quiet(tu_client *c, int ms)
{
    tu_event ev;
    int rc = tu_client_next(c, &ev, ms);
    if (rc == 1) {
        char got[256];
        snprintf(got, sizeof(got), "%s %s %s", ev.event, ev.id, ev.data);
        tu_event_clear(&ev);
        cr_assert_fail("unexpected event: %s", got);
    }
}

/* "EPOCH-SEQ" from the cluster epoch Redis keeps. */
static void expected_id(const srv *s, int db, uint64_t seq, char *out, size_t cap)
{
    char epoch[32];
    srv_get(s, db, "pushlet:epoch", epoch, sizeof(epoch));
    cr_assert(epoch[0] != '\0', "no pushlet:epoch in Redis");
    snprintf(out, cap, "%s-%llu", epoch, (unsigned long long)seq);
}

/* A whole HTTP answer (Connection: close) from the broker. */
static void http_get(int port, const char *path, tu_buf *out)
{
    int fd = tu_connect(port);
    cr_assert(fd >= 0);
    char req[256];
    int n =
        snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    cr_assert(tu_send_all(fd, req, (size_t)n));
    char buf[4096];
    long got;
    while ((got = tu_recv(fd, buf, sizeof(buf), WAIT_MS)) > 0)
        tu_buf_append(out, buf, (size_t)got);
    close(fd);
    cr_assert(out->len > 0 && got == 0, "GET %s: no complete answer", path);
}

/* ---- Setups the tests share --------------------------------------------------------------- */

/* A new server on a free port (no password) and its "127.0.0.1:PORT" address. */
static void srv_start_tcp(srv *s, bool aof, char *addr, size_t cap)
{
    srv_start(s, NULL, aof);
    snprintf(addr, cap, "127.0.0.1:%d", s->port);
}

/* Starts `p` and waits until every shard is up; the broker's port. */
static int start_ready(pushlet_t *p)
{
    int port = start(p);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 0, WAIT_MS));
    return port;
}

/* The next event on `c` must be "upd" with `data`, under the ID Redis gave sequence `seq`. */
static void expect_upd_seq(tu_client *c, const srv *s, int db, uint64_t seq, const char *data)
{
    char id[64], want[64];
    expect_event(c, "upd", data, id, sizeof(id));
    expected_id(s, db, seq, want, sizeof(want));
    cr_assert_str_eq(id, want, "%s", data);
}

/* Redis killed: `p` notices the shard down. */
static void redis_down(srv *s, pushlet_t *p)
{
    tu_redis_kill(s);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 1, WAIT_MS), "down not noticed");
}

/* Redis started again on its port and directory: `p` is back on every shard. */
static void redis_back(srv *s, pushlet_t *p)
{
    srv_spawn(s);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 0, 10000), "not back");
}

/* A test's end: its subscriber closed, its broker freed without error, its server ended. */
static void end_one(tu_client *c, pushlet_t *p, srv *s)
{
    tu_client_close(c);
    cr_assert_eq(pushlet_free(p), 0);
    tu_redis_stop(s);
}

/* The same with two subscribers and two brokers. */
static void end_two(tu_client *ca, tu_client *cb, pushlet_t *a, pushlet_t *b, srv *s)
{
    tu_client_close(ca);
    tu_client_close(cb);
    cr_assert_eq(pushlet_free(a), 0);
    cr_assert_eq(pushlet_free(b), 0);
    tu_redis_stop(s);
}

/* GET `path` on the broker: the answer contains `want`. */
static void expect_in_page(int port, const char *path, const char *want)
{
    tu_buf b = {0};
    http_get(port, path, &b);
    cr_assert(strstr(b.p, want) != NULL, "no %s in %s: %s", want, path, b.p);
    tu_buf_free(&b);
}

/* ---- Arguments and the start-up check -------------------------------------------------------- */

Test(distributed, invalid_arguments)
{
    pushlet_t *p = new_broker(NULL);
    int64_t t0 = tu_now_ms();
    cr_assert_eq(pushlet_enable_distributed_mode(NULL, "127.0.0.1:6379", NULL, 0), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_enable_distributed_mode(p, NULL, NULL, 0), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_enable_distributed_mode(p, "", NULL, 0), PUSHLET_EINVAL);
    const char *bad[] = {"h:x",
                         "h:0",
                         "h:70000",
                         "127.0.0.1:",
                         ":6379",
                         "redis://h/x",
                         "[::1",
                         "unix:",
                         "rediss://h",
                         "redis://:%4@h",
                         "http://127.0.0.1:6379"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = pushlet_enable_distributed_mode(p, bad[i], NULL, 0);
        cr_assert_eq(rc, PUSHLET_EINVAL, "%s: %s", bad[i], pushlet_strerror(rc));
    }
    /* Refused before anything is contacted (nothing listens on port 1 anyway). */
    cr_assert_eq(pushlet_enable_distributed_mode(p, "127.0.0.1:1", NULL, -1), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_enable_distributed_mode(p, "127.0.0.1:1", "pw", -7), PUSHLET_EINVAL);
    cr_assert_lt(tu_now_ms() - t0, 1000);
    /* None of it left a shard behind: the broker runs on its own. */
    int port = start(p);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN), 0);
    tu_client c;
    subscribe(&c, port, "solo");
    publish(p, "solo", "x");
    expect_event(&c, "upd", "x", NULL, 0);
    tu_buf b = {0};
    http_get(port, "/stats", &b);
    cr_assert(strstr(b.p, "\"redis\":{") == NULL, "%s", b.p);
    tu_buf_free(&b);
    tu_client_close(&c);
    cr_assert_eq(pushlet_free(p), 0);
}

Test(distributed, unreachable_is_unavailable)
{
    logcap l;
    logcap_init(&l);
    pushlet_t *p = new_broker(&l);
    char addr[160];
    int port = tu_free_port();
    cr_assert(port > 0);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    int64_t t0 = tu_now_ms();
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EUNAVAILABLE);
    cr_assert_lt(tu_now_ms() - t0, 1000, "a refused connection is reported at once");
    cr_assert(logged(&l, "cannot connect"), "%s", l.text);
    cr_assert_eq(pushlet_enable_distributed_mode(p, "unix:/tmp/pl-no-such-redis.sock", NULL, 0),
                 PUSHLET_EUNAVAILABLE);

    /* A server that accepts (the kernel completes the handshake) but never answers: the check
     * gives up after its 5 s bound. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(fd, 16) == 0);
    socklen_t len = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &len);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(a.sin_port));
    t0 = tu_now_ms();
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EUNAVAILABLE);
    int64_t took = tu_now_ms() - t0;
    note("silent server: EUNAVAILABLE after %lld ms", (long long)took);
    cr_assert(took >= 3000 && took <= 6500, "%lld ms", (long long)took);
    close(fd);
    /* Still usable without Redis. */
    start(p);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN), 0);
    cr_assert_eq(pushlet_free(p), 0);
}

Test(distributed, refused_password_or_db_is_eauth)
{
    srv s;
    srv_start(&s, "s3cret", false);
    logcap l;
    logcap_init(&l);
    pushlet_t *p = new_broker(&l);
    char addr[160];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", s.port);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, "Xwrong-pwX", 0), PUSHLET_EAUTH);
    cr_assert(logged(&l, "WRONGPASS"), "%s", l.text);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EAUTH);
    cr_assert(logged(&l, "NOAUTH"), "%s", l.text);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, "", 0), PUSHLET_EAUTH, "\"\" = none");
    snprintf(addr, sizeof(addr), "redis://:Xwrong-urlX@127.0.0.1:%d", s.port);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, "s3cret", 0), PUSHLET_EAUTH,
                 "the URL's password wins");
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", s.port);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, "s3cret", 99), PUSHLET_EAUTH,
                 "db out of range");
    cr_assert(logged(&l, "DB index"), "%s", l.text);

    /* An ACL user in the URL. */
    freeReplyObject(srv_cmd(&s, 0, "ACL SETUSER bob on >bobpw ~* &* +@all"));
    snprintf(addr, sizeof(addr), "redis://bob:Xwrong-aclX@127.0.0.1:%d", s.port);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EAUTH);
    cr_assert(!logged(&l, "s3cret") && !logged(&l, "Xwrong-"), "a password in the log: %s", l.text);
    /* Nothing was added by the refusals: the broker runs without Redis. */
    start(p);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN), 0);
    cr_assert_eq(pushlet_free(p), 0);

    /* The right ones. */
    p = new_broker(NULL);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", s.port);
    enable(p, addr, "s3cret", 0);
    cr_assert_eq(pushlet_free(p), 0, "freed without ever starting");
    p = new_broker(NULL);
    snprintf(addr, sizeof(addr), "redis://bob:bobpw@127.0.0.1:%d", s.port);
    enable(p, addr, NULL, 0);
    int port = start_ready(p);
    tu_client c;
    subscribe(&c, port, "acl");
    publish(p, "acl", "as bob");
    expect_event(&c, "upd", "as bob", NULL, 0);
    end_one(&c, p, &s);
}

/* A redis:// URL's password and db win over the separate ones; every key is in that db. */
Test(distributed, url_password_and_db)
{
    srv s;
    srv_start(&s, "pw", false);
    logcap l;
    logcap_init(&l);
    pushlet_t *p = new_broker(&l);
    char addr[160];
    snprintf(addr, sizeof(addr), "redis://:pw@127.0.0.1:%d/3", s.port);
    enable(p, addr, "not-this-one", 1);
    int port = start_ready(p);
    tu_client c;
    subscribe(&c, port, "k");
    publish(p, "k", "in db 3");
    expect_upd_seq(&c, &s, 3, 1, "in db 3");
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));

    cr_assert_eq(srv_int(&s, 3, "EXISTS %s", "pushlet:epoch"), 1);
    cr_assert_eq(srv_int(&s, 3, "EXISTS %s", "pushlet:s:{k}"), 1);
    cr_assert_eq(srv_int(&s, 3, "XLEN %s", "pushlet:h:{k}"), 1);
    cr_assert_geq(srv_count_keys(&s, 3, "pushlet:*"), 3);
    cr_assert_eq(srv_count_keys(&s, 0, "pushlet:*"), 0, "keys in db 0");
    cr_assert_eq(srv_count_keys(&s, 1, "pushlet:*"), 0, "keys in db 1");

    /* The address shows without its password, in /stats, /metrics and the log. */
    tu_buf b = {0};
    http_get(port, "/stats", &b);
    char where[64];
    snprintf(where, sizeof(where), "\"address\":\"127.0.0.1:%d/3\"", s.port);
    cr_assert(strstr(b.p, where) != NULL, "%s", b.p);
    cr_assert(strstr(b.p, "\"redis\":{\"state\":\"ready\"") != NULL, "%s", b.p);
    cr_assert(strstr(b.p, "pw@") == NULL && strstr(b.p, "not-this-one") == NULL, "%s", b.p);
    tu_buf_reset(&b);
    http_get(port, "/metrics", &b);
    cr_assert(strstr(b.p, "pushlet_redis_up{shard=\"0\"} 1") != NULL, "%s", b.p);
    tu_buf_free(&b);
    cr_assert(logged(&l, "ready"), "%s", l.text);
    cr_assert(!logged(&l, "pw@") && !logged(&l, "not-this-one"), "%s", l.text);
    end_one(&c, p, &s);
}

typedef struct loop_call {
    pushlet_t *p;
    const char *addr;
    int rc; /* atomic; 1 = not called yet */
} loop_call;

static void on_connected(pushlet_t *p, const pushlet_event_t *e, void *ud)
{
    loop_call *lc = ud;
    (void)e;
    __atomic_store_n(&lc->rc, pushlet_enable_distributed_mode(p, lc->addr, NULL, 0),
                     __ATOMIC_RELEASE);
}

Test(distributed, ebusy_while_running)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    enable(p, addr, NULL, 0);
    loop_call lc = {p, addr, 1};
    cr_assert_eq(pushlet_set_event_handler(p, on_connected, PUSHLET_EVENT_CONNECTED, &lc), 0);
    int port = start(p);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EBUSY);
    cr_assert_eq(pushlet_enable_distributed_mode(p, "x:y", NULL, 0), PUSHLET_EINVAL);
    tu_client c;
    subscribe(&c, port, "busy");
    int64_t deadline = tu_now_ms() + WAIT_MS;
    while (__atomic_load_n(&lc.rc, __ATOMIC_ACQUIRE) == 1 && tu_now_ms() < deadline)
        tu_sleep_ms(5);
    cr_assert_eq(__atomic_load_n(&lc.rc, __ATOMIC_ACQUIRE), PUSHLET_EWRONGTHREAD,
                 "from the loop thread");
    /* The refused calls left the running broker alone. */
    publish(p, "busy", "still here");
    expect_upd_seq(&c, &s, 0, 1, "still here");
    tu_client_close(&c);
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_eq(pushlet_free(p), 0);
    tu_redis_stop(&s);
}

Test(distributed, unix_socket)
{
    srv s;
    srv_start(&s, NULL, false);
    char addr[160];
    snprintf(addr, sizeof(addr), "unix:%s", s.sock);
    pushlet_t *a = new_broker(NULL), *b = new_broker(NULL);
    enable(a, addr, NULL, 0);
    enable(b, s.sock, NULL, 0); /* a bare path */
    int pa = start_ready(a), pb = start_ready(b);
    tu_client ca, cb;
    subscribe(&ca, pa, "u");
    subscribe(&cb, pb, "u");
    publish(a, "u", "over a unix socket");
    char ida[64], idb[64], want[64];
    expect_event(&ca, "upd", "over a unix socket", ida, sizeof(ida));
    expect_event(&cb, "upd", "over a unix socket", idb, sizeof(idb));
    expected_id(&s, 0, 1, want, sizeof(want));
    cr_assert_str_eq(ida, want);
    cr_assert_str_eq(idb, want);
    char where[200];
    snprintf(where, sizeof(where), "\"address\":\"%s/0\"", s.sock);
    expect_in_page(pa, "/stats", where);
    end_two(&ca, &cb, a, b, &s);
}

/* ---- Publishing through Redis ---------------------------------------------------------------- */

/* Two brokers on one Redis: a publish on either reaches the subscribers of both, with the same
 * ID, whose epoch is the one in pushlet:epoch and whose sequence is the topic's in Redis. */
Test(distributed, round_trip_ids_across_brokers)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *a = new_broker(NULL), *b = new_broker(NULL);
    enable(a, addr, NULL, 0);
    enable(b, addr, NULL, 0);
    char epoch_a[32];
    srv_get(&s, 0, "pushlet:epoch", epoch_a, sizeof(epoch_a));
    cr_assert(epoch_a[0], "the first enable set the cluster epoch");
    int pa = start(a), pb = start(b);
    tu_client ca, cb;
    subscribe(&ca, pa, "news");
    subscribe(&cb, pb, "news");
    cr_assert_eq(pushlet_topic_subscribers(a, "news"), 1);
    cr_assert_eq(pushlet_topic_subscribers(b, "news"), 1);

    /* Publishes of different brokers are ordered by Redis: one at a time for a known order. */
    publish(a, "news", "one");
    cr_assert(wait_stat(a, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));
    publish(b, "news", "two");
    cr_assert(wait_stat(b, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));
    publish(a, "news", "three");
    char want[3][64], ida[64], idb[64];
    for (int i = 0; i < 3; i++)
        expected_id(&s, 0, (uint64_t)i + 1, want[i], sizeof(want[i]));
    cr_assert(strncmp(want[0], epoch_a, strlen(epoch_a)) == 0, "epoch changed");
    const char *data[3] = {"one", "two", "three"};
    for (int i = 0; i < 3; i++) {
        expect_event(&ca, "upd", data[i], ida, sizeof(ida));
        expect_event(&cb, "upd", data[i], idb, sizeof(idb));
        cr_assert_str_eq(ida, want[i]);
        cr_assert_str_eq(idb, want[i]);
    }
    expect_quiet(&ca, 100);
    expect_quiet(&cb, 0);
    cr_assert_eq(srv_int(&s, 0, "XLEN %s", "pushlet:h:{news}"), 3);
    char seq[16];
    srv_get(&s, 0, "pushlet:s:{news}", seq, sizeof(seq));
    cr_assert_str_eq(seq, "3");
    cr_assert_eq(pushlet_stat(a, PUSHLET_STAT_MESSAGES_IN), 2);
    cr_assert_eq(pushlet_stat(b, PUSHLET_STAT_MESSAGES_IN), 1);
    cr_assert_eq(pushlet_stat(a, PUSHLET_STAT_REDIS_PUBLISH_ERRORS), 0);

    /* A late subscriber on B resumes from A's first ID: B serves it (history from Redis). */
    tu_client late;
    char path[128];
    snprintf(path, sizeof(path), "/events?topic=news&last_event_id=%s", want[0]);
    cr_assert(tu_client_open(&late, pb, path, NULL, NULL));
    char cid[64];
    expect_event(&late, "connected", "Connection established", cid, sizeof(cid));
    cr_assert_str_eq(cid, want[0], "the connected event carries the resume position");
    expect_event(&late, "upd", "two", idb, sizeof(idb));
    cr_assert_str_eq(idb, want[1]);
    expect_event(&late, "upd", "three", idb, sizeof(idb));
    cr_assert_str_eq(idb, want[2]);
    expect_quiet(&late, 100);
    tu_client_close(&late);

    end_two(&ca, &cb, a, b, &s);
}

/* ---- Outages ----------------------------------------------------------------------------------
 */

/* Redis killed (SIGKILL) and started again with its data (AOF): redis_shards_down follows it, a
 * publish made meanwhile waits and is delivered once it is back, with the next ID of the same
 * epoch and no gap. */
Test(distributed, outage_with_data_kept)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, true, addr, sizeof(addr));
    logcap l;
    logcap_init(&l);
    pushlet_t *p = new_broker(&l);
    enable(p, addr, NULL, 0);
    int port = start_ready(p);
    tu_client c;
    subscribe(&c, port, "live");
    publish(p, "live", "before");
    expect_upd_seq(&c, &s, 0, 1, "before");

    tu_redis_kill(&s);
    int64_t t0 = tu_now_ms();
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 1, WAIT_MS), "down not noticed");
    note("outage noticed after %lld ms", (long long)(tu_now_ms() - t0));
    publish(p, "live", "while down");
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 1, WAIT_MS));
    expect_quiet(&c, 300); /* never delivered before Redis stored it */
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_PENDING), 1);
    tu_buf b = {0};
    http_get(port, "/stats", &b);
    cr_assert(strstr(b.p, "\"redis\":{\"state\":\"down\"") != NULL, "%s", b.p);
    tu_buf_reset(&b);
    http_get(port, "/metrics", &b);
    cr_assert(strstr(b.p, "pushlet_redis_up{shard=\"0\"} 0") != NULL, "%s", b.p);
    cr_assert(strstr(b.p, "pushlet_redis_shards_down 1") != NULL, "%s", b.p);
    tu_buf_free(&b);

    srv_spawn(&s);
    t0 = tu_now_ms();
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 0, 10000), "not back");
    note("ready again %lld ms after the restart", (long long)(tu_now_ms() - t0));
    expect_upd_seq(&c, &s, 0, 2, "while down"); /* same epoch, next sequence */
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));
    publish(p, "live", "after");
    expect_upd_seq(&c, &s, 0, 3, "after");
    expect_quiet(&c, 100);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_GAPS), 0);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_PUBLISH_ERRORS), 0);
    cr_assert_geq(pushlet_stat(p, PUSHLET_STAT_REDIS_CATCH_UPS), 2, "joined, then caught up");
    cr_assert(logged(&l, "down:") && logged(&l, "ready again"), "%s", l.text);
    end_one(&c, p, &s);
}

/* Redis restarted without its data: a new epoch. Live subscribers get a gap (epoch_changed),
 * then the new messages with IDs of the new epoch. */
Test(distributed, outage_with_data_lost)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    enable(p, addr, NULL, 0);
    int port = start(p);
    tu_client c;
    subscribe(&c, port, "fresh");
    publish(p, "fresh", "old");
    char id[64], old[64], want[64];
    expect_event(&c, "upd", "old", old, sizeof(old));
    expected_id(&s, 0, 1, want, sizeof(want));
    cr_assert_str_eq(old, want);

    redis_down(&s, p);
    redis_back(&s, p);
    publish(p, "fresh", "new");
    expect_event(&c, "gap", "{\"topic\":\"fresh\",\"reason\":\"epoch_changed\"}", NULL, 0);
    expect_event(&c, "upd", "new", id, sizeof(id));
    expected_id(&s, 0, 1, want, sizeof(want));
    cr_assert_str_eq(id, want, "seq 1 of the new epoch");
    cr_assert_str_neq(id, old);
    expect_quiet(&c, 100);
    end_one(&c, p, &s);
}

/* ---- Shards -----------------------------------------------------------------------------------
 */

/* Two shards: each topic's keys are on the shard its name hashes to, with that shard's epoch;
 * both shards get some. One shard down stops only its own topics. */
Test(distributed, two_shards)
{
    srv s[2];
    srv_start(&s[0], NULL, false);
    srv_start(&s[1], NULL, true);
    char addr[2][64];
    pushlet_t *p = new_broker(NULL);
    for (int i = 0; i < 2; i++) {
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", s[i].port);
        enable(p, addr[i], NULL, 0);
    }
    int port = start_ready(p);
    enum { NT = 20 };
    char topics[NT][16];
    int shard[NT], per_shard[2] = {0, 0}, first[2] = {-1, -1};
    for (int i = 0; i < NT; i++) {
        int n = snprintf(topics[i], sizeof(topics[i]), "topic%d", i);
        shard[i] = (int)pl_redis_shard_of(topics[i], (size_t)n, 2);
        per_shard[shard[i]]++;
        if (first[shard[i]] < 0)
            first[shard[i]] = i;
    }
    cr_assert(per_shard[0] > 0 && per_shard[1] > 0, "the names hash to one shard only");
    /* One stream over a topic of each shard. */
    tu_client c;
    char path[128];
    snprintf(path, sizeof(path), "/events?topic=%s&topic=%s", topics[first[0]], topics[first[1]]);
    cr_assert(tu_client_open(&c, port, path, NULL, NULL));
    char cid[128];
    expect_event(&c, "connected", "Connection established", cid, sizeof(cid));

    for (int i = 0; i < NT; i++)
        publish(p, topics[i], topics[i]);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));
    char epoch[2][32];
    for (int k = 0; k < 2; k++) {
        srv_get(&s[k], 0, "pushlet:epoch", epoch[k], sizeof(epoch[k]));
        cr_assert(epoch[k][0]);
        cr_assert_eq(srv_count_keys(&s[k], 0, "pushlet:s:*"), (size_t)per_shard[k], "shard %d", k);
    }
    cr_assert_str_neq(epoch[0], epoch[1], "each shard drew its own epoch");
    for (int i = 0; i < NT; i++) {
        char key[40];
        snprintf(key, sizeof(key), "pushlet:h:{%s}", topics[i]);
        cr_assert_eq(srv_int(&s[shard[i]], 0, "EXISTS %s", key), 1, "%s", key);
        cr_assert_eq(srv_int(&s[!shard[i]], 0, "EXISTS %s", key), 0, "%s", key);
    }
    note("topics per shard: %d / %d", per_shard[0], per_shard[1]);
    /* The stream's cursors hold each topic's position with its own shard's epoch: first
     * "E0-0.E1-0~check" (connected), then one position moves per message. The two shards'
     * messages may come in either order. */
    char want[128];
    snprintf(want, sizeof(want), "%s-0.%s-0~", epoch[0], epoch[1]);
    cr_assert(strncmp(cid, want, strlen(want)) == 0, "connected cursor %s, want %s...", cid, want);
    int at[2] = {0, 0};
    for (int n = 0; n < 2; n++) {
        tu_event ev;
        cr_assert_eq(tu_client_next(&c, &ev, WAIT_MS), 1);
        int k = strcmp(ev.data, topics[first[0]]) == 0 ? 0 : 1;
        cr_assert_str_eq(ev.data, topics[first[k]]);
        cr_assert_eq(at[k], 0, "%s twice", ev.data);
        at[k] = 1;
        snprintf(want, sizeof(want), "%s-%d.%s-%d~", epoch[0], at[0], epoch[1], at[1]);
        cr_assert(strncmp(ev.id, want, strlen(want)) == 0, "cursor %s, want %s...", ev.id, want);
        tu_event_clear(&ev);
    }

    /* Shard 1 down: shard 0's topics flow, shard 1's wait for it. */
    redis_down(&s[1], p);
    publish(p, topics[first[1]], "waits");
    publish(p, topics[first[0]], "flows");
    expect_event(&c, "upd", "flows", NULL, 0);
    expect_in_page(port, "/stats", "\"redis\":{\"state\":\"degraded\"");
    redis_back(&s[1], p);
    expect_event(&c, "upd", "waits", NULL, 0);
    expect_quiet(&c, 100);
    tu_client_close(&c);
    cr_assert_eq(pushlet_free(p), 0);
    tu_redis_stop(&s[0]);
    tu_redis_stop(&s[1]);
}

/* ---- Stopping ---------------------------------------------------------------------------------
 */

/* Redis down while the broker stops, with publishes waiting for it and a subscription waiting
 * to join its topic: the stop ends by the stop deadline; nothing leaks (ASan). The broker
 * starts again afterwards. */
Test(distributed, stop_with_redis_down)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_STOP_TIMEOUT_MS, 300), 0);
    enable(p, addr, NULL, 0);
    int port = start(p);
    tu_client c;
    subscribe(&c, port, "here");
    redis_down(&s, p);
    for (int i = 0; i < 20; i++)
        publish(p, i % 2 ? "here" : "elsewhere", "lost");
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 20, WAIT_MS));
    tu_client waiting; /* a topic not followed yet: parked until it can be joined */
    cr_assert(tu_client_open(&waiting, port, "/events?topic=new", NULL, NULL));
    tu_sleep_ms(50);
    int64_t t0 = tu_now_ms();
    cr_assert_eq(pushlet_stop(p), 0);
    int64_t took = tu_now_ms() - t0;
    note("stop with Redis down: %lld ms (deadline 300)", (long long)took);
    cr_assert_lt(took, 300 + 1500, "stop took %lld ms", (long long)took);
    cr_assert(tu_client_wait_eof(&c, WAIT_MS));
    cr_assert(tu_client_wait_eof(&waiting, WAIT_MS));
    tu_client_close(&waiting);
    tu_client_close(&c);

    /* Started again with Redis back: a clean slate. */
    srv_spawn(&s);
    port = start(p);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_PENDING), 0);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN, 0, WAIT_MS));
    subscribe(&c, port, "here");
    publish(p, "here", "again");
    expect_upd_seq(&c, &s, 0, 1, "again");
    tu_client_close(&c);
    /* And once more down, freed without a stop of its own. */
    redis_down(&s, p);
    publish(p, "here", "lost too");
    t0 = tu_now_ms();
    cr_assert_eq(pushlet_free(p), 0);
    cr_assert_lt(tu_now_ms() - t0, 300 + 1500);
    tu_redis_stop(&s);
}

/* Redis gone between the check and the start: the broker starts, keeps trying, publishes wait
 * and the stop is still bounded. */
Test(distributed, stop_never_connected)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_STOP_TIMEOUT_MS, 200), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_QUEUED_MESSAGES, 10), 0);
    enable(p, addr, NULL, 0);
    tu_redis_stop(&s);
    int port = start(p);
    cr_assert_eq(pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN), 1);
    for (int i = 0; i < 10; i++)
        publish(p, "t", "queued");
    cr_assert_eq(pushlet_publish(p, "t", NULL, "x", 1), PUSHLET_EFULL, "bounded while down");
    (void)port;
    int64_t t0 = tu_now_ms();
    cr_assert_eq(pushlet_stop(p), 0);
    cr_assert_lt(tu_now_ms() - t0, 200 + 1500);
    cr_assert_eq(pushlet_free(p), 0);
}

/* ---- HTTP publishing and new subscriptions while Redis is away ------------------------------ */

/* Reads an HTTP answer with a Content-Length (or up to EOF) into `out`. */
static bool read_answer(int fd, tu_buf *out, int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;
    char buf[4096];
    for (;;) {
        char *end = out->p ? strstr(out->p, "\r\n\r\n") : NULL;
        if (end) {
            const char *cl = strcasestr(out->p, "Content-Length:");
            if (cl && cl < end &&
                out->len >= (size_t)(end + 4 - out->p) + strtoul(cl + 15, NULL, 10))
                return true;
        }
        int64_t left = deadline - tu_now_ms();
        if (left <= 0)
            return false;
        long n = tu_recv(fd, buf, sizeof(buf), (int)left);
        if (n == 0)
            return out->len > 0;
        if (n < 0)
            return false;
        tu_buf_append(out, buf, (size_t)n);
    }
}

static int send_publish(int port, const char *topic, const char *body)
{
    int fd = tu_connect(port);
    cr_assert(fd >= 0);
    char req[512];
    int n = snprintf(req, sizeof(req),
                     "POST /publish?topic=%s&event=upd HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     topic, strlen(body), body);
    cr_assert(tu_send_all(fd, req, (size_t)n));
    return fd;
}

/* POST /publish answers with the message's ID once Redis stored it; while Redis is down the
 * request waits, and is answered when it is back. */
Test(distributed, http_publish_answers_after_redis)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, true, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_HTTP_PUBLISH, 1), 0);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_MAX_QUEUED_MESSAGES, 2), 0);
    enable(p, addr, NULL, 0);
    int port = start(p);
    tu_client c;
    subscribe(&c, port, "h");
    int fd = send_publish(port, "h", "via http");
    tu_buf b = {0};
    cr_assert(read_answer(fd, &b, WAIT_MS), "no answer: %s", b.p ? b.p : "");
    close(fd);
    char want[64], body[96], id[64];
    expected_id(&s, 0, 1, want, sizeof(want));
    snprintf(body, sizeof(body), "{\"id\":\"%s\"}", want);
    cr_assert(strncmp(b.p, "HTTP/1.1 200", 12) == 0 && strstr(b.p, body) != NULL, "%s", b.p);
    expect_event(&c, "upd", "via http", id, sizeof(id));
    cr_assert_str_eq(id, want);

    redis_down(&s, p);
    /* Two wait (the bound is 2); a third is refused at once with 503 and Retry-After. */
    int waiting[2];
    waiting[0] = send_publish(port, "h", "waited 1");
    tu_buf_reset(&b);
    cr_assert(!read_answer(waiting[0], &b, 300), "answered while Redis is down: %s", b.p);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 1, WAIT_MS));
    waiting[1] = send_publish(port, "h", "waited 2");
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 2, WAIT_MS));
    fd = send_publish(port, "h", "over the bound");
    cr_assert(read_answer(fd, &b, WAIT_MS), "no answer over the bound");
    close(fd);
    cr_assert(strncmp(b.p, "HTTP/1.1 503", 12) == 0, "%s", b.p);
    cr_assert(strcasestr(b.p, "Retry-After: 1") != NULL, "%s", b.p);
    cr_assert_eq(pushlet_publish(p, "h", NULL, "x", 1), PUSHLET_EFULL, "the same bound");
    srv_spawn(&s);
    for (int i = 0; i < 2; i++) {
        tu_buf_reset(&b);
        cr_assert(read_answer(waiting[i], &b, 10000), "no answer after the restart: %s",
                  b.p ? b.p : "");
        close(waiting[i]);
        expected_id(&s, 0, (uint64_t)i + 2, want, sizeof(want));
        snprintf(body, sizeof(body), "{\"id\":\"%s\"}", want);
        cr_assert(strncmp(b.p, "HTTP/1.1 200", 12) == 0 && strstr(b.p, body) != NULL, "%s", b.p);
        char data[16];
        snprintf(data, sizeof(data), "waited %d", i + 1);
        expect_event(&c, "upd", data, id, sizeof(id));
        cr_assert_str_eq(id, want);
    }
    expect_quiet(&c, 100);
    cr_assert(wait_stat(p, PUSHLET_STAT_REDIS_PENDING, 0, WAIT_MS));
    tu_buf_free(&b);
    end_one(&c, p, &s);
}

/* Publish-to-all goes through Redis too (pushlet:all), to every stream of every broker, without
 * an id: line. */
Test(distributed, publish_all_reaches_every_broker)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *a = new_broker(NULL), *b = new_broker(NULL);
    enable(a, addr, NULL, 0);
    enable(b, addr, NULL, 0);
    int pa = start_ready(a), pb = start_ready(b);
    tu_client ca, cb;
    char cid[64], id[64];
    cr_assert(tu_client_open(&ca, pa, "/events?topic=x", NULL, NULL));
    expect_event(&ca, "connected", "Connection established", cid, sizeof(cid));
    subscribe(&cb, pb, "y");
    cr_assert_eq(pushlet_publish_all(b, "notice", "to everyone", 11), 0);
    expect_event(&ca, "notice", "to everyone", id, sizeof(id));
    cr_assert_str_eq(id, cid, "no id: line: the stream's last ID stays the connected one's");
    expect_event(&cb, "notice", "to everyone", NULL, 0);
    expect_quiet(&ca, 100);
    expect_quiet(&cb, 0);
    end_two(&ca, &cb, a, b, &s);
}

/* While Redis is down a stream to a topic the broker already follows opens from memory; one to
 * a topic it does not follow waits up to the auth timeout and gets 503 with Retry-After. */
Test(distributed, new_topic_while_down)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, true, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    cr_assert_eq(pushlet_set_int(p, PUSHLET_OPT_AUTH_TIMEOUT_MS, 600), 0);
    enable(p, addr, NULL, 0);
    int port = start(p);
    tu_client c, again;
    subscribe(&c, port, "followed");
    redis_down(&s, p);
    int64_t t0 = tu_now_ms();
    subscribe(&again, port, "followed");
    cr_assert_lt(tu_now_ms() - t0, 500, "a followed topic does not wait for Redis");

    tu_client refused;
    t0 = tu_now_ms();
    cr_assert(tu_client_open(&refused, port, "/events?topic=unfollowed", NULL, NULL));
    cr_assert(tu_client_wait_eof(&refused, WAIT_MS));
    int64_t took = tu_now_ms() - t0;
    cr_assert_eq(refused.status, 503, "%s", refused.head.p ? refused.head.p : "");
    cr_assert(strcasestr(refused.head.p, "Retry-After: 1") != NULL, "%s", refused.head.p);
    cr_assert(took >= 500 && took < 2500, "refused after %lld ms", (long long)took);
    tu_client_close(&refused);

    redis_back(&s, p);
    subscribe(&refused, port, "unfollowed");
    publish(p, "followed", "f");
    publish(p, "unfollowed", "u");
    expect_event(&c, "upd", "f", NULL, 0);
    expect_event(&again, "upd", "f", NULL, 0);
    expect_event(&refused, "upd", "u", NULL, 0);
    tu_client_close(&refused);
    tu_client_close(&again);
    end_one(&c, p, &s);
}

/* ---- Addresses --------------------------------------------------------------------------------
 */

/* IPv6 literals, and a percent-encoded password in a URL. */
Test(distributed, ipv6_and_encoded_password)
{
    srv s = {.password = "p@ss/w:rd", .ipv6 = true};
    cr_assert(tu_redis_start(&s, 5000), "%s", s.error);
    char addr[160];
    pushlet_t *a = new_broker(NULL), *b = new_broker(NULL);
    snprintf(addr, sizeof(addr), "[::1]:%d", s.port);
    enable(a, addr, "p@ss/w:rd", 0);
    snprintf(addr, sizeof(addr), "redis://:p%%40ss%%2Fw%%3Ard@[::1]:%d", s.port);
    enable(b, addr, NULL, 0);
    int pa = start_ready(a), pb = start_ready(b);
    tu_client c;
    subscribe(&c, pb, "six");
    publish(a, "six", "over ::1");
    expect_event(&c, "upd", "over ::1", NULL, 0);
    char where[64];
    snprintf(where, sizeof(where), "\"address\":\"[::1]:%d/0\"", s.port);
    expect_in_page(pa, "/stats", where);
    tu_client_close(&c);
    cr_assert_eq(pushlet_free(a), 0);
    cr_assert_eq(pushlet_free(b), 0);
    tu_redis_stop(&s);
}

/* At most 64 shards. */
Test(distributed, shard_limit)
{
    srv s;
    char addr[64];
    srv_start_tcp(&s, false, addr, sizeof(addr));
    pushlet_t *p = new_broker(NULL);
    for (int i = 0; i < 64; i++)
        enable(p, addr, NULL, 0);
    cr_assert_eq(pushlet_enable_distributed_mode(p, addr, NULL, 0), PUSHLET_EINVAL);
    cr_assert_eq(pushlet_free(p), 0);
    tu_redis_stop(&s);
}
