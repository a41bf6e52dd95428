/*
 * Guest side of the vsock tests and benchmark. Installed as /podbox-test-init
 * next to the production image's /init (the agent) and booted with
 * rdinit=/podbox-test-init: it forks its services, then execs /init, so the
 * agent still runs as PID 1.
 *
 * Services (AF_VSOCK, any CID):
 *   5000 echo:   writes back everything it reads, until EOF.
 *   5001 sink:   reads until EOF, then replies "<bytes> <fnv1a64 hex>\n".
 *   5002 source: reads "<n>\n", writes n bytes (byte i = (i*7+3) & 0xff), closes.
 * And once at start it connects to the host (CID 2) port 6000 and writes
 * "guest-hello\n", to check guest-initiated streams.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char buf[65536];

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void echo(int fd) {
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || write_all(fd, buf, (size_t)n) < 0) return;
    }
}

static void sink(int fd) {
    uint64_t total = 0, h = 0xcbf29ce484222325ULL;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; i++) { h ^= (uint8_t)buf[i]; h *= 0x100000001b3ULL; }
        total += (uint64_t)n;
    }
    char line[64];
    int len = snprintf(line, sizeof line, "%llu %016llx\n", (unsigned long long)total, (unsigned long long)h);
    write_all(fd, line, (size_t)len);
}

static void source(int fd) {
    char line[32];
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(fd, line + got, 1);
        if (n <= 0) return;
        if (line[got] == '\n') break;
        got++;
    }
    line[got] = 0;
    uint64_t want = strtoull(line, NULL, 10), sent = 0;
    while (sent < want) {
        size_t chunk = want - sent < sizeof buf ? (size_t)(want - sent) : sizeof buf;
        for (size_t i = 0; i < chunk; i++) buf[i] = (char)(((sent + i) * 7 + 3) & 0xff);
        if (write_all(fd, buf, chunk) < 0) return;
        sent += chunk;
    }
}

static int listen_on(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0) {
        fprintf(stderr, "vsock-helper: listen %u: %s\n", port, strerror(errno));
        return -1;
    }
    return fd;
}

static void hello_host(void) {
    for (int i = 0; i < 100; i++) {
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = 6000 };
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            write_all(fd, "guest-hello\n", 12);
            close(fd);
            return;
        }
        if (fd >= 0) close(fd);
        usleep(100000);
    }
    fprintf(stderr, "vsock-helper: could not reach host port 6000\n");
}

static void serve(void) {
    signal(SIGCHLD, SIG_IGN); /* handlers are reaped automatically */
    if (fork() == 0) { hello_host(); _exit(0); }
    unsigned ports[3] = { 5000, 5001, 5002 };
    struct pollfd p[3];
    for (int i = 0; i < 3; i++) {
        p[i].fd = listen_on(ports[i]);
        p[i].events = POLLIN;
        if (p[i].fd < 0) _exit(1);
    }
    fprintf(stderr, "vsock-helper: serving on 5000-5002\n");
    for (;;) {
        if (poll(p, 3, -1) < 0) continue;
        for (int i = 0; i < 3; i++) {
            if (!(p[i].revents & POLLIN)) continue;
            int c = accept(p[i].fd, NULL, NULL);
            if (c < 0) continue;
            if (fork() == 0) {
                if (i == 0) echo(c); else if (i == 1) sink(c); else source(c);
                close(c);
                _exit(0);
            }
            close(c);
        }
    }
}

int main(void) {
    pid_t pid = fork();
    if (pid == 0) { serve(); _exit(0); }
    char *argv[] = { "/init", NULL };
    execv("/init", argv);
    perror("vsock-helper: exec /init");
    return 1;
}
