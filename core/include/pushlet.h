/* Pushlet: a real-time push broker (Server-Sent Events, WebSocket) with an embeddable C core.
 *
 * Conventions used by every declaration below:
 * - A broker is an opaque `pushlet_t` handle. Each broker owns a libuv loop that runs on its own
 *   thread between pushlet_start() and pushlet_stop(); brokers share no state, so any number of
 *   them can live in one process.
 * - Calls return 0 on success or a negative PUSHLET_E* code; pushlet_strerror() describes it.
 * - Calls that take strings copy them. The only things kept after a call returns are a
 *   callback and its userdata (pushlet_set_logger), until replaced or pushlet_free().
 * - Enum values are fixed: new ones are only ever added with new numbers.
 * - "Thread: any" means the call may be made from any thread, concurrently with other calls.
 *   "Thread: not loop" means any thread except the broker's own loop thread (i.e. not from inside
 *   a callback the broker made); such calls refuse with PUSHLET_EWRONGTHREAD there.
 * - Every callback has a pull alternative (pushlet_event_fd() + pushlet_event_next()), for hosts
 *   such as Python, Lua and Node that cannot be called from a foreign thread.
 */
#ifndef PUSHLET_H
#define PUSHLET_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PUSHLET_EXTERN __attribute__((visibility("default")))
#else
#define PUSHLET_EXTERN
#endif

#define PUSHLET_VERSION_MAJOR 0
#define PUSHLET_VERSION_MINOR 1
#define PUSHLET_VERSION_PATCH 0
/** Version as one number, comparable with pushlet_version(). */
#define PUSHLET_VERSION_HEX                                                                        \
    ((PUSHLET_VERSION_MAJOR << 16) | (PUSHLET_VERSION_MINOR << 8) | PUSHLET_VERSION_PATCH)

/** Error codes: every public call that can fail returns 0 or one of these. */
enum {
    PUSHLET_OK = 0,
    PUSHLET_EINVAL = -1,        /* invalid argument (bad topic/event name, unknown option, ...) */
    PUSHLET_ENOMEM = -2,        /* out of memory */
    PUSHLET_EFULL = -3,         /* the publish queue is at its limit; retry later */
    PUSHLET_ESTOPPED = -4,      /* the broker is not running */
    PUSHLET_EBUSY = -5,         /* the broker is running: stop it first */
    PUSHLET_EWRONGTHREAD = -6,  /* called from the broker's own loop thread */
    PUSHLET_ETOOBIG = -7,       /* data larger than the configured maximum message size */
    PUSHLET_EADDRINUSE = -8,    /* the listen address is already in use */
    PUSHLET_ELISTEN = -9,       /* the listen address is invalid or cannot be bound */
    PUSHLET_ESYSTEM = -10,      /* an operating system resource could not be obtained */
    PUSHLET_ENOENT = -11,       /* no such request or connection (answered already, timed out,
                                   or the client left) */
    PUSHLET_EUNAVAILABLE = -12, /* Redis could not be reached (distributed mode) */
    PUSHLET_EAUTH = -13,        /* Redis refused the password or the database (distributed mode) */
};

/** Log levels, numerically equal to Python's logging levels. */
enum {
    PUSHLET_LOG_DEBUG = 10,
    PUSHLET_LOG_INFO = 20,
    PUSHLET_LOG_WARN = 30,
    PUSHLET_LOG_ERROR = 40,
    PUSHLET_LOG_OFF = 100,
};

/** Integer options, set with pushlet_set_int() before pushlet_start(). */
typedef enum {
    PUSHLET_OPT_HEARTBEAT_MS = 1,         /* SSE heartbeat interval; default 30000, 0 = none */
    PUSHLET_OPT_HEADER_TIMEOUT_MS = 2,    /* time to receive a request head (408); default 10000 */
    PUSHLET_OPT_KEEPALIVE_TIMEOUT_MS = 3, /* idle keep-alive connections close; default 30000 */
    PUSHLET_OPT_STOP_TIMEOUT_MS = 4,      /* graceful stop deadline; default 5000 */
    PUSHLET_OPT_RETRY_MS = 5,             /* SSE `retry:` hint sent to clients; default 3000 */
    PUSHLET_OPT_MAX_CONNECTIONS = 6,      /* more are answered 503; default 10000 */
    PUSHLET_OPT_MAX_MESSAGE_SIZE = 7,     /* bytes of data per message; default 65536 */
    PUSHLET_OPT_MAX_HEADER_SIZE = 8,      /* request line + headers, bytes (431); default 8192 */
    PUSHLET_OPT_MAX_URL_SIZE = 9,         /* request target, bytes (414); default 4096 */
    PUSHLET_OPT_MAX_HEADERS = 10,         /* header fields per request (431); default 64 */
    PUSHLET_OPT_MAX_OUTPUT_BYTES = 11,    /* unsent bytes per connection before it is dropped as a
                                        slow consumer; default 1048576 */
    PUSHLET_OPT_MAX_TOPICS_PER_CONNECTION = 12, /* default 64 */
    PUSHLET_OPT_MAX_QUEUED_MESSAGES =
        13,                              /* publishes waiting for the loop (EFULL); default 65536 */
    PUSHLET_OPT_MAX_QUEUED_BYTES = 14,   /* bytes waiting for the loop (EFULL); default 64 MiB */
    PUSHLET_OPT_MAX_PENDING_EVENTS = 15, /* pull-queue events kept before dropping; default 4096 */
    PUSHLET_OPT_HTTP_PUBLISH = 16,       /* 1 = serve the HTTP publish endpoints; default 0 */
    PUSHLET_OPT_LOG_LEVEL = 17,          /* least level reported; default PUSHLET_LOG_INFO */
    PUSHLET_OPT_HISTORY_SIZE = 18, /* messages kept per topic for resume; default 1000, 0 = none */
    PUSHLET_OPT_HISTORY_AGE_MS = 19,         /* kept messages older than this go; default 600000 */
    PUSHLET_OPT_HISTORY_MAX_BYTES = 20,      /* all topics' history together; default 64 MiB */
    PUSHLET_OPT_SLOW_CONSUMER_POLICY = 21,   /* PUSHLET_SLOW_*; default PUSHLET_SLOW_DISCONNECT */
    PUSHLET_OPT_MAX_SUBSCRIBES_PER_SEC = 22, /* WebSocket (un)subscribe commands per second per
                                                connection; default 100 */
    PUSHLET_OPT_MAX_BODY_SIZE = 23,          /* HTTP publish body bytes (413); default 0 = 3 x
                                                PUSHLET_OPT_MAX_MESSAGE_SIZE + 1024 */
    PUSHLET_OPT_CLOSE_TIMEOUT_MS = 24, /* linger after an error answer, wait for a WebSocket close
                                          reply; default 2000 */
    PUSHLET_OPT_AUTH_TIMEOUT_MS = 25,  /* an auth request not answered by then is denied (503);
                                          default 5000 */
    PUSHLET_OPT_MAX_CLIENT_MESSAGES_PER_SEC = 26, /* WebSocket messages for the host per second per
                                                     connection; default 100 */
    /* String options, set with pushlet_set_str(). */
    PUSHLET_OPT_SSE_PATH = 100,         /* default "/events" */
    PUSHLET_OPT_WS_PATH = 101,          /* default "/ws" (reserved for the WebSocket transport) */
    PUSHLET_OPT_PUBLISH_PATH = 102,     /* default "/publish" */
    PUSHLET_OPT_PUBLISH_ALL_PATH = 103, /* default "/publish_all" */
    PUSHLET_OPT_SEND_PATH = 104,        /* default "/send" (the seed's GET publish) */
    PUSHLET_OPT_STATS_PATH = 105,       /* default "/stats" */
    PUSHLET_OPT_HEALTH_PATH = 106,      /* default "/healthz" */
    PUSHLET_OPT_CORS_ORIGIN = 107,      /* Access-Control-Allow-Origin; default "*" */
    PUSHLET_OPT_PUBLISH_SECRET = 108,   /* required by the HTTP publish endpoints; default none */
    PUSHLET_OPT_INDEX_HTML = 109,       /* page served at GET /; default none (404) */
    PUSHLET_OPT_WS_ORIGINS = 110,       /* Origin values (comma-separated) allowed to open a
                                     WebSocket; default any */
    PUSHLET_OPT_HISTORY_RULES = 111,    /* per-topic history bounds, comma-separated rules
                                     PATTERN=COUNT[:AGE_MS], first match wins; PATTERN is a topic
                                     name, or a prefix followed by an asterisk; e.g. the rule
                                     ticker=0 keeps no history for topic "ticker" */
    PUSHLET_OPT_METRICS_PATH = 112,     /* Prometheus text metrics; default "/metrics" */
    PUSHLET_OPT_JWT_SECRET = 113,       /* when set, SSE and WebSocket clients need an HS256 token
                                         (Authorization: Bearer, or ?token=): `sub` is the user id,
                                         a `topics` claim (names, "prefix*") limits subscriptions */
} pushlet_option_t;

/** Values of PUSHLET_OPT_SLOW_CONSUMER_POLICY: what happens to a connection whose unsent output
 *  would pass PUSHLET_OPT_MAX_OUTPUT_BYTES. */
enum {
    PUSHLET_SLOW_DISCONNECT = 0,  /* close it; it can resume from its last ID */
    PUSHLET_SLOW_DROP_OLDEST = 1, /* keep it, stop queueing; it catches up from history and gets
                                     a `gap` event for what history no longer holds */
};

/** Counters and gauges, read with pushlet_stat(). */
typedef enum {
    PUSHLET_STAT_CONNECTIONS = 0,          /* open client connections (gauge) */
    PUSHLET_STAT_SSE_CONNECTIONS = 1,      /* open SSE streams (gauge) */
    PUSHLET_STAT_SUBSCRIPTIONS = 2,        /* (connection, topic) pairs (gauge) */
    PUSHLET_STAT_TOPICS = 3,               /* topics with subscribers or history (gauge) */
    PUSHLET_STAT_MESSAGES_IN = 4,          /* messages published */
    PUSHLET_STAT_MESSAGES_OUT = 5,         /* message deliveries queued to connections */
    PUSHLET_STAT_BYTES_OUT = 6,            /* bytes written to sockets */
    PUSHLET_STAT_SLOW_CONSUMER_DROPS = 7,  /* connections dropped over their output bound */
    PUSHLET_STAT_PUBLISH_REJECTED = 8,     /* publishes refused (queue full, too big, ...) */
    PUSHLET_STAT_CONNECTIONS_REJECTED = 9, /* connections answered 503 */
    PUSHLET_STAT_HTTP_ERRORS = 10,         /* requests answered with a 4xx/5xx status */
    PUSHLET_STAT_CONNECTIONS_TOTAL = 11,   /* connections accepted since start */
    PUSHLET_STAT_WS_CONNECTIONS = 12,      /* open WebSocket connections (gauge) */
    PUSHLET_STAT_HISTORY_MESSAGES = 13,    /* messages kept for resume (gauge) */
    PUSHLET_STAT_HISTORY_BYTES = 14,       /* bytes those hold (gauge) */
    PUSHLET_STAT_HISTORY_EVICTED = 15,     /* messages evicted early by HISTORY_MAX_BYTES */
    PUSHLET_STAT_RESUMES = 16,             /* subscriptions resumed from an ID */
    PUSHLET_STAT_REPLAYED = 17,            /* messages sent from history */
    PUSHLET_STAT_GAPS = 18,                /* gap signals sent */
    PUSHLET_STAT_TOPICS_REJECTED = 19,     /* subscriptions refused: too many topics */
    PUSHLET_STAT_RATE_LIMITED = 20,        /* WebSocket commands refused: rate limit */
    PUSHLET_STAT_OVERSIZE_REJECTED = 21,   /* messages, bodies or frames over a size limit */
    PUSHLET_STAT_TIMEOUTS = 22,            /* connections closed by a header/idle/close timeout */
    PUSHLET_STAT_SLOW_CONSUMER_LAGS = 23,  /* times a connection fell behind (drop_oldest) */
    PUSHLET_STAT_AUTH_DENIED = 24,         /* connections (401) and subscriptions (403) refused */
    PUSHLET_STAT_AUTH_PENDING = 25,        /* auth requests waiting for the host's answer (gauge) */
    PUSHLET_STAT_AUTH_TIMEOUTS = 26,       /* auth requests denied because no answer came in time */
    PUSHLET_STAT_CLIENT_MESSAGES = 27,     /* WebSocket messages passed to the host */
    PUSHLET_STAT_EVENTS_DROPPED = 28,      /* pull-queue events dropped (queue full) */
    /* Distributed mode (0 when off). */
    PUSHLET_STAT_REDIS_PENDING = 29,        /* publishes sent or queued, not yet stored by Redis */
    PUSHLET_STAT_REDIS_SHARDS_DOWN = 30,    /* Redis shards not ready (connecting or down) */
    PUSHLET_STAT_REDIS_CATCH_UPS = 31,      /* history fetches: topics joined or gaps filled */
    PUSHLET_STAT_REDIS_PUBLISH_ERRORS = 32, /* publishes Redis refused (logged; not delivered) */
    PUSHLET_STAT_COUNT
} pushlet_stat_t;

/** Kinds of event (bits of a mask), delivered to the event handler or through the pull queue.
 *  The two requests wait for the host's answer (pushlet_allow() / pushlet_deny()); when neither
 *  the handler nor the queue takes a kind of request, those are allowed without asking. */
enum {
    PUSHLET_EVENT_LOG = 1 << 0, /* a log record (pull queue only; see pushlet_set_logger) */
    PUSHLET_EVENT_AUTH_CONNECT = 1 << 1,   /* request: may this SSE stream / WebSocket open? */
    PUSHLET_EVENT_AUTH_SUBSCRIBE = 1 << 2, /* request: may this connection subscribe to topic? */
    PUSHLET_EVENT_CONNECTED = 1 << 3,      /* a stream or WebSocket is open */
    PUSHLET_EVENT_DISCONNECTED = 1 << 4,   /* ... and has closed; text = the reason */
    PUSHLET_EVENT_SUBSCRIBED = 1 << 5,     /* a connection subscribed to topic */
    PUSHLET_EVENT_UNSUBSCRIBED = 1 << 6,   /* ... unsubscribed (also when it disconnects) */
    PUSHLET_EVENT_MESSAGE = 1 << 7,        /* a WebSocket message that is no subscription command */
    PUSHLET_EVENT_ALL = (1 << 8) - 1,
};

/** Transports, as pushlet_event_transport() reports them. */
enum { PUSHLET_TRANSPORT_SSE = 1, PUSHLET_TRANSPORT_WS = 2 };

typedef struct pushlet pushlet_t;
typedef struct pushlet_event pushlet_event_t;

/** Event handler: called on the loop thread with an event it borrows until it returns. It must
 *  not block (no I/O, no waiting on other threads); it may answer a request at once or keep the
 *  request id (pushlet_event_request()) and answer later from any thread. It may call any
 *  "Thread: any" function, but not pushlet_stop()/pushlet_free(). */
typedef void (*pushlet_event_fn)(pushlet_t *p, const pushlet_event_t *e, void *userdata);

/** Logger callback. `component` and `msg` are borrowed until it returns; `msg` is not
 *  newline-terminated. Called from the loop thread or from the thread making a pushlet_* call;
 *  it must not block and must not call pushlet_stop()/pushlet_free(). */
typedef void (*pushlet_log_fn)(int level, const char *component, const char *msg, size_t len,
                               void *userdata);

/** Library version as PUSHLET_VERSION_HEX, and as "major.minor.patch". Thread: any. */
PUSHLET_EXTERN unsigned int pushlet_version(void);
PUSHLET_EXTERN const char *pushlet_version_string(void);

/** A static one-line message for an error code (never NULL). Thread: any. */
PUSHLET_EXTERN const char *pushlet_strerror(int code);

/** Create a broker with default options (listening on 127.0.0.1:8080 once started).
 *  @param out receives the handle; the caller frees it with pushlet_free().
 *  @return 0 or PUSHLET_EINVAL / PUSHLET_ENOMEM / PUSHLET_ESYSTEM. Thread: any. */
PUSHLET_EXTERN int pushlet_new(pushlet_t **out);

/** Stop the broker if it is running (gracefully, see pushlet_stop()) and release everything.
 *  NULL is a no-op returning 0. @return 0, or PUSHLET_EWRONGTHREAD (nothing is freed).
 *  Thread: not loop. */
PUSHLET_EXTERN int pushlet_free(pushlet_t *p);

/** Set the address to serve on. `host` is an IPv4 or IPv6 literal; `port` 0 picks a free port
 *  (read it with pushlet_port() after start).
 *  @return 0, PUSHLET_EINVAL or PUSHLET_EBUSY (running). Thread: any. */
PUSHLET_EXTERN int pushlet_listen(pushlet_t *p, const char *host, int port);

/** The port the broker is bound to while running, else -1. Thread: any. */
PUSHLET_EXTERN int pushlet_port(const pushlet_t *p);

/** Set an integer or string option (see pushlet_option_t) before start.
 *  `value` NULL resets a string option to its default.
 *  @return 0, PUSHLET_EINVAL (unknown option, wrong kind, value out of range) or PUSHLET_EBUSY.
 *  Thread: any. */
PUSHLET_EXTERN int pushlet_set_int(pushlet_t *p, pushlet_option_t opt, int64_t value);
PUSHLET_EXTERN int pushlet_set_str(pushlet_t *p, pushlet_option_t opt, const char *value);

/** The SSE heartbeat interval in milliseconds (0 = none); same as PUSHLET_OPT_HEARTBEAT_MS.
 *  Thread: any. */
PUSHLET_EXTERN int pushlet_set_heartbeat_interval(pushlet_t *p, uint32_t ms);

/** Install a logger callback (NULL removes it) and the least level it gets.
 *  A record being logged on another thread as this returns may still reach the previous
 *  callback: keep its userdata valid until pushlet_free() (bindings: prefer the pull queue).
 *  The callback must not call pushlet_start/stop/free or the option setters.
 *  @return 0 or PUSHLET_EINVAL. Thread: any. Ownership: `fn` and `userdata` are kept. */
PUSHLET_EXTERN int pushlet_set_logger(pushlet_t *p, pushlet_log_fn fn, int min_level,
                                      void *userdata);

/** Bind, start the loop thread and begin serving.
 *  @return 0, PUSHLET_EBUSY (already running), PUSHLET_EADDRINUSE, PUSHLET_ELISTEN,
 *          PUSHLET_ENOMEM or PUSHLET_ESYSTEM. Thread: not loop. */
PUSHLET_EXTERN int pushlet_start(pushlet_t *p);

/** Stop gracefully: stop accepting, deliver what was published before this call within the
 *  stop deadline, end SSE streams, close every connection, join the loop thread. The broker can
 *  be started again afterwards. @return 0, PUSHLET_ESTOPPED or PUSHLET_EWRONGTHREAD.
 *  Thread: not loop. */
PUSHLET_EXTERN int pushlet_stop(pushlet_t *p);

/** Publish `data` (`len` bytes, any content) under `event` (NULL = "message") to every
 *  subscriber of `topic`. Copies its arguments and returns before delivery; never blocks on I/O.
 *  @return 0, PUSHLET_EINVAL (bad topic or event name), PUSHLET_ETOOBIG, PUSHLET_EFULL,
 *          PUSHLET_ENOMEM or PUSHLET_ESTOPPED. Thread: any. */
PUSHLET_EXTERN int pushlet_publish(pushlet_t *p, const char *topic, const char *event,
                                   const char *data, size_t len);

/** Publish to every connection once, whatever its topics (also those with none).
 *  Same rules and return codes as pushlet_publish(). Thread: any. */
PUSHLET_EXTERN int pushlet_publish_all(pushlet_t *p, const char *event, const char *data,
                                       size_t len);

/* ---- Distributed mode ---------------------------------------------------------------------- */

/** Join the brokers that share a Redis: publishes from any of them reach subscribers of all,
 *  with the same IDs in the same order, and history lives in Redis so a client resumes on any
 *  broker. `address` is "host:port", "redis://[[user]:password@]host[:port][/db]" or a unix
 *  socket ("unix:/path" or "/path"); `password` NULL or "" = none; `db` >= 0 (a redis:// URL's
 *  own password and db win). Each call adds a shard: topics are spread over shards by a stable
 *  hash of their name, so every broker must list the same shards in the same order. Before
 *  start; the server is contacted at once (up to 5 s) so a wrong address or password is
 *  reported here. While running, publishes go through Redis (delivered, here too, when Redis
 *  has stored them; while it is unreachable they wait, and pushlet_publish() returns
 *  PUSHLET_EFULL once PUSHLET_OPT_MAX_QUEUED_MESSAGES/BYTES are waiting). docs/DISTRIBUTED.md.
 *  @return 0, PUSHLET_EINVAL, PUSHLET_EBUSY (running), PUSHLET_EUNAVAILABLE, PUSHLET_EAUTH or
 *          PUSHLET_ENOMEM; the log says why. Thread: not loop. */
PUSHLET_EXTERN int pushlet_enable_distributed_mode(pushlet_t *p, const char *address,
                                                   const char *password, int db);

/* ---- Hooks: auth, lifecycle, client messages ---------------------------------------------- */

/** Install the event handler for the kinds in `mask` (PUSHLET_EVENT_*, not LOG); NULL or mask 0
 *  removes it. Kinds the handler takes are not queued for pushlet_event_next(). Set it before
 *  pushlet_start(). @return 0, PUSHLET_EINVAL or PUSHLET_EBUSY. Thread: any.
 *  Ownership: `fn` and `userdata` are kept until replaced or pushlet_free(). */
PUSHLET_EXTERN int pushlet_set_event_handler(pushlet_t *p, pushlet_event_fn fn, uint32_t mask,
                                             void *userdata);

/** Answer an auth request (an event of kind AUTH_CONNECT or AUTH_SUBSCRIBE) with "allow".
 *  For a connection, `user_id` (NULL: keep the token's `sub`, if any; at most 256 bytes) and
 *  `metadata` (NULL: none; at most 4096 bytes, any text) stay with it and appear in all its
 *  later events; both are ignored for subscriptions.
 *  @return 0, PUSHLET_ENOENT (answered already, timed out, or the client left: harmless),
 *          PUSHLET_EINVAL (no broker, an empty user id or one with control characters, too long)
 *          or PUSHLET_ENOMEM. Thread: any. */
PUSHLET_EXTERN int pushlet_allow(pushlet_t *p, uint64_t request, const char *user_id,
                                 const char *metadata);

/** Answer an auth request with "deny". A connection gets HTTP `status` (401, 403, 429, or any
 *  4xx/5xx; 0 = 403) with `reason` (NULL = none; one line, at most 120 bytes) as its body; a
 *  WebSocket subscribe command gets an `error` reply with reason "forbidden".
 *  @return as pushlet_allow(). Thread: any. */
PUSHLET_EXTERN int pushlet_deny(pushlet_t *p, uint64_t request, int status, const char *reason);

/** Send a message to one open connection (not recorded in any history; an SSE stream gets it
 *  without an `id:` line, a WebSocket as `{"event","data","timestamp"}` without topic and id).
 *  Sends go through the same queue as publishes, so a send made inside the event handler
 *  reaches the client after the broker's own synchronous replies (such as `subscribed`).
 *  @return 0, PUSHLET_ENOENT (no such open connection), or as pushlet_publish(). Thread: any. */
PUSHLET_EXTERN int pushlet_send(pushlet_t *p, uint64_t connection, const char *event,
                                const char *data, size_t len);

/** Send a message to every open connection of a user id. @return 0, PUSHLET_ENOENT (the user
 *  has no open connection), or as pushlet_publish(). Thread: any. */
PUSHLET_EXTERN int pushlet_send_user(pushlet_t *p, const char *user_id, const char *event,
                                     const char *data, size_t len);

/** Close an open connection: a WebSocket with close `code` (1000, or 3000-4999; 0 = 1000) and
 *  `reason` (at most 123 bytes); an SSE stream gets a final `close` event carrying `reason`.
 *  What was queued before is still sent. @return 0, PUSHLET_ENOENT or PUSHLET_EINVAL.
 *  Thread: any. */
PUSHLET_EXTERN int pushlet_close(pushlet_t *p, uint64_t connection, int code, const char *reason);

/** Subscribers of a topic right now (0 when it has none). Thread: any. */
PUSHLET_EXTERN int64_t pushlet_topic_subscribers(pushlet_t *p, const char *topic);

/** Read a counter or gauge; -1 for an unknown one. Thread: any. */
PUSHLET_EXTERN int64_t pushlet_stat(const pushlet_t *p, pushlet_stat_t which);

/** Every counter and gauge in the Prometheus text format (version 0.0.4), NUL-terminated in
 *  `buf` when it fits. Returns the length of the whole text (call with cap 0 to size a buffer),
 *  or a negative error. Thread: any. (GET /metrics adds the busiest topics' figures.) */
PUSHLET_EXTERN int pushlet_metrics(pushlet_t *p, char *buf, size_t cap);

/* ---- Pull queue: the alternative to every callback ---------------------------------------- */

/** Choose which kinds of event (PUSHLET_EVENT_* bits) are queued for pushlet_event_next();
 *  kinds an event handler takes are not queued. Requests are answered as with the handler.
 *  Log records are queued at the level set by PUSHLET_OPT_LOG_LEVEL. The queue keeps at most
 *  PUSHLET_OPT_MAX_PENDING_EVENTS; beyond that events are dropped and a warning record says how
 *  many. @return 0 or PUSHLET_EINVAL. Thread: any. */
PUSHLET_EXTERN int pushlet_events_enable(pushlet_t *p, uint32_t mask);

/** A file descriptor that is readable while events are pending. Watch it with poll/epoll or
 *  your event loop; do not read or close it. Valid until pushlet_free(). Thread: any. */
PUSHLET_EXTERN int pushlet_event_fd(const pushlet_t *p);

/** Take the next pending event, or NULL when there is none. The caller owns it and frees it
 *  with pushlet_event_free(). Thread: any. */
PUSHLET_EXTERN pushlet_event_t *pushlet_event_next(pushlet_t *p);

/** Accessors, the same for handler and queue. Strings are owned by the event, NUL-terminated,
 *  "" when absent; their length goes to `*len` when len != NULL. Thread: any. */
PUSHLET_EXTERN int pushlet_event_type(const pushlet_event_t *e);      /* PUSHLET_EVENT_* */
PUSHLET_EXTERN int pushlet_event_log_level(const pushlet_event_t *e); /* PUSHLET_LOG_* */
PUSHLET_EXTERN const char *pushlet_event_component(const pushlet_event_t *e);
/** LOG: the record; MESSAGE: the client's payload (may hold NUL bytes: use `len`);
 *  DISCONNECTED, UNSUBSCRIBED: the reason. */
PUSHLET_EXTERN const char *pushlet_event_text(const pushlet_event_t *e, size_t *len);
/** The request id to answer (AUTH_* events), else 0. */
PUSHLET_EXTERN uint64_t pushlet_event_request(const pushlet_event_t *e);
/** The connection (unique per broker, never reused), else 0. LOG events about a connection
 *  carry it too. */
PUSHLET_EXTERN uint64_t pushlet_event_connection(const pushlet_event_t *e);
PUSHLET_EXTERN int pushlet_event_transport(const pushlet_event_t *e); /* PUSHLET_TRANSPORT_* */
/** The connection's user id and metadata (from a token's `sub` or pushlet_allow()). */
PUSHLET_EXTERN const char *pushlet_event_user(const pushlet_event_t *e, size_t *len);
PUSHLET_EXTERN const char *pushlet_event_metadata(const pushlet_event_t *e, size_t *len);
/** AUTH_SUBSCRIBE, SUBSCRIBED, UNSUBSCRIBED: the topic. */
PUSHLET_EXTERN const char *pushlet_event_topic(const pushlet_event_t *e, size_t *len);
/** MESSAGE: 1 when the client sent a binary message, 0 for text. */
PUSHLET_EXTERN int pushlet_event_binary(const pushlet_event_t *e);
/** AUTH_CONNECT: the request line and the peer ("127.0.0.1:50312", "[::1]:50312"). The query
 *  is raw (percent-encoded), without "?". */
PUSHLET_EXTERN const char *pushlet_event_method(const pushlet_event_t *e);
PUSHLET_EXTERN const char *pushlet_event_path(const pushlet_event_t *e, size_t *len);
PUSHLET_EXTERN const char *pushlet_event_query(const pushlet_event_t *e, size_t *len);
PUSHLET_EXTERN const char *pushlet_event_remote(const pushlet_event_t *e);
/** AUTH_CONNECT: header fields as received. By name (case-insensitive; the first of repeated
 *  ones; NULL when absent), or by index 0..count-1 (returns 1 and sets name and value, or 0 when
 *  out of range). */
PUSHLET_EXTERN const char *pushlet_event_header(const pushlet_event_t *e, const char *name,
                                                size_t *len);
PUSHLET_EXTERN size_t pushlet_event_header_count(const pushlet_event_t *e);
PUSHLET_EXTERN int pushlet_event_header_at(const pushlet_event_t *e, size_t i, const char **name,
                                           const char **value);

/** Release an event; NULL is a no-op. Thread: any. */
PUSHLET_EXTERN void pushlet_event_free(pushlet_event_t *e);

#ifdef __cplusplus
}
#endif

#endif /* PUSHLET_H */
