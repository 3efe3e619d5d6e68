/* Distributed mode's Redis layer (issue #5): one client per Redis shard, on the broker's loop.
 *
 * A pl_redis keeps two hiredis async connections to one Redis server, driven by our own libuv
 * adapter (redis_uv.c): a command connection (publish script, history fetches) and a pub/sub
 * connection (topic channels, the broadcast channel). Nothing here ever blocks the loop:
 * names are resolved with uv_getaddrinfo, connects are non-blocking and bounded by a timeout.
 *
 * Keys and channels (the topic's name is inside braces, a Redis Cluster hash tag):
 *   pushlet:epoch          the cluster epoch, 48 random bits in base 36, set once (SET NX)
 *   pushlet:s:{topic}      the topic's last sequence number (INCR)
 *   pushlet:h:{topic}      the topic's history: a stream whose entry IDs are "<seq>-<redis ms>",
 *                          fields event, data, published_ms, seq; trimmed by count (MAXLEN ~)
 *                          and by age (each publish trims up to 4 expired head entries, the
 *                          key expires when idle, and fetches skip what is older)
 *   pushlet:n:<node>       per client: publish number -> ID of its last 1024 publishes, so a
 *                          publish resent after a lost reply is applied once
 *   pushlet:c:{topic}      the topic's pub/sub channel; payload: a record (below)
 *   pushlet:all            publish-to-all (no history)
 *
 * Record (pub/sub payload), MessagePack: the array [1, topic, event, data, epoch, seq,
 * published_ms]: version 1, topic/event/data as str, epoch as the base-36 str, seq and
 * published_ms as integers. Publish-to-all records have topic "", epoch "" and seq 0.
 *
 * States: CONNECTING -> READY (both connections up, scripts loaded, every wanted channel
 * subscribed) -> DOWN (with a one-line error) -> CONNECTING after a backoff (exponential between
 * backoff_min_ms and backoff_max_ms, with jitter) -> ... Publishes made while not READY wait in
 * a bounded queue and go out in order; fetches need READY.
 *
 * Thread: every function here is loop only (the loop given to pl_redis_new), except the pure
 * helpers marked Thread: any. Ownership: strings passed in are copied; what a callback receives
 * is borrowed until it returns. pl_redis_free() may be called from inside any callback. */
#ifndef PL_REDIS_H
#define PL_REDIS_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct pl_redis pl_redis;

typedef enum {
    PL_REDIS_CONNECTING = 0, /* connecting, authenticating, loading scripts, subscribing */
    PL_REDIS_READY,          /* publishes and fetches go out */
    PL_REDIS_DOWN,           /* lost or refused; retried after a backoff */
} pl_redis_state;

/* ---- Pure helpers ---------------------------------------------------------------------------- */

#define PL_REDIS_HOST_MAX 256
#define PL_REDIS_AUTH_MAX 256

/* Where a Redis server is and how to log in. */
typedef struct pl_redis_addr {
    bool is_unix;
    char host[PL_REDIS_HOST_MAX]; /* a name or an IP (no brackets); for unix: the socket path */
    int port;
    char user[PL_REDIS_AUTH_MAX];     /* "" = the default user (AUTH password) */
    char password[PL_REDIS_AUTH_MAX]; /* "" = none */
    bool has_password;
    int db; /* -1 when the address names none */
} pl_redis_addr;

/* Parses "host", "host:port", "[v6]:port", "redis://[[user]:password@]host[:port][/db]" (user
 * and password percent-decoded), "unix:/path" or "/path". Port defaults to 6379.
 * @return 0 or PUSHLET_EINVAL. Thread: any. */
int pl_redis_parse_address(const char *s, pl_redis_addr *out) PL_HIDDEN;

/* Which of `nshards` shards holds `topic`: 32-bit FNV-1a of the name's bytes, modulo nshards.
 * Stable across nodes, builds and restarts (every node must use the same shard list, in the
 * same order). nshards 0 or 1 gives 0. Thread: any. */
uint32_t pl_redis_shard_of(const char *topic, size_t len, uint32_t nshards) PL_HIDDEN;

/* A message as it travels through Redis. For publish-to-all: topic_len 0, epoch and seq 0. */
typedef struct pl_redis_record {
    const char *topic, *event, *data;
    size_t topic_len, event_len, data_len;
    uint64_t epoch, seq;
    int64_t published_ms;
} pl_redis_record;

/* Decodes a pub/sub payload (pointers into `buf`). @return 0 or PUSHLET_EINVAL. Thread: any. */
int pl_redis_record_decode(const char *buf, size_t len, pl_redis_record *out) PL_HIDDEN;
/* Encodes a record into a new malloc'd buffer. @return 0 or PUSHLET_ENOMEM. Thread: any. */
int pl_redis_record_encode(const pl_redis_record *rec, char **out, size_t *out_len) PL_HIDDEN;
/* Parses "EPOCH-SEQ" (base-36 epoch, decimal seq). @return 0 or PUSHLET_EINVAL. */
int pl_redis_parse_id(const char *s, size_t len, uint64_t *epoch, uint64_t *seq) PL_HIDDEN;

/* ---- The client ------------------------------------------------------------------------------ */

typedef struct pl_redis_options {
    const char *address;    /* required, see pl_redis_parse_address() */
    const char *password;   /* NULL: the address's (or none); "" forces none */
    int db;                 /* -1: the address's (or 0) */
    uint32_t history_size;  /* entries kept per topic (MAXLEN ~, so a few more may stay);
                               0 = no history (publish only) */
    int64_t history_age_ms; /* 0 = no age bound */
    size_t queue_max_count; /* publishes not yet answered (queued + in flight), default 10000 */
    size_t queue_max_bytes; /* ... and their encoded size, default 16 MiB */
    uint32_t backoff_min_ms, backoff_max_ms; /* default 100 .. 5000 */
    uint32_t connect_timeout_ms;             /* until READY, default 5000 */
    uint32_t fetch_max;                      /* cap of a fetch's count, default 1000 */
    /* Listen on pushlet:all. Set it on one shard only (the first), or every node gets each
     * publish-to-all once per shard. */
    bool subscribe_all;
} pl_redis_options;

/* Defaults; address NULL. */
void pl_redis_options_init(pl_redis_options *o) PL_HIDDEN;

typedef struct pl_redis_callbacks {
    /* Every state change. `error` is a one-line message when going DOWN (e.g. "redis:
     * authentication failed (WRONGPASS ...)"), else NULL. */
    void (*on_state)(pl_redis *r, int state, const char *error, void *ud);
    /* READY again after an outage, every wanted channel subscribed again: messages published
     * meanwhile reached no pub/sub subscriber here, so fetch each live topic's history after
     * the last position seen (records arriving from now on may overlap: skip seq <= seen). */
    void (*on_resync)(pl_redis *r, void *ud);
    /* A record from a subscribed channel, in the order Redis published them. */
    void (*on_message)(pl_redis *r, const pl_redis_record *rec, void *ud);
    void *ud;
    /* Redis confirmed a wanted topic channel (also while reconnecting, before READY): from now
     * on every record published to it arrives. May be NULL. */
    void (*on_subscribed)(pl_redis *r, const char *topic, size_t len, void *ud);
} pl_redis_callbacks;

/* Creates a client on `loop` and starts connecting. Copies `o` and `cb`.
 * @return 0, PUSHLET_EINVAL (bad address or option) or PUSHLET_ENOMEM. Thread: loop only. */
int pl_redis_new(pl_redis **out, uv_loop_t *loop, const pl_redis_options *o,
                 const pl_redis_callbacks *cb) PL_HIDDEN;

/* Closes both connections and every handle; no callback of any kind runs after this call
 * (publishes not yet answered are abandoned: see pl_redis_pending()). The memory is released
 * once the loop has run the handles' close callbacks. NULL is a no-op. May be called from
 * inside any of this client's callbacks. Thread: loop only. */
void pl_redis_free(pl_redis *r) PL_HIDDEN;

int pl_redis_state_of(const pl_redis *r) PL_HIDDEN;
/* The last error (one line, "" when none); valid until the next call on `r`. */
const char *pl_redis_last_error(const pl_redis *r) PL_HIDDEN;
/* Publishes not answered yet (queued or in flight). */
size_t pl_redis_pending(const pl_redis *r) PL_HIDDEN;

/* A publish's outcome: status 0 with the message's ID ("EPOCH-SEQ", NUL-terminated), epoch and
 * seq; or PUSHLET_ESYSTEM with `error` (Redis refused it: OOM, script error, ...). A publish
 * whose connection is lost before the answer is sent again on reconnect; Redis applies it once
 * (the pushlet:n:<node> record), so no duplicate appears. */
typedef void (*pl_redis_publish_cb)(pl_redis *r, int status, const char *id, uint64_t epoch,
                                    uint64_t seq, const char *error, void *ud);

/* Appends a message to `topic`'s history and publishes it, atomically, with its ID (Lua script,
 * EVALSHA). event_len 0 means "message". published_ms 0 = Redis's clock. `cb` may be NULL.
 * Order: publishes from one client reach Redis in call order.
 * @return 0 (cb will run exactly once, unless the client is freed first), PUSHLET_EINVAL (bad
 *         topic or event name), PUSHLET_EFULL (the queue bound: nothing was queued),
 *         PUSHLET_ENOMEM. Thread: loop only. */
int pl_redis_publish(pl_redis *r, const char *topic, size_t topic_len, const char *event,
                     size_t event_len, const char *data, size_t data_len, int64_t published_ms,
                     pl_redis_publish_cb cb, void *ud) PL_HIDDEN;
/* Publish-to-all on pushlet:all (no history, no ID: cb gets id "" and seq 0). Same returns. */
int pl_redis_publish_all(pl_redis *r, const char *event, size_t event_len, const char *data,
                         size_t data_len, int64_t published_ms, pl_redis_publish_cb cb,
                         void *ud) PL_HIDDEN;

/* Wants (or no longer wants) `topic`'s channel. Calls are collected and sent once per loop turn
 * as one SUBSCRIBE and one UNSUBSCRIBE (up to 1024 channels each); idempotent (a set, not a
 * count). Kept across reconnects. @return 0 (on_subscribed follows once Redis confirms), 1 from
 * pl_redis_subscribe when the channel is subscribed on the server already (no confirmation
 * follows), PUSHLET_EINVAL, PUSHLET_ENOMEM. Thread: loop. */
int pl_redis_subscribe(pl_redis *r, const char *topic, size_t len) PL_HIDDEN;
int pl_redis_unsubscribe(pl_redis *r, const char *topic, size_t len) PL_HIDDEN;

/* A fetch's outcome. status 0: `epoch` is the cluster epoch (0 when nothing was ever
 * published), `last_seq` the topic's last sequence, `msgs` up to `max` kept messages with
 * seq > after_seq, oldest first. A gap is the caller's to see: msgs[0].seq != after_seq + 1
 * (or n == 0 while last_seq > after_seq) means history no longer holds them; an epoch other than
 * the caller's means its positions are void (fetch again with after_seq 0). status
 * PUSHLET_ESYSTEM with `error`: failed or the connection was lost (on_resync follows). */
typedef void (*pl_redis_history_cb)(pl_redis *r, int status, uint64_t epoch, uint64_t last_seq,
                                    const pl_redis_record *msgs, size_t n, const char *error,
                                    void *ud);

/* Reads `topic`'s history after `after_seq` (XRANGE from after_seq+1, at most `max`, capped by
 * fetch_max), atomically with the epoch and last sequence (Lua script).
 * @return 0 (cb runs exactly once, unless the client is freed first), PUSHLET_EINVAL,
 *         PUSHLET_ESTOPPED (not READY), PUSHLET_ENOMEM. Thread: loop only. */
int pl_redis_fetch(pl_redis *r, const char *topic, size_t len, uint64_t after_seq, uint32_t max,
                   pl_redis_history_cb cb, void *ud) PL_HIDDEN;

typedef struct pl_redis_stats {
    uint64_t published;      /* publishes answered with an ID */
    uint64_t publish_errors; /* answered with an error */
    uint64_t resent;         /* publishes sent again after a lost connection or NOSCRIPT */
    uint64_t messages_in;    /* records received on channels */
    uint64_t decode_errors;  /* payloads that were not records (ignored) */
    uint64_t subscribe_commands, unsubscribe_commands; /* sent, batched */
    uint64_t script_loads;                             /* SCRIPT LOAD commands sent */
    uint64_t connects, disconnects;                    /* times READY was reached / lost */
    size_t channels;                                   /* topic channels wanted */
} pl_redis_stats;

void pl_redis_get_stats(const pl_redis *r, pl_redis_stats *out) PL_HIDDEN;

/* ---- Our libuv adapter for hiredis async (redis_uv.c) --------------------------------------- */

struct redisAsyncContext;

/* Drives `ac` from `loop`. Poll errors reach hiredis as read/write events, so a refused or reset
 * connection is reported and freed. `on_gone(ud, ac)` runs from hiredis's cleanup hook, as `ac`
 * is being freed (connected or not): drop every pointer to it there. `on_closed(ud)` runs once
 * the poll handle is closed (the adapter's memory released). @return 0 or a libuv error. */
int pl_redis_uv_attach(struct redisAsyncContext *ac, uv_loop_t *loop,
                       void (*on_gone)(void *ud, struct redisAsyncContext *ac),
                       void (*on_closed)(void *ud), void *ud) PL_HIDDEN;

#endif /* PL_REDIS_H */
