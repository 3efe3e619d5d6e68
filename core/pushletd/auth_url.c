/* pushletd --auth-url: see auth_url.h and docs/PUSHLETD.md, "Auth backend". */
#define _GNU_SOURCE /* pipe2 */
#include "auth_url.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define COMPONENT "auth-url"
/* Jobs waiting for a worker beyond this are denied at once: the backend is not keeping up. */
#define MAX_QUEUED_JOBS 8192

/* ---- response parsing (no I/O) ---------------------------------------------------------- */

static int on_body(http_parser *hp, const char *at, size_t len)
{
    pl_authurl_response *r = hp->data;
    size_t room = sizeof(r->body) - r->body_len;
    if (len > room) {
        r->truncated = 1;
        len = room;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    return 0;
}

static int on_message_complete(http_parser *hp)
{
    pl_authurl_response *r = hp->data;
    if (hp->status_code >= 100 && hp->status_code < 200 && hp->status_code != 101 && !hp->upgrade) {
        /* an interim answer (100 Continue, 103 Early Hints): the real one follows */
        r->body_len = 0;
        r->truncated = 0;
        return 0;
    }
    r->status = hp->status_code;
    r->keep_alive = http_should_keep_alive(hp) != 0;
    r->done = 1;
    http_parser_pause(hp, 1); /* whatever follows belongs to no request of ours */
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void pl_authurl_response_init(pl_authurl_response *r)
{
    r->status = 0;
    r->keep_alive = 0;
    r->done = 0;
    r->truncated = 0;
    r->body_len = 0;
    http_parser_init(&r->parser, HTTP_RESPONSE);
    r->parser.data = r;
}

int pl_authurl_response_feed(pl_authurl_response *r, const char *data, size_t len, size_t *used)
{
    *used = 0;
    if (r->done)
        return PL_AUTHURL_DONE;
    size_t n = http_parser_execute(&r->parser, &parser_settings, data, len);
    enum http_errno err = HTTP_PARSER_ERRNO(&r->parser);
    *used = n < len ? n : len; /* at EOF (len 0) the parser may report 1 */
    if (r->done)               /* the parser takes any three digits as a status */
        return r->status < 200 || r->status > 599 || r->parser.upgrade ? PL_AUTHURL_BAD
                                                                       : PL_AUTHURL_DONE;
    if (err != HPE_OK || r->parser.upgrade)
        return PL_AUTHURL_BAD;
    return len == 0 ? PL_AUTHURL_BAD : PL_AUTHURL_MORE; /* closed before the end */
}

/* Length of the valid UTF-8 sequence at s[0..len), or 0 when it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    unsigned char c = s[0];
    size_t n;
    unsigned int cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4, cp = c & 0x07;
    else
        return 0;
    if (len < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

/* The body's first line as a deny reason: at most PL_AUTHURL_REASON_MAX bytes of UTF-8, cut at
 * a character boundary, other control characters and invalid bytes as '?', trimmed. */
static void first_line(const char *body, size_t len, char *out)
{
    const unsigned char *s = (const unsigned char *)body;
    size_t i = 0, o = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t'))
        i++;
    while (i < len && s[i] != '\n' && s[i] != '\r') {
        size_t n = utf8_seq(s + i, len - i);
        if (n == 0 || (n == 1 && (s[i] < 0x20 || s[i] == 0x7F))) {
            if (o + 1 > PL_AUTHURL_REASON_MAX)
                break;
            out[o++] = s[i] == '\t' ? ' ' : '?';
            i++;
            continue;
        }
        if (o + n > PL_AUTHURL_REASON_MAX)
            break;
        memcpy(out + o, s + i, n);
        o += n;
        i += n;
    }
    while (o > 0 && out[o - 1] == ' ')
        o--;
    out[o] = '\0';
}

static void deny(pl_authurl_answer *a, int status, const char *reason)
{
    a->allow = 0;
    a->status = status;
    snprintf(a->reason, sizeof(a->reason), "%s", reason);
    a->has_user = 0;
    a->user[0] = '\0';
    free(a->metadata);
    a->metadata = NULL;
}

/* A 2xx body for a connection: empty or not a JSON object → allow as is; a JSON object → its
 * "user" (string or null) and "metadata" (any JSON value). */
static void allow_connect(const pl_authurl_response *r, pl_authurl_answer *a)
{
    const char *b = r->body;
    size_t len = r->body_len;
    while (len > 0 && (*b == ' ' || *b == '\t' || *b == '\r' || *b == '\n'))
        b++, len--;
    if (len == 0 || *b != '{')
        return;
    cJSON *root = r->truncated ? NULL : cJSON_ParseWithLength(b, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        deny(a, 503, "bad answer from the authorization backend");
        return;
    }
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(root, "user");
    if (user && !cJSON_IsNull(user)) {
        /* the broker takes one line of text of at most PL_AUTHURL_USER_MAX bytes */
        const char *u = cJSON_IsString(user) ? user->valuestring : NULL;
        size_t ulen = u ? strlen(u) : SIZE_MAX;
        for (size_t i = 0; ulen <= PL_AUTHURL_USER_MAX && i < ulen; i++)
            if ((unsigned char)u[i] < 0x20 || u[i] == 0x7F)
                ulen = SIZE_MAX;
        if (ulen > PL_AUTHURL_USER_MAX) {
            cJSON_Delete(root);
            deny(a, 503, "bad user from the authorization backend");
            return;
        }
        memcpy(a->user, u, ulen + 1);
        a->has_user = ulen > 0; /* "" like null: no user id of the backend's */
    }
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (meta && !cJSON_IsNull(meta)) {
        a->metadata = cJSON_PrintUnformatted(meta);
        if (!a->metadata || strlen(a->metadata) > PL_AUTHURL_META_MAX) {
            cJSON_Delete(root);
            deny(a, 503, "bad metadata from the authorization backend");
            return;
        }
    }
    cJSON_Delete(root);
}

void pl_authurl_decide(const pl_authurl_response *r, int connect, pl_authurl_answer *a)
{
    memset(a, 0, sizeof(*a));
    if (!r->done) {
        deny(a, 503, "no answer from the authorization backend");
    } else if (r->status >= 200 && r->status < 300) {
        a->allow = 1;
        if (connect)
            allow_connect(r, a);
    } else if (r->status >= 400 && r->status < 500) {
        a->allow = 0;
        a->status = r->status;
        first_line(r->body, r->body_len, a->reason);
    } else {
        deny(a, 503, "authorization backend error");
    }
}

void pl_authurl_answer_clear(pl_authurl_answer *a)
{
    free(a->metadata);
    a->metadata = NULL;
}

/* ---- the URL ---------------------------------------------------------------------------- */

typedef struct url_parts {
    char host[256];      /* without brackets */
    char port[8];        /* decimal */
    char authority[300]; /* the Host header */
    char path[2048];     /* from the first '/', query included */
} url_parts;

static int parse_url(const char *url, url_parts *u, char *why, size_t cap)
{
#define BAD(msg) return (snprintf(why, cap, "%s", msg), -1)
    if (strncasecmp(url, "https://", 8) == 0)
        BAD("https is not supported (use http:// to a backend on a trusted network)");
    if (strncasecmp(url, "http://", 7) != 0)
        BAD("expected http://HOST[:PORT][/PATH]");
    const char *auth = url + 7;
    size_t alen = strcspn(auth, "/?#");
    const char *rest = auth + alen;
    if (alen == 0)
        BAD("no host");
    if (memchr(auth, '@', alen))
        BAD("credentials in the URL are not supported");
    if (alen >= sizeof(u->authority))
        BAD("host too long");
    memcpy(u->authority, auth, alen);
    u->authority[alen] = '\0';

    const char *host = auth, *port = NULL;
    size_t hlen;
    if (*auth == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close)
            BAD("unterminated [IPv6] literal");
        host = auth + 1;
        hlen = (size_t)(close - host);
        if (close + 1 < auth + alen) {
            if (close[1] != ':')
                BAD("expected :PORT after ]");
            port = close + 2;
        }
    } else {
        const char *colon = memchr(auth, ':', alen);
        hlen = colon ? (size_t)(colon - auth) : alen;
        if (colon)
            port = colon + 1;
    }
    if (hlen == 0 || hlen >= sizeof(u->host))
        BAD("bad host");
    memcpy(u->host, host, hlen);
    u->host[hlen] = '\0';
    long pn = 80;
    if (port) {
        size_t plen = (size_t)(auth + alen - port);
        char *end;
        char digits[8];
        if (plen == 0 || plen >= sizeof(digits) || strspn(port, "0123456789") < plen)
            BAD("bad port");
        memcpy(digits, port, plen);
        digits[plen] = '\0';
        pn = strtol(digits, &end, 10);
        if (pn < 1 || pn > 65535)
            BAD("bad port");
    }
    snprintf(u->port, sizeof(u->port), "%ld", pn);

    size_t plen = strcspn(rest, "#");
    if (plen + 2 > sizeof(u->path))
        BAD("path too long");
    for (size_t i = 0; i < plen; i++)
        if ((unsigned char)rest[i] <= ' ' || rest[i] == 0x7F)
            BAD("spaces or control characters in the path");
    /* "http://h?x" has the path "/?x" */
    snprintf(u->path, sizeof(u->path), "%s%.*s", rest[0] == '/' ? "" : "/", (int)plen, rest);
    return 0;
#undef BAD
}

int pl_authurl_check(const char *url, char *why, size_t cap)
{
    url_parts u;
    return parse_url(url, &u, why, cap);
}

/* ---- the service ------------------------------------------------------------------------ */

typedef struct job {
    struct job *next;
    uint64_t request;
    int connect;
    int64_t deadline; /* ms, CLOCK_MONOTONIC */
    size_t len;
    char *http; /* the whole request: head and body */
} job;

struct pl_authurl {
    pushlet_t *p;
    pl_authurl_config cfg;
    url_parts url;
    struct addrinfo *addrs;

    pthread_mutex_t lock;
    pthread_cond_t ready;
    job *head, *tail;
    size_t queued;
    int stopping;

    int stop_pipe[2]; /* written once at stop: readable for ever after, wakes every poll() */
    pthread_t dispatcher;
    int dispatcher_started;
    pthread_t *workers;
    int nworkers;
    atomic_int backend_ok; /* last exchange worked; flips are logged, not every failure */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void logf_(pl_authurl_t *a, int level, const char *fmt, ...)
{
    if (!a->cfg.log || level < a->cfg.log_level)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    a->cfg.log(level, COMPONENT, msg, (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1, NULL);
}

/* Client-supplied strings go into JSON: make them valid UTF-8 (invalid bytes → U+FFFD). */
static cJSON *json_string(const char *s, size_t len)
{
    char *buf = malloc(len * 3 + 1);
    if (!buf)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_seq((const unsigned char *)s + i, len - i);
        if (n == 0 || (n == 1 && s[i] == '\0')) {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(buf + o, s + i, n);
            o += n;
            i += n;
        }
    }
    buf[o] = '\0';
    cJSON *item = cJSON_CreateString(buf);
    free(buf);
    return item;
}

static void add_string(cJSON *obj, const char *name, const char *s, size_t len)
{
    cJSON *item = json_string(s ? s : "", s ? len : 0);
    if (item)
        cJSON_AddItemToObject(obj, name, item);
}

static void add_uint64(cJSON *obj, const char *name, uint64_t v)
{
    char num[24];
    snprintf(num, sizeof(num), "%llu", (unsigned long long)v); /* exact, unlike a double */
    cJSON_AddItemToObject(obj, name, cJSON_CreateRaw(num));
}

/* Header names in lower case; repeated fields joined as HTTP allows (Cookie with "; "). */
static void add_headers(cJSON *obj, const pushlet_event_t *e)
{
    cJSON *h = cJSON_AddObjectToObject(obj, "headers");
    size_t count = pushlet_event_header_count(e);
    for (size_t i = 0; h && i < count; i++) {
        const char *name, *value;
        if (!pushlet_event_header_at(e, i, &name, &value)) /* 1 = found */
            continue;
        char lower[128];
        size_t n = strlen(name);
        if (n >= sizeof(lower))
            continue;
        for (size_t k = 0; k <= n; k++)
            lower[k] = (char)('A' <= name[k] && name[k] <= 'Z' ? name[k] + 32 : name[k]);
        cJSON *prev = cJSON_GetObjectItemCaseSensitive(h, lower);
        if (!prev) {
            add_string(h, lower, value, strlen(value));
            continue;
        }
        const char *sep = strcmp(lower, "cookie") == 0 ? "; " : ", ";
        size_t plen = strlen(prev->valuestring), vlen = strlen(value);
        char *joined = malloc(plen + 2 + vlen + 1);
        if (!joined)
            continue;
        memcpy(joined, prev->valuestring, plen);
        memcpy(joined + plen, sep, 2);
        memcpy(joined + plen + 2, value, vlen + 1);
        cJSON *item = json_string(joined, plen + 2 + vlen);
        free(joined);
        if (item)
            cJSON_ReplaceItemInObjectCaseSensitive(h, lower, item);
    }
}

/* The request document for one event (see docs/PUSHLETD.md), or NULL when out of memory. */
static char *request_body(const pushlet_event_t *e)
{
    int connect = pushlet_event_type(e) == PUSHLET_EVENT_AUTH_CONNECT;
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    size_t len;
    const char *s;
    cJSON_AddStringToObject(o, "type", connect ? "connect" : "subscribe");
    add_uint64(o, "connection", pushlet_event_connection(e));
    cJSON_AddStringToObject(
        o, "transport", pushlet_event_transport(e) == PUSHLET_TRANSPORT_WS ? "websocket" : "sse");
    s = pushlet_event_user(e, &len);
    add_string(o, "user", s, len);
    if (connect) {
        s = pushlet_event_method(e);
        add_string(o, "method", s, strlen(s));
        s = pushlet_event_path(e, &len);
        add_string(o, "path", s, len);
        s = pushlet_event_query(e, &len);
        add_string(o, "query", s, len);
        s = pushlet_event_remote(e);
        add_string(o, "remote", s, strlen(s));
        add_headers(o, e);
    } else {
        /* metadata is JSON text when it came from this backend; anything else as a string */
        s = pushlet_event_metadata(e, &len);
        cJSON *meta = len ? cJSON_ParseWithLength(s, len) : cJSON_CreateNull();
        if (meta)
            cJSON_AddItemToObject(o, "metadata", meta);
        else
            add_string(o, "metadata", s, len);
        s = pushlet_event_topic(e, &len);
        add_string(o, "topic", s, len);
    }
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

static job *make_job(pl_authurl_t *a, const pushlet_event_t *e)
{
    char *body = request_body(e);
    job *j = body ? calloc(1, sizeof(*j)) : NULL;
    if (!j) {
        free(body);
        return NULL;
    }
    size_t blen = strlen(body);
    const char *fmt = "POST %s HTTP/1.1\r\n"
                      "Host: %s\r\n"
                      "User-Agent: pushletd/%s\r\n"
                      "Content-Type: application/json\r\n"
                      "Accept: application/json, text/plain\r\n"
                      "Content-Length: %zu\r\n\r\n";
    int head =
        snprintf(NULL, 0, fmt, a->url.path, a->url.authority, pushlet_version_string(), blen);
    j->http = head > 0 ? malloc((size_t)head + blen + 1) : NULL;
    if (!j->http) {
        free(body);
        free(j);
        return NULL;
    }
    snprintf(j->http, (size_t)head + 1, fmt, a->url.path, a->url.authority,
             pushlet_version_string(), blen);
    memcpy(j->http + head, body, blen + 1);
    free(body);
    j->len = (size_t)head + blen;
    j->request = pushlet_event_request(e);
    j->connect = pushlet_event_type(e) == PUSHLET_EVENT_AUTH_CONNECT;
    j->deadline = now_ms() + a->cfg.timeout_ms;
    return j;
}

static void free_job(job *j)
{
    if (j) {
        free(j->http);
        free(j);
    }
}

/* Drains the pull queue into the job list; never waits on the backend. */
static void *dispatch_main(void *arg)
{
    pl_authurl_t *a = arg;
    struct pollfd pf[2] = {{pushlet_event_fd(a->p), POLLIN, 0}, {a->stop_pipe[0], POLLIN, 0}};
    for (;;) {
        if (poll(pf, 2, -1) < 0 && errno != EINTR)
            break;
        if (pf[1].revents)
            break;
        pushlet_event_t *e;
        while ((e = pushlet_event_next(a->p)) != NULL) {
            int type = pushlet_event_type(e);
            if (type != PUSHLET_EVENT_AUTH_CONNECT && type != PUSHLET_EVENT_AUTH_SUBSCRIBE) {
                pushlet_event_free(e);
                continue;
            }
            uint64_t request = pushlet_event_request(e);
            job *j = make_job(a, e);
            pushlet_event_free(e);
            pthread_mutex_lock(&a->lock);
            int full = a->queued >= MAX_QUEUED_JOBS;
            if (j && !full) {
                if (a->tail)
                    a->tail->next = j;
                else
                    a->head = j;
                a->tail = j;
                a->queued++;
                pthread_cond_signal(&a->ready);
            }
            pthread_mutex_unlock(&a->lock);
            if (!j || full) {
                free_job(full ? j : NULL);
                pushlet_deny(a->p, request, 503, "authorization backend busy");
            }
        }
    }
    return NULL;
}

enum { EX_OK = 0, EX_IO = -1, EX_TIMEOUT = -2, EX_STOPPED = -3, EX_STALE = -4, EX_BAD = -5 };

/* Wait until fd is ready for `events`; also wakes on stop. */
static int wait_fd(pl_authurl_t *a, int fd, short events, int64_t deadline)
{
    struct pollfd pf[2] = {{fd, events, 0}, {a->stop_pipe[0], POLLIN, 0}};
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return EX_TIMEOUT;
        int n = poll(pf, 2, left > INT_MAX ? INT_MAX : (int)left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return EX_IO;
        if (n == 0)
            return EX_TIMEOUT;
        if (pf[1].revents)
            return EX_STOPPED;
        if (pf[0].revents)
            return EX_OK;
    }
}

static int connect_any(pl_authurl_t *a, int64_t deadline, int *out)
{
    int rc = EX_IO;
    for (struct addrinfo *ai = a->addrs; ai; ai = ai->ai_next) {
        int fd =
            socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            *out = fd;
            return EX_OK;
        }
        if (errno == EINPROGRESS) {
            rc = wait_fd(a, fd, POLLOUT, deadline);
            int err = 0;
            socklen_t elen = sizeof(err);
            if (rc == EX_OK && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 && !err) {
                *out = fd;
                return EX_OK;
            }
            if (rc == EX_OK)
                rc = EX_IO;
        }
        close(fd);
        if (rc == EX_TIMEOUT || rc == EX_STOPPED)
            break;
    }
    return rc;
}

/* One request/response on the worker's connection (*fd, -1 = none yet). A reused connection
 * that the backend had closed while idle gives EX_STALE: the caller retries on a new one. */
static int exchange(pl_authurl_t *a, int *fd, const job *j, pl_authurl_response *r)
{
    int reused = *fd >= 0;
    if (!reused) {
        int rc = connect_any(a, j->deadline, fd);
        if (rc != EX_OK)
            return rc;
    }
    for (size_t off = 0; off < j->len;) {
        ssize_t n = send(*fd, j->http + off, j->len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int rc = wait_fd(a, *fd, POLLOUT, j->deadline);
            if (rc != EX_OK)
                return rc;
        } else {
            return reused && off == 0 ? EX_STALE : EX_IO;
        }
    }
    pl_authurl_response_init(r);
    size_t got = 0;
    for (;;) {
        char buf[4096];
        size_t used;
        ssize_t n = recv(*fd, buf, sizeof(buf), 0);
        if (n > 0) {
            got += (size_t)n;
            int st = pl_authurl_response_feed(r, buf, (size_t)n, &used);
            if (st == PL_AUTHURL_DONE) {
                r->keep_alive = r->keep_alive && used == (size_t)n;
                return EX_OK;
            }
            if (st == PL_AUTHURL_BAD)
                return EX_BAD;
        } else if (n == 0) {
            if (reused && got == 0)
                return EX_STALE;
            if (pl_authurl_response_feed(r, NULL, 0, &used) != PL_AUTHURL_DONE)
                return EX_IO;
            r->keep_alive = 0;
            return EX_OK;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int rc = wait_fd(a, *fd, POLLIN, j->deadline);
            if (rc != EX_OK)
                return rc;
        } else {
            return reused && got == 0 && errno == ECONNRESET ? EX_STALE : EX_IO;
        }
    }
}

/* Log when the backend starts or stops working, not every failed request. */
static void note_backend(pl_authurl_t *a, const char *problem)
{
    int ok = problem == NULL;
    if (atomic_exchange(&a->backend_ok, ok) == ok)
        return;
    if (ok)
        logf_(a, PUSHLET_LOG_INFO, "backend %s answers again", a->url.authority);
    else
        logf_(a, PUSHLET_LOG_WARN, "backend %s %s; denying with 503 while it does",
              a->url.authority, problem);
}

static void answer(pl_authurl_t *a, const job *j, const pl_authurl_answer *ans)
{
    int rc;
    if (ans->allow)
        rc = pushlet_allow(a->p, j->request, ans->has_user ? ans->user : NULL, ans->metadata);
    else
        rc = pushlet_deny(a->p, j->request, ans->status, ans->reason[0] ? ans->reason : NULL);
    /* PUSHLET_ENOENT (timed out, client gone) needs nothing from us; a user id or metadata the
     * broker refuses must not leave the client waiting for the timeout */
    if (rc != 0 && rc != PUSHLET_ENOENT) {
        logf_(a, PUSHLET_LOG_DEBUG, "request %llu: %s; denying with 503",
              (unsigned long long)j->request, pushlet_strerror(rc));
        pushlet_deny(a->p, j->request, 503, "bad answer from the authorization backend");
    }
}

static void *worker_main(void *arg)
{
    pl_authurl_t *a = arg;
    int fd = -1;
    pl_authurl_response *r = malloc(sizeof(*r));
    if (!r)
        return NULL;
    for (;;) {
        pthread_mutex_lock(&a->lock);
        while (!a->head && !a->stopping)
            pthread_cond_wait(&a->ready, &a->lock);
        if (a->stopping) {
            pthread_mutex_unlock(&a->lock);
            break;
        }
        job *j = a->head;
        a->head = j->next;
        if (!a->head)
            a->tail = NULL;
        a->queued--;
        pthread_mutex_unlock(&a->lock);

        pl_authurl_answer ans;
        if (now_ms() >= j->deadline) {
            /* waited too long for a worker: the broker has denied it already */
            pushlet_deny(a->p, j->request, 503, "authorization timed out");
            free_job(j);
            continue;
        }
        int rc = exchange(a, &fd, j, r);
        if (rc == EX_STALE) {
            close(fd);
            fd = -1;
            rc = exchange(a, &fd, j, r);
        }
        if (rc != EX_OK || !r->keep_alive) {
            if (fd >= 0)
                close(fd);
            fd = -1;
        }
        if (rc == EX_STOPPED) {
            free_job(j);
            break;
        }
        note_backend(a, rc == EX_OK        ? (r->status >= 500 ? "answers 5xx" : NULL)
                        : rc == EX_TIMEOUT ? "does not answer in time"
                        : rc == EX_BAD     ? "sends malformed responses"
                                           : "is unreachable");
        if (rc == EX_OK) {
            pl_authurl_decide(r, j->connect, &ans);
            answer(a, j, &ans);
            pl_authurl_answer_clear(&ans);
        } else {
            pushlet_deny(a->p, j->request, 503,
                         rc == EX_TIMEOUT ? "authorization timed out"
                         : rc == EX_BAD   ? "bad answer from the authorization backend"
                                          : "authorization backend unreachable");
        }
        free_job(j);
    }
    if (fd >= 0)
        close(fd);
    free(r);
    return NULL;
}

static void destroy(pl_authurl_t *a)
{
    job *j = a->head;
    while (j) {
        job *next = j->next;
        free_job(j);
        j = next;
    }
    if (a->addrs)
        freeaddrinfo(a->addrs);
    for (int i = 0; i < 2; i++)
        if (a->stop_pipe[i] >= 0)
            close(a->stop_pipe[i]);
    pthread_cond_destroy(&a->ready);
    pthread_mutex_destroy(&a->lock);
    free(a->workers);
    free(a);
}

int pl_authurl_start(pl_authurl_t **out, pushlet_t *p, const pl_authurl_config *cfg, char *why,
                     size_t cap)
{
    *out = NULL;
    if (cfg->workers < 1 || cfg->workers > 256 || cfg->timeout_ms < 1)
        return snprintf(why, cap, "bad worker count or timeout"), -1;
    pl_authurl_t *a = calloc(1, sizeof(*a));
    if (!a)
        return snprintf(why, cap, "out of memory"), -1;
    a->p = p;
    a->cfg = *cfg;
    a->stop_pipe[0] = a->stop_pipe[1] = -1;
    atomic_init(&a->backend_ok, 1);
    pthread_mutex_init(&a->lock, NULL);
    pthread_cond_init(&a->ready, NULL);
    if (parse_url(cfg->url, &a->url, why, cap) != 0) {
        destroy(a);
        return -1;
    }
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    int gai = getaddrinfo(a->url.host, a->url.port, &hints, &a->addrs);
    if (gai != 0) {
        snprintf(why, cap, "cannot resolve %s: %s", a->url.host, gai_strerror(gai));
        a->addrs = NULL;
        destroy(a);
        return -1;
    }
    a->workers = calloc((size_t)cfg->workers, sizeof(*a->workers));
    if (!a->workers || pipe2(a->stop_pipe, O_CLOEXEC) != 0) {
        snprintf(why, cap, "%s", a->workers ? strerror(errno) : "out of memory");
        destroy(a);
        return -1;
    }
    int rc = pushlet_events_enable(p, PUSHLET_EVENT_AUTH_CONNECT | PUSHLET_EVENT_AUTH_SUBSCRIBE);
    if (rc != 0) {
        snprintf(why, cap, "%s", pushlet_strerror(rc));
        destroy(a);
        return -1;
    }
    if (pthread_create(&a->dispatcher, NULL, dispatch_main, a) != 0) {
        snprintf(why, cap, "cannot start a thread");
        pushlet_events_enable(p, 0);
        destroy(a);
        return -1;
    }
    a->dispatcher_started = 1;
    for (; a->nworkers < cfg->workers; a->nworkers++)
        if (pthread_create(&a->workers[a->nworkers], NULL, worker_main, a) != 0) {
            snprintf(why, cap, "cannot start a thread");
            pl_authurl_stop(a);
            return -1;
        }
    logf_(a, PUSHLET_LOG_INFO, "asking http://%s%s (%d workers, timeout %d ms)", a->url.authority,
          a->url.path, cfg->workers, cfg->timeout_ms);
    *out = a;
    return 0;
}

void pl_authurl_stop(pl_authurl_t *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->lock);
    a->stopping = 1;
    pthread_cond_broadcast(&a->ready);
    pthread_mutex_unlock(&a->lock);
    ssize_t w;
    do
        w = write(a->stop_pipe[1], "x", 1);
    while (w < 0 && errno == EINTR);
    if (a->dispatcher_started)
        pthread_join(a->dispatcher, NULL);
    for (int i = 0; i < a->nworkers; i++)
        pthread_join(a->workers[i], NULL);
    /* jobs never taken: their requests end with the broker (stopped) or time out */
    destroy(a);
}
