/* Topic registry: an open-addressing hash table of topics, each with a dense subscriber array
 * for fast fan-out. A subscription is recorded on both sides with each side's index into the
 * other, so subscribe and unsubscribe are O(1). A topic is freed once nothing holds it: no
 * subscriber and no message kept in its history. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

bool pl_name_valid(const char *name, size_t len, size_t max, const char *extra)
{
    if (len == 0 || len > max)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)name[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || (ch && strchr(extra, ch) != NULL);
        if (!ok)
            return false;
    }
    return true;
}

bool pl_topic_name_valid(const char *name, size_t len)
{
    return pl_name_valid(name, len, 128, "-_.:/@~!+=");
}

/* FNV-1a: topic names are short and come from clients, and the table is private per broker. */
static uint32_t hash_name(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

void pl_topics_init(pl_topics *t) { memset(t, 0, sizeof(*t)); }

/* Structural changes and subscriber counts are written under t->mu (when set) so that other
 * threads can read a topic's count; the loop thread, the only writer, reads without it. */
static void lock(const pl_topics *t)
{
    if (t->mu)
        uv_mutex_lock(t->mu);
}

static void unlock(const pl_topics *t)
{
    if (t->mu)
        uv_mutex_unlock(t->mu);
}

void pl_topics_destroy(pl_topics *t)
{
    for (uint32_t i = 0; i < t->cap; i++) {
        if (t->slots[i]) {
            free(t->slots[i]->subs);
            free(t->slots[i]->ring);
            free(t->slots[i]);
        }
    }
    free(t->slots);
    memset(t, 0, sizeof(*t));
}

static uint32_t probe(const pl_topics *t, const char *name, size_t len, uint32_t h)
{
    uint32_t mask = t->cap - 1;
    for (uint32_t i = h & mask;; i = (i + 1) & mask) {
        pl_topic *tp = t->slots[i];
        if (!tp || (tp->hash == h && tp->name_len == len && memcmp(tp->name, name, len) == 0))
            return i;
    }
}

pl_topic *pl_topics_find(const pl_topics *t, const char *name, size_t len)
{
    if (t->count == 0)
        return NULL;
    return t->slots[probe(t, name, len, hash_name(name, len))];
}

static int grow_table(pl_topics *t)
{
    uint32_t ncap = t->cap ? t->cap * 2 : 16;
    pl_topic **ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return PUSHLET_ENOMEM;
    for (uint32_t i = 0; i < t->cap; i++) {
        pl_topic *tp = t->slots[i];
        if (!tp)
            continue;
        uint32_t j = tp->hash & (ncap - 1);
        while (ns[j])
            j = (j + 1) & (ncap - 1);
        ns[j] = tp;
    }
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return 0;
}

/* Backward-shift deletion keeps probe chains intact without tombstones. */
static void remove_slot(pl_topics *t, uint32_t i)
{
    uint32_t mask = t->cap - 1;
    t->slots[i] = NULL;
    for (uint32_t j = (i + 1) & mask; t->slots[j]; j = (j + 1) & mask) {
        uint32_t home = t->slots[j]->hash & mask;
        /* Move slot j into the hole when its home is not cyclically within (i, j]. */
        bool in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            t->slots[i] = t->slots[j];
            t->slots[j] = NULL;
            i = j;
        }
    }
    t->count--;
}

static int find_sub(const pl_subscriber *s, const pl_topic *tp)
{
    for (int i = 0; i < s->nsubs; i++)
        if (s->subs[i].topic == tp)
            return i;
    return -1;
}

pl_topic *pl_topics_get(pl_topics *t, const char *name, size_t len)
{
    uint32_t h = hash_name(name, len);
    if (t->count > 0) {
        pl_topic *found = t->slots[probe(t, name, len, h)];
        if (found)
            return found;
    }
    pl_topic *tp = calloc(1, sizeof(*tp) + len + 1);
    if (!tp)
        return NULL;
    tp->hash = h;
    tp->name_len = (uint16_t)len;
    pl_list_init(&tp->waiters);
    memcpy(tp->name, name, len);
    lock(t);
    if ((t->count + 1) * 4 > t->cap * 3 && grow_table(t) != 0) {
        unlock(t);
        free(tp);
        return NULL;
    }
    t->slots[probe(t, name, len, h)] = tp;
    t->count++;
    unlock(t);
    if (t->on_new)
        t->on_new(t->ctx, tp);
    return tp;
}

int pl_topics_subscribe(pl_topics *t, pl_subscriber *s, const char *name, size_t len)
{
    pl_topic *tp = pl_topics_find(t, name, len);
    if (tp && find_sub(s, tp) >= 0)
        return 1;
    if (s->nsubs == UINT16_MAX)
        return PUSHLET_ENOMEM;
    if (s->nsubs == s->cap) {
        uint32_t wanted = s->cap ? (uint32_t)s->cap * 2 : 2;
        uint16_t ncap = wanted > UINT16_MAX ? UINT16_MAX : (uint16_t)wanted;
        pl_sub *ns = realloc(s->subs, ncap * sizeof(*ns));
        if (!ns)
            return PUSHLET_ENOMEM;
        s->subs = ns;
        s->cap = ncap;
    }
    if (!tp && !(tp = pl_topics_get(t, name, len)))
        return PUSHLET_ENOMEM;
    if (tp->nsubs == tp->cap) {
        uint32_t ncap = tp->cap ? tp->cap * 2 : 4;
        pl_topic_sub *ns = realloc(tp->subs, ncap * sizeof(*ns));
        if (!ns) {
            pl_topics_release(t, tp);
            return PUSHLET_ENOMEM;
        }
        tp->subs = ns;
        tp->cap = ncap;
    }
    tp->subs[tp->nsubs] = (pl_topic_sub){s, s->nsubs, PL_SUB_LIVE};
    s->subs[s->nsubs] = (pl_sub){tp, tp->nsubs, tp->seq};
    lock(t);
    tp->nsubs++;
    unlock(t);
    s->nsubs++;
    t->subscriptions++;
    return 0;
}

static void unlink_sub(pl_topics *t, pl_subscriber *s, int k)
{
    pl_topic *tp = s->subs[k].topic;
    uint32_t idx = s->subs[k].index;

    /* Swap-remove from the topic, then fix the moved entry's back pointer. */
    lock(t);
    tp->subs[idx] = tp->subs[--tp->nsubs];
    unlock(t);
    if (idx < tp->nsubs) {
        pl_topic_sub *moved = &tp->subs[idx];
        moved->sub->subs[moved->slot].index = idx;
    }
    /* Swap-remove from the subscriber, likewise. */
    s->subs[k] = s->subs[--s->nsubs];
    if (k < s->nsubs) {
        pl_sub *moved = &s->subs[k];
        moved->topic->subs[moved->index].slot = (uint32_t)k;
    }
    t->subscriptions--;

    if (tp->nsubs == 0) {
        if (t->on_empty)
            t->on_empty(t->ctx, tp);
        pl_topics_release(t, tp);
    } else if (tp->nsubs * 4 < tp->cap && tp->cap > 16) {
        pl_topic_sub *ns = realloc(tp->subs, (tp->cap / 2) * sizeof(*ns));
        if (ns) {
            tp->subs = ns;
            tp->cap /= 2;
        }
    }
}

void pl_topics_release(pl_topics *t, pl_topic *tp)
{
    if (tp->nsubs > 0 || tp->kept > 0 || tp->holds > 0)
        return;
    if (t->on_drop)
        t->on_drop(t->ctx, tp);
    lock(t);
    remove_slot(t, probe(t, tp->name, tp->name_len, tp->hash));
    unlock(t);
    free(tp->subs);
    free(tp->ring);
    free(tp);
}

int pl_topics_unsubscribe(pl_topics *t, pl_subscriber *s, const char *name, size_t len)
{
    pl_topic *tp = pl_topics_find(t, name, len);
    int k = tp ? find_sub(s, tp) : -1;
    if (k < 0)
        return 1;
    unlink_sub(t, s, k);
    return 0;
}

void pl_topics_unsubscribe_all(pl_topics *t, pl_subscriber *s)
{
    while (s->nsubs)
        unlink_sub(t, s, s->nsubs - 1);
    free(s->subs);
    s->subs = NULL;
    s->cap = 0;
}
