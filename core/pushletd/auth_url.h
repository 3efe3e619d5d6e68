/* pushletd --auth-url: connections and subscriptions are allowed or denied by an HTTP backend.
 *
 * A dispatcher thread drains the broker's pull queue (AUTH_CONNECT and AUTH_SUBSCRIBE events)
 * into a job list; a few worker threads each keep one HTTP/1.1 keep-alive connection to the
 * backend, POST one JSON document per request and answer with pushlet_allow()/pushlet_deny()
 * from their own thread. The protocol is described in docs/PUSHLETD.md, "Auth backend".
 *
 * The response parser and the mapping of a response to an answer do no I/O and no allocation
 * beyond cJSON's; tests/fuzz/fuzz_auth_response.c drives them with arbitrary bytes. */
#ifndef PUSHLETD_AUTH_URL_H
#define PUSHLETD_AUTH_URL_H

#include <pushlet.h>

#include <http_parser.h>
#include <stddef.h>

/* ---- the backend's answer, parsed ------------------------------------------------------- */

/* Body bytes kept; the rest of a longer body is read and dropped (a 2xx answer whose JSON is
 * cut by this is a bad answer). Enough for a 256-byte user and 4096 bytes of metadata. */
#define PL_AUTHURL_BODY_MAX   16384
#define PL_AUTHURL_USER_MAX   256
#define PL_AUTHURL_META_MAX   4096
#define PL_AUTHURL_REASON_MAX 120

enum { PL_AUTHURL_BAD = -1, PL_AUTHURL_MORE = 0, PL_AUTHURL_DONE = 1 };

typedef struct pl_authurl_response {
    http_parser parser;
    int status;      /* final (non-1xx) status, once done */
    int keep_alive;  /* the connection may carry the next request */
    int done;        /* the whole response has been read */
    int truncated;   /* body was longer than PL_AUTHURL_BODY_MAX */
    size_t body_len; /* bytes in body */
    char body[PL_AUTHURL_BODY_MAX];
} pl_authurl_response;

/* Start reading a response (to a POST). */
void pl_authurl_response_init(pl_authurl_response *r);

/* Feed the next `len` bytes received; `len` 0 means the peer closed the connection. `*used`
 * gets how many bytes belong to this response (bytes after it are no part of it).
 * @return PL_AUTHURL_DONE (response complete), PL_AUTHURL_MORE or PL_AUTHURL_BAD (not HTTP,
 *         an upgrade, or closed before the end). Thread: any (the struct is the caller's). */
int pl_authurl_response_feed(pl_authurl_response *r, const char *data, size_t len, size_t *used);

/* What to answer the broker. */
typedef struct pl_authurl_answer {
    int allow;                              /* 1 allow, 0 deny */
    int status;                             /* deny: 4xx from the backend, or 503 */
    char reason[PL_AUTHURL_REASON_MAX + 1]; /* deny: one line of UTF-8 ("" = none) */
    int has_user;                           /* allow (connections): user is set */
    char user[PL_AUTHURL_USER_MAX + 1];     /* allow: the backend's user id */
    char *metadata;                         /* allow: JSON text, or NULL; owned by the answer */
} pl_authurl_answer;

/* Map a complete response to an answer: 2xx allows (for a connection, an optional JSON object
 * body gives "user" and "metadata"), 4xx denies with that status and the body's first line as
 * the reason, anything else (and a malformed 2xx body) denies with 503.
 * `connect`: 1 for an AUTH_CONNECT request, 0 for AUTH_SUBSCRIBE.
 * Release with pl_authurl_answer_clear(). Thread: any. */
void pl_authurl_decide(const pl_authurl_response *r, int connect, pl_authurl_answer *a);
void pl_authurl_answer_clear(pl_authurl_answer *a);

/* ---- the service ------------------------------------------------------------------------ */

typedef struct pl_authurl pl_authurl_t;

typedef struct pl_authurl_config {
    const char *url; /* http://HOST[:PORT][/PATH] */
    int workers;     /* worker threads = backend connections, 1..256 */
    int timeout_ms;  /* per request, including waiting for a worker */
    pushlet_log_fn log;
    int log_level; /* least level passed to log */
} pl_authurl_config;

/* Check the syntax of an --auth-url value. @return 0, or -1 with a one-line reason in `why`. */
int pl_authurl_check(const char *url, char *why, size_t cap);

/* Resolve the backend's host, take the broker's auth requests (pushlet_events_enable) and start
 * the threads. Call before pushlet_start(), with SIGINT/SIGTERM already blocked.
 * @return 0, or -1 with a one-line reason in `why`. */
int pl_authurl_start(pl_authurl_t **out, pushlet_t *p, const pl_authurl_config *cfg, char *why,
                     size_t cap);

/* Stop and join the threads (a request in flight is abandoned; the broker denies it when it
 * stops or times out), then free everything. Call after pushlet_stop() and before
 * pushlet_free(). NULL is a no-op. */
void pl_authurl_stop(pl_authurl_t *a);

#endif
