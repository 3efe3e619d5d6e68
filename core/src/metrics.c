/* Metrics in the Prometheus text format (version 0.0.4): every counter and gauge, readable from
 * any thread through pushlet_metrics(), and on the loop thread (GET /metrics) per-topic figures
 * for the busiest topics, bounded. */
#include "internal.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define TOP_TOPICS 20

typedef struct metric {
    const char *name, *type, *help;
    const char *label; /* one "key=\"value\"" pair, or NULL */
    int stat;          /* PUSHLET_STAT_*, or -1 for a derived value */
} metric;

/* Families are written together: entries with the same name must be adjacent. */
static const metric metrics[] = {
    {"pushlet_connections", "gauge", "Open client connections by transport.", "transport=\"http\"",
     -1},
    {"pushlet_connections", "gauge", NULL, "transport=\"sse\"", PUSHLET_STAT_SSE_CONNECTIONS},
    {"pushlet_connections", "gauge", NULL, "transport=\"websocket\"", PUSHLET_STAT_WS_CONNECTIONS},
    {"pushlet_connections_accepted_total", "counter", "Connections accepted.", NULL,
     PUSHLET_STAT_CONNECTIONS_TOTAL},
    {"pushlet_subscriptions", "gauge", "Subscriptions (connection, topic).", NULL,
     PUSHLET_STAT_SUBSCRIPTIONS},
    {"pushlet_topics", "gauge", "Topics with subscribers or history.", NULL, PUSHLET_STAT_TOPICS},
    {"pushlet_messages_in_total", "counter", "Messages published.", NULL, PUSHLET_STAT_MESSAGES_IN},
    {"pushlet_messages_out_total", "counter", "Message deliveries queued to connections.", NULL,
     PUSHLET_STAT_MESSAGES_OUT},
    {"pushlet_bytes_out_total", "counter", "Bytes written to sockets.", NULL,
     PUSHLET_STAT_BYTES_OUT},
    {"pushlet_history_messages", "gauge", "Messages kept for resume.", NULL,
     PUSHLET_STAT_HISTORY_MESSAGES},
    {"pushlet_history_bytes", "gauge", "Bytes held by kept messages.", NULL,
     PUSHLET_STAT_HISTORY_BYTES},
    {"pushlet_resumes_total", "counter", "Subscriptions resumed from an ID.", NULL,
     PUSHLET_STAT_RESUMES},
    {"pushlet_replayed_total", "counter", "Messages sent from history.", NULL,
     PUSHLET_STAT_REPLAYED},
    {"pushlet_gaps_total", "counter", "Gap signals sent.", NULL, PUSHLET_STAT_GAPS},
    {"pushlet_drops_total", "counter", "Connections dropped or refused, by reason.",
     "reason=\"slow_consumer\"", PUSHLET_STAT_SLOW_CONSUMER_DROPS},
    {"pushlet_drops_total", "counter", NULL, "reason=\"connection_limit\"",
     PUSHLET_STAT_CONNECTIONS_REJECTED},
    {"pushlet_drops_total", "counter", NULL, "reason=\"timeout\"", PUSHLET_STAT_TIMEOUTS},
    {"pushlet_rejected_total", "counter", "Requests refused, by limit.", "limit=\"publish\"",
     PUSHLET_STAT_PUBLISH_REJECTED},
    {"pushlet_rejected_total", "counter", NULL, "limit=\"topics_per_connection\"",
     PUSHLET_STAT_TOPICS_REJECTED},
    {"pushlet_rejected_total", "counter", NULL, "limit=\"subscribe_rate\"",
     PUSHLET_STAT_RATE_LIMITED},
    {"pushlet_rejected_total", "counter", NULL, "limit=\"size\"", PUSHLET_STAT_OVERSIZE_REJECTED},
    {"pushlet_auth_denied_total", "counter",
     "Connections (401) and subscriptions (403, forbidden) refused by authorisation.", NULL,
     PUSHLET_STAT_AUTH_DENIED},
    {"pushlet_auth_pending", "gauge", "Auth requests waiting for the host's answer.", NULL,
     PUSHLET_STAT_AUTH_PENDING},
    {"pushlet_auth_timeouts_total", "counter", "Auth requests denied for want of an answer.", NULL,
     PUSHLET_STAT_AUTH_TIMEOUTS},
    {"pushlet_client_messages_total", "counter", "WebSocket messages passed to the host.", NULL,
     PUSHLET_STAT_CLIENT_MESSAGES},
    {"pushlet_events_dropped_total", "counter", "Events dropped because the pull queue was full.",
     NULL, PUSHLET_STAT_EVENTS_DROPPED},
    {"pushlet_redis_pending", "gauge", "Publishes not yet stored by Redis (distributed mode).",
     NULL, PUSHLET_STAT_REDIS_PENDING},
    {"pushlet_redis_shards_down", "gauge", "Redis shards not ready (distributed mode).", NULL,
     PUSHLET_STAT_REDIS_SHARDS_DOWN},
    {"pushlet_redis_catch_ups_total", "counter",
     "Topic history fetches from Redis: topics joined, gaps and outages filled.", NULL,
     PUSHLET_STAT_REDIS_CATCH_UPS},
    {"pushlet_redis_publish_errors_total", "counter",
     "Publishes Redis refused (logged; not delivered).", NULL, PUSHLET_STAT_REDIS_PUBLISH_ERRORS},
    {"pushlet_history_evicted_total", "counter", "Messages evicted early by the history budget.",
     NULL, PUSHLET_STAT_HISTORY_EVICTED},
    {"pushlet_slow_consumer_lags_total", "counter",
     "Times a connection fell behind under drop_oldest.", NULL, PUSHLET_STAT_SLOW_CONSUMER_LAGS},
    {"pushlet_http_errors_total", "counter", "Requests answered with a 4xx or 5xx status.", NULL,
     PUSHLET_STAT_HTTP_ERRORS},
};

typedef struct out {
    char *buf;
    size_t cap, len; /* len may pass cap: the size needed */
} out;

PL_PRINTF(2, 3) static void put(out *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t room = o->len < o->cap ? o->cap - o->len : 0;
    int n = vsnprintf(room ? o->buf + o->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->len += (size_t)n;
}

static int64_t value_of(const pushlet_t *p, const metric *m)
{
    if (m->stat >= 0)
        return pushlet_stat(p, (pushlet_stat_t)m->stat);
    return pushlet_stat(p, PUSHLET_STAT_CONNECTIONS) -
           pushlet_stat(p, PUSHLET_STAT_SSE_CONNECTIONS) -
           pushlet_stat(p, PUSHLET_STAT_WS_CONNECTIONS);
}

static void put_counters(out *o, const pushlet_t *p)
{
    for (size_t i = 0; i < sizeof(metrics) / sizeof(metrics[0]); i++) {
        const metric *m = &metrics[i];
        if (m->help)
            put(o, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, m->type);
        if (m->label)
            put(o, "%s{%s} %" PRId64 "\n", m->name, m->label, value_of(p, m));
        else
            put(o, "%s %" PRId64 "\n", m->name, value_of(p, m));
    }
}

int pushlet_metrics(pushlet_t *p, char *buf, size_t cap)
{
    if (!p || (!buf && cap))
        return PUSHLET_EINVAL;
    out o = {buf, cap, 0};
    put_counters(&o, p);
    if (cap)
        buf[o.len < cap ? o.len : cap - 1] = '\0';
    return o.len > INT32_MAX ? PUSHLET_ENOMEM : (int)o.len;
}

/* The busiest topics by subscribers (loop thread): a bounded selection, no allocation. */
static void put_topics(out *o, const pushlet_t *p)
{
    const pl_topic *top[TOP_TOPICS];
    size_t n = 0;
    const pl_topics *t = &p->topics;
    for (uint32_t i = 0; i < t->cap; i++) {
        const pl_topic *tp = t->slots[i];
        if (!tp)
            continue;
        size_t k;
        if (n < TOP_TOPICS)
            k = n++;
        else if (tp->nsubs > top[TOP_TOPICS - 1]->nsubs)
            k = TOP_TOPICS - 1; /* replaces the smallest */
        else
            continue;
        while (k > 0 && top[k - 1]->nsubs < tp->nsubs) { /* insertion, largest first */
            top[k] = top[k - 1];
            k--;
        }
        top[k] = tp;
    }
    /* Topic names are validated: no quote, backslash or newline to escape. */
    put(o,
        "# HELP pushlet_topic_subscribers Subscribers of the busiest topics (at most %d).\n"
        "# TYPE pushlet_topic_subscribers gauge\n",
        TOP_TOPICS);
    for (size_t i = 0; i < n; i++)
        put(o, "pushlet_topic_subscribers{topic=\"%s\"} %" PRIu32 "\n", top[i]->name,
            top[i]->nsubs);
    put(o, "# HELP pushlet_topic_history_messages Messages kept by the same topics.\n"
           "# TYPE pushlet_topic_history_messages gauge\n");
    for (size_t i = 0; i < n; i++)
        put(o, "pushlet_topic_history_messages{topic=\"%s\"} %" PRIu32 "\n", top[i]->name,
            top[i]->kept);
}

/* Distributed mode: each Redis shard's state (loop thread). */
static void put_redis(out *o, const pushlet_t *p)
{
    size_t n = pl_dist_shards(p);
    if (n == 0)
        return;
    put(o, "# HELP pushlet_redis_up Whether a Redis shard is ready (1) or connecting/down (0).\n"
           "# TYPE pushlet_redis_up gauge\n");
    pl_dist_shard_view v;
    for (size_t i = 0; i < n; i++)
        if (pl_dist_shard_info(p, i, &v))
            put(o, "pushlet_redis_up{shard=\"%zu\"} %d\n", i, v.ready ? 1 : 0);
    put(o, "# HELP pushlet_redis_shard_pending Publishes sent or queued to a shard, not answered.\n"
           "# TYPE pushlet_redis_shard_pending gauge\n");
    for (size_t i = 0; i < n; i++)
        if (pl_dist_shard_info(p, i, &v))
            put(o, "pushlet_redis_shard_pending{shard=\"%zu\"} %zu\n", i, v.pending);
}

pl_buf *pl_metrics_render(pushlet_t *p)
{
    out o = {NULL, 0, 0};
    put_counters(&o, p);
    put_topics(&o, p);
    put_redis(&o, p);
    size_t cap = o.len + 256; /* publishers may bump a counter between the two passes */
    pl_buf *b = pl_buf_new(cap);
    if (!b)
        return NULL;
    o = (out){b->data, cap, 0};
    put_counters(&o, p);
    put_topics(&o, p);
    put_redis(&o, p);
    b->len = (uint32_t)(o.len < cap ? o.len : cap - 1);
    return b;
}
