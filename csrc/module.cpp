// The extension module peftcore._C. Importing it registers every op declared in csrc/*.cpp
// (TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT blocks run as static initialisers); it exposes no
// Python functions of its own: Python calls the ops through torch.ops.peftcore.*.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "peftcore C++ ops (see torch.ops.peftcore)", -1, nullptr};
  return PyModule_Create(&module);
}
