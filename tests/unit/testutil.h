/* Helpers shared by the unit tests and the TSan programs: an EventSource parser that follows
 * the WHATWG rules (so tests check what a browser would see, not what the encoder meant to
 * write) and a small blocking SSE client over loopback TCP. Every wait is bounded. */
#ifndef PL_TESTUTIL_H
#define PL_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

#endif /* PL_TESTUTIL_H */
