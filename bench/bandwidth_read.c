/* Memory read bandwidth: T threads each sum their slice of a large buffer as 64-bit words
 * (an integer reduction the compiler vectorises; nothing is written back). Built and run by
 * bench/bandwidth.py with the host compiler and -O3 -march=native, so it reads as fast as the
 * machine allows. Usage: bandwidth_read MIB THREADS PASSES -> prints the best GB/s. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { const uint64_t * p; size_t n; uint64_t out; } slice_t;

static void * sum_slice(void * arg) {
    slice_t * s = (slice_t *) arg;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    size_t i = 0;
    for (; i + 4 <= s->n; i += 4) {
        a0 += s->p[i]; a1 += s->p[i + 1]; a2 += s->p[i + 2]; a3 += s->p[i + 3];
    }
    for (; i < s->n; ++i) a0 += s->p[i];
    s->out = a0 + a1 + a2 + a3;
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s MIB THREADS PASSES\n", argv[0]); return 2; }
    const size_t bytes = (size_t) atol(argv[1]) << 20;
    const int threads = atoi(argv[2]), passes = atoi(argv[3]);
    if (threads < 1 || threads > 256 || passes < 1 || bytes == 0) return 2;
    uint64_t * buf = (uint64_t *) malloc(bytes);
    if (!buf) return 1;
    memset(buf, 1, bytes);  /* real pages, not the shared zero page */
    const size_t n = bytes / 8, per = n / threads;
    pthread_t tid[256];
    slice_t sl[256];
    double best = 1e30;
    uint64_t check = 0;
    for (int p = 0; p < passes; ++p) {
        const double t0 = now();
        for (int t = 0; t < threads; ++t) {
            sl[t].p = buf + t * per;
            sl[t].n = t == threads - 1 ? n - t * per : per;
            pthread_create(&tid[t], NULL, sum_slice, &sl[t]);
        }
        for (int t = 0; t < threads; ++t) { pthread_join(tid[t], NULL); check += sl[t].out; }
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("%.3f %llu\n", bytes / best / 1e9, (unsigned long long) (check & 1));
    free(buf);
    return 0;
}
