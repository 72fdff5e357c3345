// The `fastvision` operator library. Each op declares its schema once in csrc/<op>.cpp with
// TORCH_LIBRARY_FRAGMENT; backends register kernels with TORCH_LIBRARY_IMPL in cpu/<op>.cpp and
// cuda/<op>.cu; fake kernels and autograd are registered from Python in fastvision/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastvision, m) {}

// Importing fastvision._C loads this library and with it every registration.
static PyModuleDef fastvision_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastvision_module); }
