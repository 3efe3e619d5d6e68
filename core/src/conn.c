/* Client connections: reading requests, the per-connection output queue, closing.
 *
 * Output is a queue of references to shared, already-encoded buffers. Sends only queue; once per
 * loop turn (the prepare phase, just before the loop would block) every connection with new
 * output is written with one writev carrying everything pending. A connection whose unsent bytes
 * would exceed its bound is dropped as a slow consumer instead of growing memory.
 *
 * Idle connections hold no read buffer (reads land in the broker's single buffer and are parsed
 * in place) and no output array. Closing is two-step: pl_conn_close() only marks the connection,
 * and it is unlinked from topics in the prepare phase, so a close during fan-out never disturbs
 * the subscriber array being walked. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define MAX_IOV               256
#define MAX_LINGERING_REJECTS 256 /* 503-answered connections allowed to linger at once */

typedef struct write_req {
    uv_write_t req;
    size_t bytes;
} write_req;

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void flush_conn(pl_conn *c);

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    pl_conn *c = (pl_conn *)h;
    buf->base = c->p->read_buf;
    buf->len = PL_READ_BUF_SIZE;
}

void pl_conn_accept(pushlet_t *p)
{
    pl_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        pl_error(p, "conn", "out of memory accepting a connection");
        return;
    }
    c->p = p;
    c->id = ++p->next_conn_id;
    pl_list_init(&c->link);
    pl_list_init(&c->requests);
    pl_list_init(&c->sync_waits);
    if (uv_tcp_init(&p->loop, &c->tcp) != 0) {
        free(c);
        return;
    }
    p->nconns++;
    PL_STAT_ADD(p, PUSHLET_STAT_CONNECTIONS, 1);
    if (uv_accept((uv_stream_t *)&p->listener, (uv_stream_t *)&c->tcp) != 0) {
        c->closing = true;
        c->next_closing = p->closing;
        p->closing = c;
        return;
    }
    PL_STAT_ADD(p, PUSHLET_STAT_CONNECTIONS_TOTAL, 1);
    uv_tcp_nodelay(&c->tcp, 1);
    pl_list_push(&p->conns_http, &c->link);
    c->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.header_timeout_ms;
    c->keep_alive = true;
    if (p->nconns > (uint32_t)p->cfg.max_connections) {
        PL_STAT_ADD(p, PUSHLET_STAT_CONNECTIONS_REJECTED, 1);
        if (p->nrejecting >= MAX_LINGERING_REJECTS) {
            /* A flood: answer in one try and close at once, so rejected connections cannot
             * pile up while they linger. */
            static const char busy[] = "HTTP/1.1 503 Service Unavailable\r\n"
                                       "Content-Length: 0\r\nConnection: close\r\n\r\n";
            uv_buf_t b = uv_buf_init((char *)busy, sizeof(busy) - 1);
            uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
            PL_STAT_ADD(p, PUSHLET_STAT_HTTP_ERRORS, 1);
            pl_conn_close(c, "connection limit");
            return;
        }
        c->rejected = true;
        p->nrejecting++;
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        pl_respond_error_close(c, 503);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- Reading -------------------------------------------------------------------------------- */

#define MAX_STASH PL_READ_BUF_SIZE /* input kept while a request waits for the host */

/* Keeps input that arrives while the connection's request waits for the host's answer. */
static void stash(pl_conn *c, const char *data, size_t len)
{
    if (len == 0)
        return;
    char *ns = c->stash_len + len <= MAX_STASH ? realloc(c->stash, c->stash_len + len) : NULL;
    if (!ns) {
        pl_conn_close(c, "too much input while waiting for authorization");
        return;
    }
    memcpy(ns + c->stash_len, data, len);
    c->stash = ns;
    c->stash_len += len;
}

static void read_requests(pl_conn *c, const char *data, size_t len);

/* After a request was routed: `data, len` is what followed it. Returns false when the
 * connection reads no more requests. */
static bool after_route(pl_conn *c, const char **data, size_t *len)
{
    pushlet_t *p = c->p;
    if (c->parked) {              /* waiting for the host: the request stays, input waits with it */
        c->deadline = UINT64_MAX; /* its auth request has a deadline of its own */
        stash(c, *data, *len);
        return false;
    }
    if (c->kind == PL_CONN_WS && *len > 0 && !c->closing && !c->ending) {
        /* Frames sent right behind the upgrade request, in the same read. The read buffer is
         * the broker's own (or the stash), so unmasking in place is fine. */
        pl_ws_on_read(c, (uint8_t *)(uintptr_t)*data, *len);
        *len = 0;
    }
    if (c->kind != PL_CONN_HTTP || c->ending || c->closing || *len == 0) {
        pl_http_req_free(c->req);
        c->req = NULL;
        c->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.keepalive_timeout_ms;
        return false;
    }
    pl_http_req_reset(c->req); /* a pipelined request follows: its own head deadline */
    c->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.header_timeout_ms;
    return true;
}

static void route(pl_conn *c)
{
    c->head_req = c->req->parser.method == HTTP_HEAD;
    pl_route(c, c->req);
    c->head_req = false;
}

static void unpark(pl_conn *c, bool reroute)
{
    c->parked = false;
    char *input = c->stash;
    size_t len = c->stash_len;
    c->stash = NULL;
    c->stash_len = 0;
    if (reroute && !c->ending && !c->closing)
        route(c); /* again: the stages already answered are passed (c->auth_stage) */
    const char *data = input;
    if (after_route(c, &data, &len))
        read_requests(c, data, len);
    free(input);
}

void pl_conn_unpark(pl_conn *c) { unpark(c, true); }

void pl_conn_resume_input(pl_conn *c) { unpark(c, false); }

static void read_requests(pl_conn *c, const char *data, size_t len)
{
    pushlet_t *p = c->p;
    if (c->parked) {
        stash(c, data, len);
        return;
    }
    while (len > 0 && c->kind == PL_CONN_HTTP && !c->ending && !c->closing) {
        if (!c->req) {
            c->req = pl_http_req_new(&p->limits);
            if (!c->req) {
                pl_conn_close(c, "out of memory");
                return;
            }
            c->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.header_timeout_ms;
        }
        size_t used;
        int rc = pl_http_parse(c->req, data, len, &used);
        data += used;
        len -= used;
        if (rc == PL_HTTP_ERROR) {
            pl_respond_error_close(c, c->req->error_status);
            return;
        }
        if (rc == PL_HTTP_INCOMPLETE) {
            if (c->req->headers_done && c->req->expect_continue &&
                c->req->parser.http_minor >= 1) { /* never to HTTP/1.0 (RFC 9110 10.1.1) */
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                pl_buf *b = pl_buf_from(cont, sizeof(cont) - 1);
                if (b) {
                    pl_conn_send(c, b);
                    pl_buf_unref(b);
                }
                c->req->expect_continue = false;
            }
            return;
        }
        c->keep_alive = pl_http_keep_alive(c->req);
        c->http10 = c->req->parser.http_minor == 0;
        route(c);
        if (!after_route(c, &data, &len))
            return;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    pl_conn *c = (pl_conn *)s;
    if (nread == UV_EOF && c->kind == PL_CONN_HTTP && !c->closing &&
        (c->out_head != c->out_tail || c->writing)) {
        /* A half-close still gets the answers already queued (libuv stops reading itself). */
        c->peer_done = true;
        pl_conn_end(c);
        return;
    }
    if (nread < 0) {
        pl_conn_close(c, nread == UV_EOF ? "peer closed" : uv_strerror((int)nread));
        return;
    }
    /* Streams take no input, and a connection being ended only drains what the peer still
     * sends, so that closing does not reset the connection before the peer read our answer. */
    if (nread == 0 || c->closing || c->kind == PL_CONN_SSE)
        return;
    if (c->kind == PL_CONN_WS)
        pl_ws_on_read(c, (uint8_t *)buf->base, (size_t)nread); /* also while ending */
    else if (!c->ending)
        read_requests(c, buf->base, (size_t)nread);
}

/* ---- Output --------------------------------------------------------------------------------- */

static void mark_dirty(pl_conn *c)
{
    if (c->dirty || c->writing)
        return;
    c->dirty = true;
    c->next_dirty = c->p->dirty;
    c->p->dirty = c;
}

static bool reserve_slot(pl_conn *c)
{
    if (c->out_tail < c->out_cap)
        return true;
    if (c->out_head > 0) {
        uint32_t n = c->out_tail - c->out_head;
        memmove(c->out, c->out + c->out_head, n * sizeof(*c->out));
        c->out_head = 0;
        c->out_tail = n;
        return true;
    }
    uint32_t ncap = c->out_cap ? c->out_cap * 2 : 4;
    pl_buf **no = realloc(c->out, ncap * sizeof(*no));
    if (!no)
        return false;
    c->out = no;
    c->out_cap = ncap;
    return true;
}

void pl_conn_send(pl_conn *c, pl_buf *b)
{
    /* Once ending, the last thing queued (an answer, a close frame, the end of a stream) stays
     * the last thing sent. */
    if (c->closing || c->ending)
        return;
    pushlet_t *p = c->p;
    /* Under drop_oldest, messages stop being queued at the bound (history.c); replies and
     * signals may use as much again before the connection is given up. */
    uint64_t limit = (uint64_t)p->cfg.max_output_bytes
                     << (p->cfg.slow_consumer_policy == PUSHLET_SLOW_DROP_OLDEST);
    if (!pl_conn_fits(c, b->len, limit)) {
        PL_STAT_ADD(p, PUSHLET_STAT_SLOW_CONSUMER_DROPS, 1);
        pl_conn_close(c, "slow consumer: output bound exceeded");
        return;
    }
    if (!reserve_slot(c)) {
        pl_conn_close(c, "out of memory");
        return;
    }
    c->out[c->out_tail++] = pl_buf_ref(b);
    c->out_bytes += b->len;
    mark_dirty(c);
}

/* Drop `bytes` written bytes from the head of the queue. */
static void consume(pl_conn *c, size_t bytes)
{
    c->out_bytes -= bytes;
    if (c->catching_up && c->out_bytes <= (uint64_t)c->p->cfg.max_output_bytes / 2)
        pl_catch_up_queue(c);
    PL_STAT_ADD(c->p, PUSHLET_STAT_BYTES_OUT, (int64_t)bytes);
    while (bytes > 0) {
        pl_buf *b = c->out[c->out_head];
        size_t left = b->len - c->out_off;
        if (bytes < left) {
            c->out_off += (uint32_t)bytes;
            return;
        }
        bytes -= left;
        pl_buf_unref(b);
        c->out_head++;
        c->out_off = 0;
    }
}

static uint32_t fill_iov(pl_conn *c, uv_buf_t *iov, size_t *total)
{
    uint32_t n = c->out_tail - c->out_head;
    if (n > MAX_IOV)
        n = MAX_IOV;
    *total = 0;
    for (uint32_t i = 0; i < n; i++) {
        pl_buf *b = c->out[c->out_head + i];
        uint32_t off = i == 0 ? c->out_off : 0;
        iov[i] = uv_buf_init(b->data + off, b->len - off);
        *total += b->len - off;
    }
    return n;
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    pl_conn *c = req->data;
    free(req);
    if (status < 0 || c->closing) {
        pl_conn_close(c, "shutdown");
        return;
    }
    if (c->kind == PL_CONN_SSE || c->peer_done) {
        pl_conn_close(c, "stream ended");
        return;
    }
    c->deadline = uv_now(&c->p->loop) + (uint64_t)c->p->cfg.close_timeout_ms;
}

/* Everything queued is written. */
static void drained(pl_conn *c)
{
    free(c->out);
    c->out = NULL;
    c->out_head = c->out_tail = c->out_cap = c->out_off = 0;
    if (c->ending && !c->shut) {
        c->shut = true;
        uv_shutdown_t *req = malloc(sizeof(*req));
        if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
            free(req);
            pl_conn_close(c, "shutdown failed");
            return;
        }
        req->data = c;
    }
}

static void on_write(uv_write_t *req, int status)
{
    write_req *w = (write_req *)req;
    pl_conn *c = req->data;
    size_t bytes = w->bytes;
    free(w);
    c->writing = false;
    c->inflight = 0;
    if (c->closing)
        return; /* the close callback releases the queue */
    if (status < 0) {
        pl_conn_close(c, uv_strerror(status));
        return;
    }
    consume(c, bytes);
    flush_conn(c);
}

static void flush_conn(pl_conn *c)
{
    uv_buf_t iov[MAX_IOV];
    c->dirty = false;
    if (c->closing || c->writing)
        return;
    while (c->out_head < c->out_tail) {
        size_t total;
        uint32_t n = fill_iov(c, iov, &total);
        int w = uv_try_write((uv_stream_t *)&c->tcp, iov, n);
        if (w == UV_EAGAIN || w == UV_ENOSYS)
            w = 0;
        if (w < 0) {
            pl_conn_close(c, uv_strerror(w));
            return;
        }
        consume(c, (size_t)w);
        if ((size_t)w < total)
            break;
    }
    if (c->out_head == c->out_tail) {
        drained(c);
        return;
    }
    /* The socket is full: hand the rest to libuv, which writes when it becomes writable. */
    write_req *w = malloc(sizeof(*w));
    if (!w) {
        pl_conn_close(c, "out of memory");
        return;
    }
    c->inflight = fill_iov(c, iov, &w->bytes);
    w->req.data = c;
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, iov, c->inflight, on_write);
    if (rc != 0) {
        free(w);
        c->inflight = 0;
        pl_conn_close(c, uv_strerror(rc));
        return;
    }
    c->writing = true;
}

void pl_conn_end(pl_conn *c)
{
    if (c->ending || c->closing)
        return;
    c->ending = true;
    c->deadline = uv_now(&c->p->loop) + (uint64_t)c->p->cfg.close_timeout_ms;
    if (c->kind == PL_CONN_WS) {
        /* Its close handshake lingers like an HTTP error answer: watched by the sweep. */
        pl_list_remove(&c->link);
        pl_list_push(&c->p->conns_http, &c->link);
    }
    if (c->out_head == c->out_tail && !c->writing)
        drained(c);
}

/* ---- Closing -------------------------------------------------------------------------------- */

void pl_conn_close(pl_conn *c, const char *reason)
{
    if (c->closing)
        return;
    pl_log_conn(c, PUSHLET_LOG_DEBUG, "conn", "closing connection: %s", reason);
    if (!c->why)
        c->why = reason;
    c->closing = true;
    c->next_closing = c->p->closing;
    c->p->closing = c;
}

static void on_close(uv_handle_t *h)
{
    pl_conn *c = (pl_conn *)h;
    pushlet_t *p = c->p;
    for (uint32_t i = c->out_head; i < c->out_tail; i++)
        pl_buf_unref(c->out[i]);
    free(c->out);
    pl_http_req_free(c->req);
    pl_ws_free(c);
    pl_auth_free(c);
    if (c->rejected)
        p->nrejecting--;
    free(c);
    p->nconns--;
    PL_STAT_ADD(p, PUSHLET_STAT_CONNECTIONS, -1);
    pl_broker_conn_gone(p);
}

static void reap(pl_conn *c)
{
    pushlet_t *p = c->p;
    if (c->refill_queued) {
        pl_conn **pp = &p->refill;
        while (*pp != c)
            pp = &(*pp)->next_refill;
        *pp = c->next_refill;
        c->refill_queued = false;
    }
    pl_dist_conn_gone(c);
    pushlet_event_t *farewell = pl_hooks_conn_leaving(c);
    if (c->subscriber.subs) { /* also frees the array of one that unsubscribed from all */
        pl_topics_unsubscribe_all(&p->topics, &c->subscriber);
        pl_sync_topic_stats(p);
    }
    pl_hooks_conn_gone(c, farewell);
    if (c->kind == PL_CONN_SSE)
        PL_STAT_ADD(p, PUSHLET_STAT_SSE_CONNECTIONS, -1);
    else if (c->kind == PL_CONN_WS)
        PL_STAT_ADD(p, PUSHLET_STAT_WS_CONNECTIONS, -1);
    pl_list_remove(&c->link);
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void on_refill_idle(uv_idle_t *h) { (void)h; }

void pl_conns_flush(pushlet_t *p)
{
    pl_catch_up(p);
    while (p->dirty || p->closing) {
        while (p->dirty) {
            pl_conn *c = p->dirty;
            p->dirty = c->next_dirty;
            flush_conn(c);
        }
        while (p->closing) {
            pl_conn *c = p->closing;
            p->closing = c->next_closing;
            reap(c);
        }
    }
    /* Connections whose output drained during these writes catch up on the next turn: keep the
     * loop from blocking until then. */
    if (p->refill && !uv_is_active((uv_handle_t *)&p->refill_idle) && !p->stopping)
        uv_idle_start(&p->refill_idle, on_refill_idle);
    else if (!p->refill && uv_is_active((uv_handle_t *)&p->refill_idle))
        uv_idle_stop(&p->refill_idle);
}

void pl_conns_sweep_timeouts(pushlet_t *p)
{
    uint64_t now = uv_now(&p->loop);
    for (pl_link *l = p->conns_http.next; l != &p->conns_http; l = l->next) {
        pl_conn *c = pl_container_of(l, pl_conn, link);
        if (c->closing || now < c->deadline)
            continue;
        if (c->shut || c->ending) {
            if (c->kind == PL_CONN_WS) /* the peer never answered our close frame */
                PL_STAT_ADD(p, PUSHLET_STAT_TIMEOUTS, 1);
            pl_conn_close(c, "linger over");
        } else if (c->req) {
            PL_STAT_ADD(p, PUSHLET_STAT_TIMEOUTS, 1);
            pl_respond_error_close(c, 408);
        } else {
            PL_STAT_ADD(p, PUSHLET_STAT_TIMEOUTS, 1);
            pl_conn_close(c, "idle");
        }
    }
}
