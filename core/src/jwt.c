/* JWT (JWS compact form, HS256 only) verification. Everything before the signature check is
 * attacker-controlled: only the header is parsed before it, and only to refuse what is not HS256.
 * The payload is parsed once the signature has verified. */
#include "jwt.h"

#include <assert.h>
#include <cjson/cJSON.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define SIG_LEN 32 /* HMAC-SHA256 */
/* NumericDates beyond 2^53 cannot be held exactly by a JSON number parsed as a double. */
#define MAX_DATE 9007199254740992.0

/* ---- base64url (RFC 4648 §5), strict: no padding, no other alphabet, canonical last digit ---- */

static int b64url_value(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= 'a' && ch <= 'z')
        return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9')
        return ch - '0' + 52;
    return ch == '-' ? 62 : ch == '_' ? 63 : -1;
}

/* The decoded length of `len` digits, or -1 when no input has that length (4k+1). */
static long b64url_decoded_len(size_t len)
{
    if (len % 4 == 1)
        return -1;
    return (long)(len / 4 * 3 + (len % 4 ? len % 4 - 1 : 0));
}

/* Decodes into `out` (room for b64url_decoded_len(len) bytes; may be NULL to only validate).
 * Refuses characters outside the alphabet and a last digit with bits set past the data, so each
 * byte string has exactly one accepted encoding. */
static int b64url_decode(const char *s, size_t len, uint8_t *out)
{
    if (b64url_decoded_len(len) < 0)
        return -1;
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_value((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6 | (uint32_t)v) & 0xFFFFFF;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (out)
                out[o] = (uint8_t)(acc >> bits);
            o++;
        }
    }
    if (bits > 0 && (acc & ((1u << bits) - 1)) != 0)
        return -1;
    return 0;
}

/* A malloc'd copy of a validated part (at least one byte allocated); NULL when out of memory. */
static uint8_t *b64url_decode_alloc(const char *s, size_t len, size_t *out_len)
{
    long n = b64url_decoded_len(len);
    assert(n >= 0);
    uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf)
        b64url_decode(s, len, buf); /* already validated */
    *out_len = (size_t)n;
    return buf;
}

/* ---- JSON ------------------------------------------------------------------------------------ */

static bool json_space(uint8_t ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r'; }

/* Parses exactly one JSON object filling `len` bytes (JSON whitespace around it allowed: cJSON
 * alone would also skip a BOM and control characters, and ignore what follows the value). cJSON
 * would end a string at a NUL (raw or \u0000) without saying so, which could turn
 * "sub":"alice\u0000x" into "alice" or make two keys look alike: such text is refused. */
static cJSON *parse_object(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len && json_space(s[i]))
        i++;
    if (i == len || s[i] != '{' || memchr(s, '\0', len))
        return NULL;
    for (size_t k = i; k + 1 < len; k++) {
        if (s[k] != '\\')
            continue;
        if (s[k + 1] == 'u' && len - k >= 6 && memcmp(s + k + 2, "0000", 4) == 0)
            return NULL;
        k++; /* the escaped character, which may itself be a backslash */
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)s, len, &end, 0);
    if (!root)
        return NULL;
    i = (size_t)((const uint8_t *)end - s);
    while (i < len && json_space(s[i]))
        i++;
    if (i != len || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

/* The member `name` (case-sensitive), NULL when absent; *dup set when it appears more than once
 * (cJSON keeps duplicates and its lookups return the first, other parsers the last). */
static const cJSON *member(const cJSON *obj, const char *name, bool *dup)
{
    const cJSON *found = NULL;
    for (const cJSON *it = obj->child; it; it = it->next) {
        if (it->string && strcmp(it->string, name) == 0) {
            if (found)
                *dup = true;
            else
                found = it;
        }
    }
    return found;
}

/* ---- Header ---------------------------------------------------------------------------------- */

static const char *check_header(const uint8_t *s, size_t len)
{
    cJSON *h = parse_object(s, len);
    if (!h)
        return "bad_header";
    bool dup = false;
    const cJSON *alg = member(h, "alg", &dup);
    const cJSON *typ = member(h, "typ", &dup);
    const cJSON *crit = member(h, "crit", &dup);
    const char *err = NULL;
    if (dup)
        err = "bad_header";
    else if (!cJSON_IsString(alg) || strcmp(alg->valuestring, "HS256") != 0 || crit)
        err = "unsupported_alg"; /* crit names extensions we would have to understand */
    else if (typ && (!cJSON_IsString(typ) || strcasecmp(typ->valuestring, "JWT") != 0))
        err = "bad_header";
    cJSON_Delete(h);
    return err;
}

/* ---- Claims ---------------------------------------------------------------------------------- */

static bool subject_valid(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > PL_JWT_MAX_SUB_LEN || !pl_utf8_valid((const uint8_t *)s, len))
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7F)
            return false;
        /* C1 controls U+0080..U+009F */
        if (ch == 0xC2 && i + 1 < len && (unsigned char)s[i + 1] <= 0x9F)
            return false;
    }
    return true;
}

static bool topic_pattern_valid(const char *s)
{
    size_t len = strlen(s);
    if (len > 0 && s[len - 1] == '*') {
        len--;
        if (len == 0)
            return true; /* "*": every topic */
    }
    return pl_topic_name_valid(s, len);
}

/* A NumericDate (RFC 7519 §2): a non-negative number of seconds, maybe fractional. A fraction is
 * rounded towards the stricter outcome: exp down, nbf up. */
static bool date_value(const cJSON *item, bool round_up, int64_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double v = item->valuedouble;
    if (!(v >= 0 && v <= MAX_DATE)) /* also refuses NaN and infinities */
        return false;
    int64_t whole = (int64_t)v; /* v >= 0: truncation is floor (and libm is not linked) */
    *out = round_up && (double)whole < v ? whole + 1 : whole;
    return true;
}

static int64_t add_saturated(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

static const char *take_claims(const cJSON *p, int64_t now, int64_t leeway, pl_jwt_claims *out)
{
    bool dup = false, has_exp = false, has_nbf = false;
    const cJSON *sub = member(p, "sub", &dup);
    const cJSON *exp = member(p, "exp", &dup);
    const cJSON *nbf = member(p, "nbf", &dup);
    const cJSON *topics = member(p, "topics", &dup);
    if (dup)
        return "bad_claims";
    if (exp && !(has_exp = date_value(exp, false, &out->exp)))
        return "bad_claims";
    if (nbf && !(has_nbf = date_value(nbf, true, &out->nbf)))
        return "bad_claims";
    if (sub && (!cJSON_IsString(sub) || !subject_valid(sub->valuestring)))
        return "bad_claims";
    size_t ntopics = 0;
    if (topics) {
        if (!cJSON_IsArray(topics))
            return "bad_claims";
        for (const cJSON *t = topics->child; t; t = t->next, ntopics++)
            if (!cJSON_IsString(t) || !topic_pattern_valid(t->valuestring))
                return "bad_claims";
    }
    if (has_exp && now >= add_saturated(out->exp, leeway))
        return "expired";
    if (has_nbf && now < out->nbf - leeway)
        return "not_yet_valid";

    if (sub && !(out->sub = strdup(sub->valuestring)))
        return "out_of_memory";
    if (topics) {
        out->topics = calloc(ntopics ? ntopics : 1, sizeof(*out->topics));
        if (!out->topics)
            return "out_of_memory";
        for (const cJSON *t = topics->child; t; t = t->next) {
            if (!(out->topics[out->ntopics] = strdup(t->valuestring)))
                return "out_of_memory";
            out->ntopics++;
        }
    }
    return NULL;
}

/* ---- Verification ---------------------------------------------------------------------------- */

static const char *verify(const char *token, size_t len, const uint8_t *secret, size_t secret_len,
                          int64_t now, int64_t leeway, pl_jwt_claims *out)
{
    if (len == 0 || len > PL_JWT_MAX_LEN)
        return "malformed";
    const char *dot1 = memchr(token, '.', len);
    if (!dot1)
        return "malformed";
    const char *payload = dot1 + 1;
    const char *dot2 = memchr(payload, '.', len - (size_t)(payload - token));
    if (!dot2)
        return "malformed";
    const char *sig = dot2 + 1;
    size_t header_len = (size_t)(dot1 - token), payload_len = (size_t)(dot2 - payload);
    size_t sig_len = len - (size_t)(sig - token);
    /* A third dot is not in the base64url alphabet: the signature's decoding refuses it. An empty
     * signature is well formed (unsecured tokens have one) and refused below as alg "none". */
    if (header_len == 0 || payload_len == 0 || b64url_decode(token, header_len, NULL) != 0 ||
        b64url_decode(payload, payload_len, NULL) != 0 || b64url_decode(sig, sig_len, NULL) != 0)
        return "malformed";

    size_t hlen;
    uint8_t *header = b64url_decode_alloc(token, header_len, &hlen);
    if (!header)
        return "out_of_memory";
    const char *err = check_header(header, hlen);
    free(header);
    if (err)
        return err;

    /* Unlike the other parts the signature has a fixed length; it is compared in constant time
     * so its bytes cannot be found one by one from response times. */
    uint8_t given[SIG_LEN], mac[SIG_LEN];
    unsigned int mac_len = 0;
    if (b64url_decoded_len(sig_len) != SIG_LEN || secret_len == 0 || secret_len > INT_MAX)
        return "bad_signature";
    b64url_decode(sig, sig_len, given);
    if (!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)token,
              (size_t)(dot2 - token), mac, &mac_len) ||
        mac_len != SIG_LEN || CRYPTO_memcmp(mac, given, SIG_LEN) != 0)
        return "bad_signature";

    size_t plen;
    uint8_t *pbytes = b64url_decode_alloc(payload, payload_len, &plen);
    if (!pbytes)
        return "out_of_memory";
    cJSON *claims = parse_object(pbytes, plen);
    free(pbytes);
    if (!claims)
        return "bad_claims";
    err = take_claims(claims, now, leeway, out);
    cJSON_Delete(claims);
    return err;
}

int pl_jwt_verify(const char *token, size_t len, const uint8_t *secret, size_t secret_len,
                  int64_t now, int64_t leeway, pl_jwt_claims *out, const char **err)
{
    assert((token || len == 0) && (secret || secret_len == 0) && out && err);
    assert(leeway >= 0);
    memset(out, 0, sizeof(*out));
    const char *reason = verify(token, len, secret, secret_len, now, leeway > 0 ? leeway : 0, out);
    if (reason) {
        pl_jwt_claims_free(out);
        *err = reason;
        return -1;
    }
    return 0;
}

void pl_jwt_claims_free(pl_jwt_claims *c)
{
    if (!c)
        return;
    free(c->sub);
    for (size_t i = 0; i < c->ntopics; i++)
        free(c->topics[i]);
    free(c->topics);
    memset(c, 0, sizeof(*c));
}

bool pl_jwt_topic_allowed(const pl_jwt_claims *c, const char *topic, size_t len)
{
    if (!c->topics)
        return true;
    for (size_t i = 0; i < c->ntopics; i++) {
        const char *p = c->topics[i];
        size_t plen = strlen(p);
        if (plen > 0 && p[plen - 1] == '*') {
            if (len >= plen - 1 && memcmp(topic, p, plen - 1) == 0)
                return true;
        } else if (plen == len && memcmp(topic, p, len) == 0) {
            return true;
        }
    }
    return false;
}
