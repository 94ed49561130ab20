/* kldiv._ext._fused: KL(p || q) between two softmax distributions, row by row, with gradients.
 *
 * For each row r of two (n, V) arrays of log-space inputs x (p's logits or log-probabilities)
 * and y (q's), at temperature T (x/T, y/T are log-softmaxed), it computes KL(p || q) with the
 * core's cancellation-free algorithm (see kldiv/_core/divergence.py) and, in the same walk,
 * the gradients of s_r * KL_r with respect to x and y:
 *
 *     dKL/dy_i = (q_i - p_i) / T,        dKL/dx_i = -p_i * d'_i / T,
 *
 * where d_i = y_i/T - x_i/T on the common support, d' = d - E_p[d] (the centred log-ratio) and
 *
 *     KL = log(1 + sum_i p_i phi(d'_i)) - log q(S),   phi(u) = e^u - 1 - u >= 0,
 *
 * S being p's support and q(S) q's mass on it. Each side is first centred on its own maximum
 * (a_i = (x_i - max x)/T, b_i = (y_i - max y)/T) and the log-ratio is formed relative to its value
 * at an entry r where x is largest, ((y_i - x_i) - (y_r - x_r))/T, with both differences exact
 * (TwoSum): a huge common offset of one side (masking with -1e30 or finfo.min, logits of 1e30)
 * cannot swallow the other side's values, nor a huge distance between the two sides' maxima
 * (KL of 1e30) the part of the log-ratio that varies where p lives. phi is evaluated
 * by its Taylor series for |u| < 0.5 and as p_i e^{d'_i} - p_i (1 + d'_i) otherwise, where
 * p_i e^{d'_i} equals e^{b_i} * e^{-log Zx - E_p[d]}: a row constant times a value already
 * computed, so that each element costs two exponentials in all.
 *
 * Three passes per row: (1) the maxima and minima; (2) the exponentials (kept in a per-thread
 * scratch of 3 V values), the normalisers, E_p[d] and q's mass outside S; (3) over the scratch:
 * the series, then the gradients (q - p from the series where it is used: full relative
 * accuracy near convergence). The third pass reads only the scratch, so a gradient may be
 * written over its own input (kl_div_inplace). Edges: p_i > 0 = q_i gives +inf with zero gradients (as the core); an
 * all -inf, +inf or nan row, a row whose values span more than the type holds, and a row where
 * a p_i that underflows here meets a log-ratio beyond 2^20 (p_i |d_i| may still matter) are
 * reported as nan before any gradient of that row is written: Python recomputes them (float64,
 * or nan for nan input). Rows with KL beyond ~57 (float) or ~678 (double), where the constant
 * above leaves T's range, take KL = log Zy - log Zx - E_p[d] instead: no cancellation there.
 *
 * Portable build: no -march=native. The row function is compiled for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2 + FMA) and the baseline (GCC target_clones, chosen at load time). exp is a
 * polynomial that the compiler vectorises (no libm call in the hot loops). OpenMP over rows,
 * GIL released. This file includes itself once per element type (float, double).
 */
#ifndef KLDIV_FUSED_TEMPLATE

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kl_simd.h" /* KLDIV_CLONES, FMA contraction, kl_expf_core */
#define KLDIV_INLINE static inline __attribute__((always_inline))

/* blocks of this many elements are summed in the element type, the blocks in double */
#define KLDIV_BLOCK 1024

/* exp(x) for float: 0 below -87 (and for -inf), nan stays nan; about 1 ulp elsewhere (clamped
 * to e^88 above). */
KLDIV_INLINE float kexp_f(float x)
{
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    return x < -87.0f ? 0.0f : kl_expf_core(xc);
}

/* exp(x) for double: 0 below -708 (and for -inf), nan stays nan; about 1 ulp elsewhere. */
KLDIV_INLINE double kexp_d(double x)
{
    double xc = x < -708.0 ? -708.0 : x;
    xc = xc > 709.0 ? 709.0 : xc;
    double t = xc * 1.4426950408889634 + 6755399441055744.0;
    double n = t - 6755399441055744.0;
    double r = xc - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    static const double c[14] = {
        1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
        1.0 / 6.0, 0.5, 1.0, 1.0};
    double e = c[0];
    for (int k = 1; k < 14; k++)
        e = e * r + c[k];
    int64_t ti;
    memcpy(&ti, &t, sizeof ti);
    int64_t bits = (ti - INT64_C(0x4338000000000000) + 1023) << 52;
    double s;
    memcpy(&s, &bits, sizeof s);
    return x < -708.0 ? 0.0 : e * s;
}

/* 1/n!, n = 17 .. 2: phi(u) = u^2 * sum_n u^(n-2)/n! */
static const double kphi[16] = {
    1.0 / 355687428096000.0, 1.0 / 20922789888000.0, 1.0 / 1307674368000.0,
    1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
    1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
    1.0 / 24.0, 1.0 / 6.0, 0.5};

#define KLDIV_FUSED_TEMPLATE

#define T float
#define SFX _f
#define KEXP kexp_f
#define KFABS fabsf
#define NPHI 7          /* terms up to u^8: truncation below 5e-8 relative for |u| < 0.5 */
#define EXP_FLOOR 87.0  /* kexp_f returns 0 below -EXP_FLOOR */
#define SPAN_MAX 3.4028235677973366e38 /* FLT_MAX (1 + 2^-25): below it, x - y rounds finite */
#define D_CLAMP 8.5e37  /* |log-ratio| held below FLT_MAX / 4: no inf or nan in the passes */
#define D_RISK 1048576.0 /* larger |d| at an underflowed p_i: the row goes to float64 */
#define KL_REL 0x1p-30  /* ... unless p_i |d_i| summed stays below KL_REL * KL */
#include "fused.c" /* this file, once per element type */
#undef T
#undef SFX
#undef KEXP
#undef KFABS
#undef NPHI
#undef EXP_FLOOR
#undef SPAN_MAX
#undef D_CLAMP
#undef D_RISK
#undef KL_REL

#define T double
#define SFX _d
#define KEXP kexp_d
#define KFABS fabs
#define NPHI 16
#define EXP_FLOOR 708.0
#define SPAN_MAX 1.7976931348623157e308
#define D_CLAMP 4.4e307
#define D_RISK 1048576.0
#define KL_REL 0x1p-60
#include "fused.c" /* this file, once per element type */
#undef T
#undef SFX
#undef KEXP
#undef KFABS
#undef NPHI
#undef EXP_FLOOR
#undef SPAN_MAX
#undef D_CLAMP
#undef D_RISK
#undef KL_REL

#undef KLDIV_FUSED_TEMPLATE

static PyObject *py_rows(PyObject *self, PyObject *args)
{
    int is_double, nthreads;
    Py_ssize_t n, V, xs, ys, gxs, gys;
    unsigned long long xp, yp, sp, rp, gxp, gyp;
    double inv_t;
    (void)self;
    if (!PyArg_ParseTuple(args, "innKnKndKKKnKni", &is_double, &n, &V, &xp, &xs, &yp, &ys,
                          &inv_t, &sp, &rp, &gxp, &gxs, &gyp, &gys, &nthreads))
        return NULL;
    if (!(inv_t > 0.0) || !isfinite(inv_t)) {
        PyErr_Format(PyExc_ValueError,
                     "kldiv._ext._fused.rows: inv_t (1 / temperature) must be positive and "
                     "finite, got %R (callers keep temperatures within [1e-30, 1e30])",
                     PyTuple_GET_ITEM(args, 7));
        return NULL;
    }
    if (n < 0 || V <= 0 || !xp || !yp || !rp) {
        PyErr_SetString(PyExc_ValueError, "kldiv._ext._fused.rows: invalid arguments");
        return NULL;
    }
    if (nthreads < 1)
        nthreads = 1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        err = run_d((const double *)(uintptr_t)xp, xs, (const double *)(uintptr_t)yp, ys, n, V,
                    inv_t, (const double *)(uintptr_t)sp, (double *)(uintptr_t)rp,
                    (double *)(uintptr_t)gxp, gxs, (double *)(uintptr_t)gyp, gys, nthreads);
    else
        err = run_f((const float *)(uintptr_t)xp, xs, (const float *)(uintptr_t)yp, ys, n, V,
                    inv_t, (const double *)(uintptr_t)sp, (double *)(uintptr_t)rp,
                    (float *)(uintptr_t)gxp, gxs, (float *)(uintptr_t)gyp, gys, nthreads);
    Py_END_ALLOW_THREADS
    if (err)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS,
     "rows(is_double, n, V, x_ptr, x_stride, y_ptr, y_stride, inv_t, scale_ptr, rows_ptr,\n"
     "     gx_ptr, gx_stride, gy_ptr, gy_stride, nthreads)\n\n"
     "KL(p || q) per row of softmax(x / T) and softmax(y / T) into rows (float64), and the\n"
     "gradients of sum_r scale[r] * KL_r with respect to x and y into gx, gy (0: not wanted).\n"
     "Rows with scale 0 are skipped (value 0, gradient 0). Pointers are raw addresses of\n"
     "row-major arrays with unit stride along V; strides are in elements. nan marks a row\n"
     "that the caller must recompute (its gradients are untouched)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_fused",
                                 "kldiv C kernels: fused softmax KL rows with gradients", -1,
                                 methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&mod); }

#else /* KLDIV_FUSED_TEMPLATE: the kernel for element type T */

#define KCAT_(a, b) a##b
#define KCAT(a, b) KCAT_(a, b)
#define FN(name) KCAT(name, SFX)

/* phi(u) = e^u - 1 - u by its series (|u| < 0.5) */
KLDIV_INLINE T FN(phi_series)(T u)
{
    T acc = (T)kphi[16 - NPHI];
    for (int k = 16 - NPHI + 1; k < 16; k++)
        acc = acc * u + (T)kphi[k];
    return acc * u * u;
}

/* Pass 3a over one block: the series, from the scratch only; returns the block's sum of
 * p phi(d'). dense: the row has no -inf (every sd[i] is a number). With store, sq[i] becomes
 * d'_i + phi(d'_i) = expm1(d'_i) where the series is used, for pass 3b. */
KLDIV_INLINE T FN(pass3a)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp, T *restrict sq,
                          const T *restrict sd, T muT, T ip, T c, const int store,
                          const int dense)
{
    T a = 0;
#pragma omp simd reduction(+ : a)
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const T dc = (in ? dv : (T)0) - muT;
        const T p = sp[i] * ip;
        const int small = KFABS(dc) < (T)0.5;
        const T ser = FN(phi_series)(small ? dc : (T)0);
        const T term = small ? p * ser : c * sq[i] - p * (1 + dc);
        a += in ? term : (T)0;
        if (store)
            sq[i] = (in & small) ? dc + ser : sq[i];
    }
    return a;
}

/* Pass 3b over one block: the gradients, from the scratch only (so a gradient may overwrite
 * its own input). q_i - p_i = p_i expm1(d'_i - KL) = p_i ((d'_i + phi(d'_i)) E + M) with
 * E = e^-KL, M = expm1(-KL) where the series was used: near convergence q - p keeps full
 * relative accuracy (a difference of two softmaxes would keep eps / |d'|); elsewhere
 * (e^b_i Zx/Zy - e^a_i) / Zx, exactly 0 where p = q. */
KLDIV_INLINE void FN(pass3b)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                             const T *restrict sq, const T *restrict sd, T *restrict gx,
                             T *restrict gy, T muT, T rq, T ipg, T E, T M, const int want_x,
                             const int want_y, const int dense)
{
#pragma omp simd
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const T dc = (in ? dv : (T)0) - muT;
        const int small = KFABS(dc) < (T)0.5;
        const T pg = sp[i] * ipg;
        if (want_y) /* (q_i - p_i) g */
            gy[i] = (in & small) ? pg * (sq[i] * E + M) : (sq[i] * rq - sp[i]) * ipg;
        if (want_x)
            gx[i] = in ? -pg * dc : (T)0; /* -p_i d'_i g */
    }
}

/* One row; returns KL (double), +inf on escape, nan for "recompute me" (gradients untouched).
 *
 * Each side is centred on its own maximum before anything else: a_i = (x_i - max x) / T and
 * b_i = (y_i - max y) / T (both <= 0), and the log-ratio D_i = b_i - a_i is formed as
 * (y_i - x_i) + (max x - max y) with both differences exact (TwoSum), so that neither a common
 * offset of one side (1e4, 1e30, finfo.min) nor the other side's magnitude swallows it. Rows the
 * element type cannot hold without overflow (a span of values beyond the type's maximum), and
 * rows where an entry whose weight p_i underflows here meets a huge log-ratio (p_i |d_i| may
 * then matter: a teacher's e^-90 against a student's finfo.min), are left to the caller's
 * float64 path: nan is returned before any gradient is written. */
KLDIV_CLONES static double FN(kl_row)(const T *x, const T *y, Py_ssize_t V, double inv_t,
                                      double s, T *gx, T *gy, T *restrict sp, T *restrict sq,
                                      T *restrict sd, const T *xn, const T *yn)
{
    const T it = (T)inv_t;
    const T ninf = (T)-INFINITY, pinf = (T)INFINITY;
    T mx = ninf, my = ninf, lx = pinf, ly = pinf;
#pragma omp simd reduction(max : mx, my) reduction(min : lx, ly)
    for (Py_ssize_t i = 0; i < V; i++) {
        const T xv = x[i], yv = y[i];
        mx = xv > mx ? xv : mx;
        my = yv > my ? yv : my;
        lx = xv < lx ? xv : lx;
        ly = yv < ly ? yv : ly;
    }
    const int dense = lx > ninf && ly > ninf; /* no -inf anywhere: no support masks needed */
    if (!dense) { /* the smallest finite values, for the span check below */
        lx = pinf;
        ly = pinf;
#pragma omp simd reduction(min : lx, ly)
        for (Py_ssize_t i = 0; i < V; i++) {
            const T xf = x[i] > ninf ? x[i] : pinf, yf = y[i] > ninf ? y[i] : pinf;
            lx = xf < lx ? xf : lx;
            ly = yf < ly ? yf : ly;
        }
    }
    if (!(mx > ninf) || !(my > ninf) || !(mx < pinf) || !(my < pinf))
        return NAN; /* an all -inf row (no distribution) or +inf: the caller decides */
    {           /* every difference below is bounded by this span: no overflow when it fits */
        const double hi = mx > my ? (double)mx : (double)my;
        const double lo = lx < ly ? (double)lx : (double)ly;
        if (!(hi - lo <= SPAN_MAX))
            return NAN;
    }
    /* the log-ratio is taken relative to its value at a reference entry r where x is largest:
     * t_i = (y_i - x_i) - (y_r - x_r), from exact differences (TwoSum), so that neither side's
     * magnitude (logits of 1e30, masks of -1e30 or finfo.min, a common offset) nor the distance
     * between the two maxima swallows what varies where p lives; D_r = y_r - max y puts it back
     * in the row constants (in double) */
    Py_ssize_t ref = 0;
    while (ref < V - 1 && !(x[ref] == mx))
        ref++;
    const T yr = y[ref] > ninf ? y[ref] : mx; /* y_r = -inf: the row escapes (+inf) */
    const T d0h = yr - mx;
    const T d0b = d0h - yr;
    const T d0l = (yr - (d0h - d0b)) + (-mx - d0b);
    const double Dref = ((double)yr - (double)my) * inv_t;
    const T CL = (T)D_CLAMP;

    double Zx = 0, Zy = 0, S1 = 0, ZqS = 0, Zqo = 0;
    int esc = 0, risk = 0;
    for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
        const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
        if (xn) /* the next row: fetched from memory while this block computes exponentials */
            for (Py_ssize_t i = b0; i < b1; i += 64 / sizeof(T)) {
                __builtin_prefetch(xn + i, 0, 2);
                __builtin_prefetch(yn + i, 0, 2);
            }
        T zx = 0, zy = 0, s1 = 0, zqs = 0, zqo = 0, rk = 0; /* rk: the largest |d| */
        int e = 0;
        if (dense) {
#pragma omp simd reduction(+ : zx, zy, s1) reduction(max : rk)
            for (Py_ssize_t i = b0; i < b1; i++) {
                const T xv = x[i], yv = y[i];
                const T a = (xv - mx) * it, b = (yv - my) * it;
                const T ep = KEXP(a), eq = KEXP(b);
                const T sv = yv - xv, bb = sv - yv;
                const T er = (yv - (sv - bb)) + (-xv - bb); /* y - x = sv + er exactly */
                const T dd = ((sv - d0h) + (er - d0l)) * it;
                const T d = dd > CL ? CL : (dd < -CL ? -CL : dd);
                const T ad = KFABS(d);
                rk = ad > rk ? ad : rk;
                zx += ep;
                zy += eq;
                s1 += ep * d;
                sp[i] = ep;
                sq[i] = eq;
                sd[i] = d;
            }
            zqs = zy;
        } else {
#pragma omp simd reduction(+ : zx, zy, s1, zqs, zqo) reduction(| : e) reduction(max : rk)
            for (Py_ssize_t i = b0; i < b1; i++) {
                const T xv = x[i], yv = y[i];
                const int px = xv > ninf, py = yv > ninf;
                const int in = px & py;
                const T a = (xv - mx) * it, b = (yv - my) * it;
                const T ep = KEXP(a), eq = KEXP(b);
                const T sv = yv - xv, bb = sv - yv;
                const T er = (yv - (sv - bb)) + (-xv - bb);
                const T dd = ((sv - d0h) + (er - d0l)) * it;
                const T dcl = dd > CL ? CL : (dd < -CL ? -CL : dd);
                const T d = in ? dcl : (T)0;
                const T ad = KFABS(d);
                rk = ad > rk ? ad : rk;
                zx += ep;
                zy += eq;
                s1 += ep * d;
                zqs += in ? eq : (T)0;
                zqo += px ? (T)0 : eq;
                e |= px & !py;
                sp[i] = ep;
                sq[i] = eq;
                sd[i] = in ? d : (T)NAN;
            }
        }
        Zx += zx;
        Zy += zy;
        S1 += s1;
        ZqS += zqs;
        Zqo += zqo;
        esc |= e;
        risk |= rk > (T)D_RISK;
    }
    if (!isfinite(Zx) || !isfinite(Zy) || !isfinite(S1))
        return NAN; /* nan in the input, or sums beyond the type */
    if (esc) {      /* p_i > 0 = q_i: KL = +inf, zero gradient (the core's convention) */
        if (gx)
            memset(gx, 0, (size_t)V * sizeof(T));
        if (gy)
            memset(gy, 0, (size_t)V * sizeof(T));
        return INFINITY;
    }
    const double mu = S1 / Zx; /* E_p[t] / T; E_p[d] = mu + Dref */
    if (risk) { /* some |d| beyond 2^20: does it meet a p_i that underflows here? */
        const T RA = (T) - (EXP_FLOOR + 250.0), FL = (T)-EXP_FLOOR, CL = (T)D_CLAMP;
        double B = 0; /* bound on the neglected sum of p_i |d_i| (times Zx) */
        for (Py_ssize_t i = 0; i < V; i++) {
            const T dv = sd[i], ad = KFABS(dv);
            if (!(dv == dv) || !(ad > (T)D_RISK))
                continue;
            const T a = (x[i] - mx) * it;
            if (a >= FL) {
                if (ad >= CL) /* clamped where p_i counts */
                    return NAN;
            } else if (a > RA) {
                B += exp((double)a + log((double)ad));
            }
        }
        /* KL = log Zy - log Zx - E_p[d]: what was neglected must not show at T's precision */
        const double kest = log(Zy) - log(Zx) - mu - Dref;
        if (B / Zx > KL_REL * (kest > 0 ? kest : 0.0))
            return NAN;
    }
    const double qo = Zqo / Zy;
    const double log_qS = qo < 0.5 ? log1p(-qo) : log(ZqS / Zy);
    const double lc = -log(Zx) - mu - Dref; /* p_i e^{d'_i} = e^{lc} * sq[i] */
    /* KL >= lc: past this bound the series brings nothing (its terms would underflow or
     * overflow T) and KL = log Zy - log Zx - E_p[d] = lc + log Zy has no cancellation */
    const int huge = lc > EXP_FLOOR - 30.0;
    const T c = huge ? (T)0 : (T)exp(lc), ip = (T)(1.0 / Zx), muT = (T)mu;
    const T rq = (T)(Zx / Zy), ipg = (T)(s * inv_t / Zx);
    const int store = gy != NULL;
    double acc = 0;
    for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
        const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
        T a;
        if (dense)
            a = store ? FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 1, 1)
                      : FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 0, 1);
        else
            a = store ? FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 1, 0)
                      : FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 0, 0);
        acc += a;
    }
    const double kl = huge ? lc + log(Zy) : log1p(acc) - log_qS;
    if (gx || gy) {
        const T E = (T)exp(-kl), M = (T)expm1(-kl);
        for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
            const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
#define KLDIV_P3B(wx, wy, dn) FN(pass3b)(b0, b1, sp, sq, sd, gx, gy, muT, rq, ipg, E, M, wx, wy, dn)
            if (dense) {
                if (gx && gy)
                    KLDIV_P3B(1, 1, 1);
                else if (gy)
                    KLDIV_P3B(0, 1, 1);
                else
                    KLDIV_P3B(1, 0, 1);
            } else {
                if (gx && gy)
                    KLDIV_P3B(1, 1, 0);
                else if (gy)
                    KLDIV_P3B(0, 1, 0);
                else
                    KLDIV_P3B(1, 0, 0);
            }
#undef KLDIV_P3B
        }
    }
    return kl;
}

/* All rows, OpenMP over rows; returns nonzero when a scratch buffer could not be allocated. */
static int FN(run)(const T *x, Py_ssize_t xs, const T *y, Py_ssize_t ys, Py_ssize_t n,
                   Py_ssize_t V, double inv_t, const double *scale, double *rows, T *gx,
                   Py_ssize_t gxs, T *gy, Py_ssize_t gys, int nthreads)
{
    int err = 0;
    const size_t bytes = ((3 * (size_t)V * sizeof(T) + 63) / 64) * 64;
    if (nthreads > n)
        nthreads = n > 0 ? (int)n : 1;
#pragma omp parallel num_threads(nthreads)
    {
        T *buf = (T *)aligned_alloc(64, bytes);
        if (!buf) {
#pragma omp atomic write
            err = 1;
        }
#pragma omp for schedule(dynamic, 16)
        for (Py_ssize_t r = 0; r < n; r++) {
            const double s = scale ? scale[r] : 1.0;
            T *gxr = gx ? gx + r * gxs : NULL;
            T *gyr = gy ? gy + r * gys : NULL;
            if (s == 0.0) { /* masked row: costs a memset of its gradients */
                rows[r] = 0.0;
                if (gxr)
                    memset(gxr, 0, (size_t)V * sizeof(T));
                if (gyr)
                    memset(gyr, 0, (size_t)V * sizeof(T));
                continue;
            }
            if (!buf) {
                rows[r] = NAN;
                continue;
            }
            const int more = r + 1 < n;
            rows[r] = FN(kl_row)(x + r * xs, y + r * ys, V, inv_t, s, gxr, gyr, buf, buf + V,
                                 buf + 2 * V, more ? x + (r + 1) * xs : NULL,
                                 more ? y + (r + 1) * ys : NULL);
        }
        free(buf);
    }
    return err;
}

#undef FN
#undef KCAT
#undef KCAT_

#endif /* KLDIV_FUSED_TEMPLATE */
