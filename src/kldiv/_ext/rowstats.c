/* kldiv._ext._rowstats: per-row divergence statistics between two float32 logits matrices.
 *
 * Used by `kldiv compare` (src/kldiv/compare/kernel.py, which also holds the NumPy fallback with
 * the same math). For each row i of two (n_rows, n_vocab) float32 matrices a (reference, p side)
 * and b (other, q side), with p = softmax(a), q = softmax(b):
 *
 *   kl[i]      = KL(p || q)          (+inf when q = 0 somewhere p > 0)
 *   rkl[i]     = KL(q || p)          (only when `reverse` is true, else left untouched)
 *   js[i]      = JS(p, q), beta 1/2  (only when a `js` buffer is passed; NaN for rows with -inf
 *                                     logits, which the caller computes in NumPy)
 *   top_a[i]   = first argmax of a,  top_b[i] = first argmax of b
 *   logz_a[i]  = log sum_j exp(a_j - max a)   (so the reference's top-1 probability is exp(-logz_a))
 *   lpa_tok[i] = log p[tok_i], lpb_tok[i] = log q[tok_i]   (only when tokens are given)
 *   status[i]  = bit flags: 1 NaN in a, 2 +inf in a, 4 NaN in b, 8 +inf in b,
 *                16 a has no finite entry, 32 b has no finite entry, 64 token out of range.
 *                A row with a nonzero status has undefined statistics.
 *
 * Accuracy (cancellation-free form, the same as kldiv's core): with d_j = b_j - a_j on the support
 * S of p, dbar = sum_j p_j d_j and x_j = d_j - dbar,
 *
 *   KL(p || q) = log1p( sum_{j in S} p_j * phi(x_j) ) - log q(S),   phi(x) = expm1(x) - x >= 0,
 *
 * which has no cancellation between two log-sum-exps. phi is a Taylor series for |x| < 0.5. The
 * difference d_j is formed exactly (TwoSum) and centred by a shift d0 taken at the reference's
 * mode, so that x_j stays accurate when both logit vectors differ by a large constant. The sums are
 * accumulated in float32 over blocks of BLOCK elements (vectorised by `omp simd` reductions) and
 * then in double.
 *
 * Rows with finite logits (row_kernel_fwd): one pass from memory (maxima), then in cache p's
 * weights and the centred differences (one exponential per pair), the centred phi sum, and for
 * the reverse KL and JS a fourth pass of series in u = log(q/p) (no exponentials where
 * |u| < 0.5). Rows with -inf logits (row_kernel): masks for the supports, two exponentials per
 * pair, the reverse KL from q's weights. The GIL is released; rows are spread over `nthreads` OpenMP
 * threads (kldiv calls it with nthreads = 1 from a pool of Python threads, whose idle workers
 * sleep instead of spinning). No -march=native: the row
 * function is compiled for AVX-512, AVX2 and the baseline, chosen at load time (target_clones).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kl_rows.h" /* KLDIV_CLONES, FMA contraction, kl_expf_core, TwoSum, kl_get_buf */

#define BLOCK 2048

enum {
    ST_NAN_A = 1, ST_PINF_A = 2, ST_NAN_B = 4, ST_PINF_B = 8,
    ST_EMPTY_A = 16, ST_EMPTY_B = 32, ST_TOKEN = 64, ST_HUGE = 128,
};

/* Rows with a finite logit of this magnitude or more are computed here for the top-1 indices,
 * partition function and token log-probabilities only; their divergences are flagged ST_HUGE
 * and recomputed in double by the caller (kernel.py, issue 11 item 1). The exact differences
 * below are centred by d0 = b - a at one entry, whose low part carries a float32 rounding of
 * ~4e-15 |d0|: harmless below 2^16, noise next to a side of constant -1e30 (whose differences
 * d0 swallows), and float32 differences overflow from 2^127 on. */
#define HUGE_LOGIT 65536.0f

/* exp(x) = 0 for x < -87 (including -inf), +inf for x > 88 (so that an overflowing row is
 * detected and recomputed in double). */
static inline float fexp(float x)
{
    const float lo = -87.0f, hi = 88.0f;
    float y = kl_expf_core(x < lo ? lo : (x > hi ? hi : x));
    y = x > hi ? INFINITY : y;
    return x < lo ? 0.0f : y;
}

/* fexp for x <= 0 (logits minus their maximum): no overflow side to check. */
static inline float fexp_neg(float x)
{
    const float lo = -87.0f;
    float y = kl_expf_core(x < lo ? lo : x);
    return x < lo ? 0.0f : y;
}

/* phi(x) = exp(x) - 1 - x for |x| < 0.5 by its Taylor series (terms to x^9: float32 exact). */
static inline float phi_small(float x)
{
    float s = 1.0f / 362880.0f;
    s = s * x + 1.0f / 40320.0f;
    s = s * x + 1.0f / 5040.0f;
    s = s * x + 1.0f / 720.0f;
    s = s * x + 1.0f / 120.0f;
    s = s * x + 1.0f / 24.0f;
    s = s * x + 1.0f / 6.0f;
    s = s * x + 0.5f;
    return s * x * x;
}

/* With u = log(q_j / p_j), the reverse KL and the Jensen-Shannon divergence are p-weighted sums
 * of functions that vanish to second order at u = 0 (given sum_j p_j e^u_j = 1):
 *   KL(q || p) = sum_j p_j h(u_j),   h(u) = 1 + (u - 1) e^u        = sum_{n>=2} (n-1)/n! u^n,
 *   JS(p, q)   = 1/2 sum_j p_j g(u_j), g(u) = u e^u - (1 + e^u) log((1 + e^u) / 2)
 *                                        = u^2/4 + u^3/8 + u^4/32 + u^5/192 + ...
 * Their Taylor series for |u| < 0.5 (truncation below 1e-9 relative) avoid the cancellation. */
static inline float h_small(float u)
{
    float s = 10.0f / 39916800.0f;
    s = s * u + 9.0f / 3628800.0f;
    s = s * u + 8.0f / 362880.0f;
    s = s * u + 7.0f / 40320.0f;
    s = s * u + 6.0f / 5040.0f;
    s = s * u + 5.0f / 720.0f;
    s = s * u + 4.0f / 120.0f;
    s = s * u + 3.0f / 24.0f;
    s = s * u + 2.0f / 6.0f;
    s = s * u + 0.5f;
    return s * u * u;
}

static inline float g_small(float u)
{
    float s = -1.0f / 19353600.0f;
    s = s * u - 1.0f / 1935360.0f;
    s = s * u + 1.0f / 46080.0f;
    s = s * u + 1.0f / 5760.0f;
    s = s * u + 1.0f / 1152.0f;
    s = s * u + 1.0f / 192.0f;
    s = s * u + 1.0f / 32.0f;
    s = s * u + 1.0f / 8.0f;
    s = s * u + 0.25f;
    return s * u * u;
}

/* log(1 + v) for v in [0, 1], vectorisable (Cephes logf polynomial on [sqrt(1/2), sqrt(2)),
 * about 1 ulp; v below float32's epsilon contributes nothing, which the callers tolerate). */
static inline float log1p_01(float v)
{
    float y = 1.0f + v;
    int e = y > 1.41421356f;
    float x = (e ? 0.5f * y : y) - 1.0f;
    float z = x * x;
    float p = 7.0376836292e-2f;
    p = p * x - 1.1514610310e-1f;
    p = p * x + 1.1676998740e-1f;
    p = p * x - 1.2420140846e-1f;
    p = p * x + 1.4249322787e-1f;
    p = p * x - 1.6668057665e-1f;
    p = p * x + 2.0000714765e-1f;
    p = p * x - 2.4999993993e-1f;
    p = p * x + 3.3333331174e-1f;
    float r = p * x * z - 0.5f * z;
    float fe = e ? 1.0f : 0.0f;
    return (x + (r + fe * -2.12194440e-4f)) + fe * 0.693359375f;
}

/* The centred difference t = (b - a) - d0 with d0 = d0h + d0l, from an exact TwoSum of b and -a.
 * Returns NaN where either side is -inf: those entries are off the common support and are
 * handled by the support terms (the sums below skip them through the NaN). */
static inline float two_sum_diff(float a, float b, float d0h, float d0l)
{
    float err, s = kl_two_difff(b, a, &err);
    return (s - d0h) + (err - d0l);
}

static inline float centred_diff(float a, float b, float d0h, float d0l)
{
    float t = two_sum_diff(a, b, d0h, d0l);
    int ok = (a > -INFINITY) & (b > -INFINITY);
    return ok ? t : NAN;
}

typedef struct {
    double kl, rkl, js, logz_a, logz_b;
    int top_a, top_b, status;
} rowres;

KLDIV_CLONES
static void row_kernel(const float *a, const float *b, Py_ssize_t n, int reverse, float *scratch,
                       rowres *res)
{
    /* pass 1: maxima; a sum of x * 0 is 0 exactly when every entry is finite (the usual case:
     * then no masks are needed below), NaN otherwise (then a second scan sorts out why) */
    float ma = -INFINITY, mb = -INFINITY, chk = 0.0f;
#pragma omp simd reduction(max : ma, mb) reduction(+ : chk)
    for (Py_ssize_t j = 0; j < n; j++) {
        float x = a[j], y = b[j];
        ma = x > ma ? x : ma;
        mb = y > mb ? y : mb;
        chk += x * 0.0f + y * 0.0f;
    }
    const int allfinite = chk == 0.0f;
    int bad_a = 0, bad_b = 0, qzero = 0, pzero = 0;
    if (!allfinite) {
#pragma omp simd reduction(| : bad_a, bad_b, qzero, pzero)
        for (Py_ssize_t j = 0; j < n; j++) {
            float x = a[j], y = b[j];
            bad_a |= !(x < INFINITY) & (x != -INFINITY);
            bad_b |= !(y < INFINITY) & (y != -INFINITY);
            qzero |= (x > -INFINITY) & (y == -INFINITY);
            pzero |= (y > -INFINITY) & (x == -INFINITY);
        }
    }
    res->status = 0;
    if (bad_a || bad_b) {
        for (Py_ssize_t j = 0; j < n; j++) {
            if (isnan(a[j])) res->status |= ST_NAN_A;
            if (a[j] == INFINITY) res->status |= ST_PINF_A;
            if (isnan(b[j])) res->status |= ST_NAN_B;
            if (b[j] == INFINITY) res->status |= ST_PINF_B;
        }
        return;
    }
    if (ma == -INFINITY) res->status |= ST_EMPTY_A;
    if (mb == -INFINITY) res->status |= ST_EMPTY_B;
    if (res->status) return;

    /* first argmax of each side */
    Py_ssize_t ia = n, ib = n;
#pragma omp simd reduction(min : ia, ib)
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t ja = a[j] == ma ? j : n, jb = b[j] == mb ? j : n;
        ia = ja < ia ? ja : ia;
        ib = jb < ib ? jb : ib;
    }
    res->top_a = (int)ia;
    res->top_b = (int)ib;

    /* shift d0 = b - a at the reference's mode (or the other's mode if that is -inf there) */
    Py_ssize_t i0 = (b[ia] > -INFINITY) ? ia : ib;
    double d0 = (double)b[i0] - (double)a[i0];
    if (!(a[i0] > -INFINITY)) d0 = 0.0;
    float d0h = (float)d0, d0l = (float)(d0 - (double)d0h);

    /* pass 2: partition functions, p- and q-weighted mean of t, masses off the supports */
    float *wa = scratch, *wb = scratch + n, *tt = scratch + 2 * n;
    double Za = 0, Zb = 0, A = 0, B = 0, QSc = 0, PSc = 0, QS = 0, PS = 0;
    for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
        Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        /* q's mass off / on the support of p (qsc, qs), and p's off / on the support of q */
        float za = 0, zb = 0, sa = 0, sb = 0, qsc = 0, psc = 0, qs = 0, ps = 0;
        if (allfinite) {
#pragma omp simd reduction(+ : za, zb, sa, sb)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float x = a[j], y = b[j];
                float ea = fexp(x - ma), eb = fexp(y - mb);
                float t = two_sum_diff(x, y, d0h, d0l);
                wa[j] = ea;
                wb[j] = eb;
                tt[j] = t;
                za += ea;
                zb += eb;
                sa += ea * t;
                sb += eb * t;
            }
        } else {
#pragma omp simd reduction(+ : za, zb, sa, sb, qsc, psc, qs, ps)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float x = a[j], y = b[j];
                float ea = fexp(x - ma), eb = fexp(y - mb);
                float t = centred_diff(x, y, d0h, d0l);
                float tm = t == t ? t : 0.0f;
                wa[j] = ea;
                wb[j] = eb;
                tt[j] = t;
                za += ea;
                zb += eb;
                sa += ea * tm;
                sb += eb * tm;
                qsc += x == -INFINITY ? eb : 0.0f;
                psc += y == -INFINITY ? ea : 0.0f;
                qs += x == -INFINITY ? 0.0f : eb;
                ps += y == -INFINITY ? 0.0f : ea;
            }
        }
        Za += za; Zb += zb; A += sa; B += sb; QSc += qsc; PSc += psc; QS += qs; PS += ps;
    }
    res->logz_a = log(Za);
    res->logz_b = log(Zb);

    /* pass 3: centred phi sums, without exponentials. With x = t - ca (p side),
     *   p_j phi(x_j) Za = wa_j phi(x_j)                (Taylor series, |x| < 0.5)
     *                   = wb_j Cf - wa_j (1 + x_j)     (elsewhere: p_j e^x_j Za = wb_j Cf exactly)
     * where Cf = exp(mb - ma - d0 - ca); symmetrically on the q side with y = cb - t and
     * Cr = exp(ma - mb + d0 + cb). Entries off the common support carry t = NaN and are skipped.
     * An overflow (a divergence of ~80 nats or more) gives +inf and the row is redone in double. */
    const double caD = A / Za, cbD = B / Zb;
    const float ca = (float)caD, cb = (float)cbD;
    /* mb - ma - d0 = (mb - b[i0]) - (ma - a[i0]): each side against its own maximum, so that
     * logits 1e30 apart lose nothing (issue 11 item 1) */
    const double cq = (a[i0] > -INFINITY) ? ((double)mb - (double)b[i0]) - ((double)ma - (double)a[i0])
                                          : (double)mb - (double)ma;
    const float Cf = (float)exp(cq - caD);
    const float Cr = (float)exp(-cq + cbD);
    double U = 0, R = 0;
    for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
        Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        float u = 0;
        if (!qzero) {
#pragma omp simd reduction(+ : u)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float t = tt[j];
                float x = t - ca;
                float w = wa[j];
                float small = w * phi_small(x);
                float big = wb[j] * Cf - w * (1.0f + x);
                float term = (x < 0.5f) & (x > -0.5f) ? small : big;
                u += (allfinite | (t == t)) ? term : 0.0f;
            }
        }
        U += u;
        float r = 0;
        if (reverse && !pzero) {
#pragma omp simd reduction(+ : r)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float t = tt[j];
                float y = cb - t; /* centred a - b on the q side */
                float w = wb[j];
                float small = w * phi_small(y);
                float big = wa[j] * Cr - w * (1.0f + y);
                float term = (y < 0.5f) & (y > -0.5f) ? small : big;
                r += (allfinite | (t == t)) ? term : 0.0f;
            }
        }
        R += r;
    }
    /* -log q(S) = log1p(q mass off S / q mass on S): no cancellation when q(S) is small */
    if (qzero) {
        res->kl = INFINITY;
    } else {
        res->kl = log1p(U / Za) + (QSc > 0 ? log1p(QSc / QS) : 0.0);
        if (!(res->kl >= 0)) res->kl = res->kl < 0 ? 0.0 : res->kl;
    }
    if (reverse) {
        if (pzero) {
            res->rkl = INFINITY;
        } else {
            res->rkl = log1p(R / Zb) + (PSc > 0 ? log1p(PSc / PS) : 0.0);
            if (!(res->rkl >= 0)) res->rkl = res->rkl < 0 ? 0.0 : res->rkl;
        }
    }
}

/* The common case in one function: forward KL only, every logit finite. One exponential per
 * pair instead of two, since KL(p || q) = log1p(sum_j p_j phi(x_j)) needs only p's weights and the
 * exact differences; the other's partition function follows from it,
 *   log sum_j e^{b_j} = ma + log Za + d0 + log sum_j p_j e^{t_j}.
 * Pass 1 (from memory) finds the maxima block by block and the first argmax inside the winning
 * block; pass 2 (row now in cache) stores wa = exp(a - ma) and the centred differences t, and
 * the range of t per block; pass 3 sums wa * phi(t - ca) with the Taylor series only, except in
 * the blocks whose range reaches |x| >= 0.5, where e^x comes from q's side as wb * Cf (exact even
 * where wa underflows). Returns 0 when done, 1 when the row is not all-finite (the caller runs
 * row_kernel, which sorts out why). */
KLDIV_CLONES
static int row_kernel_fwd(const float *a, const float *b, Py_ssize_t n, float *scratch, rowres *res,
                          int want_rev, int want_js)
{
    float ma = -INFINITY, mb = -INFINITY, chk = 0.0f, mn = INFINITY;
    Py_ssize_t blk_a = 0, blk_b = 0;
    for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
        Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        float xa = -INFINITY, xb = -INFINITY, c = 0.0f, m = INFINITY;
#pragma omp simd reduction(max : xa, xb) reduction(min : m) reduction(+ : c)
        for (Py_ssize_t j = j0; j < j1; j++) {
            float x = a[j], y = b[j];
            xa = x > xa ? x : xa;
            xb = y > xb ? y : xb;
            float lo = x < y ? x : y;
            m = lo < m ? lo : m;
            c += x * 0.0f + y * 0.0f;
        }
        if (xa > ma) { ma = xa; blk_a = j0; }
        if (xb > mb) { mb = xb; blk_b = j0; }
        mn = m < mn ? m : mn;
        chk += c;
    }
    if (!(chk == 0.0f)) return 1;
    /* |logits| of HUGE_LOGIT or more: redone in double by the caller */
    if (ma >= HUGE_LOGIT || mb >= HUGE_LOGIT || mn <= -HUGE_LOGIT) return 1;
    Py_ssize_t ia = blk_a, ib = blk_b;
    while (a[ia] != ma) ia++;
    while (b[ib] != mb) ib++;
    res->top_a = (int)ia;
    res->top_b = (int)ib;
    res->status = 0;

    const double d0 = (double)b[ia] - (double)a[ia];
    const float d0h = (float)d0, d0l = (float)(d0 - (double)d0h);
    const Py_ssize_t nblk = (n + BLOCK - 1) / BLOCK;
    float *wa = scratch, *tt = scratch + n, *tlo = scratch + 2 * n, *thi = tlo + nblk;
    double Za = 0, A = 0;
    for (Py_ssize_t k = 0; k < nblk; k++) {
        Py_ssize_t j0 = k * BLOCK, j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        float za = 0, sa = 0, lo = INFINITY, hi = -INFINITY;
#pragma omp simd reduction(+ : za, sa) reduction(min : lo) reduction(max : hi)
        for (Py_ssize_t j = j0; j < j1; j++) {
            float x = a[j], y = b[j];
            float ea = fexp_neg(x - ma);
            float t = two_sum_diff(x, y, d0h, d0l);
            wa[j] = ea;
            tt[j] = t;
            za += ea;
            sa += ea * t;
            lo = t < lo ? t : lo;
            hi = t > hi ? t : hi;
        }
        tlo[k] = lo;
        thi[k] = hi;
        Za += za;
        A += sa;
    }
    res->logz_a = log(Za);

    const double caD = A / Za;
    const float ca = (float)caD;
    /* mb - ma - d0 = mb - b[ia] exactly (a[ia] = ma): no difference of the two maxima, which
     * would swallow the smaller one for logits 1e30 apart (issue 11 item 1) */
    const double cq = (double)mb - (double)b[ia];
    const float Cf = (float)exp(cq - caD);
    double U = 0;
    for (Py_ssize_t k = 0; k < nblk; k++) {
        Py_ssize_t j0 = k * BLOCK, j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        float u = 0;
        if (thi[k] - ca < 0.5f && tlo[k] - ca > -0.5f) {
#pragma omp simd reduction(+ : u)
            for (Py_ssize_t j = j0; j < j1; j++)
                u += wa[j] * phi_small(tt[j] - ca);
        } else {
#pragma omp simd reduction(+ : u)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float x = tt[j] - ca;
                float w = wa[j];
                float small = w * phi_small(x);
                float big = fexp_neg(b[j] - mb) * Cf - w * (1.0f + x);
                u += (x < 0.5f) & (x > -0.5f) ? small : big;
            }
        }
        U += u;
    }
    /* sum_j p_j x_j = caD - ca (ca is rounded to float): KL = log(1 + dl + U/Za) - dl */
    const double dl = caD - (double)ca;
    const double s = log1p(dl + U / Za);
    res->kl = s - dl;
    if (!(res->kl >= 0)) res->kl = res->kl < 0 ? 0.0 : res->kl;
    res->logz_b = res->logz_a + (double)ca + s - cq;
    if (!isfinite(res->kl) || !isfinite(res->logz_b)) { /* overflow: the caller redoes it in double */
        double zb = 0;
        for (Py_ssize_t j = 0; j < n; j++) zb += exp((double)b[j] - (double)mb);
        res->logz_b = log(zb);
        res->kl = INFINITY;
        res->rkl = res->js = NAN;
        return 0;
    }
    if (!(want_rev || want_js)) return 0;

    /* pass 4 (reverse KL and JS): u = log(q/p) = x - s, still no exponentials where |u| < 0.5.
     * Elsewhere, in units of Za: P = wa, Q = q Za = wb Cf e^-s, and
     *   p h(u) = P - Q + Q u,   p g(u) = P (ln 2 - softplus(u)) + Q (ln 2 - softplus(-u)). */
    const float cu = (float)((double)ca + s);
    const float Cq = (float)((double)Cf * exp(-s));
    const float LN2 = 0.69314718056f;
    double R = 0, J = 0;
    for (Py_ssize_t k = 0; k < nblk; k++) {
        Py_ssize_t j0 = k * BLOCK, j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        float r = 0, g = 0;
        if (thi[k] - cu < 0.5f && tlo[k] - cu > -0.5f) {
#pragma omp simd reduction(+ : r, g)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float u = tt[j] - cu, w = wa[j];
                r += w * h_small(u);
                g += w * g_small(u);
            }
        } else {
#pragma omp simd reduction(+ : r, g)
            for (Py_ssize_t j = j0; j < j1; j++) {
                float u = tt[j] - cu, w = wa[j];
                float Q = fexp_neg(b[j] - mb) * Cq;
                float au = u < 0.0f ? -u : u;
                float l = log1p_01(fexp_neg(-au));
                float sp_pos = (u > 0.0f ? u : 0.0f) + l, sp_neg = (u < 0.0f ? -u : 0.0f) + l;
                int sm = au < 0.5f;
                r += sm ? w * h_small(u) : (w - Q) + Q * u;
                g += sm ? w * g_small(u) : w * (LN2 - sp_pos) + Q * (LN2 - sp_neg);
            }
        }
        R += r;
        J += g;
    }
    res->rkl = R / Za;
    res->js = 0.5 * J / Za;
    if (res->rkl < 0) res->rkl = 0.0; /* NaN stays NaN (the caller then redoes the row) */
    if (res->js < 0) res->js = 0.0;
    if (!isfinite(res->js)) res->js = NAN;
    return 0;
}

/* Fallback for a row whose fast float32 phi sum overflowed (a KL of order 80 nats or more):
 * the direct formula in double, sum p (log p - log q), which has no cancellation problem there. */
static double row_direct(const float *a, const float *b, Py_ssize_t n, double ma, double mb,
                         double logz_a, double logz_b)
{
    double s = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (!(a[j] > -INFINITY)) continue;
        double lp = (double)a[j] - ma - logz_a;
        double lq = (double)b[j] - mb - logz_b;
        s += exp(lp) * (lp - lq);
    }
    return s < 0 ? 0.0 : s;
}

/* ---------------------------------------------------------------- Python binding */

static PyObject *py_rowstats(PyObject *self, PyObject *args)
{
    PyObject *oa, *ob, *otok, *okl, *orkl, *otopa, *otopb, *ologza, *olpa, *olpb, *ost, *ojs = Py_None;
    Py_ssize_t n_rows, n_vocab;
    int reverse, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnnOiiOOOOOOOO|O", &oa, &ob, &n_rows, &n_vocab, &otok, &reverse,
                          &nthreads, &okl, &orkl, &otopa, &otopb, &ologza, &olpa, &olpb, &ost, &ojs))
        return NULL;
    if (n_rows < 0 || n_vocab < 1 || n_vocab > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "n_rows must be >= 0 and n_vocab in [1, 2**31)");
        return NULL;
    }
    Py_buffer ba, bb, btok, bkl, brkl, btopa, btopb, blz, blpa, blpb, bst, bjs;
    Py_buffer *all[12] = {&ba, &bb, &btok, &bkl, &brkl, &btopa, &btopb, &blz, &blpa, &blpb, &bst, &bjs};
    int got = 0, have_tok = otok != Py_None, want_js = ojs != Py_None;
    Py_ssize_t nf = n_rows * n_vocab * (Py_ssize_t)sizeof(float);
    Py_ssize_t n8 = n_rows * 8, n4 = n_rows * 4;
#define GET(obj, view, wr, need, name)                         \
    if (kl_get_buf(obj, view, wr, need, name) < 0) goto fail;     \
    got++;
    GET(oa, &ba, 0, nf, "a");
    GET(ob, &bb, 0, nf, "b");
    if (have_tok) {
        GET(otok, &btok, 0, n4, "tokens");
    } else {
        memset(&btok, 0, sizeof btok);
        got++;
    }
    GET(okl, &bkl, 1, n8, "kl");
    GET(orkl, &brkl, 1, reverse ? n8 : 0, "rkl");
    GET(otopa, &btopa, 1, n4, "top_a");
    GET(otopb, &btopb, 1, n4, "top_b");
    GET(ologza, &blz, 1, n8, "logz_a");
    GET(olpa, &blpa, 1, have_tok ? n8 : 0, "lpa_tok");
    GET(olpb, &blpb, 1, have_tok ? n8 : 0, "lpb_tok");
    GET(ost, &bst, 1, n4, "status");
    if (want_js) {
        GET(ojs, &bjs, 1, n8, "js");
    } else {
        memset(&bjs, 0, sizeof bjs);
        got++;
    }
#undef GET
    {
        const float *A = (const float *)ba.buf, *B = (const float *)bb.buf;
        const int32_t *tok = have_tok ? (const int32_t *)btok.buf : NULL;
        double *kl = bkl.buf, *rkl = brkl.buf, *lz = blz.buf, *lpa = blpa.buf, *lpb = blpb.buf;
        double *jsv = want_js ? (double *)bjs.buf : NULL;
        int32_t *ta = btopa.buf, *tb = btopb.buf, *st = bst.buf;
        int alloc_fail = 0;
        Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
        int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
        if (nt > n_rows) nt = n_rows > 0 ? (int)n_rows : 1;
#pragma omp parallel num_threads(nt) reduction(| : alloc_fail)
#endif
        {
            float *scratch = malloc(sizeof(float) * (3 * (size_t)n_vocab + 2 * ((size_t)n_vocab / BLOCK + 1)));
            if (!scratch) {
                alloc_fail = 1;
            }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 8)
#endif
            for (Py_ssize_t i = 0; i < n_rows; i++) {
                if (!scratch) continue;
                const float *ra = A + i * n_vocab, *rb = B + i * n_vocab;
                rowres r = {0, 0, NAN, 0, 0, -1, -1, 0};
                int fwd_bailed = row_kernel_fwd(ra, rb, n_vocab, scratch, &r, reverse, want_js);
                if (fwd_bailed) {
                    row_kernel(ra, rb, n_vocab, reverse, scratch, &r); /* not all-finite */
                    r.js = NAN; /* the caller computes JS of such rows in NumPy */
                }
                if (!r.status && (!isfinite(r.kl) || (reverse && !isfinite(r.rkl)))) {
                    /* overflow in the fast path: recompute in double where the value is finite */
                    double ma = -INFINITY, mb = -INFINITY;
                    for (Py_ssize_t j = 0; j < n_vocab; j++) {
                        if (ra[j] > ma) ma = ra[j];
                        if (rb[j] > mb) mb = rb[j];
                    }
                    double lzb = r.logz_b;
                    int qz = 0, pz = 0;
                    for (Py_ssize_t j = 0; j < n_vocab; j++) {
                        qz |= (ra[j] > -INFINITY) & (rb[j] == -INFINITY);
                        pz |= (rb[j] > -INFINITY) & (ra[j] == -INFINITY);
                    }
                    if (!qz && !isfinite(r.kl))
                        r.kl = row_direct(ra, rb, n_vocab, ma, mb, r.logz_a, lzb);
                    if (reverse && !pz && !isfinite(r.rkl))
                        r.rkl = row_direct(rb, ra, n_vocab, mb, ma, lzb, r.logz_a);
                }
                kl[i] = r.kl;
                if (reverse) rkl[i] = r.rkl;
                if (jsv) jsv[i] = r.status ? NAN : r.js;
                ta[i] = r.top_a;
                tb[i] = r.top_b;
                lz[i] = r.logz_a;
                if (tok) {
                    int32_t t = tok[i];
                    if (t < 0 || t >= n_vocab) {
                        r.status |= ST_TOKEN;
                        lpa[i] = lpb[i] = NAN;
                    } else if (!r.status) {
                        float mxa = ra[r.top_a], mxb = rb[r.top_b];
                        lpa[i] = ((double)ra[t] - (double)mxa) - r.logz_a;
                        lpb[i] = ((double)rb[t] - (double)mxb) - r.logz_b;
                    }
                }
                if (!r.status && fwd_bailed) { /* the fast kernel bailed: huge logits? */
                    float big = 0.0f;
                    for (Py_ssize_t j = 0; j < n_vocab; j++) {
                        float u = fabsf(ra[j]), v = fabsf(rb[j]);
                        big = (u < INFINITY && u > big) ? u : big;
                        big = (v < INFINITY && v > big) ? v : big;
                    }
                    if (big >= HUGE_LOGIT) r.status |= ST_HUGE;
                }
                st[i] = r.status;
            }
            free(scratch);
        }
        Py_END_ALLOW_THREADS
        for (int k = 0; k < 12; k++)
            if (all[k]->obj) PyBuffer_Release(all[k]);
        if (alloc_fail) return PyErr_NoMemory();
        Py_RETURN_NONE;
    }
fail:
    for (int k = 0; k < got; k++)
        if (all[k]->obj) PyBuffer_Release(all[k]);
    return NULL;
}

static PyObject *py_max_threads(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
#ifdef _OPENMP
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef methods[] = {
    {"rowstats", py_rowstats, METH_VARARGS,
     "rowstats(a, b, n_rows, n_vocab, tokens|None, reverse, nthreads, kl, rkl, top_a, top_b, "
     "logz_a, lpa_tok, lpb_tok, status): per-row divergence statistics of two float32 logits "
     "matrices, written into the given buffers (see kldiv/compare/kernel.py)."},
    {"max_threads", py_max_threads, METH_NOARGS, "Number of OpenMP threads a call uses by default."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {
    PyModuleDef_HEAD_INIT, "_rowstats",
    "Per-row KL statistics of two logits matrices (kldiv compare); see kldiv/compare/kernel.py.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rowstats(void) { return PyModule_Create(&mod); }
