/* Our libuv adapter for hiredis async contexts.
 *
 * hiredis 0.14's own adapter (adapters/libuv.h) returns early when uv_poll reports an error, so
 * a refused or reset connection is never handed to hiredis: its callbacks stay pending and the
 * context leaks. libuv reports POLLERR as status UV_EBADF and stops the watcher; we pass it on
 * as the events we were waiting for, so hiredis's read or write meets the socket error itself
 * and frees the context (hiredis 1.x does the same). */
#include "redis.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>

typedef struct adapter {
    uv_poll_t poll;
    redisAsyncContext *ac; /* NULL once hiredis's cleanup hook ran */
    int events;            /* UV_READABLE | UV_WRITABLE wanted by hiredis */
    void (*on_gone)(void *ud, redisAsyncContext *ac);
    void (*on_closed)(void *ud);
    void *ud;
} adapter;

static void on_poll(uv_poll_t *h, int status, int events)
{
    adapter *a = h->data;
    if (status < 0)
        events = a->events; /* libuv stopped the watcher: let hiredis find the error */
    /* Write first: on a connecting socket that is where hiredis checks the connect result. The
     * context may be freed by either call (the cleanup hook clears a->ac). */
    if (a->ac != NULL && (events & UV_WRITABLE))
        redisAsyncHandleWrite(a->ac);
    if (a->ac != NULL && (events & UV_READABLE))
        redisAsyncHandleRead(a->ac);
}

static void update(adapter *a)
{
    if (a->events != 0)
        uv_poll_start(&a->poll, a->events, on_poll);
    else
        uv_poll_stop(&a->poll);
}

static void add_read(void *priv)
{
    adapter *a = priv;
    a->events |= UV_READABLE;
    update(a);
}

static void del_read(void *priv)
{
    adapter *a = priv;
    a->events &= ~UV_READABLE;
    update(a);
}

static void add_write(void *priv)
{
    adapter *a = priv;
    a->events |= UV_WRITABLE;
    update(a);
}

static void del_write(void *priv)
{
    adapter *a = priv;
    a->events &= ~UV_WRITABLE;
    update(a);
}

static void on_close(uv_handle_t *h)
{
    adapter *a = h->data;
    void (*closed)(void *) = a->on_closed;
    void *ud = a->ud;
    free(a);
    if (closed != NULL)
        closed(ud);
}

/* hiredis calls this from its free path, for contexts that connected and for those that never
 * did (then without onDisconnect): the owner must forget the context here. */
static void cleanup(void *priv)
{
    adapter *a = priv;
    redisAsyncContext *ac = a->ac;
    a->ac = NULL;
    a->events = 0;
    if (ac != NULL) {
        ac->ev.data = NULL;
        if (a->on_gone != NULL)
            a->on_gone(a->ud, ac);
    }
    uv_close((uv_handle_t *)&a->poll, on_close);
}

int pl_redis_uv_attach(redisAsyncContext *ac, uv_loop_t *loop,
                       void (*on_gone)(void *ud, redisAsyncContext *ac),
                       void (*on_closed)(void *ud), void *ud)
{
    if (ac->ev.data != NULL)
        return UV_EBUSY;
    adapter *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return UV_ENOMEM;
    int rc = uv_poll_init(loop, &a->poll, ac->c.fd);
    if (rc != 0) {
        free(a);
        return rc;
    }
    a->poll.data = a;
    a->ac = ac;
    a->on_gone = on_gone;
    a->on_closed = on_closed;
    a->ud = ud;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    ac->ev.data = a;
    return 0;
}
