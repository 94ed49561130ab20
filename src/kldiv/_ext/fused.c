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
 * accuracy near convergence; at the reference entry r below, on rows where that form would
 * cancel, q_r - p_r from the masses off r summed in double: see kl_row). The third pass reads
 * only the scratch, so a gradient may be written over its own input (kl_div_inplace). Edges: p_i > 0 = q_i gives +inf with zero gradients (as the core); an
 * all -inf, +inf or nan row, a row whose values span more than the type holds, and a row where
 * a p_i that underflows here meets a log-ratio beyond 2^20 (p_i |d_i| may still matter) are
 * reported as nan before any gradient of that row is written; the float kernel first retries
 * such a row in the double kernel on its widened values (wide_row), and what stays nan Python
 * recomputes (float64, or nan for nan input). Rows with KL beyond ~57 (float) or ~678 (double), where the constant
 * above leaves T's range, take KL = log Zy - log Zx - E_p[d] instead: no cancellation there.
 *
 * Jeffreys (kind 2 of rows_ex): both KL directions per row in one call (jeffreys_row).
 *
 * JS_beta (kind 1 of rows_ex): passes 1 and 2 as above, the accurate mean log-ratio on the common
 * support from the KL algebra, then one pass forms d_i = log(q_i / p_i) (by the more accurate of
 * the centred route and the per-side one, as the core's _log_ratio), y = log(m/p) and
 * z = log(m/q) (log1p / expm1 forms, in double; float32 rows that are tame in float, split at
 * the mean log-ratio: see passjt) and the non-negative terms beta p phi(y) +
 * (1 - beta) q phi(z), and a last one the gradients -(beta/T) p (y - E_p y) and
 * -((1 - beta)/T) q (z - E_q z). Far from convergence (|E d| > 1) y - log(beta) and
 * z - log(1 - beta) stand in for y and z (see passj): there y sits near log(beta) where p lives,
 * and its centred differences would cancel. Support mismatch is allowed (mass off the common support adds
 * -beta log(beta) p(off) and its mirror term); log-ratios clamped to the type's range send the
 * row to the caller.
 *
 * Probability inputs (flags of rows_ex, temperature 1): the kernel takes p itself, e^{a_i} =
 * p_i / max p exactly (no exponential, no underflow of small probabilities), log p_i by a
 * vectorised logarithm (subnormals included; float32 probabilities against log-space input:
 * log p_i in double by klog_fd and the log-ratio formed in double, see pass2), and for two
 * probabilities within a factor 2 the
 * log-ratio log1p((q - p) / p) as the core's. The gradient returned is with respect to the
 * probabilities (0 where p_i = 0); where that side's probability is tiny (below 2^-80 of its
 * maximum in float, 2^-960 in double: subnormal ratios) and the gradient divides by it
 * (-p_i / q_i), it is taken in double from the raw inputs (tiny_q). With a stats array it
 * also returns each row's raw normaliser (sum p, or logsumexp of a log-space side) for the
 * value checks: no extra pass over the data.
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

/* log(x) for float: subnormals included (scaled by 2^24 first), 0 gives -inf, x < 0 and nan give
 * nan, +inf gives +inf; about 1 ulp (atanh series of the mantissa reduced to [sqrt 1/2, sqrt 2));
 * branch-free, so that the compiler vectorises it. */
KLDIV_INLINE float klog_f(float x)
{
    const int sub = x < 1.17549435e-38f;
    const float xs = sub ? x * 16777216.0f : x;
    int32_t bits;
    memcpy(&bits, &xs, sizeof bits);
    const int32_t mb = (bits & 0x007fffff) | 0x3f800000;
    float f;
    memcpy(&f, &mb, sizeof f);
    const int big = f > 1.41421356f;
    f = big ? f * 0.5f : f;
    const float ef = (float)(((bits >> 23) & 0xff) - 127) + (big ? 1.0f : 0.0f) -
                     (sub ? 24.0f : 0.0f);
    const float s = (f - 1.0f) / (f + 1.0f), s2 = s * s;
    float pl = 1.0f / 9.0f;
    pl = pl * s2 + 1.0f / 7.0f;
    pl = pl * s2 + 0.2f;
    pl = pl * s2 + 1.0f / 3.0f;
    const float lf = 2.0f * s + 2.0f * s * s2 * pl;
    float r = ef * 0.693359375f + (ef * -2.12194440e-4f + lf);
    r = x > 0.0f ? r : (x == 0.0f ? -INFINITY : NAN);
    return x < INFINITY ? r : x;
}

/* log(x) for double, the same way (2^54 for subnormals, series to s^21). */
KLDIV_INLINE double klog_d(double x)
{
    const int sub = x < 2.2250738585072014e-308;
    const double xs = sub ? x * 18014398509481984.0 : x;
    int64_t bits;
    memcpy(&bits, &xs, sizeof bits);
    const int64_t mb = (bits & INT64_C(0x000fffffffffffff)) | INT64_C(0x3ff0000000000000);
    double f;
    memcpy(&f, &mb, sizeof f);
    const int big = f > 1.4142135623730951;
    f = big ? f * 0.5 : f;
    /* the exponent as a double without an int64 conversion (none in AVX2): 2^52 + e */
    const int64_t eb = ((bits >> 52) & 0x7ff) | INT64_C(0x4330000000000000);
    double et;
    memcpy(&et, &eb, sizeof et);
    const double ef = (et - 4503599627371519.0) + (big ? 1.0 : 0.0) - (sub ? 54.0 : 0.0);
    const double s = (f - 1.0) / (f + 1.0), s2 = s * s;
    double pl = 1.0 / 21.0;
    pl = pl * s2 + 1.0 / 19.0;
    pl = pl * s2 + 1.0 / 17.0;
    pl = pl * s2 + 1.0 / 15.0;
    pl = pl * s2 + 1.0 / 13.0;
    pl = pl * s2 + 1.0 / 11.0;
    pl = pl * s2 + 1.0 / 9.0;
    pl = pl * s2 + 1.0 / 7.0;
    pl = pl * s2 + 1.0 / 5.0;
    pl = pl * s2 + 1.0 / 3.0;
    const double lf = 2.0 * s + 2.0 * s * s2 * pl;
    double r = ef * 6.93147180369123816490e-01 + (ef * 1.90821492927058770002e-10 + lf);
    r = x > 0.0 ? r : (x == 0.0 ? -INFINITY : NAN);
    return x < INFINITY ? r : x;
}

/* log(x) in double for a float x > 0, finite (float32 probabilities' logarithms: within
 * 2.3e-16 of max(1, |log x|) over every such float, as klog_d((double)x); other x give a finite
 * value of no meaning, for callers that mask those entries). From the float's bits in 8 lanes
 * of int32 (AVX2), with musl's reduction: k = exponent of x / sqrt(1/2), f = x / 2^k in
 * [sqrt 1/2, sqrt 2) (float subnormals scaled by 2^24 first); then in double s = (f - 1)/(f + 1)
 * and log f = 2s + s R(s^2), fdlibm's degree-7 minimax R (2^-58 relative). Cheaper than
 * klog_d((double)x): no int64 work, no double subnormals, no special values, 7 polynomial
 * terms instead of 10. */
KLDIV_INLINE double klog_fd(float x)
{
    const int sub = x < 1.17549435e-38f;
    const float xs = sub ? x * 16777216.0f : x;
    int32_t ix;
    memcpy(&ix, &xs, sizeof ix);
    const int32_t tmp = ix - 0x3f3504f3, k = tmp >> 23;
    const int32_t iz = ix - (int32_t)((uint32_t)tmp & 0xff800000u);
    float mf;
    memcpy(&mf, &iz, sizeof mf);
    const double f = (double)mf, e = (double)(k - (sub ? 24 : 0));
    const double s = (f - 1.0) / (f + 1.0), z = s * s;
    double R = 1.479819860511658591e-01;
    R = R * z + 1.531383769920937332e-01;
    R = R * z + 1.818357216161805012e-01;
    R = R * z + 2.222219843214978396e-01;
    R = R * z + 2.857142874366239149e-01;
    R = R * z + 3.999999999940941908e-01;
    R = R * z + 6.666666666666735130e-01;
    const double lf = 2.0 * s + s * z * R;
    return e * 6.93147180369123816490e-01 + (e * 1.90821492927058770002e-10 + lf);
}

/* 1/n!, n = 17 .. 2: phi(u) = u^2 * sum_n u^(n-2)/n! */
static const double kphi[16] = {
    1.0 / 355687428096000.0, 1.0 / 20922789888000.0, 1.0 / 1307674368000.0,
    1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
    1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
    1.0 / 24.0, 1.0 / 6.0, 0.5};

#define KLDIV_FUSED_TEMPLATE

/* double first: the float kernel's JS passes use the double helpers */
#define T double
#define SFX _d
#define KEXP kexp_d
#define KLOG klog_d
#define KFABS fabs
#define NPHI 16
#define EXP_FLOOR 708.0
#define SPAN_MAX 1.7976931348623157e308
#define D_CLAMP 4.4e307
#define D_RISK 1048576.0
#define KL_REL 0x1p-60
#define KLDIV_JS_T 0 /* JS's log-ratios to the mixture in double (its own type) */
#define KLDIV_WIDEN 0 /* (the float kernel's left rows come here: see wide_row) */
#define TINY_Q 0x1p-960 /* probabilities below TINY_Q max y: see tiny_q */
#include "fused.c" /* this file, once per element type */
#undef T
#undef SFX
#undef KEXP
#undef KLOG
#undef KFABS
#undef NPHI
#undef EXP_FLOOR
#undef SPAN_MAX
#undef D_CLAMP
#undef D_RISK
#undef KL_REL
#undef KLDIV_JS_T
#undef KLDIV_WIDEN
#undef TINY_Q

#define T float
#define SFX _f
#define KEXP kexp_f
#define KLOG klog_f
#define KFABS fabsf
#define NPHI 7          /* terms up to u^8: truncation below 5e-8 relative for |u| < 0.5 */
#define EXP_FLOOR 87.0  /* kexp_f returns 0 below -EXP_FLOOR */
#define SPAN_MAX 3.4028235677973366e38 /* FLT_MAX (1 + 2^-25): below it, x - y rounds finite */
#define D_CLAMP 8.5e37  /* |log-ratio| held below FLT_MAX / 4: no inf or nan in the passes */
#define D_RISK 1048576.0 /* larger |d| at an underflowed p_i: the row goes to float64 */
#define KL_REL 0x1p-30  /* ... unless p_i |d_i| summed stays below KL_REL * KL */
#define KLDIV_JS_T 1    /* JS in float on tame rows (see js_row), double elsewhere */
#define KLDIV_WIDEN 1   /* rows this kernel leaves: the double kernel on them (wide_row) */
#define TINY_Q 0x1p-80  /* probabilities below TINY_Q max y: see tiny_q */
#include "fused.c" /* this file, once per element type */
#undef T
#undef SFX
#undef KEXP
#undef KLOG
#undef KFABS
#undef NPHI
#undef EXP_FLOOR
#undef SPAN_MAX
#undef D_CLAMP
#undef D_RISK
#undef KL_REL
#undef KLDIV_JS_T
#undef KLDIV_WIDEN
#undef TINY_Q

#undef KLDIV_FUSED_TEMPLATE

static int call_run(int is_double, int kind, Py_ssize_t n, Py_ssize_t V,
                          unsigned long long xp, Py_ssize_t xs, unsigned long long yp,
                          Py_ssize_t ys, double inv_t, double beta, int flags,
                          unsigned long long sp, unsigned long long rp, unsigned long long gxp,
                          Py_ssize_t gxs, unsigned long long gyp, Py_ssize_t gys,
                          unsigned long long stp, int nthreads)
{
    if (!(inv_t > 0.0) || !isfinite(inv_t)) {
        PyErr_Format(PyExc_ValueError,
                     "kldiv._ext._fused: inv_t (1 / temperature) must be positive and finite, "
                     "got %g (callers keep temperatures within [1e-30, 1e30])", inv_t);
        return -1;
    }
    if (flags < 0 || flags > 3 || (flags && inv_t != 1.0)) {
        PyErr_Format(PyExc_ValueError,
                     "kldiv._ext._fused: flags (probability sides) must be 0..3 and need "
                     "temperature 1, got flags=%d, inv_t=%g", flags, inv_t);
        return -1;
    }
    if (kind && !(beta > 0.0 && beta < 1.0)) {
        PyErr_Format(PyExc_ValueError, "kldiv._ext._fused: beta must lie in (0, 1), got %g",
                     beta);
        return -1;
    }
    if (n < 0 || V <= 0 || !xp || !yp || !rp || kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "kldiv._ext._fused.rows: invalid arguments");
        return -1;
    }
    if (nthreads < 1)
        nthreads = 1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        err = run_d(kind, (const double *)(uintptr_t)xp, xs, (const double *)(uintptr_t)yp, ys,
                    n, V, inv_t, beta, flags, (const double *)(uintptr_t)sp,
                    (double *)(uintptr_t)rp, (double *)(uintptr_t)gxp, gxs,
                    (double *)(uintptr_t)gyp, gys, (double *)(uintptr_t)stp, nthreads);
    else
        err = run_f(kind, (const float *)(uintptr_t)xp, xs, (const float *)(uintptr_t)yp, ys, n,
                    V, inv_t, beta, flags, (const double *)(uintptr_t)sp,
                    (double *)(uintptr_t)rp, (float *)(uintptr_t)gxp, gxs,
                    (float *)(uintptr_t)gyp, gys, (double *)(uintptr_t)stp, nthreads);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Positional arguments of a METH_FASTCALL function by a format of PyArg_ParseTuple's codes
 * (i: int, n: Py_ssize_t, K: unsigned long long without overflow check, d: double; the first
 * nreq required): the everyday call's arguments without building and walking an args tuple
 * (PyArg_ParseTuple cost ~3k instructions per call at 64 x 10, 2% of the call). */
static int parse_fast(const char *name, PyObject *const *args, Py_ssize_t nargs,
                      const char *fmt, Py_ssize_t nreq, void **out)
{
    const Py_ssize_t nfmt = (Py_ssize_t)strlen(fmt);
    if (nargs < nreq || nargs > nfmt) {
        PyErr_Format(PyExc_TypeError, "kldiv._ext._fused.%s: expected %zd to %zd arguments, got %zd",
                     name, nreq, nfmt, nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nargs; k++) {
        PyObject *o = args[k];
        const char c = fmt[k];
        if (c == 'd') {
            const double v = PyFloat_AsDouble(o);
            if (v == -1.0 && PyErr_Occurred())
                goto bad;
            *(double *)out[k] = v;
            continue;
        }
        if (!PyLong_Check(o)) { /* as PyArg_ParseTuple: ints only (bool is one) */
            PyErr_Format(PyExc_TypeError,
                         "kldiv._ext._fused.%s: argument %zd must be int, not %.50s", name,
                         k + 1, Py_TYPE(o)->tp_name);
            return -1;
        }
        if (c == 'i') {
            const long v = PyLong_AsLong(o);
            if (v == -1 && PyErr_Occurred())
                goto bad;
            if (v > INT_MAX || v < INT_MIN) {
                PyErr_Format(PyExc_OverflowError, "kldiv._ext._fused.%s: argument %zd does "
                             "not fit a C int", name, k + 1);
                return -1;
            }
            *(int *)out[k] = (int)v;
        } else if (c == 'n') {
            const Py_ssize_t v = PyLong_AsSsize_t(o);
            if (v == -1 && PyErr_Occurred())
                goto bad;
            *(Py_ssize_t *)out[k] = v;
        } else { /* 'K' */
            const unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                goto bad;
            *(unsigned long long *)out[k] = v;
        }
    }
    return 0;
bad:
    {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        PyErr_Format(et ? et : PyExc_TypeError, "kldiv._ext._fused.%s: argument: %S", name,
                     ev ? ev : Py_None);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    }
    return -1;
}

static PyObject *py_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int is_double, nthreads;
    Py_ssize_t n, V, xs, ys, gxs, gys;
    unsigned long long xp, yp, sp, rp, gxp, gyp;
    double inv_t;
    void *out[] = {&is_double, &n, &V, &xp, &xs, &yp, &ys, &inv_t, &sp, &rp, &gxp, &gxs, &gyp,
                   &gys, &nthreads};
    (void)self;
    if (parse_fast("rows", args, nargs, "innKnKndKKKnKni", 15, out))
        return NULL;
    if (call_run(is_double, 0, n, V, xp, xs, yp, ys, inv_t, 0.5, 0, sp, rp, gxp, gxs, gyp, gys,
                 0, nthreads))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_rows_ex(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int is_double, kind, flags, nthreads;
    Py_ssize_t n, V, xs, ys, gxs, gys;
    unsigned long long xp, yp, sp, rp, gxp, gyp, stp;
    double inv_t, beta, t0 = 0.0, l0 = INFINITY, t1 = 0.0, l1 = INFINITY;
    void *out[] = {&is_double, &kind, &n, &V, &xp, &xs, &yp, &ys, &inv_t, &beta, &flags, &sp,
                   &rp, &gxp, &gxs, &gyp, &gys, &stp, &nthreads, &t0, &l0, &t1, &l1};
    (void)self;
    if (parse_fast("rows_ex", args, nargs, "iinnKnKnddiKKKnKnKidddd", 19, out))
        return NULL;
    if (call_run(is_double, kind, n, V, xp, xs, yp, ys, inv_t, beta, flags, sp, rp, gxp, gxs,
                 gyp, gys, stp, nthreads))
        return NULL;
    /* the rows' sum (Neumaier: no worse than a pairwise sum), and whether a row's statistic
     * lies beyond its limit (nan is not: such a row is nan itself) */
    const double *rows = (const double *)(uintptr_t)rp;
    double sum = 0.0, comp = 0.0;
    for (Py_ssize_t r = 0; r < n; r++) {
        const double v = rows[r], t = sum + v;
        comp += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
        sum = t;
    }
    const double total = isfinite(sum) ? sum + comp : sum;
    int near = 0;
    if (stp) {
        const double *st = (const double *)(uintptr_t)stp;
        for (Py_ssize_t r = 0; r < n && !near; r++)
            near = fabs(st[2 * r] - t0) > l0 || fabs(st[2 * r + 1] - t1) > l1;
    }
    return Py_BuildValue("(di)", total, near);
}

static PyMethodDef methods[] = {
    {"rows", (PyCFunction)(void (*)(void))py_rows, METH_FASTCALL,
     "rows(is_double, n, V, x_ptr, x_stride, y_ptr, y_stride, inv_t, scale_ptr, rows_ptr,\n"
     "     gx_ptr, gx_stride, gy_ptr, gy_stride, nthreads)\n\n"
     "KL(p || q) per row of softmax(x / T) and softmax(y / T) into rows (float64), and the\n"
     "gradients of sum_r scale[r] * KL_r with respect to x and y into gx, gy (0: not wanted).\n"
     "Rows with scale 0 are skipped (value 0, gradient 0). Pointers are raw addresses of\n"
     "row-major arrays with unit stride along V; strides are in elements. nan marks a row\n"
     "that the caller must recompute (its gradients are untouched)."},
    {"rows_ex", (PyCFunction)(void (*)(void))py_rows_ex, METH_FASTCALL,
     "rows_ex(is_double, kind, n, V, x_ptr, x_stride, y_ptr, y_stride, inv_t, beta, flags,\n"
     "        scale_ptr, rows_ptr, gx_ptr, gx_stride, gy_ptr, gy_stride, stats_ptr, nthreads)\n\n"
     "rows() for more kinds and input spaces. kind 0: KL(p || q); 1: JS_beta(p, q) (support\n"
     "mismatch allowed); 2: Jeffreys, KL(p || q) + KL(q || p). flags: 1 = x holds probabilities, 2 = y does (temperature 1 only;\n"
     "their gradients are with respect to the probabilities). stats_ptr (0: none; temperature\n"
     "1): an (n, 2) float64 array receiving each row's raw normalisers (sum p for\n"
     "probabilities, logsumexp for log-space inputs; masked rows: 1 and 0), for the value\n"
     "checks. Optional t0, l0, t1, l1: a row is near when |stats[r, 0] - t0| > l0 or\n"
     "|stats[r, 1] - t1| > l1. Returns (sum of the rows, any row near: 0 or 1)."},
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

/* log1p(u) for u >= -1 (the classic log(1 + u) + correction: about 1 ulp) */
KLDIV_INLINE T FN(klog1p)(T u)
{
    const T w = 1 + u, wm = w - 1;
    return KLOG(w) + (w > 0 ? (u - wm) / w : (T)0);
}

/* log(b + c e^d) for 0 < c < 1, b = 1 - c (the core's _log_mix), lc = log c, rc = b / c (formed
 * from beta by the caller: 1 - c itself has lost a tiny beta's digits), to the last bits for
 * every c and d: log1p(x), x = c (e^d - 1) (expm1 by the series below 1/2), while x >= -1/2;
 * below, the sum b + c e^d of two positive terms (1 + x loses b where e^d << b: c = 1 - beta
 * with beta tiny); where c e^d > e, log(c e^d) + log1p(b e^-(d + lc)) (lc + d + log1p(...)
 * cancelled to eps |lc| where c e^d << 1: c = beta tiny). Was 1e-4 per row off in JS's
 * gradient at beta = 1e-12, double included. */
KLDIV_INLINE T FN(log_mix)(T c, T lc, T rc, T d)
{
    const T b = rc * c;
    const int big = d >= 1 - lc; /* c e^d > e */
    const T dn = big ? (T)0 : d;
    const int sm = KFABS(dn) < (T)0.5;
    /* c e^d - c; for c below 2^-60 as e^(d + lc) - c (e^d alone may overflow the float) */
    const T x = sm ? c * (dn + FN(phi_series)(sm ? dn : (T)0))
                   : (c >= (T)8.67361737988403547e-19 ? c * KEXP(dn) : KEXP(dn + lc)) - c;
    const int m1 = x < (T)-0.5; /* then c > 1/2 and e^d < 1/2: c e^d in range */
    const T small = FN(klog1p)(m1 ? (T)0 : x);
    const T summed = KLOG(b + c * KEXP(m1 ? dn : (T)0));
    const T s = (big ? d : 1 - lc) + lc;
    const T large = s + FN(klog1p)(b * KEXP(-s));
    return big ? large : (m1 ? summed : small);
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
 * (e^b_i Zx/Zy - e^a_i) / Zx, exactly 0 where p = q. Probability inputs (xp, yp) get the
 * gradient with respect to the probability itself: the log-space one divided by p_i (0 where
 * p_i = 0); with sp[i] = p_i / max p that is -d'_i g / max p for x. */
KLDIV_INLINE void FN(pass3b)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                             const T *restrict sq, const T *restrict sd, T *restrict gx,
                             T *restrict gy, T muT, T rq, T ipg, T E, T M, const int want_x,
                             const int want_y, const int dense, const int xp, const int yp,
                             T ipgx, T iymax, T ipgy)
{
#pragma omp simd
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const T dc = (in ? dv : (T)0) - muT;
        const int small = KFABS(dc) < (T)0.5;
        const T pg = sp[i] * ipg;
        if (want_y) { /* (q_i - p_i) g */
            const T gl = (in & small) ? pg * (sq[i] * E + M) : (sq[i] * rq - sp[i]) * ipg;
            if (yp) { /* / q_i: where the series ran, sq[i] = expm1(d'_i) and
                       * (q_i - p_i) / q_i = expm1(d_i) / e^{d_i}; elsewhere sq[i] = q_i / max q */
                const T qv = sq[i] > 0 ? sq[i] : (T)1;
                const T em = (in & small) ? sq[i] : (T)0;
                const T ser = ipgy * (em * E + M) / ((1 + em) * E);
                gy[i] = (in & small) ? ser : (sq[i] > 0 ? gl / qv * iymax : (T)0);
            } else {
                gy[i] = gl;
            }
        }
        if (want_x)
            gx[i] = in ? (xp ? -ipgx * dc : -pg * dc) : (T)0; /* -p_i d'_i g */
    }
}

/* The first i < V - 1 with x[i] == v (V - 1 if none): 64 entries at a time by a vectorised
 * comparison, then one by one inside the block that holds it. */
KLDIV_INLINE Py_ssize_t FN(first_eq)(const T *x, Py_ssize_t V, T v)
{
    Py_ssize_t b = 0;
    for (; b + 64 <= V; b += 64) {
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (Py_ssize_t i = b; i < b + 64; i++)
            hit |= x[i] == v;
        if (hit)
            break;
    }
    while (b < V - 1 && !(x[b] == v))
        b++;
    return b;
}

/* What passes 1 and 2 leave for the rest of a row. */
typedef struct {
    double Zx, Zy, S1, ZqS, Zqo, Zxo, ZxS, Dref;
    double xmax, ymax; /* probability sides: the row maximum (sp[i] = x_i / xmax) */
    double ymin;       /* y's smallest raw value (a probability side's tiny entries) */
    Py_ssize_t ref;    /* the reference entry (x's first maximum), -1 when not looked up */
    int dense, esc, risk;
} FN(rowsum_t);

/* the log-space value of entry i of a side: the input, or log p for probabilities */
#define KLDIV_LV(v, isp) ((isp) ? KLOG(v) : (v))

/* Pass 2 over one block: exponentials into the scratch, the block's sums. xp, yp: the sides
 * hold probabilities (T = 1: sp[i] = p_i / max p exactly, no exponential; the log-ratio of two
 * probabilities within a factor 2 is log1p of their exact relative difference, as the core's). */
KLDIV_INLINE void FN(pass2)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict x,
                            const T *restrict y, T *restrict sp, T *restrict sq, T *restrict sd,
                            T mx, T my, T it, T ixm, T iym, T d0h, T d0l, const int dense,
                            const int xp, const int yp, double *out, T *restrict sa,
                            T *restrict sb, const int ab, double Mxd, double Yrd)
{
    const T ninf = (T)-INFINITY, CL = (T)D_CLAMP;
    T zx = 0, zy = 0, s1 = 0, zqs = 0, zqo = 0, zxo = 0, zxs = 0, rk = 0; /* rk: largest |d| */
    /* KLDIV_MIXF: float probabilities against log-space input, outside JS (ab): the float
     * rounding of log p (6e-8 of |log p|) is what near-convergent rows' log-ratios are made of,
     * so log p is taken in double (klog_fd, as the core takes it in float64) and the log-ratio
     * relative to the reference entry is formed in double: t_i = (ly_i - y_r) - (lx_i - x_r),
     * each difference of close values exact; y_r is rebuilt from d0h + d0l = y_r - x_r, both
     * sides' logarithms there in double too (Mxd = log max p in double for probabilities; see
     * prep): an error there is the same for every entry, which the centred log-ratio drops, but
     * as a float-sized offset (4e-6 at log p = -40) it would round the centred value at a peaked
     * row's top entry, a tiny difference, by its ulp (0.17 of that row's gradient). */
#define KLDIV_MIXF (sizeof(T) == 4 && xp != yp && !ab)
    const double Mx = Mxd, Yr = Yrd;
    int e = 0;
#pragma omp simd reduction(+ : zx, zy, s1, zqs, zqo, zxo, zxs) reduction(| : e) \
    reduction(max : rk)
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T xr = x[i], yr = y[i];
        if (KLDIV_MIXF) {
            /* float probabilities against log-space input (KL, reverse, Jeffreys): see above;
             * klog_fd's value at p_i = 0 is masked (px, py) */
            const double lx = xp ? klog_fd((float)xr) : (double)xr;
            const double ly = yp ? klog_fd((float)yr) : (double)yr;
            const int px = dense ? 1 : (xp ? xr > (T)0 : xr > ninf);
            const int py = dense ? 1 : (yp ? yr > (T)0 : yr > ninf);
            const int in = px & py;
            const T ep = xp ? xr * ixm : KEXP(xr - mx); /* (temperature 1 with probabilities) */
            const T eq = yp ? yr * iym : KEXP(yr - my);
            /* exactly 0 at the reference entry itself (ly, lx there are Yr, Mx: the same
             * klog_fd of the same float; prep checks it): the centred value at a peaked row's
             * top entry is the tiny -E_p[d], which a float-sized offset there would round */
            const T dd = (T)((ly - Yr) - (lx - Mx));
            const T dcl = dd > CL ? CL : (dd < -CL ? -CL : dd);
            const T d = in ? dcl : (T)0;
            const T ad = KFABS(d);
            rk = ad > rk ? ad : rk;
            zx += ep;
            zy += eq;
            s1 += ep * d;
            if (!dense) {
                zqs += in ? eq : (T)0;
                zqo += px ? (T)0 : eq;
                zxo += py ? (T)0 : ep;
                zxs += in ? ep : (T)0;
                e |= px & !py;
            }
            sp[i] = ep;
            sq[i] = eq;
            sd[i] = in ? d : (T)NAN;
            continue;
        }
        const T xv = KLDIV_LV(xr, xp), yv = KLDIV_LV(yr, yp);
        const int px = dense ? 1 : xv > ninf, py = dense ? 1 : yv > ninf;
        const int in = px & py;
        const T av = (xv - mx) * it, bv = (yv - my) * it; /* each side centred on its max */
        const T ep = xp ? xr * ixm : KEXP(av);
        const T eq = yp ? yr * iym : KEXP(bv);
        if (ab) { /* JS: kept for its choice of log-ratio route (see js_row) */
            sa[i] = av;
            sb[i] = bv;
        }
        T dd;
        if (xp && yp) {
            const T ps = in ? xr : (T)1, qs = in ? yr : (T)1;
            const int near = (qs >= (T)0.5 * ps) & (qs <= (T)2 * ps);
            const T pn = near ? ps : (T)1, qn = near ? qs : (T)1;
            const T l1 = FN(klog1p)((qn - pn) / pn);
            dd = near ? l1 : yv - xv;
        } else {
            const T sv = yv - xv, bb = sv - yv;
            const T er = (yv - (sv - bb)) + (-xv - bb); /* y - x = sv + er exactly */
            if (sizeof(T) == 4 && (xp || yp)) {
                /* float probabilities against log-space input: the float rounding of log p
                 * (6e-8 of |log p|) is what near-convergent rows' log-ratios are made of, so
                 * it is put back from a double logarithm (the core takes it in float64 too) */
                const T cx = xp ? (T)(klog_d((double)xr) - (double)xv) : (T)0;
                const T cy = yp ? (T)(klog_d((double)yr) - (double)yv) : (T)0;
                dd = ((sv - d0h) + ((er - d0l) + (cy - cx))) * it;
            } else {
                dd = ((sv - d0h) + (er - d0l)) * it;
            }
        }
        const T dcl = dd > CL ? CL : (dd < -CL ? -CL : dd);
        const T d = in ? dcl : (T)0;
        const T ad = KFABS(d);
        rk = ad > rk ? ad : rk;
        zx += ep;
        zy += eq;
        s1 += ep * d;
        if (!dense) {
            zqs += in ? eq : (T)0;
            zqo += px ? (T)0 : eq;
            zxo += py ? (T)0 : ep;
            zxs += in ? ep : (T)0;
            e |= px & !py;
        }
        sp[i] = ep;
        sq[i] = eq;
        sd[i] = in ? d : (T)NAN;
    }
    out[0] += zx;
    out[1] += zy;
    out[2] += s1;
    out[3] += dense ? zy : zqs;
    out[4] += zqo;
    out[5] += zxo;
    out[6] = e || out[6] != 0.0 ? 1.0 : 0.0;
    out[7] = rk > (T)D_RISK || out[7] != 0.0 ? 1.0 : 0.0;
    out[8] += dense ? zx : zxs;
#undef KLDIV_MIXF
}

/* Passes 1 and 2 of a row (shared by every kind); 0, or 1 for "recompute me" (nan row). The
 * statistics st[0], st[1] (when st is not NULL; T = 1 only) are each side's raw normaliser:
 * sum p for probabilities, logsumexp for log-space inputs: the value checks, in this walk. */
KLDIV_INLINE int FN(prep)(const T *x, const T *y, Py_ssize_t V, double inv_t, int xp, int yp,
                    T *restrict sp, T *restrict sq, T *restrict sd, const T *xn, const T *yn,
                    FN(rowsum_t) *rs, double *st, T *sa, T *sb)
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
    /* probabilities: negative entries make no distribution; the core says which */
    if ((xp && lx < 0) || (yp && ly < 0))
        return 1;
    rs->ymin = (double)ly;
    const T zlo_x = xp ? (T)0 : ninf, zlo_y = yp ? (T)0 : ninf;
    const int dense = lx > zlo_x && ly > zlo_y; /* no zero probability or -inf logit */
    const double xmax = (double)mx, ymax = (double)my;
    if (xp) { /* log-space maxima and (for the span check) a lower bound of the logarithms */
        mx = KLOG(mx);
        lx = (T)-800.0;
    }
    if (yp) {
        my = KLOG(my);
        ly = (T)-800.0;
    }
    if (!dense && !(xp && yp)) { /* the smallest finite values, for the span check below */
        T lx2 = pinf, ly2 = pinf;
#pragma omp simd reduction(min : lx2, ly2)
        for (Py_ssize_t i = 0; i < V; i++) {
            const T xf = x[i] > ninf ? x[i] : pinf, yf = y[i] > ninf ? y[i] : pinf;
            lx2 = xf < lx2 ? xf : lx2;
            ly2 = yf < ly2 ? yf : ly2;
        }
        if (!xp)
            lx = lx2;
        if (!yp)
            ly = ly2;
    }
    if (!(mx > ninf) || !(my > ninf) || !(mx < pinf) || !(my < pinf))
        return 1; /* an all -inf (or all-zero) row (no distribution) or +inf: the caller decides */
    {             /* every difference below is bounded by this span: no overflow when it fits */
        const double hi = mx > my ? (double)mx : (double)my;
        const double lo = lx < ly ? (double)lx : (double)ly;
        if (!(hi - lo <= SPAN_MAX))
            return 1;
    }
    /* the log-ratio is taken relative to its value at a reference entry r where x is largest:
     * t_i = (y_i - x_i) - (y_r - x_r), from exact differences (TwoSum), so that neither side's
     * magnitude (logits of 1e30, masks of -1e30 or finfo.min, a common offset) nor the distance
     * between the two maxima swallows what varies where p lives; D_r = y_r - max y puts it back
     * in the row constants (in double). Two probabilities: t_i = log(q_i / p_i) itself. */
    T d0h = 0, d0l = 0;
    double Dref, Mxd = (double)mx, Yrd = 0.0;
    Py_ssize_t iref = -1, iref2 = -1; /* iref: the MIXF route's (checked below) */
    if (xp && yp) {
        Dref = (double)mx - (double)my;
    } else if (sizeof(T) == 4 && xp != yp && !sa) {
        /* float probabilities against log-space input (pass2's KLDIV_MIXF): the logarithms of
         * max p and of p_r in double (klog_fd, as pass2 takes every log p), so that the
         * reference entry's log-ratio is 0 to double precision, not to float's */
        const Py_ssize_t ref = iref = FN(first_eq)(x, V, xp ? (T)xmax : mx);
        const double Lx = xp ? klog_fd((float)xmax) : (double)mx;
        const double Ly = yp ? klog_fd((float)ymax) : (double)my;
        const T yv = y[ref];
        const double Yd = yp ? klog_fd((float)yv) : (double)yv;
        if (!(yp ? yv > (T)0 : yv > ninf)) { /* y_r = -inf: the row escapes (+inf) */
            d0h = 0;
            d0l = 0;
            Dref = (double)mx - (double)my;
            Yrd = Lx;
        } else {
            Dref = (Yd - Ly) * inv_t;
            Yrd = Yd;
        }
        Mxd = Lx;
    } else {
        Py_ssize_t ref = 0;
        const T xref = xp ? (T)xmax : mx;
        ref = iref2 = FN(first_eq)(x, V, xref);
        const T yref = KLDIV_LV(y[ref], yp);
        const T yr = yref > ninf ? yref : mx; /* y_r = -inf: the row escapes (+inf) */
        d0h = yr - mx;
        const T d0b = d0h - yr;
        d0l = (yr - (d0h - d0b)) + (-mx - d0b);
        Dref = ((double)yr - (double)my) * inv_t;
    }
    const T ixm = xp ? (T)(1.0 / xmax) : (T)0, iym = yp ? (T)(1.0 / ymax) : (T)0;
    double acc[9];
    for (int rep = 0; rep < 2; rep++) {
    for (int k = 0; k < 9; k++)
        acc[k] = 0.0;
    for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
        const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
        if (xn && !rep && V * sizeof(T) > 1024) /* the next (long) row: fetched from memory
                                                  * while this block computes exps */
            for (Py_ssize_t i = b0; i < b1; i += 64 / sizeof(T)) {
                __builtin_prefetch(xn + i, 0, 2);
                __builtin_prefetch(yn + i, 0, 2);
            }
#define KLDIV_P2(dn, a, b)                                                                     \
    do {                                                                                       \
        if (sa)                                                                                \
            FN(pass2)(b0, b1, x, y, sp, sq, sd, mx, my, it, ixm, iym, d0h, d0l, dn, a, b, acc, \
                      sa, sb, 1, Mxd, Yrd);                                                    \
        else                                                                                   \
            FN(pass2)(b0, b1, x, y, sp, sq, sd, mx, my, it, ixm, iym, d0h, d0l, dn, a, b, acc, \
                      NULL, NULL, 0, Mxd, Yrd);                                                \
    } while (0)
        if (dense) {
            if (!xp && !yp)
                KLDIV_P2(1, 0, 0);
            else if (xp && yp)
                KLDIV_P2(1, 1, 1);
            else if (xp)
                KLDIV_P2(1, 1, 0);
            else
                KLDIV_P2(1, 0, 1);
        } else {
            if (!xp && !yp)
                KLDIV_P2(0, 0, 0);
            else if (xp && yp)
                KLDIV_P2(0, 1, 1);
            else if (xp)
                KLDIV_P2(0, 1, 0);
            else
                KLDIV_P2(0, 0, 1);
        }
#undef KLDIV_P2
    }
    /* float probabilities against log-space input: the reference entry's log-ratio must be 0
     * exactly (see pass2). Its logarithms there are the same klog_fd of the same floats as Yrd
     * and Mxd, so it is, unless the vectorised loop rounded them differently (another
     * contraction into fused multiply-adds): then y_r as the loop has it (the small exact
     * difference it stored, added back) and the pass once more (rare) */
    if (iref < 0 || rep)
        break;
    {
        const T e0 = sd[iref];
        if (!(e0 == e0) || e0 == (T)0)
            break;
        Yrd += (double)e0;
    }
    }
    rs->Zx = acc[0];
    rs->Zy = acc[1];
    rs->S1 = acc[2];
    rs->ZqS = acc[3];
    rs->Zqo = acc[4];
    rs->Zxo = acc[5];
    rs->ZxS = acc[8];
    rs->esc = acc[6] != 0.0;
    rs->risk = acc[7] != 0.0;
    rs->dense = dense;
    rs->Dref = Dref;
    rs->ref = iref >= 0 ? iref : iref2;
    rs->xmax = xmax;
    rs->ymax = ymax;
    if (st) { /* raw normalisers (T = 1): sum p, or max + log sum e^(x - max) */
        st[0] = xp ? rs->Zx * xmax : (double)mx + log(rs->Zx);
        st[1] = yp ? rs->Zy * ymax : (double)my + log(rs->Zy);
    }
    if (!isfinite(rs->Zx) || !isfinite(rs->Zy) || !isfinite(rs->S1))
        return 1; /* nan in the input, or sums beyond the type */
    return 0;
}

/* The gradient with respect to a probability side y at its tiny entries: pass 3b forms it as
 * (q_i - p_i) / q_i from sq[i] = y_i / max y and sp[i] (= p_i / max p, or e^{a_i}), which round
 * to the subnormal grid (or to 0 below float's exponential range) where they are tiny: the
 * entry's -p_i / q_i (up to 1e33 at y_i = 6e-45) was 1e-3 .. 1e-2 off. Entries with
 * y_i < TINY_Q max y where pass 3b took that form (off the series: |d'_i| >= 1/2, or off the
 * common support) take it in double from the raw inputs, g (1 / sum y - p_i / y_i), p_i from
 * x_i (probabilities: x_i / (max x Zx), as sp; log-space: e^{(x_i - max x) / T} / Zx); on the
 * series pass 3b's value stands (it comes from the log-ratio, and near convergence the two
 * terms here would cancel to the normalisers' rounding). A row
 * takes the loop only when its smallest positive y_i is that small (pass 1's minimum, or one
 * vectorised scan on rows holding zeros); above TINY_Q sq and sp hold their values to an ulp
 * (a p_i below float's exponential range then changes the entry by < 2^-45 of g / sum y). */
static void FN(tiny_q)(const T *x, const T *y, const T *sd, T muT, Py_ssize_t V,
                       double inv_t, int xp, T *gy, double xmax, double ymax, double ymin,
                       double Zx, double Zy, double sg)
{
    const double thr = TINY_Q * ymax;
    double ym = ymin;
    if (!(ym > 0.0)) { /* zeros in the row: the smallest positive entry */
        T m = (T)INFINITY;
#pragma omp simd reduction(min : m)
        for (Py_ssize_t i = 0; i < V; i++) {
            const T v = y[i] > (T)0 ? y[i] : (T)INFINITY;
            m = v < m ? v : m;
        }
        ym = (double)m;
    }
    if (!(ym < thr))
        return;
    const double isy = (double)(T)(1.0 / ymax) / Zy; /* 1 / sum y, as the kernel normalises */
    const double ixm = (double)(T)(1.0 / xmax);
    for (Py_ssize_t i = 0; i < V; i++) {
        const double yv = (double)y[i];
        if (!(yv > 0.0 && yv < thr))
            continue;
        const T dv = sd[i]; /* pass 3b's choice, as it made it */
        const int in = dv == dv;
        if (in && KFABS((in ? dv : (T)0) - muT) < (T)0.5)
            continue;
        const double pn = xp ? (double)x[i] * ixm / Zx : exp(((double)x[i] - xmax) * inv_t) / Zx;
        gy[i] = (T)(sg * (isy - pn / yv));
    }
}

/* One KL row; returns KL (double), +inf on escape, nan for "recompute me" (gradients untouched).
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
                                      T *restrict sd, const T *xn, const T *yn, int xp, int yp,
                                      double *st)
{
    const T it = (T)inv_t;
    FN(rowsum_t) rs;
    if (FN(prep)(x, y, V, inv_t, xp, yp, sp, sq, sd, xn, yn, &rs, st, NULL, NULL))
        return NAN;
    const double Zx = rs.Zx, Zy = rs.Zy, S1 = rs.S1, ZqS = rs.ZqS, Zqo = rs.Zqo, Dref = rs.Dref;
    const int dense = rs.dense;
    if (rs.esc) { /* p_i > 0 = q_i: KL = +inf, zero gradient (the core's convention) */
        if (gx)
            memset(gx, 0, (size_t)V * sizeof(T));
        if (gy)
            memset(gy, 0, (size_t)V * sizeof(T));
        return INFINITY;
    }
    const double mu = S1 / Zx; /* E_p[t] / T; E_p[d] = mu + Dref */
    /* log(Zy / Zx) for the estimate KL ~ log Zy - log Zx - E_p[d] (the risk bound, the
     * reference entry's check): one logarithm per row (Zx, Zy lie in [1, V]) */
    const double lzyx = (rs.risk || (gy && V > 1)) ? log(Zy / Zx) : 0.0;
    if (rs.risk) { /* some |d| beyond 2^20: does it meet a p_i that underflows here? */
        const T RA = (T) - (EXP_FLOOR + 250.0), FL = (T)-EXP_FLOOR, CL = (T)D_CLAMP;
        const T mxl = xp ? KLOG((T)rs.xmax) : (T)0;
        T mx = (T)-INFINITY;
        if (!xp)
            for (Py_ssize_t i = 0; i < V; i++)
                mx = x[i] > mx ? x[i] : mx;
        double B = 0; /* bound on the neglected sum of p_i |d_i| (times Zx) */
        for (Py_ssize_t i = 0; i < V; i++) {
            const T dv = sd[i], ad = KFABS(dv);
            if (!(dv == dv) || !(ad > (T)D_RISK))
                continue;
            const T a = xp ? KLOG(x[i]) - mxl : (x[i] - mx) * it;
            if (a >= FL || xp) { /* probabilities never underflow here (sp = p / max p) */
                if (ad >= CL) /* clamped where p_i counts */
                    return NAN;
            } else if (a > RA) {
                B += exp((double)a + log((double)ad));
            }
        }
        /* KL = log Zy - log Zx - E_p[d]: what was neglected must not show at T's precision */
        const double kest = lzyx - mu - Dref;
        if (B / Zx > KL_REL * (kest > 0 ? kest : 0.0))
            return NAN;
    }
    const double qo = Zqo / Zy;
    const double log_qS = qo == 0.0 ? 0.0 : qo < 0.5 ? log1p(-qo) : log(ZqS / Zy);
    /* p_i e^{d'_i} = e^{lc} * sq[i], lc = a0 - log Zx. KL >= lc: past a bound the series brings
     * nothing (its terms would underflow or overflow T) and KL = log Zy - log Zx - E_p[d] =
     * lc + log Zy has no cancellation. Zx >= 1 (the largest entry counts 1; probabilities: to
     * an ulp), so lc <= a0 (+ 1e-7): below the bound e^lc = e^a0 / Zx, no logarithm needed */
    const double a0 = -mu - Dref, th = EXP_FLOOR - 30.0;
    double lc = a0;
    int huge = 0;
    T c;
    if (a0 <= th) {
        c = (T)((sizeof(T) == 4 ? kexp_d(a0) : exp(a0)) / Zx);
    } else {
        lc = a0 - log(Zx);
        huge = lc > th;
        c = huge ? (T)0 : (T)exp(lc);
    }
    const T ip = (T)(1.0 / Zx), muT = (T)mu;
    const double iZx = 1.0 / Zx, sg = s * inv_t; /* (divisions only where used) */
    const T rq = (T)(Zx / Zy), ipg = (T)(sg * iZx);
    const T ipgx = xp ? (T)(sg * iZx / rs.xmax) : (T)0, iymax = yp ? (T)(1.0 / rs.ymax) : (T)0;
    const T ipgy = yp ? (T)(sg / (Zy * rs.ymax)) : (T)0;
    /* The reference entry r (x's first maximum, e^{a_r} = sp[r], 1 for log-space x): its
     * gradient in y, (q_r - p_r) g, is the row's largest on a peaked row whose two tops nearly
     * agree (d_r = log(q_r / p_r) small) while KL is not small (tails far apart: KL ~ the
     * tails' mass times their log-ratio). Pass 3b forms it as p_r (expm1(d'_r) E + M) (series,
     * d'_r = d_r + KL) or as q_r - p_r, both cancelling there: errors of u (KL + |mu|) p_r or
     * u (p_r + q_r) against a value of p_r |expm1(d_r)| (Jeffreys at float32 logits of std 20:
     * 4e-6 .. 8e-6 per row). From the masses off r, Xo = sum_{i != r} e^{a_i} and Yo (summed in
     * double, r left out), it is (e^{b_r} Xo - e^{a_r} Yo) / (Zx Zy), the e^{a_r} e^{b_r} parts
     * of Zx Zy cancelling exactly: an error of u (q_r Xo / Zx + p_r Yo / Zy). Rows where
     * pass 3b's form would lose more than ~5 bits (|d_r| < (KL + |d'_r| + 1) / 32) take this
     * pass over the scratch (before pass 3a overwrites sq), and the form with the smaller
     * error bound is kept (fixr). Only scalars otherwise: ordinary rows pay a comparison. */
    int fixr = 0;
    Py_ssize_t rr = 0;
    double gref = 0.0, bref = 1.0;
    if (gy && V > 1) {
        rr = rs.ref >= 0 ? rs.ref : FN(first_eq)(x, V, (T)rs.xmax);
        const T dv = sd[rr];
        const double dcr = (double)dv - mu, kest = lzyx - mu - Dref;
        const double dr = dcr - kest;
        if (dv == dv && 32.0 * fabs(dr) < fabs(kest) + fabs(dcr) + 1.0) {
            double xo = 0, yo = 0;
#pragma omp simd reduction(+ : xo, yo)
            for (Py_ssize_t i = 0; i < rr; i++) {
                xo += (double)sp[i];
                yo += (double)sq[i];
            }
#pragma omp simd reduction(+ : xo, yo)
            for (Py_ssize_t i = rr + 1; i < V; i++) {
                xo += (double)sp[i];
                yo += (double)sq[i];
            }
            const double ar = (double)sp[rr], br = (double)sq[rr];
            const double zx = ar + xo, zy = br + yo, pr = ar / zx, qr = br / zy;
            const double enew = qr * (xo / zx) + pr * (yo / zy);
            const double ecur = fabs(dcr) < 0.5 ? pr * (fabs(kest) + fabs(dcr)) : pr + qr;
            if (enew < ecur && br > 0.0) {
                fixr = 1;
                gref = sg * ((br * xo - ar * yo) / (zx * zy));
                bref = br;
            }
        }
    }
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
    /* the float kernel: log1p, expm1 and exp of the row constants inline in double (about
     * 1 ulp of double: far below float's rounding; no libm call per row) */
    const double kl = huge ? lc + log(Zy)
                           : (sizeof(T) == 4 ? klog1p_d(acc) : log1p(acc)) - log_qS;
    if (gx || gy) {
        double Md; /* expm1(-KL) */
        if (sizeof(T) == 4) {
            const double u = -kl;
            Md = fabs(u) < 0.5 ? u + phi_series_d(u) : kexp_d(u) - 1.0;
        } else {
            Md = expm1(-kl);
        }
        /* e^-KL = 1 + expm1(-KL): an absolute error of 2^-52, relative 2^-52 e^KL: exact enough
         * below 1/2 in double, below 8 in float (2^-41) */
        const T E = (T)(kl < (sizeof(T) == 4 ? 8.0 : 0.5)
                            ? 1.0 + Md
                            : (sizeof(T) == 4 ? kexp_d(-kl) : exp(-kl))),
                M = (T)Md;
        const int wx = gx != NULL, wy = gy != NULL;
        for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
            const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
#define KLDIV_P3B(wx, wy, dn, a, b)                                                            \
    FN(pass3b)(b0, b1, sp, sq, sd, gx, gy, muT, rq, ipg, E, M, wx, wy, dn, a, b, ipgx, iymax,  \
               ipgy)
            if (!xp && !yp) {
                if (dense) {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 1, 0, 0);
                    else if (wy)
                        KLDIV_P3B(0, 1, 1, 0, 0);
                    else
                        KLDIV_P3B(1, 0, 1, 0, 0);
                } else {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 0, 0, 0);
                    else if (wy)
                        KLDIV_P3B(0, 1, 0, 0, 0);
                    else
                        KLDIV_P3B(1, 0, 0, 0, 0);
                }
            } else if (xp && !yp) { /* the migration row: probabilities against log-space */
                if (dense) {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 1, 1, 0);
                    else if (wy)
                        KLDIV_P3B(0, 1, 1, 1, 0);
                    else
                        KLDIV_P3B(1, 0, 1, 1, 0);
                } else {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 0, 1, 0);
                    else if (wy)
                        KLDIV_P3B(0, 1, 0, 1, 0);
                    else
                        KLDIV_P3B(1, 0, 0, 1, 0);
                }
            } else if (!xp && yp) { /* its reverse */
                if (dense) {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 1, 0, 1);
                    else if (wy)
                        KLDIV_P3B(0, 1, 1, 0, 1);
                    else
                        KLDIV_P3B(1, 0, 1, 0, 1);
                } else {
                    if (wx && wy)
                        KLDIV_P3B(1, 1, 0, 0, 1);
                    else if (wy)
                        KLDIV_P3B(0, 1, 0, 0, 1);
                    else
                        KLDIV_P3B(1, 0, 0, 0, 1);
                }
            } else { /* two probability sides: one general variant (flags at run time) */
                KLDIV_P3B(wx, wy, dense, xp, yp);
            }
#undef KLDIV_P3B
        }
        if (fixr) /* the reference entry (see above); probabilities: / q_r as pass 3b */
            gy[rr] = yp ? (T)(gref / bref * (double)iymax) : (T)gref;
        if (yp && gy && (const void *)gy != (const void *)y)
            FN(tiny_q)(x, y, sd, muT, V, inv_t, xp, gy, rs.xmax, rs.ymax, rs.ymin, Zx, Zy, sg);
    }
    return kl;
}

/* Pass J over one block (JS): the divergence terms from the scratch, and the log-ratios to the
 * mixture, y_i = log(m_i / p_i) and z_i = log(m_i / q_i), into sy, sz (double: the gradient
 * subtracts their means, and a float y would lose digits there); returns sum beta p phi(y) +
 * (1 - beta) q phi(z) over the common support, and adds sum p y, sum q z to ey, ez. In double
 * for both element types (the double kernel's helpers).
 * far (rows with |E_{p_S} d| > 1): what goes into sy, sz is y - log(beta) =
 * log(m / (beta p)) = s(u) and z - log(1 - beta) = s(-u) instead (0 off the support), with
 * u = d + L, L = log((1 - beta) / beta), s(u) = log(1 + e^u) = max(u, 0) + log1p(e^-|u|): one
 * exponential and one logarithm for both, each with full relative accuracy. On far rows y sits
 * near log(beta) where p lives (q << p) and the gradient's centred y - E_p[y] is a small
 * difference of two values near log(beta): in y it would cancel (digits lost to log(beta),
 * all of them once q/p < 1e-16), in s(u) it does not (and mirrored for z where q lives). */
KLDIV_INLINE double FN(passj)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                              const T *restrict sq, const T *restrict sd, double *restrict sy,
                              double *restrict sz, double mu, double md, double amu,
                              double lZx, double lZy, double ipx, double ipy,
                              double be, double c1, double lbe, double lc1, double rbe,
                              double rc1, double *ey, double *ez, double *ew, const int dense,
                              const int far, double L)
{
    double a = 0, ay = 0, az = 0, ap = 0, aq = 0;
#pragma omp simd reduction(+ : a, ay, az, ap, aq)
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const double pv = (double)sp[i] * ipx, qv = (double)sq[i] * ipy;
        const double t = in ? (double)dv : 0.0, av = sy[i], bv = sz[i]; /* a_i, b_i */
        const double dc = (t - mu) + md, dn = (bv - av) + (lZx - lZy); /* log(q_i / p_i) */
        const int cen = fabs(av - lZx) + fabs(bv - lZy) < fabs(t) + amu;
        const double dr = cen ? dn : dc;
        const double d = dr > 1e300 ? 1e300 : (dr < -1e300 ? -1e300 : dr);
        double yv, zv, wy = 0.0, wz = 0.0;
        if (far) {
            const double u = d + L, h = klog1p_d(kexp_d(-fabs(u)));
            wy = (u > 0 ? u : 0.0) + h; /* log(m / (beta p)) */
            wz = (u < 0 ? -u : 0.0) + h; /* log(m / ((1 - beta) q)) */
            yv = lbe + wy;
            zv = lc1 + wz;
        } else {
            yv = log_mix_d(c1, lc1, rc1, d);  /* log(m / p) */
            zv = log_mix_d(be, lbe, rbe, -d); /* log(m / q) */
        }
        const double m = be * pv + c1 * qv;
        const int sy_ = fabs(yv) < 0.5, sz_ = fabs(zv) < 0.5;
        const double tp = sy_ ? pv * phi_series_d(sy_ ? yv : 0.0) : m - pv * (1 + yv);
        const double tq = sz_ ? qv * phi_series_d(sz_ ? zv : 0.0) : m - qv * (1 + zv);
        a += in ? be * tp + c1 * tq : 0.0;
        /* off the support: m = beta p (y = log beta), m = (1 - beta) q (z = log(1 - beta)) */
        const double yy = far ? (in ? wy : 0.0) : (in ? yv : lbe);
        const double zz = far ? (in ? wz : 0.0) : (in ? zv : lc1);
        ay += pv * yy;
        az += qv * zz;
        ap += pv;
        aq += qv;
        sy[i] = yy;
        sz[i] = zz;
    }
    *ey += ay;
    *ez += az;
    ew[0] += ap;
    ew[1] += aq;
    return a;
}

/* Pass J' over one block: the JS gradients, from the scratch only.
 * dJS/dx_i = -(beta / T) p_i (y_i - E_p[y]), dJS/dy_i = -((1 - beta) / T) q_i (z_i - E_q[z]);
 * probability inputs: divided by p_i (q_i), 0 where it is 0. */
KLDIV_INLINE void FN(passjg)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                             const T *restrict sq, const double *restrict sy,
                             const double *restrict sz, T *restrict gx, T *restrict gy, T gxc,
                             T gyc, double ey, double ez, const int want_x, const int want_y,
                             const int xp, const int yp)
{
#pragma omp simd
    for (Py_ssize_t i = b0; i < b1; i++) {
        if (want_x) {
            const T w = xp ? (sp[i] > 0 ? (T)1 : (T)0) : sp[i];
            gx[i] = -gxc * w * (T)(sy[i] - ey);
        }
        if (want_y) {
            const T w = yp ? (sq[i] > 0 ? (T)1 : (T)0) : sq[i];
            gy[i] = -gyc * w * (T)(sz[i] - ez);
        }
    }
}

#if KLDIV_JS_T
/* log(1 - c + c e^d) for 0 < c < 1, lc = log c, lr = log(1 - c), in the element type: log1p of
 * c expm1(d) (expm1 by the series below 1/2: full relative accuracy near d = 0) while that
 * stays above -1/2, else logaddexp(lr, lc + d) (no cancellation: c near 1 and d very negative
 * leave 1 - c + c e^d to the small weight 1 - c, which 1 + c expm1(d) would lose). */
KLDIV_INLINE T FN(log_mix3)(T c, T lc, T lr, T d)
{
    const int lo = d < 1;
    const T ds = lo ? d : (T)0;
    const int sm = KFABS(ds) < (T)0.5;
    const T em1 = sm ? ds + FN(phi_series)(sm ? ds : (T)0) : KEXP(ds) - 1;
    const T ce = c * em1;
    const int use_s = lo & (ce >= (T)-0.5);
    const T g = lc + d, u = g - lr;
    const T big = (g > lr ? g : lr) + FN(klog1p)(KEXP(-KFABS(u)));
    const T small = FN(klog1p)(use_s ? ce : (T)0);
    return use_s ? small : big;
}

/* Pass J in the element type (float kernel, tame rows; see js_row). With dp_i the centred
 * log-ratio d_i - E_{p_S}[d] (split) or d_i itself (no split), and the row constants y0, z0, w
 * (lw = log w) and v = 1 - w (lv = log v):
 *     y_i = log(m_i / p_i) = y0 + log(1 - w + w e^{dp_i}),
 *     z_i = log(m_i / q_i) = z0 + log(1 - v + v e^{-dp_i}).
 * Near the mean (split: y0 = log(beta + (1 - beta) e^{E d}), w = (1 - beta) e^{E d - y0}) the
 * parts that vary (ly, lz) keep full relative accuracy in float, and the gradient subtracts
 * their means without losing digits to a row constant; far from it (no split, y0 = z0 = 0,
 * w = 1 - beta) y, z themselves. ly, lz go into oy, oz (sa, sb keep a_i, b_i for the double
 * route). Returns the block's sum of beta p phi(y) + (1 - beta) q phi(z) (common support); adds
 * sum p ly, sum q lz to ey, ez and sum p^2 (1, ly, ly^2), sum q^2 (1, lz, lz^2) to nm[0..5]
 * (the gradients' norms for js_row's check).
 * one (w and 1 - w both >= 1/4): one logarithm per entry, for the side whose argument is <= 0;
 * the other from ly - lz = dp (exact algebra; with w, 1 - w >= 1/4 the difference loses at most
 * a few ulps: |lz| <= (1 - w) |dp| and ly >= w dp for dp >= 0, the mirror for dp < 0). */
KLDIV_INLINE T FN(passjt)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                          const T *restrict sq, const T *restrict sd, const T *restrict sa,
                          const T *restrict sb, T *restrict oy, T *restrict oz, T kt, T kc,
                          T amu, T lZx, T lZy, T ipx, T ipy, T be, T c1, T y0, T z0, T w, T lw,
                          T v, T lv, T ly_off, T lz_off, double *ey, double *ez, double *nm,
                          const int dense, const int one, const int chk)
{
    T a = 0, ay = 0, az = 0, n0 = 0, n1 = 0, n2 = 0, n3 = 0, n4 = 0, n5 = 0;
#pragma omp simd reduction(+ : a, ay, az, n0, n1, n2, n3, n4, n5)
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const T t = in ? dv : (T)0, av = sa[i], bv = sb[i]; /* a_i, b_i */
        /* dp by the more accurate route (as the double pass: see js_row); kt, kc hold the
         * route's row constant and the shift together (one rounding) */
        const int cen = KFABS(av - lZx) + KFABS(bv - lZy) < KFABS(t) + amu;
        const T dr = cen ? (bv - av) + kc : t + kt;
        const T dp = in ? dr : (T)0;
        T ly, lz;
        if (one) {
            const int neg = dp < 0;
            const T l = FN(log_mix3)(neg ? w : v, neg ? lw : lv, neg ? lv : lw, neg ? dp : -dp);
            ly = neg ? l : l + dp;
            lz = neg ? l - dp : l;
        } else {
            ly = FN(log_mix3)(w, lw, lv, dp);
            lz = FN(log_mix3)(v, lv, lw, -dp);
        }
        const T yv = y0 + ly, zv = z0 + lz;
        const T pv = sp[i] * ipx, qv = sq[i] * ipy;
        const T m = be * pv + c1 * qv;
        const int sy_ = KFABS(yv) < (T)0.5, sz_ = KFABS(zv) < (T)0.5;
        const T tp = sy_ ? pv * FN(phi_series)(sy_ ? yv : (T)0) : m - pv * (1 + yv);
        const T tq = sz_ ? qv * FN(phi_series)(sz_ ? zv : (T)0) : m - qv * (1 + zv);
        a += in ? be * tp + c1 * tq : (T)0;
        const T yy = in ? ly : ly_off, zz = in ? lz : lz_off; /* off the support: m = beta p */
        ay += pv * yy;
        az += qv * zz;
        if (chk) {
            const T p2 = pv * pv, q2 = qv * qv;
            n0 += p2;
            n1 += p2 * yy;
            n2 += p2 * yy * yy;
            n3 += q2;
            n4 += q2 * zz;
            n5 += q2 * zz * zz;
        }
        oy[i] = yy;
        oz[i] = zz;
    }
    *ey += ay;
    *ez += az;
    nm[0] += n0;
    nm[1] += n1;
    nm[2] += n2;
    nm[3] += n3;
    nm[4] += n4;
    nm[5] += n5;
    return a;
}

/* Pass J in the element type for rows far from convergence (|E_{p_S} d| > 1; see js_row): as
 * passj's far form, wy = y - log(beta) = s(u) and wz = z - log(1 - beta) = s(-u) with
 * u = d + log((1 - beta) / beta), s(u) = max(u, 0) + log1p(e^-|u|): one exponential and one
 * logarithm per entry for both, each with full relative accuracy (0 off the support). wy, wz
 * go into oy, oz; the sums as passjt's. kt, kc: the route constants with L in them. */
KLDIV_INLINE T FN(passjb)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                          const T *restrict sq, const T *restrict sd, const T *restrict sa,
                          const T *restrict sb, T *restrict oy, T *restrict oz, T kt, T kc,
                          T amu, T lZx, T lZy, T ipx, T ipy, T be, T c1, T lbe, T lc1,
                          double *ey, double *ez, double *nm, const int dense)
{
    T a = 0, ay = 0, az = 0, n0 = 0, n1 = 0, n2 = 0, n3 = 0, n4 = 0, n5 = 0;
#pragma omp simd reduction(+ : a, ay, az, n0, n1, n2, n3, n4, n5)
    for (Py_ssize_t i = b0; i < b1; i++) {
        const T dv = sd[i];
        const int in = dense ? 1 : dv == dv;
        const T t = in ? dv : (T)0, av = sa[i], bv = sb[i]; /* a_i, b_i */
        const int cen = KFABS(av - lZx) + KFABS(bv - lZy) < KFABS(t) + amu;
        const T ur = cen ? (bv - av) + kc : t + kt;
        const T u = in ? ur : (T)0;
        const T h = FN(klog1p)(KEXP(-KFABS(u)));
        const T wy = (u > 0 ? u : (T)0) + h, wz = (u < 0 ? -u : (T)0) + h;
        const T yv = lbe + wy, zv = lc1 + wz;
        const T pv = sp[i] * ipx, qv = sq[i] * ipy;
        const T m = be * pv + c1 * qv;
        const int sy_ = KFABS(yv) < (T)0.5, sz_ = KFABS(zv) < (T)0.5;
        const T tp = sy_ ? pv * FN(phi_series)(sy_ ? yv : (T)0) : m - pv * (1 + yv);
        const T tq = sz_ ? qv * FN(phi_series)(sz_ ? zv : (T)0) : m - qv * (1 + zv);
        a += in ? be * tp + c1 * tq : (T)0;
        const T yy = in ? wy : (T)0, zz = in ? wz : (T)0; /* off the support: 0 */
        ay += pv * yy;
        az += qv * zz;
        const T p2 = pv * pv, q2 = qv * qv;
        n0 += p2;
        n1 += p2 * yy;
        n2 += p2 * yy * yy;
        n3 += q2;
        n4 += q2 * zz;
        n5 += q2 * zz * zz;
        oy[i] = yy;
        oz[i] = zz;
    }
    *ey += ay;
    *ez += az;
    nm[0] += n0;
    nm[1] += n1;
    nm[2] += n2;
    nm[3] += n3;
    nm[4] += n4;
    nm[5] += n5;
    return a;
}

/* Pass J' in the element type: the JS gradients from ly, lz (see passjt). */
KLDIV_INLINE void FN(passjgt)(Py_ssize_t b0, Py_ssize_t b1, const T *restrict sp,
                              const T *restrict sq, const T *restrict sy,
                              const T *restrict sz, T *restrict gx, T *restrict gy, T gxc,
                              T gyc, T ey, T ez, const int want_x, const int want_y,
                              const int xp, const int yp)
{
#pragma omp simd
    for (Py_ssize_t i = b0; i < b1; i++) {
        if (want_x) {
            const T w = xp ? (sp[i] > 0 ? (T)1 : (T)0) : sp[i];
            gx[i] = -gxc * w * (sy[i] - ey);
        }
        if (want_y) {
            const T w = yp ? (sq[i] > 0 ? (T)1 : (T)0) : sq[i];
            gy[i] = -gyc * w * (sz[i] - ez);
        }
    }
}
#endif

/* JS's gradient at a side's top entry, where that side's top probability exceeds 0.8 (Z < 1.25:
 * sp holds the side's weights with maximum 1, Z their sum): -gc w_top (y_top - E_p[y]) with
 * y_top - E_p[y] = (y_top Xo - sum_rest sp y) / (sp_top + Xo), Xo = sum_rest sp summed in
 * double from the other entries (1 - p_top itself). The gradient passes' y_top - E_p[y] is a
 * difference of two numbers near y_top where p_top is near 1: it cancelled to its rounding
 * (float32 logits of std 30, p_top = 1 - 1e-18: exactly 0, the row's largest entry; audit 3
 * F2). The core's, the in-place path's and Triton's algebra. gc: the side's factor in double
 * (beta s / (T Z), or with 1 / max p for probabilities: prob, weight 1 then). y: the values the
 * gradient pass centred (yt in the element type, else yd in double). Overwrites g[top] only;
 * a pass over the scratch on such rows only. */
static void FN(js_top)(Py_ssize_t V, const T *restrict sp, const T *yt, const double *yd,
                       double Z, double gc, int prob, T *g)
{
    if (!(Z < 1.25) || !g)
        return;
    Py_ssize_t it = 0; /* the top entry: the only weight above 1/2 (the others sum below 1/4) */
    while (it < V && !((double)sp[it] > 0.5))
        it++;
    if (it == V)
        return;
    double xo = 0, xyo = 0;
    if (yt) {
#pragma omp simd reduction(+ : xo, xyo)
        for (Py_ssize_t i = 0; i < it; i++) {
            xo += (double)sp[i];
            xyo += (double)sp[i] * (double)yt[i];
        }
#pragma omp simd reduction(+ : xo, xyo)
        for (Py_ssize_t i = it + 1; i < V; i++) {
            xo += (double)sp[i];
            xyo += (double)sp[i] * (double)yt[i];
        }
    } else {
#pragma omp simd reduction(+ : xo, xyo)
        for (Py_ssize_t i = 0; i < it; i++) {
            xo += (double)sp[i];
            xyo += (double)sp[i] * yd[i];
        }
#pragma omp simd reduction(+ : xo, xyo)
        for (Py_ssize_t i = it + 1; i < V; i++) {
            xo += (double)sp[i];
            xyo += (double)sp[i] * yd[i];
        }
    }
    const double w = (double)sp[it], y = yt ? (double)yt[it] : yd[it];
    g[it] = (T)(-gc * (prob ? 1.0 : w) * ((y * xo - xyo) / (w + xo)));
}

/* One JS_beta row: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, and its
 * gradients; nan for "recompute me". Support mismatch is allowed (finite). The log-ratio
 * d = log(q/p) on the common support S is the centred one of the KL passes plus its mean
 * E_{p_S}[d] = log q(S) - log p(S) - KL(p_S || q_S) taken from the accurate KL algebra (not as a
 * difference of normalisers): near convergence d keeps full relative accuracy. Then, as in the
 * core, JS = beta sum_S p phi(y) + (1 - beta) sum_S q phi(z) - beta log(beta) p(off S)
 * - (1 - beta) log(1 - beta) q(off S): non-negative terms only. */
KLDIV_CLONES static double FN(js_row)(const T *x, const T *y, Py_ssize_t V, double inv_t,
                                      double s, double beta, T *gx, T *gy, T *restrict sp,
                                      T *restrict sq, T *restrict sd, T *sa, T *sb,
                                      double *sy, double *sz,
                                      const T *xn, const T *yn, int xp, int yp, double *st)
{
    FN(rowsum_t) rs;
    if (FN(prep)(x, y, V, inv_t, xp, yp, sp, sq, sd, xn, yn, &rs, st, sa, sb))
        return NAN;
    const int dense = rs.dense;
    if (rs.risk) { /* a log-ratio clamped to the type's range: its sign may be lost (a logit of
                    * finfo.min on both sides); the caller's float64 path decides */
        for (Py_ssize_t i = 0; i < V; i++)
            if (KFABS(sd[i]) >= (T)D_CLAMP)
                return NAN;
    }
    const double Zx = rs.Zx, Zy = rs.Zy, ZxS = rs.ZxS, ZqS = rs.ZqS;
    const double po = rs.Zxo / Zx, qo = rs.Zqo / Zy;
    double mu = 0, meanD = 0;
    if (ZxS > 0 && ZqS > 0) { /* the accurate mean log-ratio on S */
        mu = rs.S1 / ZxS;
        const double lc = -log(ZxS) - mu - rs.Dref;
        const int huge = lc > EXP_FLOOR - 30.0;
        const T c = huge ? (T)0 : (T)exp(lc), ip = (T)(1.0 / ZxS), muT = (T)mu;
        double L;
        if (huge) {
            L = lc + log(ZqS);
        } else {
            double acc = 0;
            for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
                const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
                acc += dense ? FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 0, 1)
                             : FN(pass3a)(b0, b1, sp, sq, sd, muT, ip, c, 0, 0);
            }
            L = log1p(acc);
        }
        const double lqS = qo < 0.5 ? log1p(-qo) : log(ZqS / Zy);
        const double lpS = po < 0.5 ? log1p(-po) : log(ZxS / Zx);
        meanD = lqS - lpS - L;
    } else { /* a side's mass on S underflows while S may hold entries (q's logit 100 below
              * its maximum in float32, 1e4 in double, where p lives): E_{p_S}[d] from the
              * row constants, d_i = t_i + Dref + log Zx - log Zy (|E d| is huge then, or S is
              * empty and nothing reads it); mu = 0 keeps t_i + E d = d_i on the centred route */
        mu = ZxS > 0 ? rs.S1 / ZxS : 0.0;
        meanD = mu + rs.Dref + (log(Zx) - log(Zy));
    }
    const double be = beta, c1 = 1.0 - beta, lbe = log(beta), lc1 = log1p(-beta);
    const double rbe = (1.0 - beta) / beta, rc1 = beta / (1.0 - beta);
    /* d_i = log(q_i / p_i) per entry by the more accurate of two routes (the core's
     * _log_ratio): (t_i - mu) + E_{p_S}[d], exact near convergence, or (b_i - a_i) + log Zx
     * - log Zy from the sides centred on their own maxima, where the first one's constants are
     * huge (a q_r of e^-1e30 where p is largest drags mu to ~1e29 and the centred value of every
     * other entry to noise) */
    const double lZx = log(Zx), lZy = log(Zy), amu = fabs(mu) + fabs(meanD);
    const double ipx = 1.0 / Zx, ipy = 1.0 / Zy;
    double acc = 0, ey = 0, ez = 0;
    /* rows far from convergence take the far form (see passj), y - log(beta) and
     * z - log(1 - beta); near it y, z themselves (split at the mean in float) */
    const int near = fabs(meanD) <= 1.0;
    const double L = lc1 - lbe;
#if KLDIV_JS_T
    /* in float: rows without a log-ratio beyond 2^20; near convergence with beta in [0.2, 0.8]
     * (with an extreme beta, y = log(beta + (1 - beta) e^d) sits within a small variation of
     * log beta wherever q << p, and float would lose that variation to the gradient), split at
     * the mean (w, 1 - w and y0, z0 of order 1); far from it the far form (any beta, any
     * support). Then a check (far form only: split at the mean, the carried values are small
     * where the mass is): a row whose carried values are large against their centred
     * differences (the gradient's norm below ~1/30 of its rounding's scale, either side: more
     * than ~5 bits lost in float; one sharp peak of q where d is moderate) goes to the double
     * route. ly, lz go to the double scratch (as floats), so that
     * sa, sb keep a_i, b_i for it. */
    if (!rs.risk && (!near || (beta >= 0.2 && beta <= 0.8))) {
        T *oy = (T *)sy, *oz = (T *)sz;
        double nm[6] = {0, 0, 0, 0, 0, 0};
        if (near) {
            const double y0 = log_mix_d(c1, lc1, rc1, meanD);
            const double z0 = log_mix_d(be, lbe, rbe, -meanD);
            const double lw = lc1 + meanD - y0, lv = lbe - meanD - z0;
            const T tw = (T)exp(lw), tv = (T)exp(lv);
            /* dp = d - E d: t + kt, or (b - a) + kc */
            const T kt = (T)-mu, kc = (T)((lZx - lZy) - meanD);
            const int one = lw >= -1.3862943611198906 && lv >= -1.3862943611198906; /* >= 1/4 */
            for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
                const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
#define KLDIV_PJT(dn, one)                                                                     \
    FN(passjt)(b0, b1, sp, sq, sd, sa, sb, oy, oz, kt, kc, (T)amu, (T)lZx, (T)lZy, (T)ipx,      \
               (T)ipy, (T)be, (T)c1, (T)y0, (T)z0, tw, (T)lw, tv, (T)lv, (T)(lbe - y0),         \
               (T)(lc1 - z0), &ey, &ez, nm, dn, one, 0)
                if (one)
                    acc += dense ? KLDIV_PJT(1, 1) : KLDIV_PJT(0, 1);
                else
                    acc += dense ? KLDIV_PJT(1, 0) : KLDIV_PJT(0, 0);
#undef KLDIV_PJT
            }
        } else {
            /* u = d + L: t + kt, or (b - a) + kc */
            const T kt = (T)((meanD - mu) + L), kc = (T)((lZx - lZy) + L);
            for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
                const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
#define KLDIV_PJB(dn)                                                                          \
    FN(passjb)(b0, b1, sp, sq, sd, sa, sb, oy, oz, kt, kc, (T)amu, (T)lZx, (T)lZy, (T)ipx,      \
               (T)ipy, (T)be, (T)c1, (T)lbe, (T)lc1, &ey, &ez, nm, dn)
                acc += dense ? KLDIV_PJB(1) : KLDIV_PJB(0);
#undef KLDIV_PJB
            }
        }
        /* the centred differences' loss: |p (ly - E ly)|^2 against |p ly|^2 + E^2 |p|^2 (the
         * size of their float rounding), within a factor ~30 on both sides */
        const double gny = nm[2] - 2.0 * ey * nm[1] + ey * ey * nm[0];
        const double gnz = nm[5] - 2.0 * ez * nm[4] + ez * ez * nm[3];
        const int ok = near || (gny >= 1e-3 * (nm[2] + ey * ey * nm[0]) &&
                                gnz >= 1e-3 * (nm[5] + ez * ez * nm[3]));
        if (ok || !(gx || gy)) {
            const double js = acc - beta * log(beta) * po - (1.0 - beta) * log1p(-beta) * qo;
            if (gx || gy) {
                const double fx = xp ? 1.0 / (Zx * rs.xmax) : 1.0 / Zx;
                const double fy = yp ? 1.0 / (Zy * rs.ymax) : 1.0 / Zy;
                const T gxc = (T)(beta * s * inv_t * fx);
                const T gyc = (T)((1.0 - beta) * s * inv_t * fy);
                const T eyT = (T)ey, ezT = (T)ez;
                const int wx = gx != NULL, wy = gy != NULL;
                for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
                    const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
                    if (!xp && !yp && wx && wy)
                        FN(passjgt)(b0, b1, sp, sq, oy, oz, gx, gy, gxc, gyc, eyT, ezT, 1, 1, 0,
                                    0);
                    else if (!xp && !yp && wy)
                        FN(passjgt)(b0, b1, sp, sq, oy, oz, gx, gy, gxc, gyc, eyT, ezT, 0, 1, 0,
                                    0);
                    else
                        FN(passjgt)(b0, b1, sp, sq, oy, oz, gx, gy, gxc, gyc, eyT, ezT, wx, wy,
                                    xp, yp);
                }
                FN(js_top)(V, sp, oy, NULL, Zx, beta * s * inv_t * fx, xp, gx);
                FN(js_top)(V, sq, oz, NULL, Zy, (1.0 - beta) * s * inv_t * fy, yp, gy);
            }
            return js;
        }
        acc = ey = ez = 0; /* the double route below */
    }
    for (Py_ssize_t i = 0; i < V; i++) { /* a_i, b_i for the double passes */
        sy[i] = (double)sa[i];
        sz[i] = (double)sb[i];
    }
#endif
    double ew[2] = {0, 0}; /* sum p, sum q as the pass has them (see below) */
    for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
        const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
#define KLDIV_PJ(dn, far)                                                                      \
    FN(passj)(b0, b1, sp, sq, sd, sy, sz, mu, meanD, amu, lZx, lZy, ipx, ipy, be, c1, lbe, lc1,  \
              rbe, rc1, &ey, &ez, ew, dn, far, L)
        if (near)
            acc += dense ? KLDIV_PJ(1, 0) : KLDIV_PJ(0, 0);
        else
            acc += dense ? KLDIV_PJ(1, 1) : KLDIV_PJ(0, 1);
#undef KLDIV_PJ
    }
    /* E_p y, E_q z over the weights as they are: the float kernel's Zx, Zy hold float block
     * sums, and an error of 1e-7 in sum q is one of 1e-7 |z| in E_q z, which a q peaked on one
     * entry (z - E_q z ~ 1e-4 there) would show */
    ey /= ew[0];
    ez /= ew[1];
    const double js = acc - beta * log(beta) * po - (1.0 - beta) * log1p(-beta) * qo;
    if (gx || gy) {
        /* probability sides: p_i / x_i = 1 / (Zx max p) */
        const double fx = xp ? 1.0 / (Zx * rs.xmax) : 1.0 / Zx;
        const double fy = yp ? 1.0 / (Zy * rs.ymax) : 1.0 / Zy;
        const T gxc = (T)(beta * s * inv_t * fx), gyc = (T)((1.0 - beta) * s * inv_t * fy);
        const int wx = gx != NULL, wy = gy != NULL;
        for (Py_ssize_t b0 = 0; b0 < V; b0 += KLDIV_BLOCK) {
            const Py_ssize_t b1 = b0 + KLDIV_BLOCK < V ? b0 + KLDIV_BLOCK : V;
            if (!xp && !yp && wx && wy)
                FN(passjg)(b0, b1, sp, sq, sy, sz, gx, gy, gxc, gyc, ey, ez, 1, 1, 0, 0);
            else if (!xp && !yp && wy)
                FN(passjg)(b0, b1, sp, sq, sy, sz, gx, gy, gxc, gyc, ey, ez, 0, 1, 0, 0);
            else
                FN(passjg)(b0, b1, sp, sq, sy, sz, gx, gy, gxc, gyc, ey, ez, wx, wy, xp, yp);
        }
        FN(js_top)(V, sp, NULL, sy, Zx, beta * s * inv_t * fx, xp, gx);
        FN(js_top)(V, sq, NULL, sz, Zy, (1.0 - beta) * s * inv_t * fy, yp, gy);
    }
    return js;
}

/* One Jeffreys row, KL(p || q) + KL(q || p), in one call: the two KL rows (the second's
 * gradients into the scratch tx, ty, then added). +inf in either direction: +inf with zero
 * gradients (the core's convention); nan in either: nan (the caller recomputes). */
KLDIV_CLONES static double FN(jeffreys_row)(const T *x, const T *y, Py_ssize_t V, double inv_t,
                                            double s, T *gx, T *gy, T *restrict sp,
                                            T *restrict sq, T *restrict sd, T *restrict tx,
                                            T *restrict ty, const T *xn, const T *yn, int xp,
                                            int yp, double *st)
{
    const double f = FN(kl_row)(x, y, V, inv_t, s, gx, gy, sp, sq, sd, xn, yn, xp, yp, st);
    if (f != f)
        return NAN;
    tx = gx ? tx : NULL;
    ty = gy ? ty : NULL;
    const double b = FN(kl_row)(y, x, V, inv_t, s, ty, tx, sp, sq, sd, NULL, NULL, yp, xp, NULL);
    if (b != b)
        return NAN;
    if (f == INFINITY || b == INFINITY) {
        if (gx)
            memset(gx, 0, (size_t)V * sizeof(T));
        if (gy)
            memset(gy, 0, (size_t)V * sizeof(T));
        return INFINITY;
    }
    if (gx) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < V; i++)
            gx[i] += tx[i];
    }
    if (gy) {
#pragma omp simd
        for (Py_ssize_t i = 0; i < V; i++)
            gy[i] += ty[i];
    }
    return f + b;
}

#if KLDIV_WIDEN
/* A row the float kernel leaves (nan: values spanning more than float holds, as logits of 3e38
 * next to a mask of finfo.min; an underflowed p_i at a huge log-ratio; a JS log-ratio clamped
 * to float's range): the double kernel on the row widened to double (exact), its gradients
 * rounded to float once. Each side's shift by its own maximum is then taken in double, and
 * the log-ratio from the raw differences (TwoSum) as everywhere: entries that carry mass stay
 * apart (2 - 3e38 and -1 - 3e38 are one float, but their log-ratios to the other side are
 * not). Still nan (nan input, no distribution, negative probabilities): the caller decides.
 * Costs a conversion and a fresh scratch, on such rows only. */
static double FN(wide_row)(int kind, const T *x, const T *y, Py_ssize_t V, double inv_t,
                           double beta, int xp, int yp, double s, T *gx, T *gy, double *st)
{
    const size_t off = ((3 * (size_t)V * sizeof(double) + 63) / 64) * 64;
    const size_t extra = kind ? ((2 * (size_t)V * sizeof(double) + 63) / 64) * 64 : 0;
    char *mem = (char *)aligned_alloc(64, off + extra + 4 * (size_t)V * sizeof(double));
    if (!mem)
        return NAN;
    double *xd = (double *)(mem + off + extra), *yd = xd + V, *gxd = yd + V, *gyd = gxd + V;
    for (Py_ssize_t i = 0; i < V; i++) {
        xd[i] = (double)x[i];
        yd[i] = (double)y[i];
    }
    double row;
    one_row_d(0, kind, xd, V, yd, V, 1, V, inv_t, beta, xp, yp, &s, &row, gx ? gxd : NULL, V,
              gy ? gyd : NULL, V, st, (double *)mem, off, 0);
    if (row == row) {
        if (gx)
            for (Py_ssize_t i = 0; i < V; i++)
                gx[i] = (T)gxd[i];
        if (gy)
            for (Py_ssize_t i = 0; i < V; i++)
                gy[i] = (T)gyd[i];
    }
    free(mem);
    return row;
}
#endif

/* Row r of FN(run) (scratch buf, NULL when it could not be allocated). */
KLDIV_INLINE void FN(one_row)(Py_ssize_t r, int kind, const T *x, Py_ssize_t xs, const T *y,
                              Py_ssize_t ys, Py_ssize_t n, Py_ssize_t V, double inv_t,
                              double beta, int xp, int yp, const double *scale, double *rows,
                              T *gx, Py_ssize_t gxs, T *gy, Py_ssize_t gys, double *stats,
                              T *buf, size_t off, size_t off2)
{
    const double s = scale ? scale[r] : 1.0;
    T *gxr = gx ? gx + r * gxs : NULL;
    T *gyr = gy ? gy + r * gys : NULL;
    double *st = stats ? stats + 2 * r : NULL;
    if (s == 0.0) { /* masked row: costs a memset of its gradients */
        rows[r] = 0.0;
        if (st) { /* not checked (the core does not check masked rows) */
            st[0] = xp ? 1.0 : 0.0;
            st[1] = yp ? 1.0 : 0.0;
        }
        if (gxr)
            memset(gxr, 0, (size_t)V * sizeof(T));
        if (gyr)
            memset(gyr, 0, (size_t)V * sizeof(T));
        return;
    }
    if (!buf) {
        rows[r] = NAN;
        return;
    }
    const int more = r + 1 < n;
    const T *xn = more ? x + (r + 1) * xs : NULL, *yn = more ? y + (r + 1) * ys : NULL;
    if (kind == 1) {
        T *sa = (T *)((char *)buf + off);
        double *sy = (double *)((char *)buf + off + off2);
        rows[r] = FN(js_row)(x + r * xs, y + r * ys, V, inv_t, s, beta, gxr, gyr, buf, buf + V,
                             buf + 2 * V, sa, sa + V, sy, sy + V, xn, yn, xp, yp, st);
    } else if (kind == 2) {
        T *tx = (T *)((char *)buf + off);
        rows[r] = FN(jeffreys_row)(x + r * xs, y + r * ys, V, inv_t, s, gxr, gyr, buf, buf + V,
                                   buf + 2 * V, tx, tx + V, xn, yn, xp, yp, st);
    } else {
        rows[r] = FN(kl_row)(x + r * xs, y + r * ys, V, inv_t, s, gxr, gyr, buf, buf + V,
                             buf + 2 * V, xn, yn, xp, yp, st);
    }
#if KLDIV_WIDEN
    if (rows[r] != rows[r]) /* left by this kernel (gradients untouched): in double */
        rows[r] = FN(wide_row)(kind, x + r * xs, y + r * ys, V, inv_t, beta, xp, yp, s, gxr,
                               gyr, st);
#endif
}

/* All rows, OpenMP over rows (one thread: a plain loop, no team); returns nonzero when a
 * scratch buffer could not be allocated.
 * kind 0: KL(p || q), 1: JS_beta, 2: Jeffreys (KL(p || q) + KL(q || p)).
 * flags: 1 = x holds probabilities, 2 = y does (T = 1).
 * stats: (n, 2) raw normalisers of each row (see prep), or NULL. */
static int FN(run)(int kind, const T *x, Py_ssize_t xs, const T *y, Py_ssize_t ys, Py_ssize_t n,
                   Py_ssize_t V, double inv_t, double beta, int flags, const double *scale,
                   double *rows, T *gx, Py_ssize_t gxs, T *gy, Py_ssize_t gys, double *stats,
                   int nthreads)
{
    int err = 0;
    const int xp = flags & 1, yp = (flags >> 1) & 1;
    /* scratch: three arrays of T; for JS two more of T (a_i, b_i; in the double kernel the same
     * memory as the next two) and two of double; for Jeffreys two of T (the reverse direction's
     * gradients); 64-byte aligned */
    const size_t off = ((3 * (size_t)V * sizeof(T) + 63) / 64) * 64;
    const size_t off2 = kind == 1 && KLDIV_JS_T ? ((2 * (size_t)V * sizeof(T) + 63) / 64) * 64
                                                : 0;
    const size_t extra = kind == 1   ? ((2 * (size_t)V * sizeof(double) + 63) / 64) * 64
                         : kind == 2 ? ((2 * (size_t)V * sizeof(T) + 63) / 64) * 64
                                     : 0;
    const size_t bytes = off + off2 + extra;
    if (nthreads > n)
        nthreads = n > 0 ? (int)n : 1;
    if (nthreads <= 1) {
        T *buf = (T *)aligned_alloc(64, bytes);
        err = !buf;
        for (Py_ssize_t r = 0; r < n; r++)
            FN(one_row)(r, kind, x, xs, y, ys, n, V, inv_t, beta, xp, yp, scale, rows, gx, gxs,
                        gy, gys, stats, buf, off, off2);
        free(buf);
        return err;
    }
#pragma omp parallel num_threads(nthreads)
    {
        T *buf = (T *)aligned_alloc(64, bytes);
        if (!buf) {
#pragma omp atomic write
            err = 1;
        }
#pragma omp for schedule(dynamic, 16)
        for (Py_ssize_t r = 0; r < n; r++)
            FN(one_row)(r, kind, x, xs, y, ys, n, V, inv_t, beta, xp, yp, scale, rows, gx, gxs,
                        gy, gys, stats, buf, off, off2);
        free(buf);
    }
    return err;
}

#undef FN
#undef KCAT
#undef KCAT_
#undef KLDIV_LV

#endif /* KLDIV_FUSED_TEMPLATE */
