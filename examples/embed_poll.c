/* Embedding Pushlet with the pull queue: the host's own poll() loop takes the events, as a
 * Python, Lua or Node binding would (no code of ours runs on the broker's thread).
 *
 * Same behaviour as embed_callbacks.c:
 * - Auth: ?user=NAME or a cookie "user=NAME" (else 401), answered at once in the loop.
 *   Subscriptions are checked by a separate "lookup" thread, as if it asked a database: the
 *   loop hands the request over and goes on; the thread answers with pushlet_allow() /
 *   pushlet_deny() from its own thread. Topics under "private/" are refused.
 * - Lifecycle logged to stdout; WebSocket client messages echoed back as "echo" events.
 * - A "tick" on topic "ticks" every second; SIGINT/SIGTERM (through a signalfd) stop it.
 *
 * Build: cc embed_poll.c $(pkg-config --cflags --libs pushlet)
 * Run:   ./embed_poll [--port N]      (or PORT=N; default 8080, 0 = any free port) */
#include <pushlet.h>

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

/* ---- the lookup thread: answers subscribe requests later, from another thread ---------- */

typedef struct lookup {
    struct lookup *next;
    uint64_t request;
    char topic[160];
} lookup;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static lookup *pending; /* LIFO is fine: each request is answered on its own */
static int quitting;

static void *lookup_main(void *arg)
{
    pushlet_t *p = arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (!pending && !quitting)
            pthread_cond_wait(&wake, &lock);
        lookup *l = pending;
        if (l)
            pending = l->next;
        pthread_mutex_unlock(&lock);
        if (!l) /* quitting: unanswered requests are denied by the broker when it stops */
            return NULL;

        nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL); /* "the database" */
        int rc = strncmp(l->topic, "private/", 8) == 0
                     ? pushlet_deny(p, l->request, 403, "private topics are not for you")
                     : pushlet_allow(p, l->request, NULL, NULL);
        if (rc == PUSHLET_ENOENT) /* the client left or the request timed out: harmless */
            printf("late answer for request %llu\n", (unsigned long long)l->request);
        free(l);
    }
}

static void defer_subscribe(const pushlet_event_t *e)
{
    lookup *l = calloc(1, sizeof(*l));
    if (!l)
        return; /* unanswered: the broker denies it after PUSHLET_OPT_AUTH_TIMEOUT_MS */
    l->request = pushlet_event_request(e);
    snprintf(l->topic, sizeof(l->topic), "%s", pushlet_event_topic(e, NULL));
    pthread_mutex_lock(&lock);
    l->next = pending;
    pending = l;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
}

/* ---- the event loop -------------------------------------------------------------------- */

/* Copy the value of `name` from "a=1&name=v&..." or "a=1; name=v; ..." into out. */
static int find_param(const char *s, size_t len, const char *name, char sep, char *out, size_t cap)
{
    size_t nlen = strlen(name);
    const char *end = s + len;
    while (s < end) {
        while (s < end && (*s == ' ' || *s == sep))
            s++;
        const char *item = s;
        while (s < end && *s != sep)
            s++;
        if ((size_t)(s - item) > nlen && memcmp(item, name, nlen) == 0 && item[nlen] == '=') {
            size_t vlen = (size_t)(s - item) - nlen - 1;
            if (vlen == 0 || vlen >= cap)
                return 0;
            memcpy(out, item + nlen + 1, vlen);
            out[vlen] = '\0';
            return 1;
        }
    }
    return 0;
}

static int good_name(const char *u)
{
    for (const char *c = u; *c; c++)
        if (!(('a' <= *c && *c <= 'z') || ('A' <= *c && *c <= 'Z') || ('0' <= *c && *c <= '9') ||
              *c == '-' || *c == '_'))
            return 0;
    return *u != '\0';
}

static void handle(pushlet_t *p, const pushlet_event_t *e)
{
    unsigned long long conn = (unsigned long long)pushlet_event_connection(e);
    size_t len;
    switch (pushlet_event_type(e)) {
    case PUSHLET_EVENT_AUTH_CONNECT: {
        char name[64];
        const char *query = pushlet_event_query(e, &len);
        const char *cookie = pushlet_event_header(e, "Cookie", NULL);
        int found = find_param(query, len, "user", '&', name, sizeof(name)) ||
                    (cookie && find_param(cookie, strlen(cookie), "user", ';', name, sizeof(name)));
        if (found && good_name(name))
            pushlet_allow(p, pushlet_event_request(e), name, NULL);
        else
            pushlet_deny(p, pushlet_event_request(e), 401, "add ?user=NAME or a user cookie");
        break;
    }
    case PUSHLET_EVENT_AUTH_SUBSCRIBE: defer_subscribe(e); break;
    case PUSHLET_EVENT_CONNECTED:
        printf("connected     #%llu %s user=%s\n", conn,
               pushlet_event_transport(e) == PUSHLET_TRANSPORT_WS ? "websocket" : "sse",
               pushlet_event_user(e, NULL));
        break;
    case PUSHLET_EVENT_DISCONNECTED:
        printf("disconnected  #%llu (%s)\n", conn, pushlet_event_text(e, NULL));
        break;
    case PUSHLET_EVENT_SUBSCRIBED:
        printf("subscribed    #%llu %s\n", conn, pushlet_event_topic(e, NULL));
        break;
    case PUSHLET_EVENT_UNSUBSCRIBED:
        printf("unsubscribed  #%llu %s\n", conn, pushlet_event_topic(e, NULL));
        break;
    case PUSHLET_EVENT_MESSAGE: {
        const char *text = pushlet_event_text(e, &len);
        printf("message       #%llu %zu bytes\n", conn, len);
        pushlet_send(p, pushlet_event_connection(e), "echo", text, len);
        break;
    }
    case PUSHLET_EVENT_LOG:
        printf("log [%s] %s\n", pushlet_event_component(e), pushlet_event_text(e, NULL));
        break;
    }
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int port_option(int argc, char **argv)
{
    const char *v = getenv("PORT");
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--port") == 0)
            v = argv[i + 1];
    return v ? atoi(v) : 8080;
}

int main(int argc, char **argv)
{
    pushlet_t *p;
    if (pushlet_new(&p) != 0)
        return 1;
    pushlet_listen(p, "127.0.0.1", port_option(argc, argv));
    pushlet_events_enable(p, PUSHLET_EVENT_ALL); /* LOG too: the records come as events */

    /* Signals arrive as readable data on a signalfd; block them before any thread starts so
     * that no thread (the broker's included) takes them the default way. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    int sigfd = signalfd(-1, &stop, SFD_CLOEXEC);

    pthread_t lookup_thread;
    if (sigfd < 0 || pthread_create(&lookup_thread, NULL, lookup_main, p) != 0)
        return 1;
    int rc = pushlet_start(p);
    if (rc != 0) {
        fprintf(stderr, "start: %s\n", pushlet_strerror(rc));
        return 1;
    }
    printf("listening on http://127.0.0.1:%d\n", pushlet_port(p));
    fflush(stdout);

    struct pollfd fds[2] = {{pushlet_event_fd(p), POLLIN, 0}, {sigfd, POLLIN, 0}};
    long long next_tick = now_ms() + 1000;
    unsigned long ticks = 0;
    for (;;) {
        long long wait = next_tick - now_ms();
        if (poll(fds, 2, wait > 0 ? (int)wait : 0) < 0)
            continue; /* EINTR */
        if (fds[1].revents & POLLIN)
            break;
        if (fds[0].revents & POLLIN) {
            /* drain: the fd stays readable while events are pending */
            pushlet_event_t *e;
            while ((e = pushlet_event_next(p)) != NULL) {
                handle(p, e);
                pushlet_event_free(e); /* the event is ours */
            }
            fflush(stdout);
        }
        if (now_ms() >= next_tick) {
            char tick[32];
            int len = snprintf(tick, sizeof(tick), "%lu", ++ticks);
            pushlet_publish(p, "ticks", "tick", tick, (size_t)len);
            next_tick += 1000;
        }
    }
    printf("stopping\n");

    /* The lookup thread answers through p: end it before p is freed. */
    pthread_mutex_lock(&lock);
    quitting = 1;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    pthread_join(lookup_thread, NULL);
    pushlet_free(p); /* graceful stop; requests still unanswered are denied */
    for (lookup *l = pending, *next; l; l = next) {
        next = l->next;
        free(l);
    }
    close(sigfd);
    return 0;
}
