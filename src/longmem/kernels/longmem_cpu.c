/* longmem's fused CPU kernel: one pass over memory per optimizer step.
 *
 * An optimizer's update rule (written once in Python, against an `ops` object) is traced into a
 * short program of elementwise instructions (longmem/kernels/program.py). This file executes such a
 * program over blocks of BLOCK elements: every instruction runs over one block while it sits in L1,
 * so each parameter, gradient and state element crosses the memory bus once per step, instead of
 * once per torch operation as in the foreach path.
 *
 * The operations themselves, and their numerics, are in longmem_ops.h. This generic kernel runs any
 * program; cpu.py also generates a kernel specialized to one program, which keeps every value in
 * registers (faster), and falls back to this one where that kernel is not built.
 *
 * No torch or Python headers: this compiles in about a second with any C99 compiler and is loaded
 * with ctypes (which releases the GIL during a call, so Python threads can run it in parallel).
 */
#define _GNU_SOURCE /* dladdr, for longmem_openmp_library */
#include "longmem_ops.h"
#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#endif

#define BLOCK 512       /* elements per block: all operands of a block stay in L1 */
#define MAX_SLOTS 16    /* p, g, state buffers and temporaries of one program */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2 /* software prefetch this many blocks ahead (see longmem_run) */
#endif

/* One instruction over one block. */
static void run_instr(int op, float *d, const float *a, const float *b, const float *c, float s, int64_t n) {
    int64_t i;
    switch (op) {
#define LM_CASE(code, name) \
    case code: for (i = 0; i < n; i++) d[i] = lm_##name(a[i], b[i], c[i], s); break;
    LM_OPS(LM_CASE) /* LM_BODY_LOOP: one loop per operation */
#undef LM_CASE
    default: break;
    }
}

static void load_f32(float *restrict dst, const void *src, int dtype, int64_t off, int64_t n, int negate) {
    int64_t i;
    if (dtype == LM_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = lm_bf16_to_f32(s[i]); /* LM_BODY_LOOP */
    } else if (dtype == LM_F16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = lm_f16_to_f32(s[i]); /* LM_BODY_LOOP */
    } else {
        const float *s = (const float *)src + off;
        for (i = 0; i < n; i++) dst[i] = s[i]; /* a memcpy */
    }
    if (negate)
        for (i = 0; i < n; i++) dst[i] = -dst[i]; /* LM_BODY_LOOP */
}

/* Slots 0 and 1 of a block: the parameter and the gradient in place where they are float32 (and the
 * gradient not negated), else converted into the scratch rows p_row, g_row. */
static inline void point_at_p_and_g(float **slot, float *p_row, float *g_row, void *p, const void *g, int pdt,
                                    int gdt, int64_t off, int64_t n, int maximize) {
    if (pdt == LM_F32) {
        slot[0] = (float *)p + off;
    } else {
        load_f32(p_row, p, pdt, off, n, 0);
        slot[0] = p_row;
    }
    if (gdt == LM_F32 && !maximize) {
        slot[1] = (float *)g + off; /* never written: program.py rejects rules that do */
    } else {
        load_f32(g_row, g, gdt, off, n, maximize);
        slot[1] = g_row;
    }
}

/* Prefetch the bytes [off, off + len) of one stream into the cache, a line at a time. */
static inline void prefetch_range(const void *base, int64_t off_bytes, int64_t len_bytes) {
    const char *b = (const char *)base + off_bytes;
    for (int64_t k = 0; k < len_bytes; k += 64) __builtin_prefetch(b + k, 1, 3);
}

static void store_f32(void *dst, int dtype, int64_t off, const float *restrict src, int64_t n) {
    int64_t i;
    if (dtype == LM_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < n; i++) d[i] = lm_f32_to_bf16(src[i]); /* LM_BODY_LOOP */
    } else if (dtype == LM_F16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < n; i++) d[i] = lm_f32_to_f16(src[i]); /* LM_BODY_LOOP */
    }
}

/* ---- entry points ------------------------------------------------------------------------------ */

int longmem_abi_version(void) { return 1; }
int longmem_block(void) { return BLOCK; }

/* Increment each float32 step counter and return the new values (one call instead of two torch
 * operations per parameter). */
void longmem_advance_steps(float *const *steps, int64_t n, double *out) {
    for (int64_t i = 0; i < n; i++) {
        *steps[i] += 1.0f;
        out[i] = (double)*steps[i];
    }
}

/* Run a traced program over elements [begin, end) of the concatenation of n_tensors tensors.
 *
 * code:   n_instr rows of (op, d, a, b, c); slot 0 is the parameter, 1 the gradient,
 *         2 .. n_mem-1 the state buffers (float32), n_mem .. n_mem+n_temp-1 temporaries.
 * scalar: n_instr doubles, rounded to float here as torch rounds a Python scalar.
 * ptrs:   n_mem rows of n_tensors data pointers (row 0 parameters, row 1 gradients, ...).
 * numel, p_dtype, g_dtype: per tensor. maximize: negate the gradient as it is loaded.
 * Returns 0, or -1 for a program this kernel cannot run. */
int longmem_run(const int32_t *code, const double *scalar, int32_t n_instr, int32_t n_mem, int32_t n_temp,
                void *const *ptrs, const int64_t *numel, const int8_t *p_dtype, const int8_t *g_dtype,
                int32_t maximize, int64_t n_tensors, int64_t begin, int64_t end) {
    if (n_mem < 2 || n_mem + n_temp > MAX_SLOTS || n_instr < 0) return -1;
    for (int32_t k = 0; k < n_instr; k++)
        for (int j = 1; j < 5; j++)
            if (code[5 * k + j] < 0 || code[5 * k + j] >= n_mem + n_temp) return -1;

    float scal[256];
    if (n_instr > 256) return -1;
    for (int32_t k = 0; k < n_instr; k++) scal[k] = (float)scalar[k];

    /* temporaries and converted copies of p and g live here (36 KiB of stack, 64-byte aligned) */
    float scratch[MAX_SLOTS + 2][BLOCK] __attribute__((aligned(64)));
    float *slot[MAX_SLOTS];
    for (int32_t k = 0; k < n_temp; k++) slot[n_mem + k] = scratch[2 + k];

    int64_t start = 0; /* flat index of the current tensor's first element */
    for (int64_t t = 0; t < n_tensors && start < end; start += numel[t], t++) {
        int64_t lo = begin > start ? begin - start : 0;
        int64_t hi = end - start < numel[t] ? end - start : numel[t];
        if (lo >= hi) continue;
        void *p = ptrs[t];
        const void *g = ptrs[n_tensors + t];
        int pdt = p_dtype[t], gdt = g_dtype[t];
        int psz = pdt == LM_F32 ? 4 : 2, gsz = gdt == LM_F32 ? 4 : 2;
        for (int64_t off = lo; off < hi; off += BLOCK) {
            int64_t n = hi - off < BLOCK ? hi - off : BLOCK;
            /* Hardware prefetchers stop at 4 KiB page boundaries and wait for the program's own
             * misses; asking for a later block of every stream now keeps the memory system busy
             * while this block computes. */
            int64_t ahead = off + PREFETCH_BLOCKS * BLOCK;
            if (ahead < hi) {
                int64_t m = hi - ahead < BLOCK ? hi - ahead : BLOCK;
                prefetch_range(p, ahead * psz, m * psz);
                prefetch_range(g, ahead * gsz, m * gsz);
                for (int32_t k = 2; k < n_mem; k++) prefetch_range(ptrs[(int64_t)k * n_tensors + t], ahead * 4, m * 4);
            }
            point_at_p_and_g(slot, scratch[0], scratch[1], p, g, pdt, gdt, off, n, maximize);
            for (int32_t k = 2; k < n_mem; k++) slot[k] = (float *)ptrs[(int64_t)k * n_tensors + t] + off;
            for (int32_t k = 0; k < n_instr; k++) {
                const int32_t *ins = code + 5 * k;
                run_instr(ins[0], slot[ins[1]], slot[ins[2]], slot[ins[3]], slot[ins[4]], scal[k], n);
            }
            if (pdt != LM_F32) store_f32(p, pdt, off, scratch[0], n);
        }
    }
    return 0;
}

/* ---- lean state (state_precision "bf16"/"8bit") and stochastically rounded parameters -------------
 *
 * longmem_run_lean runs a program as longmem_run does, block by block, on state buffers stored in a
 * lean form (form[k]: LM_FORM_*, per buffer slot), and writes bf16/fp16 parameters back with
 * stochastic rounding when `stochastic` is set. Blocks are the 8-bit blocks (LEAN_BLOCK elements):
 * each buffer is decoded into a scratch row (8-bit: with the block's absmax), the program runs, and
 * each buffer it wrote is encoded back (8-bit: with the absmax of the block's new values), all in
 * L1. The noise is that of the generated lean kernels (cpu.py: lean_source), bit for bit.
 *
 * ptrs: as longmem_run, then one row per buffer slot of its 8-bit scales (NULL for other forms).
 * position: per tensor; stream: per buffer slot, then the parameter's; step: the step the rule runs at.
 * Returns 0, -1 for a program or form this kernel cannot run, -2 for a range not starting on a block. */

#define LEAN_BLOCK 256
enum { LM_FORM_F32 = 0, LM_FORM_BF16 = 1, LM_FORM_S8 = 2, LM_FORM_U8 = 3 };

static void decode_block(float *restrict dst, const void *src, int form, float absmax, int64_t off, int64_t n) {
    int64_t i;
    if (form == LM_FORM_BF16) {
        load_f32(dst, src, LM_BF16, off, n, 0);
    } else if (form == LM_FORM_S8) {
        const int8_t *s = (const int8_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = lm_dec_s8(s[i], absmax); /* LM_BODY_LOOP */
    } else {
        const uint8_t *s = (const uint8_t *)src + off;
        for (i = 0; i < n; i++) dst[i] = lm_dec_u8(s[i], absmax); /* LM_BODY_LOOP */
    }
}

/* Encode a block; returns its new absmax (8-bit forms). */
static float encode_block(void *dst, int form, const float *restrict src, int64_t off, int64_t n,
                          const uint32_t *key) {
    int64_t i;
    /* the noise of element off + i, carried by the loops: one add per element */
    uint32_t w = lm_noise((uint32_t)off, lm_block_key((uint32_t)((uint64_t)off >> 32), key[0], key[1]));
    if (form == LM_FORM_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < n; i++, w += LM_WEYL) d[i] = lm_f32_to_bf16_sr(src[i], w); /* LM_BODY_LOOP */
        return 0.0f;
    }
    uint32_t m = 0;
    for (i = 0; i < n; i++) m = m > lm_absbits(src[i]) ? m : lm_absbits(src[i]); /* LM_BODY_LOOP */
    const float absmax = lm_from_bits(m), inv = lm_inv_absmax(absmax);
    if (form == LM_FORM_S8) {
        int8_t *d = (int8_t *)dst + off;
        for (i = 0; i < n; i++, w += LM_WEYL) d[i] = lm_enc_s8(src[i], inv, w); /* LM_BODY_LOOP */
    } else {
        uint8_t *d = (uint8_t *)dst + off;
        for (i = 0; i < n; i++, w += LM_WEYL) d[i] = lm_enc_u8(src[i], inv, w); /* LM_BODY_LOOP */
    }
    return absmax;
}

static void store_rounded(void *dst, int dtype, int64_t off, const float *restrict src, int64_t n,
                          const uint32_t *key) {
    int64_t i;
    uint32_t w = lm_noise((uint32_t)off, lm_block_key((uint32_t)((uint64_t)off >> 32), key[0], key[1]));
    uint16_t *d = (uint16_t *)dst + off;
    if (dtype == LM_BF16) {
        for (i = 0; i < n; i++, w += LM_WEYL) d[i] = lm_f32_to_bf16_sr(src[i], w); /* LM_BODY_LOOP */
    } else if (dtype == LM_F16) {
        for (i = 0; i < n; i++, w += LM_WEYL) d[i] = lm_f32_to_f16_sr(src[i], w); /* LM_BODY_LOOP */
    }
}

int longmem_run_lean(const int32_t *code, const double *scalar, int32_t n_instr, int32_t n_mem, int32_t n_temp,
                     void *const *ptrs, const int64_t *numel, const int8_t *p_dtype, const int8_t *g_dtype,
                     int32_t maximize, int64_t n_tensors, int64_t begin, int64_t end, const int8_t *form,
                     const int64_t *position, const int32_t *stream, double step, int32_t stochastic) {
    if (n_mem < 2 || n_mem + n_temp > MAX_SLOTS || n_instr < 0 || n_instr > 256) return -1;
    int written[MAX_SLOTS] = {0};
    for (int32_t k = 0; k < n_instr; k++) {
        for (int j = 1; j < 5; j++)
            if (code[5 * k + j] < 0 || code[5 * k + j] >= n_mem + n_temp) return -1;
        written[code[5 * k + 1]] = 1;
    }
    for (int32_t k = 2; k < n_mem; k++)
        if (form[k - 2] < LM_FORM_F32 || form[k - 2] > LM_FORM_U8) return -1;
    float scal[256];
    for (int32_t k = 0; k < n_instr; k++) scal[k] = (float)scalar[k];

    /* rows: 0 p, 1 g, then temporaries, then decoded buffers (n_mem + n_temp <= MAX_SLOTS rows) */
    float scratch[MAX_SLOTS][LEAN_BLOCK] __attribute__((aligned(64)));
    float *slot[MAX_SLOTS];
    for (int32_t k = 0; k < n_temp; k++) slot[n_mem + k] = scratch[2 + k];
    const int32_t n_streams = n_mem - 1;

    int64_t start = 0;
    for (int64_t t = 0; t < n_tensors && start < end; start += numel[t], t++) {
        int64_t lo = begin > start ? begin - start : 0;
        int64_t hi = end - start < numel[t] ? end - start : numel[t];
        if (lo >= hi) continue;
        if (lo % LEAN_BLOCK) return -2;
        uint32_t key[2 * MAX_SLOTS];
        for (int32_t j = 0; j < n_streams; j++) {
            uint64_t k64 = lm_noise_key(step, position[t], (uint32_t)stream[j]);
            key[2 * j] = (uint32_t)k64;
            key[2 * j + 1] = (uint32_t)(k64 >> 32);
        }
        void *p = ptrs[t];
        const void *g = ptrs[n_tensors + t];
        int pdt = p_dtype[t], gdt = g_dtype[t];
        for (int64_t off = lo; off < hi; off += LEAN_BLOCK) {
            int64_t n = hi - off < LEAN_BLOCK ? hi - off : LEAN_BLOCK;
            point_at_p_and_g(slot, scratch[0], scratch[1], p, g, pdt, gdt, off, n, maximize);
            for (int32_t k = 2; k < n_mem; k++) {
                void *buf = ptrs[(int64_t)k * n_tensors + t];
                float *scale = (float *)ptrs[(int64_t)(n_mem + k - 2) * n_tensors + t];
                if (form[k - 2] == LM_FORM_F32) {
                    slot[k] = (float *)buf + off;
                } else {
                    slot[k] = scratch[n_temp + k];
                    decode_block(slot[k], buf, form[k - 2], scale ? scale[off / LEAN_BLOCK] : 0.0f, off, n);
                }
            }
            for (int32_t k = 0; k < n_instr; k++) {
                const int32_t *ins = code + 5 * k;
                run_instr(ins[0], slot[ins[1]], slot[ins[2]], slot[ins[3]], slot[ins[4]], scal[k], n);
            }
            for (int32_t k = 2; k < n_mem; k++) {
                if (form[k - 2] == LM_FORM_F32 || !written[k]) continue;
                float absmax = encode_block(ptrs[(int64_t)k * n_tensors + t], form[k - 2], slot[k], off, n,
                                            key + 2 * (k - 2));
                if (form[k - 2] != LM_FORM_BF16)
                    ((float *)ptrs[(int64_t)(n_mem + k - 2) * n_tensors + t])[off / LEAN_BLOCK] = absmax;
            }
            if (pdt != LM_F32) {
                if (stochastic) store_rounded(p, pdt, off, scratch[0], n, key + 2 * (n_streams - 1));
                else store_f32(p, pdt, off, scratch[0], n);
            }
        }
    }
    return 0;
}

/* ---- running a kernel on several threads -------------------------------------------------------
 *
 * longmem_parallel runs one of the entry points above (or a generated kernel's) over `parts` ranges
 * [cuts[k], cuts[k+1]) of the concatenation, one per thread of an OpenMP team. Built with -fopenmp
 * where the compiler takes it (cpu.py), this is the OpenMP runtime that torch's CPU operations use
 * (libgomp, loaded once per process), so a step reuses the threads torch keeps spinning after its
 * own parallel regions instead of competing with them for the cores. Without OpenMP the ranges run
 * one after another (cpu.py then uses Python threads instead and never calls this).
 *
 * a: the entry point's arguments other than (begin, end), as 64-bit words in order; d: its double.
 * kind: LM_KIND_* below. Returns 0, or the first non-zero result of a range. */
#define LM_KIND_PROGRAM 0     /* longmem_kernel (a generated kernel) */
#define LM_KIND_LEAN_PROGRAM 1 /* longmem_lean_kernel (a generated lean kernel) */
#define LM_KIND_RUN 2         /* longmem_run */
#define LM_KIND_RUN_LEAN 3    /* longmem_run_lean */

typedef int (*lm_program_fn)(void *const *, const int64_t *, const int8_t *, const double *, int32_t, int64_t,
                             int64_t, int64_t);
typedef int (*lm_lean_program_fn)(void *const *, const int64_t *, const int8_t *, const double *, int32_t,
                                  int64_t, int64_t, int64_t, const int64_t *, const int32_t *, double);

#define LM_P(k, type) ((type)(intptr_t)a[k])

static int lm_run_range(int32_t kind, void *fn, const int64_t *a, double d, int64_t begin, int64_t end) {
    switch (kind) {
    case LM_KIND_PROGRAM:
        return ((lm_program_fn)fn)(LM_P(0, void *const *), LM_P(1, const int64_t *), LM_P(2, const int8_t *),
                                   LM_P(3, const double *), (int32_t)a[4], a[5], begin, end);
    case LM_KIND_LEAN_PROGRAM:
        return ((lm_lean_program_fn)fn)(LM_P(0, void *const *), LM_P(1, const int64_t *), LM_P(2, const int8_t *),
                                        LM_P(3, const double *), (int32_t)a[4], a[5], begin, end,
                                        LM_P(6, const int64_t *), LM_P(7, const int32_t *), d);
    case LM_KIND_RUN:
        return longmem_run(LM_P(0, const int32_t *), LM_P(1, const double *), (int32_t)a[2], (int32_t)a[3],
                           (int32_t)a[4], LM_P(5, void *const *), LM_P(6, const int64_t *), LM_P(7, const int8_t *),
                           LM_P(8, const int8_t *), (int32_t)a[9], a[10], begin, end);
    case LM_KIND_RUN_LEAN:
        return longmem_run_lean(LM_P(0, const int32_t *), LM_P(1, const double *), (int32_t)a[2], (int32_t)a[3],
                                (int32_t)a[4], LM_P(5, void *const *), LM_P(6, const int64_t *),
                                LM_P(7, const int8_t *), LM_P(8, const int8_t *), (int32_t)a[9], a[10], begin, end,
                                LM_P(11, const int8_t *), LM_P(12, const int64_t *), LM_P(13, const int32_t *), d,
                                (int32_t)a[14]);
    default:
        return -1;
    }
}

int longmem_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The file of the OpenMP runtime this library's calls go to ("" without OpenMP): cpu.py checks that
 * it is torch's, not a second runtime that happens to be loaded (scikit-learn ships its own). */
const char *longmem_openmp_library(void) {
#ifdef _OPENMP
    Dl_info info;
    if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
#endif
    return "";
}

int longmem_parallel(int32_t kind, void *fn, const int64_t *a, double d, const int64_t *cuts, int32_t parts) {
    int rc = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
#endif
    for (int32_t k = 0; k < parts; k++) {
        int r = lm_run_range(kind, fn, a, d, cuts[k], cuts[k + 1]);
        if (r != 0) {
#ifdef _OPENMP
#pragma omp critical(longmem_rc)
#endif
            if (rc == 0) rc = r;
        }
    }
    return rc;
}
