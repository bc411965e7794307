/* threadpool.c: see threadpool.h. Workers sleep on a condition variable between phases;
 * a phase is published with a generation number, and the caller (worker 0) takes part
 * and waits until every participant has finished. */
#include "threadpool.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

typedef struct job_node { kt_job_fn fn; void *job; struct job_node *next; } job_node;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;       /* new phase or new job */
    pthread_cond_t phase_done;
    int nworkers;
    /* job queue, consumed by worker 0 */
    job_node *head, *tail;
    /* current phase */
    long generation;
    kt_task_fn fn;
    void *ctx;
    long ntasks;
    int nthreads;
    atomic_long next_task;
    int running; /* participants (other than worker 0) still working */
    long start_generation[KT_MAX_THREADS]; /* generation when each worker was created */
    double busy[KT_MAX_THREADS];           /* seconds each participant ran tasks this phase */
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .phase_done = PTHREAD_COND_INITIALIZER};

double kt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void run_tasks(int thread) {
    long t;
    double t0 = kt_now();
    while ((t = atomic_fetch_add(&P.next_task, 1)) < P.ntasks) P.fn(P.ctx, t, thread);
    P.busy[thread] = kt_now() - t0;
}

static void *worker(void *arg) {
    int id = (int)(long)arg;
    pthread_mutex_lock(&P.mu);
    long seen = P.start_generation[id]; /* phases published after creation include us */
    for (;;) {
        if (id == 0 && P.head) {
            job_node *n = P.head;
            P.head = n->next;
            if (!P.head) P.tail = NULL;
            pthread_mutex_unlock(&P.mu);
            n->fn(n->job);
            free(n);
            pthread_mutex_lock(&P.mu);
            seen = P.generation;
            continue;
        }
        if (id != 0 && P.generation != seen) {
            seen = P.generation;
            if (id < P.nthreads) {
                pthread_mutex_unlock(&P.mu);
                run_tasks(id);
                pthread_mutex_lock(&P.mu);
                if (--P.running == 0) pthread_cond_signal(&P.phase_done);
            }
            continue;
        }
        pthread_cond_wait(&P.wake, &P.mu);
    }
    return NULL;
}

int kt_pool_ensure(int n) {
    if (n > KT_MAX_THREADS) return -1;
    pthread_mutex_lock(&P.mu);
    int rc = 0;
    while (P.nworkers < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 8u << 20);
        P.start_generation[P.nworkers] = P.generation;
        int err = pthread_create(&th, &attr, worker, (void *)(long)P.nworkers);
        pthread_attr_destroy(&attr);
        if (err) { rc = -1; break; }
        P.nworkers++;
    }
    pthread_mutex_unlock(&P.mu);
    return rc;
}

int kt_pool_submit(kt_job_fn fn, void *job) {
    if (kt_pool_ensure(1)) return -1;
    job_node *n = malloc(sizeof *n);
    if (!n) return -1;
    *n = (job_node){fn, job, NULL};
    pthread_mutex_lock(&P.mu);
    if (P.tail) P.tail->next = n; else P.head = n;
    P.tail = n;
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    return 0;
}

double kt_parallel_for(int nthreads, long ntasks, kt_task_fn fn, void *ctx) {
    if (ntasks <= 0) return 0.0;
    if (nthreads > P.nworkers) nthreads = P.nworkers;
    if (nthreads > ntasks) nthreads = (int)ntasks;
    if (nthreads <= 1) {
        double t0 = kt_now();
        for (long t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return kt_now() - t0;
    }
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.ctx = ctx;
    P.ntasks = ntasks;
    P.nthreads = nthreads;
    atomic_store(&P.next_task, 0);
    P.running = nthreads - 1;
    P.generation++;
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);
    run_tasks(0);
    pthread_mutex_lock(&P.mu);
    while (P.running > 0) pthread_cond_wait(&P.phase_done, &P.mu);
    double busy = 0.0;
    for (int i = 0; i < nthreads; i++) busy += P.busy[i];
    pthread_mutex_unlock(&P.mu);
    return busy;
}
