/* Distributed mode's Redis client: two hiredis async connections on the broker's loop, a Lua
 * publish script, batched subscriptions, a bounded publish queue and reconnects. See redis.h.
 *
 * Every state transition (failure, teardown, READY) happens in step(), run from a zero-delay
 * timer: never inside a hiredis frame, so freeing a context there is immediate and safe. The
 * hiredis callbacks only record what happened and schedule step(). */
#include "redis.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Appends a message to its topic's history and publishes it with its ID, atomically.
 * KEYS: epoch, seq, stream, this client's publish record.
 * ARGV: topic, event, data, published_ms (0 = now), epoch candidate, history size, history age
 * ms, publish number (0 = no record), channel. Returns the ID "EPOCH-SEQ". */
static const char PUBLISH_LUA[] =
    "local n = ARGV[8]\n"
    "if n ~= '0' then\n"
    "  local done = redis.call('HGET', KEYS[4], n)\n"
    "  if done then return done end\n"
    "end\n"
    "local epoch = redis.call('GET', KEYS[1])\n"
    "if not epoch then\n"
    "  redis.call('SET', KEYS[1], ARGV[5], 'NX')\n"
    "  epoch = redis.call('GET', KEYS[1])\n"
    "end\n"
    "local seq = redis.call('INCR', KEYS[2])\n"
    "local keep = tonumber(ARGV[6])\n"
    "if seq == 1 and keep > 0 then\n"
    "  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)\n"
    "  if top[1] then\n"
    "    local s = tonumber(string.match(top[1][1], '^(%d+)%-'))\n"
    "    if s and s >= seq then\n"
    "      seq = s + 1\n"
    "      redis.call('SET', KEYS[2], string.format('%.0f', seq))\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local pub = tonumber(ARGV[4])\n"
    "if pub <= 0 then pub = now end\n"
    "local s = string.format('%.0f', seq)\n"
    "if keep > 0 then\n"
    "  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], s .. '-' .. string.format('%.0f', "
    "now),\n"
    "             'event', ARGV[2], 'data', ARGV[3], 'published_ms', string.format('%.0f', pub),\n"
    "             'seq', s)\n"
    "  local age = tonumber(ARGV[7])\n"
    "  if age > 0 then\n"
    "    local cut = now - age\n"
    "    for i = 1, 4 do\n"
    "      local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)\n"
    "      if not head[1] then break end\n"
    "      local hs, hms = string.match(head[1][1], '^(%d+)%-(%d+)$')\n"
    "      if tonumber(hms) >= cut then break end\n"
    "      redis.call('XTRIM', KEYS[3], 'MINID', string.format('%.0f-0', tonumber(hs) + 1))\n"
    "    end\n"
    "    redis.call('PEXPIRE', KEYS[3], ARGV[7])\n"
    "  end\n"
    "end\n"
    "redis.call('PUBLISH', ARGV[9], cmsgpack.pack({1, ARGV[1], ARGV[2], ARGV[3], epoch, seq, "
    "pub}))\n"
    "local id = epoch .. '-' .. s\n"
    "if n ~= '0' then\n"
    "  redis.call('HSET', KEYS[4], n, id)\n"
    "  local old = tonumber(n) - 1024\n"
    "  if old > 0 then redis.call('HDEL', KEYS[4], string.format('%.0f', old)) end\n"
    "  redis.call('PEXPIRE', KEYS[4], 86400000)\n"
    "end\n"
    "return id\n";

/* A topic's history after a sequence number, with the epoch and the last sequence, atomically.
 * KEYS: epoch, seq, stream. ARGV: after seq, count, age ms (0 = none).
 * Returns {epoch or "", last seq or "0", entries as XRANGE gives them}. */
static const char FETCH_LUA[] =
    "local epoch = redis.call('GET', KEYS[1])\n"
    "local last = redis.call('GET', KEYS[2])\n"
    "local from = string.format('%.0f-0', tonumber(ARGV[1]) + 1)\n"
    "local entries = redis.call('XRANGE', KEYS[3], from, '+', 'COUNT', tonumber(ARGV[2]))\n"
    "local age = tonumber(ARGV[3])\n"
    "if age > 0 and #entries > 0 then\n"
    "  local t = redis.call('TIME')\n"
    "  local cut = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age\n"
    "  local young = {}\n"
    "  for i = 1, #entries do\n"
    "    local ms = tonumber(string.match(entries[i][1], '%-(%d+)$'))\n"
    "    if ms and ms >= cut then young[#young + 1] = entries[i] end\n"
    "  end\n"
    "  entries = young\n"
    "end\n"
    "return {epoch or '', last or '0', entries}\n";

#define MAX_INFLIGHT  256  /* publishes sent and not answered; < the script's 1024 record */
#define MAX_PER_SUB   1024 /* channels per SUBSCRIBE / UNSUBSCRIBE command */
#define MAX_TRIES     5    /* NOSCRIPT retries of one command */
#define EPOCH_KEY     "pushlet:epoch"
#define ALL_CHANNEL   "pushlet:all"
#define CH_PREFIX     "pushlet:c:{"
#define CH_PREFIX_LEN (sizeof(CH_PREFIX) - 1)
#define KEY_MAX       160 /* "pushlet:x:{" + 128-byte topic + "}" */

enum { LINK_CMD = 0, LINK_SUB = 1 };

typedef struct rlink {
    pl_redis *r;
    redisAsyncContext *ac; /* NULL when none (never connected, lost, or freed) */
    bool started;          /* a context was made in this attempt */
    bool up;               /* handshake done */
} rlink;

enum { CH_NONE = 0, CH_SUBSCRIBING, CH_SUBSCRIBED, CH_UNSUBSCRIBING };

/* A topic channel: wanted or not by the owner, and where the server stands. */
typedef struct channel {
    struct channel *next; /* hash chain */
    struct channel *next_dirty;
    uint32_t hash;
    bool want, dirty;
    uint8_t server; /* CH_* */
    uint16_t topic_len;
    char name[]; /* "pushlet:c:{topic}", NUL-terminated */
} channel;

typedef struct pub_op {
    pl_link link; /* in r->ops, oldest first */
    pl_redis *r;
    bool sent;
    bool to_all;
    uint8_t tries;
    pl_redis_publish_cb cb;
    void *ud;
    size_t cmd_len;
    char *cmd; /* the formatted command */
} pub_op;

typedef struct fetch_op {
    pl_redis *r;
    pl_redis_history_cb cb;
    void *ud;
    uint8_t tries;
    size_t cmd_len;
    char *cmd;
    size_t topic_len;
    char topic[];
} fetch_op;

struct pl_redis {
    uv_loop_t *loop;
    pl_redis_options opt;
    pl_redis_addr addr;
    pl_redis_callbacks cb;
    char where[PL_REDIS_HOST_MAX + 8]; /* "host:port" or the socket path, for messages */
    char *password, *user;             /* NULL when none */
    int db;
    int state;
    bool closing, ever_ready, failed, work_queued, reload_inflight, rescan;
    int refs; /* timers, adapters and the resolver: r is freed when all are done */
    uv_timer_t work, retry, deadline;
    uv_getaddrinfo_t *gai; /* the current attempt's name lookup; older ones are ignored */
    char ip[PL_REDIS_HOST_MAX];
    rlink links[2];
    uint32_t backoff_step;
    uint64_t rng;
    char err[512];
    /* Publishes. */
    pl_link ops;
    pl_link *next_unsent; /* ops from here on are unsent (&ops: none), unless `rescan` */
    size_t nops, ops_bytes;
    uint32_t inflight;
    uint64_t pub_number;
    char node[17];
    char pub_sha[41], fetch_sha[41];
    char node_key[32], node_name[48], perm_channel[40];
    /* Channels. */
    channel **buckets;
    uint32_t nbuckets, nchannels;
    channel *dirty;
    uint32_t sub_pending; /* channels sent in SUBSCRIBE, not confirmed yet */
    pl_redis_stats stats;
};

static void step(pl_redis *r);
static void on_work(uv_timer_t *t);
static void flush_channels(pl_redis *r);
static void pump(pl_redis *r);

/* ---- Small helpers ----------------------------------------------------------------------------
 */

static uint64_t next_rand(pl_redis *r)
{
    /* xorshift64*: jitter only, seeded from the OS */
    uint64_t x = r->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->rng = x;
    return x * 2685821657736338717ull;
}

/* 48 random bits in base 36, the top one set so every epoch has the same length. */
static void new_epoch(pl_redis *r, char out[PL_ID_MAX])
{
    pl_position_format(out, (pl_position){.epoch = (next_rand(r) >> 16) | (1ull << 47), .seq = 0});
    *strchr(out, '-') = '\0';
}

static void sha1_hex(const char *s, size_t len, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(s, len, md, &n, EVP_sha1(), NULL) != 1 || n != 20) {
        out[0] = '\0';
        return;
    }
    for (unsigned i = 0; i < 20; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void schedule(pl_redis *r)
{
    if (r->closing || r->work_queued)
        return;
    r->work_queued = true;
    uv_timer_start(&r->work, on_work, 0, 0);
}

/* The first failure of an attempt wins; step() tears the attempt down. */
static void fail(pl_redis *r, const char *fmt, ...) PL_PRINTF(2, 3);
static void fail(pl_redis *r, const char *fmt, ...)
{
    if (r->closing || r->failed)
        return;
    r->failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof(r->err), fmt, ap);
    va_end(ap);
    /* One line: a Redis error text could hold a newline. */
    for (char *c = r->err; *c; c++)
        if (*c == '\r' || *c == '\n')
            *c = ' ';
    schedule(r);
}

static void set_state(pl_redis *r, int state, const char *error)
{
    if (r->state == state)
        return;
    r->state = state;
    if (r->cb.on_state != NULL)
        r->cb.on_state(r, state, error, r->cb.ud);
}

static void maybe_finish(pl_redis *r)
{
    if (!r->closing || r->refs > 0)
        return;
    while (r->ops.next != &r->ops) {
        pub_op *op = pl_container_of(r->ops.next, pub_op, link);
        pl_list_remove(&op->link);
        redisFreeCommand(op->cmd);
        free(op);
    }
    for (uint32_t i = 0; i < r->nbuckets; i++) {
        for (channel *c = r->buckets[i], *next; c != NULL; c = next) {
            next = c->next;
            free(c);
        }
    }
    free(r->buckets);
    free(r->password);
    free(r->user);
    free(r);
}

static void on_handle_closed(uv_handle_t *h)
{
    pl_redis *r = h->data;
    r->refs--;
    maybe_finish(r);
}

/* ---- Channels: a chained hash set of topics ----------------------------------------------- */

static uint32_t hash_topic(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= 16777619u;
    }
    return h;
}

static channel *ch_find(const pl_redis *r, const char *topic, size_t len)
{
    if (r->nbuckets == 0)
        return NULL;
    uint32_t h = hash_topic(topic, len);
    for (channel *c = r->buckets[h & (r->nbuckets - 1)]; c != NULL; c = c->next)
        if (c->hash == h && c->topic_len == len && memcmp(c->name + CH_PREFIX_LEN, topic, len) == 0)
            return c;
    return NULL;
}

static int ch_grow(pl_redis *r)
{
    uint32_t n = r->nbuckets ? r->nbuckets * 2 : 64;
    channel **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return PUSHLET_ENOMEM;
    for (uint32_t i = 0; i < r->nbuckets; i++) {
        for (channel *c = r->buckets[i], *next; c != NULL; c = next) {
            next = c->next;
            c->next = b[c->hash & (n - 1)];
            b[c->hash & (n - 1)] = c;
        }
    }
    free(r->buckets);
    r->buckets = b;
    r->nbuckets = n;
    return 0;
}

static channel *ch_add(pl_redis *r, const char *topic, size_t len)
{
    if (r->nchannels >= r->nbuckets && ch_grow(r) != 0)
        return NULL;
    channel *c = calloc(1, sizeof(*c) + CH_PREFIX_LEN + len + 2);
    if (c == NULL)
        return NULL;
    c->hash = hash_topic(topic, len);
    c->topic_len = (uint16_t)len;
    memcpy(c->name, CH_PREFIX, CH_PREFIX_LEN);
    memcpy(c->name + CH_PREFIX_LEN, topic, len);
    c->name[CH_PREFIX_LEN + len] = '}';
    c->name[CH_PREFIX_LEN + len + 1] = '\0';
    c->next = r->buckets[c->hash & (r->nbuckets - 1)];
    r->buckets[c->hash & (r->nbuckets - 1)] = c;
    r->nchannels++;
    return c;
}

/* Only from flush_channels() and teardown(), where `c` is on no dirty list. */
static void ch_remove(pl_redis *r, channel *c)
{
    channel **pp = &r->buckets[c->hash & (r->nbuckets - 1)];
    while (*pp != c)
        pp = &(*pp)->next;
    *pp = c->next;
    r->nchannels--;
    free(c);
}

static void ch_mark(pl_redis *r, channel *c)
{
    if (!c->dirty) {
        c->dirty = true;
        c->next_dirty = r->dirty;
        r->dirty = c;
    }
    schedule(r);
}

/* The topic of a "pushlet:c:{topic}" channel name; NULL when it is not one. */
static channel *ch_of_name(pl_redis *r, const redisReply *name)
{
    if (name->type != REDIS_REPLY_STRING || name->len < CH_PREFIX_LEN + 2 ||
        memcmp(name->str, CH_PREFIX, CH_PREFIX_LEN) != 0)
        return NULL;
    return ch_find(r, name->str + CH_PREFIX_LEN, name->len - CH_PREFIX_LEN - 1);
}

/* ---- Connections ----------------------------------------------------------------------------- */

static void on_gone(void *ud, redisAsyncContext *ac)
{
    rlink *l = ud;
    pl_redis *r = l->r;
    if (l->ac != ac)
        return; /* we freed it ourselves */
    l->ac = NULL;
    l->up = false;
    char msg[160];
    snprintf(msg, sizeof(msg), "%s", ac->err ? ac->errstr : "connection closed");
    if (msg[0] >= 'A' && msg[0] <= 'Z')
        msg[0] = (char)(msg[0] - 'A' + 'a');
    fail(r, "redis: %s (%s)", msg, r->where);
}

static void on_adapter_closed(void *ud)
{
    rlink *l = ud;
    l->r->refs--;
    maybe_finish(l->r);
}

static bool reply_error(const redisReply *rep) { return rep->type == REDIS_REPLY_ERROR; }

/* A handshake step failed; NOAUTH means the server wants a password we did not give. */
static void handshake_failed(pl_redis *r, const char *what, const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOAUTH", 6) == 0)
        fail(r, "redis: authentication required (%s)", rep->str);
    else
        fail(r, "redis: %s failed (%s)", what,
             rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected answer");
}

static void on_auth(redisAsyncContext *ac, void *reply, void *priv)
{
    rlink *l = priv;
    redisReply *rep = reply;
    if (rep == NULL || l->r->closing)
        return;
    if (reply_error(rep))
        fail(l->r, "redis: authentication failed (%s)", rep->str);
}

static void on_select(redisAsyncContext *ac, void *reply, void *priv)
{
    rlink *l = priv;
    redisReply *rep = reply;
    if (rep == NULL || l->r->closing)
        return;
    if (reply_error(rep))
        fail(l->r, "redis: SELECT %d failed (%s)", l->r->db, rep->str);
}

/* SCRIPT LOAD answers: privdata is the SHA we expect (computed locally). The fetch script's is
 * the last command of the handshake and of a reload. */
static void on_script_loaded(redisAsyncContext *ac, void *reply, void *priv)
{
    rlink *l = ac->data;
    pl_redis *r = l->r;
    redisReply *rep = reply;
    if (rep == NULL || r->closing)
        return;
    const char *want = priv;
    if (rep->type != REDIS_REPLY_STRING || rep->len != 40 || memcmp(rep->str, want, 40) != 0) {
        handshake_failed(r, "SCRIPT LOAD", rep);
        return;
    }
    if (want != r->fetch_sha)
        return;
    r->reload_inflight = false;
    if (!l->up) {
        l->up = true;
        schedule(r);
    } else {
        pump(r);
    }
}

static void load_scripts(pl_redis *r, redisAsyncContext *ac)
{
    redisAsyncCommand(ac, on_script_loaded, r->pub_sha, "SCRIPT LOAD %s", PUBLISH_LUA);
    redisAsyncCommand(ac, on_script_loaded, r->fetch_sha, "SCRIPT LOAD %s", FETCH_LUA);
    r->stats.script_loads += 2;
    r->reload_inflight = true;
}

static void deliver(pl_redis *r, const redisReply *payload, channel *c)
{
    pl_redis_record rec;
    r->stats.messages_in++;
    if (payload->type != REDIS_REPLY_STRING ||
        pl_redis_record_decode(payload->str, payload->len, &rec) != 0) {
        r->stats.decode_errors++;
        return;
    }
    if (c != NULL && (rec.topic_len != c->topic_len ||
                      memcmp(rec.topic, c->name + CH_PREFIX_LEN, rec.topic_len) != 0)) {
        r->stats.decode_errors++;
        return;
    }
    if (c == NULL && rec.topic_len != 0) {
        r->stats.decode_errors++;
        return;
    }
    if (r->cb.on_message != NULL)
        r->cb.on_message(r, &rec, r->cb.ud);
}

/* Every pub/sub answer of the subscriber connection: confirmations and messages. */
static void on_channel(redisAsyncContext *ac, void *reply, void *priv)
{
    rlink *l = priv;
    pl_redis *r = l->r;
    redisReply *rep = reply;
    if (rep == NULL || r->closing || rep->type != REDIS_REPLY_ARRAY || rep->elements < 3 ||
        rep->element[0]->type != REDIS_REPLY_STRING)
        return;
    const char *kind = rep->element[0]->str;
    const redisReply *name = rep->element[1];
    bool perm = name->type == REDIS_REPLY_STRING && strcmp(name->str, r->perm_channel) == 0;
    if (strcasecmp(kind, "message") == 0) {
        if (perm) {
            if (r->opt.subscribe_all)
                deliver(r, rep->element[2], NULL);
            return;
        }
        channel *c = ch_of_name(r, name);
        if (c != NULL && c->want && c->server == CH_SUBSCRIBED)
            deliver(r, rep->element[2], c);
    } else if (strcasecmp(kind, "subscribe") == 0) {
        if (perm) {
            l->up = true;
            schedule(r);
            return;
        }
        channel *c = ch_of_name(r, name);
        if (c != NULL && c->server == CH_SUBSCRIBING) {
            c->server = CH_SUBSCRIBED;
            r->sub_pending--;
            if (!c->want)
                ch_mark(r, c);
            if (r->sub_pending == 0)
                schedule(r);
            if (c->want && r->cb.on_subscribed != NULL)
                r->cb.on_subscribed(r, c->name + CH_PREFIX_LEN, c->topic_len, r->cb.ud);
        }
    } else if (strcasecmp(kind, "unsubscribe") == 0) {
        channel *c = ch_of_name(r, name);
        if (c != NULL && c->server == CH_UNSUBSCRIBING) {
            c->server = CH_NONE;
            ch_mark(r, c); /* freed, or subscribed again, by the next flush */
        }
    }
}

/* The subscriber connection is logged in: listen on the permanent channel. Its confirmation
 * marks the link up. (A connection always keeps that one channel, so hiredis never leaves
 * subscribed mode while SUBSCRIBEs are in flight.) */
static void on_sub_named(redisAsyncContext *ac, void *reply, void *priv)
{
    rlink *l = priv;
    if (reply == NULL || l->r->closing || l->r->failed)
        return;
    if (reply_error(reply)) {
        handshake_failed(l->r, "CLIENT SETNAME", reply);
        return;
    }
    redisAsyncCommand(ac, on_channel, l, "SUBSCRIBE %s", l->r->perm_channel);
    l->r->stats.subscribe_commands++;
}

static void open_link(pl_redis *r, int kind)
{
    rlink *l = &r->links[kind];
    redisAsyncContext *ac = r->addr.is_unix ? redisAsyncConnectUnix(r->addr.host)
                                            : redisAsyncConnect(r->ip, r->addr.port);
    if (ac == NULL) {
        fail(r, "redis: out of memory connecting to %s", r->where);
        return;
    }
    if (ac->err) {
        /* Failed at once (no adapter yet): free it here, nothing else knows it. */
        char msg[160];
        snprintf(msg, sizeof(msg), "%s", ac->errstr);
        redisAsyncFree(ac);
        if (msg[0] >= 'A' && msg[0] <= 'Z')
            msg[0] = (char)(msg[0] - 'A' + 'a');
        fail(r, "redis: cannot connect to %s (%s)", r->where, msg);
        return;
    }
    ac->data = l;
    int rc = pl_redis_uv_attach(ac, r->loop, on_gone, on_adapter_closed, l);
    if (rc != 0) {
        redisAsyncFree(ac);
        fail(r, "redis: cannot watch the connection to %s (%s)", r->where, uv_strerror(rc));
        return;
    }
    r->refs++;
    l->ac = ac;
    l->started = true;
    l->up = false;
    if (!r->addr.is_unix)
        redisEnableKeepAlive(&ac->c);

    /* The handshake, pipelined: each answer is checked by its own callback, the first error
     * fails the attempt. */
    if (r->password != NULL) {
        if (r->user != NULL)
            redisAsyncCommand(ac, on_auth, l, "AUTH %s %s", r->user, r->password);
        else
            redisAsyncCommand(ac, on_auth, l, "AUTH %s", r->password);
    }
    if (kind == LINK_CMD) {
        redisAsyncCommand(ac, NULL, NULL, "CLIENT SETNAME %s-cmd", r->node_name);
        if (r->db != 0)
            redisAsyncCommand(ac, on_select, l, "SELECT %d", r->db);
        load_scripts(r, ac);
    } else {
        redisAsyncCommand(ac, on_sub_named, l, "CLIENT SETNAME %s-sub", r->node_name);
    }
}

static void open_links(pl_redis *r)
{
    open_link(r, LINK_CMD);
    if (!r->failed)
        open_link(r, LINK_SUB);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    pl_redis *r = req->data;
    bool current = req == r->gai;
    free(req);
    r->refs--;
    if (current)
        r->gai = NULL;
    if (r->closing || !current || r->state != PL_REDIS_CONNECTING || r->failed) {
        uv_freeaddrinfo(res);
        maybe_finish(r);
        return;
    }
    if (status < 0 || res == NULL) {
        fail(r, "redis: cannot resolve %s (%s)", r->addr.host, uv_strerror(status));
    } else {
        int rc = res->ai_family == AF_INET6
                     ? uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, r->ip, sizeof(r->ip))
                     : uv_ip4_name((struct sockaddr_in *)res->ai_addr, r->ip, sizeof(r->ip));
        if (rc != 0)
            fail(r, "redis: cannot resolve %s (%s)", r->addr.host, uv_strerror(rc));
        else
            open_links(r);
    }
    uv_freeaddrinfo(res);
}

static void on_deadline(uv_timer_t *t)
{
    pl_redis *r = t->data;
    fail(r, "redis: timed out connecting to %s", r->where);
}

static void start_attempt(pl_redis *r)
{
    r->failed = false;
    set_state(r, PL_REDIS_CONNECTING, NULL);
    if (r->closing)
        return;
    uv_timer_start(&r->deadline, on_deadline, r->opt.connect_timeout_ms, 0);
    if (r->addr.is_unix) {
        open_links(r);
        return;
    }
    unsigned char tmp[16];
    if (uv_inet_pton(AF_INET, r->addr.host, tmp) == 0 ||
        uv_inet_pton(AF_INET6, r->addr.host, tmp) == 0) {
        snprintf(r->ip, sizeof(r->ip), "%s", r->addr.host);
        open_links(r);
        return;
    }
    /* hiredis would resolve a name with a blocking getaddrinfo: do it on the thread pool. */
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    uv_getaddrinfo_t *req = malloc(sizeof(*req));
    if (req == NULL) {
        fail(r, "redis: out of memory");
        return;
    }
    req->data = r;
    int rc = uv_getaddrinfo(r->loop, req, on_resolved, r->addr.host, NULL, &hints);
    if (rc != 0) {
        free(req);
        fail(r, "redis: cannot resolve %s (%s)", r->addr.host, uv_strerror(rc));
        return;
    }
    r->gai = req;
    r->refs++;
}

static void on_retry(uv_timer_t *t) { start_attempt(t->data); }

/* Ends the current attempt: frees both contexts (their pending callbacks run with no reply:
 * publishes in flight become unsent), resets the channels, goes DOWN and arms the retry. */
static void teardown(pl_redis *r)
{
    uv_timer_stop(&r->deadline);
    if (r->gai != NULL) {
        uv_cancel((uv_req_t *)r->gai); /* its callback, whenever it runs, is then ignored */
        r->gai = NULL;
    }
    bool was_ready = r->state == PL_REDIS_READY;
    for (int i = 0; i < 2; i++)
        r->links[i].up = false;
    for (int i = 0; i < 2 && !r->closing; i++) {
        rlink *l = &r->links[i];
        redisAsyncContext *ac = l->ac;
        l->ac = NULL;
        l->started = false;
        if (ac != NULL)
            redisAsyncFree(ac);
    }
    if (r->closing)
        return;
    r->reload_inflight = false;
    r->sub_pending = 0;
    r->inflight = 0;
    r->rescan = true;
    /* Every wanted channel must be subscribed again; the others can go. */
    for (channel *c = r->dirty; c != NULL; c = c->next_dirty)
        c->dirty = false;
    r->dirty = NULL;
    for (uint32_t i = 0; i < r->nbuckets; i++) {
        for (channel *c = r->buckets[i], *next; c != NULL; c = next) {
            next = c->next;
            c->server = CH_NONE;
            if (!c->want)
                ch_remove(r, c);
            else
                ch_mark(r, c);
        }
    }
    if (was_ready)
        r->stats.disconnects++;
    set_state(r, PL_REDIS_DOWN, r->err);
    if (r->closing)
        return;
    uint64_t delay = (uint64_t)r->opt.backoff_min_ms
                     << (r->backoff_step < 16 ? r->backoff_step : 16);
    if (delay > r->opt.backoff_max_ms)
        delay = r->opt.backoff_max_ms;
    else
        r->backoff_step++;
    delay = delay / 2 + next_rand(r) % (delay / 2 + 1); /* jitter: nodes do not retry in step */
    uv_timer_start(&r->retry, on_retry, delay, 0);
}

static void become_ready(pl_redis *r)
{
    uv_timer_stop(&r->deadline);
    r->backoff_step = 0;
    r->stats.connects++;
    bool again = r->ever_ready;
    r->ever_ready = true;
    r->err[0] = '\0';
    set_state(r, PL_REDIS_READY, NULL);
    if (r->closing)
        return;
    if (again && r->cb.on_resync != NULL)
        r->cb.on_resync(r, r->cb.ud);
}

static void step(pl_redis *r)
{
    if (r->closing || r->state == PL_REDIS_DOWN)
        return;
    if (r->failed) {
        teardown(r);
        return;
    }
    if (r->links[LINK_SUB].up)
        flush_channels(r);
    if (r->state == PL_REDIS_CONNECTING && r->links[LINK_CMD].up && r->links[LINK_SUB].up &&
        r->sub_pending == 0 && r->dirty == NULL)
        become_ready(r);
    if (!r->closing)
        pump(r);
}

static void on_work(uv_timer_t *t)
{
    pl_redis *r = t->data;
    r->work_queued = false;
    step(r);
}

/* ---- Subscriptions -------------------------------------------------------------------------- */

static void send_batch(pl_redis *r, const char *cmd, const char **names, size_t n)
{
    rlink *l = &r->links[LINK_SUB];
    const char *argv[MAX_PER_SUB + 1];
    size_t lens[MAX_PER_SUB + 1];
    for (size_t off = 0; off < n; off += MAX_PER_SUB) {
        size_t k = n - off < MAX_PER_SUB ? n - off : MAX_PER_SUB;
        argv[0] = cmd;
        lens[0] = strlen(cmd);
        for (size_t i = 0; i < k; i++) {
            argv[1 + i] = names[off + i];
            lens[1 + i] = strlen(names[off + i]);
        }
        if (redisAsyncCommandArgv(l->ac, on_channel, l, (int)(k + 1), argv, lens) != REDIS_OK) {
            fail(r, "redis: cannot send %s to %s", cmd, r->where);
            return;
        }
        if (cmd[0] == 'S')
            r->stats.subscribe_commands++;
        else
            r->stats.unsubscribe_commands++;
    }
}

/* One SUBSCRIBE and one UNSUBSCRIBE for everything that changed since the last flush. */
static void flush_channels(pl_redis *r)
{
    rlink *l = &r->links[LINK_SUB];
    if (r->dirty == NULL || !l->up || l->ac == NULL)
        return;
    size_t n = 0;
    for (channel *c = r->dirty; c != NULL; c = c->next_dirty)
        n++;
    const char **subs = malloc(n * sizeof(*subs)), **unsubs = malloc(n * sizeof(*unsubs));
    if (subs == NULL || unsubs == NULL) {
        free(subs);
        free(unsubs);
        fail(r, "redis: out of memory");
        return;
    }
    size_t ns = 0, nu = 0;
    channel *c = r->dirty, *drop = NULL;
    r->dirty = NULL;
    while (c != NULL) {
        channel *next = c->next_dirty;
        c->dirty = false;
        if (c->want && c->server == CH_NONE) {
            subs[ns++] = c->name;
            c->server = CH_SUBSCRIBING;
            r->sub_pending++;
        } else if (!c->want && c->server == CH_SUBSCRIBED) {
            unsubs[nu++] = c->name;
            c->server = CH_UNSUBSCRIBING;
        } else if (!c->want && c->server == CH_NONE) {
            c->next_dirty = drop; /* freed after the commands are formatted */
            drop = c;
        } /* in flight either way: looked at again when the confirmation arrives */
        c = next;
    }
    if (ns > 0)
        send_batch(r, "SUBSCRIBE", subs, ns);
    if (nu > 0 && !r->failed)
        send_batch(r, "UNSUBSCRIBE", unsubs, nu);
    while (drop != NULL) {
        channel *next = drop->next_dirty;
        ch_remove(r, drop);
        drop = next;
    }
    free(subs);
    free(unsubs);
}

static int check_topic(const char *topic, size_t len)
{
    return topic != NULL && pl_topic_name_valid(topic, len) ? 0 : PUSHLET_EINVAL;
}

int pl_redis_subscribe(pl_redis *r, const char *topic, size_t len)
{
    if (check_topic(topic, len) != 0)
        return PUSHLET_EINVAL;
    channel *c = ch_find(r, topic, len);
    if (c == NULL && (c = ch_add(r, topic, len)) == NULL)
        return PUSHLET_ENOMEM;
    if (!c->want) {
        c->want = true;
        ch_mark(r, c);
    }
    return c->server == CH_SUBSCRIBED && r->links[LINK_SUB].up ? 1 : 0;
}

int pl_redis_unsubscribe(pl_redis *r, const char *topic, size_t len)
{
    if (check_topic(topic, len) != 0)
        return PUSHLET_EINVAL;
    channel *c = ch_find(r, topic, len);
    if (c != NULL && c->want) {
        c->want = false;
        ch_mark(r, c);
    }
    return 0;
}

/* ---- Publishing ----------------------------------------------------------------------------- */

static void on_publish_reply(redisAsyncContext *ac, void *reply, void *priv);

static void pump(pl_redis *r)
{
    rlink *l = &r->links[LINK_CMD];
    if (!l->up || l->ac == NULL || r->closing)
        return;
    pl_link *it = r->rescan ? r->ops.next : r->next_unsent;
    r->rescan = false;
    for (; it != &r->ops; it = it->next) {
        pub_op *op = pl_container_of(it, pub_op, link);
        if (op->sent)
            continue;
        if (r->inflight >= MAX_INFLIGHT)
            break;
        if (redisAsyncFormattedCommand(l->ac, on_publish_reply, op, op->cmd, op->cmd_len) !=
            REDIS_OK)
            break;
        op->sent = true;
        r->inflight++;
        if (op->tries++ > 0)
            r->stats.resent++;
    }
    r->next_unsent = it;
}

static void unsent(pl_redis *r, pub_op *op)
{
    op->sent = false;
    r->rescan = true;
}

static void on_publish_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    pub_op *op = priv;
    pl_redis *r = op->r;
    redisReply *rep = reply;
    if (r->closing)
        return; /* the op is freed with the client */
    if (r->inflight > 0)
        r->inflight--;
    if (rep == NULL) {
        unsent(r, op); /* sent again on reconnect; the script's record makes that safe */
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
        op->tries < MAX_TRIES) {
        /* SCRIPT FLUSH or a restarted server: load again, then resend (the load is ahead in
         * the pipeline). */
        unsent(r, op);
        if (!r->reload_inflight)
            load_scripts(r, ac);
        pump(r);
        return;
    }
    pl_list_remove(&op->link);
    r->nops--;
    r->ops_bytes -= op->cmd_len;
    int status = 0;
    uint64_t epoch = 0, seq = 0;
    char id[PL_ID_MAX] = "";
    char err[256] = "";
    if (rep->type == REDIS_REPLY_ERROR) {
        status = PUSHLET_ESYSTEM;
        snprintf(err, sizeof(err), "redis: publish failed (%s)", rep->str);
    } else if (op->to_all) {
        if (rep->type != REDIS_REPLY_INTEGER) {
            status = PUSHLET_ESYSTEM;
            snprintf(err, sizeof(err), "redis: publish failed (unexpected answer)");
        }
    } else if (rep->type != REDIS_REPLY_STRING || rep->len >= sizeof(id) ||
               pl_redis_parse_id(rep->str, rep->len, &epoch, &seq) != 0) {
        status = PUSHLET_ESYSTEM;
        snprintf(err, sizeof(err), "redis: publish failed (unexpected answer)");
    } else {
        memcpy(id, rep->str, rep->len);
        id[rep->len] = '\0';
    }
    if (status == 0)
        r->stats.published++;
    else
        r->stats.publish_errors++;
    pl_redis_publish_cb cb = op->cb;
    void *ud = op->ud;
    redisFreeCommand(op->cmd);
    free(op);
    if (cb != NULL)
        cb(r, status, id, epoch, seq, status ? err : NULL, ud);
    if (!r->closing)
        pump(r);
}

static int enqueue(pl_redis *r, int argc, const char **argv, const size_t *lens, bool to_all,
                   pl_redis_publish_cb cb, void *ud)
{
    if (r->nops >= r->opt.queue_max_count)
        return PUSHLET_EFULL;
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, argc, argv, lens);
    if (len < 0 || cmd == NULL)
        return PUSHLET_ENOMEM;
    if (r->ops_bytes + (size_t)len > r->opt.queue_max_bytes) {
        redisFreeCommand(cmd);
        return PUSHLET_EFULL;
    }
    pub_op *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        redisFreeCommand(cmd);
        return PUSHLET_ENOMEM;
    }
    op->r = r;
    op->to_all = to_all;
    op->cb = cb;
    op->ud = ud;
    op->cmd = cmd;
    op->cmd_len = (size_t)len;
    pl_list_push(&r->ops, &op->link);
    if (r->next_unsent == &r->ops)
        r->next_unsent = &op->link;
    r->nops++;
    r->ops_bytes += (size_t)len;
    pump(r);
    return 0;
}

static size_t key_of(char *out, const char *kind, const char *topic, size_t len)
{
    return (size_t)snprintf(out, KEY_MAX, "pushlet:%s:{%.*s}", kind, (int)len, topic);
}

static int check_event(const char **event, size_t *len)
{
    if (*len == 0 || *event == NULL) {
        *event = "message";
        *len = 7;
        return 0;
    }
    return pl_event_name_valid(*event, *len) ? 0 : PUSHLET_EINVAL;
}

int pl_redis_publish(pl_redis *r, const char *topic, size_t topic_len, const char *event,
                     size_t event_len, const char *data, size_t data_len, int64_t published_ms,
                     pl_redis_publish_cb cb, void *ud)
{
    if (r->closing || check_topic(topic, topic_len) != 0 || check_event(&event, &event_len) != 0 ||
        (data == NULL && data_len > 0))
        return PUSHLET_EINVAL;
    char k_seq[KEY_MAX], k_stream[KEY_MAX], channel_name[KEY_MAX];
    char pub[24], keep[16], age[24], number[24], candidate[PL_ID_MAX];
    size_t n_seq = key_of(k_seq, "s", topic, topic_len);
    size_t n_stream = key_of(k_stream, "h", topic, topic_len);
    size_t n_ch = key_of(channel_name, "c", topic, topic_len);
    snprintf(pub, sizeof(pub), "%lld", (long long)(published_ms > 0 ? published_ms : 0));
    snprintf(keep, sizeof(keep), "%u", r->opt.history_size);
    snprintf(age, sizeof(age), "%lld", (long long)r->opt.history_age_ms);
    snprintf(number, sizeof(number), "%llu", (unsigned long long)(r->pub_number + 1));
    /* A fresh candidate each time: after Redis lost its data, the next epoch must differ from
     * every earlier one, whichever client sets it. */
    new_epoch(r, candidate);
    const char *argv[] = {"EVALSHA",   r->pub_sha, "4",    EPOCH_KEY,        k_seq, k_stream,
                          r->node_key, topic,      event,  data ? data : "", pub,   candidate,
                          keep,        age,        number, channel_name};
    size_t lens[] = {7,
                     40,
                     1,
                     sizeof(EPOCH_KEY) - 1,
                     n_seq,
                     n_stream,
                     strlen(r->node_key),
                     topic_len,
                     event_len,
                     data_len,
                     strlen(pub),
                     strlen(candidate),
                     strlen(keep),
                     strlen(age),
                     strlen(number),
                     n_ch};
    int rc = enqueue(r, 16, argv, lens, false, cb, ud);
    if (rc == 0)
        r->pub_number++;
    return rc;
}

int pl_redis_publish_all(pl_redis *r, const char *event, size_t event_len, const char *data,
                         size_t data_len, int64_t published_ms, pl_redis_publish_cb cb, void *ud)
{
    if (r->closing || check_event(&event, &event_len) != 0 || (data == NULL && data_len > 0))
        return PUSHLET_EINVAL;
    if (published_ms <= 0) {
        uv_timeval64_t tv;
        uv_gettimeofday(&tv);
        published_ms = tv.tv_sec * 1000 + tv.tv_usec / 1000;
    }
    pl_redis_record rec = {.topic = "",
                           .event = event,
                           .event_len = event_len,
                           .data = data ? data : "",
                           .data_len = data_len,
                           .published_ms = published_ms};
    char *payload;
    size_t payload_len;
    if (pl_redis_record_encode(&rec, &payload, &payload_len) != 0)
        return PUSHLET_ENOMEM;
    const char *argv[] = {"PUBLISH", ALL_CHANNEL, payload};
    size_t lens[] = {7, sizeof(ALL_CHANNEL) - 1, payload_len};
    int rc = enqueue(r, 3, argv, lens, true, cb, ud);
    free(payload);
    return rc;
}

/* ---- History fetches --------------------------------------------------------------------------
 */

static bool reply_u64(const redisReply *rep, uint64_t *out)
{
    if (rep->type == REDIS_REPLY_INTEGER) {
        *out = (uint64_t)rep->integer;
        return rep->integer >= 0;
    }
    if (rep->type != REDIS_REPLY_STRING || rep->len == 0 || rep->len > 19)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < rep->len; i++) {
        if (rep->str[i] < '0' || rep->str[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(rep->str[i] - '0');
    }
    *out = v;
    return true;
}

/* One XRANGE entry: [id, [field, value, ...]]. */
static bool decode_entry(const redisReply *e, const fetch_op *f, pl_redis_record *out)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
        e->element[1]->type != REDIS_REPLY_ARRAY)
        return false;
    memset(out, 0, sizeof(*out));
    out->topic = f->topic;
    out->topic_len = f->topic_len;
    bool has_seq = false, has_event = false, has_data = false;
    const redisReply *fields = e->element[1];
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *k = fields->element[i], *v = fields->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            return false;
        uint64_t u;
        if (strcmp(k->str, "event") == 0) {
            out->event = v->str;
            out->event_len = v->len;
            has_event = true;
        } else if (strcmp(k->str, "data") == 0) {
            out->data = v->str;
            out->data_len = v->len;
            has_data = true;
        } else if (strcmp(k->str, "seq") == 0) {
            if (!reply_u64(v, &out->seq))
                return false;
            has_seq = true;
        } else if (strcmp(k->str, "published_ms") == 0) {
            if (!reply_u64(v, &u))
                return false;
            out->published_ms = (int64_t)u;
        }
    }
    return has_seq && has_event && has_data && out->seq > 0;
}

static void on_fetch_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    fetch_op *f = priv;
    pl_redis *r = f->r;
    redisReply *rep = reply;
    pl_redis_record *recs = NULL;
    size_t n = 0;
    uint64_t epoch = 0, last = 0;
    char err[640] = "";
    if (r->closing)
        goto done;
    if (rep == NULL) {
        snprintf(err, sizeof(err), "redis: connection lost (%s)", r->where);
    } else if (rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
               f->tries < MAX_TRIES) {
        f->tries++;
        if (!r->reload_inflight)
            load_scripts(r, ac);
        if (redisAsyncFormattedCommand(ac, on_fetch_reply, f, f->cmd, f->cmd_len) == REDIS_OK)
            return;
        snprintf(err, sizeof(err), "redis: history fetch failed (cannot resend)");
    } else if (rep->type == REDIS_REPLY_ERROR) {
        snprintf(err, sizeof(err), "redis: history fetch failed (%s)", rep->str);
    } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 ||
               rep->element[0]->type != REDIS_REPLY_STRING ||
               rep->element[2]->type != REDIS_REPLY_ARRAY || !reply_u64(rep->element[1], &last)) {
        snprintf(err, sizeof(err), "redis: history fetch failed (unexpected answer)");
    } else {
        const redisReply *e = rep->element[0], *entries = rep->element[2];
        if (e->len > 0) { /* "" = no epoch yet: nothing was ever published */
            char tmp[32];
            uint64_t zero;
            int k = snprintf(tmp, sizeof(tmp), "%.*s-0", (int)e->len, e->str);
            if (k <= 0 || (size_t)k >= sizeof(tmp) ||
                pl_redis_parse_id(tmp, (size_t)k, &epoch, &zero) != 0)
                snprintf(err, sizeof(err), "redis: history fetch failed (bad epoch)");
        }
        if (err[0] == '\0' && entries->elements > 0) {
            recs = calloc(entries->elements, sizeof(*recs));
            if (recs == NULL)
                snprintf(err, sizeof(err), "redis: out of memory");
            for (size_t i = 0; recs != NULL && i < entries->elements; i++) {
                if (!decode_entry(entries->element[i], f, &recs[n])) {
                    snprintf(err, sizeof(err), "redis: history fetch failed (malformed entry)");
                    break;
                }
                recs[n++].epoch = epoch;
            }
        }
    }
    if (f->cb != NULL) {
        if (err[0] != '\0')
            f->cb(r, PUSHLET_ESYSTEM, 0, 0, NULL, 0, err, f->ud);
        else
            f->cb(r, 0, epoch, last, recs, n, NULL, f->ud);
    }
done:
    free(recs);
    redisFreeCommand(f->cmd);
    free(f);
}

int pl_redis_fetch(pl_redis *r, const char *topic, size_t len, uint64_t after_seq, uint32_t max,
                   pl_redis_history_cb cb, void *ud)
{
    if (r->closing || check_topic(topic, len) != 0)
        return PUSHLET_EINVAL;
    rlink *l = &r->links[LINK_CMD];
    if (r->state != PL_REDIS_READY || !l->up || l->ac == NULL)
        return PUSHLET_ESTOPPED;
    if (max == 0 || max > r->opt.fetch_max)
        max = r->opt.fetch_max;
    char k_seq[KEY_MAX], k_stream[KEY_MAX], after[24], count[16], age[24];
    size_t n_seq = key_of(k_seq, "s", topic, len);
    size_t n_stream = key_of(k_stream, "h", topic, len);
    snprintf(after, sizeof(after), "%llu", (unsigned long long)after_seq);
    snprintf(count, sizeof(count), "%u", max);
    snprintf(age, sizeof(age), "%lld", (long long)r->opt.history_age_ms);
    const char *argv[] = {"EVALSHA", r->fetch_sha, "3",   EPOCH_KEY, k_seq,
                          k_stream,  after,        count, age};
    size_t lens[] = {
        7,          40, 1, sizeof(EPOCH_KEY) - 1, n_seq, n_stream, strlen(after), strlen(count),
        strlen(age)};
    fetch_op *f = calloc(1, sizeof(*f) + len + 1);
    if (f == NULL)
        return PUSHLET_ENOMEM;
    int n = redisFormatCommandArgv(&f->cmd, 9, argv, lens);
    if (n < 0 || f->cmd == NULL) {
        free(f);
        return PUSHLET_ENOMEM;
    }
    f->cmd_len = (size_t)n;
    f->r = r;
    f->cb = cb;
    f->ud = ud;
    f->topic_len = len;
    memcpy(f->topic, topic, len);
    if (redisAsyncFormattedCommand(l->ac, on_fetch_reply, f, f->cmd, f->cmd_len) != REDIS_OK) {
        redisFreeCommand(f->cmd);
        free(f);
        return PUSHLET_ESTOPPED;
    }
    return 0;
}

/* ---- Lifecycle ------------------------------------------------------------------------------- */

void pl_redis_options_init(pl_redis_options *o)
{
    memset(o, 0, sizeof(*o));
    o->db = -1;
    o->history_size = 1000;
    o->queue_max_count = 10000;
    o->queue_max_bytes = 16u << 20;
    o->backoff_min_ms = 100;
    o->backoff_max_ms = 5000;
    o->connect_timeout_ms = 5000;
    o->fetch_max = 1000;
    o->subscribe_all = true;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

int pl_redis_new(pl_redis **out, uv_loop_t *loop, const pl_redis_options *o,
                 const pl_redis_callbacks *cb)
{
    *out = NULL;
    if (loop == NULL || o == NULL || o->address == NULL || o->history_age_ms < 0 ||
        o->queue_max_count == 0 || o->backoff_min_ms == 0 ||
        o->backoff_max_ms < o->backoff_min_ms || o->connect_timeout_ms == 0 || o->fetch_max == 0)
        return PUSHLET_EINVAL;
    pl_redis *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return PUSHLET_ENOMEM;
    if (pl_redis_parse_address(o->address, &r->addr) != 0) {
        free(r);
        return PUSHLET_EINVAL;
    }
    r->loop = loop;
    r->opt = *o;
    r->opt.address = NULL; /* not kept: parsed into r->addr */
    r->opt.password = NULL;
    if (cb != NULL)
        r->cb = *cb;
    const char *pw = o->password != NULL    ? o->password
                     : r->addr.has_password ? r->addr.password
                                            : NULL;
    if (pw != NULL && pw[0] != '\0' && (r->password = dup_str(pw)) == NULL)
        goto nomem;
    if (r->password != NULL && r->addr.user[0] != '\0' && (r->user = dup_str(r->addr.user)) == NULL)
        goto nomem;
    r->db = o->db >= 0 ? o->db : r->addr.db >= 0 ? r->addr.db : 0;
    if (r->addr.is_unix)
        snprintf(r->where, sizeof(r->where), "%s", r->addr.host);
    else if (strchr(r->addr.host, ':') != NULL)
        snprintf(r->where, sizeof(r->where), "[%s]:%d", r->addr.host, r->addr.port);
    else
        snprintf(r->where, sizeof(r->where), "%s:%d", r->addr.host, r->addr.port);

    uint64_t seed[2] = {0, 0};
    if (uv_random(NULL, NULL, seed, sizeof(seed), 0, NULL) != 0) {
        uv_timeval64_t tv;
        uv_gettimeofday(&tv);
        seed[0] = (uint64_t)tv.tv_sec * 1000003u ^ (uint64_t)tv.tv_usec ^ (uintptr_t)r;
        seed[1] = seed[0] * 0x9E3779B97F4A7C15ull;
    }
    r->rng = seed[0] | 1;
    snprintf(r->node, sizeof(r->node), "%016llx", (unsigned long long)seed[1]);
    snprintf(r->node_key, sizeof(r->node_key), "pushlet:n:%s", r->node);
    snprintf(r->node_name, sizeof(r->node_name), "pushlet-%s", r->node);
    if (o->subscribe_all)
        snprintf(r->perm_channel, sizeof(r->perm_channel), "%s", ALL_CHANNEL);
    else
        snprintf(r->perm_channel, sizeof(r->perm_channel), "pushlet:node:%s", r->node);
    sha1_hex(PUBLISH_LUA, sizeof(PUBLISH_LUA) - 1, r->pub_sha);
    sha1_hex(FETCH_LUA, sizeof(FETCH_LUA) - 1, r->fetch_sha);
    if (r->pub_sha[0] == '\0' || r->fetch_sha[0] == '\0')
        goto nomem;
    pl_list_init(&r->ops);
    r->next_unsent = &r->ops;
    for (int i = 0; i < 2; i++)
        r->links[i].r = r;

    uv_timer_init(loop, &r->work);
    uv_timer_init(loop, &r->retry);
    uv_timer_init(loop, &r->deadline);
    r->work.data = r->retry.data = r->deadline.data = r;
    r->refs = 3;
    /* Starts CONNECTING without a callback: pl_redis_new() never calls back. An immediate
     * failure is reported from the loop. */
    r->state = PL_REDIS_CONNECTING;
    start_attempt(r);
    *out = r;
    return 0;
nomem:
    free(r->password);
    free(r->user);
    free(r);
    return PUSHLET_ENOMEM;
}

void pl_redis_free(pl_redis *r)
{
    if (r == NULL || r->closing)
        return;
    r->closing = true;
    memset(&r->cb, 0, sizeof(r->cb));
    for (int i = 0; i < 2; i++) {
        rlink *l = &r->links[i];
        redisAsyncContext *ac = l->ac;
        l->ac = NULL;
        l->up = false;
        if (ac != NULL)
            redisAsyncFree(ac); /* deferred by hiredis when inside one of its callbacks */
    }
    if (r->gai != NULL) {
        uv_cancel((uv_req_t *)r->gai);
        r->gai = NULL;
    }
    uv_close((uv_handle_t *)&r->work, on_handle_closed);
    uv_close((uv_handle_t *)&r->retry, on_handle_closed);
    uv_close((uv_handle_t *)&r->deadline, on_handle_closed);
}

int pl_redis_state_of(const pl_redis *r) { return r->state; }
const char *pl_redis_last_error(const pl_redis *r) { return r->err; }
size_t pl_redis_pending(const pl_redis *r) { return r->nops; }

void pl_redis_get_stats(const pl_redis *r, pl_redis_stats *out)
{
    *out = r->stats;
    out->channels = 0;
    for (uint32_t i = 0; i < r->nbuckets; i++)
        for (channel *c = r->buckets[i]; c != NULL; c = c->next)
            out->channels += c->want;
}
