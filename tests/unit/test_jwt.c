/* JWT verification (jwt.c). Tokens are built here, with OpenSSL's HMAC and a base64url encoder of
 * the test's own, plus one from RFC 7515 so the encoder is not only checked against itself. Each
 * token is verified from its own allocation without a terminating NUL, so ASan catches a read
 * past it. */
#include "jwt.h"

#include <criterion/criterion.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOW INT64_C(1700000000)

static const uint8_t secret[] = "0123456789abcdef0123456789abcdef";
#define SECRET_LEN (sizeof(secret) - 1)

/* ---- Building tokens ------------------------------------------------------------------------ */

static char *b64url(const void *data, size_t len)
{
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const uint8_t *d = data;
    char *out = malloc(len / 3 * 4 + 4);
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
        out[o++] = abc[v >> 18];
        out[o++] = abc[(v >> 12) & 63];
        out[o++] = abc[(v >> 6) & 63];
        out[o++] = abc[v & 63];
    }
    if (len - i == 1) {
        out[o++] = abc[d[i] >> 2];
        out[o++] = abc[(d[i] & 3) << 4];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)d[i] << 8 | d[i + 1];
        out[o++] = abc[v >> 10];
        out[o++] = abc[(v >> 4) & 63];
        out[o++] = abc[(v & 15) << 2];
    }
    out[o] = '\0';
    return out;
}

/* Decodes well-formed base64url (for the RFC's key); returns the length. */
static size_t b64url_decode(const char *s, uint8_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (; *s; s++) {
        const char *abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        acc = acc << 6 | (uint32_t)(strchr(abc, *s) - abc);
        if ((bits += 6) >= 8)
            out[o++] = (uint8_t)(acc >> (bits -= 8));
    }
    return o;
}

static void mac_of(const char *h64, const char *p64, const uint8_t *key, size_t key_len,
                   uint8_t mac[32])
{
    char input[16384];
    int n = snprintf(input, sizeof(input), "%s.%s", h64, p64);
    cr_assert(n > 0 && (size_t)n < sizeof(input));
    unsigned int mac_len = 0;
    cr_assert_not_null(HMAC(EVP_sha256(), key_len ? key : (const uint8_t *)"", (int)key_len,
                            (const uint8_t *)input, (size_t)n, mac, &mac_len));
    cr_assert_eq(mac_len, 32);
}

static char *join(const char *h64, const char *p64, const char *s64)
{
    size_t n = strlen(h64) + strlen(p64) + strlen(s64) + 3;
    char *t = malloc(n);
    snprintf(t, n, "%s.%s.%s", h64, p64, s64);
    return t;
}

/* header.payload signed with `key`; the JSON texts are taken as raw bytes. */
static char *make_with(const char *header, size_t hlen, const char *payload, size_t plen,
                       const uint8_t *key, size_t key_len)
{
    char *h64 = b64url(header, hlen), *p64 = b64url(payload, plen);
    uint8_t mac[32];
    mac_of(h64, p64, key, key_len, mac);
    char *s64 = b64url(mac, sizeof(mac));
    char *t = join(h64, p64, s64);
    free(h64);
    free(p64);
    free(s64);
    return t;
}

static char *make(const char *header, const char *payload)
{
    return make_with(header, strlen(header), payload, strlen(payload), secret, SECRET_LEN);
}

static char *make_hs256(const char *payload)
{
    return make("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", payload);
}

/* ---- Verifying --------------------------------------------------------------------------------
 */

static int verify_ex(const char *token, size_t len, const uint8_t *key, size_t key_len, int64_t now,
                     int64_t leeway, pl_jwt_claims *c, const char **err)
{
    char *copy = malloc(len ? len : 1); /* no NUL after it: over-reads are caught */
    memcpy(copy, token, len);
    *err = NULL;
    int rc = pl_jwt_verify(copy, len, key, key_len, now, leeway, c, err);
    free(copy);
    if (rc != 0) {
        cr_assert_eq(rc, -1);
        cr_assert_not_null(*err);
        cr_assert(c->sub == NULL && c->topics == NULL && c->ntopics == 0 && c->exp == 0 &&
                      c->nbf == 0,
                  "a failure leaves the claims empty");
    }
    return rc;
}

static int verify(const char *token, pl_jwt_claims *c, const char **err)
{
    return verify_ex(token, strlen(token), secret, SECRET_LEN, NOW, 0, c, err);
}

static void expect_ok(const char *token)
{
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify(token, &c, &err), 0, "refused (%s): %s", err, token);
    pl_jwt_claims_free(&c);
}

static void expect_fail_at(const char *token, int64_t now, int64_t leeway, const char *reason)
{
    pl_jwt_claims c;
    const char *err;
    int rc = verify_ex(token, strlen(token), secret, SECRET_LEN, now, leeway, &c, &err);
    cr_assert_eq(rc, -1, "accepted: %s", token);
    cr_assert_str_eq(err, reason, "%s", token);
}

static void expect_fail(const char *token, const char *reason)
{
    expect_fail_at(token, NOW, 0, reason);
}

/* Signs `payload` under a plain HS256 header and expects `reason` (NULL: success). */
static void expect_claims(const char *payload, const char *reason)
{
    char *t = make_hs256(payload);
    if (reason)
        expect_fail(t, reason);
    else
        expect_ok(t);
    free(t);
}

/* ---- Tests ------------------------------------------------------------------------------------
 */

Test(jwt, valid_token)
{
    char *t = make("{\"typ\":\"jwt\",\"alg\":\"HS256\",\"kid\":\"k1\"}",
                   "{\"sub\":\"alice\",\"exp\":1700000100,\"nbf\":1699999900,\"iat\":1699999900,"
                   "\"iss\":\"me\",\"aud\":[\"x\"],\"topics\":[\"chat/*\",\"news\"]}");
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert_str_eq(c.sub, "alice");
    cr_assert_eq(c.exp, 1700000100);
    cr_assert_eq(c.nbf, 1699999900);
    cr_assert_eq(c.ntopics, 2);
    cr_assert_str_eq(c.topics[0], "chat/*");
    cr_assert_str_eq(c.topics[1], "news");
    pl_jwt_claims_free(&c);
    cr_assert(c.sub == NULL && c.topics == NULL && c.ntopics == 0, "free zeroes");
    pl_jwt_claims_free(&c);
    pl_jwt_claims_free(NULL);
    free(t);

    t = make("{\"alg\":\"HS256\"}", "{}"); /* typ is optional; no claim at all */
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert(c.sub == NULL && c.topics == NULL && c.exp == 0 && c.nbf == 0);
    free(t);
    /* JSON whitespace around the objects is fine. */
    t = make(" {\"alg\" : \"HS256\"}\r\n", "\t{ \"sub\" : \"bob\" } ");
    expect_ok(t);
    free(t);
}

Test(jwt, rfc7515_appendix_a1)
{
    static const char token[] =
        "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
        ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0"
        "cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    uint8_t key[128];
    size_t key_len = b64url_decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj"
                                   "0iPS4hcgUuTwjAzZr1Z9CAow",
                                   key);
    cr_assert_eq(key_len, 64);
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify_ex(token, strlen(token), key, key_len, 1300819379, 0, &c, &err), 0, "%s",
                 err);
    cr_assert_eq(c.exp, 1300819380);
    pl_jwt_claims_free(&c);
    cr_assert_eq(verify_ex(token, strlen(token), key, key_len, 1300819380, 0, &c, &err), -1);
    cr_assert_str_eq(err, "expired");
    cr_assert_eq(verify_ex(token, strlen(token), secret, SECRET_LEN, 1300819379, 0, &c, &err), -1);
    cr_assert_str_eq(err, "bad_signature");
}

Test(jwt, expired)
{
    char *t = make_hs256("{\"exp\":1700000000}");
    expect_fail_at(t, NOW, 0, "expired");
    expect_fail_at(t, INT64_MAX, 0, "expired");
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, NOW - 1, 0, &c, &err), 0);
    pl_jwt_claims_free(&c);
    free(t);
    expect_claims("{\"exp\":0}", "expired"); /* present, even though 0 reads as absent after */
}

Test(jwt, not_yet_valid)
{
    char *t = make_hs256("{\"nbf\":1700000001}");
    expect_fail_at(t, NOW, 0, "not_yet_valid");
    expect_fail_at(t, INT64_MIN, 0, "not_yet_valid");
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, NOW + 1, 0, &c, &err), 0);
    cr_assert_eq(c.nbf, NOW + 1);
    pl_jwt_claims_free(&c);
    free(t);
    /* Both bounds: a token valid for [nbf, exp). */
    t = make_hs256("{\"nbf\":100,\"exp\":200}");
    expect_fail_at(t, 99, 0, "not_yet_valid");
    expect_fail_at(t, 200, 0, "expired");
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, 150, 0, &c, &err), 0);
    free(t);
}

Test(jwt, leeway)
{
    pl_jwt_claims c;
    const char *err;
    char *t = make_hs256("{\"exp\":1000,\"nbf\":900}");
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, 1029, 30, &c, &err), 0);
    expect_fail_at(t, 1030, 30, "expired");
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, 870, 30, &c, &err), 0);
    expect_fail_at(t, 869, 30, "not_yet_valid");
    /* A huge leeway saturates instead of overflowing. */
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, INT64_MAX - 1, INT64_MAX, &c, &err),
                 0);
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, 0, INT64_MAX, &c, &err), 0);
    free(t);
    /* Fractional dates round towards the stricter side: exp down, nbf up. */
    t = make_hs256("{\"exp\":1000.5,\"nbf\":900.5}");
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN, 999, 0, &c, &err), 0);
    cr_assert_eq(c.exp, 1000);
    cr_assert_eq(c.nbf, 901);
    pl_jwt_claims_free(&c);
    expect_fail_at(t, 1000, 0, "expired");
    expect_fail_at(t, 900, 0, "not_yet_valid");
    free(t);
}

/* Any change to any bit of the token's text is refused; changes that keep every part well formed
 * are refused as bad signatures. */
Test(jwt, one_flipped_bit_in_each_part)
{
    static const char header[] = "{\"alg\":\"HS256\",\"kid\":\"key-one\"}";
    static const char payload[] = "{\"sub\":\"alice\",\"topics\":[\"chat/*\"]}";
    char *t = make(header, payload);
    expect_ok(t);
    size_t len = strlen(t);
    pl_jwt_claims c;
    const char *err;
    for (size_t i = 0; i < len; i++) {
        for (int b = 0; b < 8; b++) {
            char *f = strdup(t);
            f[i] = (char)(f[i] ^ (1 << b));
            cr_assert_eq(verify_ex(f, len, secret, SECRET_LEN, NOW, 0, &c, &err), -1,
                         "text bit %d of byte %zu", b, i);
            free(f);
        }
    }

    char *h64 = b64url(header, strlen(header)), *p64 = b64url(payload, strlen(payload));
    uint8_t mac[32];
    mac_of(h64, p64, secret, SECRET_LEN, mac);
    char *s64 = b64url(mac, sizeof(mac));
    /* Header: bits of the kid value that leave it a printable ASCII string. */
    const char *kid = strstr(header, "key-one");
    for (size_t i = (size_t)(kid - header); i < (size_t)(kid - header) + 7; i++) {
        for (int b = 0; b < 7; b++) {
            char h[sizeof(header)];
            memcpy(h, header, sizeof(header));
            h[i] = (char)(h[i] ^ (1 << b));
            if (h[i] < 0x20 || h[i] == '"' || h[i] == '\\' || h[i] == 0x7F)
                continue;
            char *h2 = b64url(h, strlen(h));
            char *f = join(h2, p64, s64);
            expect_fail(f, "bad_signature");
            free(f);
            free(h2);
        }
    }
    /* Payload: every bit (it is not even parsed before the signature checks out). */
    for (size_t i = 0; i < strlen(payload); i++) {
        for (int b = 0; b < 8; b++) {
            char p[sizeof(payload)];
            memcpy(p, payload, sizeof(payload));
            p[i] = (char)(p[i] ^ (1 << b));
            char *p2 = b64url(p, strlen(payload));
            char *f = join(h64, p2, s64);
            expect_fail(f, "bad_signature");
            free(f);
            free(p2);
        }
    }
    /* Signature: every bit. */
    for (size_t i = 0; i < sizeof(mac); i++) {
        for (int b = 0; b < 8; b++) {
            uint8_t m[32];
            memcpy(m, mac, sizeof(m));
            m[i] ^= (uint8_t)(1 << b);
            char *s2 = b64url(m, sizeof(m));
            char *f = join(h64, p64, s2);
            expect_fail(f, "bad_signature");
            free(f);
            free(s2);
        }
    }
    /* A signature one byte short or long. */
    char *s31 = b64url(mac, 31), *f = join(h64, p64, s31);
    expect_fail(f, "bad_signature");
    free(f);
    free(s31);
    uint8_t m33[33] = {0};
    memcpy(m33, mac, 32);
    char *s33 = b64url(m33, 33);
    f = join(h64, p64, s33);
    expect_fail(f, "bad_signature");
    free(f);
    free(s33);
    free(h64);
    free(p64);
    free(s64);
    free(t);
}

Test(jwt, wrong_secret)
{
    static const uint8_t other[] = "0123456789abcdef0123456789abcdeF";
    char *t = make_hs256("{\"sub\":\"alice\"}");
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify_ex(t, strlen(t), other, sizeof(other) - 1, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "bad_signature");
    cr_assert_eq(verify_ex(t, strlen(t), secret, SECRET_LEN - 1, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "bad_signature");
    cr_assert_eq(verify_ex(t, strlen(t), secret, 0, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "bad_signature");
    free(t);
    /* A token signed with an empty key does not verify under an empty secret either. */
    static const char h[] = "{\"alg\":\"HS256\"}", p[] = "{}";
    t = make_with(h, strlen(h), p, strlen(p), NULL, 0);
    cr_assert_eq(verify_ex(t, strlen(t), NULL, 0, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "bad_signature");
    free(t);
}

Test(jwt, alg_none)
{
    static const char *headers[] = {"{\"alg\":\"none\"}", "{\"alg\":\"none\",\"typ\":\"JWT\"}",
                                    "{\"alg\":\"None\"}", "{\"alg\":\"NONE\"}"};
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        /* Unsecured: an empty signature. */
        char *h64 = b64url(headers[i], strlen(headers[i])), *p64 = b64url("{\"sub\":\"x\"}", 11);
        char *t = join(h64, p64, "");
        expect_fail(t, "unsupported_alg");
        free(t);
        /* With a signature that would verify as HS256. */
        t = make(headers[i], "{\"sub\":\"x\"}");
        expect_fail(t, "unsupported_alg");
        free(t);
        free(h64);
        free(p64);
    }
}

Test(jwt, other_algorithms)
{
    static const char *headers[] = {
        "{\"alg\":\"RS256\"}",
        "{\"alg\":\"HS384\"}",
        "{\"alg\":\"HS512\"}",
        "{\"alg\":\"ES256\"}",
        "{\"alg\":\"hs256\"}",
        "{\"alg\":\"HS256 \"}",
        "{\"alg\":\"\"}",
        "{}",
        "{\"typ\":\"JWT\"}",
        "{\"ALG\":\"HS256\"}",
        "{\"alg\":256}",
        "{\"alg\":null}",
        "{\"alg\":[\"HS256\"]}",
        "{\"alg\":\"HS256\",\"crit\":[\"exp\"]}",
        "{\"alg\":\"HS256\",\"crit\":[]}",
        "{\"alg\":\"HS2\\u0035\\u0036x\"}",
    };
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        char *t = make(headers[i], "{}");
        expect_fail(t, "unsupported_alg");
        free(t);
    }
    char *t = make("{\"alg\":\"HS2\\u0035\\u0036\"}", "{}"); /* escapes are JSON, not tricks */
    expect_ok(t);
    free(t);
}

Test(jwt, bad_header)
{
    static const char *headers[] = {
        "",
        "not json",
        "[\"HS256\"]",
        "\"HS256\"",
        "null",
        "{\"alg\":\"HS256\"",
        "{\"alg\":\"HS256\"}x",
        "{\"alg\":\"HS256\"}{}",
        "{\"alg\":\"HS256\",\"typ\":\"JOSE\"}",
        "{\"alg\":\"HS256\",\"typ\":\"JWT \"}",
        "{\"alg\":\"HS256\",\"typ\":1}",
        "{\"alg\":\"HS256\",\"typ\":null}",
        "{\"alg\":\"HS256\",\"alg\":\"HS256\"}",
        "{\"alg\":\"HS256\",\"alg\":\"none\"}",
        "{\"alg\":\"HS256\",\"typ\":\"JWT\",\"typ\":\"x\"}",
        "{\"alg\":\"HS256\",\"kid\":\"a\\u0000b\"}",
        "\xef\xbb\xbf{\"alg\":\"HS256\"}", /* cJSON alone would skip a BOM */
        "\x01{\"alg\":\"HS256\"}",         /* and control characters */
        "{\"alg\":\"HS256\"}\x01",
    };
    for (size_t i = 0; i < sizeof(headers) / sizeof(headers[0]); i++) {
        char *t = make(headers[i], "{}");
        expect_fail(t, strlen(headers[i]) ? "bad_header" : "malformed");
        free(t);
    }
    /* A raw NUL would end the string inside cJSON. */
    static const char nul[] = "{\"alg\":\"HS256\",\"kid\":\"a\0b\"}";
    char *t = make_with(nul, sizeof(nul) - 1, "{}", 2, secret, SECRET_LEN);
    expect_fail(t, "bad_header");
    free(t);
}

Test(jwt, tampered_payload_keeps_the_original_signature)
{
    char *good = make_hs256("{\"sub\":\"alice\",\"topics\":[\"chat/alice\"]}");
    char *evil = make_hs256("{\"sub\":\"admin\",\"topics\":[\"*\"]}");
    char *dot1 = strchr(good, '.'), *dot2 = strrchr(good, '.');
    char *edot1 = strchr(evil, '.'), *edot2 = strrchr(evil, '.');
    char forged[512];
    snprintf(forged, sizeof(forged), "%.*s.%.*s%s", (int)(dot1 - good), good,
             (int)(edot2 - edot1 - 1), edot1 + 1, dot2);
    expect_ok(good);
    expect_ok(evil);
    expect_fail(forged, "bad_signature");
    free(good);
    free(evil);
}

Test(jwt, malformed)
{
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *t = make_hs256("{\"sub\":\"alice\"}");
    char *dot1 = strchr(t, '.'), *dot2 = strrchr(t, '.');
    int hl = (int)(dot1 - t), pl = (int)(dot2 - dot1 - 1);
    const char *h = t, *p = dot1 + 1, *s = dot2 + 1;
    cr_assert_eq(strlen(s), 43);
    /* The last digit of 32 bytes holds 4 bits: setting one of the 2 unused bits gives another
     * text for the same bytes, which strict decoding refuses. */
    int last = (int)(strchr(abc, s[42]) - abc);
    cr_assert_eq(last & 3, 0);
    char noncanon = abc[last | 1];
    struct {
        char text[512];
        const char *reason;
    } cases[64];
    int n = 0;
#define CASE(r, ...)                                                                               \
    do {                                                                                           \
        snprintf(cases[n].text, sizeof(cases[n].text), __VA_ARGS__);                               \
        cases[n++].reason = r;                                                                     \
    } while (0)
    CASE("malformed", "%s", "");
    CASE("malformed", "%s", ".");
    CASE("malformed", "%s", "..");
    CASE("malformed", "%s", "...");
    CASE("malformed", "%.*s", hl, h);                         /* one part */
    CASE("malformed", "%.*s.%.*s", hl, h, pl, p);             /* two parts */
    CASE("malformed", "%.*s.%.*s.%s.", hl, h, pl, p, s);      /* trailing dot */
    CASE("malformed", "%.*s.%.*s.%s.%s", hl, h, pl, p, s, s); /* four parts */
    CASE("malformed", "%.*s.%.*s..%s", hl, h, pl, p, s);      /* an empty part in between */
    CASE("malformed", ".%.*s.%s", pl, p, s);                  /* empty header */
    CASE("malformed", "%.*s..%s", hl, h, s);                  /* empty payload */
    CASE("malformed", "%.*s.%.*s.%s=", hl, h, pl, p, s);      /* padding */
    CASE("malformed", "%.*s=.%.*s.%s", hl, h, pl, p, s);      /* */
    CASE("malformed", "%.*s.%.*s==.%s", hl, h, pl, p, s);     /* */
    CASE("malformed", "%.*s+.%.*s.%s", hl, h, pl, p, s);      /* standard base64's alphabet */
    CASE("malformed", "%.*s.%.*s/.%s", hl, h, pl, p, s);      /* */
    CASE("malformed", "%.*s.%.*s.%.42s+", hl, h, pl, p, s);   /* */
    CASE("malformed", "%.*s.%.*s.%.42s/", hl, h, pl, p, s);   /* */
    CASE("malformed", "%.*s.%.*s.%.42s!", hl, h, pl, p, s);   /* not base64 at all */
    CASE("malformed", "%.*s.%.*s.%.42s\xc3\xa9", hl, h, pl, p, s);
    CASE("malformed", " %.*s.%.*s.%s", hl, h, pl, p, s);       /* whitespace */
    CASE("malformed", "%.*s.%.*s.%s ", hl, h, pl, p, s);       /* */
    CASE("malformed", "%.*s.%.*s.%s\n", hl, h, pl, p, s);      /* */
    CASE("malformed", "%.*s .%.*s.%s", hl, h, pl, p, s);       /* */
    CASE("malformed", "Bearer %.*s.%.*s.%s", hl, h, pl, p, s); /* */
    CASE("malformed", "%.*s.%.*s.%sAA", hl, h, pl, p, s);      /* 45 digits: 4k+1 */
    CASE("malformed", "%.*s.%.*sA.%s", hl, h, pl, p, s);       /* 21 digits */
    CASE("malformed", "%.*s.%.*s.%.42s%c", hl, h, pl, p, s, noncanon);
    CASE("bad_signature", "%.*s.%.*s.%sA", hl, h, pl, p, s); /* 44 digits: 33 bytes */
    CASE("bad_signature", "%.*s.%.*s.%.40s", hl, h, pl, p, s);
    CASE("bad_signature", "%.*s.%.*s.", hl, h, pl, p);
#undef CASE
    cr_assert_eq(pl_jwt_verify("", 0, secret, SECRET_LEN, NOW, 0, &(pl_jwt_claims){0},
                               &(const char *){NULL}),
                 -1);
    pl_jwt_claims c;
    const char *err;
    for (int i = 0; i < n; i++) {
        cr_assert_eq(verify(cases[i].text, &c, &err), -1, "accepted \"%s\"", cases[i].text);
        cr_assert_str_eq(err, cases[i].reason, "\"%s\"", cases[i].text);
    }
    /* A NUL inside the given length; one byte short of the token. */
    size_t tl = strlen(t);
    cr_assert_eq(verify_ex(t, tl + 1, secret, SECRET_LEN, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "malformed");
    cr_assert_eq(verify_ex(t, tl - 1, secret, SECRET_LEN, NOW, 0, &c, &err), -1);
    cr_assert_eq(verify_ex(t, tl, secret, SECRET_LEN, NOW, 0, &c, &err), 0);
    pl_jwt_claims_free(&c);
    free(t);
}

Test(jwt, length_bound)
{
    /* Grow a claim until the token passes PL_JWT_MAX_LEN: accepted up to it, malformed after. */
    char *pad = malloc(PL_JWT_MAX_LEN);
    bool saw_max = false, saw_over = false;
    for (size_t k = 6000; k < 6200; k++) {
        memset(pad, 'x', k);
        pad[k] = '\0';
        char payload[PL_JWT_MAX_LEN];
        snprintf(payload, sizeof(payload), "{\"pad\":\"%s\"}", pad);
        char *t = make_hs256(payload);
        size_t len = strlen(t);
        if (len <= PL_JWT_MAX_LEN) {
            expect_ok(t);
            saw_max |= len >= PL_JWT_MAX_LEN - 3;
        } else {
            expect_fail(t, "malformed");
            saw_over = true;
        }
        free(t);
    }
    cr_assert(saw_max && saw_over);
    /* Huge input, of any content. */
    size_t huge = 1 << 20;
    char *big = malloc(huge);
    memset(big, 'A', huge);
    pl_jwt_claims c;
    const char *err;
    cr_assert_eq(verify_ex(big, huge, secret, SECRET_LEN, NOW, 0, &c, &err), -1);
    cr_assert_str_eq(err, "malformed");
    free(big);
    free(pad);
}

Test(jwt, subject)
{
    pl_jwt_claims c;
    const char *err;
    char *t = make_hs256("{\"sub\":\"J\\u00fcrgen \\ud83d\\ude00 \\\"q\\\" \\/\"}");
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert_str_eq(c.sub, "J\xc3\xbcrgen \xf0\x9f\x98\x80 \"q\" /");
    pl_jwt_claims_free(&c);
    free(t);
    t = make_hs256("{\"sub\":\"J\xc3\xbcrgen\"}"); /* raw UTF-8 */
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert_str_eq(c.sub, "J\xc3\xbcrgen");
    pl_jwt_claims_free(&c);
    free(t);

    char payload[1024], s[300];
    memset(s, 's', 256);
    s[256] = '\0';
    snprintf(payload, sizeof(payload), "{\"sub\":\"%s\"}", s);
    t = make_hs256(payload);
    cr_assert_eq(verify(t, &c, &err), 0, "256 bytes: %s", err);
    cr_assert_eq(strlen(c.sub), 256);
    pl_jwt_claims_free(&c);
    free(t);
    snprintf(payload, sizeof(payload), "{\"sub\":\"%ss\"}", s);
    expect_claims(payload, "bad_claims");

    static const char *bad[] = {
        "{\"sub\":\"\"}",
        "{\"sub\":5}",
        "{\"sub\":null}",
        "{\"sub\":[\"alice\"]}",
        "{\"sub\":{}}",
        "{\"sub\":true}",
        "{\"sub\":\"a\\u0000b\"}",
        "{\"sub\":\"a\\nb\"}",
        "{\"sub\":\"a\\u0001b\"}",
        "{\"sub\":\"a\\u007fb\"}",
        "{\"sub\":\"a\\u0085b\"}",     /* C1 control */
        "{\"sub\":\"a\\ud800b\"}",     /* lone surrogate */
        "{\"sub\":\"a\\udc00b\"}",     /* */
        "{\"sub\":\"a\tb\"}",          /* raw control character */
        "{\"sub\":\"a\xffz\"}",        /* not UTF-8 */
        "{\"sub\":\"a\xc0\xaf\"}",     /* overlong */
        "{\"sub\":\"a\xed\xa0\x80\"}", /* encoded surrogate */
        "{\"sub\":\"a\xc3\"}",         /* truncated sequence */
        "{\"sub\":\"a\",\"sub\":\"b\"}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_claims(bad[i], "bad_claims");
    /* "\\u0000" is a backslash and "u0000", not a NUL. */
    t = make_hs256("{\"sub\":\"a\\\\u0000\"}");
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert_str_eq(c.sub, "a\\u0000");
    pl_jwt_claims_free(&c);
    free(t);
    /* NUL elsewhere in the payload: cJSON would cut a key or a string short. */
    static const char raw_nul[] = "{\"sub\":\"alice\",\"x\":\"\0\"}";
    t = make_with("{\"alg\":\"HS256\"}", 15, raw_nul, sizeof(raw_nul) - 1, secret, SECRET_LEN);
    expect_fail(t, "bad_claims");
    free(t);
    expect_claims("{\"sub\\u0000x\":\"root\",\"sub\":\"alice\"}", "bad_claims");
}

Test(jwt, topics)
{
    pl_jwt_claims c;
    const char *err;
    char *t = make_hs256("{\"topics\":[\"news\",\"chat/*\",\"user.42.*\",\"a\"]}");
    cr_assert_eq(verify(t, &c, &err), 0, "%s", err);
    cr_assert_eq(c.ntopics, 4);
#define ALLOWED(s) pl_jwt_topic_allowed(&c, s, strlen(s))
    cr_assert(ALLOWED("news"));
    cr_assert(!ALLOWED("news2"));
    cr_assert(!ALLOWED("new"));
    cr_assert(!ALLOWED("News"));
    cr_assert(ALLOWED("chat/"));
    cr_assert(ALLOWED("chat/room1"));
    cr_assert(ALLOWED("chat/a/b"));
    cr_assert(!ALLOWED("chat"));
    cr_assert(!ALLOWED("chatroom"));
    cr_assert(ALLOWED("user.42.x"));
    cr_assert(!ALLOWED("user.420"));
    cr_assert(ALLOWED("a"));
    cr_assert(!ALLOWED("ab"));
    cr_assert(!ALLOWED(""));
    cr_assert(!pl_jwt_topic_allowed(&c, "newsroom", 5), "only `len` bytes count");
    cr_assert(pl_jwt_topic_allowed(&c, "newsroom", 4));
    pl_jwt_claims_free(&c);
    free(t);

    /* Absent: every topic; empty: none; "*": every topic. */
    t = make_hs256("{\"sub\":\"x\"}");
    cr_assert_eq(verify(t, &c, &err), 0);
    cr_assert_null(c.topics);
    cr_assert(ALLOWED("anything"));
    pl_jwt_claims_free(&c);
    free(t);
    t = make_hs256("{\"topics\":[]}");
    cr_assert_eq(verify(t, &c, &err), 0);
    cr_assert_not_null(c.topics);
    cr_assert_eq(c.ntopics, 0);
    cr_assert(!ALLOWED("anything"));
    pl_jwt_claims_free(&c);
    free(t);
    t = make_hs256("{\"topics\":[\"*\"]}");
    cr_assert_eq(verify(t, &c, &err), 0);
    cr_assert(ALLOWED("anything"));
    pl_jwt_claims_free(&c);
    free(t);
#undef ALLOWED

    static const char *bad[] = {
        "{\"topics\":\"news\"}",
        "{\"topics\":null}",
        "{\"topics\":{}}",
        "{\"topics\":[1]}",
        "{\"topics\":[\"news\",null]}",
        "{\"topics\":[[\"news\"]]}",
        "{\"topics\":[\"\"]}",
        "{\"topics\":[\"a b\"]}",
        "{\"topics\":[\"**\"]}",
        "{\"topics\":[\"a*b\"]}",
        "{\"topics\":[\"*a\"]}",
        "{\"topics\":[\"chat/**\"]}",
        "{\"topics\":[\"caf\xc3\xa9\"]}",
        "{\"topics\":[\"a\\u0000b\"]}",
        "{\"topics\":[\"a\\nb\"]}",
        "{\"topics\":[],\"topics\":[\"x\"]}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_claims(bad[i], "bad_claims");
    /* 128 bytes is the longest topic name, with or without the '*'. */
    char payload[512], name[200];
    memset(name, 'n', 128);
    name[128] = '\0';
    snprintf(payload, sizeof(payload), "{\"topics\":[\"%s\",\"%s*\"]}", name, name);
    expect_claims(payload, NULL);
    snprintf(payload, sizeof(payload), "{\"topics\":[\"%sn\"]}", name);
    expect_claims(payload, "bad_claims");
}

Test(jwt, payload_not_an_object)
{
    static const char *bad[] = {"[]",
                                "[{\"sub\":\"a\"}]",
                                "\"sub\"",
                                "1",
                                "null",
                                "true",
                                " ",
                                "{",
                                "{}x",
                                "{}{}",
                                "{]",
                                "x",
                                "{\"sub\":\"a\",}",
                                "{'sub':'a'}",
                                "\xef\xbb\xbf{}",
                                "\f{}",
                                "{}\f"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_claims(bad[i], "bad_claims");
}

Test(jwt, claim_types)
{
    static const char *bad[] = {
        "{\"exp\":\"1800000000\"}", "{\"exp\":true}", "{\"exp\":null}",
        "{\"exp\":[1800000000]}",   "{\"exp\":{}}",   "{\"exp\":-1}",
        "{\"exp\":1e300}",          "{\"exp\":1e16}", "{\"nbf\":\"0\"}",
        "{\"nbf\":false}",          "{\"nbf\":-0.5}", "{\"exp\":1800000000,\"exp\":1}",
        "{\"nbf\":1,\"nbf\":2}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_claims(bad[i], "bad_claims");
    /* A wrong claim is reported even when the token has also expired. */
    expect_claims("{\"exp\":1,\"sub\":7}", "bad_claims");
    /* Claims we do not use may have any type. */
    expect_claims("{\"iat\":\"x\",\"aud\":5,\"iss\":null,\"jti\":{},\"Sub\":1,\"EXP\":\"x\"}",
                  NULL);
    expect_claims("{\"exp\":1.8e9,\"nbf\":0}", NULL);
}
