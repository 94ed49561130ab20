/* Shared by kldiv's C kernels (fused.c, rowstats.c): run-time ISA dispatch, fused multiply-add
 * contraction, and the vectorisable float32 exponential both use.
 *
 * No -march=native anywhere: functions marked KLDIV_CLONES are compiled for AVX-512
 * (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline, and the loader picks one (GCC ifuncs on
 * x86-64 Linux); elsewhere they are plain functions. */
#ifndef KLDIV_KL_SIMD_H
#define KLDIV_KL_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12
#define KLDIV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else /* older GCC has no arch levels; "avx2" alone would have no FMA */
#define KLDIV_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
#else
#define KLDIV_CLONES
#endif

/* -std=c11 turns off the contraction of a * b + c into fused multiply-adds; the polynomials are
 * written for it (one rounding less per step), so allow it in the including file. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

/* exp(xc) in float32 for xc already clamped to [-87, 88]: Cody-Waite reduction by ln 2 and a
 * degree-7 polynomial (Cephes expf coefficients), about 1 ulp. Callers decide what lies outside
 * the range (0 below, +inf or a clamp above). */
static inline float kl_expf_core(float xc)
{
    float t = xc * 1.44269504088896341f + 12582912.0f; /* round(x / ln 2) in the low bits */
    float n = t - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

#endif
