/* libFuzzer target: JWT verification (jwt.c) under a fixed secret.
 *
 * 1. The input as a token. Whatever is accepted must carry a signature that this file verifies
 *    on its own (HMAC-SHA256 over "header.payload", its own base64url decoding): nothing is
 *    accepted unsigned, under another algorithm or by a parsing slip.
 * 2. When the input holds a '\n', the bytes before it as the header's JSON (empty: a plain HS256
 *    header) and the bytes after it as the payload's, signed here with the secret: that reaches
 *    the header and claims checks, which random bytes never get past the signature to.
 *
 * Accepted claims must be what the header promises; refusals must leave the claims empty. */
#include "jwt.h"

#include <assert.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t secret[] = "fuzz-secret-0123456789abcdef-xyz";
#define SECRET_LEN (sizeof(secret) - 1)
#define NOW        INT64_C(1700000000)
#define LEEWAY     30

static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static size_t encode(const uint8_t *d, size_t len, char *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        acc = acc << 8 | d[i];
        for (bits += 8; bits >= 6; bits -= 6)
            out[o++] = abc[(acc >> (bits - 6)) & 63];
    }
    if (bits > 0)
        out[o++] = abc[(acc << (6 - bits)) & 63];
    return o;
}

/* Lenient decoding (any length, ignores unused bits): only an accepted token is checked with it,
 * so this is an independent oracle, not a second copy of the strict rules. */
static bool decode(const char *s, size_t len, uint8_t *out, size_t cap, size_t *out_len)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        const char *p = memchr(abc, s[i], 64);
        if (!p)
            return false;
        acc = acc << 6 | (uint32_t)(p - abc);
        if ((bits += 6) >= 8) {
            if (o == cap)
                return false;
            out[o++] = (uint8_t)(acc >> (bits -= 8));
        }
    }
    *out_len = o;
    return true;
}

static void check_accepted(const char *token, size_t len, const pl_jwt_claims *c)
{
    const char *last = NULL;
    for (size_t i = 0; i < len; i++)
        if (token[i] == '.')
            last = token + i;
    assert(last);
    uint8_t given[64], mac[EVP_MAX_MD_SIZE];
    size_t given_len;
    unsigned int mac_len = 0;
    assert(decode(last + 1, len - (size_t)(last + 1 - token), given, sizeof(given), &given_len));
    assert(HMAC(EVP_sha256(), secret, (int)SECRET_LEN, (const uint8_t *)token,
                (size_t)(last - token), mac, &mac_len));
    assert(given_len == mac_len && CRYPTO_memcmp(given, mac, mac_len) == 0);

    assert(c->exp == 0 || NOW < c->exp + LEEWAY);
    assert(NOW >= c->nbf - LEEWAY);
    if (c->sub) {
        size_t n = strlen(c->sub);
        assert(n >= 1 && n <= PL_JWT_MAX_SUB_LEN);
        for (size_t i = 0; i < n; i++)
            assert((unsigned char)c->sub[i] >= 0x20 && c->sub[i] != 0x7F);
    }
    assert(c->topics || c->ntopics == 0);
    for (size_t i = 0; i < c->ntopics; i++) {
        const char *t = c->topics[i];
        size_t n = strlen(t);
        bool prefix = n > 0 && t[n - 1] == '*';
        assert((prefix && n == 1) || pl_topic_name_valid(t, n - prefix));
        assert(pl_jwt_topic_allowed(c, t, n - prefix)); /* a pattern allows its own prefix */
    }
    if (!c->topics)
        assert(pl_jwt_topic_allowed(c, "any", 3));
}

static void run(const char *token, size_t len)
{
    char *copy = malloc(len ? len : 1); /* its own allocation: over-reads are caught */
    memcpy(copy, token, len);
    pl_jwt_claims c;
    memset(&c, 0xAB, sizeof(c)); /* whatever was there is not trusted or freed */
    const char *err = NULL;
    int rc = pl_jwt_verify(copy, len, secret, SECRET_LEN, NOW, LEEWAY, &c, &err);
    if (rc == 0) {
        check_accepted(copy, len, &c);
    } else {
        assert(rc == -1 && err);
        static const char *const reasons[] = {"malformed",     "bad_header",   "unsupported_alg",
                                              "bad_signature", "expired",      "not_yet_valid",
                                              "bad_claims",    "out_of_memory"};
        bool known = false;
        for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
            known |= strcmp(err, reasons[i]) == 0;
        assert(known);
        assert(!c.sub && !c.topics && c.ntopics == 0 && c.exp == 0 && c.nbf == 0);
    }
    pl_jwt_claims_free(&c);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run((const char *)data, size);

    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl || size > PL_JWT_MAX_LEN)
        return 0;
    static const char plain[] = "{\"alg\":\"HS256\"}";
    const uint8_t *h = data, *p = nl + 1;
    size_t hlen = (size_t)(nl - data), plen = size - hlen - 1;
    if (hlen == 0) {
        h = (const uint8_t *)plain;
        hlen = sizeof(plain) - 1;
    }
    char *token = malloc((hlen + plen) / 3 * 4 + 8 + 2 + 44);
    size_t n = encode(h, hlen, token);
    token[n++] = '.';
    n += encode(p, plen, token + n);
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    assert(HMAC(EVP_sha256(), secret, (int)SECRET_LEN, (const uint8_t *)token, n, mac, &mac_len));
    token[n++] = '.';
    n += encode(mac, mac_len, token + n);
    run(token, n);
    free(token);
    return 0;
}
