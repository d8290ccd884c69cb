// vit_fast._C's replay of a recorded step body: its aten ops and kernel launches, issued from
// C++ (csrc/step_program.cpp; recorded by vit_fast/step_program.py).
#pragma once

#include <Python.h>

namespace vit_fast {

// The module's method table entries, ended by a null entry.
extern PyMethodDef step_program_methods[];

}  // namespace vit_fast
