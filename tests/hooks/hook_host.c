/* hook_host: embeds a broker for the hook integration tests (tests/integration/test_hooks_*.py).
 *
 *   hook_host [--mode callback|queue|split] [--mask N] [--auth-timeout-ms N] [--jwt-secret S]
 *             [--history N] [--max-client-messages N] [--max-pending-events N] [--int OPT=VALUE]
 *             [--probe-disconnect 1]
 *
 * Listens on 127.0.0.1, port 0, and prints "PORT <n>" once started. From then on every event the
 * host gets is one JSON line on stdout ({"ev":"connected","conn":3,...}), and so is the outcome
 * of every answer it makes ({"answer":REQUEST,"allow":1,"rc":0,"from":"handler"}) and of every
 * control command ({"cmd":"send","seq":4,"rc":0}). Strings in the output are byte strings: each
 * byte is one code point U+0000..U+00FF (Python: s.encode("latin-1")), so binary payloads survive.
 * SUBSCRIBED and UNSUBSCRIBED lines also carry pushlet_topic_subscribers() as read on getting the
 * event (topic_count); with --probe-disconnect 1, DISCONNECTED lines carry the result of a
 * pushlet_send() to that connection (send_rc).
 *
 * Modes: callback = pushlet_set_event_handler() takes every kind in the mask; queue =
 * pushlet_events_enable() and a thread that poll()s pushlet_event_fd(); split = the handler takes
 * the two auth requests and the queue is enabled for every kind (it must not see those two).
 *
 * Control lines on stdin, each answered by one {"cmd":NAME,"seq":N,...} line, in order:
 *   deny-user USER STATUS [REASON...]  deny connections whose user is USER (0 = default status)
 *   deny-topic PATTERN [REASON...]     deny subscriptions to PATTERN (a name, or a prefix*)
 *   allow-user-from-header NAME        an allowed connection's user id is that header's value
 *   metadata TEXT...                   metadata given to allowed connections
 *   delay-ms MS [connect|subscribe]    answer MS ms later from the answer thread (0: at once)
 *   no-answer [connect|subscribe]      leave requests unanswered (they time out)
 *   reset                              allow everything at once again
 *   answer REQUEST allow [USER [METADATA]] | answer REQUEST deny STATUS [REASON...]
 *   send CONN EVENT DATA...   send-user USER EVENT DATA...   close CONN CODE [REASON...]
 *   count TOPIC   stats   quit (as does the end of input; the reply comes after the stop)
 */
#include "pushlet.h"

#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_RULES  32
#define AUTH_KINDS (PUSHLET_EVENT_AUTH_CONNECT | PUSHLET_EVENT_AUTH_SUBSCRIBE)

static pushlet_t *broker;
static bool probe_disconnect; /* --probe-disconnect 1: pushlet_send() to each DISCONNECTED one */
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- JSON lines ------------------------------------------------------------------------------ */

typedef struct line {
    char *p;
    size_t len, cap;
} line;

static void put(line *l, const char *s, size_t n)
{
    if (l->len + n + 1 > l->cap) {
        size_t cap = l->cap ? l->cap : 256;
        while (cap < l->len + n + 1)
            cap *= 2;
        l->p = realloc(l->p, cap);
        if (!l->p)
            abort();
        l->cap = cap;
    }
    memcpy(l->p + l->len, s, n);
    l->len += n;
    l->p[l->len] = '\0';
}

static void put_key(line *l, const char *key)
{
    put(l, l->len ? "," : "{", 1);
    put(l, "\"", 1);
    put(l, key, strlen(key));
    put(l, "\":", 2);
}

/* A JSON string of bytes: anything outside printable ASCII becomes \u00XX. */
static void put_bytes(line *l, const char *s, size_t n)
{
    put(l, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            put(l, esc, 2);
        } else if (c < 0x20 || c >= 0x7f) {
            put(l, esc, (size_t)snprintf(esc, sizeof(esc), "\\u%04x", c));
        } else {
            put(l, (const char *)&c, 1);
        }
    }
    put(l, "\"", 1);
}

static void add_str(line *l, const char *key, const char *s, size_t n)
{
    put_key(l, key);
    if (s)
        put_bytes(l, s, n);
    else
        put(l, "null", 4);
}

static void add_cstr(line *l, const char *key, const char *s)
{
    add_str(l, key, s, s ? strlen(s) : 0);
}

static void add_int(line *l, const char *key, int64_t v)
{
    char num[24];
    put_key(l, key);
    put(l, num, (size_t)snprintf(num, sizeof(num), "%" PRId64, v));
}

static void add_u64(line *l, const char *key, uint64_t v)
{
    char num[24];
    put_key(l, key);
    put(l, num, (size_t)snprintf(num, sizeof(num), "%" PRIu64, v));
}

/* Closes the object and writes it as one line; every thread prints through here. */
static void emit(line *l)
{
    put(l, "}", 1);
    pthread_mutex_lock(&out_lock);
    fputs(l->p, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    free(l->p);
    *l = (line){0};
}

/* ---- Policy: how requests are answered (changed by stdin commands, read by every thread) ----- */

enum { CONNECT, SUBSCRIBE };

typedef struct rule {
    char *match; /* a user id (deny-user) or a topic pattern (deny-topic) */
    int status;
    char *reason;
} rule;

static struct {
    pthread_mutex_t lock;
    rule users[MAX_RULES], topics[MAX_RULES];
    int nusers, ntopics;
    char *user_header; /* allow-user-from-header */
    char *metadata;
    int delay_ms[2];
    bool hold[2];
} policy = {.lock = PTHREAD_MUTEX_INITIALIZER};

static bool topic_matches(const char *pattern, const char *topic)
{
    size_t n = strlen(pattern);
    if (n && pattern[n - 1] == '*')
        return strncmp(pattern, topic, n - 1) == 0;
    return strcmp(pattern, topic) == 0;
}

static char *dup_or_null(const char *s) { return s && *s ? strdup(s) : NULL; }

/* One answer, made at once or later by the answer thread. */
typedef struct answer {
    struct answer *next;
    int64_t due_ms;
    uint64_t request;
    bool allow;
    int status;
    char *user, *metadata, *reason;
} answer;

static void answer_free(answer *a)
{
    free(a->user);
    free(a->metadata);
    free(a->reason);
    free(a);
}

static void answer_now(answer *a, const char *from)
{
    int rc = a->allow ? pushlet_allow(broker, a->request, a->user, a->metadata)
                      : pushlet_deny(broker, a->request, a->status, a->reason);
    line l = {0};
    add_u64(&l, "answer", a->request);
    add_int(&l, "allow", a->allow);
    add_int(&l, "rc", rc);
    add_cstr(&l, "from", from);
    emit(&l);
    answer_free(a);
}

/* ---- The answer thread: delayed answers, in due order ---------------------------------------- */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    answer *head; /* sorted by due_ms */
    bool stop;
} later = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, false};

static void answer_later(answer *a)
{
    pthread_mutex_lock(&later.lock);
    answer **pp = &later.head;
    while (*pp && (*pp)->due_ms <= a->due_ms)
        pp = &(*pp)->next;
    a->next = *pp;
    *pp = a;
    pthread_cond_signal(&later.cond);
    pthread_mutex_unlock(&later.lock);
}

static void *answer_thread(void *arg)
{
    pthread_mutex_lock(&later.lock);
    while (!later.stop) {
        answer *a = later.head;
        if (a && a->due_ms <= now_ms()) {
            later.head = a->next;
            pthread_mutex_unlock(&later.lock);
            answer_now(a, "answerer");
            pthread_mutex_lock(&later.lock);
        } else {
            /* CLOCK_REALTIME for the condvar; a coarse 5 ms tick is plenty for the tests. */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 5 * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&later.cond, &later.lock, &ts);
        }
    }
    while (later.head) {
        answer *a = later.head;
        later.head = a->next;
        answer_free(a);
    }
    pthread_mutex_unlock(&later.lock);
    return arg;
}

/* ---- Events ---------------------------------------------------------------------------------- */

static const char *type_name(int type)
{
    switch (type) {
    case PUSHLET_EVENT_LOG: return "log";
    case PUSHLET_EVENT_AUTH_CONNECT: return "auth_connect";
    case PUSHLET_EVENT_AUTH_SUBSCRIBE: return "auth_subscribe";
    case PUSHLET_EVENT_CONNECTED: return "connected";
    case PUSHLET_EVENT_DISCONNECTED: return "disconnected";
    case PUSHLET_EVENT_SUBSCRIBED: return "subscribed";
    case PUSHLET_EVENT_UNSUBSCRIBED: return "unsubscribed";
    case PUSHLET_EVENT_MESSAGE: return "message";
    default: return "unknown";
    }
}

/* Headers looked up by name, to check pushlet_event_header() as well as the indexed ones. */
static const char *const named_headers[] = {"X-User", "Authorization", "Cookie", "Last-Event-ID"};

static void print_event(const pushlet_event_t *e, const char *via)
{
    int type = pushlet_event_type(e);
    const char *s;
    size_t n;
    line l = {0};
    add_cstr(&l, "ev", type_name(type));
    add_cstr(&l, "via", via);
    add_u64(&l, "request", pushlet_event_request(e));
    add_u64(&l, "conn", pushlet_event_connection(e));
    add_int(&l, "transport", pushlet_event_transport(e));
    s = pushlet_event_user(e, &n);
    add_str(&l, "user", s, n);
    s = pushlet_event_metadata(e, &n);
    add_str(&l, "metadata", s, n);
    s = pushlet_event_topic(e, &n);
    add_str(&l, "topic", s, n);
    s = pushlet_event_text(e, &n);
    add_str(&l, "text", s, n);
    add_int(&l, "binary", pushlet_event_binary(e));
    /* The count as the host sees it on getting the event: it should already include a
     * SUBSCRIBED connection and no longer include an UNSUBSCRIBED one. */
    if (type == PUSHLET_EVENT_SUBSCRIBED || type == PUSHLET_EVENT_UNSUBSCRIBED)
        add_int(&l, "topic_count", pushlet_topic_subscribers(broker, pushlet_event_topic(e, NULL)));
    /* Once DISCONNECTED is reported, the connection is no longer open: ENOENT expected. */
    if (type == PUSHLET_EVENT_DISCONNECTED && probe_disconnect)
        add_int(&l, "send_rc", pushlet_send(broker, pushlet_event_connection(e), "probe", "x", 1));
    if (type == PUSHLET_EVENT_AUTH_CONNECT) {
        add_cstr(&l, "method", pushlet_event_method(e));
        s = pushlet_event_path(e, &n);
        add_str(&l, "path", s, n);
        s = pushlet_event_query(e, &n);
        add_str(&l, "query", s, n);
        add_cstr(&l, "remote", pushlet_event_remote(e));
        put_key(&l, "headers");
        put(&l, "[", 1);
        size_t count = pushlet_event_header_count(e);
        for (size_t i = 0; i < count; i++) {
            const char *name = NULL, *value = NULL;
            int ok = pushlet_event_header_at(e, i, &name, &value);
            put(&l, i ? ",[" : "[", i ? 2 : 1);
            put_bytes(&l, ok && name ? name : "", ok && name ? strlen(name) : 0);
            put(&l, ",", 1);
            put_bytes(&l, ok && value ? value : "", ok && value ? strlen(value) : 0);
            put(&l, "]", 1);
        }
        put(&l, "]", 1);
        const char *beyond = NULL, *beyond_value = NULL;
        add_int(&l, "header_at_end", pushlet_event_header_at(e, count, &beyond, &beyond_value));
        put_key(&l, "named");
        line named = {0};
        for (size_t i = 0; i < sizeof(named_headers) / sizeof(named_headers[0]); i++) {
            s = pushlet_event_header(e, named_headers[i], &n);
            add_str(&named, named_headers[i], s, s ? n : 0);
        }
        put(&named, "}", 1);
        put(&l, named.p, named.len);
        free(named.p);
    }
    emit(&l);
}

/* What the policy says about a request; NULL when it is to be left unanswered. */
static answer *decide(const pushlet_event_t *e, int kind)
{
    answer *a = calloc(1, sizeof(*a));
    if (!a)
        abort();
    a->request = pushlet_event_request(e);
    a->allow = true;
    pthread_mutex_lock(&policy.lock);
    if (kind == CONNECT) {
        const char *user = pushlet_event_user(e, NULL);
        if (policy.user_header) {
            const char *h = pushlet_event_header(e, policy.user_header, NULL);
            user = h ? h : "";
            a->user = dup_or_null(user);
        }
        a->metadata = dup_or_null(policy.metadata);
        for (int i = 0; i < policy.nusers; i++) {
            if (strcmp(policy.users[i].match, user) == 0) {
                a->allow = false;
                a->status = policy.users[i].status;
                a->reason = dup_or_null(policy.users[i].reason);
                break;
            }
        }
    } else {
        const char *topic = pushlet_event_topic(e, NULL);
        for (int i = 0; i < policy.ntopics; i++) {
            if (topic_matches(policy.topics[i].match, topic)) {
                a->allow = false;
                a->status = 403;
                a->reason = dup_or_null(policy.topics[i].reason);
                break;
            }
        }
    }
    bool hold = policy.hold[kind];
    a->due_ms = now_ms() + policy.delay_ms[kind];
    int delay = policy.delay_ms[kind];
    pthread_mutex_unlock(&policy.lock);
    if (hold) {
        answer_free(a);
        return NULL;
    }
    if (delay == 0)
        a->due_ms = 0; /* at once, on the thread that got the event */
    return a;
}

/* The same for both delivery modes: print the event, then answer a request as the policy says. */
static void on_event(const pushlet_event_t *e, const char *via)
{
    print_event(e, via);
    int type = pushlet_event_type(e);
    if (!(type & AUTH_KINDS))
        return;
    answer *a = decide(e, type == PUSHLET_EVENT_AUTH_CONNECT ? CONNECT : SUBSCRIBE);
    if (!a)
        return;
    if (a->due_ms == 0)
        answer_now(a, via);
    else
        answer_later(a);
}

static void handler(pushlet_t *p, const pushlet_event_t *e, void *userdata)
{
    (void)p;
    (void)userdata;
    on_event(e, "handler");
}

/* ---- The pull queue's thread ----------------------------------------------------------------- */

static int poller_stop; /* atomic */

static void drain(void)
{
    pushlet_event_t *e;
    while ((e = pushlet_event_next(broker)) != NULL) {
        on_event(e, "queue");
        pushlet_event_free(e);
    }
}

static void *poll_thread(void *arg)
{
    struct pollfd pfd = {.fd = pushlet_event_fd(broker), .events = POLLIN};
    while (!__atomic_load_n(&poller_stop, __ATOMIC_ACQUIRE)) {
        pfd.revents = 0;
        if (poll(&pfd, 1, 100) > 0)
            drain();
    }
    drain(); /* what the stop produced (the last DISCONNECTED events) */
    return arg;
}

/* ---- Control commands ------------------------------------------------------------------------ */

/* The next space-separated word of *s (NUL-terminated in place), or "" at the end. */
static char *word(char **s)
{
    char *w = *s + strspn(*s, " ");
    char *end = w + strcspn(w, " ");
    *s = *end ? end + 1 : end;
    *end = '\0';
    return w;
}

static void set_rule(rule *r, const char *match, int status, const char *reason)
{
    r->match = strdup(match);
    r->status = status;
    r->reason = dup_or_null(reason);
}

static int kinds_of(const char *arg, bool *connect, bool *subscribe)
{
    *connect = !*arg || strcmp(arg, "connect") == 0;
    *subscribe = !*arg || strcmp(arg, "subscribe") == 0;
    return *connect || *subscribe ? 0 : -1;
}

static const struct {
    const char *name;
    pushlet_stat_t stat;
} stat_names[] = {
    {"connections", PUSHLET_STAT_CONNECTIONS},
    {"sse_connections", PUSHLET_STAT_SSE_CONNECTIONS},
    {"ws_connections", PUSHLET_STAT_WS_CONNECTIONS},
    {"subscriptions", PUSHLET_STAT_SUBSCRIPTIONS},
    {"topics", PUSHLET_STAT_TOPICS},
    {"connections_total", PUSHLET_STAT_CONNECTIONS_TOTAL},
    {"http_errors", PUSHLET_STAT_HTTP_ERRORS},
    {"rate_limited", PUSHLET_STAT_RATE_LIMITED},
    {"auth_denied", PUSHLET_STAT_AUTH_DENIED},
    {"auth_pending", PUSHLET_STAT_AUTH_PENDING},
    {"auth_timeouts", PUSHLET_STAT_AUTH_TIMEOUTS},
    {"client_messages", PUSHLET_STAT_CLIENT_MESSAGES},
    {"events_dropped", PUSHLET_STAT_EVENTS_DROPPED},
    {"resumes", PUSHLET_STAT_RESUMES},
    {"replayed", PUSHLET_STAT_REPLAYED},
};

/* Runs one control line; adds its outcome to the reply. Returns false for "quit". */
static bool command(char *s, line *reply)
{
    char *cmd = word(&s);
    add_cstr(reply, "cmd", cmd);
    int rc = 0;
    if (strcmp(cmd, "deny-user") == 0 || strcmp(cmd, "deny-topic") == 0) {
        bool user = cmd[5] == 'u';
        char *match = word(&s);
        int status = user ? atoi(word(&s)) : 403;
        pthread_mutex_lock(&policy.lock);
        int *n = user ? &policy.nusers : &policy.ntopics;
        if (*n < MAX_RULES && *match)
            set_rule(&(user ? policy.users : policy.topics)[(*n)++], match, status, s);
        else
            rc = -1;
        pthread_mutex_unlock(&policy.lock);
    } else if (strcmp(cmd, "allow-user-from-header") == 0 || strcmp(cmd, "metadata") == 0) {
        char *value = cmd[0] == 'a' ? word(&s) : s;
        pthread_mutex_lock(&policy.lock);
        char **slot = cmd[0] == 'a' ? &policy.user_header : &policy.metadata;
        free(*slot);
        *slot = dup_or_null(value);
        pthread_mutex_unlock(&policy.lock);
    } else if (strcmp(cmd, "delay-ms") == 0 || strcmp(cmd, "no-answer") == 0) {
        bool hold = cmd[0] == 'n';
        int ms = hold ? 0 : atoi(word(&s));
        bool kinds[2];
        rc = kinds_of(word(&s), &kinds[CONNECT], &kinds[SUBSCRIBE]);
        pthread_mutex_lock(&policy.lock);
        for (int k = 0; k < 2 && rc == 0; k++) {
            if (kinds[k]) {
                policy.hold[k] = hold;
                policy.delay_ms[k] = ms;
            }
        }
        pthread_mutex_unlock(&policy.lock);
    } else if (strcmp(cmd, "reset") == 0) {
        pthread_mutex_lock(&policy.lock);
        for (int i = 0; i < policy.nusers; i++)
            free(policy.users[i].match), free(policy.users[i].reason);
        for (int i = 0; i < policy.ntopics; i++)
            free(policy.topics[i].match), free(policy.topics[i].reason);
        free(policy.user_header);
        free(policy.metadata);
        policy.nusers = policy.ntopics = 0;
        policy.user_header = policy.metadata = NULL;
        policy.delay_ms[CONNECT] = policy.delay_ms[SUBSCRIBE] = 0;
        policy.hold[CONNECT] = policy.hold[SUBSCRIBE] = false;
        pthread_mutex_unlock(&policy.lock);
    } else if (strcmp(cmd, "answer") == 0) {
        answer *a = calloc(1, sizeof(*a));
        a->request = strtoull(word(&s), NULL, 10);
        a->allow = strcmp(word(&s), "allow") == 0;
        if (a->allow) {
            a->user = dup_or_null(word(&s));
            a->metadata = dup_or_null(word(&s));
        } else {
            a->status = atoi(word(&s));
            a->reason = dup_or_null(s);
        }
        answer_now(a, "main"); /* its own line, before this command's reply */
    } else if (strcmp(cmd, "send") == 0 || strcmp(cmd, "send-user") == 0) {
        char *target = word(&s);
        char *event = word(&s);
        if (cmd[4] == '-')
            rc = pushlet_send_user(broker, target, event, s, strlen(s));
        else
            rc = pushlet_send(broker, strtoull(target, NULL, 10), event, s, strlen(s));
    } else if (strcmp(cmd, "close") == 0) {
        uint64_t conn = strtoull(word(&s), NULL, 10);
        int code = atoi(word(&s));
        rc = pushlet_close(broker, conn, code, *s ? s : NULL);
    } else if (strcmp(cmd, "count") == 0) {
        char *topic = word(&s);
        add_cstr(reply, "topic", topic);
        add_int(reply, "n", pushlet_topic_subscribers(broker, topic));
    } else if (strcmp(cmd, "stats") == 0) {
        for (size_t i = 0; i < sizeof(stat_names) / sizeof(stat_names[0]); i++)
            add_int(reply, stat_names[i].name, pushlet_stat(broker, stat_names[i].stat));
    } else if (strcmp(cmd, "quit") == 0) {
        return false;
    } else {
        rc = -1;
        add_cstr(reply, "error", "unknown command");
    }
    add_int(reply, "rc", rc);
    return true;
}

/* ---- Main ------------------------------------------------------------------------------------ */

static int usage(const char *why)
{
    fprintf(stderr,
            "hook_host: %s\nusage: hook_host [--mode callback|queue|split] [--mask N] "
            "[--auth-timeout-ms N] [--jwt-secret S] [--history N] [--max-client-messages N] "
            "[--max-pending-events N] [--int OPT=VALUE] [--probe-disconnect 1]\n",
            why);
    return 2;
}

static int check(int rc, const char *what)
{
    if (rc != 0)
        fprintf(stderr, "hook_host: %s: %s\n", what, pushlet_strerror(rc));
    return rc;
}

/* Integer options by flag; --int OPT=VALUE sets any other by number. */
static const struct {
    const char *flag;
    pushlet_option_t opt;
} int_flags[] = {
    {"--auth-timeout-ms", PUSHLET_OPT_AUTH_TIMEOUT_MS},
    {"--history", PUSHLET_OPT_HISTORY_SIZE},
    {"--max-client-messages", PUSHLET_OPT_MAX_CLIENT_MESSAGES_PER_SEC},
    {"--max-pending-events", PUSHLET_OPT_MAX_PENDING_EVENTS},
};

/* Applies one flag; 0, 1 when the broker refused it, -1 when it is unknown. */
static int apply_flag(const char *flag, const char *val, const char **mode, uint32_t *mask)
{
    if (strcmp(flag, "--mode") == 0) {
        *mode = val;
        return 0;
    }
    if (strcmp(flag, "--mask") == 0) {
        *mask = (uint32_t)strtoul(val, NULL, 0);
        return 0;
    }
    if (strcmp(flag, "--probe-disconnect") == 0) {
        probe_disconnect = atoi(val) != 0;
        return 0;
    }
    if (strcmp(flag, "--jwt-secret") == 0)
        return check(pushlet_set_str(broker, PUSHLET_OPT_JWT_SECRET, val), flag) != 0;
    if (strcmp(flag, "--int") == 0 && strchr(val, '=')) {
        pushlet_option_t opt = (pushlet_option_t)atoi(val);
        return check(pushlet_set_int(broker, opt, atoll(strchr(val, '=') + 1)), val) != 0;
    }
    for (size_t i = 0; i < sizeof(int_flags) / sizeof(int_flags[0]); i++)
        if (strcmp(flag, int_flags[i].flag) == 0)
            return check(pushlet_set_int(broker, int_flags[i].opt, atoll(val)), flag) != 0;
    return -1;
}

int main(int argc, char **argv)
{
    const char *mode = "callback";
    uint32_t mask = PUSHLET_EVENT_ALL & ~(uint32_t)PUSHLET_EVENT_LOG;
    if (check(pushlet_new(&broker), "pushlet_new"))
        return 1;
    int err = check(pushlet_listen(broker, "127.0.0.1", 0), "listen");
    /* The tests publish over HTTP to get message IDs for resumes. */
    err |= check(pushlet_set_int(broker, PUSHLET_OPT_HTTP_PUBLISH, 1), "http publish");
    for (int i = 1; i < argc && !err; i += 2) {
        if (i + 1 >= argc)
            return usage("missing value");
        int rc = apply_flag(argv[i], argv[i + 1], &mode, &mask);
        if (rc < 0)
            return usage(argv[i]);
        err |= rc;
    }
    bool callback = strcmp(mode, "callback") == 0, queue = strcmp(mode, "queue") == 0;
    bool split = strcmp(mode, "split") == 0;
    if (!callback && !queue && !split)
        return usage("--mode must be callback, queue or split");
    if (callback || split)
        err |= check(
            pushlet_set_event_handler(broker, handler, split ? mask & AUTH_KINDS : mask, NULL),
            "set_event_handler");
    if (queue || split)
        err |= check(pushlet_events_enable(broker, mask), "events_enable");
    if (err || check(pushlet_start(broker), "start"))
        return 1;

    pthread_t answerer, poller;
    pthread_create(&answerer, NULL, answer_thread, NULL);
    if (!callback)
        pthread_create(&poller, NULL, poll_thread, NULL);
    pthread_mutex_lock(&out_lock);
    printf("PORT %d\n", pushlet_port(broker));
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);

    char *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    int seq = 0;
    bool more = true;
    while (more && (n = getline(&buf, &cap, stdin)) >= 0) {
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
            buf[--n] = '\0';
        line reply = {0};
        more = command(buf, &reply);
        add_int(&reply, "seq", ++seq);
        if (more)
            emit(&reply);
        else
            free(reply.p);
    }
    free(buf);

    /* Stop first: closing the connections produces the last events, which must still arrive. */
    int stop_rc = pushlet_stop(broker);
    if (!callback) {
        __atomic_store_n(&poller_stop, 1, __ATOMIC_RELEASE);
        pthread_join(poller, NULL);
    }
    pthread_mutex_lock(&later.lock);
    later.stop = true;
    pthread_cond_signal(&later.cond);
    pthread_mutex_unlock(&later.lock);
    pthread_join(answerer, NULL);
    line bye = {0};
    add_cstr(&bye, "cmd", "quit");
    add_int(&bye, "rc", stop_rc);
    add_int(&bye, "seq", ++seq);
    emit(&bye);
    return check(pushlet_free(broker), "pushlet_free") ? 1 : 0;
}
