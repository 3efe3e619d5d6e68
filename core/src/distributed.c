/* Distributed mode (docs/DISTRIBUTED.md): brokers that share Redis deliver the same messages
 * with the same IDs in the same order, and a client resumes on any of them.
 *
 * Publishing: a publish (pushlet_publish() from any thread, or HTTP) goes to its topic's shard,
 * where one Lua script appends it to the topic's history stream and PUBLISHes it with its ID
 * (redis.c). Nothing is delivered locally at that point: every broker, this one included,
 * delivers it when it comes back on the topic's channel, so all deliver one sequence.
 *
 * Following a topic: a broker listens on a topic's channel while it has local subscribers or
 * subscriptions waiting to start. To follow one it subscribes and, once Redis confirms, fetches
 * the topic's history after the last position it knows. From then on the local topic (epoch,
 * seq, kept ring) mirrors Redis, so the ordinary resume code serves IDs any broker gave out.
 * A subscription to a topic not caught up yet waits, parked like an auth request; if Redis
 * cannot be reached within the auth timeout it is refused (503, or an `unavailable` error).
 *
 * Gaps: a record that is not the next position (missed while the channel was down, or heard
 * while a fetch runs) is not applied; the topic is fetched after its position instead. When a
 * shard is READY again after an outage, every topic it holds is fetched likewise. A position
 * Redis no longer holds (history trimmed) becomes a gap event for the subscribers; a new epoch
 * (Redis lost its data) restarts the topic's positions.
 *
 * Publishers' bound: publishes not yet stored by Redis are counted (atomics, any thread); past
 * the inbox's limits a publish gets PUSHLET_EFULL, never a silent drop. Stop waits for them
 * until the stop timeout.
 *
 * Thread: the loop's, except pushlet_enable_distributed_mode() (before start) and
 * pl_dist_reserve()/pl_dist_release() (any). */
#include "internal.h"
#include "redis.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SHARDS   64
#define FETCH_MAX    1000 /* records per history fetch */
#define CHECK_SECS   5    /* pushlet_enable_distributed_mode(): connect and answer timeout */
#define UNAVAILABLE  "Redis unavailable: the topic could not be joined; try again"
#define MAX_TOPIC_NS 64 /* initial topics of one request (pl_subscribe_query's limit) */

typedef struct shard {
    struct pl_dist *d;
    uint32_t index;
    char *address;                      /* as given: may hold a password, so never shown */
    char *password;                     /* the one in effect, NULL = none */
    int db;                             /* the one in effect */
    char where[PL_REDIS_HOST_MAX + 16]; /* host:port/db or the socket path: logs and stats */
    pl_redis *r;                        /* while running */
    int state;                          /* PL_REDIS_* */
    char error[200];                    /* why it went down last, "" when ready */
    uint64_t down_since;                /* loop ms when the outage began, 0 when none */
    uint32_t attempts;                  /* failed connects in this outage */
} shard;

typedef struct pl_dist {
    pushlet_t *p;
    uint32_t nshards;
    shard shards[MAX_SHARDS];
    uint64_t epoch;                /* the cluster epoch last seen */
    size_t pending, pending_bytes; /* atomics: publishes accepted and not answered by Redis */
    size_t max_pending, max_pending_bytes; /* atomics: their bound, set at start */
    pl_link waits;     /* every pl_sync_wait, oldest first (one timeout for all) */
    pl_link publishes; /* every pl_publish_wait (freed at close if unanswered) */
    bool refetch_due;  /* some topic has refetch set: the tick looks */
    bool abandon;      /* stop no longer waits for Redis */
} pl_dist;

/* A subscription waiting for its topic to catch up: an initial topic of a parked request, or
 * a WebSocket subscribe command. Holds the topic. */
typedef struct pl_sync_wait {
    pl_link by_topic, by_conn, by_age;
    pl_conn *c;
    pl_topic *t;
    uint64_t deadline;
    bool command, has_since;
    pl_position since;
} pl_sync_wait;

/* One publish on its way to Redis; `c` is the HTTP request to answer, if any. */
typedef struct pl_publish_wait {
    pl_link link;
    pushlet_t *p;
    pl_conn *c;
    size_t bytes;
} pl_publish_wait;

typedef struct fetch_ctx {
    pushlet_t *p;
    uint64_t epoch; /* the topic's epoch when asked: an answer about another one is stale */
    uint16_t len;
    char name[];
} fetch_ctx;

static pl_dist *dist_of(const pushlet_t *p) { return __atomic_load_n(&p->dist, __ATOMIC_ACQUIRE); }

static shard *shard_of(pl_dist *d, const char *name, size_t len)
{
    return &d->shards[pl_redis_shard_of(name, len, d->nshards)];
}

static const char *state_name(int state)
{
    return state == PL_REDIS_READY ? "ready" : state == PL_REDIS_DOWN ? "down" : "connecting";
}

/* ---- Enabling (before start; blocking checks on the caller's thread) ------------------------ */

static int check_reply(pushlet_t *p, redisContext *rc, redisReply *rep, const shard *s,
                       const char *what)
{
    if (!rep) {
        pl_error(p, "redis", "%s: %s failed: %s", s->where, what, rc->errstr);
        return PUSHLET_EUNAVAILABLE;
    }
    int status = 0;
    if (rep->type == REDIS_REPLY_ERROR) {
        bool auth = strncmp(rep->str, "WRONGPASS", 9) == 0 || strncmp(rep->str, "NOAUTH", 6) == 0 ||
                    strstr(rep->str, "password") != NULL || strstr(rep->str, "DB index") != NULL;
        pl_error(p, "redis", "%s: %s refused: %s", s->where, what, rep->str);
        status = auth || strcmp(what, "SELECT") == 0 ? PUSHLET_EAUTH : PUSHLET_EUNAVAILABLE;
    }
    return status;
}

/* Connects, logs in, selects the db and reads the epoch, so that a wrong address or password
 * is reported by pushlet_enable_distributed_mode() rather than retried for ever. */
static int check_server(pushlet_t *p, const pl_redis_addr *a, shard *s, uint64_t *epoch)
{
    struct timeval tv = {CHECK_SECS, 0};
    redisContext *rc = a->is_unix ? redisConnectUnixWithTimeout(a->host, tv)
                                  : redisConnectWithTimeout(a->host, a->port, tv);
    if (!rc || rc->err) {
        pl_error(p, "redis", "%s: cannot connect: %s", s->where, rc ? rc->errstr : "out of memory");
        redisFree(rc);
        return PUSHLET_EUNAVAILABLE;
    }
    redisSetTimeout(rc, tv);
    int status = 0;
    redisReply *rep = NULL;
    if (s->password) {
        rep = a->user[0] ? redisCommand(rc, "AUTH %s %s", a->user, s->password)
                         : redisCommand(rc, "AUTH %s", s->password);
        status = check_reply(p, rc, rep, s, "AUTH");
        freeReplyObject(rep);
    }
    if (!status && s->db != 0) {
        rep = redisCommand(rc, "SELECT %d", s->db);
        status = check_reply(p, rc, rep, s, "SELECT");
        freeReplyObject(rep);
    }
    if (!status) { /* the cluster epoch exists from now on: every broker's IDs use it */
        uint64_t mine = 0;
        if (uv_random(NULL, NULL, &mine, sizeof(mine), 0, NULL) != 0)
            mine = uv_hrtime() ^ (uint64_t)(uintptr_t)p;
        mine = (mine & ((UINT64_C(1) << 48) - 1)) | (UINT64_C(1) << 47);
        char id[PL_ID_MAX];
        size_t len = pl_position_format(id, (pl_position){mine, 0}) - 2; /* without "-0" */
        rep = redisCommand(rc, "SET pushlet:epoch %b NX", id, len);
        status = check_reply(p, rc, rep, s, "SET");
        freeReplyObject(rep);
    }
    if (!status) {
        rep = redisCommand(rc, "GET pushlet:epoch");
        status = check_reply(p, rc, rep, s, "GET");
        if (!status && rep->type == REDIS_REPLY_STRING && rep->len < 16) {
            char id[24];
            uint64_t seq;
            snprintf(id, sizeof(id), "%s-0", rep->str);
            if (pl_redis_parse_id(id, strlen(id), epoch, &seq) != 0)
                *epoch = 0;
        }
        freeReplyObject(rep);
    }
    redisFree(rc);
    return status;
}

int pushlet_enable_distributed_mode(pushlet_t *p, const char *address, const char *password, int db)
{
    if (!p || !address || !*address || db < 0)
        return PUSHLET_EINVAL;
    if (pl_on_loop_thread(p))
        return PUSHLET_EWRONGTHREAD;
    pl_redis_addr a;
    if (pl_redis_parse_address(address, &a) != 0) {
        pl_error(p, "redis", "invalid Redis address (host:port, redis://..., or unix:/path)");
        return PUSHLET_EINVAL;
    }
    shard s = {.db = a.db >= 0 ? a.db : db};
    const char *pw = a.has_password ? a.password : password && *password ? password : NULL;
    s.address = strdup(address);
    s.password = pw ? strdup(pw) : NULL;
    if (a.is_unix)
        snprintf(s.where, sizeof(s.where), "%s/%d", a.host, s.db);
    else
        snprintf(s.where, sizeof(s.where), strchr(a.host, ':') ? "[%s]:%d/%d" : "%s:%d/%d", a.host,
                 a.port, s.db);
    uint64_t epoch = 0;
    int rc = !s.address || (pw && !s.password) ? PUSHLET_ENOMEM : 0;
    if (!rc)
        rc = check_server(p, &a, &s, &epoch);
    if (!rc) {
        uv_mutex_lock(&p->state_mu);
        pl_dist *d = p->dist;
        if (p->state != PL_STATE_STOPPED)
            rc = PUSHLET_EBUSY;
        else if (d && d->nshards == MAX_SHARDS)
            rc = PUSHLET_EINVAL;
        else if (!d && !(d = calloc(1, sizeof(*d))))
            rc = PUSHLET_ENOMEM;
        if (!rc) {
            d->p = p;
            s.d = d;
            s.index = d->nshards;
            s.state = PL_REDIS_CONNECTING;
            d->shards[d->nshards++] = s;
            if (epoch)
                d->epoch = epoch;
            __atomic_store_n(&p->dist, d, __ATOMIC_RELEASE);
        }
        uv_mutex_unlock(&p->state_mu);
    }
    if (rc) {
        free(s.address);
        free(s.password);
        return rc;
    }
    pl_info(p, "redis", "distributed mode: shard %u is %s", s.index, s.where);
    return 0;
}

void pl_dist_free(pushlet_t *p)
{
    pl_dist *d = p->dist;
    if (!d)
        return;
    for (uint32_t i = 0; i < d->nshards; i++) {
        free(d->shards[i].address);
        free(d->shards[i].password);
    }
    free(d);
    p->dist = NULL;
}

/* ---- Publishers' bound (any thread) ------------------------------------------------------- */

int pl_dist_reserve(pushlet_t *p, size_t bytes)
{
    pl_dist *d = dist_of(p);
    if (!d)
        return 0;
    size_t n = __atomic_add_fetch(&d->pending, 1, __ATOMIC_RELAXED);
    size_t b = __atomic_add_fetch(&d->pending_bytes, bytes, __ATOMIC_RELAXED);
    size_t max_n = __atomic_load_n(&d->max_pending, __ATOMIC_RELAXED); /* 0: never started */
    if (max_n && (n > max_n || b > __atomic_load_n(&d->max_pending_bytes, __ATOMIC_RELAXED))) {
        __atomic_sub_fetch(&d->pending, 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&d->pending_bytes, bytes, __ATOMIC_RELAXED);
        return PUSHLET_EFULL;
    }
    PL_STAT_ADD_SHARED(p, PUSHLET_STAT_REDIS_PENDING, 1);
    return 0;
}

void pl_dist_release(pushlet_t *p, size_t bytes)
{
    pl_dist *d = dist_of(p);
    if (!d)
        return;
    __atomic_sub_fetch(&d->pending, 1, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&d->pending_bytes, bytes, __ATOMIC_RELAXED);
    PL_STAT_ADD_SHARED(p, PUSHLET_STAT_REDIS_PENDING, -1);
}

size_t pl_dist_msg_bytes(const pl_msg *m) { return m->topic_len + m->event_len + m->data_len; }

/* ---- Following topics ----------------------------------------------------------------------- */

static void fetch(pushlet_t *p, pl_topic *t);

/* Stops following a topic nothing local needs any more. */
static void maybe_unfollow(pushlet_t *p, pl_topic *t)
{
    if (t->sync == PL_SYNC_NONE || t->nsubs > 0 || t->holds > 0)
        return;
    shard *s = shard_of(p->dist, t->name, t->name_len);
    if (s->r)
        pl_redis_unsubscribe(s->r, t->name, t->name_len);
    t->sync = PL_SYNC_NONE;
    t->refetch = false;
}

void pl_dist_topic_empty(void *ctx, pl_topic *t)
{
    pushlet_t *p = ctx;
    if (p->dist)
        maybe_unfollow(p, t);
}

/* Subscribed on the server (or it already was): catch up, if the shard can answer now; else
 * READY fetches it. */
static void joined(pushlet_t *p, shard *s, pl_topic *t)
{
    if (t->sync != PL_SYNC_SUBSCRIBING || s->state != PL_REDIS_READY)
        return;
    t->sync = PL_SYNC_CATCHING;
    fetch(p, t);
}

static void follow(pushlet_t *p, pl_topic *t)
{
    if (t->sync != PL_SYNC_NONE)
        return;
    shard *s = shard_of(p->dist, t->name, t->name_len);
    t->sync = PL_SYNC_SUBSCRIBING;
    t->heard = 0;
    int rc = pl_redis_subscribe(s->r, t->name, t->name_len);
    if (rc == 1)
        joined(p, s, t);
    else if (rc < 0)
        pl_error(p, "redis", "cannot subscribe to topic %s: %s", t->name, pushlet_strerror(rc));
}

/* Every subscriber of `t` moves to the topic's current position with a gap event: what lay
 * before it is gone (the kept ring was forgotten with it). */
static void gap_all(pushlet_t *p, pl_topic *t, const char *reason)
{
    for (uint32_t i = 0; i < t->nsubs; i++) {
        pl_topic_sub *ts = &t->subs[i];
        pl_conn *c = pl_container_of(ts->sub, pl_conn, subscriber);
        ts->state = PL_SUB_LIVE;
        c->subscriber.subs[ts->slot].seq = t->seq;
        if (!c->closing && !c->ending)
            pl_send_gap(c, (uint16_t)ts->slot, reason);
    }
    pl_warn(p, "redis", "topic %s: positions up to %" PRIu64 " are not in Redis any more (%s)",
            t->name, t->seq, reason);
}

/* Redis lost its data and began a new epoch: the topic's positions start again. */
static void restart_epoch(pushlet_t *p, pl_topic *t, uint64_t epoch)
{
    bool blank = t->seq == 0 && t->kept == 0;
    pl_history_forget(p, t);
    t->epoch = epoch;
    t->seq = 0;
    t->heard = 0;
    if (!blank)
        gap_all(p, t, "epoch_changed");
}

/* Positions up to `seq` are not in Redis's history any more. */
static void skip_to(pushlet_t *p, pl_topic *t, uint64_t seq)
{
    pl_history_forget(p, t);
    t->seq = seq;
    gap_all(p, t, "history_expired");
}

/* The next record of the topic: delivered and kept like a local publish. */
static void apply(pushlet_t *p, pl_topic *t, const pl_redis_record *rec)
{
    if (rec->seq <= t->seq)
        return; /* had it */
    if (rec->seq != t->seq + 1)
        skip_to(p, t, rec->seq - 1);
    pl_msg *m =
        pl_msg_new(t->name, t->name_len, rec->event, rec->event_len, rec->data, rec->data_len);
    if (!m) {
        pl_error(p, "redis", "out of memory applying a message of topic %s", t->name);
        t->refetch = p->dist->refetch_due = true;
        return;
    }
    m->seq = rec->seq;
    if (rec->published_ms > 0)
        m->published_ms = rec->published_ms;
    m->id_len = (uint8_t)pl_position_format(m->id, (pl_position){t->epoch, m->seq});
    t->seq = rec->seq;
    pl_broker_fanout(p, t, m);
    pl_msg_unref(m);
}

static void wake(pushlet_t *p, pl_topic *t);

static void on_fetched(pl_redis *r, int status, uint64_t epoch, uint64_t last_seq,
                       const pl_redis_record *msgs, size_t n, const char *error, void *ud)
{
    (void)r;
    fetch_ctx *f = ud;
    pushlet_t *p = f->p;
    pl_topic *t = pl_topics_find(&p->topics, f->name, f->len);
    uint64_t asked_epoch = f->epoch;
    free(f);
    if (!t)
        return;
    t->fetching = false;
    if (t->sync == PL_SYNC_NONE)
        return; /* no longer followed */
    if (status != 0) {
        pl_warn(p, "redis", "history of topic %s not read: %s", t->name, error ? error : "");
        t->refetch = p->dist->refetch_due = true; /* the tick, or READY, tries again */
        return;
    }
    t->holds++; /* the fan-out below must not free it */
    bool again = false;
    if (asked_epoch != t->epoch) {
        again = true; /* a record restarted the topic meanwhile: ask from its new position */
    } else if (epoch != 0 && epoch != t->epoch) {
        again = t->seq != 0 || t->kept != 0; /* its positions are void: from the start again */
        restart_epoch(p, t, epoch);
    }
    if (epoch != 0)
        p->dist->epoch = epoch;
    if (!again) {
        for (size_t i = 0; i < n; i++)
            apply(p, t, &msgs[i]);
        if (n == 0 && epoch == t->epoch && last_seq > t->seq)
            skip_to(p, t, last_seq); /* published, and already gone from the history */
        again = n >= FETCH_MAX || t->refetch || t->heard > t->seq || last_seq > t->seq;
    }
    if (again) {
        fetch(p, t);
    } else if (t->sync == PL_SYNC_CATCHING) {
        t->sync = PL_SYNC_SYNCED;
        wake(p, t);
    }
    t->holds--;
    maybe_unfollow(p, t);
    pl_topics_release(&p->topics, t);
    pl_sync_topic_stats(p);
    pl_history_trim(p, false);
}

static void fetch(pushlet_t *p, pl_topic *t)
{
    if (t->fetching) {
        t->refetch = true;
        return;
    }
    shard *s = shard_of(p->dist, t->name, t->name_len);
    if (s->state != PL_REDIS_READY)
        return; /* READY fetches every topic it holds */
    fetch_ctx *f = malloc(sizeof(*f) + t->name_len + 1);
    int rc = f ? 0 : PUSHLET_ENOMEM;
    if (f) {
        f->p = p;
        f->epoch = t->epoch;
        f->len = t->name_len;
        memcpy(f->name, t->name, t->name_len + 1);
        rc = pl_redis_fetch(s->r, t->name, t->name_len, t->seq, FETCH_MAX, on_fetched, f);
    }
    if (rc) {
        free(f);
        t->refetch = p->dist->refetch_due = true;
        return;
    }
    t->fetching = true;
    t->refetch = false;
    PL_STAT_ADD(p, PUSHLET_STAT_REDIS_CATCH_UPS, 1);
}

/* ---- Redis callbacks ------------------------------------------------------------------------ */

static void on_message(pl_redis *r, const pl_redis_record *rec, void *ud)
{
    (void)r;
    shard *s = ud;
    pushlet_t *p = s->d->p;
    if (rec->topic_len == 0) { /* publish-to-all */
        pl_msg *m = pl_msg_new("", 0, rec->event, rec->event_len, rec->data, rec->data_len);
        if (!m)
            return;
        m->to_all = true;
        if (rec->published_ms > 0)
            m->published_ms = rec->published_ms;
        pl_broker_fanout_all(p, m);
        pl_msg_unref(m);
        return;
    }
    pl_topic *t = pl_topics_find(&p->topics, rec->topic, rec->topic_len);
    if (!t || t->sync < PL_SYNC_CATCHING)
        return; /* its catch-up fetch comes after the subscription: the record is in it */
    if (rec->epoch != t->epoch)
        restart_epoch(p, t, rec->epoch);
    s->d->epoch = rec->epoch;
    if (rec->seq == t->seq + 1) {
        t->holds++;
        apply(p, t, rec);
        t->holds--;
        pl_history_trim(p, false); /* may free t */
    } else if (rec->seq > t->seq) {
        if (rec->seq > t->heard)
            t->heard = rec->seq;
        fetch(p, t); /* the records in between */
    }
}

static void on_subscribed(pl_redis *r, const char *topic, size_t len, void *ud)
{
    (void)r;
    shard *s = ud;
    pl_topic *t = pl_topics_find(&s->d->p->topics, topic, len);
    if (t)
        joined(s->d->p, s, t);
}

static void sync_shard_stats(pl_dist *d)
{
    int64_t down = 0;
    for (uint32_t i = 0; i < d->nshards; i++)
        down += d->shards[i].state != PL_REDIS_READY;
    __atomic_store_n(&d->p->stats[PUSHLET_STAT_REDIS_SHARDS_DOWN], down, __ATOMIC_RELAXED);
}

static void on_state(pl_redis *r, int state, const char *error, void *ud)
{
    (void)r;
    shard *s = ud;
    pushlet_t *p = s->d->p;
    int was = s->state;
    s->state = state;
    sync_shard_stats(s->d);
    if (state == PL_REDIS_DOWN) {
        snprintf(s->error, sizeof(s->error), "%s", error ? error : "connection lost");
        if (s->down_since == 0) { /* one warning per outage, then every 10th attempt */
            s->down_since = uv_now(&p->loop);
            s->attempts = 0;
            pl_warn(p, "redis", "shard %u (%s) down: %s; publishes wait (bounded), reconnecting",
                    s->index, s->where, s->error);
        } else if (++s->attempts % 10 == 0) {
            pl_warn(p, "redis", "shard %u (%s) still down after %u attempts: %s", s->index,
                    s->where, s->attempts, s->error);
        }
        return;
    }
    if (state != PL_REDIS_READY || was == PL_REDIS_READY)
        return;
    s->error[0] = '\0';
    if (s->down_since)
        pl_info(p, "redis", "shard %u (%s) ready again after %llu ms; catching up", s->index,
                s->where, (unsigned long long)(uv_now(&p->loop) - s->down_since));
    else
        pl_info(p, "redis", "shard %u (%s) ready", s->index, s->where);
    s->down_since = 0;
    /* Whatever was published while the channels were not listened to is in the history. */
    pl_topics *tt = &p->topics;
    for (uint32_t i = 0; i < tt->cap; i++) {
        pl_topic *t = tt->slots[i];
        if (!t || t->sync == PL_SYNC_NONE || shard_of(s->d, t->name, t->name_len) != s)
            continue;
        if (t->sync == PL_SYNC_SUBSCRIBING)
            t->sync = PL_SYNC_CATCHING;
        fetch(p, t);
    }
}

/* ---- Lifecycle on the loop ------------------------------------------------------------------ */

int pl_dist_start(pushlet_t *p)
{
    pl_dist *d = p->dist;
    if (!d)
        return 0;
    pl_list_init(&d->waits);
    pl_list_init(&d->publishes);
    d->abandon = d->refetch_due = false;
    /* d->pending is not reset: publishers on other threads reserve and release around a
     * stopped broker too, and every reservation is released exactly once (answered, refused,
     * or given up in pl_dist_close()). */
    __atomic_store_n(&d->max_pending, (size_t)p->cfg.max_queued_messages, __ATOMIC_RELAXED);
    __atomic_store_n(&d->max_pending_bytes, (size_t)p->cfg.max_queued_bytes, __ATOMIC_RELAXED);
    p->topics.on_empty = pl_dist_topic_empty;
    for (uint32_t i = 0; i < d->nshards; i++) {
        shard *s = &d->shards[i];
        pl_redis_options o;
        pl_redis_options_init(&o);
        o.address = s->address;
        o.password = s->password ? s->password : "";
        o.db = s->db;
        o.history_size = (uint32_t)p->cfg.history_size;
        o.history_age_ms = p->cfg.history_age_ms;
        o.queue_max_count = SIZE_MAX / 2; /* bounded by pl_dist_reserve() */
        o.queue_max_bytes = SIZE_MAX / 2;
        o.subscribe_all = i == 0;
        pl_redis_callbacks cb = {.on_state = on_state,
                                 .on_message = on_message,
                                 .on_subscribed = on_subscribed,
                                 .ud = s};
        s->state = PL_REDIS_CONNECTING;
        s->error[0] = '\0';
        s->down_since = 0;
        int rc = pl_redis_new(&s->r, &p->loop, &o, &cb);
        if (rc) {
            pl_error(p, "redis", "shard %u (%s): %s", i, s->where, pushlet_strerror(rc));
            pl_dist_close(p);
            return rc;
        }
    }
    sync_shard_stats(d);
    return 0;
}

bool pl_dist_busy(pushlet_t *p)
{
    pl_dist *d = p->dist;
    if (!d || d->abandon)
        return false;
    for (uint32_t i = 0; i < d->nshards; i++)
        if (d->shards[i].r && pl_redis_pending(d->shards[i].r) > 0)
            return true;
    return false;
}

void pl_dist_abandon(pushlet_t *p)
{
    if (p->dist)
        p->dist->abandon = true;
}

void pl_dist_close(pushlet_t *p)
{
    pl_dist *d = p->dist;
    if (!d)
        return;
    size_t lost = 0;
    for (uint32_t i = 0; i < d->nshards; i++) {
        shard *s = &d->shards[i];
        if (s->r)
            lost += pl_redis_pending(s->r);
        pl_redis_free(s->r); /* no callback after this */
        s->r = NULL;
    }
    if (lost)
        pl_error(p, "redis", "stopped with %zu publishes not stored in Redis: they are lost", lost);
    while (d->publishes.next != &d->publishes) {
        pl_publish_wait *w = pl_container_of(d->publishes.next, pl_publish_wait, link);
        pl_list_remove(&w->link);
        pl_dist_release(p, w->bytes);
        free(w);
    }
    p->topics.on_empty = NULL;
}

/* ---- Publishing ----------------------------------------------------------------------------- */

static void answer_http(pl_conn *c, int status, const char *id, const char *error)
{
    char body[PL_ID_MAX + 320];
    if (status == 0) {
        int n = snprintf(body, sizeof(body), "{\"id\":\"%s\"}\n", id ? id : "");
        pl_respond(c, 200, "Cache-Control: no-store\r\n", "application/json", body, (size_t)n,
                   false);
    } else {
        snprintf(body, sizeof(body), "Redis refused the publish: %.256s", error ? error : "");
        pl_respond_text(c, 502, "", body);
    }
}

static void on_published(pl_redis *r, int status, const char *id, uint64_t epoch, uint64_t seq,
                         const char *error, void *ud)
{
    (void)r;
    (void)seq;
    pl_publish_wait *w = ud;
    pushlet_t *p = w->p;
    pl_list_remove(&w->link);
    pl_dist_release(p, w->bytes);
    if (epoch)
        p->dist->epoch = epoch;
    if (status) {
        PL_STAT_ADD(p, PUSHLET_STAT_REDIS_PUBLISH_ERRORS, 1);
        pl_error(p, "redis", "publish refused by Redis, not delivered: %s", error ? error : "");
    }
    pl_conn *c = w->c;
    free(w);
    if (c) {
        c->publish_wait = NULL;
        answer_http(c, status, id, error);
        pl_conn_resume_input(c);
    }
    pl_broker_conn_gone(p); /* a stop may be waiting for the last answer */
}

void pl_dist_publish(pushlet_t *p, pl_msg *m, pl_conn *c)
{
    pl_dist *d = p->dist;
    size_t bytes = pl_dist_msg_bytes(m);
    pl_publish_wait *w = malloc(sizeof(*w));
    int rc = w ? 0 : PUSHLET_ENOMEM;
    if (w) {
        *w = (pl_publish_wait){.p = p, .c = c, .bytes = bytes};
        pl_list_push(&d->publishes, &w->link);
        if (m->to_all)
            rc = pl_redis_publish_all(d->shards[0].r, m->event, m->event_len, m->data, m->data_len,
                                      m->published_ms, on_published, w);
        else
            rc = pl_redis_publish(shard_of(d, m->topic, m->topic_len)->r, m->topic, m->topic_len,
                                  m->event, m->event_len, m->data, m->data_len, m->published_ms,
                                  on_published, w);
        if (rc)
            pl_list_remove(&w->link);
    }
    PL_STAT_ADD(p, PUSHLET_STAT_MESSAGES_IN, 1);
    if (rc) {
        free(w);
        pl_dist_release(p, bytes);
        PL_STAT_ADD(p, PUSHLET_STAT_REDIS_PUBLISH_ERRORS, 1);
        pl_error(p, "redis", "publish not sent to Redis: %s", pushlet_strerror(rc));
        if (c)
            answer_http(c, rc, NULL, pushlet_strerror(rc));
    } else if (c) {
        c->publish_wait = w;
        c->parked = true; /* answered from on_published */
    }
    pl_msg_unref(m);
}

/* ---- Subscriptions waiting for their topic -------------------------------------------------- */

static pl_sync_wait *new_wait(pl_conn *c, pl_topic *t, bool command)
{
    pushlet_t *p = c->p;
    pl_sync_wait *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->c = c;
    w->t = t;
    w->command = command;
    w->deadline = uv_now(&p->loop) + (uint64_t)p->cfg.auth_timeout_ms;
    pl_list_push(&t->waiters, &w->by_topic);
    pl_list_push(&c->sync_waits, &w->by_conn);
    pl_list_push(&p->dist->waits, &w->by_age);
    t->holds++;
    return w;
}

/* Unlinks and frees `w`; the caller decides what becomes of its topic. */
static pl_topic *drop_wait(pl_sync_wait *w)
{
    pl_topic *t = w->t;
    pl_list_remove(&w->by_topic);
    pl_list_remove(&w->by_conn);
    pl_list_remove(&w->by_age);
    t->holds--;
    free(w);
    return t;
}

/* The topic may go once nothing waits for it. */
static void let_go(pushlet_t *p, pl_topic *t)
{
    maybe_unfollow(p, t);
    pl_topics_release(&p->topics, t);
}

/* Drops every wait of `c` (commands too when `all`); their topics are pinned into `pinned`
 * (when given) rather than let go, so the caller can subscribe to them first. */
static size_t drop_waits(pl_conn *c, bool all, pl_topic **pinned, size_t cap)
{
    size_t n = 0;
    for (pl_link *l = c->sync_waits.next, *next; l != &c->sync_waits; l = next) {
        next = l->next;
        pl_sync_wait *w = pl_container_of(l, pl_sync_wait, by_conn);
        if (w->command && !all)
            continue;
        pl_topic *t = drop_wait(w);
        if (pinned && n < cap) {
            t->holds++;
            pinned[n++] = t;
        } else {
            let_go(c->p, t);
        }
    }
    c->syncs_waiting = 0;
    return n;
}

static void unpin(pushlet_t *p, pl_topic **pinned, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        pinned[i]->holds--;
        let_go(p, pinned[i]);
    }
    pl_sync_topic_stats(p);
}

/* `t` caught up: its waiting subscriptions go on. */
static void wake(pushlet_t *p, pl_topic *t)
{
    t->holds++;
    while (t->waiters.next != &t->waiters) {
        pl_sync_wait *w = pl_container_of(t->waiters.next, pl_sync_wait, by_topic);
        pl_conn *c = w->c;
        if (w->command) {
            pl_position since = w->since;
            bool has_since = w->has_since;
            drop_wait(w);
            if (!c->closing && !c->ending)
                pl_ws_subscribe(c, t->name, t->name_len, has_since ? &since : NULL);
            continue;
        }
        /* An initial topic: the request goes on once all of them caught up; until then the
         * wait stays (off the topic's list) so the topic stays followed. */
        pl_list_remove(&w->by_topic);
        pl_list_init(&w->by_topic);
        if (--c->syncs_waiting > 0)
            continue;
        pl_topic *pinned[MAX_TOPIC_NS];
        size_t n = drop_waits(c, false, pinned, MAX_TOPIC_NS);
        if (!c->closing && !c->ending && c->parked)
            pl_conn_unpark(c); /* routed again: now it subscribes */
        unpin(p, pinned, n);
    }
    t->holds--;
}

int pl_dist_topics_ready(pl_conn *c, char (*topics)[256], const size_t *lens, size_t n)
{
    pushlet_t *p = c->p;
    if (!p->dist)
        return 0;
    uint16_t waiting = 0;
    for (size_t i = 0; i < n; i++) {
        pl_topic *t = pl_topics_get(&p->topics, topics[i], lens[i]);
        if (t && t->sync == PL_SYNC_SYNCED)
            continue;
        if (!t || !new_wait(c, t, false)) {
            if (t)
                pl_topics_release(&p->topics, t);
            drop_waits(c, false, NULL, 0); /* unfollows what nothing else needs */
            return 503;
        }
        follow(p, t);
        waiting++;
    }
    if (!waiting)
        return 0;
    pl_sync_topic_stats(p);
    c->syncs_waiting = waiting;
    c->parked = true;
    return PL_AUTH_WAIT;
}

bool pl_dist_command_ready(pl_conn *c, const char *topic, size_t len, const pl_position *since)
{
    pushlet_t *p = c->p;
    if (!p->dist)
        return true;
    pl_topic *t = pl_topics_get(&p->topics, topic, len);
    if (!t || t->sync == PL_SYNC_SYNCED)
        return true;
    for (pl_link *l = c->sync_waits.next; l != &c->sync_waits; l = l->next) {
        pl_sync_wait *w = pl_container_of(l, pl_sync_wait, by_conn);
        if (w->command && w->t == t)
            return false; /* asked twice: one answer when it caught up */
    }
    pl_sync_wait *w = new_wait(c, t, true);
    if (!w) {
        pl_topics_release(&p->topics, t);
        pl_ws_reply(c, "error", topic, "internal", "out of memory");
        return false;
    }
    if (since) {
        w->has_since = true;
        w->since = *since;
    }
    follow(p, t);
    pl_sync_topic_stats(p);
    return false;
}

bool pl_dist_cancel_command(pl_conn *c, const char *topic, size_t len)
{
    for (pl_link *l = c->sync_waits.next; l != &c->sync_waits; l = l->next) {
        pl_sync_wait *w = pl_container_of(l, pl_sync_wait, by_conn);
        if (w->command && w->t->name_len == len && memcmp(w->t->name, topic, len) == 0) {
            let_go(c->p, drop_wait(w));
            pl_sync_topic_stats(c->p);
            return true;
        }
    }
    return false;
}

void pl_dist_conn_gone(pl_conn *c)
{
    if (c->publish_wait) {
        c->publish_wait->c = NULL; /* published all the same; nobody to tell */
        c->publish_wait = NULL;
    }
    if (c->sync_waits.next != &c->sync_waits) {
        drop_waits(c, true, NULL, 0);
        pl_sync_topic_stats(c->p);
    }
}

void pl_dist_tick(pushlet_t *p)
{
    pl_dist *d = p->dist;
    if (!d)
        return;
    uint64_t now = uv_now(&p->loop);
    while (d->waits.next != &d->waits) {
        pl_sync_wait *w = pl_container_of(d->waits.next, pl_sync_wait, by_age);
        if (w->deadline > now)
            break;
        pl_conn *c = w->c;
        pl_log_conn(c, PUSHLET_LOG_WARN, "redis", "topic %s not joined in %lld ms: refused",
                    w->t->name, (long long)p->cfg.auth_timeout_ms);
        if (w->command) {
            char topic[256];
            memcpy(topic, w->t->name, (size_t)w->t->name_len + 1);
            let_go(p, drop_wait(w));
            pl_ws_reply(c, "error", topic, "unavailable", UNAVAILABLE);
        } else {
            drop_waits(c, false, NULL, 0);
            if (c->parked && !c->closing && !c->ending) {
                c->keep_alive = false;
                pl_respond_text(c, 503, "Retry-After: 1\r\n", UNAVAILABLE);
                pl_conn_unpark(c);
            }
        }
        pl_sync_topic_stats(p);
    }
    if (!d->refetch_due)
        return;
    d->refetch_due = false;
    for (uint32_t i = 0; i < p->topics.cap; i++) {
        pl_topic *t = p->topics.slots[i];
        if (t && t->refetch && !t->fetching && t->sync >= PL_SYNC_CATCHING)
            fetch(p, t);
    }
}

void pl_dist_topic_init(pushlet_t *p, pl_topic *t)
{
    t->epoch = p->dist->epoch ? p->dist->epoch : p->epoch;
    t->seq = 0; /* known once it catches up */
}

/* ---- Introspection (loop thread) ------------------------------------------------------------ */

size_t pl_dist_shards(const pushlet_t *p) { return p->dist ? p->dist->nshards : 0; }

bool pl_dist_shard_info(const pushlet_t *p, size_t i, pl_dist_shard_view *out)
{
    const pl_dist *d = p->dist;
    if (!d || i >= d->nshards)
        return false;
    const shard *s = &d->shards[i];
    out->where = s->where;
    out->state = state_name(s->state);
    out->ready = s->state == PL_REDIS_READY;
    out->error = s->error;
    out->pending = s->r ? pl_redis_pending(s->r) : 0;
    return true;
}
