/* JSON Web Tokens signed with HMAC-SHA256 (RFC 7519, JWS compact form): verification and the
 * claims that connection and subscription authorisation use. Pure: no I/O, no global state of
 * our own. */
#ifndef PL_JWT_H
#define PL_JWT_H

#include "internal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PL_JWT_MAX_LEN     8192 /* longer tokens are "malformed" */
#define PL_JWT_MAX_SUB_LEN 256  /* bytes of the "sub" claim */

/* The claims of a verified token. Owned by the caller: release with pl_jwt_claims_free(). */
typedef struct pl_jwt_claims {
    char *sub;        /* NULL when absent; else 1..256 bytes of UTF-8 without control characters */
    int64_t exp, nbf; /* seconds since the epoch; 0 when absent */
    /* The "topics" claim: exact topic names, or patterns "p*" (any topic starting with p; a lone
     * "*" is every topic). NULL when the claim is absent (every topic allowed); an empty array
     * gives a non-NULL `topics` with ntopics 0 (no topic allowed). */
    char **topics;
    size_t ntopics;
} pl_jwt_claims;

/** Verifies a compact JWS `header.payload.signature` (base64url without padding) signed with
 *  HMAC-SHA256 under `secret`. The token need not be NUL-terminated; nothing past `len` is read.
 *  The header must be a JSON object with "alg":"HS256", no "crit", and "typ" absent or "JWT"
 *  (any case). The signature is checked (in constant time) before the payload is parsed.
 *  Time checks: "expired" when now >= exp + leeway, "not_yet_valid" when now < nbf - leeway.
 *  @param secret  the HMAC key; an empty secret verifies no token.
 *  @param leeway  seconds of clock skew tolerated, >= 0.
 *  @param out     zeroed first; filled on success only.
 *  @param err     on failure, a static reason: "malformed" (token shape, base64url, length),
 *                 "bad_header", "unsupported_alg", "bad_signature", "expired", "not_yet_valid",
 *                 "bad_claims" (payload not a JSON object, a known claim of the wrong type or
 *                 invalid, a known claim given twice) or "out_of_memory".
 *  @return 0 or -1.
 *  Thread: any (cJSON records its last parse error in a global, which nothing here reads). */
int pl_jwt_verify(const char *token, size_t len, const uint8_t *secret, size_t secret_len,
                  int64_t now, int64_t leeway, pl_jwt_claims *out, const char **err) PL_HIDDEN;

/** Frees what pl_jwt_verify() stored in `c` and zeroes it; NULL and zeroed claims are no-ops. */
void pl_jwt_claims_free(pl_jwt_claims *c) PL_HIDDEN;

/** Whether the claims allow `topic` (`len` bytes): always when the topics claim is absent; else
 *  when an entry equals it or an entry "p*" has p as a prefix of it.
 *  Thread: any (the claims are only read). */
bool pl_jwt_topic_allowed(const pl_jwt_claims *c, const char *topic, size_t len) PL_HIDDEN;

#endif
