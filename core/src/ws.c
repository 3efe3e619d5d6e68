/* WebSocket transport (RFC 6455): the upgrade handshake, frames from the peer, the subscription
 * protocol, heartbeat pings and the close handshake. Messages to subscribers are shared
 * pre-encoded frames (codec.c); only replies to a client's own commands are built per client.
 *
 * Client → server: JSON text or binary messages
 *   {"action":"subscribe","topic":"t"} / {"action":"unsubscribe","topic":"t"} / {"action":"ping"}
 * Server → client: binary frames, one JSON object (or MessagePack map) each. */
#define _GNU_SOURCE /* memmem */
#include "internal.h"

#include <cjson/cJSON.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct pl_ws_conn {
    pl_ws_parser parser;
    uint8_t *msg; /* a message arriving in pieces; NULL otherwise */
    size_t msg_len, msg_cap;
    bool awaiting_pong, close_sent, deflate;
    bool failed;       /* closed for a protocol error: the parser's state means nothing any more */
    double tokens;     /* (un)subscribe commands allowed now (a token bucket) */
    uint64_t token_ms; /* loop time of the last refill */
};

#define CLOSE_REASON_MAX 123

/* ---- Sending -------------------------------------------------------------------------------- */

static void send_frame(pl_conn *c, uint8_t opcode, const void *payload, size_t len)
{
    uint8_t hdr[PL_WS_MAX_HEADER];
    size_t hlen = pl_ws_frame_header(hdr, opcode, true, false, len);
    pl_buf *b = pl_buf_new(hlen + len);
    if (!b) {
        pl_conn_close(c, "out of memory");
        return;
    }
    memcpy(b->data, hdr, hlen);
    if (len)
        memcpy(b->data + hlen, payload, len);
    pl_conn_send(c, b);
    pl_buf_unref(b);
}

/* A reply to this client: {"event":E[,"topic":T][,"reason":R][,"data":D][,"id":I]} in its
 * encoding. Topics passed here are valid names, reasons and messages fixed strings, IDs made by
 * us: nothing to escape. */
static void reply_id(pl_conn *c, const char *event, const char *topic, const char *reason,
                     const char *message, const char *id)
{
    if (c->format == PL_FMT_WS_MSGPACK || c->format == PL_FMT_WS_MSGPACK_Z) {
        msgpack_sbuffer sb;
        msgpack_packer pk;
        msgpack_sbuffer_init(&sb);
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        const char *keys[] = {"event", "topic", "reason", "data", "id"};
        const char *vals[] = {event, topic, reason, message, id};
        size_t n = 0;
        for (int i = 0; i < 5; i++)
            n += vals[i] != NULL;
        msgpack_pack_map(&pk, n);
        for (int i = 0; i < 5; i++) {
            if (!vals[i])
                continue;
            msgpack_pack_str(&pk, strlen(keys[i]));
            msgpack_pack_str_body(&pk, keys[i], strlen(keys[i]));
            msgpack_pack_str(&pk, strlen(vals[i]));
            msgpack_pack_str_body(&pk, vals[i], strlen(vals[i]));
        }
        send_frame(c, PL_WS_BINARY, sb.data, sb.size);
        msgpack_sbuffer_destroy(&sb);
        return;
    }
    char out[512];
    int n = snprintf(out, sizeof(out), "{\"event\":\"%s\"", event);
    if (topic)
        n += snprintf(out + n, sizeof(out) - (size_t)n, ",\"topic\":\"%s\"", topic);
    if (reason)
        n += snprintf(out + n, sizeof(out) - (size_t)n, ",\"reason\":\"%s\"", reason);
    if (message) {
        /* Host-given reasons are one line of at most 120 bytes, but may hold quotes. */
        n += snprintf(out + n, sizeof(out) - (size_t)n, ",\"data\":\"");
        for (const char *m = message; *m && n < (int)sizeof(out) - 16; m++) {
            if (*m == '"' || *m == '\\')
                out[n++] = '\\';
            out[n++] = *m;
        }
        n += snprintf(out + n, sizeof(out) - (size_t)n, "\"");
    }
    if (id)
        n += snprintf(out + n, sizeof(out) - (size_t)n, ",\"id\":\"%s\"", id);
    n += snprintf(out + n, sizeof(out) - (size_t)n, "}");
    send_frame(c, PL_WS_BINARY, out, (size_t)n);
}

static void reply(pl_conn *c, const char *event, const char *topic, const char *reason,
                  const char *message)
{
    reply_id(c, event, topic, reason, message, NULL);
}

void pl_ws_reply(pl_conn *c, const char *event, const char *topic, const char *reason,
                 const char *message)
{
    reply_id(c, event, topic, reason, message, NULL);
}

/* "subscribed", naming where subscription `k` starts (`from`, else the topic's position now). */
static void announce_subscription(pl_conn *c, uint16_t k, const pl_position *from)
{
    pl_topic *t = c->subscriber.subs[k].topic;
    char id[PL_ID_MAX];
    pl_position_format(id, from ? *from : (pl_position){t->epoch, t->seq});
    reply_id(c, "subscribed", t->name, NULL, NULL, id);
}

void pl_ws_close(pl_conn *c, uint16_t code, const char *reason)
{
    pl_ws_conn *ws = c->ws;
    if (c->closing || c->ending)
        return;
    if (!c->why)
        c->why = reason; /* static text, except from the host, which sets `why` first */
    if (!ws->close_sent) {
        uint8_t payload[2 + CLOSE_REASON_MAX];
        size_t rlen = reason ? strlen(reason) : 0;
        if (rlen > CLOSE_REASON_MAX)
            rlen = CLOSE_REASON_MAX;
        payload[0] = (uint8_t)(code >> 8);
        payload[1] = (uint8_t)code;
        memcpy(payload + 2, reason, rlen);
        send_frame(c, PL_WS_CLOSE, payload, 2 + rlen);
        ws->close_sent = true;
    }
    pl_conn_end(c);
}

/* ---- Handshake ------------------------------------------------------------------------------ */

/* Does the comma-separated header value contain `token` (case-insensitive)? */
static bool has_token(const char *value, const char *token)
{
    size_t tlen = strlen(token);
    for (const char *p = value; p && *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        const char *end = p;
        while (*end && *end != ',')
            end++;
        const char *e = end;
        while (e > p && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if ((size_t)(e - p) == tlen && strncasecmp(p, token, tlen) == 0)
            return true;
        p = end;
    }
    return false;
}

/* The offer parameters we understand (RFC 7692 7.1), each allowed once. */
enum { P_SERVER_NCT = 1, P_CLIENT_NCT = 2, P_SERVER_BITS = 4, P_CLIENT_BITS = 8 };

static int deflate_param(const char *tok)
{
    if (strcasecmp(tok, "server_no_context_takeover") == 0)
        return P_SERVER_NCT;
    if (strcasecmp(tok, "client_no_context_takeover") == 0)
        return P_CLIENT_NCT;
    /* A shared compressed frame cannot use a smaller window for one client: only 15. */
    if (strcasecmp(tok, "server_max_window_bits=15") == 0 ||
        strcasecmp(tok, "server_max_window_bits=\"15\"") == 0)
        return P_SERVER_BITS;
    if (strcasecmp(tok, "client_max_window_bits") == 0)
        return P_CLIENT_BITS;
    if (strncasecmp(tok, "client_max_window_bits=", 23) == 0) {
        const char *v = tok + 23;
        bool quoted = *v == '"';
        char *end;
        long bits = strtol(v + quoted, &end, 10);
        if (end != v + quoted && bits >= 8 && bits <= 15 && *end == (quoted ? '"' : '\0') &&
            (!quoted || end[1] == '\0'))
            return P_CLIENT_BITS;
    }
    return 0;
}

/* Accepts the first permessage-deflate offer we can honour (RFC 7692 5). We answer with no
 * context takeover both ways, whatever was offered; server_max_window_bits=15 is echoed as the
 * RFC requires. Returns 0 (no offer accepted), 1, or 2 (accepted, echo the window bits). */
static int accept_deflate(const char *offers)
{
    for (const char *o = offers; o && *o;) {
        const char *start = o, *end = strchr(o, ',');
        size_t olen = end ? (size_t)(end - start) : strlen(start);
        char offer[256];
        o = end ? end + 1 : NULL;
        if (olen >= sizeof(offer))
            continue;
        memcpy(offer, start, olen);
        offer[olen] = '\0';
        int seen = 0;
        bool ok = true, first = true;
        char *save = NULL;
        for (char *tok = strtok_r(offer, ";", &save); tok && ok; tok = strtok_r(NULL, ";", &save)) {
            while (*tok == ' ' || *tok == '\t')
                tok++;
            size_t n = strlen(tok);
            while (n && (tok[n - 1] == ' ' || tok[n - 1] == '\t'))
                tok[--n] = '\0';
            if (first) {
                ok = strcasecmp(tok, "permessage-deflate") == 0;
                first = false;
                continue;
            }
            int param = deflate_param(tok);
            ok = param != 0 && !(seen & param); /* unknown or repeated: decline this offer */
            seen |= param;
        }
        if (ok && !first)
            return seen & P_SERVER_BITS ? 2 : 1;
    }
    return 0;
}

static bool origin_allowed(const pushlet_t *p, const pl_http_req *r)
{
    const char *allowed = p->cfg.ws_origins;
    if (!allowed || !*allowed)
        return true;
    const char *origin = pl_http_header(r, "origin", NULL);
    return origin && has_token(allowed, origin);
}

void pl_ws_upgrade(pl_conn *c, pl_http_req *r, const char *query, size_t qlen)
{
    pushlet_t *p = c->p;
    size_t klen = 0;
    const char *upgrade = pl_http_header(r, "upgrade", NULL);
    const char *connection = pl_http_header(r, "connection", NULL);
    const char *version = pl_http_header(r, "sec-websocket-version", NULL);
    const char *key = pl_http_header(r, "sec-websocket-key", &klen);
    c->keep_alive = false; /* whatever happens, this connection speaks HTTP no more */
    if (r->parser.method != HTTP_GET) {
        pl_respond_text(c, 405, "Allow: GET\r\n", "WebSocket upgrades use GET");
        return;
    }
    if (!upgrade || !has_token(upgrade, "websocket") || !connection ||
        !has_token(connection, "upgrade")) {
        pl_respond_text(c, 426, "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                        "this is a WebSocket endpoint");
        return;
    }
    if (!version || strcmp(version, "13") != 0) {
        pl_respond_text(c, 426, "Sec-WebSocket-Version: 13\r\n", "unsupported WebSocket version");
        return;
    }
    if (!key || !pl_ws_key_valid(key, klen) || r->parser.http_minor < 1) {
        pl_respond_text(c, 400, "", "invalid WebSocket handshake");
        return;
    }
    if (!origin_allowed(p, r)) {
        pl_respond_text(c, 403, "", "origin not allowed");
        return;
    }

    /* Encoding: ?format=msgpack, or the pushlet.msgpack subprotocol. */
    const char *protocols = pl_http_header(r, "sec-websocket-protocol", NULL);
    const char *chosen = NULL;
    int format = PL_FMT_WS_JSON;
    if (protocols && has_token(protocols, "pushlet.msgpack"))
        chosen = "pushlet.msgpack", format = PL_FMT_WS_MSGPACK;
    else if (protocols && has_token(protocols, "pushlet.json"))
        chosen = "pushlet.json";
    char *fmt = NULL;
    size_t fmt_len;
    if (pl_query_find(query, qlen, "format", &fmt, &fmt_len) == 1) {
        bool msgpack = strcmp(fmt, "msgpack") == 0, json = strcmp(fmt, "json") == 0;
        free(fmt);
        if (!msgpack && !json) {
            pl_respond_text(c, 400, "", "format must be json or msgpack");
            return;
        }
        if (!chosen)
            format = msgpack ? PL_FMT_WS_MSGPACK : PL_FMT_WS_JSON;
    }

    const char *err;
    int status = pl_auth_connection(c, r, query, qlen, &err);
    if (status == PL_AUTH_WAIT)
        return; /* routed again once the host answered */
    if (status) {
        pl_respond_text(c, status, status == 401 ? "WWW-Authenticate: Bearer\r\n" : "", err);
        return;
    }
    status = pl_subscribe_query(c, query, qlen, false, &err);
    if (status == PL_AUTH_WAIT)
        return;
    if (status) {
        pl_respond_text(c, status, "", err);
        return;
    }
    pl_position pos[PL_CURSOR_MAX_POSITIONS];
    int fit = pl_read_cursor(c, NULL, 0, query, qlen, pos, &err);
    pl_ws_conn *ws = fit < -1 ? NULL : calloc(1, sizeof(*ws));
    if (!ws) {
        pl_topics_unsubscribe_all(&p->topics, &c->subscriber);
        pl_sync_topic_stats(p);
        pl_respond_text(c, fit < -1 ? -fit : 503, "", fit < -1 ? err : "out of memory");
        return;
    }
    ws->tokens = (double)p->cfg.max_subscribes_per_sec;
    ws->token_ms = uv_now(&p->loop);
    const char *extensions = pl_http_header(r, "sec-websocket-extensions", NULL);
    int deflate = extensions ? accept_deflate(extensions) : 0;
    ws->deflate = deflate != 0;
    if (ws->deflate && !p->deflate && !(p->deflate = pl_deflate_new()))
        ws->deflate = false;
    if (ws->deflate)
        format = format == PL_FMT_WS_JSON ? PL_FMT_WS_JSON_Z : PL_FMT_WS_MSGPACK_Z;
    /* Compressed client messages may inflate to at most the same limit. */
    pl_ws_parser_init(&ws->parser, (uint64_t)p->cfg.max_message_size, ws->deflate);
    c->ws = ws;
    c->kind = PL_CONN_WS;
    c->format = (uint8_t)format;

    char accept[29];
    pl_ws_accept_key(key, klen, accept);
    char head[384];
    int n =
        snprintf(head, sizeof(head),
                 "HTTP/1.1 101 Switching Protocols\r\n"
                 "Upgrade: websocket\r\n"
                 "Connection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n"
                 "%s%s%s%s\r\n",
                 accept, chosen ? "Sec-WebSocket-Protocol: " : "", chosen ? chosen : "",
                 chosen ? "\r\n" : "",
                 !ws->deflate ? ""
                 : deflate == 2
                     ? "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                       "client_no_context_takeover; server_max_window_bits=15\r\n"
                     : "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                       "client_no_context_takeover\r\n");
    pl_buf *b = pl_buf_from(head, (size_t)n);
    if (!b) {
        pl_conn_close(c, "out of memory");
        return;
    }
    pl_conn_send(c, b);
    pl_buf_unref(b);
    pl_list_remove(&c->link);
    pl_list_push(&p->conns_stream, &c->link);
    PL_STAT_ADD(p, PUSHLET_STAT_WS_CONNECTIONS, 1);
    reply(c, "connected", NULL, NULL, "Connection established");
    pl_resume_all(c, fit, pos, announce_subscription);
    pl_hooks_connected(c);
}

/* ---- Commands ------------------------------------------------------------------------------- */

int pl_ws_parse_command(const uint8_t *data, size_t len, pl_ws_command *cmd)
{
    memset(cmd, 0, sizeof(*cmd));
    cJSON *root = cJSON_ParseWithLength((const char *)data, len);
    int rc = 0;
    if (!root || !cJSON_IsObject(root)) {
        cmd->reason = "bad_json";
        cmd->detail = "commands are JSON objects";
        rc = -1;
        goto done;
    }
    const char *action = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "action"));
    const char *topic = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "topic"));
    const cJSON *since = cJSON_GetObjectItemCaseSensitive(root, "since");
    if (action && strcmp(action, "ping") == 0) {
        cmd->action = PL_WS_CMD_PING;
    } else if (action && strcmp(action, "subscribe") == 0) {
        cmd->action = PL_WS_CMD_SUBSCRIBE;
    } else if (action && strcmp(action, "unsubscribe") == 0) {
        cmd->action = PL_WS_CMD_UNSUBSCRIBE;
    } else {
        cmd->reason = action ? "unknown_action" : "missing_action";
        cmd->detail = "actions: subscribe, unsubscribe, ping";
        rc = -1;
        goto done;
    }
    if (cmd->action != PL_WS_CMD_PING) {
        if (!topic) {
            cmd->reason = "missing_topic";
            cmd->detail = "topic must be a string";
            rc = -1;
        } else if (!pl_topic_name_valid(topic, strlen(topic)) ||
                   memmem(data, len, "\\u0000", 6) != NULL) {
            /* cJSON keeps no string lengths: an escaped NUL would silently cut the topic short,
             * so a command carrying one names no valid topic. */
            cmd->reason = "invalid_topic";
            cmd->detail = "topic names: 1-128 of A-Z a-z 0-9 -_.:/@~!+=";
            rc = -1;
        } else {
            cmd->topic_len = strlen(topic);
            memcpy(cmd->topic, topic, cmd->topic_len + 1);
        }
    }
    if (rc == 0 && cmd->action == PL_WS_CMD_SUBSCRIBE && since && !cJSON_IsNull(since)) {
        const char *s = cJSON_GetStringValue(since);
        int32_t check;
        if (!s || pl_cursor_parse(s, strlen(s), &cmd->since, 1, &check) != 1 ||
            check != PL_CURSOR_NO_CHECK) {
            cmd->reason = "invalid_since";
            cmd->detail = "since must be a message ID (EPOCH-SEQ)";
            rc = -1;
        } else {
            cmd->has_since = true;
        }
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* A token bucket: max_subscribes_per_sec commands per second, bursts up to as many. */
static bool take_token(pl_conn *c)
{
    pl_ws_conn *ws = c->ws;
    double rate = (double)c->p->cfg.max_subscribes_per_sec;
    uint64_t now = uv_now(&c->p->loop);
    ws->tokens += (double)(now - ws->token_ms) * rate / 1000.0;
    if (ws->tokens > rate)
        ws->tokens = rate;
    ws->token_ms = now;
    if (ws->tokens < 1.0)
        return false;
    ws->tokens -= 1.0;
    return true;
}

static int subscription_of(const pl_conn *c, const pl_topic *t)
{
    for (uint16_t i = 0; t && i < c->subscriber.nsubs; i++)
        if (c->subscriber.subs[i].topic == t)
            return i;
    return -1;
}

void pl_ws_subscribe(pl_conn *c, const char *topic, size_t len, const pl_position *since)
{
    pushlet_t *p = c->p;
    pl_topic *t = pl_topics_find(&p->topics, topic, len);
    int k = subscription_of(c, t);
    if (k >= 0) {
        /* Already subscribed (and live or catching up): nothing was missed. */
        const pl_sub *s = &c->subscriber.subs[k];
        bool live = t->subs[s->index].state == PL_SUB_LIVE;
        char id[PL_ID_MAX];
        pl_position_format(id, (pl_position){t->epoch, live ? t->seq : s->seq});
        reply_id(c, "subscribed", topic, NULL, NULL, id);
    } else if (!pl_auth_topic(c, topic, len)) {
        reply(c, "error", topic, "forbidden", "not allowed to subscribe to this topic");
    } else if (c->subscriber.nsubs >= p->cfg.max_topics_per_connection) {
        PL_STAT_ADD(p, PUSHLET_STAT_TOPICS_REJECTED, 1);
        reply(c, "error", topic, "too_many_topics", "topic limit per connection reached");
    } else if (!pl_dist_command_ready(c, topic, len, since)) {
        /* distributed mode: called again once the topic caught up from Redis */
    } else if (pl_topics_subscribe(&p->topics, &c->subscriber, topic, len) < 0) {
        reply(c, "error", topic, "internal", "out of memory");
    } else {
        uint16_t last = (uint16_t)(c->subscriber.nsubs - 1);
        announce_subscription(c, last, since);
        pl_resume(c, last, since);
        pl_hooks_subscribed(c, c->subscriber.subs[last].topic);
    }
    pl_sync_topic_stats(p);
}

/* A subscribe the host is asked about first (when it wants to be). */
static void subscribe(pl_conn *c, const pl_ws_command *cmd)
{
    pushlet_t *p = c->p;
    const pl_position *since = cmd->has_since ? &cmd->since : NULL;
    if (subscription_of(c, pl_topics_find(&p->topics, cmd->topic, cmd->topic_len)) >= 0 ||
        !pl_hooks_want(p, PUSHLET_EVENT_AUTH_SUBSCRIBE)) {
        pl_ws_subscribe(c, cmd->topic, cmd->topic_len, since);
    } else if (!pl_auth_topic(c, cmd->topic, cmd->topic_len)) {
        reply(c, "error", cmd->topic, "forbidden", "not allowed to subscribe to this topic");
    } else if (c->subscriber.nsubs + c->commands_waiting >= p->cfg.max_topics_per_connection) {
        PL_STAT_ADD(p, PUSHLET_STAT_TOPICS_REJECTED, 1);
        reply(c, "error", cmd->topic, "too_many_topics", "topic limit per connection reached");
    } else if (pl_hooks_ask_command(c, cmd->topic, cmd->topic_len, since) > 1) {
        reply(c, "error", cmd->topic, "internal", "authorization unavailable");
    } /* else the host's answer replies (pl_ws_subscribe or a forbidden error) */
}

static void unsubscribe(pl_conn *c, const pl_ws_command *cmd)
{
    pushlet_t *p = c->p;
    pl_topic *t = pl_topics_find(&p->topics, cmd->topic, cmd->topic_len);
    if (subscription_of(c, t) >= 0) {
        pushlet_event_t *e = pl_hooks_unsubscribed_event(c, t, "unsubscribed"); /* t may go */
        pl_topics_unsubscribe(&p->topics, &c->subscriber, cmd->topic, cmd->topic_len);
        pl_sync_topic_stats(p);
        pl_hooks_emit(p, e);
        reply(c, "unsubscribed", cmd->topic, NULL, NULL);
    } else if (pl_hooks_cancel_command(c, cmd->topic, cmd->topic_len) ||
               pl_dist_cancel_command(c, cmd->topic, cmd->topic_len)) {
        reply(c, "unsubscribed", cmd->topic, NULL, NULL); /* its subscribe never completed */
    } else {
        reply(c, "error", cmd->topic, "not_subscribed", "not subscribed to this topic");
    }
}

static void command(pl_conn *c, const uint8_t *data, size_t len, bool binary)
{
    pushlet_t *p = c->p;
    pl_ws_command cmd;
    if (pl_ws_parse_command(data, len, &cmd) != 0) {
        /* Anything that is no command at all (not JSON, no or an unknown action) is the host's,
         * when it takes client messages. */
        bool not_a_command = strcmp(cmd.reason, "bad_json") == 0 ||
                             strcmp(cmd.reason, "missing_action") == 0 ||
                             strcmp(cmd.reason, "unknown_action") == 0;
        if (!not_a_command || !pl_hooks_client_message(c, data, len, binary))
            reply(c, "error", cmd.topic_len ? cmd.topic : NULL, cmd.reason, cmd.detail);
        return;
    }
    if (cmd.action == PL_WS_CMD_PING) {
        reply(c, "pong", NULL, NULL, NULL);
        return;
    }
    const char *topic = cmd.topic;
    if (!take_token(c)) {
        PL_STAT_ADD(p, PUSHLET_STAT_RATE_LIMITED, 1);
        reply(c, "error", topic, "rate_limited", "too many subscribe commands: slow down");
        return;
    }
    if (cmd.action == PL_WS_CMD_SUBSCRIBE)
        subscribe(c, &cmd);
    else
        unsubscribe(c, &cmd);
}

/* ---- Frames from the peer ------------------------------------------------------------------- */

static void control(pl_conn *c, const pl_ws_event *ev)
{
    pl_ws_conn *ws = c->ws;
    if (ev->opcode == PL_WS_PING) {
        send_frame(c, PL_WS_PONG, ev->data, ev->len);
    } else if (ev->opcode == PL_WS_PONG) {
        ws->awaiting_pong = false;
    } else {
        /* Echo the peer's code; an empty close gets an empty close. */
        if (ev->len >= 2)
            send_frame(c, PL_WS_CLOSE, ev->data, 2);
        else
            send_frame(c, PL_WS_CLOSE, NULL, 0);
        ws->close_sent = true;
        if (!c->why)
            c->why = "closed by the client";
        pl_conn_end(c);
    }
}

/* A whole compressed message: inflate (bounded), check text is UTF-8, then handle it. */
static void compressed_command(pl_conn *c, uint8_t opcode, const uint8_t *data, size_t len)
{
    uint8_t *plain;
    size_t plain_len;
    int code = pl_inflate_message(c->p->deflate, data, len, (size_t)c->p->cfg.max_message_size,
                                  &plain, &plain_len);
    if (code) {
        if (code == 1009)
            PL_STAT_ADD_SHARED(c->p, PUSHLET_STAT_OVERSIZE_REJECTED, 1);
        pl_ws_close(c, (uint16_t)code, code == 1009 ? "message too big" : "bad compressed data");
        return;
    }
    if (opcode == PL_WS_TEXT && !pl_utf8_valid(plain, plain_len))
        pl_ws_close(c, 1007, "invalid UTF-8");
    else
        command(c, plain, plain_len, opcode == PL_WS_BINARY);
    free(plain);
}

static void data(pl_conn *c, const pl_ws_event *ev)
{
    pl_ws_conn *ws = c->ws;
    if (ev->message_end && !ws->msg) { /* the common case: a whole message in one read */
        if (ev->compressed)
            compressed_command(c, ev->opcode, ev->data, ev->len);
        else
            command(c, ev->data, ev->len, ev->opcode == PL_WS_BINARY);
        return;
    }
    if (ws->msg_len + ev->len > ws->msg_cap) {
        size_t cap = ws->msg_cap ? ws->msg_cap : 256;
        while (cap < ws->msg_len + ev->len)
            cap *= 2;
        uint8_t *nm = realloc(ws->msg, cap);
        if (!nm) {
            pl_ws_close(c, 1011, "out of memory");
            return;
        }
        ws->msg = nm;
        ws->msg_cap = cap;
    }
    memcpy(ws->msg + ws->msg_len, ev->data, ev->len);
    ws->msg_len += ev->len;
    if (ev->message_end) {
        if (ev->compressed)
            compressed_command(c, ev->opcode, ws->msg, ws->msg_len);
        else
            command(c, ws->msg, ws->msg_len, ev->opcode == PL_WS_BINARY);
        free(ws->msg);
        ws->msg = NULL;
        ws->msg_len = ws->msg_cap = 0;
    }
}

void pl_ws_on_read(pl_conn *c, uint8_t *buf, size_t len)
{
    pl_ws_conn *ws = c->ws;
    ws->awaiting_pong = false; /* any traffic shows the peer is alive */
    if (c->ending && !ws->close_sent)
        return;
    while (len > 0 && !c->closing && !ws->failed) {
        size_t used;
        pl_ws_event ev;
        int rc = pl_ws_parse(&ws->parser, buf, len, &used, &ev);
        buf += used;
        len -= used;
        if (rc == PL_WS_ERROR) {
            ws->failed = true; /* the parser's state means nothing any more */
            if (ev.close_code == 1009)
                PL_STAT_ADD_SHARED(c->p, PUSHLET_STAT_OVERSIZE_REJECTED, 1);
            if (!c->ending)
                pl_ws_close(c, ev.close_code,
                            ev.close_code == 1009   ? "message too big"
                            : ev.close_code == 1007 ? "invalid UTF-8"
                                                    : "protocol error");
            return;
        }
        if (c->ending) {
            /* Our close is queued: only the peer's matters. Once both are through, close
             * without lingering, but never before ours is written. */
            if (rc == PL_WS_CONTROL && ev.opcode == PL_WS_CLOSE) {
                c->peer_done = true; /* on_shutdown closes at once */
                if (c->shut)
                    pl_conn_close(c, "close handshake complete");
                return;
            }
        } else if (rc == PL_WS_CONTROL) {
            control(c, &ev);
        } else if (rc == PL_WS_DATA) {
            data(c, &ev);
        }
    }
}

void pl_ws_heartbeat(pl_conn *c)
{
    if (c->closing || c->ending)
        return;
    if (c->ws->awaiting_pong) {
        PL_STAT_ADD(c->p, PUSHLET_STAT_TIMEOUTS, 1);
        pl_conn_close(c, "no pong to the last ping");
        return;
    }
    c->ws->awaiting_pong = true;
    pl_conn_send(c, c->p->ws_ping);
}

void pl_ws_free(pl_conn *c)
{
    if (c->ws) {
        free(c->ws->msg);
        free(c->ws);
        c->ws = NULL;
    }
}
