// vit_fast._C: a recorded step body replayed from C++ (vit_fast/step_program.py records it).
//
//   program_build(n_regs, inputs, instrs, outputs) -> capsule
//       inputs:  per input, None (the input must be None) or (dtype, sizes, strides, aligned):
//                the tensor the recording saw there, ``aligned`` its 16-byte alignment (Triton
//                specializes its launches on it). Input i is register i.
//       instrs:  ("op", name, overload, args, outs, frees): one aten op, called boxed with every
//                argument of its schema in order, each ("r", reg), ("l", (reg, ...)) for a
//                Tensor[] or ("c", value) (converted once, by the schema's type); outs per
//                return: a register, -1 (dropped) or a tuple of registers (a Tensor[] return).
//                ("launch", run, template, stream_pos, slots, frees): one call of a compiled
//                Triton kernel's launcher, run(*template) with the current stream at
//                stream_pos and, per (position, reg[, byte offset, sizes, strides]) slot, the
//                register's data pointer (an int, which Triton's launchers take as the pointer),
//                that many bytes on where the slot reads a view the recording left out (the
//                view's sizes and strides make it again where tensors are passed).
//                frees: the registers read for the last time there, dropped after it.
//       outputs: per output, a register or -1 (None).
//   program_run(program, inputs, stream_fn, device, as_tensors=False) -> tuple or None
//       None where an input differs from the recorded ones (None-ness, dtype, sizes, strides,
//       alignment): the caller then runs the body in Python. stream_fn(device) is called once,
//       for the launches' stream. as_tensors passes the tensors themselves to the launchers
//       (tests, whose stand-in launchers run Triton's interpreter).
//
// Why: a Block step's forward+backward is ~90 aten ops and ~19 launches whose order, shapes,
// dtypes and launch arguments are fixed per configuration; from Python each costs its binding's
// argument parsing and the Python around it, most of the step's host time. The ops are called
// below autograd (the step's body runs inside its own autograd node, which records nothing) and
// autocast (the recording saw the ops autocast had already rewritten).
#include "step_program.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/object_ptr.h>

#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vit_fast {
namespace {

struct InputSpec {
  bool none = true;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes, strides;
  bool aligned = true;
};

struct Arg {
  enum Kind { kReg, kRegList, kConst } kind = kConst;
  int reg = -1;
  std::vector<int> regs;
  c10::IValue value;
};

struct Slot {
  Py_ssize_t pos = 0;
  int reg = -1;
  int64_t offset = 0;  // bytes past the register's data pointer
  std::optional<std::vector<int64_t>> sizes, strides;  // a view left out of the program
};

struct Instr {
  bool launch = false;
  // an aten op
  std::optional<c10::OperatorHandle> op;
  std::vector<Arg> args;
  std::vector<std::vector<int>> outs;  // per return: its registers (-1: dropped)
  std::vector<bool> out_list;          // per return: a Tensor[]
  // The program's frequent ops, with their arguments in the recorded kinds, are called unboxed:
  // boxing and unboxing their arguments costs about as much as the call.
  enum class Fast { kNone, kEmpty, kMm, kAddmm, kView, kT, kSum, kToCopy } fast = Fast::kNone;
  std::vector<int64_t> sizes;  // empty's sizes, view's, sum's dims
  at::TensorOptions options;   // empty's
  // a launch
  PyObject* run = nullptr;
  PyObject* tmpl = nullptr;  // tuple
  Py_ssize_t stream_pos = -1;
  std::vector<Slot> slots;
  std::vector<int> frees;
};

struct Program {
  int n_regs = 0;
  std::vector<InputSpec> inputs;
  std::vector<Instr> instrs;
  std::vector<int> outputs;
  bool has_launch = false;
  ~Program() {
    for (auto& ins : instrs) {
      Py_XDECREF(ins.run);
      Py_XDECREF(ins.tmpl);
    }
  }
};

const char* kCapsule = "vit_fast.step_program";

void destroy(PyObject* capsule) {
  delete static_cast<Program*>(PyCapsule_GetPointer(capsule, kCapsule));
}

[[noreturn]] void fail(const std::string& what) {
  PyErr_SetString(PyExc_TypeError, ("program_build(): " + what).c_str());
  throw python_error();
}

int as_int(PyObject* o, const char* what) {
  if (!PyLong_Check(o)) {
    fail(std::string(what) + " must be an int");
  }
  return static_cast<int>(PyLong_AsLong(o));
}

std::vector<int64_t> int_list(PyObject* t, const char* what) {
  if (!PyTuple_Check(t)) {
    fail(std::string(what) + " must be a tuple");
  }
  std::vector<int64_t> v(PyTuple_GET_SIZE(t));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); ++i) {
    v[i] = as_int(PyTuple_GET_ITEM(t, i), what);
  }
  return v;
}

std::vector<int> reg_list(PyObject* t, int n_regs, const char* what) {
  std::vector<int> v;
  for (int64_t r : int_list(t, what)) {
    if (r < -1 || r >= n_regs) {
      fail(std::string(what) + " names a register out of range");
    }
    v.push_back(static_cast<int>(r));
  }
  return v;
}

int reg(PyObject* o, int n_regs, const char* what) {
  const int r = as_int(o, what);
  if (r < -1 || r >= n_regs) {
    fail(std::string(what) + " names a register out of range");
  }
  return r;
}

bool kinds(const std::vector<Arg>& args, const char* want) {
  if (args.size() != std::strlen(want)) {
    return false;
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if ((want[i] == 'r') != (args[i].kind == Arg::kReg) ||
        (want[i] == 'c' && args[i].kind != Arg::kConst)) {
      return false;
    }
  }
  return true;
}

// Which unboxed call an op instruction can take (Instr::Fast), by its schema and argument kinds.
Instr::Fast fast_kind(const c10::FunctionSchema& schema, const std::vector<Arg>& a) {
  const std::string& name = schema.name();
  const std::string& overload = schema.overload_name();
  if (name == "aten::empty" && overload == "memory_format" && kinds(a, "cccccc") &&
      a[0].value.isIntList() && !a[1].value.isNone() && !a[3].value.isNone() &&
      (a[2].value.isNone() || a[2].value.toLayout() == at::kStrided) &&
      (a[4].value.isNone() || !a[4].value.toBool()) &&
      (a[5].value.isNone() || a[5].value.toMemoryFormat() == at::MemoryFormat::Contiguous)) {
    return Instr::Fast::kEmpty;
  }
  if (name == "aten::mm" && overload.empty() && kinds(a, "rr")) {
    return Instr::Fast::kMm;
  }
  if (name == "aten::addmm" && overload.empty() && kinds(a, "rrrcc")) {
    return Instr::Fast::kAddmm;
  }
  if (name == "aten::view" && overload.empty() && kinds(a, "rc") && a[1].value.isIntList()) {
    return Instr::Fast::kView;
  }
  if (name == "aten::t" && overload.empty() && kinds(a, "r")) {
    return Instr::Fast::kT;
  }
  if (name == "aten::sum" && overload == "dim_IntList" && kinds(a, "rccc") &&
      (a[1].value.isNone() || a[1].value.isIntList())) {
    return Instr::Fast::kSum;
  }
  if (name == "aten::_to_copy" && overload.empty() && kinds(a, "rcccccc")) {
    return Instr::Fast::kToCopy;
  }
  return Instr::Fast::kNone;
}

void read_op(Instr& ins, PyObject* t, int n_regs) {
  if (PyTuple_GET_SIZE(t) != 6) {
    fail("an op instruction is (\"op\", name, overload, args, outs, frees)");
  }
  const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 1));
  const char* overload = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 2));
  if (name == nullptr || overload == nullptr) {
    throw python_error();
  }
  ins.op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  const auto& schema = ins.op->schema();
  PyObject* args = PyTuple_GET_ITEM(t, 3);
  if (!PyTuple_Check(args) ||
      PyTuple_GET_SIZE(args) != static_cast<Py_ssize_t>(schema.arguments().size())) {
    fail(std::string("the args of ") + name + " must be a tuple of one item per argument");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); ++i) {
    PyObject* item = PyTuple_GET_ITEM(args, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
      fail("an argument is (kind, value)");
    }
    const char* kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
    if (kind == nullptr) {
      throw python_error();
    }
    Arg a;
    const std::string k(kind);
    if (k == "r") {
      a.kind = Arg::kReg;
      a.reg = reg(PyTuple_GET_ITEM(item, 1), n_regs, "an argument's register");
    } else if (k == "l") {
      a.kind = Arg::kRegList;
      a.regs = reg_list(PyTuple_GET_ITEM(item, 1), n_regs, "an argument's registers");
    } else if (k == "c") {
      a.value = torch::jit::toIValue(py::handle(PyTuple_GET_ITEM(item, 1)),
                                     schema.arguments()[i].type());
    } else {
      fail("an argument's kind is \"r\", \"l\" or \"c\"");
    }
    ins.args.push_back(std::move(a));
  }
  PyObject* outs = PyTuple_GET_ITEM(t, 4);
  if (!PyTuple_Check(outs) ||
      PyTuple_GET_SIZE(outs) != static_cast<Py_ssize_t>(schema.returns().size())) {
    fail(std::string("the outs of ") + name + " must be a tuple of one item per return");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(outs); ++i) {
    PyObject* o = PyTuple_GET_ITEM(outs, i);
    const bool list = PyTuple_Check(o);
    ins.out_list.push_back(list);
    ins.outs.push_back(list ? reg_list(o, n_regs, "an out's registers")
                            : std::vector<int>{reg(o, n_regs, "an out's register")});
  }
  ins.frees = reg_list(PyTuple_GET_ITEM(t, 5), n_regs, "frees");
  ins.fast = fast_kind(schema, ins.args);
  if (ins.fast == Instr::Fast::kEmpty) {
    ins.sizes = ins.args[0].value.toIntVector();
    ins.options = at::TensorOptions().dtype(ins.args[1].value.toScalarType())
                      .device(ins.args[3].value.toDevice());
  } else if (ins.fast == Instr::Fast::kView) {
    ins.sizes = ins.args[1].value.toIntVector();
  } else if (ins.fast == Instr::Fast::kSum && !ins.args[1].value.isNone()) {
    ins.sizes = ins.args[1].value.toIntVector();
  }
}

void read_launch(Instr& ins, PyObject* t, int n_regs) {
  if (PyTuple_GET_SIZE(t) != 6 || !PyTuple_Check(PyTuple_GET_ITEM(t, 2))) {
    fail("a launch instruction is (\"launch\", run, template tuple, stream_pos, slots, frees)");
  }
  ins.launch = true;
  ins.run = PyTuple_GET_ITEM(t, 1);
  Py_INCREF(ins.run);
  ins.tmpl = PyTuple_GET_ITEM(t, 2);
  Py_INCREF(ins.tmpl);
  const Py_ssize_t n = PyTuple_GET_SIZE(ins.tmpl);
  ins.stream_pos = as_int(PyTuple_GET_ITEM(t, 3), "stream_pos");
  if (ins.stream_pos < 0 || ins.stream_pos >= n) {
    fail("stream_pos out of the template");
  }
  PyObject* slots = PyTuple_GET_ITEM(t, 4);
  if (!PyTuple_Check(slots)) {
    fail("slots must be a tuple");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); ++i) {
    PyObject* s = PyTuple_GET_ITEM(slots, i);
    if (!PyTuple_Check(s) || (PyTuple_GET_SIZE(s) != 2 && PyTuple_GET_SIZE(s) != 5)) {
      fail("a slot is (position, register[, byte offset, sizes, strides])");
    }
    Slot slot;
    slot.pos = as_int(PyTuple_GET_ITEM(s, 0), "a slot's position");
    slot.reg = reg(PyTuple_GET_ITEM(s, 1), n_regs, "a slot's register");
    if (slot.pos < 0 || slot.pos >= n || slot.reg < 0) {
      fail("a slot out of range");
    }
    if (PyTuple_GET_SIZE(s) == 5) {
      slot.offset = PyLong_AsLongLong(PyTuple_GET_ITEM(s, 2));
      if (PyErr_Occurred()) {
        throw python_error();
      }
      slot.sizes = int_list(PyTuple_GET_ITEM(s, 3), "a slot's sizes");
      slot.strides = int_list(PyTuple_GET_ITEM(s, 4), "a slot's strides");
    }
    ins.slots.push_back(std::move(slot));
  }
  ins.frees = reg_list(PyTuple_GET_ITEM(t, 5), n_regs, "frees");
}

PyObject* program_build(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) {
    fail("takes 4 arguments (n_regs, inputs, instrs, outputs)");
  }
  auto prog = std::make_unique<Program>();
  prog->n_regs = as_int(args[0], "n_regs");
  for (int i = 1; i < 4; ++i) {
    if (!PyTuple_Check(args[i])) {
      fail("inputs, instrs and outputs must be tuples");
    }
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[1]); ++i) {
    PyObject* s = PyTuple_GET_ITEM(args[1], i);
    InputSpec spec;
    if (s != Py_None) {
      if (!PyTuple_Check(s) || PyTuple_GET_SIZE(s) != 4 || !THPDtype_Check(PyTuple_GET_ITEM(s, 0))) {
        fail("an input spec is None or (dtype, sizes, strides, aligned)");
      }
      spec.none = false;
      spec.dtype = reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(s, 0))->scalar_type;
      spec.sizes = int_list(PyTuple_GET_ITEM(s, 1), "sizes");
      spec.strides = int_list(PyTuple_GET_ITEM(s, 2), "strides");
      spec.aligned = PyObject_IsTrue(PyTuple_GET_ITEM(s, 3)) == 1;
    }
    prog->inputs.push_back(std::move(spec));
  }
  if (static_cast<int>(prog->inputs.size()) > prog->n_regs) {
    fail("more inputs than registers");
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[2]); ++i) {
    PyObject* t = PyTuple_GET_ITEM(args[2], i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1) {
      fail("an instruction must be a tuple");
    }
    const char* kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 0));
    if (kind == nullptr) {
      throw python_error();
    }
    Instr ins;
    if (std::string(kind) == "op") {
      read_op(ins, t, prog->n_regs);
    } else if (std::string(kind) == "launch") {
      read_launch(ins, t, prog->n_regs);
      prog->has_launch = true;
    } else {
      fail("an instruction is \"op\" or \"launch\"");
    }
    prog->instrs.push_back(std::move(ins));
  }
  prog->outputs = reg_list(args[3], prog->n_regs, "outputs");
  PyObject* capsule = PyCapsule_New(prog.get(), kCapsule, destroy);
  if (capsule != nullptr) {
    prog.release();
  }
  return capsule;
  END_HANDLE_TH_ERRORS
}

bool matches(const InputSpec& spec, PyObject* obj) {
  if (spec.none) {
    return obj == Py_None;
  }
  if (!THPVariable_Check(obj)) {
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.scalar_type() == spec.dtype && t.sizes().equals(spec.sizes) &&
         t.strides().equals(spec.strides) &&
         ((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0) == spec.aligned;
}

PyObject* wrap(const at::Tensor& t) {
  if (!t.defined()) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(t);
}

void call_op(const Instr& ins, std::vector<at::Tensor>& regs, torch::jit::Stack& stack) {
  if (ins.fast != Instr::Fast::kNone) {
    const auto& a = ins.args;
    at::Tensor out;
    switch (ins.fast) {
      case Instr::Fast::kEmpty:
        out = at::empty(ins.sizes, ins.options);
        break;
      case Instr::Fast::kMm:
        out = at::mm(regs[a[0].reg], regs[a[1].reg]);
        break;
      case Instr::Fast::kAddmm:
        out = at::addmm(regs[a[0].reg], regs[a[1].reg], regs[a[2].reg], a[3].value.toScalar(),
                        a[4].value.toScalar());
        break;
      case Instr::Fast::kView:
        out = regs[a[0].reg].view(ins.sizes);
        break;
      case Instr::Fast::kT:
        out = regs[a[0].reg].t();
        break;
      case Instr::Fast::kSum:
        out = at::sum(regs[a[0].reg],
                      a[1].value.isNone() ? at::OptionalIntArrayRef() : at::OptionalIntArrayRef(ins.sizes),
                      a[2].value.toBool(), a[3].value.toOptional<at::ScalarType>());
        break;
      case Instr::Fast::kToCopy:
        out = at::_to_copy(regs[a[0].reg], a[1].value.toOptional<at::ScalarType>(),
                           a[2].value.toOptional<at::Layout>(), a[3].value.toOptional<at::Device>(),
                           a[4].value.toOptional<bool>(), a[5].value.toBool(),
                           a[6].value.toOptional<at::MemoryFormat>());
        break;
      case Instr::Fast::kNone:
        break;
    }
    if (ins.outs[0][0] >= 0) {
      regs[ins.outs[0][0]] = std::move(out);
    }
    return;
  }
  stack.clear();
  for (const Arg& a : ins.args) {
    if (a.kind == Arg::kReg) {
      stack.emplace_back(regs[a.reg]);
    } else if (a.kind == Arg::kRegList) {
      c10::List<at::Tensor> list;
      list.reserve(a.regs.size());
      for (int r : a.regs) {
        list.push_back(regs[r]);
      }
      stack.emplace_back(std::move(list));
    } else {
      stack.push_back(a.value);
    }
  }
  ins.op->callBoxed(&stack);
  for (size_t i = 0; i < ins.outs.size(); ++i) {
    c10::IValue& v = stack[i];
    if (ins.out_list[i]) {
      const auto list = v.toTensorList();
      for (size_t j = 0; j < ins.outs[i].size(); ++j) {
        if (ins.outs[i][j] >= 0) {
          regs[ins.outs[i][j]] = list.get(j);
        }
      }
    } else if (ins.outs[i][0] >= 0) {
      regs[ins.outs[i][0]] = std::move(v).toTensor();
    }
  }
}

void call_launch(const Instr& ins, const std::vector<at::Tensor>& regs, PyObject* stream,
                 bool as_tensors) {
  const Py_ssize_t n = PyTuple_GET_SIZE(ins.tmpl);
  THPObjectPtr call(PyTuple_New(n));
  if (!call) {
    throw python_error();
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(ins.tmpl, i);
    Py_INCREF(item);
    PyTuple_SET_ITEM(call.get(), i, item);
  }
  auto put = [&](Py_ssize_t pos, PyObject* value) {
    if (value == nullptr) {
      throw python_error();
    }
    PyObject* old = PyTuple_GET_ITEM(call.get(), pos);
    PyTuple_SET_ITEM(call.get(), pos, value);
    Py_DECREF(old);
  };
  Py_INCREF(stream);
  put(ins.stream_pos, stream);
  for (const Slot& slot : ins.slots) {
    const at::Tensor& t = regs[slot.reg];
    if (!as_tensors) {
      put(slot.pos, PyLong_FromVoidPtr(static_cast<char*>(t.data_ptr()) + slot.offset));
    } else if (slot.sizes) {
      put(slot.pos, wrap(t.as_strided(*slot.sizes, *slot.strides,
                                      t.storage_offset() + slot.offset / t.element_size())));
    } else {
      put(slot.pos, wrap(t));
    }
  }
  THPObjectPtr result(PyObject_Call(ins.run, call.get(), nullptr));
  if (!result) {
    throw python_error();
  }
}

PyObject* program_run(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 && nargs != 5) {
    PyErr_SetString(PyExc_TypeError,
                    "program_run(): takes (program, inputs, stream_fn, device[, as_tensors])");
    return nullptr;
  }
  auto* prog = static_cast<Program*>(PyCapsule_GetPointer(args[0], kCapsule));
  if (prog == nullptr) {
    throw python_error();
  }
  PyObject* inputs = args[1];
  if (!PyTuple_Check(inputs) ||
      PyTuple_GET_SIZE(inputs) != static_cast<Py_ssize_t>(prog->inputs.size())) {
    PyErr_SetString(PyExc_TypeError, "program_run(): inputs must be a tuple of the recorded length");
    return nullptr;
  }
  for (size_t i = 0; i < prog->inputs.size(); ++i) {
    if (!matches(prog->inputs[i], PyTuple_GET_ITEM(inputs, i))) {
      Py_RETURN_NONE;
    }
  }
  const bool as_tensors = nargs == 5 && PyObject_IsTrue(args[4]) == 1;
  THPObjectPtr stream;
  if (prog->has_launch) {
    stream = PyObject_CallOneArg(args[2], args[3]);
    if (!stream) {
      throw python_error();
    }
  }
  std::vector<at::Tensor> regs(prog->n_regs);
  for (size_t i = 0; i < prog->inputs.size(); ++i) {
    if (!prog->inputs[i].none) {
      regs[i] = THPVariable_Unpack(PyTuple_GET_ITEM(inputs, i));
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    torch::jit::Stack stack;
    stack.reserve(16);
    for (const Instr& ins : prog->instrs) {
      if (ins.launch) {
        call_launch(ins, regs, stream.get(), as_tensors);
      } else {
        call_op(ins, regs, stack);
      }
      for (int r : ins.frees) {
        regs[r] = at::Tensor();
      }
    }
  }
  THPObjectPtr out(PyTuple_New(static_cast<Py_ssize_t>(prog->outputs.size())));
  if (!out) {
    throw python_error();
  }
  for (size_t i = 0; i < prog->outputs.size(); ++i) {
    const int r = prog->outputs[i];
    PyObject* item = r < 0 ? (Py_INCREF(Py_None), Py_None) : wrap(regs[r]);
    if (item == nullptr) {
      throw python_error();
    }
    PyTuple_SET_ITEM(out.get(), static_cast<Py_ssize_t>(i), item);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef step_program_methods[] = {
    {"program_build", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&program_build)),
     METH_FASTCALL, "A recorded step body as a program (vit_fast/step_program.py)."},
    {"program_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&program_run)),
     METH_FASTCALL, "Replay a program on new inputs; None where they differ from the recorded."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace vit_fast
