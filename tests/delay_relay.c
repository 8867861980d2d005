/* A TCP relay that holds every byte DELAY microseconds in each direction:
 * a stand-in for netem's delay on kernels without sch_netem (this one), so
 * that every request of a benchmark pays a real round trip.
 *
 *     delay_relay LISTEN_IP TARGET_IP DELAY_US PORT [PORT ...]
 *
 * Listens on LISTEN_IP:PORT for each PORT and relays each connection to
 * TARGET_IP:PORT. Each direction of a connection is a reader thread that
 * stamps what it reads with the time it is due and a sender thread that
 * writes it out once due, so the delay adds latency, not a bandwidth limit
 * (the reader keeps reading while earlier bytes wait). At most QUEUE_CAP
 * bytes wait in one direction; past that the reader stops reading and TCP
 * pushes back, as a full link would. Prints "ready" once every port
 * listens. Runs until killed; only for benchmarks on this machine.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define QUEUE_CAP (64L * 1024 * 1024)

struct chunk {
    struct chunk *next;
    struct timespec due;
    size_t len; /* 0: end of stream */
    char data[];
};

struct pipe_dir {
    int from, to;
    long delay_us;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct chunk *head, *tail;
    long queued;
    int sender_done;
    struct conn *conn;
};

struct conn {
    struct pipe_dir dir[2];
    pthread_mutex_t lock;
    int threads_left; /* the four threads; the last frees the connection */
};

struct listener {
    int fd;
    struct sockaddr_in target;
    long delay_us;
};

static void add_us(struct timespec *t, long us)
{
    t->tv_nsec += (us % 1000000) * 1000;
    t->tv_sec += us / 1000000 + t->tv_nsec / 1000000000;
    t->tv_nsec %= 1000000000;
}

static void thread_done(struct conn *c)
{
    pthread_mutex_lock(&c->lock);
    int last = --c->threads_left == 0;
    pthread_mutex_unlock(&c->lock);
    if (!last)
        return;
    close(c->dir[0].from);
    close(c->dir[0].to);
    for (int i = 0; i < 2; i++) {
        struct chunk *k = c->dir[i].head;
        while (k) {
            struct chunk *next = k->next;
            free(k);
            k = next;
        }
    }
    free(c);
}

static void enqueue(struct pipe_dir *d, struct chunk *k)
{
    pthread_mutex_lock(&d->lock);
    while (d->queued > QUEUE_CAP && !d->sender_done)
        pthread_cond_wait(&d->changed, &d->lock);
    k->next = NULL;
    if (d->tail)
        d->tail->next = k;
    else
        d->head = k;
    d->tail = k;
    d->queued += (long)k->len;
    pthread_cond_broadcast(&d->changed);
    pthread_mutex_unlock(&d->lock);
}

static void quickack(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

static void *reader(void *arg)
{
    struct pipe_dir *d = arg;
    for (;;) {
        struct chunk *k = malloc(sizeof(*k) + CHUNK);
        if (!k)
            break;
        ssize_t n = read(d->from, k->data, CHUNK);
        clock_gettime(CLOCK_MONOTONIC, &k->due);
        /* ACK at once, as the far end of a plain link would: a sender that
         * waits for our ACK (Nagle) must not see a delayed-ACK stall that
         * belongs to the relay, not to the link it stands in for. */
        quickack(d->from);
        add_us(&k->due, d->delay_us);
        if (n < 0 && errno == EINTR) {
            free(k);
            continue;
        }
        k->len = n > 0 ? (size_t)n : 0;
        enqueue(d, k);
        if (n <= 0)
            break;
        /* The sender gave up (its peer went): stop reading. */
        pthread_mutex_lock(&d->lock);
        int gone = d->sender_done;
        pthread_mutex_unlock(&d->lock);
        if (gone)
            break;
    }
    thread_done(d->conn);
    return NULL;
}

static int write_all(int fd, const char *p, size_t len)
{
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void *sender(void *arg)
{
    struct pipe_dir *d = arg;
    for (;;) {
        pthread_mutex_lock(&d->lock);
        while (!d->head)
            pthread_cond_wait(&d->changed, &d->lock);
        struct chunk *k = d->head;
        d->head = k->next;
        if (!d->head)
            d->tail = NULL;
        d->queued -= (long)k->len;
        pthread_cond_broadcast(&d->changed);
        pthread_mutex_unlock(&d->lock);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &k->due, NULL) == EINTR)
            ;
        int failed = k->len == 0 || write_all(d->to, k->data, k->len) < 0;
        size_t len = k->len;
        free(k);
        if (failed) {
            /* End of stream (pass it on) or a dead peer (end both ways). */
            shutdown(d->to, SHUT_WR);
            if (len)
                shutdown(d->from, SHUT_RDWR);
            break;
        }
    }
    pthread_mutex_lock(&d->lock);
    d->sender_done = 1;
    pthread_cond_broadcast(&d->changed);
    pthread_mutex_unlock(&d->lock);
    thread_done(d->conn);
    return NULL;
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static void start_conn(int client, const struct listener *l)
{
    int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server < 0 || connect(server, (const struct sockaddr *)&l->target,
                              sizeof(l->target)) < 0) {
        perror("delay_relay: connect");
        close(client);
        if (server >= 0)
            close(server);
        return;
    }
    nodelay(client);
    nodelay(server);
    struct conn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(client);
        close(server);
        return;
    }
    pthread_mutex_init(&c->lock, NULL);
    c->threads_left = 4;
    int ends[2][2] = {{client, server}, {server, client}};
    for (int i = 0; i < 2; i++) {
        struct pipe_dir *d = &c->dir[i];
        d->from = ends[i][0];
        d->to = ends[i][1];
        d->delay_us = l->delay_us;
        d->conn = c;
        pthread_mutex_init(&d->lock, NULL);
        pthread_cond_init(&d->changed, NULL);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < 2; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, reader, &c->dir[i]) ||
            pthread_create(&t, &attr, sender, &c->dir[i])) {
            fprintf(stderr, "delay_relay: cannot start a thread\n");
            exit(1);
        }
    }
    pthread_attr_destroy(&attr);
}

static void *accept_loop(void *arg)
{
    const struct listener *l = arg;
    for (;;) {
        int client = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("delay_relay: accept");
            exit(1);
        }
        start_conn(client, l);
    }
    return NULL;
}

static int listen_on(const char *ip, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || inet_pton(AF_INET, ip, &a.sin_addr) != 1 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 64) < 0) {
        fprintf(stderr, "delay_relay: cannot listen on %s:%d: %s\n", ip, port, strerror(errno));
        exit(2);
    }
    return fd;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: delay_relay LISTEN_IP TARGET_IP DELAY_US PORT [PORT ...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    long delay_us = strtol(argv[3], NULL, 10);
    int ports = argc - 4;
    struct listener *ls = calloc((size_t)ports, sizeof(*ls));
    if (!ls)
        return 1;
    for (int i = 0; i < ports; i++) {
        int port = atoi(argv[4 + i]);
        ls[i].fd = listen_on(argv[1], port);
        ls[i].delay_us = delay_us;
        ls[i].target.sin_family = AF_INET;
        ls[i].target.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, argv[2], &ls[i].target.sin_addr) != 1) {
            fprintf(stderr, "delay_relay: bad target address %s\n", argv[2]);
            return 2;
        }
    }
    for (int i = 0; i < ports; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, accept_loop, &ls[i])) {
            fprintf(stderr, "delay_relay: cannot start a thread\n");
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
