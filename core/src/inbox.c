/* The one way other threads hand work to the loop (the h2o pattern): a mutex-guarded list; the
 * loop is woken only when the list turns non-empty and then takes the whole list at once. */
#include "internal.h"

#include <stdlib.h>

int pl_inbox_init(pl_inbox *q)
{
    q->head = NULL;
    q->tail = &q->head;
    q->count = q->bytes = 0;
    q->max_count = q->max_bytes = 0;
    q->open = false;
    q->wake = NULL;
    return uv_mutex_init(&q->mu) == 0 ? 0 : PUSHLET_ESYSTEM;
}

static void free_list(pl_msg *m)
{
    while (m) {
        pl_msg *next = m->next;
        pl_msg_unref(m);
        m = next;
    }
}

void pl_inbox_destroy(pl_inbox *q)
{
    free_list(q->head);
    uv_mutex_destroy(&q->mu);
}

void pl_inbox_open(pl_inbox *q, uv_async_t *wake, size_t max_count, size_t max_bytes,
                   size_t max_data)
{
    uv_mutex_lock(&q->mu);
    q->max_data = max_data;
    q->wake = wake;
    q->max_count = max_count;
    q->max_bytes = max_bytes;
    q->open = true;
    uv_mutex_unlock(&q->mu);
}

void pl_inbox_close(pl_inbox *q)
{
    uv_mutex_lock(&q->mu);
    q->open = false;
    q->wake = NULL;
    uv_mutex_unlock(&q->mu);
}

static size_t msg_bytes(const pl_msg *m)
{
    return sizeof(*m) + m->topic_len + m->event_len + m->data_len;
}

int pl_inbox_push(pl_inbox *q, pl_msg *m)
{
    size_t bytes = msg_bytes(m);
    int rc = 0;
    m->next = NULL;
    uv_mutex_lock(&q->mu);
    if (!q->open) {
        rc = PUSHLET_ESTOPPED;
    } else if (m->data_len > q->max_data || bytes > q->max_bytes) {
        rc = PUSHLET_ETOOBIG; /* could never fit: "retry later" would spin forever */
    } else if (q->count >= q->max_count || q->bytes + bytes > q->max_bytes) {
        rc = PUSHLET_EFULL;
    } else {
        bool was_empty = q->head == NULL;
        *q->tail = m;
        q->tail = &m->next;
        q->count++;
        q->bytes += bytes;
        /* Signalled under the lock so the loop cannot close the handle in between. */
        if (was_empty)
            uv_async_send(q->wake);
    }
    uv_mutex_unlock(&q->mu);
    return rc;
}

pl_msg *pl_inbox_take_all(pl_inbox *q)
{
    uv_mutex_lock(&q->mu);
    pl_msg *list = q->head;
    q->head = NULL;
    q->tail = &q->head;
    q->count = q->bytes = 0;
    uv_mutex_unlock(&q->mu);
    return list;
}
