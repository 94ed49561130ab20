/* Shared by kldiv's row kernels rowstats.c (float32, `kldiv compare`) and divrows.c (double,
 * the NumPy fast path): the pieces both of them use, written once.
 *
 *   kl_two_diff, kl_two_difff   a - b exactly, as hi + lo (TwoSum), in double and float
 *   kl_get_buf                  a C-contiguous buffer argument of at least `need` bytes
 *
 * The row loops stay in each file: the float32 and double kernels run different algorithms (one
 * exponential per pair with a float32 cache, against double sums with the value checks), with
 * their own precision's polynomials. The polynomials stay written out, coefficient by coefficient:
 * a shared Horner loop over a coefficient table (tried) is unrolled by GCC, but its constants
 * reach the vectoriser as loads, and the AVX2 clones then spill registers (1-3% more
 * instructions per element under callgrind). The TwoSum here compiles to the same code as before.
 *
 * Include after <Python.h> (kl_get_buf uses the buffer protocol). */
#ifndef KLDIV_KL_ROWS_H
#define KLDIV_KL_ROWS_H

#include "kl_simd.h" /* KLDIV_CLONES, FMA contraction, kl_expf_core */

/* a - b = hi + *lo exactly (Knuth's TwoSum of a and -b; no multiplication, so FMA contraction
 * leaves it alone). */
#define KL_DEFINE_TWO_DIFF(T, NAME)                  \
    static inline T NAME(T a, T b, T *lo)            \
    {                                                \
        T s = a - b;                                 \
        T bb = s - a;                                \
        *lo = (a - (s - bb)) + (-b - bb);            \
        return s;                                    \
    }

KL_DEFINE_TWO_DIFF(double, kl_two_diff)
KL_DEFINE_TWO_DIFF(float, kl_two_difff)

/* A C-contiguous (writable) buffer of at least `need` bytes, or -1 with a TypeError/ValueError
 * naming the argument. */
static int kl_get_buf(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need,
                      const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer has %zd bytes, need %zd", name, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#endif
