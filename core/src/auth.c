/* Who may connect and subscribe. With PUSHLET_OPT_JWT_SECRET set, SSE streams and WebSocket
 * upgrades need an HS256 token (Authorization: Bearer, or ?token= for clients that cannot set
 * headers, such as EventSource): its `sub` is the user id, its `topics` claim limits every
 * subscription — initial topics, WebSocket commands and resumes all pass through
 * pl_auth_topic(). */
#include "internal.h"
#include "jwt.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *reason_text(const char *why)
{
    if (strcmp(why, "expired") == 0)
        return "token expired";
    if (strcmp(why, "not_yet_valid") == 0)
        return "token not yet valid";
    if (strcmp(why, "unsupported_alg") == 0)
        return "token algorithm not accepted (HS256 only)";
    if (strcmp(why, "bad_signature") == 0)
        return "token signature invalid";
    return "token invalid";
}

/* Asks the host, when it wants to be asked; the token (if any) was checked first. */
static int ask_host(pl_conn *c, const pl_http_req *r, const char *query, size_t qlen,
                    const char **err)
{
    if (!pl_hooks_want(c->p, PUSHLET_EVENT_AUTH_CONNECT)) {
        c->auth_stage = PL_AUTH_CONNECT_OK;
        return 0;
    }
    int status = pl_hooks_ask_connect(c, r, query, qlen);
    if (status) {
        *err = "authorization unavailable";
        return status;
    }
    return PL_AUTH_WAIT;
}

int pl_auth_connection(pl_conn *c, const pl_http_req *r, const char *query, size_t qlen,
                       const char **err)
{
    pushlet_t *p = c->p;
    if (c->auth_stage >= PL_AUTH_CONNECT_OK)
        return 0; /* the host answered, and the request is being routed again */
    const char *secret = p->cfg.jwt_secret;
    if (!secret || !*secret)
        return ask_host(c, r, query, qlen, err);
    size_t len = 0;
    char *from_query = NULL;
    const char *token = pl_http_header(r, "authorization", &len);
    if (token && len > 7 && strncasecmp(token, "Bearer ", 7) == 0) {
        token += 7;
        len -= 7;
    } else {
        token = NULL;
        if (pl_query_find(query, qlen, "token", &from_query, &len) == 1)
            token = from_query;
    }
    int status = 0;
    pl_jwt_claims *claims = calloc(1, sizeof(*claims));
    const char *why = NULL;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (!claims) {
        status = 503, *err = "out of memory";
    } else if (!token) {
        status = 401, *err = "token required";
    } else if (pl_jwt_verify(token, len, (const uint8_t *)secret, strlen(secret), now.tv_sec, 0,
                             claims, &why) != 0) {
        status = 401, *err = reason_text(why);
    }
    free(from_query);
    if (status) {
        free(claims);
        PL_STAT_ADD(p, PUSHLET_STAT_AUTH_DENIED, status == 401);
        return status;
    }
    c->auth = claims;
    if (claims->sub && !c->user) {
        c->user = strdup(claims->sub);
        c->user_len = c->user ? strlen(c->user) : 0;
    }
    return ask_host(c, r, query, qlen, err);
}

bool pl_auth_topic(pl_conn *c, const char *topic, size_t len)
{
    if (!c->auth || pl_jwt_topic_allowed(c->auth, topic, len))
        return true;
    PL_STAT_ADD(c->p, PUSHLET_STAT_AUTH_DENIED, 1);
    return false;
}

void pl_auth_free(pl_conn *c)
{
    if (c->auth) {
        pl_jwt_claims_free(c->auth);
        free(c->auth);
        c->auth = NULL;
    }
}
