/* The host time of one ncclEpDispatch / ncclEpCombine / ncclEpComplete call, measured inside an
 * unchanged program (NVIDIA's ep_bench) against either library: LD_PRELOAD this object, it stands
 * in for the three functions, reads a CPU clock around the real one (found with RTLD_NEXT) and
 * prints percentiles per function when the process exits. Issue 15's "host time per
 * ncclEpDispatch", the same measure for both libraries in the same program.
 *
 * ep_bench runs --warmup paired iterations without CUPTI, then --iters with CUPTI's kernel
 * activity recording on (which makes every launch slower on the host). EP_HOST_TIMER_SPLIT=W (the
 * warmup count) reports the two windows apart: "warm" = calls [SKIP, W), the one a real caller
 * sees, and "timed" = calls [W, end). EP_HOST_TIMER_SKIP (default 3) leaves out the first calls
 * (JIT compilation, first-touch allocations).
 *
 * Build: cc -O2 -shared -fPIC -o host_timer.so host_timer.c -ldl
 * Output (stderr, one line per function and window):
 *   ep-host-timer pid=P fn=ncclEpDispatch window=warm n=N p10_us=.. p50_us=.. p90_us=..
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CALLS 65536

typedef int (*fn6)(void*, void*, void*, void*, void*, void*);
typedef int (*fn5)(void*, void*, void*, void*, void*);
typedef int (*fn3)(void*, void*, void*);

typedef struct {
  const char* name;
  int per_iter; /* calls per paired iteration: ncclEpComplete follows both phases */
  void* real;
  int n;
  double us[MAX_CALLS];
} Timed;

static Timed t_dispatch = {"ncclEpDispatch", 1, NULL, 0, {0}};
static Timed t_combine = {"ncclEpCombine", 1, NULL, 0, {0}};
static Timed t_complete = {"ncclEpComplete", 2, NULL, 0, {0}};

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static void* real_of(Timed* t) {
  if (!t->real) t->real = dlsym(RTLD_NEXT, t->name);
  if (!t->real) {
    fprintf(stderr, "ep-host-timer: %s not found after this object (is the library loaded?)\n", t->name);
    abort();
  }
  return t->real;
}

static void record(Timed* t, double us) {
  if (t->n < MAX_CALLS) t->us[t->n] = us;
  t->n++;
}

int ncclEpDispatch(void* h, void* in, void* out, void* layout, void* cfg, void* stream) {
  fn6 f = (fn6)real_of(&t_dispatch);
  double t0 = now_us();
  int rc = f(h, in, out, layout, cfg, stream);
  record(&t_dispatch, now_us() - t0);
  return rc;
}

int ncclEpCombine(void* h, void* in, void* out, void* cfg, void* stream) {
  fn5 f = (fn5)real_of(&t_combine);
  double t0 = now_us();
  int rc = f(h, in, out, cfg, stream);
  record(&t_combine, now_us() - t0);
  return rc;
}

int ncclEpComplete(void* h, void* cfg, void* stream) {
  fn3 f = (fn3)real_of(&t_complete);
  double t0 = now_us();
  int rc = f(h, cfg, stream);
  record(&t_complete, now_us() - t0);
  return rc;
}

static int cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static int env_int(const char* name, int dflt) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}

static void report_window(const Timed* t, const char* window, int lo, int hi) {
  int n = t->n < MAX_CALLS ? t->n : MAX_CALLS;
  if (hi > n) hi = n;
  if (lo >= hi) return;
  int m = hi - lo;
  double* v = malloc(sizeof(double) * (size_t)m);
  if (!v) return;
  memcpy(v, t->us + lo, sizeof(double) * (size_t)m);
  qsort(v, (size_t)m, sizeof(double), cmp_double);
  fprintf(stderr, "ep-host-timer pid=%d fn=%s window=%s n=%d p10_us=%.2f p50_us=%.2f p90_us=%.2f\n",
          (int)getpid(), t->name, window, m, v[m / 10], v[m / 2], v[(m * 9) / 10]);
  free(v);
}

__attribute__((destructor)) static void report(void) {
  int skip = env_int("EP_HOST_TIMER_SKIP", 3), split = env_int("EP_HOST_TIMER_SPLIT", 0);
  const Timed* all[] = {&t_dispatch, &t_combine, &t_complete};
  for (unsigned i = 0; i < sizeof all / sizeof all[0]; ++i) {
    if (split > 0) {
      int k = all[i]->per_iter;
      report_window(all[i], "warm", skip * k, split * k);
      report_window(all[i], "timed", split * k, all[i]->n);
    } else {
      report_window(all[i], "all", skip, all[i]->n);
    }
  }
}
