/* libFuzzer target: what distributed mode parses from outside — pub/sub records from Redis
 * (MessagePack), Redis addresses (flags, URLs with percent-encoded credentials) and IDs.
 * A record that decodes must encode back to one that decodes to the same fields; an address
 * that parses must be NUL-terminated within its fields; nothing may read outside the input. */
#include "redis.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

static void check_record(const uint8_t *data, size_t size)
{
    char *copy = malloc(size ? size : 1); /* its own allocation: over-reads are caught */
    memcpy(copy, data, size);
    pl_redis_record rec;
    if (pl_redis_record_decode(copy, size, &rec) == 0) {
        char *again = NULL;
        size_t len = 0;
        if (pl_redis_record_encode(&rec, &again, &len) == 0) {
            pl_redis_record back;
            assert(pl_redis_record_decode(again, len, &back) == 0);
            assert(back.topic_len == rec.topic_len && back.event_len == rec.event_len &&
                   back.data_len == rec.data_len && back.seq == rec.seq &&
                   back.published_ms == rec.published_ms);
            assert(memcmp(back.data, rec.data, rec.data_len) == 0);
            assert(rec.topic_len == 0 || back.epoch == rec.epoch);
            free(again);
        }
    }
    uint64_t epoch, seq;
    (void)pl_redis_parse_id(copy, size, &epoch, &seq);
    free(copy);
}

static void check_address(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    memcpy(s, data, size);
    s[size] = '\0';
    pl_redis_addr a;
    if (pl_redis_parse_address(s, &a) == 0) {
        assert(memchr(a.host, '\0', sizeof(a.host)) && memchr(a.user, '\0', sizeof(a.user)) &&
               memchr(a.password, '\0', sizeof(a.password)));
        assert(a.is_unix || (a.port > 0 && a.port < 65536));
        assert(a.db >= -1);
    }
    free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_record(data, size);
    check_address(data, size);
    return 0;
}
