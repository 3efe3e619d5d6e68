#define _GNU_SOURCE /* nftw */
#include "testutil.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- Buffer ------------------------------------------------------------------------------ */

void tu_buf_append(tu_buf *b, const void *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 64;
        while (ncap < b->len + len + 1)
            ncap *= 2;
        char *np = realloc(b->p, ncap);
        if (!np)
            abort();
        b->p = np;
        b->cap = ncap;
    }
    if (len)
        memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
}

void tu_buf_reset(tu_buf *b)
{
    b->len = 0;
    if (b->p)
        b->p[0] = '\0';
}

void tu_buf_free(tu_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* An empty buffer still has to read as "" when handed out. */
static char *buf_str(tu_buf *b)
{
    if (!b->p)
        tu_buf_append(b, "", 0);
    return b->p;
}

/* ---- EventSource parser (https://html.spec.whatwg.org/multipage/server-sent-events.html) ---- */

void tu_sse_init(tu_sse_parser *ps, tu_event_fn fn, void *ud)
{
    memset(ps, 0, sizeof(*ps));
    ps->retry_ms = -1;
    ps->fn = fn;
    ps->ud = ud;
}

void tu_sse_free(tu_sse_parser *ps)
{
    tu_buf_free(&ps->line);
    tu_buf_free(&ps->data);
    tu_buf_free(&ps->event);
    tu_buf_free(&ps->id);
}

static void dispatch(tu_sse_parser *ps)
{
    /* An event with an empty data buffer is not dispatched (the spec's step 2). */
    if (ps->data.len == 0) {
        tu_buf_reset(&ps->event);
        return;
    }
    ps->data.p[--ps->data.len] = '\0'; /* drop the LF the last data line added */
    tu_event ev = {
        .id = buf_str(&ps->id),
        .id_len = ps->id.len,
        .event = ps->event.len ? ps->event.p : "message",
        .event_len = ps->event.len ? ps->event.len : 7,
        .data = ps->data.p,
        .data_len = ps->data.len,
    };
    if (ps->fn)
        ps->fn(ps->ud, &ev);
    tu_buf_reset(&ps->data);
    tu_buf_reset(&ps->event);
}

static void process_field(tu_sse_parser *ps, const char *name, size_t nlen, const char *value,
                          size_t vlen)
{
    if (nlen == 5 && memcmp(name, "event", 5) == 0) {
        tu_buf_reset(&ps->event);
        tu_buf_append(&ps->event, value, vlen);
    } else if (nlen == 4 && memcmp(name, "data", 4) == 0) {
        tu_buf_append(&ps->data, value, vlen);
        tu_buf_append(&ps->data, "\n", 1);
    } else if (nlen == 2 && memcmp(name, "id", 2) == 0) {
        if (!memchr(value, '\0', vlen)) {
            tu_buf_reset(&ps->id);
            tu_buf_append(&ps->id, value, vlen);
        }
    } else if (nlen == 5 && memcmp(name, "retry", 5) == 0) {
        long v = 0;
        for (size_t i = 0; i < vlen; i++) {
            if (value[i] < '0' || value[i] > '9')
                return;
            v = v * 10 + (value[i] - '0');
        }
        if (vlen)
            ps->retry_ms = v;
    }
}

static void process_line(tu_sse_parser *ps)
{
    const char *l = buf_str(&ps->line);
    size_t len = ps->line.len;
    if (len == 0) {
        dispatch(ps);
    } else if (l[0] == ':') {
        ps->comments++;
    } else {
        const char *colon = memchr(l, ':', len);
        size_t nlen = colon ? (size_t)(colon - l) : len;
        const char *v = colon ? colon + 1 : l + len;
        size_t vlen = len - nlen - (colon ? 1 : 0);
        if (vlen && *v == ' ')
            v++, vlen--;
        process_field(ps, l, nlen, v, vlen);
    }
    tu_buf_reset(&ps->line);
}

void tu_sse_feed(tu_sse_parser *ps, const char *data, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char ch = data[i];
        if (ps->after_cr) {
            ps->after_cr = false;
            if (ch == '\n')
                continue;
        }
        if (ch == '\r') {
            process_line(ps);
            ps->after_cr = true;
        } else if (ch == '\n') {
            process_line(ps);
        } else {
            tu_buf_append(&ps->line, &ch, 1);
        }
    }
}

static char *dup_bytes(const char *s, size_t len)
{
    char *d = malloc(len + 1);
    if (!d)
        abort();
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

static void copy_event(tu_event *dst, const tu_event *src)
{
    dst->id = dup_bytes(src->id, src->id_len);
    dst->event = dup_bytes(src->event, src->event_len);
    dst->data = dup_bytes(src->data, src->data_len);
    dst->id_len = src->id_len;
    dst->event_len = src->event_len;
    dst->data_len = src->data_len;
}

void tu_event_clear(tu_event *ev)
{
    free(ev->id);
    free(ev->event);
    free(ev->data);
    memset(ev, 0, sizeof(*ev));
}

typedef struct collector {
    tu_event *evs;
    size_t n, cap;
} collector;

static void collect(void *ud, const tu_event *ev)
{
    collector *c = ud;
    if (c->n == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 4;
        c->evs = realloc(c->evs, c->cap * sizeof(*c->evs));
        if (!c->evs)
            abort();
    }
    copy_event(&c->evs[c->n++], ev);
}

size_t tu_sse_parse_all(const char *data, size_t len, tu_event **out)
{
    collector c = {0};
    tu_sse_parser ps;
    tu_sse_init(&ps, collect, &c);
    tu_sse_feed(&ps, data, len);
    tu_sse_free(&ps);
    *out = c.evs;
    return c.n;
}

void tu_events_free(tu_event *evs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        tu_event_clear(&evs[i]);
    free(evs);
}

/* ---- Sockets ----------------------------------------------------------------------------- */

int64_t tu_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tu_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int tu_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

bool tu_send_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        data += n;
        len -= (size_t)n;
    }
    return true;
}

long tu_recv(int fd, char *buf, size_t cap, int timeout_ms)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int64_t deadline = tu_now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - tu_now_ms();
        int rc = poll(&pfd, 1, left > 0 ? (int)left : 0);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0)
            return -1;
        if (rc == 0)
            return -2;
        ssize_t n = recv(fd, buf, cap, 0);
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -1 : (long)n;
    }
}

/* ---- SSE client ---------------------------------------------------------------------------- */

static void client_on_event(void *ud, const tu_event *ev)
{
    tu_client *c = ud;
    if (c->user_fn) {
        c->user_fn(c->user_ud, ev);
        return;
    }
    if (c->qlen == c->qcap) {
        c->qcap = c->qcap ? c->qcap * 2 : 16;
        c->queue = realloc(c->queue, c->qcap * sizeof(*c->queue));
        if (!c->queue)
            abort();
    }
    copy_event(&c->queue[c->qlen++], ev);
}

bool tu_client_open(tu_client *c, int port, const char *path, tu_event_fn fn, void *ud)
{
    memset(c, 0, sizeof(*c));
    c->user_fn = fn;
    c->user_ud = ud;
    tu_sse_init(&c->parser, client_on_event, c);
    c->fd = tu_connect(port);
    if (c->fd < 0)
        return false;
    char req[512];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n",
                     path, port);
    return n > 0 && (size_t)n < sizeof(req) && tu_send_all(c->fd, req, (size_t)n);
}

/* Split the response head off the first bytes; the rest is the event stream. */
static void client_feed(tu_client *c, const char *data, size_t len)
{
    if (c->head_done) {
        tu_sse_feed(&c->parser, data, len);
        return;
    }
    size_t before = c->head.len;
    tu_buf_append(&c->head, data, len);
    char *end = strstr(c->head.p, "\r\n\r\n");
    if (!end)
        return;
    c->head_done = true;
    sscanf(c->head.p, "HTTP/1.%*d %d", &c->status);
    size_t head_len = (size_t)(end - c->head.p) + 4;
    size_t used = head_len - before; /* of this chunk */
    c->head.len = head_len;
    c->head.p[head_len] = '\0'; /* the head alone; the rest went to the parser */
    tu_sse_feed(&c->parser, data + used, len - used);
}

long tu_client_pump(tu_client *c, int timeout_ms)
{
    char buf[16384];
    if (c->eof)
        return 0;
    long n = tu_recv(c->fd, buf, sizeof(buf), timeout_ms);
    if (n == 0)
        c->eof = true;
    if (n > 0)
        client_feed(c, buf, (size_t)n);
    return n;
}

int tu_client_next(tu_client *c, tu_event *ev, int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;
    while (c->qhead == c->qlen) {
        int64_t left = deadline - tu_now_ms();
        if (left <= 0)
            return -1;
        long n = tu_client_pump(c, (int)left);
        if (n == 0)
            return 0;
        if (n == -1)
            return -1;
    }
    *ev = c->queue[c->qhead++];
    memset(&c->queue[c->qhead - 1], 0, sizeof(*ev));
    return 1;
}

bool tu_client_subscribe(tu_client *c, int port, const char *topic, int timeout_ms)
{
    char path[300];
    snprintf(path, sizeof(path), "/events?topic=%s", topic);
    if (!tu_client_open(c, port, path, NULL, NULL))
        return false;
    tu_event ev;
    if (tu_client_next(c, &ev, timeout_ms) != 1)
        return false;
    bool ok = c->status == 200 && strcmp(ev.event, "connected") == 0;
    tu_event_clear(&ev);
    return ok;
}

bool tu_client_wait_eof(tu_client *c, int timeout_ms)
{
    int64_t deadline = tu_now_ms() + timeout_ms;
    while (!c->eof) {
        int64_t left = deadline - tu_now_ms();
        if (left <= 0)
            return false;
        if (tu_client_pump(c, (int)left) == -1)
            return true; /* a reset closes the stream too */
    }
    return true;
}

void tu_client_close(tu_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    for (size_t i = c->qhead; i < c->qlen; i++)
        tu_event_clear(&c->queue[i]);
    free(c->queue);
    c->queue = NULL;
    c->qlen = c->qhead = c->qcap = 0;
    tu_buf_free(&c->head);
    tu_sse_free(&c->parser);
}

/* ---- redis-server processes ---------------------------------------------------------------- */

/* What is running or still on disk, by value: a test's tu_redis may live on its stack, gone by
 * the time a suite's .fini calls tu_redis_stop_all(). */
static struct {
    pid_t pid;
    char dir[64];
} redis_started[8];

static void track(const tu_redis *s, pid_t pid)
{
    for (size_t i = 0; i < sizeof(redis_started) / sizeof(redis_started[0]); i++) {
        if (redis_started[i].dir[0] == '\0' || strcmp(redis_started[i].dir, s->dir) == 0) {
            redis_started[i].pid = pid;
            snprintf(redis_started[i].dir, sizeof(redis_started[i].dir), "%s", s->dir);
            return;
        }
    }
}

static void untrack(const tu_redis *s, bool forget)
{
    for (size_t i = 0; i < sizeof(redis_started) / sizeof(redis_started[0]); i++) {
        if (s->dir[0] != '\0' && strcmp(redis_started[i].dir, s->dir) == 0) {
            redis_started[i].pid = 0;
            if (forget)
                redis_started[i].dir[0] = '\0';
        }
    }
}

int tu_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

redisContext *tu_redis_connect(const tu_redis *s)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", s->port, tv);
    if (c == NULL || c->err) {
        if (c != NULL)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    if (s->password != NULL) {
        redisReply *rep = redisCommand(c, "AUTH %s", s->password);
        if (rep != NULL)
            freeReplyObject(rep);
    }
    return c;
}

redisReply *tu_redis_cmd(const tu_redis *s, int db, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = tu_redis_vcmd(s, db, fmt, ap);
    va_end(ap);
    return rep;
}

redisReply *tu_redis_vcmd(const tu_redis *s, int db, const char *fmt, va_list ap)
{
    redisContext *c = tu_redis_connect(s);
    if (c == NULL)
        return NULL;
    if (db != 0) {
        redisReply *sel = redisCommand(c, "SELECT %d", db);
        if (sel != NULL)
            freeReplyObject(sel);
    }
    redisReply *rep = redisvCommand(c, fmt, ap);
    redisFree(c);
    return rep;
}

bool tu_redis_spawn(tu_redis *s, int timeout_ms)
{
    char port[16], log[128];
    snprintf(port, sizeof(port), "%d", s->port);
    snprintf(log, sizeof(log), "%s/redis.log", s->dir);
    const char *argv[24];
    int n = 0;
    argv[n++] = "/usr/bin/redis-server";
    argv[n++] = "--port";
    argv[n++] = port;
    argv[n++] = "--bind";
    argv[n++] = "127.0.0.1";
    if (s->ipv6)
        argv[n++] = "::1";
    argv[n++] = "--save";
    argv[n++] = "";
    argv[n++] = "--appendonly";
    argv[n++] = s->aof ? "yes" : "no";
    if (s->aof) {
        argv[n++] = "--appendfsync";
        argv[n++] = "always";
    }
    argv[n++] = "--dir";
    argv[n++] = s->dir;
    argv[n++] = "--unixsocket";
    argv[n++] = s->sock;
    argv[n++] = "--unixsocketperm";
    argv[n++] = "700";
    if (s->password != NULL) {
        argv[n++] = "--requirepass";
        argv[n++] = s->password;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(s->error, sizeof(s->error), "fork: %s", strerror(errno));
        return false;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        /* Nothing of the test process (Criterion's channel, the loop's fds) goes along. */
        for (int i = 3; i < 1024; i++)
            close(i);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    s->pid = pid;
    track(s, pid);
    int64_t deadline = tu_now_ms() + timeout_ms;
    while (tu_now_ms() < deadline) {
        redisContext *c = tu_redis_connect(s);
        if (c != NULL) {
            redisReply *rep = redisCommand(c, "PING");
            bool ok = rep != NULL && rep->type == REDIS_REPLY_STATUS;
            if (rep != NULL)
                freeReplyObject(rep);
            redisFree(c);
            if (ok)
                return true;
        }
        tu_sleep_ms(10);
    }
    snprintf(s->error, sizeof(s->error), "redis-server did not start on port %d (log: %s)", s->port,
             log);
    return false;
}

bool tu_redis_start(tu_redis *s, int timeout_ms)
{
    s->pid = 0;
    s->error[0] = '\0';
    snprintf(s->dir, sizeof(s->dir), "/tmp/pl-redis-test-XXXXXX");
    if (mkdtemp(s->dir) == NULL) {
        snprintf(s->error, sizeof(s->error), "mkdtemp: %s", strerror(errno));
        s->dir[0] = '\0';
        return false;
    }
    snprintf(s->sock, sizeof(s->sock), "%s/redis.sock", s->dir);
    if (s->port == 0)
        s->port = tu_free_port();
    if (s->port <= 0) {
        snprintf(s->error, sizeof(s->error), "no free port");
        tu_redis_stop(s);
        return false;
    }
    if (!tu_redis_spawn(s, timeout_ms)) {
        char why[sizeof(s->error)];
        memcpy(why, s->error, sizeof(why));
        tu_redis_stop(s);
        memcpy(s->error, why, sizeof(why));
        return false;
    }
    return true;
}

static void kill_pid(pid_t pid)
{
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
}

void tu_redis_kill(tu_redis *s)
{
    kill_pid(s->pid);
    s->pid = 0;
    untrack(s, false);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void remove_dir(const char *dir)
{
    if (dir[0] != '\0')
        nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS); /* the log, the socket, the AOF directory */
}

void tu_redis_stop(tu_redis *s)
{
    tu_redis_kill(s);
    untrack(s, true);
    remove_dir(s->dir);
    s->dir[0] = '\0';
}

void tu_redis_stop_all(void)
{
    for (size_t i = 0; i < sizeof(redis_started) / sizeof(redis_started[0]); i++) {
        if (redis_started[i].dir[0] == '\0')
            continue;
        kill_pid(redis_started[i].pid);
        remove_dir(redis_started[i].dir);
        memset(&redis_started[i], 0, sizeof(redis_started[i]));
    }
}
