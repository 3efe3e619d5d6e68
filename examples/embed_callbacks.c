/* Embedding Pushlet with an event handler (callbacks on the broker's loop thread).
 *
 * - Auth: a client must say who it is, with ?user=NAME or a cookie "user=NAME" (letters,
 *   digits, '-' and '_'); everyone else gets 401. Nobody may subscribe to topics under
 *   "private/" (403 for SSE, an `error` reply for a WebSocket subscribe command).
 * - Lifecycle: connections and subscriptions are logged to stdout.
 * - Client messages: whatever a WebSocket client sends (that is no subscribe/unsubscribe/ping
 *   command) is sent back to it as an "echo" event.
 * - The main thread publishes a "tick" on topic "ticks" every second until SIGINT/SIGTERM.
 *
 * Build: cc embed_callbacks.c $(pkg-config --cflags --libs pushlet)
 * Run:   ./embed_callbacks [--port N]      (or PORT=N; default 8080, 0 = any free port)
 * See examples/README.md for what to try. */
#include <pushlet.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static const char *transport_name(const pushlet_event_t *e)
{
    return pushlet_event_transport(e) == PUSHLET_TRANSPORT_WS ? "websocket" : "sse";
}

/* Runs on the broker's loop thread: it must not block. Every call used here is "Thread: any"
 * and returns at once; the event is ours only until we return. */
static void on_event(pushlet_t *p, const pushlet_event_t *e, void *userdata)
{
    (void)userdata;
    uint64_t conn = pushlet_event_connection(e);
    const char *user = pushlet_event_user(e, NULL);
    size_t len;

    switch (pushlet_event_type(e)) {
    case PUSHLET_EVENT_AUTH_CONNECT: {
        char name[64];
        const char *query = pushlet_event_query(e, &len);
        const char *cookie = pushlet_event_header(e, "Cookie", NULL);
        int found = find_param(query, len, "user", '&', name, sizeof(name)) ||
                    (cookie && find_param(cookie, strlen(cookie), "user", ';', name, sizeof(name)));
        if (found && good_name(name))
            pushlet_allow(p, pushlet_event_request(e), name, NULL); /* answered right here */
        else
            pushlet_deny(p, pushlet_event_request(e), 401, "add ?user=NAME or a user cookie");
        break;
    }
    case PUSHLET_EVENT_AUTH_SUBSCRIBE: {
        const char *topic = pushlet_event_topic(e, NULL);
        if (strncmp(topic, "private/", 8) == 0)
            pushlet_deny(p, pushlet_event_request(e), 403, "private topics are not for you");
        else
            pushlet_allow(p, pushlet_event_request(e), NULL, NULL);
        break;
    }
    case PUSHLET_EVENT_CONNECTED:
        printf("connected     #%llu %s user=%s\n", (unsigned long long)conn, transport_name(e),
               user);
        break;
    case PUSHLET_EVENT_DISCONNECTED:
        printf("disconnected  #%llu (%s)\n", (unsigned long long)conn, pushlet_event_text(e, NULL));
        break;
    case PUSHLET_EVENT_SUBSCRIBED:
        printf("subscribed    #%llu %s\n", (unsigned long long)conn, pushlet_event_topic(e, NULL));
        break;
    case PUSHLET_EVENT_UNSUBSCRIBED:
        printf("unsubscribed  #%llu %s\n", (unsigned long long)conn, pushlet_event_topic(e, NULL));
        break;
    case PUSHLET_EVENT_MESSAGE: {
        const char *text = pushlet_event_text(e, &len); /* may hold NUL bytes: use len */
        printf("message       #%llu %zu bytes\n", (unsigned long long)conn, len);
        pushlet_send(p, conn, "echo", text, len); /* copied; delivered after we return */
        break;
    }
    }
    fflush(stdout);
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
    pushlet_set_event_handler(p, on_event, PUSHLET_EVENT_ALL & ~PUSHLET_EVENT_LOG, NULL);

    /* Block the stop signals before any thread starts (the broker's thread inherits the mask),
     * then take them synchronously below: no async-signal-safety worries. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    int rc = pushlet_start(p);
    if (rc != 0) {
        fprintf(stderr, "start: %s\n", pushlet_strerror(rc));
        pushlet_free(p);
        return 1;
    }
    printf("listening on http://127.0.0.1:%d\n", pushlet_port(p));
    fflush(stdout);

    /* Wait up to a second for a signal; on each timeout publish a tick. */
    struct timespec second = {1, 0};
    for (unsigned long n = 1;; n++) {
        int sig = sigtimedwait(&stop, NULL, &second);
        if (sig == SIGINT || sig == SIGTERM)
            break;
        char tick[32];
        int len = snprintf(tick, sizeof(tick), "%lu", n);
        pushlet_publish(p, "ticks", "tick", tick, (size_t)len); /* any thread, never blocks */
    }
    printf("stopping\n");
    pushlet_free(p); /* stops gracefully: queued output is sent, streams end */
    return 0;
}
