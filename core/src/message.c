/* Refcounted buffers and messages. A message is encoded once per wire format; every connection
 * that gets it queues a reference to that one buffer. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

pl_buf *pl_buf_new(size_t len)
{
    if (len > UINT32_MAX)
        return NULL;
    pl_buf *b = malloc(sizeof(*b) + len);
    if (!b)
        return NULL;
    b->refs = 1;
    b->len = (uint32_t)len;
    return b;
}

pl_buf *pl_buf_from(const char *data, size_t len)
{
    pl_buf *b = pl_buf_new(len);
    if (b)
        memcpy(b->data, data, len);
    return b;
}

void pl_buf_unref(pl_buf *b)
{
    if (b && --b->refs == 0)
        free(b);
}

pl_msg *pl_msg_new(const char *topic, size_t topic_len, const char *event, size_t event_len,
                   const char *data, size_t data_len)
{
    if (topic_len > UINT16_MAX || event_len > UINT16_MAX || data_len > UINT32_MAX)
        return NULL;
    pl_msg *m = malloc(sizeof(*m) + topic_len + event_len + data_len + 3);
    if (!m)
        return NULL;
    memset(m, 0, sizeof(*m));
    m->refs = 1;
    m->topic_len = (uint16_t)topic_len;
    m->event_len = (uint16_t)event_len;
    m->data_len = (uint32_t)data_len;
    m->topic = m->storage;
    m->event = m->topic + topic_len + 1;
    m->data = m->event + event_len + 1;
    if (topic_len)
        memcpy(m->topic, topic, topic_len);
    m->topic[topic_len] = '\0';
    memcpy(m->event, event, event_len);
    m->event[event_len] = '\0';
    if (data_len)
        memcpy(m->data, data, data_len);
    m->data[data_len] = '\0';
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->published_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    return m;
}

void pl_msg_unref(pl_msg *m)
{
    if (m && --m->refs == 0) {
        for (int i = 0; i < PL_FMT_COUNT; i++)
            pl_buf_unref(m->enc[i]);
        free(m->user);
        free(m);
    }
}
