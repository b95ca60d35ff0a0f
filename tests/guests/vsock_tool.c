/* A tiny vsock tool for the kemu guest (busybox has no vsock):
 *   vs connect CID PORT MESSAGE   connect, send MESSAGE, shut down writing, print the reply
 *   vs listen PORT                accept one connection, print what arrives, answer "pong:<it>"
 *   vs bulk CID PORT BYTES        connect, send BYTES bytes of a pattern, print the reply */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int sock(void) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); exit(1); }
    return s;
}

static void addr(struct sockaddr_vm *a, unsigned cid, unsigned port) {
    memset(a, 0, sizeof *a);
    a->svm_family = AF_VSOCK; a->svm_cid = cid; a->svm_port = port;
}

static void put(int s, const char *p, size_t n) {
    while (n) { ssize_t w = write(s, p, n); if (w <= 0) { perror("write"); exit(1); } p += w; n -= w; }
}

static size_t drain(int s, char *buf, size_t cap) {
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, buf + got, cap - got);
        if (r < 0) { perror("read"); exit(1); }
        if (r == 0) break;
        got += r;
        if (got == cap) break;
    }
    return got;
}

int main(int argc, char **argv) {
    static char buf[1 << 20];
    struct sockaddr_vm a;
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = sock();
        addr(&a, atoi(argv[2]), atoi(argv[3]));
        if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        put(s, argv[4], strlen(argv[4]));
        shutdown(s, SHUT_WR);
        size_t n = drain(s, buf, sizeof buf - 1);
        buf[n] = 0;
        printf("reply:%s\n", buf);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "bulk")) {
        int s = sock();
        long total = atol(argv[4]);
        addr(&a, atoi(argv[2]), atoi(argv[3]));
        if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
        for (long i = 0; i < (long)sizeof buf; i++) buf[i] = 'a' + i % 26;
        for (long sent = 0; sent < total; ) {
            long n = total - sent < (long)sizeof buf ? total - sent : (long)sizeof buf;
            put(s, buf, n); sent += n;
        }
        shutdown(s, SHUT_WR);
        size_t n = drain(s, buf, sizeof buf - 1);
        buf[n] = 0;
        printf("reply:%s\n", buf);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int s = sock();
        addr(&a, VMADDR_CID_ANY, atoi(argv[2]));
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) { perror("bind"); return 1; }
        printf("listening\n"); fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        size_t n = drain(c, buf, sizeof buf - 1);
        buf[n] = 0;
        printf("got:%s\n", buf); fflush(stdout);
        put(c, "pong:", 5); put(c, buf, n);
        close(c);
        return 0;
    }
    fprintf(stderr, "usage: vs connect CID PORT MSG | vs listen PORT | vs bulk CID PORT BYTES\n");
    return 2;
}
