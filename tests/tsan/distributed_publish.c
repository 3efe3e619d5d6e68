/* Distributed mode's cross-thread paths, for ThreadSanitizer (a plain program: Criterion cannot
 * run under TSan). Two brokers, A and B, in this process share one redis-server of our own (AOF
 * with fsync on every write, so a restart keeps the data). Six SSE subscribers, three on each
 * broker, follow one, two or all three of the topics t1, t2, t3 and are read by one thread;
 * four threads publish 500 messages each (two through A, two through B; A's publish bound is
 * small so the outage makes it answer PUSHLET_EFULL, which the publishers retry); one more
 * thread reads every counter, the Prometheus text and the topics' subscriber counts meanwhile.
 * In the middle redis-server is killed with SIGKILL and started again about a second later on
 * the same port and directory.
 *
 * Expected: every subscriber gets every message of its topics exactly once, with consecutive
 * sequence numbers of the one cluster epoch (the value of pushlet:epoch), each publisher's
 * messages in the order it made them, no gap event, and the same (ID, payload) sequence per
 * topic on A and on B; each SSE id: cursor holds the message's own position and the others it
 * already had. Both brokers saw the shard down and came back with nothing pending and no
 * publish error.
 *
 * Phase 2: A is stopped and started again RESTARTS times while four threads keep publishing to
 * it (ESTOPPED in between, retried at once). The publish bound's count (redis_pending) must
 * never go negative and must come back to 0.
 * (A restart once reset the count while a refused publish sat between its reservation and
 * its release, leaving the gauge at -1 and the byte bound refusing every later publish.)
 *
 * Exit status 0 only when every check passed; the last line says "N passed, N failed". */
#define _GNU_SOURCE
#include "pushlet.h"
#include "testutil.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NTOPICS          3
#define PUBLISHERS       4
#define PER_PUBLISHER    500
#define TOTAL            (PUBLISHERS * PER_PUBLISHER)
#define NSUBS            6
#define BURST            25   /* messages a publisher makes at once: many in flight at the kill */
#define PACE_MS          100  /* between bursts: the outage falls mid-stream */
#define A_MAX_QUEUED     64   /* A's publish bound: reached while Redis is away */
#define OUTAGE_MS        1000 /* from SIGKILL to the new redis-server */
#define KILL_AFTER       (TOTAL / 3)
#define DELIVERY_WAIT_MS 30000 /* after the last publish; TSan is slow */
#define RUN_DEADLINE_MS  90000
#define RESTARTS         40 /* phase 2: stop/start of A under publishing */

static const char *const topic_names[NTOPICS] = {"t1", "t2", "t3"};

static int passed, failed;

static void check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void check(bool ok, const char *fmt, ...)
{
    if (ok) {
        passed++;
        return;
    }
    failed++;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* ---- redis-server of our own (testutil.c) -----------------------------------------------------
 */

/* AOF with fsync on every write: a restart keeps the data. The main thread forks
 * (PR_SET_PDEATHSIG follows the thread that forked, and this one lives until exit). */
static tu_redis srv = {.aof = true};

/* The cluster epoch as Redis keeps it (base 36), or "" when it cannot be read. */
static void srv_epoch(char *out, size_t cap)
{
    out[0] = '\0';
    redisReply *rep = tu_redis_cmd(&srv, 0, "GET pushlet:epoch");
    if (rep && rep->type == REDIS_REPLY_STRING)
        snprintf(out, cap, "%s", rep->str);
    if (rep)
        freeReplyObject(rep);
}

/* ---- Cursors: position *( "." position ) [ "~" check ], position = [ epoch "-" ] seq ----- */

typedef struct pos {
    char epoch[16];
    uint64_t seq;
} pos;

/* Parses an SSE id: line into at most `max` positions; returns how many, or -1. */
static int parse_cursor(const char *s, pos *out, int max)
{
    int n = 0;
    const char *end = strchr(s, '~');
    if (!end)
        end = s + strlen(s);
    while (s < end) {
        const char *dot = memchr(s, '.', (size_t)(end - s));
        const char *part_end = dot ? dot : end;
        const char *dash = memchr(s, '-', (size_t)(part_end - s));
        if (n == max)
            return -1;
        if (dash) {
            size_t elen = (size_t)(dash - s);
            if (elen == 0 || elen >= sizeof(out[n].epoch))
                return -1;
            memcpy(out[n].epoch, s, elen);
            out[n].epoch[elen] = '\0';
            s = dash + 1;
        } else if (n > 0) {
            memcpy(out[n].epoch, out[n - 1].epoch, sizeof(out[n].epoch));
        } else {
            return -1;
        }
        char *after;
        errno = 0;
        out[n].seq = strtoull(s, &after, 10);
        if (after != part_end || after == s || errno)
            return -1;
        n++;
        s = dot ? dot + 1 : end;
    }
    return n;
}

/* ---- Subscribers ------------------------------------------------------------------------------
 */

typedef struct rec {
    uint64_t seq;
    int key; /* publisher * PER_PUBLISHER + its message number */
} rec;

typedef struct sub {
    tu_client c;
    const char *broker_name;
    int ntopics;
    int topics[NTOPICS]; /* topic indices, in the request's order */
    bool connected;
    pos start[NTOPICS]; /* from the connected event's cursor */
    int nstart;
    pos last[NTOPICS];  /* last cursor seen */
    rec *recs[NTOPICS]; /* per topic index (not slot): what arrived, in order */
    size_t nrecs[NTOPICS], caprecs[NTOPICS];
    char epoch[16]; /* of the first message */
    int received;   /* atomic: messages so far */
    int gaps, malformed, bad_cursor, epoch_mismatch, other_events;
    char first_problem[160];
} sub;

static void problem(sub *s, const char *fmt, const char *a, const char *b)
{
    if (!s->first_problem[0])
        snprintf(s->first_problem, sizeof(s->first_problem), fmt, a, b);
}

static int slot_of(const sub *s, int topic)
{
    for (int i = 0; i < s->ntopics; i++)
        if (s->topics[i] == topic)
            return i;
    return -1;
}

static void on_event(void *ud, const tu_event *ev)
{
    sub *s = ud;
    if (strcmp(ev->event, "connected") == 0) {
        s->connected = true;
        if (ev->id_len > 0) {
            s->nstart = parse_cursor(ev->id, s->start, NTOPICS);
            if (s->nstart == s->ntopics)
                memcpy(s->last, s->start, sizeof(s->last));
        }
        return;
    }
    if (strcmp(ev->event, "gap") == 0) {
        s->gaps++;
        problem(s, "gap event: %s %s", ev->data, "");
        return;
    }
    if (strcmp(ev->event, "m") != 0) {
        s->other_events++;
        return;
    }
    int pub, num, topic;
    if (sscanf(ev->data, "p%d-%d-t%d", &pub, &num, &topic) != 3 || pub < 0 || pub >= PUBLISHERS ||
        num < 0 || num >= PER_PUBLISHER || topic < 1 || topic > NTOPICS) {
        s->malformed++;
        problem(s, "malformed data %s %s", ev->data, "");
        return;
    }
    topic--;
    int slot = slot_of(s, topic);
    pos p[NTOPICS];
    int n = parse_cursor(ev->id, p, NTOPICS);
    if (slot < 0 || n != s->ntopics) {
        s->malformed++;
        problem(s, "message %s with id %s does not fit the stream", ev->data, ev->id);
        return;
    }
    /* The cursor holds this message's position, and the others as they were. */
    for (int i = 0; i < n; i++) {
        if (i == slot)
            continue;
        if (p[i].seq != s->last[i].seq || strcmp(p[i].epoch, s->last[i].epoch) != 0) {
            s->bad_cursor++;
            problem(s, "cursor %s moved another topic (data %s)", ev->id, ev->data);
        }
    }
    memcpy(s->last, p, sizeof(pos) * (size_t)n);
    if (!s->epoch[0])
        memcpy(s->epoch, p[slot].epoch, sizeof(s->epoch));
    else if (strcmp(s->epoch, p[slot].epoch) != 0) {
        s->epoch_mismatch++;
        problem(s, "epoch changed: id %s (data %s)", ev->id, ev->data);
    }
    if (s->nrecs[topic] == s->caprecs[topic]) {
        s->caprecs[topic] = s->caprecs[topic] ? s->caprecs[topic] * 2 : 256;
        s->recs[topic] = realloc(s->recs[topic], s->caprecs[topic] * sizeof(rec));
        if (!s->recs[topic])
            abort();
    }
    s->recs[topic][s->nrecs[topic]++] = (rec){p[slot].seq, pub * PER_PUBLISHER + num};
    __atomic_fetch_add(&s->received, 1, __ATOMIC_RELEASE);
}

/* ---- Shared state ------------------------------------------------------------------------------
 */

static struct {
    pushlet_t *a, *b;
    int64_t deadline_ms;
    int published; /* atomic: accepted publishes, all threads */
    int stop;      /* atomic: the reader and the stats thread end */
    sub subs[NSUBS];
} g;

/* ---- Publishers --------------------------------------------------------------------------------
 */

typedef struct publisher {
    int id;
    pushlet_t *p;
    bool ok[PER_PUBLISHER];
    int accepted[NTOPICS];
    int errors;
    uint64_t full_retries;
} publisher;

static void *publisher_main(void *arg)
{
    publisher *pr = arg;
    char data[64];
    for (int num = 0; num < PER_PUBLISHER; num++) {
        int topic = (pr->id + num) % NTOPICS;
        int n = snprintf(data, sizeof(data), "p%d-%d-t%d", pr->id, num, topic + 1);
        int rc;
        while ((rc = pushlet_publish(pr->p, topic_names[topic], "m", data, (size_t)n)) ==
               PUSHLET_EFULL) {
            pr->full_retries++;
            if (tu_now_ms() > g.deadline_ms)
                break;
            tu_sleep_ms(2);
        }
        if (rc != 0) {
            if (pr->errors++ == 0)
                printf("publisher %d: message %d: %s\n", pr->id, num, pushlet_strerror(rc));
            continue;
        }
        pr->ok[num] = true;
        pr->accepted[topic]++;
        __atomic_fetch_add(&g.published, 1, __ATOMIC_RELEASE);
        if (num % BURST == BURST - 1)
            tu_sleep_ms(PACE_MS);
    }
    return NULL;
}

/* ---- Reader: every subscriber on one thread ----------------------------------------------------
 */

static void *reader_main(void *arg)
{
    (void)arg;
    struct pollfd pfd[NSUBS];
    while (!__atomic_load_n(&g.stop, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < NSUBS; i++)
            pfd[i] = (struct pollfd){.fd = g.subs[i].c.eof ? -1 : g.subs[i].c.fd, .events = POLLIN};
        int rc = poll(pfd, NSUBS, 100);
        if (rc <= 0)
            continue;
        for (int i = 0; i < NSUBS; i++)
            if (pfd[i].revents)
                tu_client_pump(&g.subs[i].c, 0);
    }
    return NULL;
}

/* ---- Counters, metrics, subscriber counts ------------------------------------------------------
 */

typedef struct stats_reader {
    uint64_t rounds;
    int bad_values, bad_metrics, bad_subscribers;
    int64_t max_down[2];
} stats_reader;

static void *stats_main(void *arg)
{
    stats_reader *st = arg;
    static char buf[65536];
    pushlet_t *brokers[2] = {g.a, g.b};
    while (!__atomic_load_n(&g.stop, __ATOMIC_ACQUIRE)) {
        for (int b = 0; b < 2; b++) {
            pushlet_t *p = brokers[b];
            for (int i = 0; i < PUSHLET_STAT_COUNT; i++)
                if (pushlet_stat(p, (pushlet_stat_t)i) < 0)
                    st->bad_values++;
            int64_t down = pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN);
            if (down > st->max_down[b])
                st->max_down[b] = down;
            if (down > 1)
                st->bad_values++;
            int n = pushlet_metrics(p, buf, sizeof(buf));
            if (n <= 0 || (size_t)n >= sizeof(buf) ||
                strstr(buf, "pushlet_redis_shards_down") == NULL)
                st->bad_metrics++;
            for (int t = 0; t < NTOPICS; t++) {
                int64_t v = pushlet_topic_subscribers(p, topic_names[t]);
                if (v < 0 || v > NSUBS)
                    st->bad_subscribers++;
            }
        }
        st->rounds++;
        tu_sleep_ms(3);
    }
    return NULL;
}

/* ---- Phase 2: restarts while publishers keep publishing ------------------------------------- */

typedef struct churner {
    pushlet_t *p;
    int id;
    uint64_t ok, full, stopped, other;
} churner;

static int churn_stop; /* atomic */

static void *churner_main(void *arg)
{
    churner *c = arg;
    char data[96];
    for (int num = 0; !__atomic_load_n(&churn_stop, __ATOMIC_ACQUIRE); num++) {
        /* Longer than the final check's publish: a lost byte count shows as EFULL there. */
        int n = snprintf(data, sizeof(data), "c%d-%d-%064d", c->id, num, 0);
        int rc = pushlet_publish(c->p, topic_names[num % NTOPICS], "m", data, (size_t)n);
        if (rc == 0)
            c->ok++;
        else if (rc == PUSHLET_EFULL)
            c->full++;
        else if (rc == PUSHLET_ESTOPPED)
            c->stopped++;
        else
            c->other++;
        /* ESTOPPED: straight on, so publishes are in flight whenever a start begins. */
        if (rc == PUSHLET_ESTOPPED)
            sched_yield();
        else if (rc != 0 || num % 8 == 7)
            tu_sleep_ms(1);
    }
    return NULL;
}

typedef struct gauge_watch {
    int64_t min_pending;
    int stop; /* atomic */
} gauge_watch;

static void *gauge_main(void *arg)
{
    gauge_watch *w = arg;
    while (!__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
        int64_t v = pushlet_stat(g.a, PUSHLET_STAT_REDIS_PENDING);
        if (v < w->min_pending)
            w->min_pending = v;
        tu_sleep_ms(1);
    }
    return NULL;
}

/* ---- Setup -------------------------------------------------------------------------------------
 */

static pushlet_t *broker_new(const char *addr, int max_queued)
{
    pushlet_t *p = NULL;
    if (pushlet_new(&p) != 0)
        return NULL;
    pushlet_listen(p, "127.0.0.1", 0);
    pushlet_set_int(p, PUSHLET_OPT_LOG_LEVEL, PUSHLET_LOG_WARN);
    if (max_queued > 0)
        pushlet_set_int(p, PUSHLET_OPT_MAX_QUEUED_MESSAGES, max_queued);
    int rc = pushlet_enable_distributed_mode(p, addr, NULL, 0);
    check(rc == 0, "enable_distributed_mode(%s): %s", addr, pushlet_strerror(rc));
    rc = rc ? rc : pushlet_start(p);
    check(rc == 0, "start: %s", pushlet_strerror(rc));
    if (rc) {
        pushlet_free(p);
        return NULL;
    }
    return p;
}

static bool sub_open(sub *s, pushlet_t *p, const char *name, const int *topics, int n)
{
    memset(s, 0, sizeof(*s));
    s->broker_name = name;
    s->ntopics = n;
    char path[128] = "/events";
    for (int i = 0; i < n; i++) {
        s->topics[i] = topics[i];
        size_t len = strlen(path);
        snprintf(path + len, sizeof(path) - len, "%ctopic=%s", i ? '&' : '?',
                 topic_names[topics[i]]);
    }
    if (!tu_client_open(&s->c, pushlet_port(p), path, on_event, s))
        return false;
    int64_t deadline = tu_now_ms() + 15000;
    while (!s->connected && !s->c.eof && tu_now_ms() < deadline)
        tu_client_pump(&s->c, 100);
    return s->connected && s->c.status == 200;
}

static int expected_for(const sub *s, const publisher *pubs)
{
    int n = 0;
    for (int i = 0; i < s->ntopics; i++)
        for (int k = 0; k < PUBLISHERS; k++)
            n += pubs[k].accepted[s->topics[i]];
    return n;
}

/* ---- Checks ------------------------------------------------------------------------------------
 */

static void check_subscriber(sub *s, int idx, const publisher *pubs, const char *epoch,
                             const sub *ref[NTOPICS])
{
    check(s->gaps == 0 && s->malformed == 0 && s->bad_cursor == 0 && s->epoch_mismatch == 0,
          "sub %d (%s): %d gaps, %d malformed, %d bad cursors, %d epoch changes; first: %s", idx,
          s->broker_name, s->gaps, s->malformed, s->bad_cursor, s->epoch_mismatch,
          s->first_problem);
    check(s->nstart == s->ntopics, "sub %d: the connected event has %d positions, wants %d", idx,
          s->nstart, s->ntopics);
    check(strcmp(s->epoch, epoch) == 0, "sub %d: epoch %s, Redis has %s", idx, s->epoch, epoch);
    for (int i = 0; i < s->ntopics; i++) {
        int t = s->topics[i];
        int want = 0;
        for (int k = 0; k < PUBLISHERS; k++)
            want += pubs[k].accepted[t];
        const rec *r = s->recs[t];
        size_t n = s->nrecs[t];
        check((int)n == want, "sub %d (%s) topic %s: %zu messages, %d published", idx,
              s->broker_name, topic_names[t], n, want);
        /* Once each, consecutive sequence numbers from where the subscription started. */
        static unsigned char seen[TOTAL];
        memset(seen, 0, sizeof(seen));
        int dups = 0, unknown = 0, not_consecutive = 0, reordered = 0;
        int last_num[PUBLISHERS];
        for (int k = 0; k < PUBLISHERS; k++)
            last_num[k] = -1;
        uint64_t base = s->nstart == s->ntopics ? s->start[i].seq : 0;
        for (size_t j = 0; j < n; j++) {
            int pub = r[j].key / PER_PUBLISHER, num = r[j].key % PER_PUBLISHER;
            if (seen[r[j].key]++)
                dups++;
            if (!pubs[pub].ok[num] || (pub + num) % NTOPICS != t)
                unknown++;
            if (r[j].seq != base + j + 1)
                not_consecutive++;
            if (num <= last_num[pub])
                reordered++;
            last_num[pub] = num;
        }
        check(dups == 0 && unknown == 0, "sub %d topic %s: %d duplicates, %d unknown", idx,
              topic_names[t], dups, unknown);
        check(not_consecutive == 0, "sub %d topic %s: %d sequence numbers out of place (from %llu)",
              idx, topic_names[t], not_consecutive, (unsigned long long)base);
        check(reordered == 0,
              "sub %d topic %s: %d messages before an earlier one of their "
              "publisher",
              idx, topic_names[t], reordered);
        /* Every subscriber of the topic, on A or B, saw the same sequence. */
        if (!ref[t]) {
            ref[t] = s;
            continue;
        }
        const sub *o = ref[t];
        bool same = o->nrecs[t] == n;
        for (size_t j = 0; same && j < n; j++)
            same = o->recs[t][j].seq == r[j].seq && o->recs[t][j].key == r[j].key;
        check(same, "sub %d (%s) and a %s subscriber saw different sequences on topic %s", idx,
              s->broker_name, o->broker_name, topic_names[t]);
    }
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    int64_t t0 = tu_now_ms();
    g.deadline_ms = t0 + RUN_DEADLINE_MS;

    if (!tu_redis_start(&srv, 10000)) {
        printf("FAIL: %s\n0 passed, 1 failed\n", srv.error);
        return 1;
    }
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", srv.port);
    g.a = broker_new(addr, A_MAX_QUEUED);
    g.b = broker_new(addr, 0);
    if (!g.a || !g.b) {
        pushlet_free(g.a);
        pushlet_free(g.b);
        tu_redis_stop(&srv);
        printf("%d passed, %d failed\n", passed, failed);
        return 1;
    }

    /* Three subscribers on each broker: every topic followed by both, with 1, 2 and 3 topics
     * per stream. */
    static const struct {
        int broker; /* 0 = A */
        int n;
        int topics[NTOPICS];
    } plan[NSUBS] = {
        {0, 2, {0, 1}}, {0, 1, {2}}, {0, 3, {0, 1, 2}},
        {1, 2, {2, 1}}, {1, 1, {0}}, {1, 3, {2, 0, 1}},
    };
    bool subs_ok = true;
    for (int i = 0; i < NSUBS; i++) {
        bool ok = sub_open(&g.subs[i], plan[i].broker ? g.b : g.a, plan[i].broker ? "B" : "A",
                           plan[i].topics, plan[i].n);
        check(ok, "subscriber %d did not connect (status %d)", i, g.subs[i].c.status);
        subs_ok = subs_ok && ok;
    }
    int64_t t_subscribed = tu_now_ms();

    publisher pubs[PUBLISHERS];
    pthread_t pub_threads[PUBLISHERS], reader, stats_thread;
    stats_reader st = {0};
    pthread_create(&reader, NULL, reader_main, NULL);
    pthread_create(&stats_thread, NULL, stats_main, &st);
    for (int i = 0; i < PUBLISHERS; i++) {
        memset(&pubs[i], 0, sizeof(pubs[i]));
        pubs[i].id = i;
        pubs[i].p = i % 2 ? g.b : g.a;
        pthread_create(&pub_threads[i], NULL, publisher_main, &pubs[i]);
    }

    /* The outage, in the middle of the publishing. */
    while (__atomic_load_n(&g.published, __ATOMIC_ACQUIRE) < KILL_AFTER &&
           tu_now_ms() < g.deadline_ms)
        tu_sleep_ms(1);
    int at_kill = __atomic_load_n(&g.published, __ATOMIC_ACQUIRE);
    tu_redis_kill(&srv);
    int64_t t_kill = tu_now_ms();
    tu_sleep_ms(OUTAGE_MS);
    bool respawned = tu_redis_spawn(&srv, 10000);
    check(respawned, "redis-server did not come back on port %d", srv.port);
    int64_t t_back = tu_now_ms();
    int at_respawn = __atomic_load_n(&g.published, __ATOMIC_ACQUIRE);

    for (int i = 0; i < PUBLISHERS; i++)
        pthread_join(pub_threads[i], NULL);
    int64_t t_published = tu_now_ms();

    /* Bounded wait until every subscriber has everything. */
    int64_t wait_until = t_published + DELIVERY_WAIT_MS;
    bool complete = false;
    while (!complete && tu_now_ms() < wait_until) {
        complete = true;
        for (int i = 0; i < NSUBS; i++)
            if (__atomic_load_n(&g.subs[i].received, __ATOMIC_ACQUIRE) <
                expected_for(&g.subs[i], pubs))
                complete = false;
        if (!complete)
            tu_sleep_ms(20);
    }
    int64_t t_delivered = tu_now_ms();
    tu_sleep_ms(200); /* anything extra (a duplicate) would arrive now */
    __atomic_store_n(&g.stop, 1, __ATOMIC_RELEASE);
    pthread_join(reader, NULL);
    pthread_join(stats_thread, NULL);

    /* ---- Checks ---- */
    int accepted = 0, errors = 0;
    uint64_t full_retries[2] = {0, 0};
    int via[2] = {0, 0};
    for (int i = 0; i < PUBLISHERS; i++) {
        for (int t = 0; t < NTOPICS; t++) {
            accepted += pubs[i].accepted[t];
            via[i % 2] += pubs[i].accepted[t];
        }
        errors += pubs[i].errors;
        full_retries[i % 2] += pubs[i].full_retries;
    }
    check(accepted == TOTAL && errors == 0, "%d of %d publishes accepted, %d errors", accepted,
          TOTAL, errors);
    check(at_kill < TOTAL && at_respawn < TOTAL,
          "the outage fell after the publishing (%d at the kill, %d at the restart)", at_kill,
          at_respawn);
    check(complete, "not every subscriber got everything within %d ms", DELIVERY_WAIT_MS);
    char epoch[32];
    srv_epoch(epoch, sizeof(epoch));
    check(epoch[0] != '\0', "pushlet:epoch not readable");
    const sub *ref[NTOPICS] = {NULL};
    for (int i = 0; i < NSUBS && subs_ok; i++)
        check_subscriber(&g.subs[i], i, pubs, epoch, ref);

    pushlet_t *brokers[2] = {g.a, g.b};
    for (int b = 0; b < 2; b++) {
        pushlet_t *p = brokers[b];
        const char *name = b ? "B" : "A";
        check(st.max_down[b] == 1, "%s: redis_shards_down never seen at 1 (max %lld)", name,
              (long long)st.max_down[b]);
        check(pushlet_stat(p, PUSHLET_STAT_REDIS_SHARDS_DOWN) == 0, "%s: shard still down", name);
        check(pushlet_stat(p, PUSHLET_STAT_REDIS_PENDING) == 0, "%s: %lld publishes pending", name,
              (long long)pushlet_stat(p, PUSHLET_STAT_REDIS_PENDING));
        check(pushlet_stat(p, PUSHLET_STAT_REDIS_PUBLISH_ERRORS) == 0, "%s: %lld publish errors",
              name, (long long)pushlet_stat(p, PUSHLET_STAT_REDIS_PUBLISH_ERRORS));
        check(pushlet_stat(p, PUSHLET_STAT_REDIS_CATCH_UPS) >= NTOPICS,
              "%s: %lld catch-ups, wants at least one per topic", name,
              (long long)pushlet_stat(p, PUSHLET_STAT_REDIS_CATCH_UPS));
        check(pushlet_stat(p, PUSHLET_STAT_MESSAGES_IN) == via[b],
              "%s: messages_in %lld, %d published through it", name,
              (long long)pushlet_stat(p, PUSHLET_STAT_MESSAGES_IN), via[b]);
        for (int t = 0; t < NTOPICS; t++) {
            int64_t want = 0;
            for (int i = 0; i < NSUBS; i++)
                want += plan[i].broker == b && slot_of(&g.subs[i], t) >= 0;
            int64_t have = pushlet_topic_subscribers(p, topic_names[t]);
            check(have == want, "%s: topic %s has %lld subscribers, wants %lld", name,
                  topic_names[t], (long long)have, (long long)want);
        }
    }
    check(full_retries[0] > 0, "A never answered EFULL during the outage");
    check(st.bad_values == 0 && st.bad_metrics == 0 && st.bad_subscribers == 0,
          "stats reader: %d bad values, %d bad metrics texts, %d bad subscriber counts",
          st.bad_values, st.bad_metrics, st.bad_subscribers);

    for (int i = 0; i < NSUBS; i++) {
        tu_client_close(&g.subs[i].c);
        for (int t = 0; t < NTOPICS; t++)
            free(g.subs[i].recs[t]);
    }

    /* Phase 2: A is stopped and started again while four threads keep publishing to it (they
     * get ESTOPPED in between). The publish bound's count must come out right: nothing pending
     * once Redis answered everything, never a negative gauge, and room to publish. */
    churner ch[PUBLISHERS];
    pthread_t ch_threads[PUBLISHERS], gauge_thread;
    gauge_watch gw = {0};
    pthread_create(&gauge_thread, NULL, gauge_main, &gw);
    for (int i = 0; i < PUBLISHERS; i++) {
        ch[i] = (churner){.p = g.a, .id = i};
        pthread_create(&ch_threads[i], NULL, churner_main, &ch[i]);
    }
    int restart_errors = 0;
    int64_t t_churn = tu_now_ms();
    for (int i = 0; i < RESTARTS; i++) {
        tu_sleep_ms(30);
        if (pushlet_stop(g.a) != 0)
            restart_errors++;
        tu_sleep_ms(5);
        int rc = pushlet_start(g.a);
        if (rc != 0) {
            restart_errors++;
            printf("restart %d: %s\n", i, pushlet_strerror(rc));
        }
    }
    tu_sleep_ms(30);
    __atomic_store_n(&churn_stop, 1, __ATOMIC_RELEASE);
    uint64_t churn_ok = 0, churn_full = 0, churn_stopped = 0, churn_other = 0;
    for (int i = 0; i < PUBLISHERS; i++) {
        pthread_join(ch_threads[i], NULL);
        churn_ok += ch[i].ok;
        churn_full += ch[i].full;
        churn_stopped += ch[i].stopped;
        churn_other += ch[i].other;
    }
    bool drained = false;
    int64_t drain_until = tu_now_ms() + 10000;
    while (!(drained = pushlet_stat(g.a, PUSHLET_STAT_REDIS_PENDING) == 0) &&
           tu_now_ms() < drain_until)
        tu_sleep_ms(10);
    __atomic_store_n(&gw.stop, 1, __ATOMIC_RELEASE);
    pthread_join(gauge_thread, NULL);
    int64_t t_churned = tu_now_ms();
    check(restart_errors == 0, "%d stop/start calls failed", restart_errors);
    check(churn_other == 0, "%llu publishes failed otherwise than EFULL/ESTOPPED",
          (unsigned long long)churn_other);
    check(churn_ok > 0 && churn_stopped > 0, "restarts under publishing: %llu ok, %llu ESTOPPED",
          (unsigned long long)churn_ok, (unsigned long long)churn_stopped);
    int64_t left = pushlet_stat(g.a, PUSHLET_STAT_REDIS_PENDING);
    check(drained, "%sA: redis_pending stays at %lld after the restarts",
          left < 0 ? "below zero: " : "", (long long)left);
    check(gw.min_pending >= 0, "A: redis_pending went down to %lld: a restart lost a reservation",
          (long long)gw.min_pending);
    int last_rc = pushlet_publish(g.a, "t1", "m", "last", 4);
    check(last_rc == 0, "%sA: publish after the restarts: %s",
          last_rc == PUSHLET_EFULL && left < 0 ? "the byte count wrapped: " : "",
          pushlet_strerror(last_rc));

    int64_t t_stop = tu_now_ms();
    check(pushlet_stop(g.a) == 0, "stop A");
    check(pushlet_stop(g.b) == 0, "stop B");
    int64_t stop_ms = tu_now_ms() - t_stop;
    check(pushlet_free(g.a) == 0 && pushlet_free(g.b) == 0, "free");
    tu_redis_stop(&srv);

    printf("subscribed in %lld ms; killed at %d published, back after %lld ms at %d; "
           "published in %lld ms; delivered %lld ms later; EFULL retries A %llu B %llu; "
           "%llu stats rounds; %d restarts under publishing in %lld ms (%llu ok, %llu EFULL, "
           "%llu ESTOPPED); stop %lld ms; total %lld ms\n",
           (long long)(t_subscribed - t0), at_kill, (long long)(t_back - t_kill), at_respawn,
           (long long)(t_published - t_subscribed), (long long)(t_delivered - t_published),
           (unsigned long long)full_retries[0], (unsigned long long)full_retries[1],
           (unsigned long long)st.rounds, RESTARTS, (long long)(t_churned - t_churn),
           (unsigned long long)churn_ok, (unsigned long long)churn_full,
           (unsigned long long)churn_stopped, (long long)stop_ms, (long long)(tu_now_ms() - t0));
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
