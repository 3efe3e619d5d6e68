/* The host's hooks: auth requests it answers (at once or later, from any thread), lifecycle
 * events, client messages, and its sends and closes aimed at one connection or one user.
 *
 * Every event goes either to the handler (called here, on the loop thread) or to the pull queue
 * (events.c): one event type, the same accessors. A request is a pl_request known by id: it sits
 * in `p->requests` (guarded by hooks_mu) until answered; pushlet_allow()/pushlet_deny() take it
 * out under the lock, so a second answer, or one after the client left or after the deadline,
 * finds nothing and returns PUSHLET_ENOENT. The answer is queued and the loop woken; the loop
 * applies answers in on_wake, never inside the call that delivered the event, so an answer
 * given synchronously in the handler takes the same path as one from another thread. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_USER_ID   256
#define MAX_METADATA  4096
#define MAX_REASON    120
#define TIMEOUT_TEXT  "authorization timed out"
#define REFUSED_TOPIC "topic not allowed"

enum { REQ_CONNECT = 1, REQ_TOPIC, REQ_COMMAND };

typedef struct pl_request {
    uint64_t id;
    pl_conn *c;              /* loop: NULL once the connection left */
    pl_link by_conn, by_age; /* loop: in c->requests, in p->pending */
    uint64_t deadline;       /* loop time */
    uint8_t kind;            /* REQ_* */
    /* The answer, written under hooks_mu by whoever answers. */
    bool allow;
    int status;
    char *user, *meta, *reason; /* NULL: not given */
    struct pl_request *next_answered;
    bool has_since;
    pl_position since;
    uint16_t topic_len;
    char topic[];
} pl_request;

bool pl_hooks_want(const pushlet_t *p, int kind)
{
    return (p->hook_mask & (uint32_t)kind) ||
           (__atomic_load_n(&p->events.mask, __ATOMIC_RELAXED) & (uint32_t)kind);
}

/* Hands `e` to the handler or the queue; false when neither took it. */
static bool emit(pushlet_t *p, pushlet_event_t *e)
{
    if (p->hook_mask & (uint32_t)e->type) {
        p->hook_fn(p, e, p->hook_ud);
        free(e);
        return true;
    }
    if (__atomic_load_n(&p->events.mask, __ATOMIC_RELAXED) & (uint32_t)e->type)
        return pl_events_push(&p->events, e);
    free(e);
    return false;
}

static int transport_of(const pl_conn *c)
{
    if (c->kind == PL_CONN_WS || (c->kind == PL_CONN_HTTP && c->req && c->req->parser.upgrade))
        return PUSHLET_TRANSPORT_WS;
    return PUSHLET_TRANSPORT_SSE;
}

/* An event about `c`, carrying its identity. */
static pushlet_event_t *conn_event(const pl_conn *c, int type, const char *topic, size_t topic_len,
                                   const char *text, size_t text_len)
{
    const char *str[PL_EV_FIELDS] = {0};
    size_t len[PL_EV_FIELDS] = {0};
    str[PL_EV_TEXT] = text, len[PL_EV_TEXT] = text_len;
    str[PL_EV_USER] = c->user, len[PL_EV_USER] = c->user_len;
    str[PL_EV_META] = c->meta, len[PL_EV_META] = c->meta_len;
    str[PL_EV_TOPIC] = topic, len[PL_EV_TOPIC] = topic_len;
    pushlet_event_t *e = pl_event_new(type, str, len, NULL);
    if (e) {
        e->connection = c->id;
        e->transport = transport_of(c);
    }
    return e;
}

/* ---- Requests ------------------------------------------------------------------------------- */

static void free_request(pl_request *r)
{
    free(r->user);
    free(r->meta);
    free(r->reason);
    free(r);
}

static pl_request *new_request(pl_conn *c, int kind, const char *topic, size_t topic_len)
{
    pushlet_t *p = c->p;
    pl_request *r = calloc(1, sizeof(*r) + topic_len + 1);
    if (!r)
        return NULL;
    r->id = ++p->next_request;
    r->c = c;
    r->kind = (uint8_t)kind;
    r->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.auth_timeout_ms;
    r->topic_len = (uint16_t)topic_len;
    if (topic_len)
        memcpy(r->topic, topic, topic_len);
    uv_mutex_lock(&p->hooks_mu);
    int rc = pl_idmap_put(&p->requests, r->id, r);
    uv_mutex_unlock(&p->hooks_mu);
    if (rc != 0) {
        free(r);
        return NULL;
    }
    pl_list_push(&c->requests, &r->by_conn);
    pl_list_push(&p->pending, &r->by_age);
    PL_STAT_ADD(p, PUSHLET_STAT_AUTH_PENDING, 1);
    return r;
}

/* The request leaves the loop's lists (it is answered, expired or cancelled). */
static void unlink_request(pushlet_t *p, pl_request *r)
{
    pl_list_remove(&r->by_conn);
    pl_list_remove(&r->by_age);
    PL_STAT_ADD(p, PUSHLET_STAT_AUTH_PENDING, -1);
}

/* Withdraw a request nobody will act on. One already answered is on its way to the loop: it
 * is marked orphaned and freed when it arrives. */
static void cancel_request(pushlet_t *p, pl_request *r)
{
    uv_mutex_lock(&p->hooks_mu);
    bool unanswered = pl_idmap_remove(&p->requests, r->id) != NULL;
    uv_mutex_unlock(&p->hooks_mu);
    unlink_request(p, r);
    if (unanswered)
        free_request(r);
    else
        r->c = NULL;
}

static void cancel_kind(pl_conn *c, int kind)
{
    for (pl_link *l = c->requests.next, *next; l != &c->requests; l = next) {
        next = l->next;
        pl_request *r = pl_container_of(l, pl_request, by_conn);
        if (r->kind == kind)
            cancel_request(c->p, r);
    }
}

static void format_remote(const pl_conn *c, char out[64])
{
    struct sockaddr_storage sa;
    int len = sizeof(sa);
    char ip[48] = "";
    out[0] = '\0';
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &len) != 0)
        return;
    if (sa.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&sa;
        uv_ip6_name(a, ip, sizeof(ip));
        snprintf(out, 64, "[%s]:%u", ip, ntohs(a->sin6_port));
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&sa;
        uv_ip4_name(a, ip, sizeof(ip));
        snprintf(out, 64, "%s:%u", ip, ntohs(a->sin_port));
    }
}

int pl_hooks_ask_connect(pl_conn *c, const pl_http_req *r, const char *query, size_t qlen)
{
    pushlet_t *p = c->p;
    pl_request *req = new_request(c, REQ_CONNECT, NULL, 0);
    if (!req)
        return 503;
    const char *path, *q;
    size_t plen, ql;
    pl_url_split(pl_http_url(r), r->url.len, &path, &plen, &q, &ql);
    char remote[64];
    format_remote(c, remote);
    const char *str[PL_EV_FIELDS] = {0};
    size_t len[PL_EV_FIELDS] = {0};
    str[PL_EV_USER] = c->user, len[PL_EV_USER] = c->user_len;
    str[PL_EV_METHOD] = http_method_str((enum http_method)r->parser.method);
    len[PL_EV_METHOD] = strlen(str[PL_EV_METHOD]);
    str[PL_EV_PATH] = path, len[PL_EV_PATH] = plen;
    str[PL_EV_QUERY] = query, len[PL_EV_QUERY] = qlen;
    str[PL_EV_REMOTE] = remote, len[PL_EV_REMOTE] = strlen(remote);
    pushlet_event_t *e = pl_event_new(PUSHLET_EVENT_AUTH_CONNECT, str, len, r);
    c->auth_stage = PL_AUTH_CONNECT_WAIT;
    c->parked = true;
    if (e) {
        e->request = req->id;
        e->connection = c->id;
        e->transport = transport_of(c);
    }
    if (!e || !emit(p, e)) {
        cancel_request(p, req);
        c->auth_stage = PL_AUTH_NONE;
        c->parked = false;
        return 503;
    }
    return 0;
}

int pl_hooks_ask_topics(pl_conn *c, char (*topics)[256], const size_t *lens, size_t n)
{
    pushlet_t *p = c->p;
    if (c->auth_stage == PL_AUTH_TOPICS_OK)
        return 0;
    if (n == 0 || !pl_hooks_want(p, PUSHLET_EVENT_AUTH_SUBSCRIBE)) {
        c->auth_stage = PL_AUTH_TOPICS_OK;
        return 0;
    }
    c->auth_stage = PL_AUTH_TOPICS_WAIT;
    c->topics_waiting = (uint16_t)n;
    c->parked = true;
    for (size_t i = 0; i < n; i++) {
        pl_request *req = new_request(c, REQ_TOPIC, topics[i], lens[i]);
        pushlet_event_t *e =
            req ? conn_event(c, PUSHLET_EVENT_AUTH_SUBSCRIBE, topics[i], lens[i], NULL, 0) : NULL;
        if (e)
            e->request = req->id;
        if (!e || !emit(p, e)) {
            cancel_kind(c, REQ_TOPIC);
            c->auth_stage = PL_AUTH_CONNECT_OK;
            c->topics_waiting = 0;
            c->parked = false;
            return 503;
        }
    }
    return PL_AUTH_WAIT;
}

int pl_hooks_ask_command(pl_conn *c, const char *topic, size_t len, const pl_position *since)
{
    for (pl_link *l = c->requests.next; l != &c->requests; l = l->next) {
        pl_request *r = pl_container_of(l, pl_request, by_conn);
        if (r->kind == REQ_COMMAND && r->topic_len == len && memcmp(r->topic, topic, len) == 0)
            return 1;
    }
    pl_request *req = new_request(c, REQ_COMMAND, topic, len);
    if (!req)
        return 503;
    if (since) {
        req->has_since = true;
        req->since = *since;
    }
    c->commands_waiting++;
    pushlet_event_t *e = conn_event(c, PUSHLET_EVENT_AUTH_SUBSCRIBE, topic, len, NULL, 0);
    if (e)
        e->request = req->id;
    if (!e || !emit(c->p, e)) {
        cancel_request(c->p, req);
        c->commands_waiting--;
        return 503;
    }
    return 0;
}

bool pl_hooks_cancel_command(pl_conn *c, const char *topic, size_t len)
{
    for (pl_link *l = c->requests.next; l != &c->requests; l = l->next) {
        pl_request *r = pl_container_of(l, pl_request, by_conn);
        if (r->kind == REQ_COMMAND && r->topic_len == len && memcmp(r->topic, topic, len) == 0) {
            cancel_request(c->p, r);
            c->commands_waiting--;
            return true;
        }
    }
    return false;
}

/* A parked request refused: the answer ends the connection. */
static void refuse(pl_conn *c, int status, const char *reason)
{
    PL_STAT_ADD(c->p, PUSHLET_STAT_AUTH_DENIED, 1);
    cancel_kind(c, REQ_TOPIC);
    c->topics_waiting = 0;
    c->keep_alive = false;
    pl_respond_text(c, status, status == 401 ? "WWW-Authenticate: Bearer\r\n" : "", reason);
    pl_conn_unpark(c);
}

static void replace(char **field, size_t *len, char *value)
{
    free(*field);
    *field = value;
    *len = value ? strlen(value) : 0;
}

/* Applies an answer (or a timeout) to the connection that asked. */
static void apply(pl_conn *c, pl_request *r)
{
    if (c->closing)
        return;
    const char *reason = r->reason;
    if (r->kind == REQ_COMMAND) {
        c->commands_waiting--;
        if (c->ending)
            return;
        if (r->allow) {
            pl_ws_subscribe(c, r->topic, r->topic_len, r->has_since ? &r->since : NULL);
        } else {
            PL_STAT_ADD(c->p, PUSHLET_STAT_AUTH_DENIED, 1);
            pl_ws_reply(c, "error", r->topic, "forbidden",
                        reason ? reason : "not allowed to subscribe to this topic");
        }
        return;
    }
    if (c->ending || !c->parked)
        return;
    if (!r->allow) {
        refuse(c, r->status, reason ? reason : r->kind == REQ_TOPIC ? REFUSED_TOPIC : "forbidden");
    } else if (r->kind == REQ_CONNECT) {
        if (r->user) {
            replace(&c->user, &c->user_len, r->user);
            r->user = NULL;
        }
        if (r->meta) {
            replace(&c->meta, &c->meta_len, r->meta);
            r->meta = NULL;
        }
        c->auth_stage = PL_AUTH_CONNECT_OK;
        pl_conn_unpark(c);
    } else if (--c->topics_waiting == 0) {
        c->auth_stage = PL_AUTH_TOPICS_OK;
        pl_conn_unpark(c);
    }
}

void pl_hooks_take_answers(pushlet_t *p)
{
    uv_mutex_lock(&p->hooks_mu);
    pl_request *r = p->answered;
    p->answered = NULL;
    p->answered_tail = &p->answered;
    uv_mutex_unlock(&p->hooks_mu);
    while (r) {
        pl_request *next = r->next_answered;
        pl_conn *c = r->c;
        if (c) {
            unlink_request(p, r);
            apply(c, r);
        }
        free_request(r);
        r = next;
    }
}

void pl_hooks_expire(pushlet_t *p)
{
    uint64_t now = uv_now(&p->loop);
    while (p->pending.next != &p->pending) {
        pl_request *r = pl_container_of(p->pending.next, pl_request, by_age);
        if (r->deadline > now)
            break;
        uv_mutex_lock(&p->hooks_mu);
        bool unanswered = pl_idmap_remove(&p->requests, r->id) != NULL;
        uv_mutex_unlock(&p->hooks_mu);
        if (!unanswered) { /* its answer is on the way: applied by pl_hooks_take_answers */
            pl_list_remove(&r->by_age);
            continue;
        }
        PL_STAT_ADD(p, PUSHLET_STAT_AUTH_TIMEOUTS, 1);
        pl_conn *c = r->c;
        unlink_request(p, r);
        pl_log_conn(c, PUSHLET_LOG_WARN, "auth", "no answer to an auth request in %lld ms",
                    (long long)p->cfg.auth_timeout_ms);
        r->allow = false;
        r->status = 503;
        r->reason = strdup(TIMEOUT_TEXT);
        apply(c, r);
        free_request(r);
    }
}

/* ---- Answers (any thread) ------------------------------------------------------------------- */

static bool text_ok(const char *s, size_t max, bool one_line)
{
    size_t n = strnlen(s, max + 1);
    if (n > max)
        return false;
    for (size_t i = 0; one_line && i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return false;
    return true;
}

static int answer(pushlet_t *p, uint64_t id, bool allow, int status, const char *user,
                  const char *meta, const char *reason)
{
    if (!p || id == 0 || (user && (!*user || !text_ok(user, MAX_USER_ID, true))) ||
        (meta && !text_ok(meta, MAX_METADATA, false)) ||
        (reason && !text_ok(reason, MAX_REASON, true)) ||
        (!allow && status != 0 && (status < 400 || status > 599)))
        return PUSHLET_EINVAL;
    char *u = user ? strdup(user) : NULL, *m = meta ? strdup(meta) : NULL;
    char *why = reason && *reason ? strdup(reason) : NULL;
    if ((user && !u) || (meta && !m) || (reason && *reason && !why)) {
        free(u);
        free(m);
        free(why);
        return PUSHLET_ENOMEM;
    }
    uv_mutex_lock(&p->hooks_mu);
    pl_request *r = pl_idmap_remove(&p->requests, id);
    if (r) {
        r->allow = allow;
        r->status = status ? status : 403;
        r->user = u, r->meta = m, r->reason = why;
        r->next_answered = NULL;
        *p->answered_tail = r;
        p->answered_tail = &r->next_answered;
        if (p->hooks_open)
            uv_async_send(&p->wake); /* under the lock: the loop cannot close it in between */
    }
    uv_mutex_unlock(&p->hooks_mu);
    if (!r) {
        free(u);
        free(m);
        free(why);
        return PUSHLET_ENOENT;
    }
    return 0;
}

int pushlet_allow(pushlet_t *p, uint64_t request, const char *user_id, const char *metadata)
{
    return answer(p, request, true, 0, user_id, metadata, NULL);
}

int pushlet_deny(pushlet_t *p, uint64_t request, int status, const char *reason)
{
    return answer(p, request, false, status, NULL, NULL, reason);
}

/* ---- Open connections by id and by user ----------------------------------------------------- */

static uint32_t user_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

/* Under hooks_mu. */
static void users_grow(pushlet_t *p)
{
    uint32_t ncap = p->user_cap ? p->user_cap * 2 : 64;
    pl_conn **nb = calloc(ncap, sizeof(*nb));
    if (!nb)
        return; /* longer chains, still correct */
    for (uint32_t i = 0; i < p->user_cap; i++) {
        for (pl_conn *c = p->user_buckets[i], *next; c; c = next) {
            next = c->next_by_user;
            uint32_t b = user_hash(c->user, c->user_len) & (ncap - 1);
            c->next_by_user = nb[b];
            nb[b] = c;
        }
    }
    free(p->user_buckets);
    p->user_buckets = nb;
    p->user_cap = ncap;
}

static pl_conn **user_bucket(const pushlet_t *p, const char *user, size_t len)
{
    return &p->user_buckets[user_hash(user, len) & (p->user_cap - 1)];
}

static pl_conn *first_of_user(const pushlet_t *p, const char *user, size_t len)
{
    if (!p->user_cap)
        return NULL;
    for (pl_conn *c = *user_bucket(p, user, len); c; c = c->next_by_user)
        if (c->user_len == len && memcmp(c->user, user, len) == 0)
            return c;
    return NULL;
}

static void register_conn(pl_conn *c)
{
    pushlet_t *p = c->p;
    uv_mutex_lock(&p->hooks_mu);
    c->registered = pl_idmap_put(&p->conns_by_id, c->id, c) == 0;
    if (c->registered && c->user) {
        if (p->user_count >= p->user_cap)
            users_grow(p);
        if (p->user_cap) {
            pl_conn **b = user_bucket(p, c->user, c->user_len);
            c->next_by_user = *b;
            *b = c;
            p->user_count++;
        }
    }
    uv_mutex_unlock(&p->hooks_mu);
}

static void unregister_conn(pl_conn *c)
{
    pushlet_t *p = c->p;
    uv_mutex_lock(&p->hooks_mu);
    pl_idmap_remove(&p->conns_by_id, c->id);
    if (c->user && p->user_cap) {
        for (pl_conn **pp = user_bucket(p, c->user, c->user_len); *pp; pp = &(*pp)->next_by_user) {
            if (*pp == c) {
                *pp = c->next_by_user;
                p->user_count--;
                break;
            }
        }
    }
    uv_mutex_unlock(&p->hooks_mu);
    c->registered = false;
}

/* ---- Lifecycle --------------------------------------------------------------------------------
 */

void pl_hooks_connected(pl_conn *c)
{
    register_conn(c);
    pushlet_t *p = c->p;
    pl_log_conn(c, PUSHLET_LOG_DEBUG, "conn", "%s opened",
                c->kind == PL_CONN_WS ? "WebSocket" : "SSE stream");
    if (pl_hooks_want(p, PUSHLET_EVENT_CONNECTED)) {
        pushlet_event_t *e = conn_event(c, PUSHLET_EVENT_CONNECTED, NULL, 0, NULL, 0);
        if (e)
            emit(p, e);
    }
    for (uint16_t k = 0; k < c->subscriber.nsubs; k++)
        pl_hooks_subscribed(c, c->subscriber.subs[k].topic);
}

void pl_hooks_subscribed(pl_conn *c, const pl_topic *t)
{
    if (!c->registered || !pl_hooks_want(c->p, PUSHLET_EVENT_SUBSCRIBED))
        return;
    pushlet_event_t *e = conn_event(c, PUSHLET_EVENT_SUBSCRIBED, t->name, t->name_len, NULL, 0);
    if (e)
        emit(c->p, e);
}

pushlet_event_t *pl_hooks_unsubscribed_event(pl_conn *c, const pl_topic *t, const char *reason)
{
    if (!c->registered || !pl_hooks_want(c->p, PUSHLET_EVENT_UNSUBSCRIBED))
        return NULL;
    return conn_event(c, PUSHLET_EVENT_UNSUBSCRIBED, t->name, t->name_len, reason, strlen(reason));
}

void pl_hooks_emit(pushlet_t *p, pushlet_event_t *list)
{
    while (list) {
        pushlet_event_t *next = list->next;
        list->next = NULL;
        emit(p, list);
        list = next;
    }
}

pushlet_event_t *pl_hooks_conn_leaving(pl_conn *c)
{
    pushlet_t *p = c->p;
    while (c->requests.next != &c->requests)
        cancel_request(p, pl_container_of(c->requests.next, pl_request, by_conn));
    if (!c->registered)
        return NULL;
    pushlet_event_t *head = NULL, **tail = &head;
    for (uint16_t k = 0; k < c->subscriber.nsubs; k++) {
        pushlet_event_t *e =
            pl_hooks_unsubscribed_event(c, c->subscriber.subs[k].topic, "disconnected");
        if (e)
            *tail = e, tail = &e->next;
    }
    const char *why = c->why ? c->why : "closed";
    if (pl_hooks_want(p, PUSHLET_EVENT_DISCONNECTED))
        *tail = conn_event(c, PUSHLET_EVENT_DISCONNECTED, NULL, 0, why, strlen(why));
    return head;
}

void pl_hooks_conn_gone(pl_conn *c, pushlet_event_t *farewell)
{
    if (c->registered)
        unregister_conn(c);
    pl_hooks_emit(c->p, farewell);
    replace(&c->user, &c->user_len, NULL);
    replace(&c->meta, &c->meta_len, NULL);
    free(c->stash);
    c->stash = NULL;
}

/* ---- Client messages ------------------------------------------------------------------------ */

bool pl_hooks_client_message(pl_conn *c, const uint8_t *data, size_t len, bool binary)
{
    pushlet_t *p = c->p;
    if (!pl_hooks_want(p, PUSHLET_EVENT_MESSAGE))
        return false;
    double rate = (double)p->cfg.max_client_messages_per_sec;
    uint64_t now = uv_now(&p->loop);
    if (c->msg_token_ms == 0)
        c->msg_tokens = rate;
    else
        c->msg_tokens += (double)(now - c->msg_token_ms) * rate / 1000.0;
    if (c->msg_tokens > rate)
        c->msg_tokens = rate;
    c->msg_token_ms = now ? now : 1;
    if (c->msg_tokens < 1.0) {
        PL_STAT_ADD(p, PUSHLET_STAT_RATE_LIMITED, 1);
        pl_ws_reply(c, "error", NULL, "rate_limited", "too many messages: slow down");
        return true;
    }
    c->msg_tokens -= 1.0;
    pushlet_event_t *e = conn_event(c, PUSHLET_EVENT_MESSAGE, NULL, 0, (const char *)data, len);
    if (!e) {
        pl_ws_reply(c, "error", NULL, "internal", "out of memory");
        return true;
    }
    e->binary = binary;
    if (emit(p, e))
        PL_STAT_ADD(p, PUSHLET_STAT_CLIENT_MESSAGES, 1);
    else
        pl_ws_reply(c, "error", NULL, "overloaded", "the host is not keeping up: message dropped");
    return true;
}

/* ---- Targeted sends and closes -------------------------------------------------------------- */

static void send_to(pl_conn *c, pl_msg *m)
{
    if (c->closing || c->ending)
        return;
    pushlet_t *p = c->p;
    if (m->target == PL_CLOSE_CONNECTION) {
        c->why = "closed by host";
        if (c->kind == PL_CONN_WS) {
            pl_ws_close(c, (uint16_t)m->seq, m->data);
        } else {
            pl_buf *b = pl_msg_encode(m, PL_FMT_SSE_BODY, NULL);
            if (b)
                pl_conn_send(c, b);
            pl_conn_end(c);
        }
        return;
    }
    int format = c->kind == PL_CONN_SSE ? PL_FMT_SSE_BODY : c->format;
    pl_buf *b = pl_msg_encode(m, format, p->deflate);
    if (!b) {
        pl_conn_close(c, "out of memory encoding a message");
        return;
    }
    pl_conn_send(c, b);
    PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_OUT, 1);
}

void pl_hooks_dispatch(pushlet_t *p, pl_msg *m)
{
    if (m->target == PL_TO_USER) {
        size_t len = strlen(m->user);
        for (pl_conn *c = p->user_cap ? *user_bucket(p, m->user, len) : NULL; c;
             c = c->next_by_user)
            if (c->user_len == len && memcmp(c->user, m->user, len) == 0)
                send_to(c, m);
    } else {
        pl_conn *c = pl_idmap_get(&p->conns_by_id, m->target_id);
        if (c)
            send_to(c, m);
    }
    pl_msg_unref(m);
}

static int send_checked(pushlet_t *p, pl_msg *m)
{
    int rc = pl_inbox_push(&p->inbox, m);
    if (rc)
        pl_msg_unref(m);
    if (rc && rc != PUSHLET_ESTOPPED)
        PL_STAT_ADD_SHARED(p, PUSHLET_STAT_PUBLISH_REJECTED, 1);
    return rc;
}

static int new_send(pushlet_t *p, const char *event, const char *data, size_t len, pl_msg **out)
{
    if (!p || (!data && len))
        return PUSHLET_EINVAL;
    if (!event)
        event = "message";
    size_t event_len = strlen(event);
    if (!pl_event_name_valid(event, event_len))
        return PUSHLET_EINVAL;
    if (len > __atomic_load_n(&p->max_data, __ATOMIC_RELAXED))
        return PUSHLET_ETOOBIG;
    *out = pl_msg_new("", 0, event, event_len, data ? data : "", len);
    return *out ? 0 : PUSHLET_ENOMEM;
}

static bool conn_known(pushlet_t *p, uint64_t id)
{
    uv_mutex_lock(&p->hooks_mu);
    bool known = id && pl_idmap_get(&p->conns_by_id, id) != NULL;
    uv_mutex_unlock(&p->hooks_mu);
    return known;
}

int pushlet_send(pushlet_t *p, uint64_t connection, const char *event, const char *data, size_t len)
{
    pl_msg *m = NULL;
    int rc = new_send(p, event, data, len, &m);
    if (rc)
        return rc;
    if (!conn_known(p, connection)) {
        pl_msg_unref(m);
        return PUSHLET_ENOENT;
    }
    m->target = PL_TO_CONNECTION;
    m->target_id = connection;
    return send_checked(p, m);
}

int pushlet_send_user(pushlet_t *p, const char *user_id, const char *event, const char *data,
                      size_t len)
{
    if (!user_id || !text_ok(user_id, MAX_USER_ID, true) || !*user_id)
        return PUSHLET_EINVAL;
    pl_msg *m = NULL;
    int rc = new_send(p, event, data, len, &m);
    if (rc)
        return rc;
    m->user = strdup(user_id);
    uv_mutex_lock(&p->hooks_mu);
    bool known = first_of_user(p, user_id, strlen(user_id)) != NULL;
    uv_mutex_unlock(&p->hooks_mu);
    if (!m->user || !known) {
        rc = m->user ? PUSHLET_ENOENT : PUSHLET_ENOMEM;
        pl_msg_unref(m);
        return rc;
    }
    m->target = PL_TO_USER;
    return send_checked(p, m);
}

int pushlet_close(pushlet_t *p, uint64_t connection, int code, const char *reason)
{
    if (!p || (code != 0 && code != 1000 && (code < 3000 || code > 4999)) ||
        (reason && !text_ok(reason, 123, true)))
        return PUSHLET_EINVAL;
    if (!reason)
        reason = "";
    pl_msg *m = pl_msg_new("", 0, "close", 5, reason, strlen(reason));
    if (!m)
        return PUSHLET_ENOMEM;
    if (!conn_known(p, connection)) {
        pl_msg_unref(m);
        return PUSHLET_ENOENT;
    }
    m->target = PL_CLOSE_CONNECTION;
    m->target_id = connection;
    m->seq = code ? (uint64_t)code : 1000;
    return send_checked(p, m);
}

int64_t pushlet_topic_subscribers(pushlet_t *p, const char *topic)
{
    if (!p || !topic)
        return 0;
    size_t len = strlen(topic);
    if (!pl_topic_name_valid(topic, len))
        return 0;
    uv_mutex_lock(&p->topics_mu);
    const pl_topic *t = pl_topics_find(&p->topics, topic, len);
    int64_t n = t ? t->nsubs : 0;
    uv_mutex_unlock(&p->topics_mu);
    return n;
}

/* ---- Setup ---------------------------------------------------------------------------------- */

int pushlet_set_event_handler(pushlet_t *p, pushlet_event_fn fn, uint32_t mask, void *userdata)
{
    if (!p || (mask & ~(uint32_t)PUSHLET_EVENT_ALL) || (mask & PUSHLET_EVENT_LOG))
        return PUSHLET_EINVAL;
    uv_mutex_lock(&p->state_mu);
    int rc = 0;
    if (p->state != PL_STATE_STOPPED) {
        rc = PUSHLET_EBUSY;
    } else {
        p->hook_fn = mask ? fn : NULL;
        p->hook_mask = fn ? mask : 0;
        p->hook_ud = userdata;
    }
    uv_mutex_unlock(&p->state_mu);
    return rc;
}

void pl_hooks_open(pushlet_t *p)
{
    pl_list_init(&p->pending);
    uv_mutex_lock(&p->hooks_mu);
    p->answered = NULL;
    p->answered_tail = &p->answered;
    p->hooks_open = true;
    uv_mutex_unlock(&p->hooks_mu);
}

void pl_hooks_close(pushlet_t *p)
{
    uv_mutex_lock(&p->hooks_mu);
    p->hooks_open = false;
    uv_mutex_unlock(&p->hooks_mu);
}

void pl_hooks_release(pushlet_t *p)
{
    /* Every connection is gone, so every request was cancelled; answers that came after the
     * last loop turn are freed here. */
    uv_mutex_lock(&p->hooks_mu);
    pl_request *r = p->answered;
    p->answered = NULL;
    p->answered_tail = &p->answered;
    pl_idmap_destroy(&p->requests);
    pl_idmap_destroy(&p->conns_by_id);
    free(p->user_buckets);
    p->user_buckets = NULL;
    p->user_cap = p->user_count = 0;
    uv_mutex_unlock(&p->hooks_mu);
    while (r) {
        pl_request *next = r->next_answered;
        free_request(r);
        r = next;
    }
}
