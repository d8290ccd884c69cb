// vit_fast._C's allocation of a bound launch's outputs in one call (csrc/empties.cpp).
#pragma once

#include <Python.h>

namespace vit_fast {

// The module's method table entries, ended by a null entry.
extern PyMethodDef empties_methods[];

}  // namespace vit_fast
