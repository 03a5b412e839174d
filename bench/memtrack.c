/* A tracking allocator for CPU memory benchmarks (bench/gram.py): LD_PRELOAD it and every heap
 * allocation of the process (torch's CPU allocator, std::vector, MKL's buffers...) goes through
 * these wrappers, which keep the live and peak bytes (malloc_usable_size of each block) in atomic
 * counters. memtrack_reset() sets the peak to the live bytes; memtrack_peak()/memtrack_live() read
 * them (via ctypes). glibc only (__libc_* entry points, malloc_usable_size). */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);

static _Atomic long live_bytes = 0, peak_bytes = 0;

static void add(void* p) {
  if (!p) return;
  long now = atomic_fetch_add(&live_bytes, (long)malloc_usable_size(p)) + (long)malloc_usable_size(p);
  long pk = atomic_load(&peak_bytes);
  while (now > pk && !atomic_compare_exchange_weak(&peak_bytes, &pk, now)) {
  }
}
static void sub(void* p) {
  if (p) atomic_fetch_sub(&live_bytes, (long)malloc_usable_size(p));
}

void* malloc(size_t n) { void* p = __libc_malloc(n); add(p); return p; }
void* calloc(size_t a, size_t b) { void* p = __libc_calloc(a, b); add(p); return p; }
void free(void* p) { sub(p); __libc_free(p); }
void* realloc(void* q, size_t n) {
  sub(q);
  void* p = __libc_realloc(q, n);
  if (p) add(p); else if (q && n) add(q);  /* failed: the old block is still live */
  return p;
}
void* memalign(size_t al, size_t n) { void* p = __libc_memalign(al, n); add(p); return p; }
void* aligned_alloc(size_t al, size_t n) { return memalign(al, n); }
int posix_memalign(void** out, size_t al, size_t n) {
  void* p = __libc_memalign(al, n);
  if (!p) return ENOMEM;
  add(p);
  *out = p;
  return 0;
}
void* valloc(size_t n) { return memalign(4096, n); }

void memtrack_reset(void) { atomic_store(&peak_bytes, atomic_load(&live_bytes)); }
long memtrack_peak(void) { return atomic_load(&peak_bytes); }
long memtrack_live(void) { return atomic_load(&live_bytes); }
