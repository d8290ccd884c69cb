// The module object of vit_fast._C. Importing it loads this library, which runs the op
// registrations (csrc/patch_embed.cpp, csrc/cuda/patch_embed.cu); its Python functions are the
// host path's: the AMP weight casts (csrc/amp_casts.cpp) and the bound launches' allocations
// (csrc/empties.cpp) and the replay of recorded step bodies
// (csrc/step_program.cpp).
#include <Python.h>

#include <vector>

#include "amp_casts.h"
#include "empties.h"
#include "step_program.h"

namespace {

// The method tables of the files above, joined (each ends with a null entry).
PyMethodDef* methods() {
  static std::vector<PyMethodDef> all = [] {
    std::vector<PyMethodDef> joined;
    for (PyMethodDef* table : {vit_fast::amp_cast_methods, vit_fast::empties_methods,
                               vit_fast::step_program_methods}) {
      for (PyMethodDef* m = table; m->ml_name != nullptr; ++m) {
        joined.push_back(*m);
      }
    }
    joined.push_back({nullptr, nullptr, 0, nullptr});
    return joined;
  }();
  return all.data();
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods()};
  return PyModule_Create(&module_def);
}
