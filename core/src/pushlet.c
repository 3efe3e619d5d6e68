/* The public API: handles, options, lifecycle and publishing. The loop side is in broker.c. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define STR_(x) #x
#define STR(x)  STR_(x)

unsigned int pushlet_version(void) { return PUSHLET_VERSION_HEX; }

const char *pushlet_version_string(void)
{
    return STR(PUSHLET_VERSION_MAJOR) "." STR(PUSHLET_VERSION_MINOR) "." STR(PUSHLET_VERSION_PATCH);
}

const char *pushlet_strerror(int code)
{
    switch (code) {
    case PUSHLET_OK: return "success";
    case PUSHLET_EINVAL: return "invalid argument";
    case PUSHLET_ENOMEM: return "out of memory";
    case PUSHLET_EFULL: return "publish queue full";
    case PUSHLET_ESTOPPED: return "broker not running";
    case PUSHLET_EBUSY: return "broker running: stop it first";
    case PUSHLET_EWRONGTHREAD: return "not allowed on the broker's own loop thread";
    case PUSHLET_ETOOBIG: return "message larger than the maximum message size";
    case PUSHLET_EADDRINUSE: return "listen address already in use";
    case PUSHLET_ELISTEN: return "cannot listen on the given address";
    case PUSHLET_ESYSTEM: return "operating system resource unavailable";
    case PUSHLET_ENOENT: return "no such request or connection";
    case PUSHLET_EUNAVAILABLE: return "Redis unavailable";
    case PUSHLET_EAUTH: return "Redis refused the credentials";
    default: return "unknown error";
    }
}

/* ---- Options -------------------------------------------------------------------------------- */

typedef struct int_option {
    pushlet_option_t opt;
    size_t offset;
    int64_t def, min, max;
} int_option;

#define INT_OPT(o, field, d, lo, hi)                                                               \
    {                                                                                              \
        o, offsetof(pl_config, field), d, lo, hi                                                   \
    }
static const int_option int_options[] = {
    INT_OPT(PUSHLET_OPT_HEARTBEAT_MS, heartbeat_ms, 30000, 0, 86400000),
    INT_OPT(PUSHLET_OPT_HEADER_TIMEOUT_MS, header_timeout_ms, 10000, 1, 3600000),
    INT_OPT(PUSHLET_OPT_KEEPALIVE_TIMEOUT_MS, keepalive_timeout_ms, 30000, 1, 86400000),
    INT_OPT(PUSHLET_OPT_STOP_TIMEOUT_MS, stop_timeout_ms, 5000, 0, 3600000),
    INT_OPT(PUSHLET_OPT_RETRY_MS, retry_ms, 3000, 0, 86400000),
    INT_OPT(PUSHLET_OPT_MAX_CONNECTIONS, max_connections, 10000, 1, 10000000),
    INT_OPT(PUSHLET_OPT_MAX_MESSAGE_SIZE, max_message_size, 65536, 0, 64 << 20),
    INT_OPT(PUSHLET_OPT_MAX_HEADER_SIZE, max_header_size, 8192, 256, 1 << 20),
    INT_OPT(PUSHLET_OPT_MAX_URL_SIZE, max_url_size, 4096, 16, 1 << 20),
    INT_OPT(PUSHLET_OPT_MAX_HEADERS, max_headers, 64, 1, PL_HTTP_MAX_HEADERS_CAP),
    INT_OPT(PUSHLET_OPT_MAX_OUTPUT_BYTES, max_output_bytes, 1 << 20, 1024, (int64_t)1 << 32),
    INT_OPT(PUSHLET_OPT_MAX_TOPICS_PER_CONNECTION, max_topics_per_connection, 64, 1, 64),
    INT_OPT(PUSHLET_OPT_MAX_QUEUED_MESSAGES, max_queued_messages, 65536, 1, 100000000),
    INT_OPT(PUSHLET_OPT_MAX_QUEUED_BYTES, max_queued_bytes, 64 << 20, 1024, (int64_t)1 << 40),
    INT_OPT(PUSHLET_OPT_MAX_PENDING_EVENTS, max_pending_events, 4096, 1, 10000000),
    INT_OPT(PUSHLET_OPT_HTTP_PUBLISH, http_publish, 0, 0, 1),
    INT_OPT(PUSHLET_OPT_LOG_LEVEL, log_level, PUSHLET_LOG_INFO, 0, PUSHLET_LOG_OFF),
    INT_OPT(PUSHLET_OPT_HISTORY_SIZE, history_size, 1000, 0, 10000000),
    INT_OPT(PUSHLET_OPT_HISTORY_AGE_MS, history_age_ms, 600000, 0, (int64_t)366 * 86400000),
    INT_OPT(PUSHLET_OPT_HISTORY_MAX_BYTES, history_max_bytes, 64 << 20, 0, (int64_t)1 << 40),
    INT_OPT(PUSHLET_OPT_SLOW_CONSUMER_POLICY, slow_consumer_policy, PUSHLET_SLOW_DISCONNECT,
            PUSHLET_SLOW_DISCONNECT, PUSHLET_SLOW_DROP_OLDEST),
    INT_OPT(PUSHLET_OPT_MAX_SUBSCRIBES_PER_SEC, max_subscribes_per_sec, 100, 1, 1000000),
    INT_OPT(PUSHLET_OPT_MAX_BODY_SIZE, max_body_size, 0, 0, (int64_t)1 << 30),
    INT_OPT(PUSHLET_OPT_CLOSE_TIMEOUT_MS, close_timeout_ms, 2000, 1, 3600000),
    INT_OPT(PUSHLET_OPT_AUTH_TIMEOUT_MS, auth_timeout_ms, 5000, 1, 3600000),
    INT_OPT(PUSHLET_OPT_MAX_CLIENT_MESSAGES_PER_SEC, max_client_messages_per_sec, 100, 1, 1000000),
};

typedef struct str_option {
    pushlet_option_t opt;
    size_t offset;
    const char *def;
    bool is_path;
} str_option;

#define STR_OPT(o, field, d, path)                                                                 \
    {                                                                                              \
        o, offsetof(pl_config, field), d, path                                                     \
    }
static const str_option str_options[] = {
    STR_OPT(PUSHLET_OPT_SSE_PATH, sse_path, "/events", true),
    STR_OPT(PUSHLET_OPT_WS_PATH, ws_path, "/ws", true),
    STR_OPT(PUSHLET_OPT_PUBLISH_PATH, publish_path, "/publish", true),
    STR_OPT(PUSHLET_OPT_PUBLISH_ALL_PATH, publish_all_path, "/publish_all", true),
    STR_OPT(PUSHLET_OPT_SEND_PATH, send_path, "/send", true),
    STR_OPT(PUSHLET_OPT_STATS_PATH, stats_path, "/stats", true),
    STR_OPT(PUSHLET_OPT_HEALTH_PATH, health_path, "/healthz", true),
    STR_OPT(PUSHLET_OPT_CORS_ORIGIN, cors_origin, "*", false),
    STR_OPT(PUSHLET_OPT_PUBLISH_SECRET, publish_secret, "", false),
    STR_OPT(PUSHLET_OPT_INDEX_HTML, index_html, "", false),
    STR_OPT(PUSHLET_OPT_WS_ORIGINS, ws_origins, "", false),
    STR_OPT(PUSHLET_OPT_HISTORY_RULES, history_rules, "", false),
    STR_OPT(PUSHLET_OPT_METRICS_PATH, metrics_path, "/metrics", true),
    STR_OPT(PUSHLET_OPT_JWT_SECRET, jwt_secret, "", false),
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int64_t *int_field(pl_config *cfg, const int_option *o)
{
    return (int64_t *)((char *)cfg + o->offset);
}

static char **str_field(pl_config *cfg, const str_option *o)
{
    return (char **)((char *)cfg + o->offset);
}

static const int_option *find_int(pushlet_option_t opt)
{
    for (size_t i = 0; i < COUNT(int_options); i++)
        if (int_options[i].opt == opt)
            return &int_options[i];
    return NULL;
}

static const str_option *find_str(pushlet_option_t opt)
{
    for (size_t i = 0; i < COUNT(str_options); i++)
        if (str_options[i].opt == opt)
            return &str_options[i];
    return NULL;
}

/* A configured value must not be able to break a header line or a response. */
static bool str_value_ok(const str_option *o, const char *v)
{
    if (o->opt == PUSHLET_OPT_INDEX_HTML)
        return true;
    if (o->is_path && *v && *v != '/')
        return false;
    if (o->opt == PUSHLET_OPT_HISTORY_RULES) {
        pl_history_rule *rules;
        int n = pl_history_rules_parse(v, &rules);
        pl_history_rules_free(rules, n > 0 ? n : 0);
        return n >= 0;
    }
    for (const char *c = v; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            return false;
    return strlen(v) <= 4096;
}

static void sync_limits(pushlet_t *p)
{
    p->limits.max_url = (uint32_t)p->cfg.max_url_size;
    p->limits.max_head = (uint32_t)p->cfg.max_header_size;
    p->limits.max_headers = (uint32_t)p->cfg.max_headers;
    /* Bodies carry message data (plus form encoding for /send). */
    p->limits.max_body = p->cfg.max_body_size ? (uint64_t)p->cfg.max_body_size
                                              : (uint64_t)p->cfg.max_message_size * 3 + 1024;
    p->events.max_count = (size_t)p->cfg.max_pending_events;
    __atomic_store_n(&p->max_data, (size_t)p->cfg.max_message_size, __ATOMIC_RELAXED);
    __atomic_store_n(&p->log_level, (int)p->cfg.log_level, __ATOMIC_RELAXED);
}

int pushlet_set_int(pushlet_t *p, pushlet_option_t opt, int64_t value)
{
    const int_option *o = find_int(opt);
    if (!p || !o || value < o->min || value > o->max)
        return PUSHLET_EINVAL;
    uv_mutex_lock(&p->state_mu);
    int rc = PUSHLET_EBUSY;
    if (p->state == PL_STATE_STOPPED) {
        *int_field(&p->cfg, o) = value;
        uv_mutex_lock(&p->events.mu);
        sync_limits(p);
        uv_mutex_unlock(&p->events.mu);
        rc = 0;
    }
    uv_mutex_unlock(&p->state_mu);
    return rc;
}

int pushlet_set_str(pushlet_t *p, pushlet_option_t opt, const char *value)
{
    const str_option *o = find_str(opt);
    if (!p || !o)
        return PUSHLET_EINVAL;
    if (!value)
        value = o->def;
    if (!str_value_ok(o, value))
        return PUSHLET_EINVAL;
    char *copy = strdup(value);
    if (!copy)
        return PUSHLET_ENOMEM;
    uv_mutex_lock(&p->state_mu);
    int rc = PUSHLET_EBUSY;
    if (p->state == PL_STATE_STOPPED) {
        char **field = str_field(&p->cfg, o);
        free(*field);
        *field = copy;
        copy = NULL;
        rc = 0;
    }
    uv_mutex_unlock(&p->state_mu);
    free(copy);
    return rc;
}

int pushlet_set_heartbeat_interval(pushlet_t *p, uint32_t ms)
{
    return pushlet_set_int(p, PUSHLET_OPT_HEARTBEAT_MS, ms);
}

int pushlet_listen(pushlet_t *p, const char *host, int port)
{
    if (!p || !host || port < 0 || port > 65535 || strlen(host) >= sizeof(p->cfg.host))
        return PUSHLET_EINVAL;
    struct sockaddr_in6 a6;
    struct sockaddr_in a4;
    if (uv_ip4_addr(host, port, &a4) != 0 && uv_ip6_addr(host, port, &a6) != 0)
        return PUSHLET_EINVAL;
    uv_mutex_lock(&p->state_mu);
    int rc = PUSHLET_EBUSY;
    if (p->state == PL_STATE_STOPPED) {
        strcpy(p->cfg.host, host);
        p->cfg.port = port;
        rc = 0;
    }
    uv_mutex_unlock(&p->state_mu);
    return rc;
}

int pushlet_port(const pushlet_t *p)
{
    return p ? __atomic_load_n(&p->bound_port, __ATOMIC_RELAXED) : -1;
}

int pushlet_set_logger(pushlet_t *p, pushlet_log_fn fn, int min_level, void *userdata)
{
    if (!p)
        return PUSHLET_EINVAL;
    uv_mutex_lock(&p->log_mu);
    p->log_fn = fn;
    p->log_ud = userdata;
    p->log_fn_level = min_level;
    uv_mutex_unlock(&p->log_mu);
    return 0;
}

/* ---- Lifecycle ------------------------------------------------------------------------------ */

int pushlet_new(pushlet_t **out)
{
    if (!out)
        return PUSHLET_EINVAL;
    *out = NULL;
    pushlet_t *p = calloc(1, sizeof(*p));
    if (!p)
        return PUSHLET_ENOMEM;
    p->bound_port = -1;
    for (size_t i = 0; i < COUNT(int_options); i++)
        *int_field(&p->cfg, &int_options[i]) = int_options[i].def;
    bool ok = true;
    for (size_t i = 0; i < COUNT(str_options); i++)
        ok &= (*str_field(&p->cfg, &str_options[i]) = strdup(str_options[i].def)) != NULL;
    strcpy(p->cfg.host, "127.0.0.1");
    p->cfg.port = 8080;
    int rc = ok ? 0 : PUSHLET_ENOMEM;
    bool mu = false, cv = false, log_mu = false, events = false, inbox = false, hooks = false,
         topics = false;
    p->answered_tail = &p->answered;
    if (!rc)
        rc = (mu = uv_mutex_init(&p->state_mu) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (cv = uv_cond_init(&p->state_cv) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (log_mu = uv_mutex_init(&p->log_mu) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (events = pl_events_init(&p->events) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (inbox = pl_inbox_init(&p->inbox) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (hooks = uv_mutex_init(&p->hooks_mu) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (!rc)
        rc = (topics = uv_mutex_init(&p->topics_mu) == 0) ? 0 : PUSHLET_ESYSTEM;
    if (rc) {
        if (topics)
            uv_mutex_destroy(&p->topics_mu);
        if (hooks)
            uv_mutex_destroy(&p->hooks_mu);
        if (inbox)
            pl_inbox_destroy(&p->inbox);
        if (events)
            pl_events_destroy(&p->events);
        if (log_mu)
            uv_mutex_destroy(&p->log_mu);
        if (cv)
            uv_cond_destroy(&p->state_cv);
        if (mu)
            uv_mutex_destroy(&p->state_mu);
        for (size_t i = 0; i < COUNT(str_options); i++)
            free(*str_field(&p->cfg, &str_options[i]));
        free(p);
        return rc;
    }
    sync_limits(p);
    *out = p;
    return 0;
}

int pushlet_start(pushlet_t *p)
{
    if (!p)
        return PUSHLET_EINVAL;
    if (pl_on_loop_thread(p))
        return PUSHLET_EWRONGTHREAD;
    uv_mutex_lock(&p->state_mu);
    int rc = PUSHLET_EBUSY;
    if (p->state == PL_STATE_STOPPED) {
        rc = pl_broker_start(p);
        if (rc == 0)
            p->state = PL_STATE_RUNNING;
    }
    uv_mutex_unlock(&p->state_mu);
    /* Logged outside state_mu: a logger may call back into the API. */
    if (rc == 0)
        pl_info(p, "server", "listening on %s:%d", p->cfg.host, pushlet_port(p));
    else if (rc != PUSHLET_EBUSY)
        pl_error(p, "server", "cannot start on %s:%d: %s", p->cfg.host, p->cfg.port,
                 pushlet_strerror(rc));
    return rc;
}

int pushlet_stop(pushlet_t *p)
{
    if (!p)
        return PUSHLET_EINVAL;
    if (pl_on_loop_thread(p))
        return PUSHLET_EWRONGTHREAD;
    /* Not holding state_mu while joining: a callback on the loop thread that touches options
     * gets PUSHLET_EBUSY instead of deadlocking the stop. */
    uv_mutex_lock(&p->state_mu);
    /* A stop already under way: wait for it, so that on return the loop is gone either way. */
    while (p->state == PL_STATE_STOPPING)
        uv_cond_wait(&p->state_cv, &p->state_mu);
    bool running = p->state == PL_STATE_RUNNING;
    if (running)
        p->state = PL_STATE_STOPPING;
    uv_mutex_unlock(&p->state_mu);
    if (!running)
        return PUSHLET_ESTOPPED;
    pl_broker_stop(p);
    uv_mutex_lock(&p->state_mu);
    p->state = PL_STATE_STOPPED;
    uv_cond_broadcast(&p->state_cv);
    uv_mutex_unlock(&p->state_mu);
    pl_info(p, "server", "stopped");
    return 0;
}

int pushlet_free(pushlet_t *p)
{
    if (!p)
        return 0;
    if (pl_on_loop_thread(p))
        return PUSHLET_EWRONGTHREAD;
    pushlet_stop(p);
    pl_dist_free(p);
    pl_inbox_destroy(&p->inbox);
    pl_events_destroy(&p->events);
    uv_mutex_destroy(&p->log_mu);
    uv_mutex_destroy(&p->hooks_mu);
    uv_mutex_destroy(&p->topics_mu);
    uv_cond_destroy(&p->state_cv);
    uv_mutex_destroy(&p->state_mu);
    for (size_t i = 0; i < COUNT(str_options); i++)
        free(*str_field(&p->cfg, &str_options[i]));
    free(p);
    return 0;
}

/* ---- Publishing ----------------------------------------------------------------------------- */

static int publish(pushlet_t *p, const char *topic, const char *event, const char *data, size_t len,
                   bool to_all)
{
    if (!p || (!data && len))
        return PUSHLET_EINVAL;
    if (!event)
        event = "message";
    size_t topic_len = to_all ? 0 : (topic ? strlen(topic) : 0);
    size_t event_len = strlen(event);
    int rc = 0;
    if ((!to_all && (!topic || !pl_topic_name_valid(topic, topic_len))) ||
        !pl_event_name_valid(event, event_len))
        rc = PUSHLET_EINVAL;
    else if (len > __atomic_load_n(&p->max_data, __ATOMIC_RELAXED))
        rc = PUSHLET_ETOOBIG; /* before copying it (the inbox checks again, under its lock) */
    pl_msg *m = NULL;
    if (!rc) {
        m = pl_msg_new(to_all ? "" : topic, topic_len, event, event_len, data ? data : "", len);
        rc = m ? 0 : PUSHLET_ENOMEM;
    }
    if (!rc) {
        m->to_all = to_all;
        /* Distributed mode: counted until Redis stored it (the bound covers both queues). */
        size_t bytes = pl_dist_msg_bytes(m);
        rc = pl_dist_reserve(p, bytes);
        if (!rc && (rc = pl_inbox_push(&p->inbox, m)) != 0)
            pl_dist_release(p, bytes);
        if (rc)
            pl_msg_unref(m);
    }
    if (rc && rc != PUSHLET_ESTOPPED)
        PL_STAT_ADD_SHARED(p, PUSHLET_STAT_PUBLISH_REJECTED, 1);
    if (rc == PUSHLET_ETOOBIG)
        PL_STAT_ADD_SHARED(p, PUSHLET_STAT_OVERSIZE_REJECTED, 1);
    return rc;
}

int pushlet_publish(pushlet_t *p, const char *topic, const char *event, const char *data,
                    size_t len)
{
    return publish(p, topic, event, data, len, false);
}

int pushlet_publish_all(pushlet_t *p, const char *event, const char *data, size_t len)
{
    return publish(p, NULL, event, data, len, true);
}

int64_t pushlet_stat(const pushlet_t *p, pushlet_stat_t which)
{
    if (!p || (int)which < 0 || which >= PUSHLET_STAT_COUNT)
        return -1;
    return __atomic_load_n(&p->stats[which], __ATOMIC_RELAXED);
}
