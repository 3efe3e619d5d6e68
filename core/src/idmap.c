/* A map from 64-bit ids (connections, auth requests) to pointers: open addressing, linear
 * probing, backward-shift deletion. Ids are never 0 and are handed out in sequence, so a
 * multiplicative hash spreads them well. Not thread-safe: callers hold their own lock. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static uint32_t slot_of(uint64_t id, uint32_t mask)
{
    return (uint32_t)((id * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

void pl_idmap_destroy(pl_idmap *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof(*m));
}

void *pl_idmap_get(const pl_idmap *m, uint64_t id)
{
    if (m->count == 0)
        return NULL;
    uint32_t mask = m->cap - 1;
    for (uint32_t i = slot_of(id, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == id)
            return m->vals[i];
    return NULL;
}

static int grow(pl_idmap *m)
{
    uint32_t ncap = m->cap ? m->cap * 2 : 64;
    uint64_t *nk = calloc(ncap, sizeof(*nk));
    void **nv = calloc(ncap, sizeof(*nv));
    if (!nk || !nv) {
        free(nk);
        free(nv);
        return PUSHLET_ENOMEM;
    }
    for (uint32_t i = 0; i < m->cap; i++) {
        if (!m->keys[i])
            continue;
        uint32_t j = slot_of(m->keys[i], ncap - 1);
        while (nk[j])
            j = (j + 1) & (ncap - 1);
        nk[j] = m->keys[i];
        nv[j] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = nk;
    m->vals = nv;
    m->cap = ncap;
    return 0;
}

int pl_idmap_put(pl_idmap *m, uint64_t id, void *val)
{
    if ((m->count + 1) * 4 > m->cap * 3 && grow(m) != 0)
        return PUSHLET_ENOMEM;
    uint32_t mask = m->cap - 1, i = slot_of(id, mask);
    while (m->keys[i] && m->keys[i] != id)
        i = (i + 1) & mask;
    if (!m->keys[i])
        m->count++;
    m->keys[i] = id;
    m->vals[i] = val;
    return 0;
}

void *pl_idmap_remove(pl_idmap *m, uint64_t id)
{
    if (m->count == 0)
        return NULL;
    uint32_t mask = m->cap - 1, i = slot_of(id, mask);
    while (m->keys[i] && m->keys[i] != id)
        i = (i + 1) & mask;
    if (!m->keys[i])
        return NULL;
    void *val = m->vals[i];
    /* Backward-shift: pull later entries of the probe run into the hole. */
    for (uint32_t j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        uint32_t home = slot_of(m->keys[j], mask);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->vals[i] = NULL;
    m->count--;
    if (m->count == 0 && m->cap > 64)
        pl_idmap_destroy(m); /* give a burst's table back */
    return val;
}
