/* threadpool.h: one process-wide pool of persistent worker threads.
 *
 * Jobs (a whole layer forward or backward) are queued and run one at a time by worker 0;
 * inside a job, kt_parallel_for spreads tasks over workers 0..nthreads-1, which claim
 * them from a shared counter (dynamic balancing: a hot expert's tasks do not stall the
 * rest). No thread is created per call; the pool only grows when more threads are asked for.
 */
#ifndef KTMOE_THREADPOOL_H
#define KTMOE_THREADPOOL_H

typedef void (*kt_task_fn)(void *ctx, long task, int thread);
typedef void (*kt_job_fn)(void *job);

/* Makes sure at least n workers exist (n <= KT_MAX_THREADS). Returns 0 or -1. */
#define KT_MAX_THREADS 256
int kt_pool_ensure(int n);
/* Queues a job; fn(job) runs on worker 0. */
int kt_pool_submit(kt_job_fn fn, void *job);
/* Called from inside a job: runs fn(ctx, t, thread) for t in [0, ntasks). Returns the
 * seconds the participating threads spent running tasks, summed over them (the profile's
 * busy time; nthreads x wall time minus this is time idle at the phase's end). */
double kt_parallel_for(int nthreads, long ntasks, kt_task_fn fn, void *ctx);
/* Monotonic clock in seconds (the profile's timer: a vDSO call, ~20 ns). */
double kt_now(void);
#endif
