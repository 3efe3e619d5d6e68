/* Request routing: turns a complete HTTP request into a response or an SSE stream. */
#include "internal.h"

#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define TOPIC_BUF 256 /* decoded topic names beyond 128 bytes are invalid anyway */

void pl_respond(pl_conn *c, int status, const char *extra, const char *ctype, const char *body,
                size_t body_len, bool head_only)
{
    pushlet_t *p = c->p;
    /* 204 carries no Content-Length (RFC 9110 8.6); HEAD answers carry no body. */
    const char *fmt = status == 204 ? "HTTP/1.1 %d %s\r\n"
                                      "Content-Type: %s\r\n"
                                      "%.0zu"
                                      "Access-Control-Allow-Origin: %s\r\n"
                                      "%s%s\r\n"
                                    : "HTTP/1.1 %d %s\r\n"
                                      "Content-Type: %s\r\n"
                                      "Content-Length: %zu\r\n"
                                      "Access-Control-Allow-Origin: %s\r\n"
                                      "%s%s\r\n";
    head_only |= c->head_req;
    /* HTTP/1.0 peers only keep the connection when told so. */
    const char *conn_hdr = !c->keep_alive ? "Connection: close\r\n"
                           : c->http10    ? "Connection: keep-alive\r\n"
                                          : "";
    int hlen = snprintf(NULL, 0, fmt, status, pl_http_reason(status), ctype, body_len,
                        p->cfg.cors_origin, extra, conn_hdr);
    size_t blen = head_only ? 0 : body_len;
    pl_buf *b = hlen < 0 ? NULL : pl_buf_new((size_t)hlen + 1 + blen);
    if (!b) {
        pl_conn_close(c, "out of memory");
        return;
    }
    snprintf(b->data, (size_t)hlen + 1, fmt, status, pl_http_reason(status), ctype, body_len,
             p->cfg.cors_origin, extra, conn_hdr);
    if (blen)
        memcpy(b->data + hlen, body, blen);
    b->len = (uint32_t)((size_t)hlen + blen);
    if (status >= 400)
        PL_STAT_ADD(p, PUSHLET_STAT_HTTP_ERRORS, 1);
    if (status == 413)
        PL_STAT_ADD_SHARED(p, PUSHLET_STAT_OVERSIZE_REJECTED, 1);
    pl_conn_send(c, b);
    pl_buf_unref(b);
    if (!c->keep_alive)
        pl_conn_end(c);
}

void pl_respond_text(pl_conn *c, int status, const char *extra, const char *text)
{
    char line[160];
    int n = snprintf(line, sizeof(line), "%s\n", text);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
    pl_respond(c, status, extra, "text/plain; charset=utf-8", line, len, false);
}

void pl_respond_error_close(pl_conn *c, int status)
{
    c->keep_alive = false;
    pl_respond_text(c, status, "", pl_http_reason(status));
}

static bool path_is(const char *path, size_t len, const char *want)
{
    return want && *want && strlen(want) == len && memcmp(path, want, len) == 0;
}

static void preflight(pl_conn *c)
{
    static const char extra[] =
        "Access-Control-Allow-Methods: GET, POST, HEAD, OPTIONS\r\n"
        "Access-Control-Allow-Headers: Content-Type, Last-Event-ID, Authorization, "
        "X-Pushlet-Secret\r\n"
        "Access-Control-Max-Age: 86400\r\n";
    pl_respond(c, 204, extra, "text/plain", "", 0, false);
}

static void method_not_allowed(pl_conn *c, const char *allow)
{
    char extra[96];
    snprintf(extra, sizeof(extra), "Allow: %s\r\n", allow);
    pl_respond_text(c, 405, extra, "Method Not Allowed");
}

/* ---- SSE ------------------------------------------------------------------------------------ */

void pl_sync_topic_stats(pushlet_t *p)
{
    __atomic_store_n(&p->stats[PUSHLET_STAT_SUBSCRIPTIONS], (int64_t)p->topics.subscriptions,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&p->stats[PUSHLET_STAT_TOPICS], (int64_t)p->topics.count, __ATOMIC_RELAXED);
}

int pl_subscribe_query(pl_conn *c, const char *query, size_t qlen, bool use_default,
                       const char **err)
{
    pushlet_t *p = c->p;
    char key[64], topics[64][TOPIC_BUF], val[TOPIC_BUF];
    size_t lens[64], klen, vlen, n = 0;
    size_t max = (size_t)p->cfg.max_topics_per_connection;
    if (max > 64)
        max = 64;
    pl_query_iter it;
    int rc;
    pl_query_init(&it, query, qlen);
    while ((rc = pl_query_next(&it, key, sizeof(key), &klen, val, sizeof(val), &vlen)) != 0) {
        if (rc < 0) {
            *err = "invalid query string or topic name";
            return 400;
        }
        if (klen != 5 || memcmp(key, "topic", 5) != 0)
            continue;
        if (!pl_topic_name_valid(val, vlen)) {
            *err = "invalid topic name";
            return 400;
        }
        if (!pl_auth_topic(c, val, vlen)) {
            *err = "topic not allowed";
            return 403;
        }
        bool repeated = false;
        for (size_t i = 0; i < n && !repeated; i++)
            repeated = lens[i] == vlen && memcmp(topics[i], val, vlen) == 0;
        if (repeated)
            continue;
        if (n == max) {
            PL_STAT_ADD(p, PUSHLET_STAT_TOPICS_REJECTED, 1);
            *err = "too many topics";
            return 400;
        }
        memcpy(topics[n], val, vlen + 1);
        lens[n++] = vlen;
    }
    if (n == 0 && use_default) {
        if (!pl_auth_topic(c, "default", 7)) {
            *err = "topic not allowed";
            return 403;
        }
        memcpy(topics[0], "default", 8);
        lens[n++] = 7;
    }
    rc = pl_hooks_ask_topics(c, topics, lens, n);
    if (rc == PL_AUTH_WAIT)
        return PL_AUTH_WAIT; /* routed again once the host allowed every topic */
    if (rc) {
        *err = "authorization unavailable";
        return rc;
    }
    rc = pl_dist_topics_ready(c, topics, lens, n);
    if (rc == PL_AUTH_WAIT)
        return PL_AUTH_WAIT; /* routed again once every topic caught up from Redis */
    if (rc) {
        *err = "out of memory";
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        if (pl_topics_subscribe(&p->topics, &c->subscriber, topics[i], lens[i]) < 0) {
            pl_topics_unsubscribe_all(&p->topics, &c->subscriber);
            pl_sync_topic_stats(p);
            *err = "out of memory";
            return 503;
        }
    }
    pl_sync_topic_stats(p);
    c->subscriber.cursor_check = pl_cursor_check_of(c); /* the stream's cursors name this list */
    return 0;
}

int pl_read_cursor(pl_conn *c, const char *header, size_t header_len, const char *query,
                   size_t qlen, pl_position *pos, const char **err)
{
    if (header && header_len) {
        /* Sent by browsers on their own: a bad one degrades to a gap, never a refusal that
         * would stop an EventSource for good. */
        return pl_cursor_for(c, header, header_len, pos) == 1 ? 1 : 0;
    }
    char *given = NULL;
    size_t len;
    int rc = pl_query_find(query, qlen, "last_event_id", &given, &len);
    if (rc < 0) {
        *err = "out of memory";
        return -503;
    }
    if (rc == 0)
        return -1;
    rc = pl_cursor_for(c, given, len, pos);
    free(given);
    if (rc < 0) {
        *err = "invalid last_event_id";
        return -400;
    }
    return rc;
}

void pl_resume_all(pl_conn *c, int fit, const pl_position *pos,
                   void (*announce)(pl_conn *c, uint16_t k, const pl_position *from))
{
    for (uint16_t k = 0; k < c->subscriber.nsubs; k++) {
        const pl_position *from = fit == 1 ? &pos[k] : NULL;
        if (announce)
            announce(c, k, from);
        pl_resume(c, k, from);
        if (fit == 0) {
            PL_STAT_ADD(c->p, PUSHLET_STAT_RESUMES, 1);
            pl_send_gap(c, k, "cursor_mismatch");
        }
    }
}

static void start_sse(pl_conn *c, pl_http_req *r, const char *query, size_t qlen)
{
    pushlet_t *p = c->p;
    const char *err;
    int status = pl_auth_connection(c, r, query, qlen, &err);
    if (status == PL_AUTH_WAIT)
        return;
    if (status) {
        pl_respond_text(c, status, status == 401 ? "WWW-Authenticate: Bearer\r\n" : "", err);
        return;
    }
    status = pl_subscribe_query(c, query, qlen, true, &err);
    if (status == PL_AUTH_WAIT)
        return;
    if (status) {
        pl_respond_text(c, status, "", err);
        return;
    }
    size_t hlen;
    const char *header = pl_http_header(r, "last-event-id", &hlen);
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    int fit = pl_read_cursor(c, header, hlen, query, qlen, pos, &err);
    if (fit < -1) {
        pl_topics_unsubscribe_all(&p->topics, &c->subscriber);
        pl_sync_topic_stats(p);
        pl_respond_text(c, -fit, "", err);
        return;
    }
    c->kind = PL_CONN_SSE;
    c->format = c->subscriber.nsubs > 1 ? PL_FMT_SSE_BODY : PL_FMT_SSE;
    pl_list_remove(&c->link);
    pl_list_push(&p->conns_stream, &c->link);
    PL_STAT_ADD(p, PUSHLET_STAT_SSE_CONNECTIONS, 1);
    pl_conn_send(c, p->sse_preamble);

    /* The connected event names where the stream starts: the client's own cursor when it
     * resumes (so a drop before the replay resumes from there again), none when its cursor
     * does not fit (a reconnect then reports the mismatch again), else the current positions. */
    char cursor[PL_CURSOR_MAX_POSITIONS * PL_ID_MAX + 8] = "";
    size_t n = 0;
    if (fit == 1)
        n = pl_cursor_format(cursor, sizeof(cursor), pos, c->subscriber.nsubs,
                             c->subscriber.cursor_check);
    else if (fit == -1)
        n = pl_conn_cursor(c, cursor, sizeof(cursor));
    char event[sizeof(cursor) + 128];
    int len = snprintf(event, sizeof(event),
                       "retry: %lld\n%s%s%sevent: connected\ndata: Connection established\n\n",
                       (long long)p->cfg.retry_ms, n ? "id: " : "", cursor, n ? "\n" : "");
    pl_buf *b = pl_buf_from(event, (size_t)len);
    if (!b) {
        pl_conn_close(c, "out of memory");
        return;
    }
    pl_conn_send(c, b);
    pl_buf_unref(b);
    pl_resume_all(c, fit, pos, NULL);
    pl_hooks_connected(c);
}

/* ---- Publishing over HTTP ------------------------------------------------------------------- */

static bool secret_ok(pushlet_t *p, const pl_http_req *r, const char *query, size_t qlen)
{
    const char *secret = p->cfg.publish_secret;
    if (!secret || !*secret)
        return true;
    size_t slen = strlen(secret), vlen = 0;
    const char *given = pl_http_header(r, "x-pushlet-secret", &vlen);
    char *from_query = NULL;
    if (!given) {
        given = pl_http_header(r, "authorization", &vlen);
        if (given && vlen > 7 && strncasecmp(given, "Bearer ", 7) == 0) {
            given += 7;
            vlen -= 7;
        } else {
            given = NULL;
        }
    }
    if (!given && pl_query_find(query, qlen, "secret", &from_query, &vlen) == 1)
        given = from_query;
    bool ok = given && vlen == slen && CRYPTO_memcmp(given, secret, slen) == 0;
    free(from_query);
    return ok;
}

static bool is_form(const pl_http_req *r)
{
    const char *ct = pl_http_header(r, "content-type", NULL);
    return ct && strncasecmp(ct, "application/x-www-form-urlencoded", 33) == 0;
}

typedef enum { PUBLISH_TOPIC, PUBLISH_ALL, PUBLISH_SEND } publish_kind;

static void handle_publish(pl_conn *c, pl_http_req *r, const char *query, size_t qlen,
                           publish_kind kind)
{
    pushlet_t *p = c->p;
    int method = r->parser.method;
    if (kind == PUBLISH_SEND ? (method != HTTP_GET && method != HTTP_POST) : method != HTTP_POST) {
        method_not_allowed(c, kind == PUBLISH_SEND ? "GET, POST, OPTIONS" : "POST, OPTIONS");
        return;
    }
    if (!secret_ok(p, r, query, qlen)) {
        pl_respond_text(c, 401, "WWW-Authenticate: Bearer\r\n", "publish secret required");
        return;
    }
    const char *body = r->body ? r->body : "";
    bool form = kind == PUBLISH_SEND && method == HTTP_POST && is_form(r);
    char *topic = NULL, *event = NULL, *message = NULL;
    size_t topic_len = 0, event_len = 0, message_len = 0;
    /* /send takes its fields from the query or a form body (the seed's form); the other
     * endpoints take the data from the body as is. */
    if (pl_query_find(query, qlen, "topic", &topic, &topic_len) != 1 && form)
        pl_query_find(body, r->body_len, "topic", &topic, &topic_len);
    pl_query_find(query, qlen, "event", &event, &event_len);
    if (kind == PUBLISH_SEND &&
        pl_query_find(query, qlen, "message", &message, &message_len) != 1 && form)
        pl_query_find(body, r->body_len, "message", &message, &message_len);
    const char *t = topic ? topic : "default", *e = event ? event : "message";
    if (!topic)
        topic_len = 7;
    if (!event)
        event_len = 7;
    const char *data = body;
    size_t data_len = r->body_len;
    if (message)
        data = message, data_len = message_len;
    else if (form)
        data = "", data_len = 0;
    int status = 200;
    const char *err = NULL;
    if (kind != PUBLISH_ALL && !pl_topic_name_valid(t, topic_len))
        status = 400, err = "invalid topic name";
    else if (!pl_event_name_valid(e, event_len))
        status = 400, err = "invalid event name";
    else if (data_len > (uint64_t)p->cfg.max_message_size)
        status = 413, err = "message too large"; /* counted by pl_respond */
    if (err) {
        pl_respond_text(c, status, "", err);
    } else {
        pl_msg *m = kind == PUBLISH_ALL ? pl_msg_new("", 0, e, event_len, data, data_len)
                                        : pl_msg_new(t, topic_len, e, event_len, data, data_len);
        if (!m) {
            pl_respond_text(c, 503, "", "out of memory");
        } else if (p->dist) { /* answered once Redis stored it */
            m->to_all = kind == PUBLISH_ALL;
            if (pl_dist_reserve(p, pl_dist_msg_bytes(m)) == 0) {
                pl_dist_publish(p, m, c);
            } else {
                pl_msg_unref(m);
                PL_STAT_ADD(p, PUSHLET_STAT_PUBLISH_REJECTED, 1);
                pl_respond_text(c, 503, "Retry-After: 1\r\n",
                                "too many publishes waiting for Redis: retry later");
            }
        } else {
            m->to_all = kind == PUBLISH_ALL;
            char id[PL_ID_MAX];
            pl_broker_dispatch(p, m, id);
            char answer[PL_ID_MAX + 16];
            int n = snprintf(answer, sizeof(answer), "{\"id\":\"%s\"}\n", id);
            pl_respond(c, 200, "Cache-Control: no-store\r\n", "application/json", answer, (size_t)n,
                       false);
        }
    }
    free(topic);
    free(event);
    free(message);
}

/* ---- Introspection -------------------------------------------------------------------------- */

/* Distributed mode: `,"redis":{...}` with each shard's state (addresses without passwords). */
static size_t redis_stats(const pushlet_t *p, char *out, size_t cap)
{
    size_t nshards = pl_dist_shards(p), ready = 0, n = 0;
    if (nshards == 0)
        return 0;
    pl_dist_shard_view v;
    for (size_t i = 0; i < nshards; i++)
        ready += pl_dist_shard_info(p, i, &v) && v.ready;
    const char *state = ready == nshards ? "ready" : ready == 0 ? "down" : "degraded";
    n += (size_t)snprintf(out + n, cap - n, ",\"redis\":{\"state\":\"%s\",\"shards\":[", state);
    for (size_t i = 0; i < nshards && n < cap; i++) {
        pl_dist_shard_info(p, i, &v);
        char error[256];
        size_t e = 0;
        for (const char *s = v.error; *s && e + 2 < sizeof(error); s++) /* JSON-safe, one line */
            error[e++] = *s == '"' || *s == '\\' ? '\'' : (unsigned char)*s < 0x20 ? ' ' : *s;
        error[e] = '\0';
        n += (size_t)snprintf(
            out + n, cap - n,
            "%s{\"shard\":%zu,\"address\":\"%s\",\"state\":\"%s\",\"error\":\"%s\","
            "\"pending\":%zu}",
            i ? "," : "", i, v.where, v.state, error, v.pending);
    }
    if (n < cap)
        n += (size_t)snprintf(out + n, cap - n, "]}");
    return n < cap ? n : cap - 1;
}

static void handle_stats(pl_conn *c, bool head_only)
{
    static const char *const names[PUSHLET_STAT_COUNT] = {
        "connections",
        "sse_connections",
        "subscriptions",
        "topics",
        "messages_in",
        "messages_out",
        "bytes_out",
        "slow_consumer_drops",
        "publish_rejected",
        "connections_rejected",
        "http_errors",
        "connections_total",
        "ws_connections",
        "history_messages",
        "history_bytes",
        "history_evicted",
        "resumes",
        "replayed",
        "gaps",
        "topics_rejected",
        "rate_limited",
        "oversize_rejected",
        "timeouts",
        "slow_consumer_lags",
        "auth_denied",
        "auth_pending",
        "auth_timeouts",
        "client_messages",
        "events_dropped",
        "redis_pending",
        "redis_shards_down",
        "redis_catch_ups",
        "redis_publish_errors",
    };
    char body[16384];
    size_t n = 0;
    body[n++] = '{';
    for (int i = 0; i < PUSHLET_STAT_COUNT; i++)
        n += (size_t)snprintf(body + n, sizeof(body) - n, "%s\"%s\":%" PRId64, i ? "," : "",
                              names[i], pushlet_stat(c->p, (pushlet_stat_t)i));
    n += redis_stats(c->p, body + n, sizeof(body) - n);
    n += (size_t)snprintf(body + n, sizeof(body) - n, "}\n");
    pl_respond(c, 200, "Cache-Control: no-store\r\n", "application/json", body, n, head_only);
}

static void handle_metrics(pl_conn *c, bool head_only)
{
    pl_buf *b = pl_metrics_render(c->p);
    if (!b) {
        pl_respond_text(c, 503, "", "out of memory");
        return;
    }
    pl_respond(c, 200, "Cache-Control: no-store\r\n", "text/plain; version=0.0.4; charset=utf-8",
               b->data, b->len, head_only);
    pl_buf_unref(b);
}

void pl_route(pl_conn *c, pl_http_req *r)
{
    pushlet_t *p = c->p;
    const pl_config *cfg = &p->cfg;
    const char *path, *query;
    size_t plen, qlen;
    pl_url_split(pl_http_url(r), r->url.len, &path, &plen, &query, &qlen);
    int method = r->parser.method;
    bool get = method == HTTP_GET, head = method == HTTP_HEAD;
    if (r->parser.upgrade && !path_is(path, plen, cfg->ws_path))
        c->keep_alive = false; /* what follows the head is another protocol's bytes */

    if (method == HTTP_OPTIONS) {
        preflight(c);
    } else if (path_is(path, plen, cfg->sse_path)) {
        if (get)
            start_sse(c, r, query, qlen);
        else if (head)
            pl_respond(c, 200, "Cache-Control: no-cache\r\n", "text/event-stream", "", 0, true);
        else
            method_not_allowed(c, "GET, HEAD, OPTIONS");
    } else if (path_is(path, plen, cfg->ws_path)) {
        pl_ws_upgrade(c, r, query, qlen);
    } else if (cfg->http_publish && path_is(path, plen, cfg->publish_path)) {
        handle_publish(c, r, query, qlen, PUBLISH_TOPIC);
    } else if (cfg->http_publish && path_is(path, plen, cfg->publish_all_path)) {
        handle_publish(c, r, query, qlen, PUBLISH_ALL);
    } else if (cfg->http_publish && path_is(path, plen, cfg->send_path)) {
        handle_publish(c, r, query, qlen, PUBLISH_SEND);
    } else if (path_is(path, plen, cfg->health_path)) {
        if (get || head)
            pl_respond_text(c, 200, "Cache-Control: no-store\r\n", "ok");
        else
            method_not_allowed(c, "GET, HEAD, OPTIONS");
    } else if (path_is(path, plen, cfg->metrics_path)) {
        if (get || head)
            handle_metrics(c, head);
        else
            method_not_allowed(c, "GET, HEAD, OPTIONS");
    } else if (path_is(path, plen, cfg->stats_path)) {
        if (get || head)
            handle_stats(c, head);
        else
            method_not_allowed(c, "GET, HEAD, OPTIONS");
    } else if (cfg->index_html && *cfg->index_html && plen == 1 && *path == '/') {
        if (get || head)
            pl_respond(c, 200, "", "text/html; charset=utf-8", cfg->index_html,
                       strlen(cfg->index_html), head);
        else
            method_not_allowed(c, "GET, HEAD, OPTIONS");
    } else {
        pl_respond_text(c, 404, "", "Not Found");
    }
}
