/*
 * Diagnostic LD_PRELOAD shim (not part of any build): sets TCP_NODELAY on every socket
 * the process accepts. scripts/bench-mqtt.sh runs a second fedmesh node under it
 * ("node+nodelay") to show what the missing TCP_NODELAY on rumqttd's side of the
 * node's internal proxy -> rumqttd hop costs: rumqttd accepts those connections itself
 * and never sets the option (rumqttd 0.20 src/server/broker.rs, Server::start).
 *
 *   cc -O2 -shared -fPIC -o nodelay-preload.so nodelay-preload.c -ldl
 *   LD_PRELOAD=$PWD/nodelay-preload.so target/release/fedmesh run
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void set_nodelay(int fd) {
    if (fd < 0) return;
    int saved = errno, one = 1;
    /* Fails harmlessly (and silently) on non-TCP sockets. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    errno = saved;
}

int accept(int s, struct sockaddr *addr, socklen_t *len) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int fd = real(s, addr, len);
    set_nodelay(fd);
    return fd;
}

int accept4(int s, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, addr, len, flags);
    set_nodelay(fd);
    return fd;
}
