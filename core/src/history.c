/* Per-topic history, delivery and resume.
 *
 * Each topic keeps its newest messages in a ring: the very pl_msg the live fan-out used, with
 * the encodings it made, so nothing is copied per subscriber or per format. Kept messages are
 * also linked in one broker-wide list, oldest first, which is what the memory budget evicts
 * from. A subscription is live (fan-out queues each message) or catching up: fan-out skips it
 * and pl_catch_up() copies the next kept messages into its connection's output, never past half
 * the output bound, until it reaches the newest one and turns live in the same step. Everything
 * here runs on the loop thread, so no message can slip between replay and live. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t oldest_seq(const pl_topic *t) { return t->seq - t->kept + 1; }

static pl_msg *kept_msg(const pl_topic *t, uint64_t seq)
{
    uint32_t i = (uint32_t)(seq - oldest_seq(t));
    return t->ring[(t->ring_head + i) & (t->ring_cap - 1)];
}

static pl_sub *sub_of(pl_conn *c, const pl_topic_sub *ts) { return &c->subscriber.subs[ts->slot]; }

static void sync_gauges(pushlet_t *p)
{
    __atomic_store_n(&p->stats[PUSHLET_STAT_HISTORY_MESSAGES], (int64_t)p->kept_count,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&p->stats[PUSHLET_STAT_HISTORY_BYTES], (int64_t)p->kept_bytes,
                     __ATOMIC_RELAXED);
    pl_sync_topic_stats(p);
}

/* ---- Cursors of connections ----------------------------------------------------------------- */

int32_t pl_cursor_check_of(const pl_conn *c)
{
    const pl_subscriber *s = &c->subscriber;
    if (s->nsubs < 2)
        return PL_CURSOR_NO_CHECK;
    const char *names[PL_CURSOR_MAX_POSITIONS];
    uint16_t lens[PL_CURSOR_MAX_POSITIONS];
    size_t n = s->nsubs < PL_CURSOR_MAX_POSITIONS ? s->nsubs : PL_CURSOR_MAX_POSITIONS;
    for (size_t k = 0; k < n; k++) {
        names[k] = s->subs[k].topic->name;
        lens[k] = s->subs[k].topic->name_len;
    }
    return pl_cursor_check(names, lens, n);
}

size_t pl_conn_cursor(const pl_conn *c, char *out, size_t cap)
{
    const pl_subscriber *s = &c->subscriber;
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    size_t n = s->nsubs < PL_CURSOR_MAX_POSITIONS ? s->nsubs : PL_CURSOR_MAX_POSITIONS;
    for (size_t k = 0; k < n; k++)
        pos[k] = (pl_position){s->subs[k].topic->epoch, s->subs[k].seq};
    return pl_cursor_format(out, cap, pos, n, s->cursor_check);
}

int pl_cursor_for(const pl_conn *c, const char *s, size_t len, pl_position *out)
{
    int32_t check;
    int n = pl_cursor_parse(s, len, out, PL_CURSOR_MAX_POSITIONS, &check);
    if (n < 0)
        return -1;
    if ((size_t)n != c->subscriber.nsubs)
        return 0;
    if (n > 1 && check == PL_CURSOR_NO_CHECK)
        return 0;
    return check == PL_CURSOR_NO_CHECK || check == c->subscriber.cursor_check ? 1 : 0;
}

/* "id: CURSOR\n" for a multi-topic SSE stream, as its subscriptions stand. */
static pl_buf *cursor_line(const pl_conn *c)
{
    char cursor[PL_CURSOR_MAX_POSITIONS * PL_ID_MAX + 8];
    size_t n = pl_conn_cursor(c, cursor, sizeof(cursor));
    pl_buf *b = pl_buf_new(4 + n + 1);
    if (b) {
        memcpy(b->data, "id: ", 4);
        memcpy(b->data + 4, cursor, n);
        b->data[4 + n] = '\n';
    }
    return b;
}

/* ---- Delivery ------------------------------------------------------------------------------- */

/* Queues `b` (message `seq` of subscription `s`) with the cursor line a multi-topic SSE stream
 * puts in front. Only those streams track live positions per subscription (the fan-out then
 * touches nothing but the connection); catching up tracks its own. */
static void queue(pl_conn *c, pl_sub *s, uint64_t seq, pl_buf *b)
{
    if (c->format == PL_FMT_SSE_BODY) {
        s->seq = seq;
        pl_buf *line = cursor_line(c);
        if (!line) {
            pl_conn_close(c, "out of memory");
            return;
        }
        pl_conn_send(c, line);
        pl_buf_unref(line);
    }
    pl_conn_send(c, b);
}

int pl_deliver(pl_conn *c, pl_msg *m, pl_topic_sub *ts)
{
    pushlet_t *p = c->p;
    pl_buf *b = pl_msg_encode(m, c->format, p->deflate);
    if (!b) {
        pl_conn_close(c, "out of memory encoding a message");
        return 0;
    }
    if (p->cfg.slow_consumer_policy == PUSHLET_SLOW_DROP_OLDEST &&
        !pl_conn_fits(c, b->len + (c->format == PL_FMT_SSE_BODY ? 64 : 0),
                      (uint64_t)p->cfg.max_output_bytes)) {
        /* Fall behind: from here this subscription is fed from history when there is room. */
        ts->state = PL_SUB_LAGGING;
        sub_of(c, ts)->seq = m->seq - 1;
        c->catching_up = true;
        PL_STAT_ADD(p, PUSHLET_STAT_SLOW_CONSUMER_LAGS, 1);
        return 0;
    }
    queue(c, sub_of(c, ts), m->seq, b);
    return 1;
}

void pl_send_gap(pl_conn *c, uint16_t k, const char *reason)
{
    pushlet_t *p = c->p;
    pl_sub *s = &c->subscriber.subs[k];
    pl_topic *t = s->topic;
    char data[200];
    int n = snprintf(data, sizeof(data), "{\"topic\":\"%s\",\"reason\":\"%s\"}", t->name, reason);
    pl_msg *g = pl_msg_new(t->name, t->name_len, "gap", 3, data, (size_t)n);
    if (!g) {
        pl_conn_close(c, "out of memory");
        return;
    }
    g->seq = s->seq;
    g->id_len = (uint8_t)pl_position_format(g->id, (pl_position){t->epoch, s->seq});
    pl_buf *b = pl_msg_encode(g, c->format, p->deflate);
    if (b)
        queue(c, s, s->seq, b);
    else
        pl_conn_close(c, "out of memory");
    pl_msg_unref(g);
    PL_STAT_ADD(p, PUSHLET_STAT_GAPS, 1);
}

void pl_resume(pl_conn *c, uint16_t k, const pl_position *from)
{
    pl_sub *s = &c->subscriber.subs[k];
    pl_topic *t = s->topic;
    pl_topic_sub *ts = &t->subs[s->index];
    s->seq = t->seq;
    ts->state = PL_SUB_LIVE;
    if (!from)
        return;
    PL_STAT_ADD(c->p, PUSHLET_STAT_RESUMES, 1);
    const char *gap = NULL;
    if (from->epoch != t->epoch) {
        gap = "epoch_changed"; /* what the new epoch kept was all published after it began */
        s->seq = oldest_seq(t) - 1;
    } else if (from->seq > t->seq) {
        gap = "unknown_position";
        s->seq = oldest_seq(t) - 1;
    } else if (from->seq + 1 < oldest_seq(t)) {
        gap = "history_expired";
        s->seq = oldest_seq(t) - 1;
    } else {
        s->seq = from->seq;
    }
    if (gap)
        pl_send_gap(c, k, gap);
    if (s->seq < t->seq) {
        ts->state = PL_SUB_RESUMING;
        c->catching_up = true;
        pl_catch_up_queue(c);
    }
}

/* ---- Catching up ---------------------------------------------------------------------------- */

void pl_catch_up_queue(pl_conn *c)
{
    if (c->refill_queued || c->closing || c->ending)
        return;
    c->refill_queued = true;
    c->next_refill = c->p->refill;
    c->p->refill = c;
}

static uint32_t encoded_bytes(const pl_msg *m)
{
    uint32_t n = 0;
    for (int f = 0; f < PL_FMT_COUNT; f++)
        n += m->enc[f] ? m->enc[f]->len : 0;
    return n;
}

/* A kept message in `format`; encodings made now (a compressed one also makes its plain one)
 * count against the history budget. */
static pl_buf *encode_kept(pushlet_t *p, pl_msg *m, int format)
{
    if (m->enc[format])
        return m->enc[format];
    uint32_t before = encoded_bytes(m);
    pl_buf *b = pl_msg_encode(m, format, p->deflate);
    if (m->topic_rec) {
        uint32_t added = encoded_bytes(m) - before;
        m->kept_bytes += added;
        p->kept_bytes += added;
    }
    return b;
}

/* Feeds the subscriptions of `c` that are catching up; true once all are live. */
static bool feed(pl_conn *c)
{
    pushlet_t *p = c->p;
    uint64_t room = (uint64_t)p->cfg.max_output_bytes / 2;
    for (uint16_t k = 0; k < c->subscriber.nsubs; k++) {
        pl_sub *s = &c->subscriber.subs[k];
        pl_topic *t = s->topic;
        pl_topic_sub *ts = &t->subs[s->index];
        while (ts->state != PL_SUB_LIVE) {
            if (c->closing || c->ending)
                return true;
            if (s->seq + 1 < oldest_seq(t)) {
                s->seq = oldest_seq(t) - 1; /* evicted before this connection got them */
                pl_send_gap(c, k,
                            ts->state == PL_SUB_LAGGING ? "slow_consumer" : "history_expired");
                continue;
            }
            if (s->seq >= t->seq) {
                ts->state = PL_SUB_LIVE;
                break;
            }
            pl_msg *m = kept_msg(t, s->seq + 1);
            pl_buf *b = encode_kept(p, m, c->format);
            if (!b) {
                pl_conn_close(c, "out of memory encoding a message");
                return true;
            }
            if (!pl_conn_fits(c, b->len + (c->format == PL_FMT_SSE_BODY ? 64 : 0), room))
                return false; /* resumed by pl_conn's consume() once output drains */
            s->seq = m->seq;
            queue(c, s, m->seq, b);
            PL_STAT_ADD(p, PUSHLET_STAT_REPLAYED, 1);
            PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_OUT, 1);
        }
    }
    return true;
}

void pl_catch_up(pushlet_t *p)
{
    pl_conn *list = p->refill;
    p->refill = NULL;
    bool fed = list != NULL;
    while (list) {
        pl_conn *c = list;
        list = c->next_refill;
        c->refill_queued = false;
        if (!c->closing && !c->ending && feed(c))
            c->catching_up = false;
    }
    if (fed)
        pl_history_trim(p, false);
}

/* ---- Keeping and evicting ------------------------------------------------------------------- */

/* The history bounds of a topic: the defaults, or the first rule that matches its name. */
static void bounds_for(const pushlet_t *p, const char *name, size_t len, uint32_t *keep_max,
                       int64_t *keep_age_ms, uint16_t *age_class)
{
    *keep_max = (uint32_t)p->cfg.history_size;
    *keep_age_ms = p->cfg.history_age_ms;
    *age_class = 0;
    for (int i = 0; i < p->nrules; i++) {
        const pl_history_rule *r = &p->rules[i];
        bool match = r->prefix ? len >= r->len && memcmp(name, r->pattern, r->len) == 0
                               : len == r->len && memcmp(name, r->pattern, r->len) == 0;
        if (match) {
            *keep_max = r->keep_max;
            if (r->keep_age_ms >= 0) {
                *keep_age_ms = r->keep_age_ms;
                *age_class = (uint16_t)(i + 1);
            }
            return;
        }
    }
}

static uint64_t name_hash64(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037u; /* FNV-1a, 64 bits */
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211u;
    return h | 1; /* 0 marks an empty tombstone */
}

void pl_history_topic_dropped(void *ctx, pl_topic *t)
{
    pushlet_t *p = ctx;
    uint64_t h = name_hash64(t->name, t->name_len);
    p->tomb_hash[h & (PL_TOMBSTONES - 1)] = h;
    p->tomb_seq[h & (PL_TOMBSTONES - 1)] = t->seq;
}

static void drop_oldest(pushlet_t *p, pl_topic *t);

void pl_history_forget(pushlet_t *p, pl_topic *t)
{
    while (t->kept)
        drop_oldest(p, t);
    sync_gauges(p);
}

void pl_history_topic_init(void *ctx, pl_topic *t)
{
    pushlet_t *p = ctx;
    if (p->dist) { /* positions come from Redis */
        pl_dist_topic_init(p, t);
        bounds_for(p, t->name, t->name_len, &t->keep_max, &t->keep_age_ms, &t->age_class);
        return;
    }
    /* A topic dropped earlier in this run continues its sequence from its tombstone. Without
     * one (never seen, or its tombstone was reused) it starts above every sequence number
     * issued in this run, so it can never reuse a position a client may hold: such a client
     * gets a (conservative) history_expired gap. */
    uint64_t h = name_hash64(t->name, t->name_len);
    size_t slot = h & (PL_TOMBSTONES - 1);
    t->epoch = p->epoch;
    t->seq = p->tomb_hash[slot] == h ? p->tomb_seq[slot] : p->counter;
    p->tomb_hash[slot] = 0;
    bounds_for(p, t->name, t->name_len, &t->keep_max, &t->keep_age_ms, &t->age_class);
}

static void drop_oldest(pushlet_t *p, pl_topic *t)
{
    pl_msg *m = t->ring[t->ring_head];
    t->ring[t->ring_head] = NULL;
    t->ring_head = (t->ring_head + 1) & (t->ring_cap - 1);
    t->kept--;
    pl_list_remove(&m->kept);
    p->kept_bytes -= m->kept_bytes;
    p->kept_count--;
    m->topic_rec = NULL;
    pl_msg_unref(m);
    if (t->kept == 0) {
        free(t->ring);
        t->ring = NULL;
        t->ring_cap = t->ring_head = 0;
    }
}

static int grow_ring(pl_topic *t)
{
    uint32_t ncap = t->ring_cap ? t->ring_cap * 2 : 8;
    pl_msg **nr = malloc(ncap * sizeof(*nr));
    if (!nr)
        return PUSHLET_ENOMEM;
    for (uint32_t i = 0; i < t->kept; i++)
        nr[i] = t->ring[(t->ring_head + i) & (t->ring_cap - 1)];
    free(t->ring);
    t->ring = nr;
    t->ring_cap = ncap;
    t->ring_head = 0;
    return 0;
}

void pl_history_keep(pushlet_t *p, pl_topic *t, pl_msg *m)
{
    if (t->keep_max == 0 || t->keep_age_ms == 0 || p->cfg.history_max_bytes == 0)
        return;
    while (t->kept >= t->keep_max)
        drop_oldest(p, t);
    if (t->kept == t->ring_cap && grow_ring(t) != 0) {
        /* Kept messages must stay consecutive: rather forget them all (clients resuming get a
         * history_expired gap) than keep a hole. */
        while (t->kept)
            drop_oldest(p, t);
        pl_error(p, "history", "out of memory keeping history for topic %s", t->name);
        return;
    }
    t->ring[(t->ring_head + t->kept) & (t->ring_cap - 1)] = pl_msg_ref(m);
    t->kept++;
    size_t bytes =
        sizeof(*m) + sizeof(m) + m->topic_len + m->event_len + m->data_len + 3 + encoded_bytes(m);
    m->topic_rec = t;
    m->kept_at = uv_now(&p->loop);
    m->kept_bytes = (uint32_t)bytes;
    p->kept_bytes += bytes;
    p->kept_count++;
    pl_list_push(&p->kept[t->age_class], &m->kept);
}

/* The oldest kept message of an age class, or NULL. */
static pl_msg *oldest_of(const pushlet_t *p, int k)
{
    return p->kept[k].next != &p->kept[k] ? pl_container_of(p->kept[k].next, pl_msg, kept) : NULL;
}

/* Evicts the head of its age class (its topic's oldest message too: a topic's messages are all
 * in one class, in order), freeing the topic when nothing holds it any more. */
static void evict(pushlet_t *p, pl_msg *m)
{
    pl_topic *t = m->topic_rec;
    drop_oldest(p, t);
    if (!t->kept)
        pl_topics_release(&p->topics, t);
}

void pl_history_trim(pushlet_t *p, bool by_age)
{
    /* Within a class every message has the same age bound: expiry stops at the first that is
     * young enough, so a tick costs what it evicts, not what is kept. */
    uint64_t now = uv_now(&p->loop);
    for (int k = 0; by_age && k < p->nkept; k++) {
        pl_msg *m;
        while ((m = oldest_of(p, k)) && now - m->kept_at >= (uint64_t)m->topic_rec->keep_age_ms)
            evict(p, m);
    }
    while (p->kept_bytes > (uint64_t)p->cfg.history_max_bytes) {
        pl_msg *oldest = NULL; /* the oldest of the class heads */
        for (int k = 0; k < p->nkept; k++) {
            pl_msg *m = oldest_of(p, k);
            if (m && (!oldest || m->kept_at < oldest->kept_at))
                oldest = m;
        }
        if (!oldest)
            break;
        evict(p, oldest);
        PL_STAT_ADD(p, PUSHLET_STAT_HISTORY_EVICTED, 1);
    }
    sync_gauges(p);
}

void pl_history_clear(pushlet_t *p)
{
    for (int k = 0; k < p->nkept; k++) {
        pl_msg *m;
        while ((m = oldest_of(p, k)))
            drop_oldest(p, m->topic_rec);
    }
    p->kept_bytes = p->kept_count = 0;
    p->refill = NULL;
    sync_gauges(p);
}
