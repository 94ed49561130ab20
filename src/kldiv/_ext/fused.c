/* placeholder: kldiv._ext._fused (to be implemented) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_fused", "kldiv C kernels", -1, NULL};
PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&mod); }
