// Host side of the multi-tensor ops (SPEC §2): argument checks and flat-buffer preparation, shared
// by the CPU op (csrc/cpu/ag_update.cpp), the CUDA launcher (csrc/cuda/ag_update.cu) and the host
// emulation of the CUDA launch (csrc/testing/ag_update_cuda_emulation.cpp).
//
// check_lists() mirrors avg_kernels/_contract/lists.py::check_lists line for line: same checks, same
// order, same exception types (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError) and
// the same messages (tests/test_ag_update.py compares the two on every error case).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "ag_entry.h"

#include <algorithm>
#include <array>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace avg_kernels::ag {

// One list argument: its name and its tensors (undefined = None).
struct NamedList {
  const char* name;
  std::vector<at::Tensor> tensors;
};

inline NamedList named(const char* name, at::TensorList ts) {
  return {name, std::vector<at::Tensor>(ts.begin(), ts.end())};
}

inline NamedList named(const char* name, const c10::List<std::optional<at::Tensor>>& ts) {
  NamedList out{name, {}};
  out.tensors.reserve(ts.size());
  for (const std::optional<at::Tensor>& t : ts) out.tensors.push_back(t.has_value() ? *t : at::Tensor());
  return out;
}

// Python's repr of a shape tuple: (), (5,), (2, 3).
inline std::string shape_text(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

inline std::string dtype_text(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A dimension of size > 1 with stride 0 in a tensor with elements (at::has_internal_overlap, except
// that an empty tensor overlaps nothing: torch gives empty channels_last tensors stride-0 dims).
inline bool has_internal_overlap(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  return false;
}

// A written tensor may share memory with another argument only by being the same memory (same
// address, extent, strides and dtype) as an entry of the same index.
inline void check_aliasing(const char* op, const std::vector<NamedList>& lists) {
  struct Span {
    uintptr_t begin, end;
    int rank;
    int64_t index;
    const at::Tensor* t;
  };
  std::vector<Span> spans;
  for (size_t r = 0; r < lists.size(); ++r) {
    const auto& ts = lists[r].tensors;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      if (!t.defined() || t.numel() == 0 || t.device().is_meta() || !t.is_non_overlapping_and_dense()) continue;
      const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({b, b + uintptr_t(t.numel() * t.element_size()), int(r), int64_t(i), &t});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::tie(a.begin, a.rank, a.index) < std::tie(b.begin, b.rank, b.index);
  });
  bool found = false;
  std::tuple<int64_t, int, int64_t> worst;
  for (size_t k = 0; k < spans.size(); ++k) {
    const Span& a = spans[k];
    for (size_t l = k + 1; l < spans.size() && spans[l].begin < a.end; ++l) {
      const Span& b = spans[l];
      if (a.rank != 0 && b.rank != 0) continue;  // two read-only arguments may overlap
      const bool same = a.begin == b.begin && a.end == b.end && a.t->strides() == b.t->strides() &&
                        a.t->scalar_type() == b.t->scalar_type();
      if (same && a.index == b.index && a.rank != b.rank) continue;
      const auto key = (a.rank == 0 && (b.rank != 0 || a.index < b.index)) ? std::make_tuple(a.index, b.rank, b.index)
                                                                           : std::make_tuple(b.index, a.rank, a.index);
      if (!found || key < worst) worst = key;
      found = true;
    }
  }
  if (found) {
    const auto [i, r, j] = worst;
    TORCH_CHECK_VALUE(false, op, ": ", lists[0].name, "[", i, "] overlaps ", lists[r].name, "[", j,
                      "] in memory; a tensor updated in place may share memory with another argument only by being "
                      "the same tensor at the same index");
  }
}

// SPEC §6 checks of a multi-tensor in-place op; lists[0] is written. See _contract/lists.py::check_lists.
inline void check_lists(const char* op, const std::vector<NamedList>& lists) {
  const NamedList& w = lists[0];
  const size_t n = w.tensors.size();
  for (size_t r = 1; r < lists.size(); ++r)
    TORCH_CHECK_VALUE(lists[r].tensors.size() == n, op, ": ", lists[r].name, " has ", lists[r].tensors.size(),
                      " entries but ", w.name, " has ", n);
  if (n == 0) return;
  const at::Device dev = w.tensors[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = w.tensors[i];
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.tensors[i];
      if (!t.defined()) continue;
      TORCH_CHECK_TYPE(is_float(t.scalar_type()), op, ": ", l.name, "[", i, "] has dtype ",
                       dtype_text(t.scalar_type()), "; expected float16, bfloat16, float32 or float64");
      TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", l.name, "[", i, "] has shape ", shape_text(t.sizes()),
                        " but ", w.name, "[", i, "] has shape ", shape_text(ref.sizes()));
      TORCH_CHECK_VALUE(t.device() == dev, op, ": ", l.name, "[", i, "] is on ", t.device().str(), " but ", w.name,
                        "[0] is on ", dev.str());
    }
  }
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(!has_internal_overlap(w.tensors[i]), op, ": ", w.name, "[", i,
                      "] has internally overlapping memory (a stride-0 dimension, e.g. from expand()), so it cannot "
                      "be updated in place");
  check_aliasing(op, lists);
}

// ---------------------------------------------------------------------------------------------
// Flat buffers: element k of every member of an entry is the same logical element.
// ---------------------------------------------------------------------------------------------
template <int Depth>
struct Prepared {
  std::vector<FlatEntry<Depth>> entries;
  std::vector<at::Tensor> keep_alive;                          // copies made for layout reasons
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs;  // (user tensor, contiguous copy)

  // Copies results of non-dense written tensors back into the user's tensors.
  void finish() {
    for (auto& [user, buf] : write_backs) user.copy_(buf);
  }
};

// Mirrors _contract/lists.py::flat_entries. Indices with an undefined (None) member or no elements are
// left out. The written tensor is used in place when it is non-overlapping and dense (any memory
// order), else through a contiguous copy (written back by finish()); a read tensor is used as it is
// when its strides equal the written buffer's, else copied into that layout. The arguments were
// validated by check_lists(); the element counts and devices are asserted again here because the
// kernels walk raw memory.
template <int Depth>
Prepared<Depth> prepare(const std::vector<NamedList>& lists) {
  Prepared<Depth> out;
  const size_t n = lists[0].tensors.size();
  out.entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    bool skip = false;
    for (int r = 0; r < Depth; ++r) skip |= !lists[r].tensors[i].defined();
    const at::Tensor& w = lists[0].tensors[i];
    if (skip || w.numel() == 0) continue;
    FlatEntry<Depth> e;
    e.numel = w.numel();
    e.index = int64_t(i);
    at::Tensor wb = w;
    if (!w.is_non_overlapping_and_dense()) {
      wb = w.contiguous();
      out.write_backs.emplace_back(w, wb);
    }
    e.ptr[0] = wb.data_ptr();
    e.dtype[0] = wb.scalar_type();
    for (int r = 1; r < Depth; ++r) {
      at::Tensor t = lists[r].tensors[i];
      TORCH_CHECK(t.numel() == w.numel() && t.device() == w.device(), "ag update (internal): ", lists[r].name, "[", i,
                  "] does not match ", lists[0].name, "[", i, "]; the lists must be validated by check_lists first");
      if (t.numel() > 1 && t.strides() != wb.strides()) {
        at::Tensor c = at::empty_like(wb, wb.options().dtype(t.scalar_type()));
        c.copy_(t);
        out.keep_alive.push_back(c);
        t = c;
      }
      e.ptr[r] = t.data_ptr();
      e.dtype[r] = t.scalar_type();
    }
    out.entries.push_back(e);
  }
  return out;
}

}  // namespace avg_kernels::ag
