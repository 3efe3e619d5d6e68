/* Helpers shared by the unit tests and the TSan programs: an EventSource parser that follows
 * the WHATWG rules (so tests check what a browser would see, not what the encoder meant to
 * write), a small blocking SSE client over loopback TCP and real redis-server processes.
 * Every wait is bounded. Nothing here asserts (the TSan programs link it without Criterion):
 * failures come back as return values, and each test checks them. */
#ifndef PL_TESTUTIL_H
#define PL_TESTUTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <hiredis/hiredis.h>

/* ---- Growable byte buffer ---------------------------------------------------------------- */

typedef struct tu_buf {
    char *p;
    size_t len, cap;
} tu_buf;

void tu_buf_append(tu_buf *b, const void *data, size_t len); /* aborts on OOM; keeps a NUL */
void tu_buf_reset(tu_buf *b);
void tu_buf_free(tu_buf *b);

/* ---- WHATWG EventSource stream parser ------------------------------------------------------ */

/* One dispatched event. The strings are NUL-terminated copies owned by the parser/client. */
typedef struct tu_event {
    char *id;    /* the last event ID at dispatch time ("" when none was ever set) */
    char *event; /* the event type ("message" when the stream named none) */
    char *data;  /* data lines joined with \n */
    size_t id_len, event_len, data_len;
} tu_event;

typedef void (*tu_event_fn)(void *ud, const tu_event *ev);

typedef struct tu_sse_parser {
    tu_buf line, data, event, id;
    bool after_cr; /* a CR ended the last line: a following LF belongs to it */
    long retry_ms; /* last valid `retry:` field, -1 when none */
    size_t comments;
    tu_event_fn fn;
    void *ud;
} tu_sse_parser;

void tu_sse_init(tu_sse_parser *ps, tu_event_fn fn, void *ud);
void tu_sse_feed(tu_sse_parser *ps, const char *data, size_t len);
void tu_sse_free(tu_sse_parser *ps);

/* Parse a whole buffer and collect its events into a new array (free with tu_events_free). */
size_t tu_sse_parse_all(const char *data, size_t len, tu_event **out);
void tu_events_free(tu_event *evs, size_t n);

/* ---- Loopback client ---------------------------------------------------------------------- */

int64_t tu_now_ms(void); /* monotonic */
void tu_sleep_ms(int ms);
int tu_connect(int port); /* blocking connect to 127.0.0.1:port; fd or -1 */
bool tu_send_all(int fd, const char *data, size_t len);
/* Wait up to timeout_ms for data: >0 bytes read, 0 EOF, -1 error, -2 timeout. */
long tu_recv(int fd, char *buf, size_t cap, int timeout_ms);

/* An SSE subscriber: sends GET <path>, checks the 200 head, parses the stream. Events go to
 * `fn` when given, else into an internal queue read with tu_client_next(). */
typedef struct tu_client {
    int fd;
    int status; /* HTTP status of the response head, 0 until read */
    bool head_done, eof;
    tu_buf head;
    tu_sse_parser parser;
    tu_event *queue; /* collected events when no callback was given */
    size_t qlen, qcap, qhead;
    tu_event_fn user_fn;
    void *user_ud;
} tu_client;

/* Connect and send the request; returns false when the connection fails. */
bool tu_client_open(tu_client *c, int port, const char *path, tu_event_fn fn, void *ud);
/* Read once (up to timeout_ms) and feed the parser: >0 bytes, 0 EOF, -1 error, -2 timeout. */
long tu_client_pump(tu_client *c, int timeout_ms);
/* Next queued event, reading as needed: 1 got one (copied into *ev; free with tu_event_clear),
 * 0 EOF, -1 timeout or error. */
int tu_client_next(tu_client *c, tu_event *ev, int timeout_ms);
/* Open, then wait for the broker's "connected" event: after it the subscription exists. */
bool tu_client_subscribe(tu_client *c, int port, const char *topic, int timeout_ms);
/* Read until EOF; true when the peer closed within timeout_ms. */
bool tu_client_wait_eof(tu_client *c, int timeout_ms);
void tu_client_close(tu_client *c);
void tu_event_clear(tu_event *ev);

/* ---- redis-server processes ---------------------------------------------------------------- */

/* A redis-server of the test's own on 127.0.0.1 (no RDB saves), in a temporary directory with
 * its log and unix socket. Set the options, then tu_redis_start(). The child gets
 * PR_SET_PDEATHSIG (SIGKILL) from the thread that forks it, so fork from a thread that lives
 * until the end (the main thread), and it inherits none of the caller's fds. */
typedef struct tu_redis {
    /* options, read by tu_redis_start() and tu_redis_spawn() */
    int port;             /* 0: tu_redis_start() picks a free one */
    const char *password; /* --requirepass, and AUTH on connecting, unless NULL */
    bool aof;             /* appendonly yes, appendfsync always: a restart keeps the data */
    bool ipv6;            /* also listens on [::1] */
    /* state */
    pid_t pid; /* 0 when not running */
    char dir[64];
    char sock[128];  /* the unix socket, in dir */
    char error[256]; /* why the last call failed */
} tu_redis;

/* A loopback TCP port that was free a moment ago, or -1. */
int tu_free_port(void);
/* Make the directory and spawn. On false, s->error says why and nothing is left behind. */
bool tu_redis_start(tu_redis *s, int timeout_ms);
/* Start the server (again, on the same port and directory) and wait up to timeout_ms until it
 * answers PING. On false, s->error says why (the process, if any, is left to tu_redis_stop). */
bool tu_redis_spawn(tu_redis *s, int timeout_ms);
/* SIGKILL and reap; the directory stays. */
void tu_redis_kill(tu_redis *s);
/* Kill, and remove the directory with everything in it. Harmless on a zeroed tu_redis. */
void tu_redis_stop(tu_redis *s);
/* Kill and remove every server started and not yet stopped (for a suite's .fini, after a failed
 * assertion skipped the test's own tu_redis_stop; the test's tu_redis may be gone by then). */
void tu_redis_stop_all(void);
/* A sync client (1 s timeouts, AUTHed when a password is set), or NULL. Free with redisFree. */
redisContext *tu_redis_connect(const tu_redis *s);
/* One command on db `db` over a fresh connection: the reply (free with freeReplyObject), or NULL
 * when the server cannot be reached or did not answer. */
redisReply *tu_redis_cmd(const tu_redis *s, int db, const char *fmt, ...);
redisReply *tu_redis_vcmd(const tu_redis *s, int db, const char *fmt, va_list ap);

#endif /* PL_TESTUTIL_H */
