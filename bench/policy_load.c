/*
 * policy_load: a load generator for Postfix policy servers (check_policy_service).
 *
 * N persistent connections, each with `depth` requests in flight (1 = what Postfix
 * does: one smtpd process asks, waits for the answer, asks again). Every request is a
 * realistic RCPT request of Postfix 3.x (~30 attributes, ~1 KB); its client_address
 * comes from a mix: X % from a set of P penalized addresses (198.18.<i/250>.<i%250+1>,
 * i < P: the bench penalizes exactly these), the rest from G "good" addresses
 * (10.<j>>16>.<j>>8&255>.<j&255>+1, j < G).
 *
 * Runs for D seconds (after W seconds of warm-up, not counted) or until R answers, then
 * prints one JSON object: requests, req_per_s, p50/p99/p999/max latency in µs (send of a
 * request to the end of its answer), dunno vs tempfail (4xx) vs other answers, errors.
 *
 * With -R rate it is an open-loop load at a fixed offered rate instead of a closed loop
 * at saturation: every connection is due to ask every conns/rate seconds (phases
 * spread evenly), still one request in flight; a request whose slot comes while the
 * previous answer is still outstanding is sent as soon as that answer arrives, and
 * every latency is measured from the moment the request was *due* (its slot), not when
 * it could be sent, so a stalled server is not hidden by the generator waiting for it
 * (no coordinated omission). `late` counts requests sent more than 100 us after their
 * slot (because the answer before was late, or the generator itself was).
 *
 * With depth > 1 it is a pipelining client (writes `depth` requests without waiting),
 * and `-r` makes it never read its answers at all (a client that only writes): both
 * are the attacks of docs/reliability.md, for fairness runs next to a well-behaved one.
 *
 * Build: cc -O2 -pthread -o policy_load policy_load.c
 * Usage: policy_load [-H host] [-p port | -U unix_path] [-c conns] [-t threads]
 *                    [-d seconds] [-w warmup_s] [-n requests] [-x penalized_pct]
 *                    [-P penalized_addrs] [-G good_addrs] [-k depth] [-r] [-s seed]
 *                    [-R offered_rate_per_s]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 256
#define RBUF 65536
#define REQ_MAX 2048

struct opts {
    const char *host, *unix_path;
    int port, conns, threads, depth, no_read;
    double seconds, warmup, penalized_pct, rate;
    long long max_requests;
    int penalized, good;
    unsigned seed;
};

struct conn {
    int fd;
    int inflight;
    int head;                      /* ring of send times, oldest first */
    uint64_t sent_ns[MAX_DEPTH];
    uint64_t due_ns;               /* -R: when the next request is due */
    size_t rlen;
    char rbuf[RBUF];
    uint64_t rng;
};

struct worker {
    pthread_t tid;
    int index, nconns, epfd;
    struct conn *conns;
    uint32_t *lat;
    size_t nlat, caplat;
    long long requests, dunno, tempfail, other, errors, late;
};

static struct opts O;
static atomic_llong answered_total;  /* counted answers, all workers (for -n) */
static atomic_int stop_flag;
static uint64_t t_measure_ns;        /* answers before this instant are warm-up */
static uint64_t t_end_ns;
static uint64_t interval_ns;         /* -R: between two requests of one connection */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* A Postfix 3.x RCPT request (smtpd_check.c's policy attributes), ~30 lines. */
static int build_request(struct conn *c, char *out) {
    char ip[32];
    uint64_t r = xorshift(&c->rng);
    unsigned qid = (unsigned)(r >> 32);
    if (O.penalized > 0 && (double)(r % 1000000) < O.penalized_pct * 10000.0) {
        unsigned i = (unsigned)((r >> 20) % (uint64_t)O.penalized);
        snprintf(ip, sizeof ip, "198.18.%u.%u", i / 250, i % 250 + 1);
    } else {
        unsigned j = (unsigned)((r >> 20) % (uint64_t)(O.good > 0 ? O.good : 1));
        snprintf(ip, sizeof ip, "10.%u.%u.%u", (j >> 16) & 255, (j >> 8) & 255, (j & 255) + 1);
    }
    return snprintf(
        out, REQ_MAX,
        "request=smtpd_access_policy\n"
        "protocol_state=RCPT\n"
        "protocol_name=ESMTP\n"
        "client_address=%s\n"
        "client_name=unknown\n"
        "client_port=%u\n"
        "reverse_client_name=unknown\n"
        "server_address=192.0.2.25\n"
        "server_port=25\n"
        "helo_name=mail.example.net\n"
        "sender=newsletter@example.net\n"
        "recipient=user%u@example.org\n"
        "recipient_count=0\n"
        "queue_id=\n"
        "instance=%x.%x.1\n"
        "size=0\n"
        "etrn_domain=\n"
        "stress=\n"
        "sasl_method=\n"
        "sasl_username=\n"
        "sasl_sender=\n"
        "ccert_subject=\n"
        "ccert_issuer=\n"
        "ccert_fingerprint=\n"
        "ccert_pubkey_fingerprint=\n"
        "encryption_protocol=TLSv1.3\n"
        "encryption_cipher=TLS_AES_256_GCM_SHA384\n"
        "encryption_keysize=256\n"
        "policy_context=\n"
        "compatibility_level=3.6\n"
        "mail_version=3.7.11\n"
        "server_hostname=mx1.example.org\n"
        "\n",
        ip, 1024 + (qid & 0x7fff), qid % 100000, qid & 0xfffff, (qid >> 12) & 0xfff);
}

static int dial(void) {
    int fd;
    if (O.unix_path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, O.unix_path, sizeof sa.sun_path - 1);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) goto fail;
    } else {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
        if (inet_pton(AF_INET, O.host, &sa.sin_addr) != 1) {
            fprintf(stderr, "policy_load: -H must be an IPv4 address\n");
            exit(2);
        }
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) goto fail;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
fail:
    if (fd >= 0) close(fd);
    return -1;
}

/* Write all of buf (short writes wait for POLLOUT, at most 1 s). */
static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 1000) <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

/* One request; its latency counts from `due` (0: now, the closed loop). */
static int send_at(struct conn *c, uint64_t due) {
    char req[REQ_MAX];
    int len = build_request(c, req);
    int slot = (c->head + c->inflight) % MAX_DEPTH;
    c->sent_ns[slot] = due ? due : now_ns();
    if (write_all(c->fd, req, (size_t)len) < 0) return -1;
    c->inflight++;
    return 0;
}

static int send_one(struct conn *c) { return send_at(c, 0); }

/* -R: send the request that is due, if it is and none is in flight. */
static int send_due(struct worker *w, struct conn *c, uint64_t t) {
    if (c->inflight || t < c->due_ns) return 0;
    uint64_t due = c->due_ns;
    c->due_ns += interval_ns;
    if (t - due > 100000 && due >= t_measure_ns) w->late++;
    return send_at(c, due);
}

static void record(struct worker *w, uint64_t sent, uint64_t done, const char *answer) {
    if (done < t_measure_ns || done > t_end_ns) return;
    if (O.max_requests > 0 && atomic_fetch_add(&answered_total, 1) >= O.max_requests) {
        atomic_store(&stop_flag, 1);
        return;
    }
    if (w->nlat == w->caplat) {
        w->caplat = w->caplat ? w->caplat * 2 : 1 << 16;
        w->lat = realloc(w->lat, w->caplat * sizeof *w->lat);
        if (!w->lat) {
            perror("realloc");
            exit(1);
        }
    }
    uint64_t us = (done - sent) / 1000;
    w->lat[w->nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    w->requests++;
    if (strncmp(answer, "action=DUNNO\n", 13) == 0)
        w->dunno++;
    else if (strncmp(answer, "action=4", 8) == 0)
        w->tempfail++;
    else
        w->other++;
}

static int open_conn(struct worker *w, struct conn *c) {
    c->fd = dial();
    if (c->fd < 0) return -1;
    c->inflight = c->head = 0;
    c->rlen = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    epoll_ctl(w->epfd, EPOLL_CTL_ADD, c->fd, &ev);
    if (interval_ns) return 0;  /* -R: the schedule sends */
    for (int i = 0; i < O.depth; i++)
        if (send_one(c) < 0) return -1;
    return 0;
}

static void drop_conn(struct worker *w, struct conn *c) {
    w->errors++;
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

/* Read what is there; each complete answer ("...\n\n") is recorded and replaced. */
static int on_readable(struct worker *w, struct conn *c) {
    ssize_t n = read(c->fd, c->rbuf + c->rlen, RBUF - 1 - c->rlen);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        return -1;  /* EOF or reset: the server closed us */
    }
    uint64_t done = now_ns();
    c->rlen += (size_t)n;
    c->rbuf[c->rlen] = 0;
    char *start = c->rbuf, *end;
    while ((end = memmem(start, c->rlen - (size_t)(start - c->rbuf), "\n\n", 2)) != NULL) {
        if (c->inflight == 0) return -1;  /* an answer nobody asked for */
        record(w, c->sent_ns[c->head], done, start);
        c->head = (c->head + 1) % MAX_DEPTH;
        c->inflight--;
        start = end + 2;
        if (interval_ns) {
            uint64_t t = now_ns();
            if (!atomic_load(&stop_flag) && t < t_end_ns && send_due(w, c, t) < 0) return -1;
        } else if (!atomic_load(&stop_flag) && now_ns() < t_end_ns && send_one(c) < 0)
            return -1;
    }
    size_t rest = c->rlen - (size_t)(start - c->rbuf);
    if (rest == RBUF - 1) return -1;  /* no answer is this long */
    memmove(c->rbuf, start, rest);
    c->rlen = rest;
    return 0;
}

/* -r: write requests forever, never read (stops when the server stops reading). */
static void *writer_only(void *arg) {
    struct worker *w = arg;
    char req[REQ_MAX];
    while (!atomic_load(&stop_flag) && now_ns() < t_end_ns) {
        for (int i = 0; i < w->nconns; i++) {
            struct conn *c = &w->conns[i];
            if (c->fd < 0) continue;
            int len = build_request(c, req);
            ssize_t k = send(c->fd, req, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (k > 0) w->requests++;
            else if (k < 0 && errno != EAGAIN) drop_conn(w, c);
        }
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void *run_worker(void *arg) {
    struct worker *w = arg;
    w->epfd = epoll_create1(0);
    uint64_t first = now_ns() + 1000000;
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        c->rng = ((uint64_t)O.seed << 32) ^ (uint64_t)(w->index * 7919 + i + 1) * 0x9E3779B97F4A7C15ull;
        /* -R: phases spread evenly over the interval, across all connections */
        c->due_ns = first + interval_ns *
                   (uint64_t)((c - w->conns) * O.threads + w->index) / (uint64_t)O.conns;
        if (O.no_read) {
            c->fd = dial();
            if (c->fd < 0) w->errors++;
            continue;
        }
        if (open_conn(w, c) < 0) {
            drop_conn(w, c);
        }
    }
    if (O.no_read) return writer_only(w);
    struct epoll_event evs[256];
    while (!atomic_load(&stop_flag)) {
        uint64_t t = now_ns();
        if (t >= t_end_ns) break;
        int n;
        if (interval_ns) {  /* sleep until the next request is due, at most 100 ms */
            uint64_t next = t + 100000000ull;
            for (int i = 0; i < w->nconns; i++) {
                struct conn *c = &w->conns[i];
                if (c->fd >= 0 && !c->inflight && c->due_ns < next) next = c->due_ns;
            }
            uint64_t wait = next > t ? next - t : 0;
            struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
            n = epoll_pwait2(w->epfd, evs, 256, &ts, NULL);
        } else {
            n = epoll_wait(w->epfd, evs, 256, 100);
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            if (on_readable(w, c) < 0) {
                drop_conn(w, c);
                if (!atomic_load(&stop_flag) && now_ns() < t_end_ns && open_conn(w, c) < 0)
                    drop_conn(w, c);
            }
        }
        t = now_ns();
        if (interval_ns)
            for (int i = 0; i < w->nconns; i++) {
                struct conn *c = &w->conns[i];
                if (c->fd >= 0 && t < t_end_ns && send_due(w, c, t) < 0) {
                    drop_conn(w, c);
                    if (open_conn(w, c) < 0) drop_conn(w, c);
                }
            }
        /* an answer that never comes is an error too (5 s, Postfix gives up after 1 s) */
        for (int i = 0; i < w->nconns; i++) {
            struct conn *c = &w->conns[i];
            if (c->fd >= 0 && c->inflight && t - c->sent_ns[c->head] > 5000000000ull) {
                drop_conn(w, c);
                if (t < t_end_ns && open_conn(w, c) < 0) drop_conn(w, c);
            }
        }
    }
    for (int i = 0; i < w->nconns; i++)
        if (w->conns[i].fd >= 0) close(w->conns[i].fd);
    close(w->epfd);
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void usage(void) {
    fprintf(stderr,
            "usage: policy_load [-H host] [-p port | -U unix_path] [-c conns] [-t threads]\n"
            "                   [-d seconds] [-w warmup] [-n requests] [-x penalized_pct]\n"
            "                   [-P penalized_addrs] [-G good_addrs] [-k depth] [-r] [-s seed]\n"
            "                   [-R offered_rate_per_s]\n");
    exit(2);
}

int main(int argc, char **argv) {
    O = (struct opts){.host = "127.0.0.1", .port = 10040, .conns = 32, .threads = 1,
                      .depth = 1, .seconds = 10, .warmup = 1, .penalized_pct = 10,
                      .penalized = 50, .good = 10000, .seed = 1};
    int opt;
    while ((opt = getopt(argc, argv, "H:p:U:c:t:d:w:n:x:P:G:k:rs:R:")) != -1) {
        switch (opt) {
        case 'H': O.host = optarg; break;
        case 'p': O.port = atoi(optarg); break;
        case 'U': O.unix_path = optarg; break;
        case 'c': O.conns = atoi(optarg); break;
        case 't': O.threads = atoi(optarg); break;
        case 'd': O.seconds = atof(optarg); break;
        case 'w': O.warmup = atof(optarg); break;
        case 'n': O.max_requests = atoll(optarg); break;
        case 'x': O.penalized_pct = atof(optarg); break;
        case 'P': O.penalized = atoi(optarg); break;
        case 'G': O.good = atoi(optarg); break;
        case 'k': O.depth = atoi(optarg); break;
        case 'r': O.no_read = 1; break;
        case 's': O.seed = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'R': O.rate = atof(optarg); break;
        default: usage();
        }
    }
    if (O.conns < 1 || O.threads < 1 || O.depth < 1 || O.depth > MAX_DEPTH || O.seconds <= 0 ||
        O.penalized < 0 || O.good < 1 || O.penalized_pct < 0 || O.penalized_pct > 100 ||
        O.rate < 0 || (O.rate > 0 && (O.depth != 1 || O.no_read)))
        usage();
    if (O.rate > 0) {
        interval_ns = (uint64_t)(1e9 * O.conns / O.rate);
        prctl(PR_SET_TIMERSLACK, 1UL);  /* wake-ups on time, not 50 us late */
    }
    if (O.threads > O.conns) O.threads = O.conns;
    if (O.max_requests > 0) O.seconds = 3600;  /* -n: until R answers (an hour at most) */
    signal(SIGPIPE, SIG_IGN);

    struct worker *ws = calloc((size_t)O.threads, sizeof *ws);
    struct conn *cs = calloc((size_t)O.conns, sizeof *cs);
    if (!ws || !cs) return 1;
    uint64_t t0 = now_ns();
    t_measure_ns = t0 + (uint64_t)(O.warmup * 1e9);
    t_end_ns = t_measure_ns + (uint64_t)(O.seconds * 1e9);
    int per = O.conns / O.threads, extra = O.conns % O.threads, at = 0;
    for (int i = 0; i < O.threads; i++) {
        ws[i].index = i;
        ws[i].nconns = per + (i < extra);
        ws[i].conns = cs + at;
        at += ws[i].nconns;
        pthread_create(&ws[i].tid, NULL, run_worker, &ws[i]);
    }
    long long requests = 0, dunno = 0, tempfail = 0, other = 0, errors = 0, late = 0;
    size_t nlat = 0;
    for (int i = 0; i < O.threads; i++) {
        pthread_join(ws[i].tid, NULL);
        requests += ws[i].requests;
        dunno += ws[i].dunno;
        tempfail += ws[i].tempfail;
        other += ws[i].other;
        errors += ws[i].errors;
        late += ws[i].late;
        nlat += ws[i].nlat;
    }
    uint64_t t_stop = now_ns();
    if (t_stop > t_end_ns) t_stop = t_end_ns;
    double measured = t_stop > t_measure_ns ? (double)(t_stop - t_measure_ns) / 1e9 : 0.0;
    uint32_t *all = malloc((nlat ? nlat : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < O.threads; i++) {
        if (ws[i].nlat) memcpy(all + k, ws[i].lat, ws[i].nlat * sizeof *all);
        k += ws[i].nlat;
        free(ws[i].lat);
    }
    qsort(all, nlat, sizeof *all, cmp_u32);
#define PCT(p) (nlat ? all[(size_t)((double)(nlat - 1) * (p))] : 0)
    printf("{\"connections\": %d, \"depth\": %d, \"seconds\": %.3f, \"requests\": %lld, "
           "\"req_per_s\": %.1f, \"p50_us\": %u, \"p99_us\": %u, \"p999_us\": %u, "
           "\"max_us\": %u, \"dunno\": %lld, \"tempfail\": %lld, \"other\": %lld, "
           "\"errors\": %lld, \"penalized_pct\": %g, \"penalized_addrs\": %d, "
           "\"good_addrs\": %d, \"written_only\": %s, \"offered_per_s\": %.1f, "
           "\"late\": %lld}\n",
           O.conns, O.depth, measured, requests, measured > 0 ? (double)requests / measured : 0.0,
           PCT(0.50), PCT(0.99), PCT(0.999), nlat ? all[nlat - 1] : 0, dunno, tempfail, other,
           errors, O.penalized_pct, O.penalized, O.good, O.no_read ? "true" : "false", O.rate,
           late);
    free(all);
    free(ws);
    free(cs);
    return 0;
}
