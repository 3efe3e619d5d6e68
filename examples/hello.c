/* The README's example: an embedded broker that pushes the time to SSE subscribers of "clock".
 * Build: cc hello.c $(pkg-config --cflags --libs pushlet)   Run, then:
 *   curl -N 'http://127.0.0.1:8080/events?topic=clock' */
#include <pushlet.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
    pushlet_t *p;
    if (pushlet_new(&p) != 0)
        return 1;
    pushlet_listen(p, "127.0.0.1", 8080);
    pushlet_set_heartbeat_interval(p, 15000);
    int rc = pushlet_start(p); /* the broker now runs on its own thread */
    if (rc != 0) {
        fprintf(stderr, "start: %s\n", pushlet_strerror(rc));
        return 1;
    }
    for (int i = 0; i < 60; i++) {
        char now[32];
        time_t t = time(NULL);
        size_t n = strftime(now, sizeof(now), "%H:%M:%S", localtime(&t));
        pushlet_publish(p, "clock", "tick", now, n); /* any thread; never blocks */
        sleep(1);
    }
    pushlet_free(p); /* graceful: streams end after what was queued is sent */
    return 0;
}
