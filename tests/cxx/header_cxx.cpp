// The public header must be usable from C++: compiled as C++ with warnings as errors, linked
// against the shared library, and a broker started, published to and stopped.
#include <pushlet.h>

#include <cstdio>
#include <cstring>

int main()
{
    pushlet_t *p = nullptr;
    if (pushlet_new(&p) != PUSHLET_OK)
        return 1;
    int failures = 0;
    failures += pushlet_listen(p, "127.0.0.1", 0) != 0;
    failures += pushlet_start(p) != 0;
    failures += pushlet_port(p) <= 0;
    const char msg[] = "from C++";
    failures += pushlet_publish(p, "cxx", nullptr, msg, std::strlen(msg)) != 0;
    failures += pushlet_stop(p) != 0;
    failures += pushlet_free(p) != 0;
    std::printf("%d passed, %d failed\n", 6 - failures, failures);
    return failures ? 1 : 0;
}
