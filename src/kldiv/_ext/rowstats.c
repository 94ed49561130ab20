/* placeholder: kldiv._ext._rowstats (to be implemented) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_rowstats", "kldiv C kernels", -1, NULL};
PyMODINIT_FUNC PyInit__rowstats(void) { return PyModule_Create(&mod); }
