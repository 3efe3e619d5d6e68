/*
 * pushlet-bench: SSE / WebSocket fan-out benchmark client (method:
 * docs/BENCHMARKS.md).
 *
 * One process, one libuv loop.  It opens N subscribers (SSE, or WebSocket
 * with --transport ws), proves each one is really subscribed (warm-up
 * message), publishes M messages over a few
 * keep-alive HTTP connections and checks every delivery: loss, duplicates,
 * reordering and publish->receive latency.  It also samples the server's
 * RSS and CPU from /proc for the PIDs it is given.
 *
 * Phases: CONNECT -> WARMUP -> SETTLE -> PUBLISH -> DRAIN -> DONE.
 * A 1 ms tick drives rate limiting, retries and every time bound.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_PIDS       8
#define MAX_PUBLISHERS 64
#define MAX_PIPELINE   64
#define MAX_LINE       (64 * 1024)
#define MAX_HEAD       (16 * 1024)
#define MAX_BODY       65536
/* Largest WebSocket message (all fragments) a subscriber accepts. */
#define MAX_WS_MSG     (1024 * 1024)
/* Linux allows this many files per process here; stay clear of it. */
#define MAX_SUBSCRIBERS 19500
#define NS_PER_S        1000000000ull

/* ------------------------------------------------------------------ */
/* options                                                             */

struct options {
    const char *scenario, *target, *host, *sub_path, *pub_path, *prefix;
    const char *pub_host; /* publishers' server; NULL = --host */
    int pub_port;         /* 0 = --port */
    int port, subscribers, topics, publishers, pipeline, size;
    int max_connecting, spread;
    bool ws;          /* --transport ws */
    bool ws_raw;      /* --ws-protocol raw: payload = data, ready on 101 */
    long messages, window;
    double rate, duration, timeout, stall_timeout, settle;
    int pids[MAX_PIDS], npids;
};

/* ------------------------------------------------------------------ */
/* latency histogram: log-linear, 64 sub-buckets per power of two      */
/* (about 1.6% precision), so memory does not grow with deliveries.    */

#define HIST_SUB     64u
#define HIST_BUCKETS (58u * HIST_SUB + 2u * HIST_SUB)

static unsigned hist_index(uint64_t v)
{
    if (v < 2 * HIST_SUB)
        return (unsigned)v;
    unsigned shift = (unsigned)(63 - __builtin_clzll(v)) - 6;
    return shift * HIST_SUB + (unsigned)(v >> shift);
}

static uint64_t hist_value(unsigned idx)
{
    if (idx < 2 * HIST_SUB)
        return idx;
    unsigned shift = idx / HIST_SUB - 1;
    uint64_t m = idx - shift * HIST_SUB;
    return (m << shift) + ((1ull << shift) >> 1);
}

/* ------------------------------------------------------------------ */
/* chunked transfer decoding, shared by subscribers and publishers     */

enum { DC_SIZE, DC_EXT, DC_DATA, DC_DATA_END, DC_TRAILER, DC_TRAILER_LINE, DC_DONE, DC_ERROR };

struct dechunk {
    uint8_t state;
    uint64_t left;
};

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Consumes framing bytes; returns how many were consumed.  When payload is
 * reached, *seg and *seglen point at it (inside `p`) and it counts as consumed. */
static size_t dechunk_step(struct dechunk *d, const char *p, size_t len, const char **seg,
                           size_t *seglen)
{
    *seglen = 0;
    size_t i = 0;
    while (i < len && d->state != DC_DONE && d->state != DC_ERROR) {
        char c = p[i];
        switch (d->state) {
        case DC_SIZE:
            if (hexval(c) >= 0) {
                if (d->left >> 56) {
                    d->state = DC_ERROR;
                    break;
                }
                d->left = d->left * 16 + (uint64_t)hexval(c);
            } else if (c == '\n') {
                d->state = d->left ? DC_DATA : DC_TRAILER;
            } else {
                d->state = DC_EXT;
            }
            i++;
            break;
        case DC_EXT:
            if (c == '\n')
                d->state = d->left ? DC_DATA : DC_TRAILER;
            i++;
            break;
        case DC_DATA: {
            size_t take = len - i < d->left ? len - i : (size_t)d->left;
            *seg = p + i;
            *seglen = take;
            d->left -= take;
            if (d->left == 0)
                d->state = DC_DATA_END;
            return i + take;
        }
        case DC_DATA_END:
            if (c == '\n')
                d->state = DC_SIZE;
            i++;
            break;
        case DC_TRAILER:
            if (c == '\n')
                d->state = DC_DONE;
            else if (c != '\r')
                d->state = DC_TRAILER_LINE;
            i++;
            break;
        case DC_TRAILER_LINE:
            if (c == '\n')
                d->state = DC_TRAILER;
            i++;
            break;
        }
    }
    return i;
}

/* ------------------------------------------------------------------ */
/* connections and global state                                        */

/* SS_WSWAIT: WebSocket open, waiting for the server's "subscribed" reply
 * (still counted as connecting). */
enum sub_state { SS_IDLE, SS_CONNECTING, SS_HEAD, SS_WSWAIT, SS_STREAM, SS_CLOSED };
enum ev_kind { EV_MESSAGE, EV_CONNECTED, EV_OTHER };
enum data_kind { DK_NONE, DK_BENCH, DK_WARM, DK_UNKNOWN };

struct sub {
    uv_tcp_t tcp;
    uint32_t idx, topic;
    uint8_t state, ev, dkind;
    bool chunked, cr_pending, warm, id_ok;
    struct dechunk dc;
    char *carry; /* incomplete head or line, lazily allocated */
    uint32_t carry_len, carry_cap;
    uint64_t cur_g, cur_ts, cur_id, last_id;
    uint32_t cur_p, cur_t;
    uint32_t pos;      /* distinct bench messages received so far */
    bool diverged;     /* saw its topic in another order than others */
    uint8_t *bits;     /* received flags, by sequence within topic */
    uint32_t bits_cap; /* bytes */
    int64_t *last_g;   /* highest g seen from each publisher */
    /* WebSocket: frame header being assembled, then payload bytes left.
     * A message split over reads or frames is collected in `carry`. */
    uint8_t ws_hdr[14];
    uint8_t ws_hlen, ws_op, ws_msg_op, ws_ctl_len;
    bool ws_fin, ws_in_payload;
    uint8_t ws_key[16]; /* Sec-WebSocket-Key, raw */
    uint8_t *ws_ctl;    /* control frame payload (<= 125 bytes), lazily */
    uint64_t ws_left;
};

/* The order in which the first subscriber to get there saw a topic's
 * messages; every other subscriber of the topic must see the same order. */
struct topic_order {
    uint64_t *seq;
    uint32_t len, cap;
};

enum pub_state { PS_IDLE, PS_CONNECTING, PS_READY, PS_CLOSING };
enum resp_state { RS_HEAD, RS_BODY, RS_CHUNKED };

struct pub {
    uv_tcp_t tcp;
    uint32_t idx;
    uint8_t state, rstate;
    bool close_after, reconnect;
    uint32_t inflight, ring_head;
    int64_t ring[MAX_PIPELINE]; /* g of each request in flight; <0: warm-up */
    char head[MAX_HEAD];
    uint32_t head_len;
    int status;
    uint64_t body_left;
    struct dechunk dc;
};

enum phase { PH_CONNECT, PH_WARMUP, PH_SETTLE, PH_PUBLISH, PH_DRAIN, PH_DONE };

struct proc_sample {
    long rss_kb;        /* summed over the PIDs; -1 if unreadable */
    uint64_t cpu_ticks; /* utime + stime */
    bool ok;
};

/* Busy time of one CPU from /proc/stat.  Loopback TCP work runs in softirq
 * context, which /proc/PID/stat does not charge to the process; with the
 * server pinned to one core, that core's busy time is its full cost. */
struct core_sample {
    uint64_t busy, total, softirq; /* USER_HZ ticks */
    bool ok;
};

struct bench {
    struct options o;
    uv_loop_t *loop;
    uv_timer_t tick;
    struct sockaddr_in dst;
    struct sockaddr_in pub_dst; /* = dst unless --pub-host / --pub-port */
    int phase;
    const char *end_reason;

    struct sub *subs;
    struct pub pubs[MAX_PUBLISHERS];
    uint32_t *topic_subs;    /* streaming subscribers per topic */
    uint32_t *topic_unready; /* streaming but not yet warm, per topic */
    struct topic_order *order;
    uint32_t next_sub, connecting, streaming, warm_ready, failed_subs;
    uint32_t pubs_ready, rr;
    bool pubs_started;

    uint32_t *warm_queue;
    uint32_t warm_qlen, warm_qpos;
    uint64_t warm_errors, warm_rounds;

    int32_t *remaining; /* deliveries still due, per message */
    uint64_t remaining_cap;
    uint64_t published, acked, publish_errors, low;
    uint64_t expected, deliveries, dups, reordered, unexpected, diverged;
    uint64_t other_events, id_regressions, disconnects, connect_errors;
    uint64_t ws_pings; /* pings answered with a pong */
    int last_bad_status;

    uint64_t hist[HIST_BUCKETS];
    uint64_t lat_max, lat_count;

    uint64_t t_start, t_connected, t_warm, t_pub_start, t_pub_end;
    uint64_t t_settle_end, t_last_delivery, t_last_progress, t_last_warm;
    struct proc_sample ps_before, ps_ready, ps_pub_start, ps_end;
    int server_core, client_core; /* -1 unless pinned to a single CPU */
    struct core_sample srv_core_start, srv_core_end, cli_core_start, cli_core_end;
    struct rusage ru_pub_start, ru_end;
};

static struct bench B;
static char rbuf[256 * 1024];

static void finish(const char *reason);
static void pump(void);
static void pub_connect(struct pub *pb);

/* ------------------------------------------------------------------ */
/* /proc sampling                                                      */

static long read_rss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

static bool read_cpu_ticks(int pid, uint64_t *ticks)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* comm may contain spaces and parentheses: fields start after the
     * last ')'.  utime and stime are fields 14 and 15. */
    char *p = strrchr(buf, ')');
    if (!p)
        return false;
    unsigned long long ut = 0, st = 0;
    int got = sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st);
    if (got != 2)
        return false;
    *ticks = ut + st;
    return true;
}

static struct proc_sample sample_server(void)
{
    struct proc_sample s = {0, 0, B.o.npids > 0};
    for (int i = 0; i < B.o.npids; i++) {
        long kb = read_rss_kb(B.o.pids[i]);
        uint64_t t = 0;
        if (kb < 0 || !read_cpu_ticks(B.o.pids[i], &t)) {
            s.ok = false;
            continue;
        }
        s.rss_kb += kb;
        s.cpu_ticks += t;
    }
    if (!s.ok)
        s.rss_kb = -1;
    return s;
}

static int pinned_cpu(pid_t pid)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(pid, sizeof set, &set) != 0 || CPU_COUNT(&set) != 1)
        return -1;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set))
            return c;
    return -1;
}

static struct core_sample read_core(int cpu)
{
    struct core_sample cs = {0, 0, 0, false};
    if (cpu < 0)
        return cs;
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return cs;
    char line[512], want[32];
    int wl = snprintf(want, sizeof want, "cpu%d ", cpu);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, want, (size_t)wl) != 0)
            continue;
        unsigned long long v[8] = {0};
        int n = sscanf(line + wl, "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                       &v[3], &v[4], &v[5], &v[6], &v[7]);
        if (n >= 7) {
            /* user nice system idle iowait irq softirq steal */
            cs.busy = v[0] + v[1] + v[2] + v[5] + v[6];
            cs.total = cs.busy + v[3] + v[4] + v[7];
            cs.softirq = v[6];
            cs.ok = true;
        }
        break;
    }
    fclose(f);
    return cs;
}

static void sample_cores(struct core_sample *srv, struct core_sample *cli)
{
    *srv = read_core(B.server_core);
    *cli = read_core(B.client_core);
}

static double core_softirq_s(const struct core_sample *a, const struct core_sample *b)
{
    if (!a->ok || !b->ok)
        return -1;
    return (double)(b->softirq - a->softirq) / (double)sysconf(_SC_CLK_TCK);
}

/* Share of a core used neither by the process of interest nor by softirq:
 * other work on the machine, i.e. noise in this run. */
static double core_other_util(const struct core_sample *a, const struct core_sample *b,
                              double proc_s)
{
    if (!a->ok || !b->ok || b->total == a->total || proc_s < 0)
        return -1;
    double tck = (double)sysconf(_SC_CLK_TCK);
    double busy = (double)(b->busy - a->busy) / tck;
    double soft = (double)(b->softirq - a->softirq) / tck;
    double other = busy - soft - proc_s;
    return (other > 0 ? other : 0) / ((double)(b->total - a->total) / tck);
}

static double core_util(const struct core_sample *a, const struct core_sample *b)
{
    if (!a->ok || !b->ok || b->total == a->total)
        return -1;
    return (double)(b->busy - a->busy) / (double)(b->total - a->total);
}

static double rusage_cpu_s(const struct rusage *r)
{
    return (double)r->ru_utime.tv_sec + r->ru_utime.tv_usec / 1e6 + (double)r->ru_stime.tv_sec +
           r->ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static uint64_t parse_u64(const char **pp, const char *end, bool *ok)
{
    const char *p = *pp;
    while (p < end && *p == ' ')
        p++;
    uint64_t v = 0;
    const char *start = p;
    while (p < end && *p >= '0' && *p <= '9' && v < UINT64_MAX / 10)
        v = v * 10 + (uint64_t)(*p++ - '0');
    *ok = p > start;
    *pp = p;
    return v;
}

static bool carry_append(struct sub *sb, const char *p, size_t len, size_t limit)
{
    size_t need = sb->carry_len + len;
    if (need > limit)
        return false;
    if (need > sb->carry_cap) {
        size_t cap = sb->carry_cap ? sb->carry_cap : 256;
        while (cap < need)
            cap *= 2;
        char *n = realloc(sb->carry, cap);
        if (!n)
            return false;
        sb->carry = n;
        sb->carry_cap = (uint32_t)cap;
    }
    memcpy(sb->carry + sb->carry_len, p, len);
    sb->carry_len = (uint32_t)need;
    return true;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    /* Every read is parsed before the callback returns, so one shared
     * buffer serves all connections: idle subscribers cost no buffer. */
    *buf = uv_buf_init(rbuf, sizeof rbuf);
}

struct wreq {
    uv_write_t req;
    char data[];
};

static void write_cb(uv_write_t *req, int status)
{
    (void)status; /* a failed write shows up as a read error or EOF */
    free(req);
}

static int send_bytes(uv_stream_t *s, const char *head, size_t hlen, const char *body, size_t blen)
{
    struct wreq *w = malloc(sizeof *w + hlen + blen);
    if (!w)
        return UV_ENOMEM;
    memcpy(w->data, head, hlen);
    if (blen)
        memcpy(w->data + hlen, body, blen);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)(hlen + blen));
    int rc = uv_write(&w->req, s, &b, 1, write_cb);
    if (rc)
        free(w);
    return rc;
}

static void topic_name(char *out, size_t n, uint32_t t)
{
    snprintf(out, n, "%s%" PRIu32, B.o.prefix, t);
}

/* ------------------------------------------------------------------ */
/* delivery accounting                                                 */

static bool ensure_remaining(uint64_t n)
{
    if (n <= B.remaining_cap)
        return true;
    uint64_t cap = B.remaining_cap ? B.remaining_cap * 2 : 4096;
    while (cap < n)
        cap *= 2;
    int32_t *r = realloc(B.remaining, cap * sizeof *r);
    if (!r)
        return false;
    B.remaining = r;
    B.remaining_cap = cap;
    return true;
}

static void check_done(void)
{
    if (B.phase != PH_DRAIN || B.low < B.published)
        return;
    for (int i = 0; i < B.o.publishers; i++)
        if (B.pubs[i].inflight)
            return;
    finish("ok");
}

/* The window counts messages not yet seen by every subscriber; it keeps a
 * flat-out publisher from burying the server under undeliverable output. */
static void advance_low(void)
{
    uint64_t before = B.low;
    while (B.low < B.published && B.remaining[B.low] <= 0)
        B.low++;
    if (B.low != before) {
        pump();
        check_done();
    }
}

/* Returns false if the bit was already set (a duplicate). */
static bool bit_set(struct sub *sb, uint64_t s)
{
    uint64_t byte = s >> 3;
    if (byte >= sb->bits_cap) {
        uint64_t cap = sb->bits_cap ? sb->bits_cap : 64;
        while (cap <= byte)
            cap *= 2;
        uint8_t *n = realloc(sb->bits, cap);
        if (!n) {
            finish("out of memory");
            return true;
        }
        memset(n + sb->bits_cap, 0, cap - sb->bits_cap);
        sb->bits = n;
        sb->bits_cap = (uint32_t)cap;
    }
    uint8_t mask = (uint8_t)(1u << (s & 7));
    if (sb->bits[byte] & mask)
        return false;
    sb->bits[byte] |= mask;
    return true;
}

static void check_order(struct sub *sb, uint64_t g)
{
    struct topic_order *to = &B.order[sb->topic];
    uint32_t k = sb->pos++;
    if (k < to->len) {
        if (to->seq[k] != g && !sb->diverged) {
            sb->diverged = true;
            B.diverged++;
        }
        return;
    }
    if (to->len == to->cap) {
        uint32_t cap = to->cap ? to->cap * 2 : 16;
        uint64_t *n = realloc(to->seq, cap * sizeof *n);
        if (!n) {
            finish("out of memory");
            return;
        }
        to->seq = n;
        to->cap = cap;
    }
    to->seq[to->len++] = g;
}

static void on_bench_msg(struct sub *sb, uint64_t g, uint32_t p, uint64_t ts, uint64_t now)
{
    if (g >= B.published || p >= (uint32_t)B.o.publishers ||
        g % (uint64_t)B.o.topics != sb->topic || ts > now) {
        B.unexpected++;
        return;
    }
    if (!bit_set(sb, g / (uint64_t)B.o.topics)) {
        B.dups++;
        return;
    }
    uint64_t lat = now - ts;
    B.hist[hist_index(lat)]++;
    B.lat_count++;
    if (lat > B.lat_max)
        B.lat_max = lat;
    /* One publisher connection sends its messages in order, so a topic's
     * subscribers must see them in that order. */
    if ((int64_t)g < sb->last_g[p])
        B.reordered++;
    else
        sb->last_g[p] = (int64_t)g;
    if (!sb->diverged)
        check_order(sb, g);
    B.deliveries++;
    B.t_last_delivery = now;
    B.t_last_progress = now;
    if (B.remaining[g] > 0 && --B.remaining[g] == 0 && g == B.low)
        advance_low();
}

static void check_warm_done(void)
{
    if (B.phase != PH_WARMUP || B.warm_ready < B.streaming)
        return;
    B.t_warm = uv_hrtime();
    B.phase = PH_SETTLE;
    B.t_settle_end = B.t_warm + (uint64_t)(B.o.settle * 1e9);
}

static void on_warm_msg(struct sub *sb, uint32_t t)
{
    if (t != sb->topic) {
        B.unexpected++;
        return;
    }
    if (sb->warm)
        return;
    sb->warm = true;
    B.topic_unready[t]--;
    B.warm_ready++;
    check_warm_done();
}

/* ------------------------------------------------------------------ */
/* SSE parsing                                                         */

static void sse_data(struct sub *sb, const char *v, const char *end)
{
    if (sb->dkind != DK_NONE) {
        sb->dkind = DK_UNKNOWN; /* multi-line data is never ours */
        return;
    }
    bool ok1 = false, ok2 = true, ok3 = true;
    const char *p = v + 1;
    if (v < end && *v == 'B') {
        sb->cur_g = parse_u64(&p, end, &ok1);
        sb->cur_p = (uint32_t)parse_u64(&p, end, &ok2);
        sb->cur_ts = parse_u64(&p, end, &ok3);
        sb->dkind = ok1 && ok2 && ok3 ? DK_BENCH : DK_UNKNOWN;
    } else if (v < end && *v == 'W') {
        sb->cur_t = (uint32_t)parse_u64(&p, end, &ok1);
        sb->dkind = ok1 ? DK_WARM : DK_UNKNOWN;
    } else {
        sb->dkind = DK_UNKNOWN;
    }
}

static void sse_id(struct sub *sb, const char *v, const char *end)
{
    bool ok;
    const char *p = v;
    sb->cur_id = parse_u64(&p, end, &ok);
    sb->id_ok = ok && p == end; /* only plain decimal ids are checked */
}

static void sse_dispatch(struct sub *sb, uint64_t now)
{
    if (sb->id_ok) {
        if (sb->last_id && sb->cur_id <= sb->last_id)
            B.id_regressions++;
        sb->last_id = sb->cur_id;
    }
    if (sb->dkind != DK_NONE) {
        if (sb->ev == EV_OTHER)
            B.other_events++;
        else if (sb->ev == EV_MESSAGE && sb->dkind == DK_BENCH)
            on_bench_msg(sb, sb->cur_g, sb->cur_p, sb->cur_ts, now);
        else if (sb->ev == EV_MESSAGE && sb->dkind == DK_WARM)
            on_warm_msg(sb, sb->cur_t);
        else if (sb->ev == EV_MESSAGE)
            B.unexpected++;
    }
    sb->ev = EV_MESSAGE;
    sb->dkind = DK_NONE;
    sb->id_ok = false;
}

static bool field_is(const char *name, size_t nlen, const char *want)
{
    return nlen == strlen(want) && memcmp(name, want, nlen) == 0;
}

static void sse_line(struct sub *sb, const char *line, size_t len, uint64_t now)
{
    if (len == 0) {
        sse_dispatch(sb, now);
        return;
    }
    if (line[0] == ':')
        return; /* comment: heartbeats, nchan's ": hi" */
    const char *end = line + len;
    const char *colon = memchr(line, ':', len);
    size_t nlen = colon ? (size_t)(colon - line) : len;
    const char *v = colon ? colon + 1 : end;
    if (v < end && *v == ' ')
        v++;
    if (field_is(line, nlen, "data"))
        sse_data(sb, v, end);
    else if (field_is(line, nlen, "id"))
        sse_id(sb, v, end);
    else if (field_is(line, nlen, "event"))
        sb->ev = field_is(v, (size_t)(end - v), "message")     ? EV_MESSAGE
                 : field_is(v, (size_t)(end - v), "connected") ? EV_CONNECTED
                                                               : EV_OTHER;
    /* retry: and unknown fields are ignored, as EventSource does */
}

/* Two memchr calls instead of a byte loop: at millions of events per
 * second the client's own parsing would otherwise be the bottleneck. */
static const char *find_eol(const char *p, size_t len)
{
    const char *nl = memchr(p, '\n', len);
    size_t span = nl ? (size_t)(nl - p) : len;
    const char *cr = memchr(p, '\r', span);
    return cr ? cr : nl;
}

static void sub_fail(struct sub *sb, const char *why);

/* Lines may end in \n, \r\n or \r, and may be split across reads. */
static void sse_feed(struct sub *sb, const char *p, size_t len, uint64_t now)
{
    while (len > 0 && sb->state == SS_STREAM) {
        if (sb->cr_pending) {
            sb->cr_pending = false;
            if (*p == '\n') {
                p++;
                len--;
                continue;
            }
        }
        const char *e = find_eol(p, len);
        if (!e) {
            if (!carry_append(sb, p, len, MAX_LINE))
                sub_fail(sb, "SSE line too long");
            return;
        }
        size_t ll = (size_t)(e - p);
        sb->cr_pending = *e == '\r';
        if (sb->carry_len) {
            if (!carry_append(sb, p, ll, MAX_LINE)) {
                sub_fail(sb, "SSE line too long");
                return;
            }
            sse_line(sb, sb->carry, sb->carry_len, now);
            sb->carry_len = 0;
        } else {
            sse_line(sb, p, ll, now);
        }
        p = e + 1;
        len -= ll + 1;
    }
}

static void sub_body(struct sub *sb, const char *p, size_t len, uint64_t now)
{
    if (!sb->chunked) {
        sse_feed(sb, p, len, now);
        return;
    }
    while (len > 0 && sb->state == SS_STREAM) {
        const char *seg = NULL;
        size_t seglen;
        size_t used = dechunk_step(&sb->dc, p, len, &seg, &seglen);
        if (seglen)
            sse_feed(sb, seg, seglen, now);
        p += used;
        len -= used;
        if (sb->dc.state == DC_DONE || sb->dc.state == DC_ERROR) {
            sub_fail(sb, "stream ended");
            return;
        }
    }
}

/* ------------------------------------------------------------------ */
/* WebSocket (RFC 6455), client side                                   */

static uint64_t rng_state;

/* splitmix64, seeded from getrandom(): keys and masks need not be
 * cryptographic, only unpredictable enough for a server to accept. */
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(void)
{
    if (getrandom(&rng_state, sizeof rng_state, 0) != (ssize_t)sizeof rng_state)
        rng_state = uv_hrtime() ^ ((uint64_t)getpid() << 32);
}

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *b)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 |
               (uint32_t)b[4 * i + 2] << 8 | b[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (bb & c) | (~bb & d);
            k = 0x5a827999;
        } else if (i < 40) {
            f = bb ^ c ^ d;
            k = 0x6ed9eba1;
        } else if (i < 60) {
            f = (bb & c) | (bb & d) | (c & d);
            k = 0x8f1bbcdc;
        } else {
            f = bb ^ c ^ d;
            k = 0xca62c1d6;
        }
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(bb, 30);
        bb = a;
        a = t;
    }
    h[0] += a;
    h[1] += bb;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

/* Any length; used here on a key plus the GUID (60 bytes). */
static void sha1(const uint8_t *msg, size_t len, uint8_t out[20])
{
    uint32_t h[5] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0};
    uint8_t blk[128];
    size_t full = len / 64 * 64;
    for (size_t i = 0; i < full; i += 64)
        sha1_block(h, msg + i);
    size_t rest = len - full;
    memset(blk, 0, sizeof blk);
    memcpy(blk, msg + full, rest);
    blk[rest] = 0x80;
    size_t total = rest + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        blk[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t i = 0; i < total; i += 64)
        sha1_block(h, blk + i);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

static size_t base64(const uint8_t *in, size_t len, char *out)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len)
            v |= in[i + 2];
        out[o++] = tab[v >> 18 & 63];
        out[o++] = tab[v >> 12 & 63];
        out[o++] = i + 1 < len ? tab[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? tab[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}

static void ws_key_b64(const struct sub *sb, char out[25]) { base64(sb->ws_key, 16, out); }

static void ws_expected_accept(const struct sub *sb, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    uint8_t in[24 + sizeof guid], dig[20];
    char key[25];
    ws_key_b64(sb, key);
    memcpy(in, key, 24);
    memcpy(in + 24, guid, sizeof guid - 1);
    sha1(in, 24 + sizeof guid - 1, dig);
    base64(dig, 20, out);
}

/* A masked client frame (control frames only: pong, close). */
static int ws_client_frame(char *out, uint8_t opcode, const uint8_t *payload, size_t len)
{
    uint64_t r = rng_next();
    uint8_t mask[4] = {(uint8_t)r, (uint8_t)(r >> 8), (uint8_t)(r >> 16), (uint8_t)(r >> 24)};
    out[0] = (char)(0x80 | opcode);
    out[1] = (char)(0x80 | len); /* control payloads are <= 125 bytes */
    memcpy(out + 2, mask, 4);
    for (size_t i = 0; i < len; i++)
        out[6 + i] = (char)(payload[i] ^ mask[i & 3]);
    return (int)(6 + len);
}

/* Value of header `name` (with the colon, lower case) in a response head. */
static const char *head_value(const char *h, size_t len, const char *name, size_t *vlen)
{
    size_t nlen = strlen(name);
    const char *end = h + len;
    for (const char *l = h; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        const char *le = nl ? nl : end;
        if ((size_t)(le - l) >= nlen && strncasecmp(l, name, nlen) == 0) {
            const char *v = l + nlen;
            while (v < le && (*v == ' ' || *v == '\t'))
                v++;
            const char *ve = le;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
        l = nl ? nl + 1 : end;
    }
    return NULL;
}

static bool token_in(const char *v, size_t vlen, const char *tok)
{
    size_t tl = strlen(tok);
    for (size_t i = 0; i + tl <= vlen; i++) {
        if (strncasecmp(v + i, tok, tl) != 0)
            continue;
        bool start = i == 0 || v[i - 1] == ',' || v[i - 1] == ' ' || v[i - 1] == '\t';
        bool stop = i + tl == vlen || v[i + tl] == ',' || v[i + tl] == ' ' || v[i + tl] == '\t';
        if (start && stop)
            return true;
    }
    return false;
}

/* Checks a 101 answer; returns NULL if it completes the handshake. */
static const char *ws_check_head(const struct sub *sb, const char *h, size_t len)
{
    size_t vl;
    const char *v = head_value(h, len, "upgrade:", &vl);
    if (!v || !token_in(v, vl, "websocket"))
        return "101 without Upgrade: websocket";
    v = head_value(h, len, "connection:", &vl);
    if (!v || !token_in(v, vl, "upgrade"))
        return "101 without Connection: upgrade";
    v = head_value(h, len, "sec-websocket-accept:", &vl);
    char want[29];
    ws_expected_accept(sb, want);
    if (!v || vl != 28 || memcmp(v, want, 28) != 0)
        return "wrong Sec-WebSocket-Accept";
    if (head_value(h, len, "sec-websocket-extensions:", &vl))
        return "extension negotiated that was not offered";
    return NULL;
}

/* Just enough JSON for the server's flat objects: top-level string keys,
 * string values located in place (escapes flagged, not decoded), other
 * values skipped. */
struct jstr {
    const char *p;
    size_t n;
    bool found, str, esc;
};
enum { JK_TOPIC, JK_EVENT, JK_DATA, JK_ID, JK_N };

static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p is just past an opening quote; returns the closing quote or NULL. */
static const char *json_str_end(const char *p, const char *e, bool *esc)
{
    const char *q = memchr(p, '"', (size_t)(e - p));
    if (!q)
        return NULL;
    if (!memchr(p, '\\', (size_t)(q - p))) {
        *esc = false;
        return q;
    }
    *esc = true;
    for (; p < e; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p;
    }
    return NULL;
}

/* Skips a non-string value (number, literal, object, array). */
static const char *json_skip_value(const char *p, const char *e)
{
    int depth = 0;
    while (p < e) {
        char c = *p;
        if (c == '"') {
            bool esc;
            const char *q = json_str_end(p + 1, e, &esc);
            if (!q)
                return NULL;
            p = q + 1;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (depth == 0)
                return p;
            if (--depth == 0)
                return p + 1;
        } else if (depth == 0 && (c == ',' || c == ' ' || c == '\t' || c == '\r' || c == '\n')) {
            return p;
        }
        p++;
    }
    return depth == 0 ? p : NULL;
}

static int json_key(const char *k, size_t n)
{
    static const char *const names[JK_N] = {"topic", "event", "data", "id"};
    for (int i = 0; i < JK_N; i++)
        if (strlen(names[i]) == n && memcmp(names[i], k, n) == 0)
            return i;
    return -1;
}

static bool json_fields(const char *p, size_t len, struct jstr f[JK_N])
{
    const char *e = p + len;
    memset(f, 0, JK_N * sizeof *f);
    p = skip_ws(p, e);
    if (p >= e || *p != '{')
        return false;
    p++;
    for (int guard = 0; guard < 256; guard++) {
        p = skip_ws(p, e);
        if (p < e && *p == '}' && guard == 0)
            return true;
        if (p >= e || *p != '"')
            return false;
        bool kesc;
        const char *ks = p + 1, *ke = json_str_end(ks, e, &kesc);
        if (!ke)
            return false;
        p = skip_ws(ke + 1, e);
        if (p >= e || *p != ':')
            return false;
        p = skip_ws(p + 1, e);
        if (p >= e)
            return false;
        int k = kesc ? -1 : json_key(ks, (size_t)(ke - ks));
        if (*p == '"') {
            bool esc;
            const char *ve = json_str_end(p + 1, e, &esc);
            if (!ve)
                return false;
            if (k >= 0)
                f[k] = (struct jstr){p + 1, (size_t)(ve - p - 1), true, true, esc};
            p = ve + 1;
        } else {
            const char *vs = p;
            p = json_skip_value(p, e);
            if (!p || p == vs)
                return false;
            if (k >= 0)
                f[k] = (struct jstr){vs, (size_t)(p - vs), true, false, false};
        }
        p = skip_ws(p, e);
        if (p < e && *p == ',') {
            p++;
            continue;
        }
        return p < e && *p == '}';
    }
    return false;
}

static bool jstr_is(const struct jstr *j, const char *want)
{
    return j->found && j->str && !j->esc && j->n == strlen(want) && memcmp(j->p, want, j->n) == 0;
}

static void sub_ready(struct sub *sb);

/* The data of one message, as the SSE parser would have seen it. */
static void ws_deliver(struct sub *sb, const char *data, size_t dlen, const struct jstr *id,
                       uint64_t now)
{
    sb->ev = EV_MESSAGE;
    sb->dkind = DK_NONE;
    sb->id_ok = false;
    if (id && id->found && id->str && !id->esc)
        sse_id(sb, id->p, id->p + id->n);
    if (data)
        sse_data(sb, data, data + dlen);
    else
        sb->dkind = DK_UNKNOWN;
    sse_dispatch(sb, now);
}

static bool match_at(const char *p, const char *e, const char *lit, size_t n)
{
    return (size_t)(e - p) >= n && memcmp(p, lit, n) == 0;
}

/* pushletd's envelope as it writes it, {"topic":T,"event":"message",
 * "data":D,"id":I,...}: located with a few memchr calls.  At millions of
 * deliveries per second the general scanner would cap what the client can
 * read.  Anything else (other key order, escapes) takes the general path. */
static bool ws_fast_message(struct sub *sb, const char *p, size_t len, uint64_t now)
{
    static const char k_topic[] = "{\"topic\":\"";
    static const char k_data[] = "\",\"event\":\"message\",\"data\":\"";
    static const char k_id[] = "\",\"id\":\"";
    const char *e = p + len;
    if (sb->state != SS_STREAM || !match_at(p, e, k_topic, sizeof k_topic - 1))
        return false;
    const char *t = p + sizeof k_topic - 1;
    const char *te = memchr(t, '"', (size_t)(e - t));
    if (!te || memchr(t, '\\', (size_t)(te - t)) || !match_at(te, e, k_data, sizeof k_data - 1))
        return false;
    const char *d = te + sizeof k_data - 1;
    const char *de = memchr(d, '"', (size_t)(e - d));
    if (!de || memchr(d, '\\', (size_t)(de - d)) || !match_at(de, e, k_id, sizeof k_id - 1))
        return false;
    const char *i = de + sizeof k_id - 1;
    const char *ie = memchr(i, '"', (size_t)(e - i));
    if (!ie || e[-1] != '}')
        return false;
    struct jstr id = {i, (size_t)(ie - i), true, true, false};
    ws_deliver(sb, d, (size_t)(de - d), &id, now);
    return true;
}

/* One complete data message. */
static void ws_message(struct sub *sb, const char *p, size_t len, uint64_t now)
{
    if (B.o.ws_raw) { /* nchan: the payload is the published data */
        ws_deliver(sb, p, len, NULL, now);
        return;
    }
    if (ws_fast_message(sb, p, len, now))
        return;
    struct jstr f[JK_N];
    if (!json_fields(p, len, f) || !f[JK_EVENT].found) {
        B.unexpected++;
        return;
    }
    if (jstr_is(&f[JK_EVENT], "message")) {
        if (sb->state != SS_STREAM) {
            B.unexpected++; /* a message before "subscribed" */
            return;
        }
        const struct jstr *d = &f[JK_DATA];
        bool ok = d->found && d->str && !d->esc; /* our payloads need no escapes */
        ws_deliver(sb, ok ? d->p : NULL, ok ? d->n : 0, &f[JK_ID], now);
    } else if (jstr_is(&f[JK_EVENT], "subscribed")) {
        char t[160];
        topic_name(t, sizeof t, sb->topic);
        if (sb->state == SS_WSWAIT && jstr_is(&f[JK_TOPIC], t))
            sub_ready(sb);
        else
            B.other_events++;
    } else if (!jstr_is(&f[JK_EVENT], "connected")) {
        B.other_events++;
        if (B.other_events <= 5)
            fprintf(stderr, "bench: subscriber %u got: %.*s\n", sb->idx, (int)(len < 200 ? len : 200),
                    p);
    }
}

static void ws_control(struct sub *sb)
{
    const uint8_t *pl = sb->ws_ctl;
    size_t n = sb->ws_ctl_len;
    sb->ws_ctl_len = 0;
    if (sb->ws_op == 0x9) { /* ping -> pong with the same payload */
        char fr[6 + 125];
        int fl = ws_client_frame(fr, 0xA, pl, n);
        int rc = send_bytes((uv_stream_t *)&sb->tcp, fr, (size_t)fl, NULL, 0);
        if (rc)
            sub_fail(sb, uv_strerror(rc));
        else
            B.ws_pings++;
    } else if (sb->ws_op == 0x8) {
        char why[64];
        unsigned code = n >= 2 ? (unsigned)pl[0] << 8 | pl[1] : 1005;
        snprintf(why, sizeof why, "close frame from server (code %u)", code);
        sub_fail(sb, why);
    }
    /* 0xA: unsolicited pong, ignored */
}

/* A frame's payload is complete. */
static void ws_frame_done(struct sub *sb, uint64_t now)
{
    sb->ws_in_payload = false;
    if (sb->ws_op >= 0x8) {
        ws_control(sb);
        return;
    }
    if (!sb->ws_fin)
        return; /* more fragments follow */
    sb->ws_msg_op = 0;
    uint32_t n = sb->carry_len;
    sb->carry_len = 0;
    ws_message(sb, sb->carry ? sb->carry : "", n, now);
}

/* Returns false (after failing the subscriber) on a protocol error. */
static bool ws_header_done(struct sub *sb, uint64_t now)
{
    const uint8_t *h = sb->ws_hdr;
    uint8_t op = h[0] & 0x0f;
    uint64_t plen = h[1] & 0x7f;
    if (plen == 126)
        plen = (uint64_t)h[2] << 8 | h[3];
    else if (plen == 127) {
        plen = 0;
        for (int i = 0; i < 8; i++)
            plen = plen << 8 | h[2 + i];
    }
    const char *err = NULL;
    if (h[0] & 0x70)
        err = "RSV bits set without an extension";
    else if (h[1] & 0x80)
        err = "masked frame from server";
    else if (op >= 0x8 && (op > 0xA || !(h[0] & 0x80) || plen > 125))
        err = "bad control frame";
    else if (op == 0 && sb->ws_msg_op == 0)
        err = "continuation without a message";
    else if ((op == 1 || op == 2) && sb->ws_msg_op != 0)
        err = "new message inside a fragmented one";
    else if (op > 2 && op < 8)
        err = "reserved opcode";
    else if (op < 8 && plen > MAX_WS_MSG - sb->carry_len)
        err = "message too large";
    if (err) {
        sub_fail(sb, err);
        return false;
    }
    sb->ws_op = op;
    sb->ws_fin = (h[0] & 0x80) != 0;
    if (op == 1 || op == 2)
        sb->ws_msg_op = op;
    sb->ws_left = plen;
    sb->ws_hlen = 0;
    sb->ws_in_payload = true;
    if (op >= 0x8 && plen && !sb->ws_ctl && !(sb->ws_ctl = malloc(125))) {
        sub_fail(sb, "out of memory");
        return false;
    }
    if (plen == 0)
        ws_frame_done(sb, now);
    return true;
}

static bool ws_live(const struct sub *sb)
{
    return sb->state == SS_STREAM || sb->state == SS_WSWAIT;
}

/* Header bytes needed: 2, then the extended length and mask they announce. */
static size_t ws_hdr_need(const struct sub *sb)
{
    if (sb->ws_hlen < 2)
        return 2;
    uint8_t l7 = sb->ws_hdr[1] & 0x7f;
    return 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + (sb->ws_hdr[1] & 0x80 ? 4 : 0);
}

/* Incremental frame parser: headers and payloads may be split anywhere. */
static void ws_feed(struct sub *sb, const char *p, size_t len, uint64_t now)
{
    while (len > 0 && ws_live(sb)) {
        if (!sb->ws_in_payload) {
            while (len > 0 && sb->ws_hlen < ws_hdr_need(sb)) {
                sb->ws_hdr[sb->ws_hlen++] = (uint8_t)*p++;
                len--;
            }
            if (sb->ws_hlen < ws_hdr_need(sb))
                return; /* the rest of the header comes with the next read */
            if (!ws_header_done(sb, now))
                return;
            continue;
        }
        size_t take = len < sb->ws_left ? len : (size_t)sb->ws_left;
        if (sb->ws_op >= 0x8) {
            memcpy(sb->ws_ctl + sb->ws_ctl_len, p, take);
            sb->ws_ctl_len = (uint8_t)(sb->ws_ctl_len + take);
        } else if (sb->ws_fin && sb->carry_len == 0 && sb->ws_op != 0 && take == sb->ws_left) {
            /* a whole unfragmented message in this read: parse in place */
            sb->ws_in_payload = false;
            sb->ws_msg_op = 0;
            ws_message(sb, p, take, now);
            p += take;
            len -= take;
            continue;
        } else if (!carry_append(sb, p, take, MAX_WS_MSG)) {
            sub_fail(sb, "message too large");
            return;
        }
        sb->ws_left -= take;
        p += take;
        len -= take;
        if (sb->ws_left == 0)
            ws_frame_done(sb, now);
    }
}

/* A clean close (1000) as the run ends; best effort, never blocks. */
static void ws_send_close(struct sub *sb)
{
    static const uint8_t code[2] = {0x03, 0xe8};
    char fr[8];
    int n = ws_client_frame(fr, 0x8, code, 2);
    uv_buf_t b = uv_buf_init(fr, (unsigned)n);
    (void)uv_try_write((uv_stream_t *)&sb->tcp, &b, 1);
}

/* ------------------------------------------------------------------ */
/* subscribers                                                         */

static void launch_subs(void);

static void sub_close_cb(uv_handle_t *h) { (void)h; }

static void sub_left_connecting(struct sub *sb)
{
    if (sb->state == SS_CONNECTING || sb->state == SS_HEAD || sb->state == SS_WSWAIT) {
        B.connecting--;
        launch_subs();
    }
}

/* Before publishing starts a lost subscriber is simply not expected to
 * receive anything; afterwards its missing deliveries count as lost. */
static void sub_forget(struct sub *sb)
{
    B.streaming--;
    B.topic_subs[sb->topic]--;
    if (sb->warm)
        B.warm_ready--;
    else
        B.topic_unready[sb->topic]--;
    check_warm_done();
}

static void sub_fail(struct sub *sb, const char *why)
{
    if (sb->state == SS_CLOSED)
        return;
    if (sb->state == SS_STREAM) {
        B.disconnects++;
        if (B.disconnects <= 5)
            fprintf(stderr, "bench: subscriber %u dropped: %s\n", sb->idx, why);
    } else {
        B.connect_errors++;
        B.failed_subs++;
        if (B.connect_errors <= 5)
            fprintf(stderr, "bench: subscriber %u failed: %s\n", sb->idx, why);
    }
    uint8_t was = sb->state;
    sub_left_connecting(sb);
    sb->state = SS_CLOSED;
    if (was == SS_STREAM && B.phase < PH_PUBLISH)
        sub_forget(sb);
    if (!uv_is_closing((uv_handle_t *)&sb->tcp))
        uv_close((uv_handle_t *)&sb->tcp, sub_close_cb);
}

static void sub_ready(struct sub *sb)
{
    sb->state = SS_STREAM;
    B.connecting--;
    B.streaming++;
    B.topic_subs[sb->topic]++;
    B.topic_unready[sb->topic]++;
    launch_subs();
}

static bool head_has_chunked(const char *h, size_t len)
{
    const char *end = h + len;
    for (const char *l = h; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        size_t ll = nl ? (size_t)(nl - l) : (size_t)(end - l);
        if (ll > 18 && strncasecmp(l, "transfer-encoding:", 18) == 0 && memmem(l, ll, "chunked", 7))
            return true;
        l = nl ? nl + 1 : end;
    }
    return false;
}

static int parse_status(const char *h, size_t len)
{
    if (len < 12 || strncmp(h, "HTTP/1.", 7) != 0)
        return -1;
    return atoi(h + 9);
}

/* Accumulates the response head; returns bytes of `p` that belong to it. */
static size_t sub_head(struct sub *sb, const char *p, size_t len)
{
    size_t old = sb->carry_len;
    if (!carry_append(sb, p, len, MAX_HEAD)) {
        sub_fail(sb, "response head too large");
        return len;
    }
    size_t from = old > 3 ? old - 3 : 0;
    char *e = memmem(sb->carry + from, sb->carry_len - from, "\r\n\r\n", 4);
    if (!e)
        return len;
    size_t head_len = (size_t)(e - sb->carry) + 4;
    int status = parse_status(sb->carry, head_len);
    if (B.o.ws) {
        const char *err = status == 101 ? ws_check_head(sb, sb->carry, head_len) : NULL;
        sb->carry_len = 0;
        if (status != 101) {
            B.last_bad_status = status;
            sub_fail(sb, "upgrade not answered with 101");
            return len;
        }
        if (err) {
            sub_fail(sb, err);
            return len;
        }
        /* pushletd: ready once it confirms the subscription; raw (nchan):
         * the open socket is all there is. */
        if (B.o.ws_raw)
            sub_ready(sb);
        else
            sb->state = SS_WSWAIT;
        return head_len - old;
    }
    sb->chunked = head_has_chunked(sb->carry, head_len);
    sb->carry_len = 0;
    if (status != 200) {
        B.last_bad_status = status;
        sub_fail(sb, "subscribe not answered with 200");
        return len;
    }
    sub_ready(sb);
    return head_len - old;
}

static void sub_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct sub *sb = s->data;
    if (n == 0)
        return;
    if (n < 0) {
        sub_fail(sb, n == UV_EOF ? "closed by server" : uv_strerror((int)n));
        return;
    }
    uint64_t now = uv_hrtime();
    const char *p = buf->base;
    size_t len = (size_t)n;
    if (sb->state == SS_HEAD) {
        size_t used = sub_head(sb, p, len);
        p += used;
        len -= used;
    }
    if (B.o.ws) {
        if (len && ws_live(sb))
            ws_feed(sb, p, len, now);
    } else if (sb->state == SS_STREAM && len) {
        sub_body(sb, p, len, now);
    }
}

static void sub_send_request(struct sub *sb)
{
    char t[160], req[1024];
    topic_name(t, sizeof t, sb->topic);
    const char *sep = strchr(B.o.sub_path, '?') ? "&" : "?";
    int n;
    if (B.o.ws) {
        char key[25];
        uint64_t r1 = rng_next(), r2 = rng_next();
        memcpy(sb->ws_key, &r1, 8);
        memcpy(sb->ws_key + 8, &r2, 8);
        ws_key_b64(sb, key);
        n = snprintf(req, sizeof req,
                     "GET %s%stopic=%s HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     B.o.sub_path, sep, t, B.o.host, B.o.port, key);
    } else {
        n = snprintf(req, sizeof req,
                     "GET %s%stopic=%s HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
                     B.o.sub_path, sep, t, B.o.host, B.o.port);
    }
    if (n <= 0 || (size_t)n >= sizeof req) {
        sub_fail(sb, "request too long");
        return;
    }
    int rc = send_bytes((uv_stream_t *)&sb->tcp, req, (size_t)n, NULL, 0);
    if (!rc)
        rc = uv_read_start((uv_stream_t *)&sb->tcp, alloc_cb, sub_read_cb);
    if (rc)
        sub_fail(sb, uv_strerror(rc));
}

static void sub_connect_cb(uv_connect_t *req, int status)
{
    struct sub *sb = req->handle->data;
    free(req);
    if (sb->state != SS_CONNECTING)
        return;
    if (status) {
        sub_fail(sb, uv_strerror(status));
        return;
    }
    sb->state = SS_HEAD;
    sub_send_request(sb);
}

/* Binding to 127.0.0.2..254 multiplies the usable 4-tuples; with
 * IP_BIND_ADDRESS_NO_PORT the port is still chosen at connect time. */
static int sub_bind_source(struct sub *sb)
{
    uv_os_fd_t fd;
    int rc = uv_fileno((uv_handle_t *)&sb->tcp, &fd);
    if (rc)
        return rc;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    struct sockaddr_in src;
    memset(&src, 0, sizeof src);
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(0x7f000002u + sb->idx % 253u);
    return uv_tcp_bind(&sb->tcp, (const struct sockaddr *)&src, 0);
}

static void sub_start(struct sub *sb)
{
    sb->state = SS_CONNECTING;
    B.connecting++;
    int rc = uv_tcp_init_ex(B.loop, &sb->tcp, AF_INET);
    if (rc) {
        sb->state = SS_IDLE;
        B.connecting--;
        B.connect_errors++;
        B.failed_subs++;
        return;
    }
    sb->tcp.data = sb;
    if (B.o.spread)
        rc = sub_bind_source(sb);
    uv_connect_t *req = rc ? NULL : malloc(sizeof *req);
    if (!rc && !req)
        rc = UV_ENOMEM;
    if (!rc)
        rc = uv_tcp_connect(req, &sb->tcp, (const struct sockaddr *)&B.dst, sub_connect_cb);
    if (rc) {
        free(req);
        sub_fail(sb, uv_strerror(rc));
    }
}

static void start_warmup(void);

static void launch_subs(void)
{
    uint32_t n = (uint32_t)B.o.subscribers;
    while (B.phase == PH_CONNECT && B.next_sub < n && B.connecting < (uint32_t)B.o.max_connecting)
        sub_start(&B.subs[B.next_sub++]);
    if (B.phase == PH_CONNECT && B.next_sub == n && B.connecting == 0 && !B.pubs_started) {
        B.pubs_started = true;
        B.t_connected = uv_hrtime();
        if (B.streaming == 0) {
            finish("no subscriber connected");
            return;
        }
        for (int i = 0; i < B.o.publishers; i++)
            pub_connect(&B.pubs[i]);
    }
}

/* ------------------------------------------------------------------ */
/* publishers                                                          */

/* A rejected publish is not expected anywhere; deliveries of it that do
 * arrive still count once, never as duplicates. */
static void mark_failed(int64_t g)
{
    B.expected -= B.topic_subs[(uint64_t)g % (uint64_t)B.o.topics];
    B.remaining[g] = 0;
}

static void pub_close_cb(uv_handle_t *h)
{
    struct pub *pb = h->data;
    pb->state = PS_IDLE;
    if (pb->reconnect && B.phase != PH_DONE)
        pub_connect(pb);
}

/* Requests still in flight must have been accounted for by the caller. */
static void pub_close(struct pub *pb, bool reconnect)
{
    if (pb->state == PS_READY)
        B.pubs_ready--;
    pb->state = PS_CLOSING;
    pb->reconnect = reconnect && B.phase != PH_DONE;
    if (!uv_is_closing((uv_handle_t *)&pb->tcp))
        uv_close((uv_handle_t *)&pb->tcp, pub_close_cb);
}

static void pub_response_done(struct pub *pb)
{
    int64_t g = pb->ring[pb->ring_head];
    pb->ring_head = (pb->ring_head + 1) % (uint32_t)B.o.pipeline;
    pb->inflight--;
    bool ok = pb->status >= 200 && pb->status < 300;
    if (g >= 0) {
        B.acked++;
        if (!ok) {
            B.publish_errors++;
            B.last_bad_status = pb->status;
            mark_failed(g);
        }
        B.t_last_progress = uv_hrtime();
    } else if (!ok) {
        B.warm_errors++;
        B.last_bad_status = pb->status;
    }
    pb->rstate = RS_HEAD;
    pb->head_len = 0;
    if (pb->close_after && pb->inflight == 0)
        pub_close(pb, true);
    if (g >= 0 && !ok)
        advance_low();
    pump();
    check_done();
}

static long header_long(const char *h, size_t len, const char *name)
{
    size_t nlen = strlen(name);
    const char *end = h + len;
    for (const char *l = h; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        if (nl && (size_t)(nl - l) > nlen && strncasecmp(l, name, nlen) == 0)
            return strtol(l + nlen, NULL, 10);
        l = nl ? nl + 1 : end;
    }
    return -1;
}

static void pub_head_complete(struct pub *pb, size_t hl)
{
    pb->status = parse_status(pb->head, hl);
    pb->close_after = memmem(pb->head, hl, "onnection: close", 16) ||
                      memmem(pb->head, hl, "onnection: Close", 16);
    long cl = header_long(pb->head, hl, "content-length:");
    pb->head_len = 0;
    if (head_has_chunked(pb->head, hl)) {
        pb->dc = (struct dechunk){DC_SIZE, 0};
        pb->rstate = RS_CHUNKED;
    } else if (cl > 0) {
        pb->body_left = (uint64_t)cl;
        pb->rstate = RS_BODY;
    } else {
        pub_response_done(pb);
    }
}

/* Returns bytes consumed from p. */
static size_t pub_head(struct pub *pb, const char *p, size_t len)
{
    size_t old = pb->head_len;
    size_t room = sizeof pb->head - old;
    size_t take = len < room ? len : room;
    memcpy(pb->head + old, p, take);
    pb->head_len += (uint32_t)take;
    size_t from = old > 3 ? old - 3 : 0;
    char *e = memmem(pb->head + from, pb->head_len - from, "\r\n\r\n", 4);
    if (!e) {
        if (pb->head_len == sizeof pb->head)
            return 0; /* caller treats no progress as a protocol error */
        return take;
    }
    size_t hl = (size_t)(e - pb->head) + 4;
    pub_head_complete(pb, hl);
    return hl - old;
}

static size_t pub_consume(struct pub *pb, const char *p, size_t len)
{
    if (pb->inflight == 0)
        return 0; /* bytes nobody asked for */
    if (pb->rstate == RS_HEAD)
        return pub_head(pb, p, len);
    if (pb->rstate == RS_BODY) {
        size_t take = len < pb->body_left ? len : (size_t)pb->body_left;
        pb->body_left -= take;
        if (pb->body_left == 0)
            pub_response_done(pb);
        return take;
    }
    const char *seg;
    size_t seglen;
    size_t used = dechunk_step(&pb->dc, p, len, &seg, &seglen);
    if (pb->dc.state == DC_DONE)
        pub_response_done(pb);
    else if (pb->dc.state == DC_ERROR)
        return 0;
    return used;
}

static void pub_fail(struct pub *pb, const char *why)
{
    if (pb->state == PS_CLOSING || pb->state == PS_IDLE)
        return;
    if (pb->inflight)
        fprintf(stderr, "bench: publisher %u lost %u requests: %s\n", pb->idx, pb->inflight, why);
    /* Requests in flight have an unknown fate: count them as errors and
     * stop expecting their deliveries. */
    for (uint32_t i = 0; i < pb->inflight; i++) {
        int64_t g = pb->ring[(pb->ring_head + i) % (uint32_t)B.o.pipeline];
        if (g >= 0) {
            B.publish_errors++;
            mark_failed(g);
        } else {
            B.warm_errors++;
        }
    }
    pb->inflight = 0;
    pub_close(pb, true);
    advance_low();
    check_done();
}

static void pub_read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct pub *pb = s->data;
    if (n == 0)
        return;
    if (n < 0) {
        pub_fail(pb, n == UV_EOF ? "closed by server" : uv_strerror((int)n));
        return;
    }
    const char *p = buf->base;
    size_t len = (size_t)n;
    while (len > 0 && pb->state == PS_READY) {
        size_t used = pub_consume(pb, p, len);
        if (used == 0) {
            pub_fail(pb, "unparseable publish response");
            return;
        }
        p += used;
        len -= used;
    }
}

static void start_warmup(void)
{
    B.phase = PH_WARMUP;
    B.warm_qlen = 0;
    for (uint32_t t = 0; t < (uint32_t)B.o.topics; t++)
        if (B.topic_unready[t])
            B.warm_queue[B.warm_qlen++] = t;
    B.warm_qpos = 0;
    B.warm_rounds++;
    B.t_last_warm = uv_hrtime();
    check_warm_done();
    pump();
}

static void pub_connect_cb(uv_connect_t *req, int status)
{
    struct pub *pb = req->handle->data;
    free(req);
    if (pb->state != PS_CONNECTING)
        return;
    if (status) {
        fprintf(stderr, "bench: publisher %u connect: %s\n", pb->idx, uv_strerror(status));
        pub_close(pb, false);
        finish("publisher connect failed");
        return;
    }
    uv_tcp_nodelay(&pb->tcp, 1);
    int rc = uv_read_start((uv_stream_t *)&pb->tcp, alloc_cb, pub_read_cb);
    if (rc) {
        pub_fail(pb, uv_strerror(rc));
        return;
    }
    pb->state = PS_READY;
    B.pubs_ready++;
    if (B.phase == PH_CONNECT && B.pubs_ready == (uint32_t)B.o.publishers)
        start_warmup();
    pump();
}

static void pub_connect(struct pub *pb)
{
    pb->state = PS_CONNECTING;
    pb->rstate = RS_HEAD;
    pb->head_len = 0;
    pb->inflight = 0;
    pb->ring_head = 0;
    pb->reconnect = false;
    uv_connect_t *req = malloc(sizeof *req);
    int rc = req ? uv_tcp_init(B.loop, &pb->tcp) : UV_ENOMEM;
    if (!rc) {
        pb->tcp.data = pb;
        rc = uv_tcp_connect(req, &pb->tcp, (const struct sockaddr *)&B.pub_dst, pub_connect_cb);
        if (rc)
            pub_close(pb, false);
    }
    if (rc) {
        free(req);
        fprintf(stderr, "bench: publisher connect: %s\n", uv_strerror(rc));
        finish("publisher connect failed");
    }
}

static int pub_send(struct pub *pb, uint32_t topic, const char *body, size_t blen, int64_t tag)
{
    char t[160], head[1024];
    topic_name(t, sizeof t, topic);
    const char *sep = strchr(B.o.pub_path, '?') ? "&" : "?";
    int n = snprintf(head, sizeof head,
                     "POST %s%stopic=%s HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Content-Type: text/plain\r\nContent-Length: %zu\r\n\r\n",
                     B.o.pub_path, sep, t, B.o.pub_host, B.o.pub_port, blen);
    if (n <= 0 || (size_t)n >= sizeof head)
        return UV_EINVAL;
    uint32_t slot = (pb->ring_head + pb->inflight) % (uint32_t)B.o.pipeline;
    pb->ring[slot] = tag;
    pb->inflight++;
    int rc = send_bytes((uv_stream_t *)&pb->tcp, head, (size_t)n, body, blen);
    if (rc)
        pub_fail(pb, uv_strerror(rc));
    return rc;
}

static struct pub *pick_pub(void)
{
    for (int i = 0; i < B.o.publishers; i++) {
        struct pub *pb = &B.pubs[(B.rr + (uint32_t)i) % (uint32_t)B.o.publishers];
        if (pb->state == PS_READY && pb->inflight < (uint32_t)B.o.pipeline) {
            B.rr = (pb->idx + 1) % (uint32_t)B.o.publishers;
            return pb;
        }
    }
    return NULL;
}

/* Body: "B <g> <publisher> <send time ns> " then padding up to --size. */
static size_t format_body(char *out, uint64_t g, uint32_t p, uint64_t ts)
{
    int n = snprintf(out, MAX_BODY, "B %" PRIu64 " %" PRIu32 " %" PRIu64 " ", g, p, ts);
    size_t len = (size_t)n;
    if ((size_t)B.o.size > len) {
        memset(out + len, 'x', (size_t)B.o.size - len);
        len = (size_t)B.o.size;
    }
    return len;
}

static void publish_one(struct pub *pb)
{
    static char body[MAX_BODY];
    uint64_t g = B.published;
    uint32_t t = (uint32_t)(g % (uint64_t)B.o.topics);
    if (!ensure_remaining(g + 1)) {
        finish("out of memory");
        return;
    }
    B.remaining[g] = (int32_t)B.topic_subs[t];
    B.expected += B.topic_subs[t];
    B.published++;
    size_t blen = format_body(body, g, pb->idx, uv_hrtime());
    pub_send(pb, t, body, blen, (int64_t)g);
    if (g == B.low)
        advance_low();
}

static bool may_publish(uint64_t now)
{
    if (B.published >= (uint64_t)B.o.messages)
        return false;
    if (B.published - B.low >= (uint64_t)B.o.window)
        return false;
    if (B.o.rate > 0) {
        double allowed = 1.0 + B.o.rate * (double)(now - B.t_pub_start) / 1e9;
        if ((double)B.published >= allowed)
            return false;
    }
    return true;
}

static void end_publish(uint64_t now)
{
    B.phase = PH_DRAIN;
    B.t_pub_end = now;
    check_done();
}

static void pump_warmup(void)
{
    char body[32];
    while (B.warm_qpos < B.warm_qlen) {
        struct pub *pb = pick_pub();
        if (!pb)
            return;
        uint32_t t = B.warm_queue[B.warm_qpos++];
        int n = snprintf(body, sizeof body, "W %" PRIu32, t);
        pub_send(pb, t, body, (size_t)n, -1);
    }
}

static void pump(void)
{
    if (B.phase == PH_WARMUP) {
        pump_warmup();
        return;
    }
    if (B.phase != PH_PUBLISH)
        return;
    uint64_t now = uv_hrtime();
    uint64_t deadline = B.t_pub_start + (uint64_t)(B.o.duration * 1e9);
    if (B.published >= (uint64_t)B.o.messages || (B.o.duration > 0 && now >= deadline)) {
        end_publish(now);
        return;
    }
    /* Bounded: each pass fills at most every free pipeline slot once. */
    int budget = B.o.publishers * B.o.pipeline;
    for (int i = 0; i < budget && B.phase == PH_PUBLISH && may_publish(now); i++) {
        struct pub *pb = pick_pub();
        if (!pb)
            break;
        publish_one(pb);
    }
}

/* ------------------------------------------------------------------ */
/* phases and the tick                                                 */

static void start_publish(uint64_t now)
{
    B.ps_ready = sample_server();
    B.ps_pub_start = B.ps_ready;
    getrusage(RUSAGE_SELF, &B.ru_pub_start);
    sample_cores(&B.srv_core_start, &B.cli_core_start);
    B.t_pub_start = now;
    B.t_last_progress = now;
    B.t_last_delivery = now;
    if (B.o.messages == 0) {
        B.t_pub_end = now;
        finish("ok");
        return;
    }
    B.phase = PH_PUBLISH;
    pump();
}

static void tick_cb(uv_timer_t *t)
{
    (void)t;
    uint64_t now = uv_hrtime();
    if (now - B.t_start > (uint64_t)(B.o.timeout * 1e9)) {
        finish("timeout");
        return;
    }
    switch (B.phase) {
    case PH_WARMUP:
        /* A warm-up can race a subscription that the server has answered
         * but not yet registered: send it again to topics still waiting. */
        if (B.warm_qpos == B.warm_qlen && now - B.t_last_warm > NS_PER_S) {
            if (B.warm_rounds >= 10)
                finish("warm-up incomplete");
            else
                start_warmup();
        }
        break;
    case PH_SETTLE:
        if (now >= B.t_settle_end)
            start_publish(now);
        break;
    case PH_PUBLISH:
    case PH_DRAIN:
        pump();
        check_done();
        if (B.phase != PH_DONE && now - B.t_last_progress > (uint64_t)(B.o.stall_timeout * 1e9))
            finish("stalled");
        break;
    default: break;
    }
}

/* ------------------------------------------------------------------ */
/* results                                                             */

static double hist_percentile(double q)
{
    if (B.lat_count == 0)
        return 0;
    uint64_t want = (uint64_t)(q * (double)B.lat_count);
    if (want < 1)
        want = 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        acc += B.hist[i];
        if (acc >= want)
            return (double)hist_value(i) / 1e3;
    }
    return (double)B.lat_max / 1e3;
}

static uint64_t count_lost(void)
{
    uint64_t lost = 0;
    for (uint64_t g = 0; g < B.published; g++)
        if (B.remaining[g] > 0)
            lost += (uint64_t)B.remaining[g];
    return lost;
}

struct results {
    uint64_t lost;
    double pub_s, deliver_s, dps, pps, srv_cpu_s, cli_cpu_s, ns_per_del;
    double rss_per_conn, connect_s;
    double srv_softirq_s, srv_total_ns_per_del, srv_core_util, cli_core_util;
    double srv_other_util, cli_other_util;
    double p50, p90, p99, max;
};

static struct results compute_results(void)
{
    struct results r;
    memset(&r, 0, sizeof r);
    double tck = (double)sysconf(_SC_CLK_TCK);
    r.lost = count_lost();
    r.connect_s = (double)(B.t_connected - B.t_start) / 1e9;
    r.pub_s = (double)(B.t_pub_end - B.t_pub_start) / 1e9;
    r.deliver_s = (double)(B.t_last_delivery - B.t_pub_start) / 1e9;
    r.dps = r.deliver_s > 0 ? (double)B.deliveries / r.deliver_s : 0;
    r.pps = r.pub_s > 0 ? (double)B.published / r.pub_s : 0;
    if (B.ps_pub_start.ok && B.ps_end.ok)
        r.srv_cpu_s = (double)(B.ps_end.cpu_ticks - B.ps_pub_start.cpu_ticks) / tck;
    r.ns_per_del = B.deliveries ? r.srv_cpu_s * 1e9 / (double)B.deliveries : 0;
    r.cli_cpu_s = rusage_cpu_s(&B.ru_end) - rusage_cpu_s(&B.ru_pub_start);
    if (B.ps_before.ok && B.ps_ready.ok && B.streaming)
        r.rss_per_conn =
            (double)(B.ps_ready.rss_kb - B.ps_before.rss_kb) * 1024.0 / (double)B.streaming;
    r.srv_softirq_s = core_softirq_s(&B.srv_core_start, &B.srv_core_end);
    r.srv_core_util = core_util(&B.srv_core_start, &B.srv_core_end);
    r.cli_core_util = core_util(&B.cli_core_start, &B.cli_core_end);
    r.srv_other_util =
        core_other_util(&B.srv_core_start, &B.srv_core_end, B.ps_pub_start.ok ? r.srv_cpu_s : -1);
    r.cli_other_util = core_other_util(&B.cli_core_start, &B.cli_core_end, r.cli_cpu_s);
    /* softirq work on the server's core is the loopback delivery of what
     * the server wrote: part of its cost, missing from /proc/PID/stat */
    r.srv_total_ns_per_del = B.deliveries && r.srv_softirq_s >= 0
                                 ? (r.srv_cpu_s + r.srv_softirq_s) * 1e9 / (double)B.deliveries
                                 : -1;
    r.p50 = hist_percentile(0.50);
    r.p90 = hist_percentile(0.90);
    r.p99 = hist_percentile(0.99);
    r.max = (double)B.lat_max / 1e3;
    return r;
}

static void print_json(const struct results *r)
{
    printf("{\"scenario\":\"%s\",\"target\":\"%s\",\"transport\":\"%s\","
           "\"status\":\"%s\","
           "\"subscribers\":%d,\"connected\":%" PRIu32 ",\"topics\":%d,"
           "\"publishers\":%d,\"pipeline\":%d,\"size\":%d,\"rate\":%.1f,"
           "\"published\":%" PRIu64 ",\"publish_errors\":%" PRIu64 ","
           "\"expected\":%" PRIu64 ",\"deliveries\":%" PRIu64 ","
           "\"lost\":%" PRIu64 ",\"duplicated\":%" PRIu64 ",\"reordered\":%" PRIu64 ","
           "\"order_diverged\":%" PRIu64 ","
           "\"unexpected\":%" PRIu64 ",\"other_events\":%" PRIu64 ","
           "\"id_regressions\":%" PRIu64 ",\"disconnects\":%" PRIu64 ","
           "\"connect_errors\":%" PRIu64 ",\"warmup_errors\":%" PRIu64 ","
           "\"warmup_rounds\":%" PRIu64 ",\"last_bad_status\":%d,"
           "\"connect_s\":%.3f,\"publish_s\":%.3f,\"deliver_s\":%.3f,"
           "\"publish_per_s\":%.1f,\"deliveries_per_s\":%.1f,"
           "\"lat_p50_us\":%.1f,\"lat_p90_us\":%.1f,\"lat_p99_us\":%.1f,"
           "\"lat_max_us\":%.1f,\"rss_before_kb\":%ld,\"rss_ready_kb\":%ld,"
           "\"rss_end_kb\":%ld,\"rss_per_conn_bytes\":%.0f,"
           "\"server_cpu_s\":%.3f,\"server_cpu_ns_per_delivery\":%.1f,"
           "\"client_cpu_s\":%.3f,\"server_core\":%d,\"client_core\":%d,"
           "\"server_softirq_s\":%.3f,\"server_core_util\":%.3f,"
           "\"server_total_ns_per_delivery\":%.1f,\"client_core_util\":%.3f,"
           "\"server_core_other_util\":%.3f,\"client_core_other_util\":%.3f,"
           "\"ws_pings\":%" PRIu64 "}\n",
           B.o.scenario, B.o.target, B.o.ws ? "ws" : "sse", B.end_reason, B.o.subscribers, B.streaming, B.o.topics,
           B.o.publishers, B.o.pipeline, B.o.size, B.o.rate, B.published, B.publish_errors,
           B.expected, B.deliveries, r->lost, B.dups, B.reordered, B.diverged, B.unexpected,
           B.other_events, B.id_regressions, B.disconnects, B.connect_errors, B.warm_errors,
           B.warm_rounds, B.last_bad_status, r->connect_s, r->pub_s, r->deliver_s, r->pps, r->dps,
           r->p50, r->p90, r->p99, r->max, B.ps_before.rss_kb, B.ps_ready.rss_kb, B.ps_end.rss_kb,
           r->rss_per_conn, r->srv_cpu_s, r->ns_per_del, r->cli_cpu_s, B.server_core, B.client_core,
           r->srv_softirq_s, r->srv_core_util, r->srv_total_ns_per_del, r->cli_core_util,
           r->srv_other_util, r->cli_other_util, B.ws_pings);
    fflush(stdout);
}

static void print_summary(const struct results *r)
{
    fprintf(stderr,
            "== %s / %s: %s\n"
            "   subscribers %" PRIu32 "/%d on %d topic(s), connected in %.2f s\n"
            "   published %" PRIu64 " in %.2f s (%.0f/s), errors %" PRIu64 "\n"
            "   deliveries %" PRIu64 "/%" PRIu64 " (%.0f/s); lost %" PRIu64 ", duplicated %" PRIu64
            ", reordered %" PRIu64 " (diverged %" PRIu64 " subscribers), disconnects %" PRIu64 "\n"
            "   latency us: p50 %.0f  p90 %.0f  p99 %.0f  max %.0f\n"
            "   server RSS %ld -> %ld KiB (%.0f B/conn); server CPU %.2f s "
            "(%.0f ns/delivery); client CPU %.2f s\n"
            "   with softirq on its core: %.0f ns/delivery; core busy: server "
            "cpu%d %.0f%%, client cpu%d %.0f%% (-1: not pinned or not measured)\n",
            B.o.scenario, B.o.target, B.end_reason, B.streaming, B.o.subscribers, B.o.topics,
            r->connect_s, B.published, r->pub_s, r->pps, B.publish_errors, B.deliveries, B.expected,
            r->dps, r->lost, B.dups, B.reordered, B.diverged, B.disconnects, r->p50, r->p90, r->p99,
            r->max, B.ps_before.rss_kb, B.ps_ready.rss_kb, r->rss_per_conn, r->srv_cpu_s,
            r->ns_per_del, r->cli_cpu_s, r->srv_total_ns_per_del, B.server_core,
            r->srv_core_util * 100, B.client_core, r->cli_core_util * 100);
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void finish(const char *reason)
{
    if (B.phase == PH_DONE)
        return;
    B.phase = PH_DONE;
    B.end_reason = reason;
    if (B.t_connected == 0)
        B.t_connected = uv_hrtime();
    if (B.t_pub_start == 0) {
        B.t_pub_start = B.t_pub_end = B.t_last_delivery = uv_hrtime();
        B.ps_ready = B.ps_pub_start = sample_server();
        getrusage(RUSAGE_SELF, &B.ru_pub_start);
        sample_cores(&B.srv_core_start, &B.cli_core_start);
    }
    if (B.t_pub_end == 0)
        B.t_pub_end = uv_hrtime();
    B.ps_end = sample_server();
    getrusage(RUSAGE_SELF, &B.ru_end);
    sample_cores(&B.srv_core_end, &B.cli_core_end);
    struct results r = compute_results();
    print_json(&r);
    print_summary(&r);
    for (int i = 0; i < B.o.publishers; i++)
        B.pubs[i].reconnect = false;
    for (int i = 0; B.o.ws && i < B.o.subscribers; i++)
        if (ws_live(&B.subs[i]))
            ws_send_close(&B.subs[i]);
    uv_walk(B.loop, close_walk_cb, NULL);
}

/* ------------------------------------------------------------------ */
/* command line                                                        */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pushlet-bench [options]\n"
            "  --host ADDR            server address, 127.0.0.0/8 only (127.0.0.1)\n"
            "  --port N               server port (8080)\n"
            "  --sub-path PATH        subscribe path; ?topic=T is appended (/events)\n"
            "  --transport sse|ws     SSE stream or WebSocket subscribers (sse)\n"
            "  --ws-protocol pushlet|raw  WebSocket messages: pushletd's JSON envelope,\n"
            "                         ready on its \"subscribed\" reply; or raw data\n"
            "                         frames (nchan), ready on 101 (pushlet)\n"
            "  --pub-path PATH        publish path, POST, ?topic=T appended (/publish)\n"
            "  --pub-host ADDR, --pub-port N  publish to this server instead (another\n"
            "                         node of a cluster; 127.0.0.0/8 only; default\n"
            "                         --host / --port)\n"
            "  --topic-prefix S       topic names are S0..S<T-1> (bench)\n"
            "  --subscribers N        subscribers, at most %d (100)\n"
            "  --topics T             subscriber i listens on topic i %% T (1)\n"
            "  --messages M           messages to publish, round-robin over topics (1000)\n"
            "  --rate R               messages/s over all publishers; 0 = flat out (0)\n"
            "  --duration S           stop publishing after S seconds; 0 = no limit (0)\n"
            "  --publishers P         keep-alive publisher connections (4)\n"
            "  --pipeline D           requests in flight per publisher (1)\n"
            "  --window W             max messages not yet received by all (1024)\n"
            "  --size BYTES           message body size (100)\n"
            "  --max-connecting N     subscriber connects in progress at once (200)\n"
            "  --spread auto|on|off   bind sources over 127.0.0.2-254 (auto: N>1000)\n"
            "  --pid PID              server process to sample (repeatable)\n"
            "  --settle S             pause between warm-up and publishing (0.5)\n"
            "  --stall-timeout S      give up after S s without progress (10)\n"
            "  --timeout S            hard limit for the whole run (120)\n"
            "  --scenario NAME, --target NAME   labels for the output\n"
            "Prints one JSON line on stdout and a summary on stderr.\n"
            "Exit status: 0 ok, 1 loss/dup/reorder or incomplete run, 2 usage.\n",
            MAX_SUBSCRIBERS);
}

static void set_defaults(struct options *o)
{
    memset(o, 0, sizeof *o);
    o->scenario = "adhoc";
    o->target = "server";
    o->host = "127.0.0.1";
    o->port = 8080;
    o->sub_path = "/events";
    o->pub_path = "/publish";
    o->prefix = "bench";
    o->subscribers = 100;
    o->topics = 1;
    o->messages = 1000;
    o->publishers = 4;
    o->pipeline = 1;
    o->window = 1024;
    o->size = 100;
    o->max_connecting = 200;
    o->spread = -1;
    o->settle = 0.5;
    o->stall_timeout = 10;
    o->timeout = 120;
}

enum {
    O_HOST = 256,
    O_PORT,
    O_SUB,
    O_PUB,
    O_PREFIX,
    O_SUBS,
    O_TOPICS,
    O_MSGS,
    O_RATE,
    O_DUR,
    O_PUBS,
    O_PIPE,
    O_WIN,
    O_SIZE,
    O_MAXC,
    O_SPREAD,
    O_PID,
    O_SETTLE,
    O_STALL,
    O_TIMEOUT,
    O_SCEN,
    O_TARGET,
    O_TRANSPORT,
    O_WSPROTO,
    O_PUBHOST,
    O_PUBPORT,
    O_HELP
};

static const struct option long_opts[] = {{"host", 1, 0, O_HOST},
                                          {"port", 1, 0, O_PORT},
                                          {"sub-path", 1, 0, O_SUB},
                                          {"pub-path", 1, 0, O_PUB},
                                          {"topic-prefix", 1, 0, O_PREFIX},
                                          {"subscribers", 1, 0, O_SUBS},
                                          {"topics", 1, 0, O_TOPICS},
                                          {"messages", 1, 0, O_MSGS},
                                          {"rate", 1, 0, O_RATE},
                                          {"duration", 1, 0, O_DUR},
                                          {"publishers", 1, 0, O_PUBS},
                                          {"pipeline", 1, 0, O_PIPE},
                                          {"window", 1, 0, O_WIN},
                                          {"size", 1, 0, O_SIZE},
                                          {"max-connecting", 1, 0, O_MAXC},
                                          {"spread", 1, 0, O_SPREAD},
                                          {"pid", 1, 0, O_PID},
                                          {"settle", 1, 0, O_SETTLE},
                                          {"stall-timeout", 1, 0, O_STALL},
                                          {"timeout", 1, 0, O_TIMEOUT},
                                          {"scenario", 1, 0, O_SCEN},
                                          {"target", 1, 0, O_TARGET},
                                          {"transport", 1, 0, O_TRANSPORT},
                                          {"ws-protocol", 1, 0, O_WSPROTO},
                                          {"pub-host", 1, 0, O_PUBHOST},
                                          {"pub-port", 1, 0, O_PUBPORT},
                                          {"help", 0, 0, O_HELP},
                                          {0, 0, 0, 0}};

static bool set_spread(struct options *o, const char *v)
{
    if (strcmp(v, "auto") == 0)
        o->spread = -1;
    else if (strcmp(v, "on") == 0)
        o->spread = 1;
    else if (strcmp(v, "off") == 0)
        o->spread = 0;
    else
        return false;
    return true;
}

static bool apply_opt(struct options *o, int c, const char *v)
{
    switch (c) {
    case O_HOST: o->host = v; break;
    case O_PORT: o->port = atoi(v); break;
    case O_SUB: o->sub_path = v; break;
    case O_PUB: o->pub_path = v; break;
    case O_PUBHOST: o->pub_host = v; break;
    case O_PUBPORT: o->pub_port = atoi(v); break;
    case O_PREFIX: o->prefix = v; break;
    case O_SUBS: o->subscribers = atoi(v); break;
    case O_TOPICS: o->topics = atoi(v); break;
    case O_MSGS: o->messages = atol(v); break;
    case O_RATE: o->rate = atof(v); break;
    case O_DUR: o->duration = atof(v); break;
    case O_PUBS: o->publishers = atoi(v); break;
    case O_PIPE: o->pipeline = atoi(v); break;
    case O_WIN: o->window = atol(v); break;
    case O_SIZE: o->size = atoi(v); break;
    case O_MAXC: o->max_connecting = atoi(v); break;
    case O_SPREAD: return set_spread(o, v);
    case O_PID:
        if (o->npids == MAX_PIDS)
            return false;
        o->pids[o->npids++] = atoi(v);
        break;
    case O_SETTLE: o->settle = atof(v); break;
    case O_STALL: o->stall_timeout = atof(v); break;
    case O_TIMEOUT: o->timeout = atof(v); break;
    case O_SCEN: o->scenario = v; break;
    case O_TARGET: o->target = v; break;
    case O_TRANSPORT:
        if (strcmp(v, "sse") != 0 && strcmp(v, "ws") != 0)
            return false;
        o->ws = strcmp(v, "ws") == 0;
        break;
    case O_WSPROTO:
        if (strcmp(v, "pushlet") != 0 && strcmp(v, "raw") != 0)
            return false;
        o->ws_raw = strcmp(v, "raw") == 0;
        break;
    default: return false;
    }
    return true;
}

static const char *validate(const struct options *o)
{
    if (o->subscribers < 1 || o->subscribers > MAX_SUBSCRIBERS)
        return "--subscribers out of range";
    if (o->topics < 1 || o->topics > o->subscribers)
        return "--topics must be 1..subscribers";
    if (o->publishers < 1 || o->publishers > MAX_PUBLISHERS)
        return "--publishers must be 1..64";
    if (o->pipeline < 1 || o->pipeline > MAX_PIPELINE)
        return "--pipeline must be 1..64";
    if (o->messages < 0 || o->window < 1 || o->rate < 0 || o->duration < 0)
        return "negative --messages/--rate/--duration or --window < 1";
    if (o->size < 1 || o->size > MAX_BODY - 1)
        return "--size must be 1..65535";
    if (o->max_connecting < 1 || o->port < 1 || o->port > 65535)
        return "bad --max-connecting or --port";
    if (o->pub_port < 0 || o->pub_port > 65535)
        return "bad --pub-port";
    if (o->timeout <= 0 || o->timeout > 3600 || o->stall_timeout <= 0)
        return "--timeout must be in (0, 3600] and --stall-timeout > 0";
    return NULL;
}

static int parse_args(int argc, char **argv, struct options *o)
{
    set_defaults(o);
    int c;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == O_HELP || c == 'h') {
            usage(stdout);
            exit(0);
        }
        if (!apply_opt(o, c, optarg)) {
            usage(stderr);
            return -1;
        }
    }
    const char *err = validate(o);
    if (err) {
        fprintf(stderr, "pushlet-bench: %s\n", err);
        return -1;
    }
    if (o->spread < 0)
        o->spread = o->subscribers > 1000;
    if (!o->pub_host)
        o->pub_host = o->host;
    if (o->pub_port == 0)
        o->pub_port = o->port;
    return 0;
}

/* Only loopback targets: this tool opens thousands of connections. */
static int resolve_target(void)
{
    if (uv_ip4_addr(B.o.host, B.o.port, &B.dst) != 0 ||
        (ntohl(B.dst.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "pushlet-bench: --host must be an IPv4 address in "
                        "127.0.0.0/8\n");
        return -1;
    }
    if (uv_ip4_addr(B.o.pub_host, B.o.pub_port, &B.pub_dst) != 0 ||
        (ntohl(B.pub_dst.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "pushlet-bench: --pub-host must be an IPv4 address in "
                        "127.0.0.0/8\n");
        return -1;
    }
    return 0;
}

static int alloc_state(void)
{
    size_t n = (size_t)B.o.subscribers, t = (size_t)B.o.topics;
    B.subs = calloc(n, sizeof *B.subs);
    B.topic_subs = calloc(t, sizeof *B.topic_subs);
    B.topic_unready = calloc(t, sizeof *B.topic_unready);
    B.warm_queue = calloc(t, sizeof *B.warm_queue);
    B.order = calloc(t, sizeof *B.order);
    int64_t *last = malloc(n * (size_t)B.o.publishers * sizeof *last);
    if (!B.subs || !B.topic_subs || !B.topic_unready || !B.warm_queue || !B.order || !last) {
        free(last);
        return -1;
    }
    for (size_t i = 0; i < n * (size_t)B.o.publishers; i++)
        last[i] = -1;
    for (size_t i = 0; i < n; i++) {
        B.subs[i].idx = (uint32_t)i;
        B.subs[i].topic = (uint32_t)(i % t);
        B.subs[i].last_g = last + i * (size_t)B.o.publishers;
    }
    for (int i = 0; i < B.o.publishers; i++)
        B.pubs[i].idx = (uint32_t)i;
    return 0;
}

static void free_state(void)
{
    for (int i = 0; i < B.o.subscribers; i++) {
        free(B.subs[i].carry);
        free(B.subs[i].bits);
        free(B.subs[i].ws_ctl);
    }
    if (B.subs)
        free(B.subs[0].last_g);
    free(B.subs);
    free(B.topic_subs);
    free(B.topic_unready);
    free(B.warm_queue);
    for (int t = 0; B.order && t < B.o.topics; t++)
        free(B.order[t].seq);
    free(B.order);
    free(B.remaining);
}

static int exit_status(void)
{
    if (strcmp(B.end_reason, "ok") != 0)
        return 1;
    bool bad = count_lost() || B.dups || B.reordered || B.diverged || B.id_regressions ||
               B.publish_errors || B.connect_errors || B.disconnects || B.unexpected;
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (parse_args(argc, argv, &B.o) != 0)
        return 2;
    if (resolve_target() != 0 || alloc_state() != 0)
        return 2;
    signal(SIGPIPE, SIG_IGN);
    rng_seed();
    B.loop = uv_default_loop();
    B.t_start = uv_hrtime();
    B.ps_before = sample_server();
    B.server_core = B.o.npids ? pinned_cpu(B.o.pids[0]) : -1;
    B.client_core = pinned_cpu(0);
    if (B.server_core >= 0 && B.server_core == B.client_core)
        B.server_core = B.client_core = -1; /* shared core: not separable */
    B.phase = PH_CONNECT;
    uv_timer_init(B.loop, &B.tick);
    uv_timer_start(&B.tick, tick_cb, 1, 1);
    launch_subs();
    uv_run(B.loop, UV_RUN_DEFAULT);
    int rc = exit_status();
    uv_loop_close(B.loop);
    free_state();
    return rc;
}
