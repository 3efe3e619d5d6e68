/* The hooks' cross-thread paths, for ThreadSanitizer (a plain program: Criterion cannot run under
 * TSan). A broker on 127.0.0.1 asks for every connection and subscription; its requests are
 * answered by four threads at once, some twice by one thread, some by two threads racing, some
 * synchronously by the thread that got the event and then once more from another. Meanwhile six
 * client threads open and close SSE streams and WebSockets (allowed, denied per user, denied per
 * topic; WebSocket subscribe commands and messages), and two threads call pushlet_send(),
 * pushlet_send_user(), pushlet_close() and pushlet_topic_subscribers() on whatever is connected.
 * Then requests held while their clients leave, and requests left to time out, are answered from
 * four threads: ENOENT. All of it twice: with the event handler, then with the pull queue.
 *
 * Expected: each request succeeds at most once and every other answer is ENOENT; every connect
 * request succeeds exactly once; clients see the status the policy gives; every CONNECTED gets a
 * DISCONNECTED, every SUBSCRIBED an UNSUBSCRIBED; no subscriber, connection or pending request is
 * left. Exit status 0 only when every check passed; the last line says "N passed, N failed". */
#define _GNU_SOURCE /* memmem */
#include "pushlet.h"
#include "testutil.h"

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CLIENT_THREADS  6
#define ITERATIONS      30
#define ANSWERERS       4
#define SENDERS         2
#define HELD            8
#define MAX_RECORDS     4096
#define MAX_OPEN        256
#define MAX_CLOSED      1024
#define AUTH_TIMEOUT_MS 3000
#define IO_TIMEOUT_MS   15000 /* per client step; TSan is slow */
#define EVENT_MASK      (PUSHLET_EVENT_ALL & ~PUSHLET_EVENT_LOG)
#define AUTH_KINDS      (PUSHLET_EVENT_AUTH_CONNECT | PUSHLET_EVENT_AUTH_SUBSCRIBE)

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

/* ---- Shared state ---------------------------------------------------------------------------- */

enum { ANSWER_ONCE, ANSWER_TWICE, ANSWER_RACE, ANSWER_SYNC };

/* One auth request and the outcomes of the answers given to it. */
typedef struct record {
    uint64_t request, conn;
    int type, how, status;
    bool allow;
    char user[32];
    int ok, enoent, other, answers; /* atomic */
} record;

typedef struct job {
    struct job *next;
    record *r;
} job;

static struct {
    pushlet_t *p;
    int port;
    pthread_mutex_t mu; /* guards everything below except the atomics */
    pthread_cond_t cv;
    job *head, *tail;
    bool answerers_stop;
    record *records[MAX_RECORDS];
    int nrecords;
    record *held[HELD]; /* requests of clients with hold=1 in the query: nobody answers them */
    int nheld;
    uint64_t open[MAX_OPEN]; /* CONNECTED and not yet DISCONNECTED */
    int nopen;
    uint64_t closed[MAX_CLOSED]; /* closed by pushlet_close() */
    int nclosed;
    int connected, disconnected, subscribed, unsubscribed, messages, bad_events;
    int senders_stop, poller_stop; /* atomic */
} g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void tally(record *r, int rc)
{
    int *slot = rc == 0 ? &r->ok : rc == PUSHLET_ENOENT ? &r->enoent : &r->other;
    __atomic_fetch_add(slot, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->answers, 1, __ATOMIC_RELAXED);
}

static void answer(record *r)
{
    int rc = r->allow ? pushlet_allow(g.p, r->request, r->user[0] ? r->user : NULL, "meta")
                      : pushlet_deny(g.p, r->request, r->status, "no");
    tally(r, rc);
}

static void enqueue(record *r)
{
    job *j = malloc(sizeof(*j));
    if (!j)
        abort();
    *j = (job){.r = r};
    pthread_mutex_lock(&g.mu);
    if (g.tail)
        g.tail->next = j;
    else
        g.head = j;
    g.tail = j;
    pthread_cond_signal(&g.cv);
    pthread_mutex_unlock(&g.mu);
}

/* ---- Events: the same for the handler and the queue ------------------------------------------ */

/* The value of `name` in a raw query, copied into out ("" when absent). */
static void query_param(const char *q, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    out[0] = '\0';
    for (const char *s = q; s && *s; s = strchr(s, '&') ? strchr(s, '&') + 1 : NULL) {
        if (strncmp(s, name, n) == 0 && s[n] == '=') {
            size_t len = strcspn(s + n + 1, "&");
            if (len >= cap)
                len = cap - 1;
            memcpy(out, s + n + 1, len);
            out[len] = '\0';
            return;
        }
    }
}

static void request(const pushlet_event_t *e, int type)
{
    record *r = calloc(1, sizeof(*r));
    if (!r)
        abort();
    r->request = pushlet_event_request(e);
    r->conn = pushlet_event_connection(e);
    r->type = type;
    char hold[8] = "";
    if (type == PUSHLET_EVENT_AUTH_CONNECT) {
        const char *q = pushlet_event_query(e, NULL);
        query_param(q, "user", r->user, sizeof(r->user));
        query_param(q, "hold", hold, sizeof(hold));
        r->allow = strncmp(r->user, "deny", 4) != 0;
        r->status = 401;
    } else {
        r->allow = strncmp(pushlet_event_topic(e, NULL), "deny-", 5) != 0;
        r->status = 403;
    }
    r->how = (int)(r->request % 4);
    pthread_mutex_lock(&g.mu);
    bool ok = r->request != 0 && g.nrecords < MAX_RECORDS && (!hold[0] || g.nheld < HELD);
    if (ok && hold[0])
        g.held[g.nheld++] = r;
    else if (ok)
        g.records[g.nrecords++] = r;
    else
        g.bad_events++;
    pthread_mutex_unlock(&g.mu);
    if (!ok) {
        free(r);
        return;
    }
    if (hold[0])
        return;
    if (r->how == ANSWER_SYNC)
        answer(r); /* on the thread that got the event; another thread answers again */
    enqueue(r);
    if (r->how == ANSWER_RACE)
        enqueue(r);
}

static void on_event(const pushlet_event_t *e)
{
    int type = pushlet_event_type(e);
    uint64_t conn = pushlet_event_connection(e);
    if (type & AUTH_KINDS) {
        request(e, type);
        return;
    }
    pthread_mutex_lock(&g.mu);
    if (conn == 0)
        g.bad_events++;
    if (type == PUSHLET_EVENT_CONNECTED) {
        g.connected++;
        if (g.nopen < MAX_OPEN)
            g.open[g.nopen++] = conn;
    } else if (type == PUSHLET_EVENT_DISCONNECTED) {
        g.disconnected++;
        for (int i = 0; i < g.nopen; i++)
            if (g.open[i] == conn)
                g.open[i] = g.open[--g.nopen];
    } else if (type == PUSHLET_EVENT_SUBSCRIBED) {
        g.subscribed++;
    } else if (type == PUSHLET_EVENT_UNSUBSCRIBED) {
        g.unsubscribed++;
    } else if (type == PUSHLET_EVENT_MESSAGE) {
        size_t len;
        const char *text = pushlet_event_text(e, &len);
        g.messages++;
        if (len != 2 || memcmp(text, "hi", 2) != 0)
            g.bad_events++;
    }
    pthread_mutex_unlock(&g.mu);
}

static void handler(pushlet_t *p, const pushlet_event_t *e, void *ud)
{
    (void)p;
    (void)ud;
    on_event(e);
}

static void *poller_main(void *arg)
{
    struct pollfd pfd = {.fd = pushlet_event_fd(g.p), .events = POLLIN};
    for (;;) {
        bool stop = __atomic_load_n(&g.poller_stop, __ATOMIC_ACQUIRE);
        poll(&pfd, 1, 50);
        pushlet_event_t *e;
        while ((e = pushlet_event_next(g.p)) != NULL) {
            on_event(e);
            pushlet_event_free(e);
        }
        if (stop)
            return arg;
    }
}

/* ---- Answerers and senders ------------------------------------------------------------------- */

static void *answerer_main(void *arg)
{
    pthread_mutex_lock(&g.mu);
    for (;;) {
        while (!g.head && !g.answerers_stop)
            pthread_cond_wait(&g.cv, &g.mu);
        if (!g.head)
            break;
        job *j = g.head;
        g.head = j->next;
        if (!g.head)
            g.tail = NULL;
        pthread_mutex_unlock(&g.mu);
        answer(j->r);
        if (j->r->how == ANSWER_TWICE)
            answer(j->r);
        free(j);
        pthread_mutex_lock(&g.mu);
    }
    pthread_mutex_unlock(&g.mu);
    return arg;
}

typedef struct sender {
    unsigned seed;
    int sends, bad_rc, bad_counts, closes;
} sender;

static bool acceptable(int rc) { return rc == 0 || rc == PUSHLET_ENOENT || rc == PUSHLET_EFULL; }

static void *sender_main(void *arg)
{
    sender *s = arg;
    while (!__atomic_load_n(&g.senders_stop, __ATOMIC_ACQUIRE)) {
        uint64_t conn = 1u << 30; /* no such connection, unless one is open */
        pthread_mutex_lock(&g.mu);
        if (g.nopen)
            conn = g.open[rand_r(&s->seed) % (unsigned)g.nopen];
        pthread_mutex_unlock(&g.mu);
        char user[16], topic[8];
        snprintf(user, sizeof(user), "u%d", rand_r(&s->seed) % CLIENT_THREADS);
        snprintf(topic, sizeof(topic), "t%d", rand_r(&s->seed) % 5);
        s->bad_rc += !acceptable(pushlet_send(g.p, conn, "note", "x", 1));
        s->bad_rc += !acceptable(pushlet_send_user(g.p, user, "note", "y", 1));
        if (rand_r(&s->seed) % 40 == 0) {
            int rc = pushlet_close(g.p, conn, 4000, "bye");
            s->bad_rc += !acceptable(rc);
            pthread_mutex_lock(&g.mu);
            if (rc == 0 && g.nclosed < MAX_CLOSED)
                g.closed[g.nclosed++] = conn;
            pthread_mutex_unlock(&g.mu);
            s->closes += rc == 0;
        }
        int64_t n = pushlet_topic_subscribers(g.p, topic);
        s->bad_counts += n < 0 || n > CLIENT_THREADS;
        if (++s->sends % 4 == 0)
            tu_sleep_ms(1);
    }
    return arg;
}

/* ---- Clients --------------------------------------------------------------------------------- */

typedef struct client {
    int id;
    int wrong_status, ws_checked, ws_closed_by_host, ws_bad, sse_bad;
} client;

static int read_status(int fd, tu_buf *in)
{
    int64_t deadline = tu_now_ms() + IO_TIMEOUT_MS;
    char buf[4096];
    while (!in->p || !strstr(in->p, "\r\n\r\n")) {
        long n = tu_recv(fd, buf, sizeof(buf), (int)(deadline - tu_now_ms()));
        if (n <= 0)
            return -1;
        tu_buf_append(in, buf, (size_t)n);
    }
    int status = -1;
    sscanf(in->p, "HTTP/1.%*d %d", &status);
    return status;
}

static void ws_send(int fd, int opcode, const char *data)
{
    size_t len = strlen(data);
    char frame[256];
    const unsigned char key[4] = {0x12, 0x34, 0x56, 0x78};
    if (len > 125)
        abort();
    frame[0] = (char)(0x80 | opcode);
    frame[1] = (char)(0x80 | len);
    memcpy(frame + 2, key, 4);
    for (size_t i = 0; i < len; i++)
        frame[6 + i] = (char)(data[i] ^ key[i % 4]);
    tu_send_all(fd, frame, len + 6);
}

/* After a 101: subscribe to a denied and an allowed topic and send a message; true when both
 * replies came, false when the host closed the connection first (or on a timeout: *bad). */
static bool ws_session(int fd, tu_buf *in, bool *bad)
{
    ws_send(fd, 1, "{\"action\":\"subscribe\",\"topic\":\"deny-y\"}");
    ws_send(fd, 1, "{\"action\":\"subscribe\",\"topic\":\"t9\"}");
    ws_send(fd, 1, "hi");
    size_t off = (size_t)(strstr(in->p, "\r\n\r\n") - in->p) + 4;
    bool forbidden = false, subscribed = false;
    int64_t deadline = tu_now_ms() + IO_TIMEOUT_MS;
    char buf[4096];
    while (!(forbidden && subscribed)) {
        while (in->len - off >= 2) { /* whole frames from the server (never masked) */
            const unsigned char *h = (const unsigned char *)in->p + off;
            size_t len = h[1] & 0x7f, head = 2;
            if (len == 126) {
                if (in->len - off < 4)
                    break;
                len = (size_t)h[2] << 8 | h[3];
                head = 4;
            } else if (len == 127) {
                *bad = true; /* no reply is that big */
                return false;
            }
            if (in->len - off < head + len)
                break;
            const char *payload = (const char *)h + head;
            if ((h[0] & 0x0f) == 8)
                return false; /* closed by the host */
            if (memmem(payload, len, "\"forbidden\"", 11) && memmem(payload, len, "deny-y", 6))
                forbidden = true;
            if (memmem(payload, len, "\"subscribed\"", 12) && memmem(payload, len, "\"t9\"", 4))
                subscribed = true;
            off += head + len;
        }
        if (forbidden && subscribed)
            break;
        long n = tu_recv(fd, buf, sizeof(buf), (int)(deadline - tu_now_ms()));
        if (n == 0 || n == -1)
            return false; /* closed by the host */
        if (n < 0) {
            *bad = true;
            return false;
        }
        tu_buf_append(in, buf, (size_t)n);
    }
    ws_send(fd, 8, "\x03\xe8");
    return true;
}

static void client_once(client *cl, int i)
{
    char user[16], path[160];
    bool deny_user = i % 6 == 5, deny_topic = i % 4 == 3, ws = i % 3 == 2;
    snprintf(user, sizeof(user), deny_user ? "deny%d" : "u%d", cl->id);
    snprintf(path, sizeof(path), "%s?user=%s&topic=t%d&topic=%s%d", ws ? "/ws" : "/events", user,
             i % 5, deny_topic ? "deny-x" : "t", (i + 1) % 5);
    int want = deny_user ? 401 : deny_topic ? 403 : ws ? 101 : 200;
    if (!ws) {
        tu_client c;
        if (!tu_client_open(&c, g.port, path, NULL, NULL)) {
            cl->sse_bad++;
            return;
        }
        tu_event ev = {0};
        int64_t deadline = tu_now_ms() + IO_TIMEOUT_MS;
        while (!c.head_done && !c.eof && tu_now_ms() < deadline)
            tu_client_pump(&c, 100);
        cl->wrong_status += c.status != want;
        /* An open stream starts with "connected", even if the host closes it at once. */
        if (c.status == 200 &&
            (tu_client_next(&c, &ev, IO_TIMEOUT_MS) != 1 || strcmp(ev.event, "connected") != 0))
            cl->sse_bad++;
        tu_event_clear(&ev);
        if (c.status == 200)
            tu_client_pump(&c, 5);
        tu_client_close(&c);
        return;
    }
    int fd = tu_connect(g.port);
    char req[400];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path);
    tu_buf in = {0};
    if (fd < 0 || !tu_send_all(fd, req, (size_t)n)) {
        cl->ws_bad++;
    } else {
        int status = read_status(fd, &in);
        cl->wrong_status += status != want;
        bool bad = false;
        if (status == 101 && ws_session(fd, &in, &bad))
            cl->ws_checked++;
        else if (status == 101 && !bad)
            cl->ws_closed_by_host++;
        cl->ws_bad += bad;
    }
    tu_buf_free(&in);
    if (fd >= 0)
        close(fd);
}

static void *client_main(void *arg)
{
    client *cl = arg;
    for (int i = 0; i < ITERATIONS; i++)
        client_once(cl, i);
    return arg;
}

/* ---- Phases ---------------------------------------------------------------------------------- */

static bool wait_for(bool (*pred)(void), int ms)
{
    int64_t deadline = tu_now_ms() + ms;
    while (!pred()) {
        if (tu_now_ms() > deadline)
            return false;
        tu_sleep_ms(5);
    }
    return true;
}

static bool idle(void)
{
    return pushlet_stat(g.p, PUSHLET_STAT_CONNECTIONS) == 0 &&
           pushlet_stat(g.p, PUSHLET_STAT_AUTH_PENDING) == 0;
}

static bool all_held(void)
{
    pthread_mutex_lock(&g.mu);
    bool all = g.nheld == HELD;
    pthread_mutex_unlock(&g.mu);
    return all;
}

static bool was_closed_by_host(uint64_t conn)
{
    for (int i = 0; i < g.nclosed; i++)
        if (g.closed[i] == conn)
            return true;
    return false;
}

static void concurrent_phase(void)
{
    pthread_t clients[CLIENT_THREADS], senders[SENDERS];
    client cls[CLIENT_THREADS];
    sender sds[SENDERS];
    for (int i = 0; i < SENDERS; i++) {
        sds[i] = (sender){.seed = 7u + (unsigned)i};
        pthread_create(&senders[i], NULL, sender_main, &sds[i]);
    }
    for (int i = 0; i < CLIENT_THREADS; i++) {
        cls[i] = (client){.id = i};
        pthread_create(&clients[i], NULL, client_main, &cls[i]);
    }
    int wrong = 0, ws_checked = 0, ws_bad = 0, sse_bad = 0, bad_rc = 0, bad_counts = 0;
    int sends = 0, closes = 0;
    for (int i = 0; i < CLIENT_THREADS; i++) {
        pthread_join(clients[i], NULL);
        wrong += cls[i].wrong_status;
        ws_checked += cls[i].ws_checked;
        ws_bad += cls[i].ws_bad;
        sse_bad += cls[i].sse_bad;
    }
    __atomic_store_n(&g.senders_stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < SENDERS; i++) {
        pthread_join(senders[i], NULL);
        bad_rc += sds[i].bad_rc;
        bad_counts += sds[i].bad_counts;
        sends += sds[i].sends;
        closes += sds[i].closes;
    }
    check(wrong == 0, "every client got the status the policy gives");
    check(ws_checked > 0, "WebSocket subscribe commands answered (forbidden and subscribed)");
    check(ws_bad == 0 && sse_bad == 0, "no client stalled or saw a malformed stream");
    check(bad_rc == 0, "send/send_user/close returned 0 or ENOENT");
    check(bad_counts == 0, "pushlet_topic_subscribers within bounds while churning");
    check(sends > 0, "the senders ran");
    check(wait_for(idle, IO_TIMEOUT_MS), "no connection or pending request left");

    /* Every answer is in: the jobs queue drains, then the outcomes are final. */
    int64_t deadline = tu_now_ms() + IO_TIMEOUT_MS;
    for (;;) {
        pthread_mutex_lock(&g.mu);
        bool empty = g.head == NULL;
        int n = g.nrecords, unanswered = 0;
        for (int i = 0; i < n; i++) {
            record *r = g.records[i];
            int want = r->how == ANSWER_ONCE ? 1 : 2;
            unanswered += __atomic_load_n(&r->answers, __ATOMIC_RELAXED) < want;
        }
        pthread_mutex_unlock(&g.mu);
        if ((empty && unanswered == 0) || tu_now_ms() > deadline)
            break;
        tu_sleep_ms(10);
    }
    int twice_ok = 0, connect_not_ok = 0, other = 0, missing = 0, subscribe_ok = 0;
    pthread_mutex_lock(&g.mu);
    for (int i = 0; i < g.nrecords; i++) {
        record *r = g.records[i];
        int want = r->how == ANSWER_ONCE ? 1 : 2;
        int ok = __atomic_load_n(&r->ok, __ATOMIC_RELAXED);
        twice_ok += ok > 1;
        other += __atomic_load_n(&r->other, __ATOMIC_RELAXED);
        missing += __atomic_load_n(&r->answers, __ATOMIC_RELAXED) != want;
        if (r->type == PUSHLET_EVENT_AUTH_CONNECT)
            connect_not_ok += ok != 1 && !was_closed_by_host(r->conn);
        else
            subscribe_ok += ok;
    }
    check(g.nrecords > CLIENT_THREADS * ITERATIONS, "requests were made");
    check(missing == 0, "every planned answer was made");
    check(twice_ok == 0, "no request accepted two answers");
    check(other == 0, "answers returned only 0 or ENOENT");
    check(connect_not_ok == 0, "every connect request accepted exactly one answer");
    check(subscribe_ok > 0, "subscribe requests answered");
    check(g.connected > 0 && g.connected == g.disconnected, "every CONNECTED got a DISCONNECTED");
    check(g.subscribed > 0 && g.subscribed == g.unsubscribed,
          "every SUBSCRIBED got an UNSUBSCRIBED");
    check(g.messages > 0 && g.messages <= g.connected, "client messages reached the host");
    check(g.bad_events == 0, "events carried a connection and the expected payload");
    check(g.nopen == 0, "no connection left open");
    pthread_mutex_unlock(&g.mu);
    const char *topics[] = {"t0", "t1", "t2", "t3", "t4", "t9", "deny-x", "deny-y"};
    int left = 0;
    for (size_t i = 0; i < sizeof(topics) / sizeof(topics[0]); i++)
        left += pushlet_topic_subscribers(g.p, topics[i]) != 0;
    check(left == 0, "no subscriber left on any topic");
    check(pushlet_stat(g.p, PUSHLET_STAT_SUBSCRIPTIONS) == 0, "subscriptions gauge back to 0");
    printf("%d requests, %d connections, %d ws sessions checked, %d sends, %d host closes\n",
           g.nrecords, g.connected, ws_checked, sends, closes);
}

typedef struct late {
    int index;
    int ok, enoent, other;
} late;

/* Answers held[k] for k = index, index + ANSWERERS, ...: all from different threads at once. */
static void *late_main(void *arg)
{
    late *l = arg;
    for (int k = l->index; k < HELD; k += ANSWERERS) {
        int rc = pushlet_allow(g.p, g.held[k]->request, NULL, NULL);
        l->ok += rc == 0;
        l->enoent += rc == PUSHLET_ENOENT;
        l->other += rc != 0 && rc != PUSHLET_ENOENT;
        rc = pushlet_deny(g.p, g.held[k]->request, 403, NULL);
        l->enoent += rc == PUSHLET_ENOENT;
        l->other += rc != PUSHLET_ENOENT;
    }
    return arg;
}

static int answer_held_late(void)
{
    pthread_t th[ANSWERERS];
    late ls[ANSWERERS];
    for (int i = 0; i < ANSWERERS; i++) {
        ls[i] = (late){.index = i};
        pthread_create(&th[i], NULL, late_main, &ls[i]);
    }
    int enoent = 0, bad = 0;
    for (int i = 0; i < ANSWERERS; i++) {
        pthread_join(th[i], NULL);
        enoent += ls[i].enoent;
        bad += ls[i].ok + ls[i].other;
    }
    return bad ? -1 : enoent;
}

static void open_held(int *fds)
{
    for (int k = 0; k < HELD; k++) {
        char req[160];
        int n = snprintf(req, sizeof(req),
                         "GET /events?user=held%d&hold=1&topic=t1 HTTP/1.1\r\nHost: x\r\n\r\n", k);
        fds[k] = tu_connect(g.port);
        if (fds[k] >= 0)
            tu_send_all(fds[k], req, (size_t)n);
    }
}

static void release_held(void)
{
    pthread_mutex_lock(&g.mu);
    for (int k = 0; k < g.nheld; k++)
        free(g.held[k]);
    g.nheld = 0;
    pthread_mutex_unlock(&g.mu);
}

static void leaver_phase(void)
{
    int fds[HELD];
    open_held(fds);
    check(wait_for(all_held, IO_TIMEOUT_MS), "held connect requests arrived");
    for (int k = 0; k < HELD; k++)
        if (fds[k] >= 0)
            close(fds[k]);
    check(wait_for(idle, IO_TIMEOUT_MS), "clients that left while asking are gone");
    if (all_held())
        check(answer_held_late() == 2 * HELD, "answers after the client left: ENOENT");
    release_held();
}

static void timeout_phase(void)
{
    int fds[HELD];
    int64_t before = pushlet_stat(g.p, PUSHLET_STAT_AUTH_TIMEOUTS);
    open_held(fds);
    check(wait_for(all_held, IO_TIMEOUT_MS), "held connect requests arrived");
    int got503 = 0;
    for (int k = 0; k < HELD; k++) {
        tu_buf in = {0};
        got503 += fds[k] >= 0 && read_status(fds[k], &in) == 503;
        tu_buf_free(&in);
        if (fds[k] >= 0)
            close(fds[k]);
    }
    check(got503 == HELD, "unanswered requests time out with 503");
    check(pushlet_stat(g.p, PUSHLET_STAT_AUTH_TIMEOUTS) - before == HELD, "auth_timeouts");
    if (all_held())
        check(answer_held_late() == 2 * HELD, "answers after the timeout: ENOENT");
    release_held();
    check(wait_for(idle, IO_TIMEOUT_MS), "nothing left after the timeouts");
}

static void run(bool queue)
{
    printf("-- %s\n", queue ? "pull queue" : "event handler");
    memset(g.records, 0, sizeof(g.records));
    g.nrecords = g.nopen = g.nclosed = g.nheld = 0;
    g.connected = g.disconnected = g.subscribed = g.unsubscribed = g.messages = g.bad_events = 0;
    g.senders_stop = g.poller_stop = 0;
    g.answerers_stop = false;
    check(pushlet_new(&g.p) == 0, "pushlet_new");
    if (!g.p)
        return;
    check(pushlet_listen(g.p, "127.0.0.1", 0) == 0, "listen");
    check(pushlet_set_int(g.p, PUSHLET_OPT_AUTH_TIMEOUT_MS, AUTH_TIMEOUT_MS) == 0, "timeout");
    check(pushlet_set_int(g.p, PUSHLET_OPT_HEARTBEAT_MS, 0) == 0, "no heartbeat");
    if (queue)
        check(pushlet_events_enable(g.p, EVENT_MASK) == 0, "events_enable");
    else
        check(pushlet_set_event_handler(g.p, handler, EVENT_MASK, NULL) == 0, "handler");
    check(pushlet_start(g.p) == 0, "start");
    g.port = pushlet_port(g.p);

    pthread_t answerers[ANSWERERS], poller;
    for (int i = 0; i < ANSWERERS; i++)
        pthread_create(&answerers[i], NULL, answerer_main, NULL);
    if (queue)
        pthread_create(&poller, NULL, poller_main, NULL);

    concurrent_phase();
    leaver_phase();
    timeout_phase();

    check(pushlet_stop(g.p) == 0, "stop");
    if (queue) {
        __atomic_store_n(&g.poller_stop, 1, __ATOMIC_RELEASE);
        pthread_join(poller, NULL);
    }
    pthread_mutex_lock(&g.mu);
    g.answerers_stop = true;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    for (int i = 0; i < ANSWERERS; i++)
        pthread_join(answerers[i], NULL);
    check(pushlet_allow(g.p, 1, NULL, NULL) != 0, "no answer is taken after the stop");
    check(pushlet_free(g.p) == 0, "pushlet_free");
    for (int i = 0; i < g.nrecords; i++)
        free(g.records[i]);
}

int main(void)
{
    int64_t t0 = tu_now_ms();
    run(false);
    run(true);
    printf("%.1f s\n", (double)(tu_now_ms() - t0) / 1000.0);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
