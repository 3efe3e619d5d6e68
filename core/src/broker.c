/* The broker's loop: its thread, its handles, start and graceful stop, and message dispatch.
 *
 * Lifecycle: pushlet_start() binds and listens on the calling thread (so errors come back
 * synchronously), then runs the loop on a new thread. pushlet_stop() closes the inbox, wakes the
 * loop and joins it; the loop delivers what was already queued, ends every stream, and closes its
 * handles once the last connection is gone (or the stop deadline forces them shut). */
#include "internal.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TICK_MS 250

bool pl_on_loop_thread(const pushlet_t *p)
{
    uv_thread_t self = uv_thread_self();
    uv_thread_t loop = __atomic_load_n(&p->loop_thread, __ATOMIC_ACQUIRE);
    return uv_thread_equal(&self, &loop); /* loop_thread is 0 while no loop runs */
}

/* A publish-to-all message on one connection: not in any history, so SSE streams get it
 * without an id line (their resume position does not move), and a connection behind under
 * drop_oldest simply misses it. */
static int64_t deliver_to_all(pl_msg *m, pl_conn *c)
{
    pushlet_t *p = c->p;
    int format = c->kind == PL_CONN_SSE ? PL_FMT_SSE_BODY : c->format;
    pl_buf *b = pl_msg_encode(m, format, p->deflate);
    if (!b) {
        pl_conn_close(c, "out of memory encoding a message");
        return 0;
    }
    if (p->cfg.slow_consumer_policy == PUSHLET_SLOW_DROP_OLDEST &&
        !pl_conn_fits(c, b->len, (uint64_t)p->cfg.max_output_bytes)) {
        PL_STAT_ADD(p, PUSHLET_STAT_SLOW_CONSUMER_LAGS, 1);
        return 0;
    }
    pl_conn_send(c, b);
    return 1;
}

void pl_broker_fanout_all(pushlet_t *p, pl_msg *m)
{
    int64_t delivered = 0;
    m->seq = ++p->counter;
    m->id_len = (uint8_t)pl_position_format(m->id, (pl_position){p->epoch, m->seq});
    for (pl_link *l = p->conns_stream.next; l != &p->conns_stream; l = l->next)
        delivered += deliver_to_all(m, pl_container_of(l, pl_conn, link));
    PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_OUT, delivered);
}

void pl_broker_fanout(pushlet_t *p, pl_topic *t, pl_msg *m)
{
    int64_t delivered = 0;
    for (uint32_t i = 0; i < t->nsubs; i++) {
        pl_topic_sub *ts = &t->subs[i];
        if (ts->state == PL_SUB_LIVE)
            delivered += pl_deliver(pl_container_of(ts->sub, pl_conn, subscriber), m, ts);
    }
    PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_OUT, delivered);
    pl_history_keep(p, t, m);
}

void pl_broker_dispatch(pushlet_t *p, pl_msg *m, char id[PL_ID_MAX])
{
    /* The one place IDs are made: a position in the topic (docs/ARCHITECTURE.md). */
    PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_IN, 1);
    if (m->to_all) {
        pl_broker_fanout_all(p, m);
    } else {
        /* Every topic message goes through a record: dense sequences. Without one (out of
         * memory) the broker-wide counter still gives a position no later record reuses. */
        pl_topic *t = pl_topics_get(&p->topics, m->topic, m->topic_len);
        p->counter++;
        m->seq = t ? ++t->seq : p->counter;
        m->id_len =
            (uint8_t)pl_position_format(m->id, (pl_position){t ? t->epoch : p->epoch, m->seq});
        if (t) {
            pl_broker_fanout(p, t, m);
            pl_topics_release(&p->topics, t); /* when nothing holds it */
            pl_history_trim(p, false);        /* may free topics, t among them */
        }
    }
    if (id)
        memcpy(id, m->id, (size_t)m->id_len + 1);
    pl_msg_unref(m);
}

/* ---- Loop callbacks ------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    pushlet_t *p = h->loop->data;
    p->open_handles--;
}

static void close_handle(pushlet_t *p, uv_handle_t *h)
{
    if (!uv_is_closing(h)) {
        p->open_handles++;
        uv_close(h, on_handle_closed);
    }
}

static void finish_if_done(pushlet_t *p)
{
    if (!p->stopping || p->nconns > 0 || pl_dist_busy(p) || uv_is_closing((uv_handle_t *)&p->wake))
        return;
    pl_dist_close(p);
    close_handle(p, (uv_handle_t *)&p->wake);
    close_handle(p, (uv_handle_t *)&p->flusher);
    close_handle(p, (uv_handle_t *)&p->ticker);
    close_handle(p, (uv_handle_t *)&p->heartbeat);
    close_handle(p, (uv_handle_t *)&p->stop_timer);
    close_handle(p, (uv_handle_t *)&p->refill_idle);
}

void pl_broker_conn_gone(pushlet_t *p) { finish_if_done(p); }

static void on_stop_deadline(uv_timer_t *t)
{
    pushlet_t *p = t->loop->data;
    int n = 0;
    for (pl_link *l = p->conns_stream.next; l != &p->conns_stream; l = l->next, n++)
        pl_conn_close(pl_container_of(l, pl_conn, link), "stop deadline");
    for (pl_link *l = p->conns_http.next; l != &p->conns_http; l = l->next, n++)
        pl_conn_close(pl_container_of(l, pl_conn, link), "stop deadline");
    if (n)
        pl_warn(p, "broker", "stop deadline reached: closing %d connections with unsent output", n);
    pl_dist_abandon(p); /* publishes Redis has not answered yet are given up */
    finish_if_done(p);
}

static void begin_stop(pushlet_t *p)
{
    p->stopping = true;
    close_handle(p, (uv_handle_t *)&p->listener);
    uv_timer_stop(&p->heartbeat);
    /* Ending a WebSocket moves it to the HTTP list (to linger): iterate with the next saved. */
    for (pl_link *l = p->conns_stream.next, *next; l != &p->conns_stream; l = next) {
        next = l->next;
        pl_conn *c = pl_container_of(l, pl_conn, link);
        c->why = "server stopping";
        if (c->kind == PL_CONN_WS)
            pl_ws_close(c, 1001, "server stopping");
        else
            pl_conn_end(c);
    }
    for (pl_link *l = p->conns_http.next; l != &p->conns_http; l = l->next) {
        pl_conn *c = pl_container_of(l, pl_conn, link);
        if (c->ending)
            continue; /* an answer (or a close handshake) is on its way: let it finish */
        if (c->out_head != c->out_tail || c->writing)
            pl_conn_end(c);
        else
            pl_conn_close(c, "stopping");
    }
    uv_timer_start(&p->stop_timer, on_stop_deadline, (uint64_t)p->cfg.stop_timeout_ms, 0);
    finish_if_done(p);
}

static void on_wake(uv_async_t *a)
{
    pushlet_t *p = a->loop->data;
    /* Read the stop flag before taking the list: stop closes the inbox before setting it, so
     * this take then holds every message published before the stop. */
    bool stop = __atomic_load_n(&p->stop_requested, __ATOMIC_ACQUIRE);
    pl_hooks_take_answers(p);
    pl_msg *m = pl_inbox_take_all(&p->inbox);
    while (m) {
        pl_msg *next = m->next;
        if (m->target == PL_TO_TOPIC && p->dist)
            pl_dist_publish(p, m, NULL); /* delivered when it comes back from Redis */
        else if (m->target == PL_TO_TOPIC)
            pl_broker_dispatch(p, m, NULL);
        else
            pl_hooks_dispatch(p, m);
        m = next;
    }
    if (stop && !p->stopping)
        begin_stop(p);
}

static void on_prepare(uv_prepare_t *h) { pl_conns_flush(h->loop->data); }

static void on_tick(uv_timer_t *t)
{
    pl_conns_sweep_timeouts(t->loop->data);
    pl_hooks_expire(t->loop->data);
    pl_dist_tick(t->loop->data);
    pl_history_trim(t->loop->data, true);
}

static void on_heartbeat(uv_timer_t *t)
{
    pushlet_t *p = t->loop->data;
    for (pl_link *l = p->conns_stream.next; l != &p->conns_stream; l = l->next) {
        pl_conn *c = pl_container_of(l, pl_conn, link);
        if (c->kind == PL_CONN_WS)
            pl_ws_heartbeat(c);
        else if (c->out_bytes == 0) /* output pending: the stream is not idle */
            pl_conn_send(c, p->sse_heartbeat);
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    pushlet_t *p = server->loop->data;
    if (status < 0) {
        pl_warn(p, "server", "accept failed: %s", uv_strerror(status));
        return;
    }
    pl_conn_accept(p);
}

static void loop_main(void *arg)
{
    pushlet_t *p = arg;
    /* A write to a reset socket raises SIGPIPE on the writing thread; blocked here, the write
     * just fails with EPIPE and the host's signal dispositions stay untouched. */
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, NULL);
    __atomic_store_n(&p->loop_thread, uv_thread_self(), __ATOMIC_RELEASE);
    uv_run(&p->loop, UV_RUN_DEFAULT);
}

/* ---- Start / stop (called by pushlet.c with state_mu held, never on the loop thread) ------- */

static int listen_error(int uv_err)
{
    if (uv_err == UV_EADDRINUSE)
        return PUSHLET_EADDRINUSE;
    if (uv_err == UV_ENOMEM)
        return PUSHLET_ENOMEM;
    return PUSHLET_ELISTEN;
}

static pl_buf *make_preamble(const pushlet_t *p)
{
    const char *fmt = "HTTP/1.1 200 OK\r\n"
                      "Content-Type: text/event-stream\r\n"
                      "Cache-Control: no-cache\r\n"
                      "Connection: keep-alive\r\n"
                      "X-Accel-Buffering: no\r\n"
                      "Access-Control-Allow-Origin: %s\r\n"
                      "\r\n";
    int n = snprintf(NULL, 0, fmt, p->cfg.cors_origin);
    pl_buf *b = pl_buf_new((size_t)n + 1);
    if (!b)
        return NULL;
    snprintf(b->data, (size_t)n + 1, fmt, p->cfg.cors_origin);
    b->len = (uint32_t)n;
    return b;
}

static void release_loop_state(pushlet_t *p)
{
    pl_buf_unref(p->sse_preamble);
    pl_buf_unref(p->sse_heartbeat);
    pl_buf_unref(p->ws_ping);
    p->sse_preamble = p->sse_heartbeat = p->ws_ping = NULL;
    free(p->read_buf);
    p->read_buf = NULL;
    pl_deflate_free(p->deflate);
    p->deflate = NULL;
    pl_history_clear(p);
    p->topics.on_drop = NULL;
    uv_mutex_lock(&p->topics_mu);
    pl_topics_destroy(&p->topics);
    uv_mutex_unlock(&p->topics_mu);
    pl_hooks_release(p);
    free(p->tomb_hash);
    free(p->tomb_seq);
    p->tomb_hash = p->tomb_seq = NULL;
    pl_history_rules_free(p->rules, p->nrules);
    free(p->kept);
    p->kept = NULL;
    p->nkept = 0;
    p->rules = NULL;
    p->nrules = 0;
}

static void close_any(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* Close whatever handles were initialised and let the loop finish the closes. */
static void abandon_loop(pushlet_t *p)
{
    uv_walk(&p->loop, close_any, NULL);
    uv_run(&p->loop, UV_RUN_DEFAULT);
    uv_loop_close(&p->loop);
    release_loop_state(p);
}

static int bind_listener(pushlet_t *p)
{
    struct sockaddr_storage addr;
    int rc = strchr(p->cfg.host, ':')
                 ? uv_ip6_addr(p->cfg.host, p->cfg.port, (struct sockaddr_in6 *)&addr)
                 : uv_ip4_addr(p->cfg.host, p->cfg.port, (struct sockaddr_in *)&addr);
    if (rc != 0)
        return PUSHLET_ELISTEN;
    if ((rc = uv_tcp_bind(&p->listener, (struct sockaddr *)&addr, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&p->listener, 4096, on_connection)) != 0) {
        return listen_error(rc);
    }
    struct sockaddr_storage bound;
    int len = sizeof(bound);
    uv_tcp_getsockname(&p->listener, (struct sockaddr *)&bound, &len);
    int port = bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                           : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    __atomic_store_n(&p->bound_port, port, __ATOMIC_RELAXED);
    return 0;
}

int pl_broker_start(pushlet_t *p)
{
    if (uv_loop_init(&p->loop) != 0)
        return PUSHLET_ESYSTEM;
    p->loop.data = p;
    p->stopping = false;
    p->open_handles = 0;
    p->nconns = 0;
    p->dirty = p->closing = NULL;
    __atomic_store_n(&p->stop_requested, false, __ATOMIC_RELAXED);
    pl_list_init(&p->conns_http);
    pl_list_init(&p->conns_stream);
    p->kept_bytes = p->kept_count = 0;
    p->refill = NULL;
    pl_topics_init(&p->topics);
    p->topics.mu = &p->topics_mu;
    p->topics.on_new = pl_history_topic_init;
    p->topics.on_drop = pl_history_topic_dropped;
    p->tomb_hash = calloc(PL_TOMBSTONES, sizeof(uint64_t));
    p->tomb_seq = calloc(PL_TOMBSTONES, sizeof(uint64_t));
    p->topics.ctx = p;
    /* A new epoch every run: history is in memory and does not survive a stop. */
    uint64_t epoch = 0;
    if (uv_random(NULL, NULL, &epoch, sizeof(epoch), 0, NULL) != 0)
        epoch = uv_hrtime() ^ (uint64_t)(uintptr_t)p;
    p->epoch = (epoch & ((UINT64_C(1) << 48) - 1)) | (UINT64_C(1) << 47); /* 10 base-36 digits */
    p->counter = 0;
    p->nrules = pl_history_rules_parse(p->cfg.history_rules, &p->rules);
    if (p->nrules < 0)
        p->nrules = 0; /* validated when set */
    p->kept = malloc((size_t)(p->nrules + 1) * sizeof(*p->kept));
    p->nkept = p->kept ? p->nrules + 1 : 0;
    for (int i = 0; i < p->nkept; i++)
        pl_list_init(&p->kept[i]);
    p->read_buf = malloc(PL_READ_BUF_SIZE);
    p->sse_preamble = make_preamble(p);
    p->sse_heartbeat = pl_buf_from(": heartbeat\n\n", 13);
    p->ws_ping = pl_buf_from("\x89\x00", 2); /* an empty ping frame, shared by all */
    int rc = 0;
    if (!p->read_buf || !p->sse_preamble || !p->sse_heartbeat || !p->ws_ping || !p->tomb_hash ||
        !p->tomb_seq || !p->kept)
        rc = PUSHLET_ENOMEM;
    if (!rc &&
        (uv_tcp_init(&p->loop, &p->listener) != 0 ||
         uv_async_init(&p->loop, &p->wake, on_wake) != 0 ||
         uv_prepare_init(&p->loop, &p->flusher) != 0 || uv_timer_init(&p->loop, &p->ticker) != 0 ||
         uv_timer_init(&p->loop, &p->heartbeat) != 0 ||
         uv_timer_init(&p->loop, &p->stop_timer) != 0 ||
         uv_idle_init(&p->loop, &p->refill_idle) != 0))
        rc = PUSHLET_ESYSTEM;
    if (!rc)
        rc = bind_listener(p);
    if (!rc)
        rc = pl_dist_start(p);
    if (rc) {
        abandon_loop(p);
        return rc;
    }
    uv_prepare_start(&p->flusher, on_prepare);
    uv_timer_start(&p->ticker, on_tick, TICK_MS, TICK_MS);
    if (p->cfg.heartbeat_ms > 0)
        uv_timer_start(&p->heartbeat, on_heartbeat, (uint64_t)p->cfg.heartbeat_ms,
                       (uint64_t)p->cfg.heartbeat_ms);
    pl_inbox_open(&p->inbox, &p->wake, (size_t)p->cfg.max_queued_messages,
                  (size_t)p->cfg.max_queued_bytes, (size_t)p->cfg.max_message_size);
    pl_hooks_open(p);
    if (uv_thread_create(&p->thread, loop_main, p) != 0) {
        pl_dist_close(p);
        pl_hooks_close(p);
        pl_inbox_close(&p->inbox);
        abandon_loop(p);
        return PUSHLET_ESYSTEM;
    }
    return 0;
}

void pl_broker_stop(pushlet_t *p)
{
    /* Publishes accepted before this point are delivered; later ones get PUSHLET_ESTOPPED. Auth
     * answers from now on no longer wake the loop (which only closes connections now). */
    pl_hooks_close(p);
    pl_inbox_close(&p->inbox);
    __atomic_store_n(&p->stop_requested, true, __ATOMIC_RELEASE);
    uv_async_send(&p->wake);
    uv_thread_join(&p->thread);
    __atomic_store_n(&p->loop_thread, (uv_thread_t)0, __ATOMIC_RELEASE);
    int rc = uv_loop_close(&p->loop);
    if (rc != 0)
        pl_error(p, "broker", "loop closed with handles still open: %s", uv_strerror(rc));
    /* Anything a publisher pushed between the last drain and the close was never delivered:
     * the inbox was closed first, so there is none, but free defensively. */
    pl_msg *m = pl_inbox_take_all(&p->inbox);
    while (m) {
        pl_msg *next = m->next;
        pl_msg_unref(m);
        m = next;
    }
    release_loop_state(p);
    __atomic_store_n(&p->bound_port, -1, __ATOMIC_RELAXED);
}
