/*
 * The bench's stamper: the child at both ends of a hand-off.
 *
 *   stamp        prints clock_gettime(CLOCK_BOOTTIME) in ns as it starts, exits 0
 *   stamp hold   prints "ready <pid>", waits for SIGUSR1, then prints the time
 *                and exits 0: the time is the job's end
 *
 * Compiled by the bench (bench/stamp.py) with `cc -O2`, so no interpreter's
 * start-up is counted. CLOCK_BOOTTIME is one clock for every process of the
 * machine, so the two ends' stamps can be subtracted. `hold` waits for a signal
 * rather than a line on stdin because `etcdctl lock` gives its command
 * /dev/null as stdin.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* One write(2) per line: no stdio buffer to flush, none lost on exit. */
static int say(const char *line, int length) {
    return write(STDOUT_FILENO, line, (size_t)length) == length ? 0 : 1;
}

static int stamp(void) {
    struct timespec now;
    char line[32];
    if (clock_gettime(CLOCK_BOOTTIME, &now) != 0) {
        return 1;
    }
    int length = snprintf(line, sizeof line, "%lld%09ld\n", (long long)now.tv_sec,
                          now.tv_nsec);
    return say(line, length);
}

int main(int argc, char **argv) {
    if (argc == 1) {
        return stamp();
    }
    if (argc != 2 || strcmp(argv[1], "hold") != 0) {
        fputs("usage: stamp [hold]\n", stderr);
        return 2;
    }
    /* Blocked before "ready" is said: a SIGUSR1 sent at once is not lost. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &usr1, NULL) != 0) {
        return 1;
    }
    char line[32];
    int length = snprintf(line, sizeof line, "ready %ld\n", (long)getpid());
    if (say(line, length) != 0) {
        return 1;
    }
    int received = 0;
    if (sigwait(&usr1, &received) != 0) {
        return 1;
    }
    return stamp();
}
