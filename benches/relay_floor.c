/* The floor of any user-space proxy on this machine: a byte relay with no logic at all.
 *
 * benches/pgbench.sh builds and starts it with RELAY_FLOOR=1 (target "floor"): each thread
 * has its own listening socket (SO_REUSEPORT, the kernel spreads connections over them) and
 * its own epoll loop; each client connection gets its own upstream connection, and whatever
 * one side sends is written to the other. No pooling, no parsing, no authentication (the
 * client's login passes through to PostgreSQL), so it measures only the extra hop: two more
 * sockets and their system calls per round trip. One thread is PgBouncer's shape, two are
 * one loop per core of this 2-vCPU machine. A benchmark tool, not part of pgvalve.
 *
 *   relay_floor LISTEN_PORT UPSTREAM [THREADS]
 *   UPSTREAM: a Unix socket path (starts with '/') or HOST:PORT (IPv4)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FD 65536
static int peer[MAX_FD];
static int listen_port;
static const char *upstream;

static void write_all(int fd, const char *b, ssize_t n) {
  while (n > 0) {
    ssize_t w = send(fd, b, (size_t)n, MSG_NOSIGNAL);
    if (w < 0 && errno == EAGAIN) {
      struct pollfd p = {fd, POLLOUT, 0};
      poll(&p, 1, 1000);
      continue;
    }
    if (w < 0) return;
    b += w;
    n -= w;
  }
}

static int connect_upstream(void) {
  int one = 1;
  if (upstream[0] == '/') {
    struct sockaddr_un u = {0};
    u.sun_family = AF_UNIX;
    strncpy(u.sun_path, upstream, sizeof u.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&u, sizeof u) == 0) return s;
    if (s >= 0) close(s);
    return -1;
  }
  char host[256];
  const char *colon = strrchr(upstream, ':');
  if (!colon || (size_t)(colon - upstream) >= sizeof host) return -1;
  memcpy(host, upstream, (size_t)(colon - upstream));
  host[colon - upstream] = 0;
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)atoi(colon + 1));
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) return -1;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
  }
  if (s >= 0) close(s);
  return -1;
}

static void watch(int ep, int fd) {
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void accept_one(int ep, int ls) {
  int one = 1, c = accept(ls, NULL, NULL);
  if (c < 0) return;
  int s = connect_upstream();
  if (s < 0 || c >= MAX_FD || s >= MAX_FD) {
    perror("relay_floor: upstream");
    close(c);
    if (s >= 0) close(s);
    return;
  }
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fcntl(c, F_SETFL, O_NONBLOCK);
  fcntl(s, F_SETFL, O_NONBLOCK);
  peer[c] = s;
  peer[s] = c;
  watch(ep, c);
  watch(ep, s);
}

static void *event_loop(void *arg) {
  (void)arg;
  int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)listen_port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
    perror("relay_floor: listen");
    exit(1);
  }
  int ep = epoll_create1(0);
  watch(ep, ls);
  char *buf = malloc(65536);
  struct epoll_event evs[256];
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == ls) {
        accept_one(ep, ls);
        continue;
      }
      if (peer[fd] < 0) continue; /* closed earlier in this batch */
      ssize_t r = recv(fd, buf, 65536, 0);
      if (r > 0) {
        write_all(peer[fd], buf, r);
      } else if (r == 0 || errno != EAGAIN) {
        int p = peer[fd];
        peer[fd] = peer[p] = -1;
        close(fd);
        close(p);
      }
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: relay_floor LISTEN_PORT UPSTREAM [THREADS]\n");
    return 2;
  }
  listen_port = atoi(argv[1]);
  upstream = argv[2];
  int n = argc > 3 ? atoi(argv[3]) : 1;
  if (n < 1 || n > 64) n = 1;
  pthread_t t[64];
  for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, event_loop, NULL);
  for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
  return 0;
}
