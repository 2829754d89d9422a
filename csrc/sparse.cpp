// Sparse tensors reach fastoptim's ops only to be refused by name. The kernels are dense; without a kernel for the
// sparse dispatch keys the dispatcher would answer with an error that names no argument. One boxed kernel serves
// every op: it finds the first sparse tensor among the call's arguments and names it as the dense checks would.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace {

void refuse_sparse(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  const auto refuse = [](const std::string& name) {
    TORCH_CHECK(false, "fastoptim: ", name, " is sparse; only dense tensors are supported");
  };
  for (size_t a = 0; a < arguments.size(); ++a) {
    const c10::IValue& value = (*stack)[first + a];
    const std::string& name = arguments[a].name();
    if (value.isTensor() && value.toTensor().layout() != at::kStrided) refuse(name);
    if (value.isTensorList()) {
      const auto list = value.toTensorList();
      for (size_t i = 0; i < list.size(); ++i) {
        if (list.get(i).layout() != at::kStrided) refuse(name + "[" + std::to_string(i) + "]");
      }
    }
  }
  TORCH_CHECK(false, "fastoptim: ", op.schema().name(), " got a sparse tensor; only dense tensors are supported");
}

constexpr const char* kOps[] = {
    "decoupled_update_", "adamw_", "cautious_adamw_", "cautious_mask_counts", "mars_adamw_", "adam_mini_", "lion_",
    "signum_", "momentum_", "sophia_", "sophia_hessian_", "clip_scale", "mars_clip_scale", "newton_schulz_momentum_",
    "newton_schulz", "soap_gram_", "soap_eigenbasis_", "soap_rotated_adam_", "soap_refresh_", "kron_precondition",
    "kron_update_preconditioner_", "kron_balance_"};

void register_refusals(torch::Library& m) {
  for (const char* name : kOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_sparse>());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastoptim, SparseCPU, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(fastoptim, SparseCUDA, m) { register_refusals(m); }
