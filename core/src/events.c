/* Logging and the pull queue. A log record goes to the host's callback (if any) and, when the
 * host asked for it, into a bounded queue whose eventfd is readable while events are pending:
 * the form that Python, Lua and Node use, since they cannot be called from our thread. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
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

pushlet_event_t *pl_event_new(int type, const char *const str[PL_EV_FIELDS],
                              const size_t len[PL_EV_FIELDS], const pl_http_req *r)
{
    size_t n[PL_EV_FIELDS], bytes = 1; /* data[0]: the empty string of absent fields */
    for (int i = 0; i < PL_EV_FIELDS; i++) {
        n[i] = !str[i] ? 0 : len ? len[i] : strlen(str[i]);
        bytes += str[i] ? n[i] + 1 : 0;
    }
    uint32_t nheaders = r ? r->nheaders : 0;
    for (uint32_t i = 0; i < nheaders; i++)
        bytes += r->names[i].len + 1 + r->values[i].len + 1;
    size_t spans = 2 * (size_t)nheaders * sizeof(pl_span);
    pushlet_event_t *e = malloc(sizeof(*e) + spans + bytes);
    if (!e)
        return NULL;
    memset(e, 0, sizeof(*e));
    e->type = type;
    e->nheaders = nheaders;
    e->headers = (pl_span *)(void *)e->data; /* the spans come first: pl_span is 4-aligned */
    char *base = e->data + spans;
    size_t at = 1;
    base[0] = '\0';
    for (int i = 0; i < PL_EV_FIELDS; i++) {
        if (!str[i])
            continue;
        memcpy(base + at, str[i], n[i]);
        base[at + n[i]] = '\0';
        e->field[i] = (pl_span){(uint32_t)(spans + at), (uint32_t)n[i]};
        at += n[i] + 1;
    }
    for (uint32_t i = 0; i < nheaders; i++) {
        for (int k = 0; k < 2; k++) {
            const pl_span *src = k ? &r->values[i] : &r->names[i];
            memcpy(base + at, r->head + src->off, src->len);
            base[at + src->len] = '\0';
            e->headers[2 * i + (uint32_t)k] = (pl_span){(uint32_t)(spans + at), src->len};
            at += src->len + 1;
        }
    }
    for (int i = 0; i < PL_EV_FIELDS; i++)
        if (!str[i])
            e->field[i] = (pl_span){(uint32_t)spans, 0};
    return e;
}

static pushlet_event_t *make_log_event(int level, const char *component, const char *text,
                                       size_t len)
{
    const char *str[PL_EV_FIELDS] = {[PL_EV_TEXT] = text};
    size_t lens[PL_EV_FIELDS] = {[PL_EV_TEXT] = len};
    pushlet_event_t *e = pl_event_new(PUSHLET_EVENT_LOG, str, lens, NULL);
    if (!e)
        return NULL;
    e->level = level;
    snprintf(e->component, sizeof(e->component), "%s", component);
    return e;
}

bool pl_events_push(pl_events *ev, pushlet_event_t *e)
{
    pushlet_event_t *note = NULL;
    uv_mutex_lock(&ev->mu);
    bool was_empty = ev->count == 0;
    if (ev->count >= ev->max_count) {
        ev->dropped++;
        uv_mutex_unlock(&ev->mu);
        free(e);
        pushlet_t *p = pl_container_of(ev, pushlet_t, events);
        PL_STAT_ADD_SHARED(p, PUSHLET_STAT_EVENTS_DROPPED, 1);
        return false;
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
    return true;
}

static void log_va(pushlet_t *p, uint64_t conn, int level, const char *component,
                   const char *suffix, const char *fmt, va_list ap) PL_PRINTF(6, 0);

void pl_log(pushlet_t *p, int level, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_va(p, 0, level, component, "", fmt, ap);
    va_end(ap);
}

void pl_log_conn(const pl_conn *c, int level, const char *component, const char *fmt, ...)
{
    /* Structured fields in logfmt style, after the message. */
    char fields[160];
    snprintf(fields, sizeof(fields), " conn=%llu%s%.*s", (unsigned long long)c->id,
             c->user ? " user=" : "", c->user ? (int)(c->user_len > 64 ? 64 : c->user_len) : 0,
             c->user ? c->user : "");
    va_list ap;
    va_start(ap, fmt);
    log_va(c->p, c->id, level, component, fields, fmt, ap);
    va_end(ap);
}

static void log_va(pushlet_t *p, uint64_t conn, int level, const char *component,
                   const char *suffix, const char *fmt, va_list ap)
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
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof(text) ? (size_t)n : sizeof(text) - 1;
    n = snprintf(text + len, sizeof(text) - len, "%s", suffix);
    len += n < 0 ? 0 : (size_t)n < sizeof(text) - len ? (size_t)n : sizeof(text) - len - 1;
    if (to_fn)
        fn(level, component, text, len, ud);
    if (to_queue) {
        pushlet_event_t *e = make_log_event(level, component, text, len);
        if (e) {
            e->connection = conn;
            pl_events_push(&p->events, e);
        }
    }
}

/* ---- Public pull API ---------------------------------------------------------------------- */

int pushlet_events_enable(pushlet_t *p, uint32_t mask)
{
    if (!p || (mask & ~(uint32_t)PUSHLET_EVENT_ALL))
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
uint64_t pushlet_event_request(const pushlet_event_t *e) { return e ? e->request : 0; }
uint64_t pushlet_event_connection(const pushlet_event_t *e) { return e ? e->connection : 0; }
int pushlet_event_transport(const pushlet_event_t *e) { return e ? e->transport : 0; }
int pushlet_event_binary(const pushlet_event_t *e) { return e ? e->binary : 0; }

static const char *field(const pushlet_event_t *e, int which, size_t *len)
{
    if (len)
        *len = e ? e->field[which].len : 0;
    return e ? e->data + e->field[which].off : "";
}

const char *pushlet_event_text(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_TEXT, len);
}
const char *pushlet_event_user(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_USER, len);
}
const char *pushlet_event_metadata(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_META, len);
}
const char *pushlet_event_topic(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_TOPIC, len);
}
const char *pushlet_event_method(const pushlet_event_t *e) { return field(e, PL_EV_METHOD, NULL); }
const char *pushlet_event_path(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_PATH, len);
}
const char *pushlet_event_query(const pushlet_event_t *e, size_t *len)
{
    return field(e, PL_EV_QUERY, len);
}
const char *pushlet_event_remote(const pushlet_event_t *e) { return field(e, PL_EV_REMOTE, NULL); }

size_t pushlet_event_header_count(const pushlet_event_t *e) { return e ? e->nheaders : 0; }

int pushlet_event_header_at(const pushlet_event_t *e, size_t i, const char **name,
                            const char **value)
{
    if (!e || i >= e->nheaders)
        return 0;
    if (name)
        *name = e->data + e->headers[2 * i].off;
    if (value)
        *value = e->data + e->headers[2 * i + 1].off;
    return 1;
}

const char *pushlet_event_header(const pushlet_event_t *e, const char *name, size_t *len)
{
    for (size_t i = 0; e && name && i < e->nheaders; i++) {
        if (strcasecmp(e->data + e->headers[2 * i].off, name) == 0) {
            if (len)
                *len = e->headers[2 * i + 1].len;
            return e->data + e->headers[2 * i + 1].off;
        }
    }
    if (len)
        *len = 0;
    return NULL;
}

void pushlet_event_free(pushlet_event_t *e) { free(e); }
