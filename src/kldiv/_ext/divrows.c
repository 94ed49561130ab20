/* kldiv._ext._divrows: per-row KL, reverse KL, JS and Jeffreys of NumPy inputs in double, with the
 * value checks in the same pass (issue 12 item 4).
 *
 * Used by kldiv/backends/numpy_fast.py (the NumPy "pre" hook). Each of p and q is a C-contiguous
 * (n_rows, n) float32 or float64 matrix holding probabilities (mode 0), log-probabilities (1) or
 * logits (2); log-space inputs are divided by the temperature T (probabilities need T = 1).
 * Everything is computed in double: float32 rows are widened first, so float32 results are exact
 * to well below float32's resolution and float64 results carry double rounding only.
 *
 * The algebra is kldiv's core (kldiv/_core/divergence.py). Each side is centred on its own: a_j =
 * log p_j up to a row constant (probabilities: log x_j; log space: (x_j - max x) / T), e_j =
 * exp(a_j) its unnormalised weight (probabilities: x_j itself), and the same b_j, f_j for q. On
 * the common support S of the two (p_j > 0 and q_j > 0) the log-ratio delta_j = b_j - a_j is formed
 * without cancellation: log1p((y - x)/x) for close probabilities, the logarithm of the quotient
 * otherwise, and for two log-space sides the exact (TwoSum) difference of the raw inputs minus the
 * exact difference of their maxima, so that logits of 1e30 next to logits of 5 lose nothing
 * (issue 11 item 1). With mu = sum_S e_j delta_j / E_S,
 *
 *   KL(p || q) = log1p( sum_S (e_j / E_S) phi(delta_j - mu) ) + log1p(F_off / F_S),
 *   phi(x) = e^x - 1 - x (Taylor series for |x| < 0.5; elsewhere e_j e^{delta_j - mu} = f_j e^{-mu}
 *   exactly, so no exponential per entry), +inf when p > 0 = q somewhere,
 *
 * where F_S and F_off are q's unnormalised masses on and off S. Reverse KL swaps the sides. JS and
 * Jeffreys use d_j = delta_j - log(F / E) (the log-ratio of the normalised sides, accurate entry by
 * entry) in the core's per-entry formulas. Row sums and maxima are exact enough in double that the
 * normalisations never enter as a large difference.
 *
 * Value checks (when `validate` is set), decided in the first pass over the data: nan anywhere;
 * probabilities negative or +inf, rows summing to 1 within the tolerance; log-space +inf or rows of
 * -inf only; log-probabilities with logsumexp 0 and max <= tol within the tolerance. A row that
 * fails, or lies so close to the tolerance that the core's own float32/float64 sums could decide
 * otherwise, gets a status bit (ST_BAD_P / ST_BAD_Q) and the caller lets the core raise its error.
 * Without checks a row holding a nan gives nan (issue 11 item 6). Rows outside what this kernel does
 * exactly (a divergence beyond e^700, +inf inputs without checks, overflowing differences or
 * weighted sums of them,
 * subnormal quotients of float64 probabilities) get ST_CORE: the caller hands the call to the core.
 *
 * The GIL is released; one call is single-threaded (the caller spreads rows over threads).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kl_rows.h" /* KLDIV_CLONES, FMA contraction, TwoSum, kl_get_buf */

#define BLOCK 2048

enum { ST_BAD_P = 1, ST_BAD_Q = 2, ST_CORE = 4 };
enum { M_PROBS = 0, M_LOGPROBS = 1, M_LOGITS = 2 };
enum { K_FWD = 0, K_REV = 1, K_JS = 2, K_JEF = 3 };

#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10

/* log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1] (fdlibm's e_log.c polynomial, < 1 ulp), plus
 * k ln 2. Branch-free, so that the loops below vectorise. */
static inline double log1p_red(double f, double k)
{
    const double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                 Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                 Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                 Lg7 = 1.479819860511658591e-01;
    double s = f / (2.0 + f);
    double z = s * s, w = z * z;
    double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    double R = t2 + t1;
    double hfsq = 0.5 * f * f;
    return k * LN2_HI - ((hfsq - (s * (hfsq + R) + k * LN2_LO)) - f);
}

/* Reduction of a positive normal x to x = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)) (musl's). */
static inline void log_reduce(double x, double *f, double *k)
{
    uint64_t ix;
    memcpy(&ix, &x, sizeof ix);
    ix += 0x3ff0000000000000ULL - 0x3fe6a09e00000000ULL;
    uint64_t kb = (ix >> 52) | 0x4330000000000000ULL; /* 2^52 + biased exponent, as a double */
    double kd;
    memcpy(&kd, &kb, sizeof kd);
    *k = kd - (4503599627370496.0 + 1023.0);
    uint64_t mb = (ix & 0x000fffffffffffffULL) + 0x3fe6a09e00000000ULL;
    double m;
    memcpy(&m, &mb, sizeof m);
    *f = m - 1.0;
}

/* log(y / x) for x, y > 0 whose quotient is a normal double (the caller checks), accurate to a
 * few ulps of the result also when y is close to x (then the difference y - x is exact). */
static inline double log_ratio(double x, double y)
{
    double r = y / x;
    double u = (y - x) / x;
    double f, k;
    log_reduce(r, &f, &k);
    int near = (u > -0.29) & (u < 0.41);
    return log1p_red(near ? u : f, near ? 0.0 : k);
}

/* exp(x) for x <= 0 (-inf included), branch-free so that loops vectorise: Cody-Waite reduction by
 * ln 2, Taylor polynomial to r^13 (|r| <= ln2 / 2: truncation below 1e-17), 2^k from the bits
 * (through 2^-600 below k = -1000, so that subnormal results come out right). About 1 ulp. */
static inline double exp_neg(double x)
{
    const double SHIFT = 6755399441055744.0; /* 1.5 * 2^52 */
    double xc = x < -746.0 ? -746.0 : x;
    double kd = (xc * 1.4426950408889634 + SHIFT) - SHIFT;
    double r = (xc - kd * LN2_HI) - kd * LN2_LO;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int tiny = kd < -1000.0;
    double k2 = tiny ? kd + 600.0 : kd;
    double t = k2 + SHIFT;
    uint64_t tb;
    memcpy(&tb, &t, sizeof tb);
    uint64_t sb = (tb - 0x4338000000000000ULL + 1023ULL) << 52;
    double sc;
    memcpy(&sc, &sb, sizeof sc);
    double y = p * sc * (tiny ? 0x1p-600 : 1.0);
    return x < -745.2 ? 0.0 : y;
}

/* log(x) for positive finite x, subnormals included (scaled by 2^54 first), branch-free. */
static inline double log_pos(double x)
{
    int sub = x < DBL_MIN;
    double f, k;
    log_reduce(sub ? x * 0x1p54 : x, &f, &k);
    return log1p_red(f, sub ? k - 54.0 : k);
}

/* exp(x) - 1 - x by its Taylor series for |x| < 0.5 (terms to x^17: double exact). */
static inline double phi_series(double x)
{
    double s = 1.0 / 355687428096000.0;
    s = s * x + 1.0 / 20922789888000.0;
    s = s * x + 1.0 / 1307674368000.0;
    s = s * x + 1.0 / 87178291200.0;
    s = s * x + 1.0 / 6227020800.0;
    s = s * x + 1.0 / 479001600.0;
    s = s * x + 1.0 / 39916800.0;
    s = s * x + 1.0 / 3628800.0;
    s = s * x + 1.0 / 362880.0;
    s = s * x + 1.0 / 40320.0;
    s = s * x + 1.0 / 5040.0;
    s = s * x + 1.0 / 720.0;
    s = s * x + 1.0 / 120.0;
    s = s * x + 1.0 / 24.0;
    s = s * x + 1.0 / 6.0;
    s = s * x + 0.5;
    return s * x * x;
}

/* log(1 - c + c e^d) for 0 < c < 1 (the core's _log_mix): accurate near d = 0, safe for large |d|. */
static inline double log_mix(double c, double d)
{
    if (d < 1.0) return log1p(c * expm1(d));
    return log(c) + d + log1p((1.0 - c) / c * exp(-d));
}

/* w phi(y) with w e^y = m known exactly (the core's _w_phi with w_exp). */
static inline double w_phi(double w, double y, double m)
{
    if (fabs(y) < 0.5) return w * phi_series(y);
    return m - w * (1.0 + y);
}

/* Bound on the rounding error of NumPy's pairwise sum of n non-negative terms of total s in a dtype
 * of unit roundoff eps (8-way unrolled blocks of up to 128, then halving), with slack. */
static double sum_margin(Py_ssize_t n, double eps, double s)
{
    double k = n < 8 ? (double)n : (n <= 128 ? (double)n / 8.0 + 8.0 : 24.0 + log2((double)n / 128.0));
    return 2.0 * (k + 2.0) * eps * (s > 1.0 ? s : 1.0) + 1e-15;
}

typedef struct {
    int mode;       /* M_PROBS, M_LOGPROBS, M_LOGITS */
    double tol;     /* kldiv's normalisation tolerance for this side (its dtype and n) */
    double eps;     /* unit roundoff of the input dtype (the core's sums are in that dtype) */
} side_t;

/* Value checks and maximum of one side (one pass). Returns 1 if the row fails or is too close to
 * call, 0 otherwise; sets *has_nan, *max (log space: max of the non-nan entries) and *odd (an
 * input that the kernel leaves to the core when checks are off: +inf, an empty log row, a
 * probability row without positive mass). */
KLDIV_CLONES
static int check_side(const double *x, Py_ssize_t n, const side_t *s, int validate, int *has_nan,
                      double *max_out, int *odd)
{
    double chk = 0.0, sum = 0.0, mx = -INFINITY;
    int neg = 0, nan_ = 0, pinf = 0;
    if (s->mode == M_PROBS) {
#pragma omp simd reduction(+ : chk, sum) reduction(| : neg)
        for (Py_ssize_t j = 0; j < n; j++) {
            double v = x[j];
            chk += v * 0.0;
            neg |= v < 0.0;
            sum += v > 0.0 ? v : 0.0;
        }
        if (!(chk == 0.0)) {
            for (Py_ssize_t j = 0; j < n; j++) {
                nan_ |= x[j] != x[j];
                pinf |= x[j] == INFINITY;
            }
        }
        *has_nan = nan_;
        *max_out = sum;
        *odd = pinf || !(sum > 0.0);
        if (!validate) return 0;
        if (nan_ || neg || pinf) return 1;
        return fabs(sum - 1.0) > s->tol - sum_margin(n, s->eps, sum);
    }
#pragma omp simd reduction(max : mx) reduction(+ : chk)
    for (Py_ssize_t j = 0; j < n; j++) {
        double v = x[j];
        mx = v > mx ? v : mx;
        chk += v * 0.0; /* 0 for finite, nan for nan and +-inf */
    }
    if (!(chk == 0.0)) {
        for (Py_ssize_t j = 0; j < n; j++) {
            nan_ |= x[j] != x[j];
            pinf |= x[j] == INFINITY;
        }
    }
    *has_nan = nan_;
    *max_out = mx;
    *odd = pinf || mx == -INFINITY || !(fabs(mx) < 1e300);
    if (!validate) return 0;
    if (nan_ || pinf || mx == -INFINITY) return 1;
    if (s->mode == M_LOGPROBS) {
        double z = 0.0;
#pragma omp simd reduction(+ : z)
        for (Py_ssize_t j = 0; j < n; j++) z += exp_neg(x[j] - mx);
        double lse = mx + log(z);
        /* the core's float32 logsumexp: error of its sum and of adding the maximum */
        double m = sum_margin(n, s->eps, 1.0) + 4.0 * s->eps * (fabs(mx) + 1.0);
        if (fabs(lse) > s->tol - m) return 1;
        if (mx > s->tol * (1.0 - 4.0 * s->eps)) return 1;
    }
    return 0;
}

/* The sums of pass A over one block [j0, j1), given del (the log-ratio on S, nan off S) and the
 * weights: PL / QL say whether p / q is in log space (weights in ew / fw, support where the value
 * is > -inf) or probabilities (the value itself, support where > 0). Sums: the masses E, F, on S
 * (ES, FS) and off the other's support (Eo, Fo), the weighted sums A, B of delta; maxima: the
 * support marks (log value, or +1 for a probability) where p / q escapes the other's support
 * (pxm, qxm, -inf if nowhere) and |delta| on S (dmax). One macro for the four combinations, each
 * expanded with constant PL, QL (GCC vectorises none with the sides chosen inside the loop). */
#define PASS_A_SUMS(PL, QL) \
_Pragma("omp simd reduction(+ : E, F, ES, FS, Eo, Fo, A, B) reduction(max : pxm, qxm, dmax)") \
            for (Py_ssize_t j = j0; j < j1; j++) { \
                double u = x[j], v = y[j], d = del[j]; \
                int sx = PL ? u > -INFINITY : u > 0.0, sy = QL ? v > -INFINITY : v > 0.0; \
                double e = PL ? ew[j] : (sx ? u : 0.0), f = QL ? fw[j] : (sy ? v : 0.0); \
                int s = d == d; \
                E += e; \
                F += f; \
                ES += s ? e : 0.0; \
                FS += s ? f : 0.0; \
                Eo += sy ? 0.0 : e; \
                Fo += sx ? 0.0 : f; \
                A += s ? e * d : 0.0; \
                B += s ? f * d : 0.0; \
                if (PL || QL) { /* a log side's weight may underflow: marks, not masses */ \
                    double cu = sy ? -INFINITY : (PL ? u : (sx ? 1.0 : -INFINITY)); \
                    double cv = sx ? -INFINITY : (QL ? v : (sy ? 1.0 : -INFINITY)); \
                    pxm = cu > pxm ? cu : pxm; \
                    qxm = cv > qxm ? cv : qxm; \
                } \
                double ad = s ? fabs(d) : 0.0; \
                dmax = ad > dmax ? ad : dmax; \
            }

/* JS and Jeffreys rows whose value (with log(F / E) taken directly) is below this are redone
 * with js_centre's constant: the direct form's rounding (~1e-16 absolute in every log-ratio) enters
 * JS ~ E_p d^2 / 8 squared (4e-11 relative at JS 1e-25, 1e-8 with -1e30 masks; below 1e-15
 * relative at JS >= 1e-15). */
#define JS_SMALL 1e-10

/* The log-ratio of the normalised sides as d_j = (delta_j - mu) - lc, accurate to the rounding of
 * delta_j - mu (the core's algebra). On S' (the entries where delta is defined and both weights
 * are nonzero: a -1e30 mask's entry, log-ratio ~1e30, is left out), mu is p's mean of delta,
 * d' = delta - mu, and
 *   lc = log1p((sum_S' e d' + sum_S' e phi(d')) / E') + log1p(Fr / F') - log1p(Er / E'),
 * E', F' the masses on S' and Er, Fr the rest, summed as such (no difference of sums); no
 * cancellation (phi >= 0, sum_S' e d' is only mu's rounding residual). Returns 0 (mu, lc
 * untouched) where |mu| >= 700 or the sums are not finite. */
KLDIV_CLONES
static int js_centre(const double *del, const double *E_, const double *F_, Py_ssize_t n,
                     double *mu_out, double *lc_out)
{
    double E1 = 0, F1 = 0, Er = 0, Fr = 0, A1 = 0;
#pragma omp simd reduction(+ : E1, F1, Er, Fr, A1)
    for (Py_ssize_t j = 0; j < n; j++) {
        double dd = del[j], w = E_[j], o = F_[j];
        w = w > 0.0 ? w : 0.0;
        o = o > 0.0 ? o : 0.0;
        int s = (dd == dd) & (w > 0.0) & (o > 0.0);
        E1 += s ? w : 0.0;
        F1 += s ? o : 0.0;
        Er += s ? 0.0 : w;
        Fr += s ? 0.0 : o;
        A1 += s ? w * dd : 0.0;
    }
    if (!(E1 > 0.0 && F1 > 0.0 && fabs(A1 / E1) < 700.0)) return 0;
    const double mu = A1 / E1, C = exp(-mu);
    double Sp = 0, R = 0;
#pragma omp simd reduction(+ : Sp, R)
    for (Py_ssize_t j = 0; j < n; j++) {
        double dd = del[j], w = E_[j], o = F_[j];
        int s = (dd == dd) & (w > 0.0) & (o > 0.0);
        double x_ = s ? dd - mu : 0.0;
        w = s ? w : 0.0;
        o = s ? o : 0.0;
        double small = w * phi_series(x_);
        double big = o * C - w * (1.0 + x_);
        Sp += (x_ < 0.5) & (x_ > -0.5) ? small : big;
        R += w * x_;
    }
    const double lc = log1p((Sp + R) / E1) + log1p(Fr / F1) - log1p(Er / E1);
    if (!isfinite(lc)) return 0;
    *mu_out = mu;
    *lc_out = lc;
    return 1;
}

/* One row. x, y: the row of p and q in double; scr: 3 n doubles. Returns a status (0: done). */
KLDIV_CLONES
static int div_row(const double *x, const double *y, Py_ssize_t n, const side_t *sp,
                   const side_t *sq, double T, int kind, double beta, int validate, double *scr,
                   double *out)
{
    int nan_p, nan_q, odd_p, odd_q, st = 0;
    double mp, mq;
    if (check_side(x, n, sp, validate, &nan_p, &mp, &odd_p)) st |= ST_BAD_P;
    if (check_side(y, n, sq, validate, &nan_q, &mq, &odd_q)) st |= ST_BAD_Q;
    if (st) return st;
    if (nan_p || nan_q) { /* only without checks: a diverged model shows as nan */
        *out = NAN;
        return 0;
    }
    if (odd_p || odd_q) return ST_CORE;

    const int pl = sp->mode != M_PROBS, ql = sq->mode != M_PROBS;
    const double iT = 1.0 / T;
    double *del = scr, *ew = scr + n, *fw = scr + 2 * n;
    const double *E_ = pl ? ew : x, *F_ = ql ? fw : y;
    /* exact difference of the maxima, for two log-space sides */
    double ch = 0.0, cl = 0.0;
    if (pl && ql) ch = kl_two_diff(mq, mp, &cl); /* TwoSum: no overflow for what passes */

    /* pass A, block by block: the log-ratio delta on S (nan off S) and the log-space weights in
     * an elementwise loop, then the sums over the block (in L1) in a second one (GCC vectorises
     * neither when they share one loop). The log-ratio:
     *   two probabilities: log(v / u) (log1p of the relative difference when they are close);
     *   two log-space sides: the exact (TwoSum) difference of the raw values minus that of the
     *     maxima, over T;
     *   one of each (T = 1, py_rows refuses other temperatures with probabilities):
     *     (log-space value - its max) - log(probability), signed for the side. */
    double E = 0, F = 0, ES = 0, FS = 0, Eo = 0, Fo = 0, A = 0, B = 0;
    double pxm = -INFINITY, qxm = -INFINITY, dmax = 0.0;
    if (!pl && !ql) {
        for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
            Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
#pragma omp simd
            for (Py_ssize_t j = j0; j < j1; j++) {
                double u = x[j], v = y[j];
                int s = (u > 0.0) & (v > 0.0);
                double d = log_ratio(s ? u : 1.0, s ? v : 1.0);
                del[j] = s ? d : NAN;
            }
            PASS_A_SUMS(0, 0)
        }
    } else if (pl && ql) {
        for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
            Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
#pragma omp simd
            for (Py_ssize_t j = j0; j < j1; j++) {
                double u = x[j], v = y[j];
                double l, h = kl_two_diff(v, u, &l);
                double d = ((h - ch) + (l - cl)) * iT;
                int s = (u > -INFINITY) & (v > -INFINITY);
                ew[j] = exp_neg((u - mp) * iT);
                fw[j] = exp_neg((v - mq) * iT);
                del[j] = s ? d : NAN;
            }
            PASS_A_SUMS(1, 1)
        }
    } else {
        const double *lv = pl ? x : y, *pv = pl ? y : x;
        const double lm = pl ? mp : mq, sgn = pl ? -1.0 : 1.0;
        double *lw = pl ? ew : fw;
        for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
            Py_ssize_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
#pragma omp simd
            for (Py_ssize_t j = j0; j < j1; j++) {
                double c = lv[j] - lm, w = pv[j];
                int s = (c > -INFINITY) & (w > 0.0);
                double d = sgn * (c - log_pos(s ? w : 1.0));
                lw[j] = exp_neg(c);
                del[j] = s ? d : NAN;
            }
            if (pl) {
                PASS_A_SUMS(1, 0)
            } else {
                PASS_A_SUMS(0, 1)
            }
        }
    }
    /* p escapes where its value is on its support and q's is not (its weight may underflow to 0
     * there, so a max of the marks, not a mass, says it). A quotient of two probabilities out of
     * the normal range gives |delta| >= 708.39 (its reduction is wrong there): such rows (float64
     * probabilities e^708 apart) go to the core, as do overflowing differences. */
    const int pesc = pl || ql ? pxm > -INFINITY : Eo > 0.0;
    const int qesc = pl || ql ? qxm > -INFINITY : Fo > 0.0;
    if (!pl && !ql ? !(dmax < 708.0) : !(dmax <= DBL_MAX)) return ST_CORE;

    if (kind == K_FWD || kind == K_REV) {
        int rev = kind == K_REV;
        if (rev ? qesc : pesc) {
            *out = INFINITY;
            return 0;
        }
        const double W = rev ? FS : ES;  /* the weighting side's mass on S */
        if (!(W > 0.0)) return ST_CORE;
        const double mu = (rev ? -B : A) / W;
        /* the weighted sum of delta overflows where logits ~finfo.max apart meet weights summing
         * to more than 1 (a KL just below DBL_MAX would come out +inf): the core, exact there */
        if (!(fabs(mu) <= DBL_MAX)) return ST_CORE;
        const double *Wt = rev ? F_ : E_, *Ot = rev ? E_ : F_;
        double L = INFINITY;
        if (-mu < 700.0) {
            const double C = exp(-mu);
            const double sg = rev ? -1.0 : 1.0;
            double S = 0;
#pragma omp simd reduction(+ : S)
            for (Py_ssize_t j = 0; j < n; j++) {
                double d = del[j];
                double x_ = sg * d - mu;
                double w = Wt[j];
                double small = w * phi_series(x_);
                double big = Ot[j] * C - w * (1.0 + x_);
                double t = (x_ < 0.5) & (x_ > -0.5) ? small : big;
                S += d == d ? t : 0.0;
            }
            L = log1p(S / W);
        }
        const double OS = rev ? ES : FS, Ooff = rev ? Eo : Fo, Otot = rev ? E : F;
        double off = OS > 0.0 ? log1p(Ooff / OS) : NAN; /* -log (other side's mass on S) */
        if (!isfinite(L) || !(OS > 0.0)) {
            /* logits ~1e30 apart: a divergence near or beyond e^700, or the other side's mass on
             * S below the smallest double. In log space, with no cancellation to fear there:
             * L = logsumexp_S(other side's log weight) - log W - mu, -log q(S) = log F - that. */
            const double *ov = rev ? x : y;
            const int om = rev ? sp->mode : sq->mode;
            const double oc = rev ? mp : mq;
            /* the maximum of the raw values on S first, then each exponent as one product
             * (x_j - x_top) / T: a difference of two rounded products (x_j - c) / T - top would
             * be contracted into an FMA that leaves the product's rounding error (up to ~1e4
             * for logits 1e20 apart at T = 1.5), and exp of that is 0 or +inf (audit finding 1) */
            double rtop = -INFINITY;
            for (Py_ssize_t j = 0; j < n; j++) {
                if (del[j] != del[j]) continue;
                rtop = ov[j] > rtop ? ov[j] : rtop;
            }
            const double top = om == M_PROBS ? log(rtop) : (rtop - oc) * iT;
            double z = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                if (del[j] != del[j]) continue;
                z += om == M_PROBS ? ov[j] / rtop : exp((ov[j] - rtop) * iT);
            }
            const double lse = top + log(z);
            if (!isfinite(L)) L = lse - log(W) - mu;
            if (!(OS > 0.0)) off = log(Otot) - lse;
            if (!(L == L) || !(off == off)) return ST_CORE;
        }
        double kl = L + off;
        *out = kl > 0.0 ? kl : 0.0;
        return 0;
    }

    /* JS and Jeffreys: d_j = delta_j - log(F / E), the log-ratio of the normalised sides, first
     * with log(F / E) taken directly; rows whose value comes out below JS_SMALL again with the
     * centred form (js_centre), which keeps tiny values exact (ordinary rows pay nothing). */
    const double iE = 1.0 / E, iF = 1.0 / F;
    if (kind == K_JEF && (pesc || qesc)) {
        *out = INFINITY;
        return 0;
    }
    double mu = 0.0, lc = log(F / E);
    for (int pass = 0;; pass++) {
        double val;
        if (kind == K_JEF) {
            double S = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                double dd = del[j];
                if (dd != dd) continue;
                double d = (dd - mu) - lc, pw = E_[j] * iE, qw = F_[j] * iF;
                S += fabs(d) < 0.5 ? pw * d * expm1(d) : d * (qw - pw);
            }
            val = S;
        } else {
            double tp = 0, tq = 0, pout = 0, qout = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                double dd = del[j];
                double pw = E_[j] * iE, qw = F_[j] * iF;
                if (dd != dd) {
                    pout += pw > 0.0 ? pw : 0.0;
                    qout += qw > 0.0 ? qw : 0.0;
                    continue;
                }
                double d = (dd - mu) - lc;
                double yy = log_mix(1.0 - beta, d), zz = log_mix(beta, -d);
                double m = beta * pw + (1.0 - beta) * qw;
                tp += w_phi(pw, yy, m);
                tq += w_phi(qw, zz, m);
            }
            /* probabilities off the support: x <= 0 gives pw <= 0, counted as 0 */
            val = beta * tp + (1.0 - beta) * tq - beta * log(beta) * pout -
                  (1.0 - beta) * log1p(-beta) * qout;
        }
        if (pass == 1 || !(val < JS_SMALL) || !js_centre(del, E_, F_, n, &mu, &lc)) {
            *out = val > 0.0 ? val : 0.0;
            return 0;
        }
    }
}

/* ---------------------------------------------------------------- Python binding */

static PyObject *py_rows(PyObject *self, PyObject *args)
{
    PyObject *op, *oq, *oout, *ost;
    Py_ssize_t n_rows, n;
    int p64, q64, pmode, qmode, kind, validate;
    double T, beta, ptol, qtol, peps, qeps;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnniiiiddiiddddOO", &op, &oq, &n_rows, &n, &p64, &q64, &pmode,
                          &qmode, &T, &beta, &kind, &validate, &ptol, &qtol, &peps, &qeps, &oout,
                          &ost))
        return NULL;
    if (n_rows < 0 || n < 1 || pmode < 0 || pmode > 2 || qmode < 0 || qmode > 2 || kind < 0 ||
        kind > 3 || !(T > 0.0) || !isfinite(T) || ((pmode == M_PROBS || qmode == M_PROBS) && T != 1.0) ||
        (kind == K_JS && !(beta > 0.0 && beta < 1.0))) {
        PyErr_SetString(PyExc_ValueError, "_divrows.rows: invalid arguments");
        return NULL;
    }
    Py_buffer bp, bq, bo, bs;
    if (kl_get_buf(op, &bp, 0, n_rows * n * (p64 ? 8 : 4), "p") < 0) return NULL;
    if (kl_get_buf(oq, &bq, 0, n_rows * n * (q64 ? 8 : 4), "q") < 0) {
        PyBuffer_Release(&bp);
        return NULL;
    }
    if (kl_get_buf(oout, &bo, 1, n_rows * 8, "out") < 0) {
        PyBuffer_Release(&bp);
        PyBuffer_Release(&bq);
        return NULL;
    }
    if (kl_get_buf(ost, &bs, 1, n_rows * 4, "status") < 0) {
        PyBuffer_Release(&bp);
        PyBuffer_Release(&bq);
        PyBuffer_Release(&bo);
        return NULL;
    }
    side_t sp = {pmode, ptol, peps}, sq = {qmode, qtol, qeps};
    int fail = 0;
    Py_BEGIN_ALLOW_THREADS
    double *scr = malloc(sizeof(double) * 5 * (size_t)n);
    if (!scr) {
        fail = 1;
    } else {
        double *wx = scr + 3 * n, *wy = scr + 4 * n;
        double *out = bo.buf;
        int32_t *st = bs.buf;
        for (Py_ssize_t i = 0; i < n_rows; i++) {
            const double *x, *y;
            if (p64) {
                x = (const double *)bp.buf + i * n;
            } else {
                const float *s = (const float *)bp.buf + i * n;
                for (Py_ssize_t j = 0; j < n; j++) wx[j] = s[j];
                x = wx;
            }
            if (q64) {
                y = (const double *)bq.buf + i * n;
            } else {
                const float *s = (const float *)bq.buf + i * n;
                for (Py_ssize_t j = 0; j < n; j++) wy[j] = s[j];
                y = wy;
            }
            out[i] = NAN;
            st[i] = div_row(x, y, n, &sp, &sq, T, kind, beta, validate, scr, out + i);
        }
        free(scr);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bp);
    PyBuffer_Release(&bq);
    PyBuffer_Release(&bo);
    PyBuffer_Release(&bs);
    if (fail) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rows", py_rows, METH_VARARGS,
     "rows(p, q, n_rows, n, p_is_f64, q_is_f64, p_mode, q_mode, temperature, beta, kind, validate, "
     "p_tol, q_tol, p_eps, q_eps, out, status): per-row divergences of two C-contiguous matrices "
     "written into out (float64) and status (int32); see kldiv/backends/numpy_fast.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {
    PyModuleDef_HEAD_INIT, "_divrows",
    "Per-row divergences of NumPy probabilities, log-probabilities and logits, value checks "
    "included (kldiv/backends/numpy_fast.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__divrows(void) { return PyModule_Create(&mod); }
