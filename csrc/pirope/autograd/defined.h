// Undefined tensors (None from Python) given to an op's tensor arguments. The autograd
// kernels run before the shared validation of <op>.cpp, and torch::autograd::Function
// reads every tensor argument's device and version on entry, so without this check a
// None failed there with "tensor does not have a device", naming no argument.
#pragma once

#include <initializer_list>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pirope {

inline void check_defined(const char* op,
                          std::initializer_list<std::pair<const char*, const at::Tensor&>> args) {
  for (const auto& [name, t] : args)
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

}  // namespace pirope
