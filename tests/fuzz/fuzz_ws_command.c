/* libFuzzer target: the WebSocket subscription command parser. Any bytes get either a valid
 * command (with a valid topic where one is needed) or an error with a machine-readable reason. */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1); /* its own allocation: over-reads are caught */
    memcpy(copy, data, size);
    pl_ws_command cmd;
    int rc = pl_ws_parse_command(copy, size, &cmd);
    if (rc == 0) {
        assert(cmd.action >= PL_WS_CMD_SUBSCRIBE && cmd.action <= PL_WS_CMD_PING);
        if (cmd.action != PL_WS_CMD_PING)
            assert(pl_topic_name_valid(cmd.topic, cmd.topic_len) &&
                   strlen(cmd.topic) == cmd.topic_len);
    } else {
        assert(rc == -1 && cmd.reason && cmd.detail);
    }
    free(copy);
    return 0;
}
