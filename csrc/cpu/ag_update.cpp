// CPU implementation of the multi-tensor AG-1 update and AG-2 rescale (SPEC §2): flat-buffer preparation
// (csrc/ag_lists.h), then the kernels of the active capability level (csrc/cpu/kernels/ag_update.cpp).
// The public ops (avg_kernels/ops/ag_update.py) validate the lists first, through the argument-check ops
// defined here too (avg_kernels_C::ag1_check / ag2_check, csrc/ag_lists.h's check_lists).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <vector>

#include "../ag_lists.h"
#include "capability.h"

namespace avg_kernels::cpu::ag {
namespace {

using avg_kernels::ag::NamedList;

std::vector<NamedList> ag1_lists(at::TensorList params, at::TensorList params_new,
                                 const c10::List<std::optional<at::Tensor>>& avg_grads) {
  return {avg_kernels::ag::named("params", params), avg_kernels::ag::named("params_new", params_new),
          avg_kernels::ag::named("avg_grads", avg_grads)};
}

// ag1_update_new_ writes params_new: it comes first (check_lists and prepare write lists[0]).
std::vector<NamedList> ag1_new_lists(at::TensorList params_new, at::TensorList params,
                                     const c10::List<std::optional<at::Tensor>>& avg_grads) {
  return {avg_kernels::ag::named("params_new", params_new), avg_kernels::ag::named("params", params),
          avg_kernels::ag::named("avg_grads", avg_grads)};
}

std::vector<NamedList> ag2_lists(at::TensorList params, at::TensorList params_old, at::TensorList params_step) {
  return {avg_kernels::ag::named("params", params), avg_kernels::ag::named("params_old", params_old),
          avg_kernels::ag::named("params_step", params_step)};
}

void ag1_check(at::TensorList params, at::TensorList params_new,
               const c10::List<std::optional<at::Tensor>>& avg_grads) {
  avg_kernels::ag::check_lists("ag1_update_", ag1_lists(params, params_new, avg_grads));
}

void ag1_new_check(at::TensorList params_new, at::TensorList params,
                   const c10::List<std::optional<at::Tensor>>& avg_grads) {
  avg_kernels::ag::check_lists("ag1_update_new_", ag1_new_lists(params_new, params, avg_grads));
}

void ag2_check(at::TensorList params, at::TensorList params_old, at::TensorList params_step) {
  avg_kernels::ag::check_lists("ag2_rescale_", ag2_lists(params, params_old, params_step));
}

// lists written-first: (params, params_new, avg_grads), or with into_new (params_new, params, avg_grads).
void ag1_run(const std::vector<NamedList>& lists, bool into_new) {
  const auto& k = kernels();
  at::NoGradGuard no_grad;
  auto prep = avg_kernels::ag::prepare<3>(lists);
  k.ag1_update(prep.entries.data(), int64_t(prep.entries.size()), into_new);
  prep.finish();
}

void ag1_update_cpu(at::TensorList params, at::TensorList params_new,
                    const c10::List<std::optional<at::Tensor>>& avg_grads) {
  ag1_run(ag1_lists(params, params_new, avg_grads), false);
}

// The same θ_{t+1}, written over θ'.
void ag1_update_new_cpu(at::TensorList params_new, at::TensorList params,
                        const c10::List<std::optional<at::Tensor>>& avg_grads) {
  ag1_run(ag1_new_lists(params_new, params, avg_grads), true);
}

// Returns (‖θ' − θ‖₁, ‖θ'' − θ‖₁, scale) as a float64 tensor (for tests and benchmarks).
at::Tensor ag2_rescale_cpu(at::TensorList params, at::TensorList params_old, at::TensorList params_step) {
  const auto lists = ag2_lists(params, params_old, params_step);
  const auto& k = kernels();
  at::NoGradGuard no_grad;
  auto prep = avg_kernels::ag::prepare<3>(lists);
  const int64_t n = int64_t(prep.entries.size());
  double n_step = 0, n_delta = 0;
  k.ag2_norms(prep.entries.data(), n, &n_step, &n_delta);
  const double scale = n_delta == 0 ? 0.0 : n_step / n_delta;
  if (n_delta != 0) {
    k.ag2_scale(prep.entries.data(), n, avg_kernels::ag2::factors(n_step, n_delta));
    prep.finish();
  }
  return at::tensor({n_step, n_delta, scale}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("ag1_check(Tensor[] params, Tensor[] params_new, Tensor?[] avg_grads) -> ()");
  m.def("ag1_new_check(Tensor[] params_new, Tensor[] params, Tensor?[] avg_grads) -> ()");
  m.def("ag2_check(Tensor[] params, Tensor[] params_old, Tensor[] params_step) -> ()");
  m.def("ag1_update_(Tensor(a!)[] params, Tensor[] params_new, Tensor?[] avg_grads) -> ()");
  m.def("ag1_update_new_(Tensor(a!)[] params_new, Tensor[] params, Tensor?[] avg_grads) -> ()");
  m.def("ag2_rescale_(Tensor(a!)[] params, Tensor[] params_old, Tensor[] params_step) -> Tensor");
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("ag1_check", &ag1_check);
  m.impl("ag1_new_check", &ag1_new_check);
  m.impl("ag2_check", &ag2_check);
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) {
  m.impl("ag1_update_", &ag1_update_cpu);
  m.impl("ag1_update_new_", &ag1_update_new_cpu);
  m.impl("ag2_rescale_", &ag2_rescale_cpu);
}

}  // namespace avg_kernels::cpu::ag
