// vit_fast._C's Python functions for the fused Block's AMP weight casts (csrc/amp_casts.cpp).
#pragma once

#include <Python.h>

namespace vit_fast {

// The module's method table entries, ended by a null entry.
extern PyMethodDef amp_cast_methods[];

}  // namespace vit_fast
