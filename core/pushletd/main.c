/* pushletd: the Pushlet core as a standalone server. Flags or PUSHLET_<NAME> environment
 * variables configure it; SIGINT/SIGTERM stop it gracefully. */
#include "auth_url.h"

#include <pushlet.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

extern const char pushletd_demo_page[];

typedef enum {
    KIND_STR,
    KIND_INT,
    KIND_SECONDS,
    KIND_LEVEL,
    KIND_LISTEN,
    KIND_POLICY,
    KIND_AUTH_URL,     /* kept for pl_authurl_start() */
    KIND_AUTH_WORKERS, /* kept for pl_authurl_start() */
    KIND_REDIS,        /* kept for pushlet_enable_distributed_mode() */
    KIND_REDIS_PASSWORD,
    KIND_REDIS_DB,
} flag_kind;

typedef struct flag {
    const char *name; /* --name, env PUSHLET_NAME */
    flag_kind kind;
    int option; /* pushlet_option_t, or 0 */
    const char *help;
} flag;

static const flag flags[] = {
    {"listen", KIND_LISTEN, 0, "HOST:PORT to serve on (default 127.0.0.1:8080; port 0 = any)"},
    {"heartbeat", KIND_SECONDS, PUSHLET_OPT_HEARTBEAT_MS, "SSE heartbeat interval (default 30)"},
    {"header-timeout", KIND_SECONDS, PUSHLET_OPT_HEADER_TIMEOUT_MS,
     "time to send a request head, else 408 (default 10)"},
    {"keepalive-timeout", KIND_SECONDS, PUSHLET_OPT_KEEPALIVE_TIMEOUT_MS,
     "idle keep-alive connections close after this (default 30)"},
    {"stop-timeout", KIND_SECONDS, PUSHLET_OPT_STOP_TIMEOUT_MS,
     "graceful stop deadline for queued output (default 5)"},
    {"max-connections", KIND_INT, PUSHLET_OPT_MAX_CONNECTIONS, "beyond this, 503 (default 10000)"},
    {"max-message-size", KIND_INT, PUSHLET_OPT_MAX_MESSAGE_SIZE,
     "bytes per published message, else 413 (default 65536)"},
    {"max-output-bytes", KIND_INT, PUSHLET_OPT_MAX_OUTPUT_BYTES,
     "unsent bytes per connection before it is dropped (default 1048576)"},
    {"max-topics", KIND_INT, PUSHLET_OPT_MAX_TOPICS_PER_CONNECTION,
     "topics per connection (default 64)"},
    {"cors-origin", KIND_STR, PUSHLET_OPT_CORS_ORIGIN, "Access-Control-Allow-Origin (default *)"},
    {"ws-origins", KIND_STR, PUSHLET_OPT_WS_ORIGINS,
     "Origin values (comma-separated) allowed to open a WebSocket (default any)"},
    {"publish-secret", KIND_STR, PUSHLET_OPT_PUBLISH_SECRET,
     "secret required to publish (Bearer, X-Pushlet-Secret or ?secret=)"},
    {"log-level", KIND_LEVEL, PUSHLET_OPT_LOG_LEVEL, "debug, info, warn or error (default info)"},
    {"history-size", KIND_INT, PUSHLET_OPT_HISTORY_SIZE,
     "messages kept per topic for resume (default 1000; 0 = none)"},
    {"history-age", KIND_SECONDS, PUSHLET_OPT_HISTORY_AGE_MS,
     "kept messages older than this go (default 600)"},
    {"history-memory", KIND_INT, PUSHLET_OPT_HISTORY_MAX_BYTES,
     "bytes for all topics' history together (default 67108864)"},
    {"history-rules", KIND_STR, PUSHLET_OPT_HISTORY_RULES,
     "per-topic bounds: PATTERN=COUNT[:AGE_MS],... (PATTERN: a topic or a prefix ending in *)"},
    {"slow-consumer", KIND_POLICY, PUSHLET_OPT_SLOW_CONSUMER_POLICY,
     "disconnect (default) or drop_oldest: keep a client over its output bound and let it catch "
     "up from history"},
    {"max-subscribes-per-sec", KIND_INT, PUSHLET_OPT_MAX_SUBSCRIBES_PER_SEC,
     "WebSocket (un)subscribe commands per second per connection (default 100)"},
    {"max-body-size", KIND_INT, PUSHLET_OPT_MAX_BODY_SIZE,
     "HTTP publish body bytes, else 413 (default 3 x max-message-size + 1024)"},
    {"close-timeout", KIND_SECONDS, PUSHLET_OPT_CLOSE_TIMEOUT_MS,
     "linger after an error answer / wait for a WebSocket close reply (default 2)"},
    {"jwt-secret", KIND_STR, PUSHLET_OPT_JWT_SECRET,
     "require an HS256 token signed with this secret from SSE and WebSocket clients "
     "(Authorization: Bearer or ?token=)"},
    {"auth-url", KIND_AUTH_URL, 0,
     "ask this HTTP backend to allow each connection and subscription: "
     "http://HOST[:PORT][/PATH] (https is not supported; see docs/PUSHLETD.md)"},
    {"auth-workers", KIND_AUTH_WORKERS, 0,
     "concurrent requests to the auth backend, one keep-alive connection each (default 4)"},
    {"auth-timeout", KIND_SECONDS, PUSHLET_OPT_AUTH_TIMEOUT_MS,
     "an auth request not answered by then is denied with 503 (default 5)"},
    {"redis", KIND_REDIS, 0,
     "distributed mode: share messages, IDs and history with every pushletd on this Redis "
     "(HOST:PORT, redis://[:PASSWORD@]HOST[:PORT][/DB] or unix:/PATH); repeat the flag (or "
     "separate with commas) for shards, in the same order on every node"},
    {"redis-password", KIND_REDIS_PASSWORD, 0, "password for the Redis servers (AUTH)"},
    {"redis-db", KIND_REDIS_DB, 0, "Redis database number (default 0)"},
    {"retry", KIND_SECONDS, PUSHLET_OPT_RETRY_MS,
     "reconnect delay suggested to EventSource clients (default 3)"},
};
#define NFLAGS (sizeof(flags) / sizeof(flags[0]))

static int log_level = PUSHLET_LOG_INFO;
static char listen_host[64] = "127.0.0.1"; /* as configured, for the ready line */
static pl_authurl_config auth = {.url = NULL, .workers = 4, .timeout_ms = 5000};
#define MAX_REDIS 64
static char *redis_addrs[MAX_REDIS];
static int nredis;
static const char *redis_password;
static int redis_db;

static const char *level_name(int level)
{
    if (level >= PUSHLET_LOG_ERROR)
        return "error";
    if (level >= PUSHLET_LOG_WARN)
        return "warn";
    if (level >= PUSHLET_LOG_INFO)
        return "info";
    return "debug";
}

static void log_stderr(int level, const char *component, const char *msg, size_t len, void *ud)
{
    (void)ud;
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s [%s] %.*s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
            level_name(level), component, (int)len, msg);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: pushletd [--flag VALUE]...\n\n"
                 "A push server: Server-Sent Events subscribers on /events?topic=T, publishing\n"
                 "with POST /publish?topic=T (body = data). Each flag can also be set with the\n"
                 "environment variable PUSHLET_<FLAG> (upper case, '-' as '_').\n\n");
    for (size_t i = 0; i < NFLAGS; i++)
        fprintf(out, "  --%-20s %s\n", flags[i].name, flags[i].help);
    fprintf(out, "  --%-20s %s\n  --%-20s %s\n", "help", "show this help", "version",
            "print the version");
}

static int fail(const char *name, const char *value, const char *why)
{
    fprintf(stderr, "pushletd: --%s %s: %s\n", name, value, why);
    return -1;
}

static int parse_level(const char *v)
{
    static const struct {
        const char *name;
        int level;
    } levels[] = {{"debug", PUSHLET_LOG_DEBUG}, {"info", PUSHLET_LOG_INFO},
                  {"warn", PUSHLET_LOG_WARN},   {"warning", PUSHLET_LOG_WARN},
                  {"error", PUSHLET_LOG_ERROR}, {"off", PUSHLET_LOG_OFF}};
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++)
        if (strcasecmp(v, levels[i].name) == 0)
            return levels[i].level;
    return -1;
}

static int apply(pushlet_t *p, const flag *f, const char *v)
{
    char *end;
    int rc = 0;
    switch (f->kind) {
    case KIND_STR: rc = pushlet_set_str(p, f->option, v); break;
    case KIND_INT: {
        errno = 0;
        long long n = strtoll(v, &end, 10);
        if (errno || end == v || *end)
            return fail(f->name, v, "not an integer");
        rc = pushlet_set_int(p, f->option, n);
        break;
    }
    case KIND_SECONDS: {
        errno = 0;
        double s = strtod(v, &end);
        if (errno || end == v || *end || s < 0 || s > 86400)
            return fail(f->name, v, "not a number of seconds");
        int64_t ms = (int64_t)(s * 1000 + 0.5);
        if (f->option == PUSHLET_OPT_AUTH_TIMEOUT_MS) {
            if (ms < 1)
                return fail(f->name, v, "must be at least 0.001");
            auth.timeout_ms = (int)ms;
        }
        rc = pushlet_set_int(p, f->option, ms);
        break;
    }
    case KIND_AUTH_URL: {
        char why[160];
        if (pl_authurl_check(v, why, sizeof(why)) != 0)
            return fail(f->name, v, why);
        auth.url = v; /* argv and the environment outlive the server */
        break;
    }
    case KIND_REDIS: {
        const char *start = v;
        while (*start) { /* a comma-separated list, or one address */
            const char *comma = strchr(start, ',');
            size_t len = comma ? (size_t)(comma - start) : strlen(start);
            if (len == 0 || nredis == MAX_REDIS)
                return fail(f->name, v, len ? "too many shards" : "empty address");
            redis_addrs[nredis++] = strndup(start, len);
            start += len + (comma ? 1 : 0);
        }
        break;
    }
    case KIND_REDIS_PASSWORD:
        redis_password = v;
        break;
    case KIND_REDIS_DB: {
        errno = 0;
        long n = strtol(v, &end, 10);
        if (errno || end == v || *end || n < 0 || n > 1000000)
            return fail(f->name, v, "expected a database number");
        redis_db = (int)n;
        break;
    }
    case KIND_AUTH_WORKERS: {
        errno = 0;
        long n = strtol(v, &end, 10);
        if (errno || end == v || *end || n < 1 || n > 256)
            return fail(f->name, v, "expected 1 to 256");
        auth.workers = (int)n;
        break;
    }
    case KIND_POLICY: {
        int policy = strcmp(v, "disconnect") == 0                                     ? 0
                     : strcmp(v, "drop_oldest") == 0 || strcmp(v, "drop-oldest") == 0 ? 1
                                                                                      : -1;
        if (policy < 0)
            return fail(f->name, v, "expected disconnect or drop_oldest");
        rc = pushlet_set_int(p, f->option,
                             policy ? PUSHLET_SLOW_DROP_OLDEST : PUSHLET_SLOW_DISCONNECT);
        break;
    }
    case KIND_LEVEL: {
        int level = parse_level(v);
        if (level < 0)
            return fail(f->name, v, "expected debug, info, warn or error");
        log_level = level;
        rc = pushlet_set_int(p, f->option, level);
        break;
    }
    case KIND_LISTEN: {
        const char *colon = strrchr(v, ':');
        char host[64];
        if (!colon || (size_t)(colon - v) >= sizeof(host) || colon == v)
            return fail(f->name, v, "expected HOST:PORT");
        const char *h = v;
        size_t hlen = (size_t)(colon - v);
        if (h[0] == '[' && hlen > 2 && h[hlen - 1] == ']') /* [::1]:8080 */
            h++, hlen -= 2;
        memcpy(host, h, hlen);
        host[hlen] = '\0';
        errno = 0;
        long port = strtol(colon + 1, &end, 10);
        if (errno || end == colon + 1 || *end)
            return fail(f->name, v, "bad port");
        rc = pushlet_listen(p, host, (int)port);
        if (rc == 0)
            snprintf(listen_host, sizeof(listen_host), "%s", host);
        break;
    }
    }
    if (rc != 0)
        return fail(f->name, v, pushlet_strerror(rc));
    return 0;
}

static const flag *find_flag(const char *name, size_t len)
{
    for (size_t i = 0; i < NFLAGS; i++)
        if (strlen(flags[i].name) == len && strncmp(flags[i].name, name, len) == 0)
            return &flags[i];
    return NULL;
}

static int configure_from_env(pushlet_t *p)
{
    for (size_t i = 0; i < NFLAGS; i++) {
        char env[64] = "PUSHLET_";
        size_t n = strlen(env);
        for (const char *c = flags[i].name; *c && n + 1 < sizeof(env); c++)
            env[n++] = *c == '-' ? '_' : (char)(*c - ('a' <= *c && *c <= 'z' ? 32 : 0));
        env[n] = '\0';
        const char *v = getenv(env);
        if (v && *v && apply(p, &flags[i], v) != 0)
            return -1;
    }
    return 0;
}

/* Returns 0 to run, 1 to exit successfully (help/version), -1 on a bad command line. */
static int configure_from_args(pushlet_t *p, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 1;
        }
        if (strcmp(a, "--version") == 0) {
            printf("pushletd %s\n", pushlet_version_string());
            return 1;
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "pushletd: unexpected argument '%s' (see --help)\n", a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        const flag *f = find_flag(name, eq ? (size_t)(eq - name) : strlen(name));
        if (!f) {
            fprintf(stderr, "pushletd: unknown flag '%s' (see --help)\n", a);
            return -1;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v) {
            fprintf(stderr, "pushletd: --%s needs a value\n", f->name);
            return -1;
        }
        if (apply(p, f, v) != 0)
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    pushlet_t *p;
    int rc = pushlet_new(&p);
    if (rc) {
        fprintf(stderr, "pushletd: %s\n", pushlet_strerror(rc));
        return 1;
    }
    pushlet_set_int(p, PUSHLET_OPT_HTTP_PUBLISH, 1);
    pushlet_set_str(p, PUSHLET_OPT_INDEX_HTML, pushletd_demo_page);
    int cfg = configure_from_env(p);
    if (cfg == 0)
        cfg = configure_from_args(p, argc, argv);
    if (cfg != 0) {
        pushlet_free(p);
        return cfg > 0 ? 0 : 2;
    }
    pushlet_set_logger(p, log_stderr, log_level, NULL);

    /* Distributed mode: each shard is contacted now, so a wrong address or password stops us
     * here with the reason (logged above this line). */
    for (int i = 0; i < nredis; i++) {
        rc = pushlet_enable_distributed_mode(p, redis_addrs[i], redis_password, redis_db);
        if (rc) {
            fprintf(stderr, "pushletd: --redis: shard %d: %s\n", i, pushlet_strerror(rc));
            cfg = -1;
            break;
        }
    }
    for (int i = 0; i < nredis; i++)
        free(redis_addrs[i]);
    if (cfg != 0) {
        pushlet_free(p);
        return 1;
    }

    /* Signals are taken synchronously by this thread; the loop thread inherits the mask. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    /* The auth threads start with the signals blocked, and take requests before any client
     * can connect. */
    pl_authurl_t *auth_backend = NULL;
    if (auth.url) {
        char why[256];
        auth.log = log_stderr;
        auth.log_level = log_level;
        if (pl_authurl_start(&auth_backend, p, &auth, why, sizeof(why)) != 0) {
            fprintf(stderr, "pushletd: --auth-url %s: %s\n", auth.url, why);
            pushlet_free(p);
            return 1;
        }
    }

    rc = pushlet_start(p);
    if (rc) {
        fprintf(stderr, "pushletd: cannot start: %s\n", pushlet_strerror(rc));
        pl_authurl_stop(auth_backend);
        pushlet_free(p);
        return 1;
    }
    fprintf(stderr, "pushletd: listening on http://%s:%d\n", listen_host, pushlet_port(p));

    int sig = 0;
    sigwait(&stop_signals, &sig);
    fprintf(stderr, "pushletd: %s received, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    /* The broker first (requests still waiting end with their connections), then the auth
     * threads, which answer through `p` and so must be gone before it is freed. */
    pushlet_stop(p);
    pl_authurl_stop(auth_backend);
    pushlet_free(p);
    return 0;
}
