/* Logging and the pull queue. A log record goes to the host's callback (if any) and, when the
 * host asked for it, into a bounded queue whose eventfd is readable while events are pending:
 * the form that Python, Lua and Node use, since they cannot be called from our thread. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int pl_events_init(pl_events *ev)
{
    memset(ev, 0, sizeof(*ev));
    ev->tail = &ev->head;
    ev->max_count = 4096;
    ev->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ev->fd < 0)
        return PUSHLET_ESYSTEM;
    if (uv_mutex_init(&ev->mu) != 0) {
        close(ev->fd);
        return PUSHLET_ESYSTEM;
    }
    return 0;
}

void pl_events_destroy(pl_events *ev)
{
    pushlet_event_t *e = ev->head;
    while (e) {
        pushlet_event_t *next = e->next;
        free(e);
        e = next;
    }
    close(ev->fd);
    uv_mutex_destroy(&ev->mu);
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    ssize_t rc;
    do
        rc = write(fd, &one, sizeof(one));
    while (rc < 0 && errno == EINTR);
}

static void drain_fd(int fd)
{
    uint64_t v;
    ssize_t rc;
    do
        rc = read(fd, &v, sizeof(v));
    while (rc < 0 && errno == EINTR);
}

static pushlet_event_t *make_log_event(int level, const char *component, const char *text,
                                       size_t len)
{
    pushlet_event_t *e = malloc(sizeof(*e) + len + 1);
    if (!e)
        return NULL;
    e->next = NULL;
    e->type = PUSHLET_EVENT_LOG;
    e->level = level;
    snprintf(e->component, sizeof(e->component), "%s", component);
    e->len = len;
    memcpy(e->text, text, len);
    e->text[len] = '\0';
    return e;
}

void pl_events_push(pl_events *ev, pushlet_event_t *e)
{
    pushlet_event_t *note = NULL;
    uv_mutex_lock(&ev->mu);
    bool was_empty = ev->count == 0;
    if (ev->count >= ev->max_count) {
        ev->dropped++;
        uv_mutex_unlock(&ev->mu);
        free(e);
        return;
    }
    if (ev->dropped && ev->count + 1 < ev->max_count) {
        /* Tell the host, in order, that it missed some: never a silent gap. */
        char text[96];
        int n = snprintf(text, sizeof(text), "event queue full: %zu events dropped", ev->dropped);
        note = make_log_event(PUSHLET_LOG_WARN, "events", text, (size_t)n);
        if (note) {
            ev->dropped = 0;
            *ev->tail = note;
            ev->tail = &note->next;
            ev->count++;
        }
    }
    *ev->tail = e;
    ev->tail = &e->next;
    ev->count++;
    if (was_empty)
        signal_fd(ev->fd);
    uv_mutex_unlock(&ev->mu);
}

void pl_log(pushlet_t *p, int level, const char *component, const char *fmt, ...)
{
    int queue_level = __atomic_load_n(&p->log_level, __ATOMIC_RELAXED);
    bool to_queue = level >= queue_level &&
                    (__atomic_load_n(&p->events.mask, __ATOMIC_RELAXED) & PUSHLET_EVENT_LOG);
    uv_mutex_lock(&p->log_mu);
    pushlet_log_fn fn = p->log_fn;
    void *ud = p->log_ud;
    bool to_fn = fn && level >= p->log_fn_level;
    uv_mutex_unlock(&p->log_mu);
    if (!to_fn && !to_queue)
        return;

    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof(text) ? (size_t)n : sizeof(text) - 1;
    if (to_fn)
        fn(level, component, text, len, ud);
    if (to_queue) {
        pushlet_event_t *e = make_log_event(level, component, text, len);
        if (e)
            pl_events_push(&p->events, e);
    }
}

/* ---- Public pull API ---------------------------------------------------------------------- */

int pushlet_events_enable(pushlet_t *p, uint32_t mask)
{
    if (!p || (mask & ~(uint32_t)PUSHLET_EVENT_LOG))
        return PUSHLET_EINVAL;
    __atomic_store_n(&p->events.mask, mask, __ATOMIC_RELAXED);
    return 0;
}

int pushlet_event_fd(const pushlet_t *p) { return p ? p->events.fd : -1; }

pushlet_event_t *pushlet_event_next(pushlet_t *p)
{
    if (!p)
        return NULL;
    pl_events *ev = &p->events;
    uv_mutex_lock(&ev->mu);
    pushlet_event_t *e = ev->head;
    if (e) {
        ev->head = e->next;
        if (!ev->head)
            ev->tail = &ev->head;
        ev->count--;
        e->next = NULL;
    }
    if (!ev->head)
        drain_fd(ev->fd); /* level-triggered: readable exactly while events are pending */
    uv_mutex_unlock(&ev->mu);
    return e;
}

int pushlet_event_type(const pushlet_event_t *e) { return e ? e->type : 0; }
int pushlet_event_log_level(const pushlet_event_t *e) { return e ? e->level : 0; }
const char *pushlet_event_component(const pushlet_event_t *e) { return e ? e->component : ""; }

const char *pushlet_event_text(const pushlet_event_t *e, size_t *len)
{
    if (len)
        *len = e ? e->len : 0;
    return e ? e->text : "";
}

void pushlet_event_free(pushlet_event_t *e) { free(e); }
