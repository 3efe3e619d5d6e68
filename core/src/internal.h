/* What the core's modules share. Never installed.
 *
 * Threads: everything here belongs to the broker's loop thread unless a comment says otherwise.
 * Other threads reach the loop only through the inbox (inbox.c) and read counters atomically. */
#ifndef PL_INTERNAL_H
#define PL_INTERNAL_H

#include "pushlet.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define PL_HIDDEN       __attribute__((visibility("hidden")))
#define PL_PRINTF(f, a) __attribute__((format(printf, f, a)))

#define pl_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* ---- Intrusive doubly linked list ---------------------------------------------------------- */

typedef struct pl_link {
    struct pl_link *prev, *next;
} pl_link;

/* The value of a hex digit, or -1. */
static inline int pl_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static inline void pl_list_init(pl_link *head) { head->prev = head->next = head; }
static inline void pl_list_push(pl_link *head, pl_link *node)
{
    node->prev = head->prev;
    node->next = head;
    head->prev->next = node;
    head->prev = node;
}
static inline void pl_list_remove(pl_link *node)
{
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->prev = node->next = node;
}

/* ---- Counters: written by the loop thread only, read from any thread ----------------------- */

#define PL_STAT_ADD(p, which, n)                                                                   \
    __atomic_store_n(&(p)->stats[which], (p)->stats[which] + (n), __ATOMIC_RELAXED)
/* For counters that other threads also bump (publish rejections). */
#define PL_STAT_ADD_SHARED(p, which, n)                                                            \
    __atomic_fetch_add(&(p)->stats[which], (n), __ATOMIC_RELAXED)

/* ---- Refcounted byte buffers (message.c) --------------------------------------------------- */

/* An encoded wire form shared by every connection it is queued on. Loop thread only. */
typedef struct pl_buf {
    uint32_t refs;
    uint32_t len;
    char data[];
} pl_buf;

pl_buf *pl_buf_new(size_t len) PL_HIDDEN;
pl_buf *pl_buf_from(const char *data, size_t len) PL_HIDDEN;
static inline pl_buf *pl_buf_ref(pl_buf *b)
{
    b->refs++;
    return b;
}
void pl_buf_unref(pl_buf *b) PL_HIDDEN;

/* Wire formats: each message is encoded at most once per format. */
typedef struct pl_deflate pl_deflate;

/* Wire formats; the _Z ones are WebSocket frames compressed with permessage-deflate (no context
 * takeover, so one compressed frame serves every such subscriber). */
typedef enum {
    PL_FMT_SSE = 0,
    PL_FMT_WS_JSON,
    PL_FMT_WS_MSGPACK,
    PL_FMT_WS_JSON_Z,
    PL_FMT_WS_MSGPACK_Z,
    PL_FMT_SSE_BODY, /* SSE without the id line: multi-topic streams put their own cursor first */
    PL_FMT_COUNT
} pl_format;

#define PL_ID_MAX 40 /* "EPOCH-SEQ": up to 13 base-36 digits, "-", 20 decimal digits, NUL */

/* A published message: created (and its strings copied) by the publishing thread, handed to the
 * loop through the inbox, then owned by the loop. Encoded lazily, once per wire format. */
/* What a message from the inbox is for: most go to a topic; the host's targeted sends and closes
 * (hooks.c) travel the same way, so they keep their order with publishes. */
enum { PL_TO_TOPIC = 0, PL_TO_CONNECTION, PL_TO_USER, PL_CLOSE_CONNECTION };

typedef struct pl_msg {
    struct pl_msg *next; /* inbox link */
    uint32_t refs;
    bool to_all;        /* publish-to-all rather than to `topic` (with target PL_TO_TOPIC) */
    uint8_t target;     /* PL_TO_*; for PL_TO_USER `topic` holds the user id */
    uint64_t target_id; /* PL_TO_CONNECTION, PL_CLOSE_CONNECTION: the connection; for a close,
                           `seq` holds the code and `data` the reason */
    char *user;         /* PL_TO_USER: the user id (malloc'd) */
    uint8_t id_len;
    uint16_t topic_len, event_len;
    uint32_t data_len;
    uint64_t seq;         /* position in its topic, assigned by pl_broker_dispatch() */
    char id[PL_ID_MAX];   /* the ID as sent: "EPOCH-SEQ" */
    int64_t published_ms; /* wall clock at publish, for timestamps (never for ordering) */
    /* While kept in a topic's history (history.c): */
    pl_link kept; /* in its age class's list of kept messages, oldest first */
    struct pl_topic *topic_rec;
    uint64_t kept_at;           /* loop time (ms) it was stored */
    uint32_t kept_bytes;        /* what it counts against PUSHLET_OPT_HISTORY_MAX_BYTES */
    pl_buf *enc[PL_FMT_COUNT];  /* per wire format (pl_format), made on first use */
    char *topic, *event, *data; /* NUL-terminated, inside `storage` */
    char storage[];
} pl_msg;

pl_msg *pl_msg_new(const char *topic, size_t topic_len, const char *event, size_t event_len,
                   const char *data, size_t data_len) PL_HIDDEN;
static inline pl_msg *pl_msg_ref(pl_msg *m)
{
    m->refs++;
    return m;
}
void pl_msg_unref(pl_msg *m) PL_HIDDEN;
/* The message in `format` (pl_format), encoded on first use; borrowed, owned by the message.
 * NULL when out of memory. (codec.c) */
pl_buf *pl_msg_encode(pl_msg *m, int format, pl_deflate *z) PL_HIDDEN;
#define PL_DEFLATE_MIN_BYTES 256 /* smaller payloads are not worth compressing */
/* permessage-deflate (deflate.c): one compressor and one decompressor per broker, reset per
 * message, since both directions are negotiated without context takeover. */
pl_deflate *pl_deflate_new(void) PL_HIDDEN;
void pl_deflate_free(pl_deflate *d) PL_HIDDEN;
/* Compresses `len` bytes into a new frame with RSV1 set; NULL when out of memory. */
pl_buf *pl_deflate_frame(pl_deflate *d, uint8_t opcode, const uint8_t *data, size_t len) PL_HIDDEN;
/* Inflates a client message into *out (malloc'd, caller frees). Returns 0, 1009 when it would
 * exceed `max`, or 1007 when the data is not valid deflate. */
int pl_inflate_message(pl_deflate *d, const uint8_t *data, size_t len, size_t max, uint8_t **out,
                       size_t *out_len) PL_HIDDEN;

/* ---- Cross-thread inbox (inbox.c): mutex-guarded list, wakes the loop on empty→non-empty ---- */

typedef struct pl_inbox {
    uv_mutex_t mu;
    pl_msg *head, **tail;
    size_t count, bytes;
    size_t max_count, max_bytes, max_data;
    bool open;        /* accepting pushes (the loop is running and not stopping) */
    uv_async_t *wake; /* signalled when the list turns non-empty */
} pl_inbox;

int pl_inbox_init(pl_inbox *q) PL_HIDDEN;
void pl_inbox_destroy(pl_inbox *q) PL_HIDDEN; /* frees what is still queued */
void pl_inbox_open(pl_inbox *q, uv_async_t *wake, size_t max_count, size_t max_bytes,
                   size_t max_data) PL_HIDDEN;
void pl_inbox_close(pl_inbox *q) PL_HIDDEN; /* later pushes get PUSHLET_ESTOPPED */
/* Thread: any. Takes ownership of `m` on success only; PUSHLET_ETOOBIG when its data is over
 * max_data, PUSHLET_EFULL at the bounds, PUSHLET_ESTOPPED when closed. */
int pl_inbox_push(pl_inbox *q, pl_msg *m) PL_HIDDEN;
/* Thread: loop. Takes the whole list (oldest first); the caller owns it. */
pl_msg *pl_inbox_take_all(pl_inbox *q) PL_HIDDEN;

/* ---- Topic registry (topics.c) -------------------------------------------------------------- */

typedef struct pl_topic pl_topic;
typedef struct pl_subscriber pl_subscriber;

/* A subscription is live (fan-out queues each message), or catching up from the topic's
 * history (fan-out skips it; history.c feeds it until it reaches the newest message). */
enum { PL_SUB_LIVE = 0, PL_SUB_RESUMING, PL_SUB_LAGGING /* fell behind under drop_oldest */ };

/* One entry of a topic's subscriber array; `slot` is the index of the matching pl_sub in the
 * subscriber, so both sides unlink in O(1). */
typedef struct pl_topic_sub {
    pl_subscriber *sub;
    uint32_t slot;
    uint8_t state; /* PL_SUB_* */
} pl_topic_sub;

struct pl_topic {
    uint32_t hash;
    uint16_t name_len;
    uint32_t nsubs, cap;
    pl_topic_sub *subs;
    /* Positions and history (history.c). */
    uint64_t epoch;
    uint64_t seq;                 /* the last sequence number assigned */
    pl_msg **ring;                /* kept messages, sequence seq-kept+1 .. seq */
    uint32_t ring_cap, ring_head; /* ring_cap: a power of two */
    uint32_t kept;
    uint32_t keep_max; /* history bounds for this topic (PUSHLET_OPT_HISTORY_*, rules) */
    int64_t keep_age_ms;
    uint16_t age_class; /* which list of p->kept its messages go to: 0 = the default age,
                           1 + i = rule i's own age */
    /* Distributed mode (distributed.c): whether its Redis channel is followed and its position
     * caught up, and who waits for that. */
    uint8_t sync;    /* PL_SYNC_* */
    bool fetching;   /* a history fetch is in flight */
    bool refetch;    /* fetch again when it returns (or on the next tick) */
    uint32_t holds;  /* waiters and callers that keep it alive without subscribing */
    uint64_t heard;  /* the highest sequence heard on its channel */
    pl_link waiters; /* pl_sync_wait.by_topic */
    char name[];
};

enum { PL_SYNC_NONE = 0, PL_SYNC_SUBSCRIBING, PL_SYNC_CATCHING, PL_SYNC_SYNCED };

typedef struct pl_sub {
    pl_topic *topic;
    uint32_t index; /* position in topic->subs */
    uint64_t seq;   /* the last sequence number queued while catching up, or on a multi-topic SSE
                       stream (whose cursor names it); else its start */
} pl_sub;

/* Embedded in whatever subscribes (a connection). */
struct pl_subscriber {
    pl_sub *subs;
    uint16_t nsubs, cap;
    int32_t cursor_check; /* of the topic list its cursors name, fixed when a stream starts
                             (pl_cursor_check_of); PL_CURSOR_NO_CHECK for a single topic */
};

typedef struct pl_topics {
    uv_mutex_t *mu;   /* when set, held while the table or a subscriber count changes (readers on
                         other threads take it; the loop thread reads without) */
    pl_topic **slots; /* open addressing, linear probing, backward-shift deletion */
    uint32_t cap;     /* power of two */
    uint32_t count;
    uint64_t subscriptions;
    /* Called for each new topic (sets its position and history bounds); may be NULL. */
    void (*on_new)(void *ctx, pl_topic *tp);
    void (*on_drop)(void *ctx, pl_topic *tp);  /* just before a topic is freed */
    void (*on_empty)(void *ctx, pl_topic *tp); /* its last subscriber left (it may stay) */
    void *ctx;
} pl_topics;

/* 1..max bytes of ASCII letters, digits and the `extra` characters. */
bool pl_name_valid(const char *name, size_t len, size_t max, const char *extra) PL_HIDDEN;
bool pl_topic_name_valid(const char *name, size_t len) PL_HIDDEN;
void pl_topics_init(pl_topics *t) PL_HIDDEN;
void pl_topics_destroy(pl_topics *t) PL_HIDDEN; /* every subscriber must have left */
pl_topic *pl_topics_find(const pl_topics *t, const char *name, size_t len) PL_HIDDEN;
/* The topic, created when absent; NULL when out of memory. The name must be valid. */
pl_topic *pl_topics_get(pl_topics *t, const char *name, size_t len) PL_HIDDEN;
/* 0 = subscribed (live, from the topic's current position), 1 = was already, PUSHLET_ENOMEM.
 * The name must be valid. */
int pl_topics_subscribe(pl_topics *t, pl_subscriber *s, const char *name, size_t len) PL_HIDDEN;
/* 0 = unsubscribed, 1 = was not subscribed. */
int pl_topics_unsubscribe(pl_topics *t, pl_subscriber *s, const char *name, size_t len) PL_HIDDEN;
void pl_topics_unsubscribe_all(pl_topics *t, pl_subscriber *s) PL_HIDDEN;
/* Frees the topic if nothing holds it any more (no subscriber, no kept message, no hold). */
void pl_topics_release(pl_topics *t, pl_topic *tp) PL_HIDDEN;

/* ---- Id maps (idmap.c): uint64 id (never 0) -> pointer; callers do their own locking -------- */

typedef struct pl_idmap {
    uint64_t *keys; /* 0 = empty slot */
    void **vals;
    uint32_t cap, count;
} pl_idmap;

void *pl_idmap_get(const pl_idmap *m, uint64_t id) PL_HIDDEN;
int pl_idmap_put(pl_idmap *m, uint64_t id, void *val) PL_HIDDEN; /* 0 or PUSHLET_ENOMEM */
void *pl_idmap_remove(pl_idmap *m, uint64_t id) PL_HIDDEN;       /* the value, or NULL */
void pl_idmap_destroy(pl_idmap *m) PL_HIDDEN;

/* ---- Positions, cursors and history (cursor.c, history.c) ---------------------------------- */

/* A position in a topic: the last message seen (seq 0 of an epoch = none). */
typedef struct pl_position {
    uint64_t epoch, seq;
} pl_position;

#define PL_CURSOR_MAX_POSITIONS 64 /* = the largest PUSHLET_OPT_MAX_TOPICS_PER_CONNECTION */
#define PL_CURSOR_NO_CHECK      (-1)

/* "EPOCH-SEQ" into out (NUL-terminated); returns its length. */
size_t pl_position_format(char out[PL_ID_MAX], pl_position pos) PL_HIDDEN;
/* Parses `position *("." position) ["~" check]` (see docs/ARCHITECTURE.md). Returns the number of
 * positions (1..max), or -1 when malformed. *check is PL_CURSOR_NO_CHECK when absent. */
int pl_cursor_parse(const char *s, size_t len, pl_position *out, size_t max,
                    int32_t *check) PL_HIDDEN;
/* The check of a list of topic names (a hash, 4 base-36 digits when formatted). */
int32_t pl_cursor_check(const char *const *names, const uint16_t *lens, size_t n) PL_HIDDEN;
/* Formats a cursor; a position repeats its epoch only when it differs from the previous one. The
 * check is appended unless PL_CURSOR_NO_CHECK. Returns the length, or 0 when `cap` is short. */
size_t pl_cursor_format(char *out, size_t cap, const pl_position *pos, size_t n,
                        int32_t check) PL_HIDDEN;

/* A per-topic history rule (PUSHLET_OPT_HISTORY_RULES). */
typedef struct pl_history_rule {
    char *pattern;
    size_t len;
    bool prefix; /* the pattern ended in '*' */
    uint32_t keep_max;
    int64_t keep_age_ms;
} pl_history_rule;

/* Parses "pattern=count[:age_ms],..." into a new array (free with pl_history_rules_free).
 * Returns the number of rules, or -1 when malformed. */
int pl_history_rules_parse(const char *spec, pl_history_rule **out) PL_HIDDEN;
void pl_history_rules_free(pl_history_rule *rules, int n) PL_HIDDEN;

/* ---- HTTP/1.1 request parsing (http.c): no I/O, copies only the head fields it keeps -------- */

#include <http_parser.h>

typedef struct pl_span {
    uint32_t off, len;
} pl_span;

typedef struct pl_http_limits {
    uint32_t max_url;     /* 414 */
    uint32_t max_head;    /* request target + header bytes kept; 431 */
    uint32_t max_headers; /* 431 */
    uint64_t max_body;    /* 413 */
} pl_http_limits;

enum { PL_HTTP_INCOMPLETE = 0, PL_HTTP_COMPLETE = 1, PL_HTTP_ERROR = -1 };

#define PL_HTTP_MAX_HEADERS_CAP 128

typedef struct pl_http_req {
    http_parser parser;
    const pl_http_limits *limits;
    int error_status; /* with PL_HTTP_ERROR: the status to answer (400, 413, 414, 431) */
    bool complete;
    bool headers_done;
    uint8_t last_span; /* which head element the last callback appended to */
    bool may_continue; /* the next callback may extend that element (see add_piece) */
    bool expect_continue;
    uint32_t nheaders;
    pl_span url;
    pl_span names[PL_HTTP_MAX_HEADERS_CAP], values[PL_HTTP_MAX_HEADERS_CAP];
    char *head; /* request target and header bytes, each span NUL-terminated */
    uint32_t head_len, head_cap;
    char *body;
    size_t body_len, body_cap;
} pl_http_req;

pl_http_req *pl_http_req_new(const pl_http_limits *limits) PL_HIDDEN;
void pl_http_req_free(pl_http_req *r) PL_HIDDEN;
/* Parse up to `len` bytes. Returns PL_HTTP_COMPLETE when a whole request is in (*consumed tells
 * how far; the rest belongs to the next request), PL_HTTP_INCOMPLETE when everything was consumed
 * and more is needed, PL_HTTP_ERROR with r->error_status set. */
int pl_http_parse(pl_http_req *r, const char *data, size_t len, size_t *consumed) PL_HIDDEN;
/* Forget the finished request, ready for the next one on the same connection. */
void pl_http_req_reset(pl_http_req *r) PL_HIDDEN;
static inline const char *pl_http_url(const pl_http_req *r) { return r->head + r->url.off; }
/* Case-insensitive lookup; NULL when absent. The value is NUL-terminated. */
const char *pl_http_header(const pl_http_req *r, const char *name, size_t *len) PL_HIDDEN;
bool pl_http_keep_alive(const pl_http_req *r) PL_HIDDEN;

/* Query / form iteration with percent-decoding. */
typedef struct pl_query_iter {
    const char *p, *end;
} pl_query_iter;
void pl_query_init(pl_query_iter *it, const char *query, size_t len) PL_HIDDEN;
/* Next "key=value" pair, decoded into `key`/`val` buffers (NUL-terminated). Returns 1 for a pair,
 * 0 at the end, -1 when a key or value does not fit or is badly encoded. */
int pl_query_next(pl_query_iter *it, char *key, size_t key_cap, size_t *key_len, char *val,
                  size_t val_cap, size_t *val_len) PL_HIDDEN;
/* Splits a request target into path and query (query may be empty). */
void pl_url_split(const char *url, size_t len, const char **path, size_t *path_len,
                  const char **query, size_t *query_len) PL_HIDDEN;
const char *pl_http_reason(int status) PL_HIDDEN;

/* ---- SSE framing (sse.c): pure encoders ---------------------------------------------------- */

bool pl_event_name_valid(const char *name, size_t len) PL_HIDDEN;
/* Bytes needed by pl_sse_encode for this message. */
size_t pl_sse_size(const char *id, size_t id_len, const char *event, size_t event_len,
                   const char *data, size_t data_len) PL_HIDDEN;
/* Writes "id: ..\nevent: ..\n" + one "data: " line per line of data + "\n"; returns bytes
 * written (exactly pl_sse_size()). Any of \r\n, \n, \r ends a data line. */
size_t pl_sse_encode(char *out, const char *id, size_t id_len, const char *event, size_t event_len,
                     const char *data, size_t data_len) PL_HIDDEN;

/* ---- WebSocket frame codec (ws_frame.c): pure, resumable at any byte
 * ---------------------------------- */

enum {
    PL_WS_CONT = 0x0,
    PL_WS_TEXT = 0x1,
    PL_WS_BINARY = 0x2,
    PL_WS_CLOSE = 0x8,
    PL_WS_PING = 0x9,
    PL_WS_PONG = 0xA,
};
#define PL_WS_MAX_HEADER 10 /* server frames are never masked */

typedef struct pl_ws_parser {
    uint8_t hdr[14];
    uint8_t hdr_len;
    bool in_payload, fin, allow_rsv1, msg_compressed;
    uint8_t opcode, msg_opcode; /* msg_opcode: TEXT/BINARY while a message is open, else 0 */
    uint8_t mask[4];
    uint8_t ctl_len;
    uint8_t ctl[125];           /* a control frame's payload, unmasked */
    uint32_t utf8;              /* pl_utf8_step state for the open text message */
    uint64_t remaining, offset; /* of the current frame's payload */
    uint64_t msg_len, max_message;
} pl_ws_parser;

enum { PL_WS_NEED_MORE = 0, PL_WS_DATA = 1, PL_WS_CONTROL = 2, PL_WS_ERROR = -1 };

typedef struct pl_ws_event {
    uint8_t opcode;      /* DATA: TEXT/BINARY of the message; CONTROL: CLOSE/PING/PONG */
    bool compressed;     /* DATA: the message has RSV1 (permessage-deflate) */
    bool message_end;    /* DATA: this chunk ends the message */
    uint16_t close_code; /* ERROR: the close code to send (1002, 1007, 1009) */
    const uint8_t *data; /* DATA: unmasked, inside the caller's buffer; CONTROL: in the parser */
    size_t len;
} pl_ws_event;

void pl_ws_parser_init(pl_ws_parser *ps, uint64_t max_message, bool allow_rsv1) PL_HIDDEN;
/* Parses up to `len` bytes, unmasking payload in place. Returns at the first event (DATA chunk,
 * complete CONTROL frame, ERROR) with *consumed telling how far it got, or NEED_MORE once all of
 * `len` is consumed. Text messages are UTF-8 checked unless compressed (1007). */
int pl_ws_parse(pl_ws_parser *ps, uint8_t *data, size_t len, size_t *consumed,
                pl_ws_event *ev) PL_HIDDEN;
size_t pl_ws_frame_header(uint8_t out[PL_WS_MAX_HEADER], uint8_t opcode, bool fin, bool rsv1,
                          uint64_t len) PL_HIDDEN;
bool pl_ws_close_code_valid(unsigned code) PL_HIDDEN;
bool pl_ws_key_valid(const char *key, size_t len) PL_HIDDEN;
void pl_ws_accept_key(const char *key, size_t len, char out[29]) PL_HIDDEN;
/* Incremental UTF-8 check: feed state 0 first; 0 after the last byte = valid, ~0u = invalid. */
uint32_t pl_utf8_step(uint32_t state, const uint8_t *s, size_t len) PL_HIDDEN;
bool pl_utf8_valid(const uint8_t *s, size_t len) PL_HIDDEN;

/* ---- Logging and the pull queue (events.c) ------------------------------------------------- */

/* The strings of an event; each is NUL-terminated inside `data` (offset 0 is an empty string). */
enum {
    PL_EV_TEXT = 0,
    PL_EV_USER,
    PL_EV_META,
    PL_EV_TOPIC,
    PL_EV_METHOD,
    PL_EV_PATH,
    PL_EV_QUERY,
    PL_EV_REMOTE,
    PL_EV_FIELDS
};

struct pushlet_event {
    struct pushlet_event *next;
    int type;
    int level;
    int transport;
    bool binary;
    uint64_t request, connection;
    char component[16];
    pl_span field[PL_EV_FIELDS];
    uint32_t nheaders;
    pl_span *headers; /* 2 x nheaders spans (name, value), inside this allocation */
    char data[];
};

typedef struct pl_events {
    uv_mutex_t mu;
    pushlet_event_t *head, **tail;
    size_t count, max_count, dropped;
    uint32_t mask; /* PUSHLET_EVENT_* kinds queued */
    int fd;        /* eventfd: readable while the queue is non-empty */
} pl_events;

int pl_events_init(pl_events *ev) PL_HIDDEN;
void pl_events_destroy(pl_events *ev) PL_HIDDEN;
/* Takes `e`; false when the queue was full (e freed, counted). Thread: any */
bool pl_events_push(pl_events *ev, pushlet_event_t *e) PL_HIDDEN;
/* A new event whose strings are `str[PL_EV_*]` (NULL = absent; `len` NULL = strlen) plus the
 * header fields of `r` (may be NULL). NULL when out of memory. */
pushlet_event_t *pl_event_new(int type, const char *const str[PL_EV_FIELDS],
                              const size_t len[PL_EV_FIELDS], const pl_http_req *r) PL_HIDDEN;

void pl_log(pushlet_t *p, int level, const char *component, const char *fmt, ...)
    PL_PRINTF(4, 5) PL_HIDDEN; /* Thread: any */
struct pl_conn;
/* A record about a connection: its id, user and peer are appended as key=value fields, and the
 * queued event carries the connection id. Loop thread. */
void pl_log_conn(const struct pl_conn *c, int level, const char *component, const char *fmt, ...)
    PL_PRINTF(4, 5) PL_HIDDEN;
#define pl_debug(p, c, ...) pl_log((p), PUSHLET_LOG_DEBUG, (c), __VA_ARGS__)
#define pl_info(p, c, ...)  pl_log((p), PUSHLET_LOG_INFO, (c), __VA_ARGS__)
#define pl_warn(p, c, ...)  pl_log((p), PUSHLET_LOG_WARN, (c), __VA_ARGS__)
#define pl_error(p, c, ...) pl_log((p), PUSHLET_LOG_ERROR, (c), __VA_ARGS__)

/* ---- Connections (conn.c) ------------------------------------------------------------------ */

typedef enum { PL_CONN_HTTP = 0, PL_CONN_SSE, PL_CONN_WS } pl_conn_kind;
typedef struct pl_ws_conn pl_ws_conn;

typedef struct pl_conn {
    uv_tcp_t tcp;
    pushlet_t *p;
    pl_link link; /* in p->conns_http or p->conns_stream */
    struct pl_conn *next_dirty, *next_closing;
    pl_http_req *req;  /* only while a request is being read */
    uint64_t deadline; /* loop ms: request head / keep-alive deadline (HTTP only) */
    pl_subscriber subscriber;
    /* Output: a queue of shared buffers; out[out_head] has out_off bytes already written. */
    pl_buf **out;
    uint32_t out_head, out_tail, out_cap;
    uint32_t out_off;
    uint32_t inflight; /* leading buffers owned by the uv_write in progress */
    size_t out_bytes;  /* unsent bytes queued, the slow-consumer bound applies to this */
    pl_ws_conn *ws;    /* WebSocket state, only on WebSocket connections */
    uint8_t kind;      /* pl_conn_kind */
    uint8_t format;    /* pl_format of the messages it receives */
    bool dirty, writing, closing, ending, shut, keep_alive, http10;
    bool head_req;  /* the request being answered is HEAD: headers only */
    bool peer_done; /* the peer half-closed: no linger needed once our answers are out */
    bool rejected;  /* answered 503 at accept (counted in p->nrejecting) */
    struct pl_jwt_claims *auth; /* a verified token's claims (auth.c), when required */
    bool catching_up;           /* some subscription is fed from history (history.c) */
    bool refill_queued;
    struct pl_conn *next_refill;
    /* Identity and the host's hooks (hooks.c). */
    uint64_t id;       /* unique per broker, never reused */
    char *user, *meta; /* user id and metadata: a token's `sub`, or the host's allow */
    size_t user_len, meta_len;
    uint8_t auth_stage;        /* PL_AUTH_* of the request being answered */
    uint16_t topics_waiting;   /* initial topics whose subscribe request is unanswered */
    uint16_t commands_waiting; /* WebSocket subscribe commands awaiting the host */
    pl_link requests;          /* its unanswered auth requests (pl_request.by_conn) */
    pl_link sync_waits;        /* distributed mode: its subscriptions waiting for their topic to
                                  catch up from Redis (pl_sync_wait.by_conn) */
    uint16_t syncs_waiting;    /* initial topics among them */
    struct pl_publish_wait *publish_wait; /* an HTTP publish waiting for Redis's answer */
    bool parked;     /* its request waits for the host: input is stashed meanwhile */
    bool registered; /* open and known to the host: connected event sent */
    char *stash;     /* input that arrived while parked */
    size_t stash_len;
    const char *why; /* why it closed (static text), for the disconnected event */
    struct pl_conn *next_by_user;
    double msg_tokens; /* client messages allowed now (a token bucket) */
    uint64_t msg_token_ms;
} pl_conn;

void pl_conn_accept(pushlet_t *p) PL_HIDDEN;
/* A parked request was answered by other means than routing it again (a publish Redis
 * stored): input that waited is read. */
void pl_conn_resume_input(pl_conn *c) PL_HIDDEN;
/* Queue a shared buffer (takes a new reference). Drops the connection when over its bound. */
void pl_conn_send(pl_conn *c, pl_buf *b) PL_HIDDEN;
/* Whether `bytes` more stay within `limit` unsent bytes (an empty queue takes anything). */
static inline bool pl_conn_fits(const pl_conn *c, size_t bytes, uint64_t limit)
{
    return c->out_bytes == 0 || c->out_bytes + bytes <= limit;
}
/* Finish sending what is queued, then close (graceful). */
void pl_conn_end(pl_conn *c) PL_HIDDEN;
/* Close now; the reason is logged at debug level. Safe during fan-out: takes effect at reap. */
void pl_conn_close(pl_conn *c, const char *reason) PL_HIDDEN;
/* Run once per loop turn (prepare phase): write every dirty connection, reap closed ones. */
void pl_conns_flush(pushlet_t *p) PL_HIDDEN;
void pl_conns_sweep_timeouts(pushlet_t *p) PL_HIDDEN;

/* ---- WebSocket transport (ws.c) ---------------------------------------------------------- */

/* Answers an upgrade request on the WebSocket path: handshake, or an HTTP error. */
void pl_ws_upgrade(pl_conn *c, pl_http_req *r, const char *query, size_t qlen) PL_HIDDEN;
/* Frames from the peer; `data` is mutable (unmasked in place). */
void pl_ws_on_read(pl_conn *c, uint8_t *data, size_t len) PL_HIDDEN;
/* Ping the peer, or drop it if the previous ping went unanswered. */
void pl_ws_heartbeat(pl_conn *c) PL_HIDDEN;
/* Send a close frame and end the connection once it is written. */
void pl_ws_close(pl_conn *c, uint16_t code, const char *reason) PL_HIDDEN;
void pl_ws_free(pl_conn *c) PL_HIDDEN;

/* A client command, parsed (pure: fuzzed on its own). */
enum { PL_WS_CMD_SUBSCRIBE = 1, PL_WS_CMD_UNSUBSCRIBE, PL_WS_CMD_PING };
typedef struct pl_ws_command {
    int action;
    char topic[129]; /* a valid topic name for (un)subscribe */
    size_t topic_len;
    bool has_since; /* subscribe: resume after this position */
    pl_position since;
    const char *reason, *detail; /* on error: machine-readable reason, one-line explanation */
} pl_ws_command;
/* 0 with `cmd` filled, or -1 with cmd->reason/detail set (static strings). */
int pl_ws_parse_command(const uint8_t *data, size_t len, pl_ws_command *cmd) PL_HIDDEN;

/* ---- Delivery, resume and history (history.c) ------------------------------------------------ */

/* Queues a message of topic `t` (the subscriber's entry `ts`) on its connection, in the
 * connection's format (with its own cursor line on multi-topic SSE streams). Applies the
 * slow-consumer policy. Returns 1 when queued. */
int pl_deliver(pl_conn *c, pl_msg *m, pl_topic_sub *ts) PL_HIDDEN;
/* Starts subscription `k` of `c` from a client's position (NULL: from now, live). Queues a gap
 * signal first when the position cannot be served. */
void pl_resume(pl_conn *c, uint16_t k, const pl_position *from) PL_HIDDEN;
/* Sends the gap signal for subscription `k` (SSE event or WebSocket message). */
void pl_send_gap(pl_conn *c, uint16_t k, const char *reason) PL_HIDDEN;
/* The check of `c`'s topic list, computed once, when its request's topics are subscribed. */
int32_t pl_cursor_check_of(const pl_conn *c) PL_HIDDEN;
/* The cursor of `c`'s subscriptions as they stand (a message ID for a single topic). */
size_t pl_conn_cursor(const pl_conn *c, char *out, size_t cap) PL_HIDDEN;
/* Parses a client cursor for `c`'s subscriptions: 1 = fits (positions in `out`, one per
 * subscription), 0 = well-formed but not for these topics, -1 = malformed. */
int pl_cursor_for(const pl_conn *c, const char *s, size_t len, pl_position *out) PL_HIDDEN;
/* Keeps `m` in its topic's history (the topic exists). */
void pl_history_keep(pushlet_t *p, pl_topic *t, pl_msg *m) PL_HIDDEN;
/* Evicts what is over the memory budget (and, with `by_age`, what passed its age); frees topics
 * nothing holds any more. */
void pl_history_trim(pushlet_t *p, bool by_age) PL_HIDDEN;
void pl_history_clear(pushlet_t *p) PL_HIDDEN; /* at stop */
void pl_history_topic_init(void *ctx, pl_topic *t) PL_HIDDEN;
void pl_history_topic_dropped(void *ctx, pl_topic *t) PL_HIDDEN;
/* Forgets a topic's kept messages (its positions stay); never frees it. */
void pl_history_forget(pushlet_t *p, pl_topic *t) PL_HIDDEN;
#define PL_TOMBSTONES 8192 /* a power of two */
/* Feeds connections catching up from history; run once per loop turn before writing. */
void pl_catch_up(pushlet_t *p) PL_HIDDEN;
void pl_catch_up_queue(pl_conn *c) PL_HIDDEN;

/* ---- Authorisation (auth.c) ----------------------------------------------------------------- */

/* Before a stream starts or an upgrade completes: 0 = allowed (the token's claims kept on `c`),
 * PL_AUTH_WAIT = asked the host (the connection is parked until it answers), else the HTTP status
 * to answer (401, 503) with `*err` set. */
#define PL_AUTH_WAIT (-1)
int pl_auth_connection(pl_conn *c, const pl_http_req *r, const char *query, size_t qlen,
                       const char **err) PL_HIDDEN;
/* May `c` subscribe to this topic? (Counts a refusal.) */
bool pl_auth_topic(pl_conn *c, const char *topic, size_t len) PL_HIDDEN;
void pl_auth_free(pl_conn *c) PL_HIDDEN;

/* ---- Hooks (hooks.c): auth requests, lifecycle events, client messages, targeted sends ----- */

/* Where a connection's request stands with the host. */
enum {
    PL_AUTH_NONE = 0,
    PL_AUTH_CONNECT_WAIT,
    PL_AUTH_CONNECT_OK,
    PL_AUTH_TOPICS_WAIT,
    PL_AUTH_TOPICS_OK
};

/* Whether the handler or the pull queue takes events of `kind`. */
bool pl_hooks_want(const pushlet_t *p, int kind) PL_HIDDEN;
/* Asks the host about `c`'s connection (the request `r` with its query). 0 = asked (parked),
 * else the HTTP status to answer at once (503: the event could not be delivered). */
int pl_hooks_ask_connect(pl_conn *c, const pl_http_req *r, const char *query,
                         size_t qlen) PL_HIDDEN;
/* Asks about each initial topic: 0 = nothing to ask (all allowed), PL_AUTH_WAIT = asked, 503. */
int pl_hooks_ask_topics(pl_conn *c, char (*topics)[256], const size_t *lens, size_t n) PL_HIDDEN;
/* Asks about a WebSocket subscribe command: 0 = asked, 1 = already being asked, 503. */
int pl_hooks_ask_command(pl_conn *c, const char *topic, size_t len,
                         const pl_position *since) PL_HIDDEN;
/* An unsubscribe cancels a pending subscribe command: true when there was one. */
bool pl_hooks_cancel_command(pl_conn *c, const char *topic, size_t len) PL_HIDDEN;
/* Answers that arrived, and requests past their deadline (loop thread). */
void pl_hooks_take_answers(pushlet_t *p) PL_HIDDEN;
void pl_hooks_expire(pushlet_t *p) PL_HIDDEN;
/* Lifecycle: a stream or WebSocket opened (its initial subscriptions follow), a subscription
 * changed, the connection is being reaped. */
void pl_hooks_connected(pl_conn *c) PL_HIDDEN;
void pl_hooks_subscribed(pl_conn *c, const pl_topic *t) PL_HIDDEN;
/* Events are built while the topic and subscription exist, and emitted (pl_hooks_emit, which
 * takes a list) once the state they report holds, so a handler that looks sees it. */
pushlet_event_t *pl_hooks_unsubscribed_event(pl_conn *c, const pl_topic *t,
                                             const char *reason) PL_HIDDEN;
void pl_hooks_emit(pushlet_t *p, pushlet_event_t *list) PL_HIDDEN;
/* A closing connection: cancels its pending requests and builds its unsubscribed and
 * disconnected events; pl_hooks_conn_gone, after its subscriptions went, unregisters it and
 * emits them. */
pushlet_event_t *pl_hooks_conn_leaving(pl_conn *c) PL_HIDDEN;
void pl_hooks_conn_gone(pl_conn *c, pushlet_event_t *farewell) PL_HIDDEN;
/* A WebSocket message that is no command: true when the host takes it. */
bool pl_hooks_client_message(pl_conn *c, const uint8_t *data, size_t len, bool binary) PL_HIDDEN;
/* A targeted send or close from the inbox (m->target != PL_TO_TOPIC); takes `m`. */
void pl_hooks_dispatch(pushlet_t *p, pl_msg *m) PL_HIDDEN;
/* At start and stop (loop side): open and close the answer path, free what is left. */
void pl_hooks_open(pushlet_t *p) PL_HIDDEN;
void pl_hooks_close(pushlet_t *p) PL_HIDDEN;
void pl_hooks_release(pushlet_t *p) PL_HIDDEN;
/* Continue a parked request once its answer came (conn.c). */
void pl_conn_unpark(pl_conn *c) PL_HIDDEN;
/* A WebSocket subscribe command the host allowed (ws.c). */
void pl_ws_subscribe(pl_conn *c, const char *topic, size_t len, const pl_position *since) PL_HIDDEN;
/* A reply to a WebSocket client: {"event":E,"topic":T,"reason":R,"data":D} (ws.c). */
void pl_ws_reply(pl_conn *c, const char *event, const char *topic, const char *reason,
                 const char *message) PL_HIDDEN;

/* ---- Routing (router.c) -------------------------------------------------------------------- */

/* A complete request arrived on `c`; answers it or turns the connection into a stream. */
void pl_route(pl_conn *c, pl_http_req *r) PL_HIDDEN;
/* Answer with a complete response; `extra` holds whole header lines ("Name: v\r\n"), may be "". */
void pl_respond(pl_conn *c, int status, const char *extra, const char *ctype, const char *body,
                size_t body_len, bool head_only) PL_HIDDEN;
/* Answer an error status and close after it is sent. */
void pl_respond_error_close(pl_conn *c, int status) PL_HIDDEN;
void pl_respond_text(pl_conn *c, int status, const char *extra, const char *text) PL_HIDDEN;
/* Validates every `topic` parameter of the query, then subscribes `c` to all of them (or to
 * "default" when there are none and `use_default`). Returns 0, else the HTTP status to answer
 * with `*err` set to a one-line reason. */
int pl_subscribe_query(pl_conn *c, const char *query, size_t qlen, bool use_default,
                       const char **err) PL_HIDDEN;
/* The client's resume cursor for `c`'s subscriptions, from the Last-Event-ID header or else the
 * `last_event_id` query parameter: 1 = fits (positions in `pos`), 0 = does not fit these topics
 * (or a bad header), -1 = none given; -400/-503 = refuse with that status and `*err`. */
int pl_read_cursor(pl_conn *c, const char *header, size_t header_len, const char *query,
                   size_t qlen, pl_position *pos, const char **err) PL_HIDDEN;
/* Starts every subscription of `c` as pl_read_cursor() found (a gap each when 0), calling
 * `announce` (may be NULL) for each just before, with the position it starts from. */
void pl_resume_all(pl_conn *c, int fit, const pl_position *pos,
                   void (*announce)(pl_conn *c, uint16_t k, const pl_position *from)) PL_HIDDEN;
/* The Prometheus text for GET /metrics (metrics.c); NULL when out of memory. */
pl_buf *pl_metrics_render(pushlet_t *p) PL_HIDDEN;
/* Keeps the gauges in step with the topic registry. */
void pl_sync_topic_stats(pushlet_t *p) PL_HIDDEN;
/* Finds `key` in a query string or form body; its decoded value goes to a new buffer that the
 * caller frees. Returns 1 when found, 0 when not, PUSHLET_ENOMEM. */
int pl_query_find(const char *q, size_t qlen, const char *key, char **out,
                  size_t *out_len) PL_HIDDEN;

/* ---- The broker (broker.c) ----------------------------------------------------------------- */

typedef struct pl_config {
    int64_t heartbeat_ms, header_timeout_ms, keepalive_timeout_ms, stop_timeout_ms, retry_ms;
    int64_t max_connections, max_message_size, max_header_size, max_url_size, max_headers;
    int64_t max_output_bytes, max_topics_per_connection, max_queued_messages, max_queued_bytes;
    int64_t max_pending_events, http_publish, log_level;
    int64_t history_size, history_age_ms, history_max_bytes, slow_consumer_policy;
    int64_t max_subscribes_per_sec, max_body_size, close_timeout_ms, auth_timeout_ms;
    int64_t max_client_messages_per_sec;
    char *sse_path, *ws_path, *publish_path, *publish_all_path, *send_path, *stats_path,
        *health_path, *cors_origin, *publish_secret, *index_html, *ws_origins, *history_rules,
        *jwt_secret, *metrics_path;
    char host[64];
    int port;
} pl_config;

enum { PL_STATE_STOPPED = 0, PL_STATE_RUNNING, PL_STATE_STOPPING };

struct pushlet {
    /* Configuration and lifecycle: guarded by `state_mu`, fixed while running. */
    uv_mutex_t state_mu;
    uv_cond_t state_cv; /* signalled when a stop completes */
    int state;
    pl_config cfg;
    pl_http_limits limits;
    uv_thread_t thread;
    uv_thread_t loop_thread; /* atomic: set by the loop thread itself, 0 when none */
    bool stop_requested;     /* atomic */
    int bound_port;          /* atomic */
    size_t max_data;         /* atomic: cfg.max_message_size, for publishers */

    /* Logging: `log_mu` guards the callback triple. */
    uv_mutex_t log_mu;
    pushlet_log_fn log_fn;
    void *log_ud;
    int log_fn_level;
    int log_level; /* atomic: least level for the pull queue */
    pl_events events;

    /* Hooks (hooks.c). The handler triple is fixed while running. */
    pushlet_event_fn hook_fn;
    void *hook_ud;
    uint32_t hook_mask;
    uv_mutex_t hooks_mu;    /* guards what other threads reach: the three maps below, `answered`,
                               `hooks_open` */
    pl_idmap requests;      /* request id -> pl_request, while unanswered */
    pl_idmap conns_by_id;   /* connection id -> open pl_conn (registered ones) */
    pl_conn **user_buckets; /* registered connections with a user id, chained by user hash */
    uint32_t user_cap, user_count;
    struct pl_request *answered, **answered_tail;
    bool hooks_open;       /* answers may wake the loop */
    pl_link pending;       /* loop: unanswered requests, oldest first (deadlines) */
    uint64_t next_request; /* loop */
    uint64_t next_conn_id; /* loop; survives restarts so ids are never reused */
    uv_mutex_t topics_mu;  /* the topic registry's structure, for pushlet_topic_subscribers */

    pl_inbox inbox;
    int64_t stats[PUSHLET_STAT_COUNT];

    /* Loop-thread state, valid while running. */
    uv_loop_t loop;
    uv_async_t wake;
    uv_tcp_t listener;
    uv_prepare_t flusher;
    uv_timer_t ticker, heartbeat, stop_timer;
    bool stopping;
    int open_handles; /* broker-owned handles not yet closed */
    uint64_t epoch;   /* drawn at every start: history does not outlive a run */
    uint64_t counter; /* messages dispatched this run; new topics' sequences start here */
    pl_topics topics;
    /* History (history.c). */
    /* Kept messages by age class (one list per distinct age: the default, then each rule's),
     * each oldest first, so expiry and the budget look at list heads only. */
    pl_link *kept;
    int nkept;
    uint64_t kept_bytes, kept_count;
    pl_history_rule *rules;
    int nrules;
    /* The last sequence number of recently dropped topics (direct-mapped by a 64-bit name
     * hash), so a topic that comes back continues where it stopped instead of jumping ahead. */
    uint64_t *tomb_hash, *tomb_seq;
    pl_conn *refill;       /* connections waiting for room to catch up */
    uv_idle_t refill_idle; /* keeps the loop turning while some are queued */
    pl_link conns_http, conns_stream;
    pl_conn *dirty, *closing;
    uint32_t nconns;
    uint32_t nrejecting; /* 503-answered connections still lingering */
    pl_buf *sse_preamble, *sse_heartbeat, *ws_ping;
    pl_deflate *deflate;  /* made on first use */
    char *read_buf;       /* one per broker: every read is handled before the next */
    struct pl_dist *dist; /* distributed mode (distributed.c); NULL when off */
};

#define PL_READ_BUF_SIZE 65536

/* Publish on the loop thread: assigns the ID (copied to `id` unless NULL), fans out, keeps the
 * message in its topic's history, takes ownership of `m`. */
void pl_broker_dispatch(pushlet_t *p, pl_msg *m, char id[PL_ID_MAX]) PL_HIDDEN;
/* Fans a topic message whose position (m->seq, m->id) is set out to the topic's live
 * subscribers and keeps it in the history; does not take `m`, never frees `t`. */
void pl_broker_fanout(pushlet_t *p, pl_topic *t, pl_msg *m) PL_HIDDEN;
/* A publish-to-all message to every open stream; does not take `m`. */
void pl_broker_fanout_all(pushlet_t *p, pl_msg *m) PL_HIDDEN;
/* Start/stop the loop side. Called by pushlet.c: start with state_mu held, stop without it
 * (state STOPPING keeps other calls out). */
int pl_broker_start(pushlet_t *p) PL_HIDDEN;
void pl_broker_stop(pushlet_t *p) PL_HIDDEN;
/* The stream connections whose handshake is complete now count toward stop; called when a
 * connection closes so stop can finish. */
void pl_broker_conn_gone(pushlet_t *p) PL_HIDDEN;
bool pl_on_loop_thread(const pushlet_t *p) PL_HIDDEN;

/* ---- Distributed mode (distributed.c, docs/DISTRIBUTED.md) ------------------------------- */

/* Loop side: the Redis clients are made at start and freed at the end of stop. */
int pl_dist_start(pushlet_t *p) PL_HIDDEN;
bool pl_dist_busy(pushlet_t *p) PL_HIDDEN;    /* publishes still waiting for Redis: stop waits */
void pl_dist_abandon(pushlet_t *p) PL_HIDDEN; /* the stop deadline: no more waiting */
void pl_dist_close(pushlet_t *p) PL_HIDDEN;
void pl_dist_free(pushlet_t *p) PL_HIDDEN; /* the configuration (pushlet_free) */
void pl_dist_tick(pushlet_t *p) PL_HIDDEN; /* waits that timed out, fetches to retry */
/* Publishers' bound, any thread: room for one more publish not yet stored by Redis, or
 * PUSHLET_EFULL; pl_dist_release gives it back. Both no-ops when the mode is off. */
int pl_dist_reserve(pushlet_t *p, size_t bytes) PL_HIDDEN;
void pl_dist_release(pushlet_t *p, size_t bytes) PL_HIDDEN;
size_t pl_dist_msg_bytes(const pl_msg *m) PL_HIDDEN;
/* Sends a reserved publish to its shard; takes `m`. `c`: an HTTP request answered (and parked
 * until then) with the ID Redis gives it, else NULL. */
void pl_dist_publish(pushlet_t *p, pl_msg *m, pl_conn *c) PL_HIDDEN;
/* Initial topics of a request, once allowed: 0 = all caught up (go on), PL_AUTH_WAIT = the
 * connection is parked until they are (then routed again), or 503. */
int pl_dist_topics_ready(pl_conn *c, char (*topics)[256], const size_t *lens, size_t n) PL_HIDDEN;
/* A WebSocket subscribe: true = go on; false = it waits (pl_ws_subscribe is called again once
 * the topic caught up, or an error is replied). */
bool pl_dist_command_ready(pl_conn *c, const char *topic, size_t len,
                           const pl_position *since) PL_HIDDEN;
bool pl_dist_cancel_command(pl_conn *c, const char *topic, size_t len) PL_HIDDEN;
void pl_dist_conn_gone(pl_conn *c) PL_HIDDEN;
void pl_dist_topic_init(pushlet_t *p, pl_topic *t) PL_HIDDEN;
void pl_dist_topic_empty(void *ctx, pl_topic *t) PL_HIDDEN;

typedef struct pl_dist_shard_view {
    const char *where, *state, *error; /* address (no password), state name, last error or "" */
    bool ready;
    size_t pending; /* publishes sent or queued, not answered */
} pl_dist_shard_view;
size_t pl_dist_shards(const pushlet_t *p) PL_HIDDEN;
bool pl_dist_shard_info(const pushlet_t *p, size_t i, pl_dist_shard_view *out) PL_HIDDEN;

#endif /* PL_INTERNAL_H */
