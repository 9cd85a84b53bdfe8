// fastcse::gather_rows and its backward: every rank's candidate rows, gathered over a c10d
// ProcessGroup into one contiguous tensor, and their gradients summed back to the owning rank.
//
// Ranks may hold different numbers of rows. A fixed-size header goes first (an all-gather of
// 48 int64 on every rank, so it cannot hang on a mismatch); every rank then checks all ranks'
// headers and raises the same error when they disagree on the dim, dtype, device, number of
// parts, transport or the caller's options string, or when one rank's own arguments are invalid
// (that rank still sends a header, flagged with its error), before any variable-size exchange.
// A rank whose loss inputs fail before it can call gather_rows sends such a flagged header
// through gather_rows_abort instead.
// The rows then move with one all-gather when every rank sends as many rows, else with one
// all_to_all_single with exact split sizes (no padding on the wire or in the result); the
// backward is an all_to_all_single back to the owners followed by a local sum over the sending
// ranks, i.e. a reduce-scatter of variable sizes (what torch.distributed.nn does on gloo).

#ifdef FASTCSE_PYTHON_MODULE
#include <Python.h>  // first, as Python asks; only setup.py's build is a Python module
#endif

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/version.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "pack.h"

namespace fastcse {
namespace {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

constexpr int64_t kMagic = 0x66637365;  // "fcse"
constexpr int64_t kMaxParts = 8;
constexpr int64_t kOptionBytes = 256;
enum HeaderField : int64_t {
  kFieldMagic = 0,
  kFieldDim,
  kFieldDtype,
  kFieldDevice,
  kFieldParts,
  kFieldNormalize,
  kFieldTransport,
  kFieldError,  // 1: this rank cannot take part; the text field holds why
  kFieldRows,   // kMaxParts row counts
  kFieldText = kFieldRows + kMaxParts,  // the caller's options string, or this rank's error
  kHeaderLen = kFieldText + kOptionBytes / 8,
};

at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void all_to_all(const ProcessGroupPtr& group, at::Tensor& out, at::Tensor& in, std::vector<int64_t> out_splits,
                std::vector<int64_t> in_splits) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  group->all_to_all_single(out, in, out_splits, in_splits)->wait();
#else
  group->alltoall_base(out, in, out_splits, in_splits)->wait();
#endif
}

void all_gather(const ProcessGroupPtr& group, at::Tensor& out, at::Tensor& in) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  group->all_gather_single(out, in)->wait();
#else
  group->_allgather_base(out, in)->wait();
#endif
}

std::string text_of(const at::Tensor& table, int64_t rank) {
  const auto* words = table[rank].const_data_ptr<int64_t>() + kFieldText;
  char bytes[kOptionBytes + 1] = {};
  std::memcpy(bytes, words, kOptionBytes);
  return std::string(bytes);
}

// Every rank runs this on the same table, so all ranks raise the same error (or none).
void check_headers(const at::Tensor& table) {
  const int64_t world = table.size(0);
  std::string failed;  // every rank that cannot take part, with its reason
  for (int64_t r = 0; r < world; ++r) {
    if (table[r][kFieldError].item<int64_t>() != 0) {
      failed += (failed.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " cannot take part: " +
                text_of(table, r);
    }
  }
  TORCH_CHECK(failed.empty(), "fastcse.gather_rows: ", failed);
  const auto* first = table[0].const_data_ptr<int64_t>();
  for (int64_t r = 1; r < world; ++r) {
    const auto* h = table[r].const_data_ptr<int64_t>();
    TORCH_CHECK(h[kFieldMagic] == kMagic && first[kFieldMagic] == kMagic,
                "fastcse.gather_rows: rank ", r, " sent a header that is not fastcse's: the ranks are not "
                "running the same collective (call info_nce with the process group on every rank)");
    auto disagree = [&](const char* what, int64_t field, auto describe) {
      TORCH_CHECK(h[field] == first[field], "fastcse.gather_rows: ranks disagree on the ", what, ": rank 0 has ",
                  describe(first[field]), ", rank ", r, " has ", describe(h[field]), " (all ranks must agree)");
    };
    auto as_int = [](int64_t v) { return std::to_string(v); };
    auto as_dtype = [](int64_t v) { return std::string(c10::toString(static_cast<at::ScalarType>(v))); };
    auto as_device = [](int64_t v) { return c10::DeviceTypeName(static_cast<c10::DeviceType>(v), true); };
    auto as_bool = [](int64_t v) { return std::string(v ? "true" : "false"); };
    disagree("embedding dim", kFieldDim, as_int);
    disagree("dtype", kFieldDtype, as_dtype);
    disagree("device type", kFieldDevice, as_device);
    disagree("number of row blocks (parts)", kFieldParts, as_int);
    disagree("normalize flag", kFieldNormalize, as_bool);
    disagree("bf16 transport flag", kFieldTransport, as_bool);
    const std::string mine = text_of(table, r);
    const std::string theirs = text_of(table, 0);
    TORCH_CHECK(mine == theirs, "fastcse.gather_rows: ranks disagree on the loss options: rank 0 has '", theirs,
                "', rank ", r, " has '", mine, "'");
  }
}

void check_parts(const std::vector<at::Tensor>& parts, c10::string_view options) {
  TORCH_CHECK(!parts.empty() && static_cast<int64_t>(parts.size()) <= kMaxParts,
              "fastcse.gather_rows: expected 1 to ", kMaxParts, " row blocks, got ", parts.size());
  TORCH_CHECK(static_cast<int64_t>(options.size()) < kOptionBytes, "fastcse.gather_rows: the options string "
              "must be shorter than ", kOptionBytes, " bytes, got ", options.size());
  const at::Tensor& first = parts[0];
  for (size_t p = 0; p < parts.size(); ++p) {
    const at::Tensor& x = parts[p];
    TORCH_CHECK(x.dim() == 2, "fastcse.gather_rows: row block ", p, " must be 2-D [rows, dim], got ", x.sizes());
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastcse.gather_rows: row block ", p,
                " must be floating point, got ", x.scalar_type());
    TORCH_CHECK(x.size(1) == first.size(1) && x.scalar_type() == first.scalar_type() &&
                    x.device() == first.device(),
                "fastcse.gather_rows: row blocks must share dim, dtype and device; block 0 is [*, ", first.size(1),
                "] ", first.scalar_type(), " on ", first.device(), ", block ", p, " is [*, ", x.size(1), "] ",
                x.scalar_type(), " on ", x.device());
  }
}

// This rank's header: its arguments' summary, or, with `error` set, why it cannot take part.
at::Tensor make_header(const std::vector<at::Tensor>& parts, bool normalize, bool bf16_transport,
                       c10::string_view options, const std::string& error) {
  at::Tensor header = at::zeros({kHeaderLen}, at::kLong);
  auto* h = header.mutable_data_ptr<int64_t>();
  const auto text_into_header = [&](c10::string_view text) {
    std::memcpy(h + kFieldText, text.data(), std::min<size_t>(text.size(), kOptionBytes - 1));
  };
  h[kFieldMagic] = kMagic;
  if (!error.empty()) {
    h[kFieldError] = 1;
    text_into_header(error);
    return header;
  }
  h[kFieldDim] = parts[0].size(1);
  h[kFieldDtype] = static_cast<int64_t>(parts[0].scalar_type());
  h[kFieldDevice] = static_cast<int64_t>(parts[0].device().type());
  h[kFieldParts] = static_cast<int64_t>(parts.size());
  h[kFieldNormalize] = normalize;
  h[kFieldTransport] = bf16_transport;
  for (size_t p = 0; p < parts.size(); ++p) {
    h[kFieldRows + p] = parts[p].size(0);
  }
  text_into_header(options);
  return header;
}

// The fixed-size exchange every rank takes part in: returns all ranks' headers, [world, kHeaderLen] on the CPU.
at::Tensor share_headers(const at::Tensor& header, c10::Device device, const ProcessGroupPtr& group) {
  const int64_t world = group->getSize();
  std::vector<at::Tensor> input{header.to(device)};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int64_t r = 0; r < world; ++r) {
    output[0].push_back(at::empty_like(input[0]));
  }
  group->allgather(output, input)->wait();
  return at::stack(output[0]).cpu();
}

// Returns the [world, parts] int64 table of row counts after checking that all ranks agree.
// A rank whose own arguments are invalid still takes part in this exchange, flagged, so that
// every rank raises its error instead of the others waiting for it in a collective.
at::Tensor exchange_header(const std::vector<at::Tensor>& parts, const ProcessGroupPtr& group, bool normalize,
                           bool bf16_transport, c10::string_view options) {
  std::string local_error;
  try {
    check_parts(parts, options);
  } catch (const c10::Error& error) {
    local_error = error.what_without_backtrace();
  }
  const c10::Device device = parts.empty() ? c10::Device(c10::kCPU) : parts[0].device();
  const at::Tensor table =
      share_headers(make_header(parts, normalize, bf16_transport, options, local_error), device, group);
  check_headers(table);
  return table.narrow(1, kFieldRows, static_cast<int64_t>(parts.size())).contiguous();
}

// A rank that cannot call gather_rows (its loss inputs failed their checks) sends a header
// flagged with `reason` instead, so that the other ranks' gather_rows raise at once, naming
// it, rather than waiting for it until the process group's timeout. The caller raises its own error.
void gather_rows_abort(const ProcessGroupPtr& group, c10::Device device, c10::string_view reason) {
  const std::string why = reason.empty() ? std::string("invalid arguments") : std::string(reason);
  share_headers(make_header({}, false, false, "", why), device, group);
}

struct Layout {
  int64_t world, rank, parts;
  std::vector<int64_t> rows;        // rows[s * parts + p]: rank s's rows in block p
  std::vector<int64_t> rank_total;  // rows rank s sends, all blocks
  std::vector<int64_t> part_offset; // where block p starts in the gathered tensor
  std::vector<int64_t> rank_offset; // rank_offset[s * parts + p]: rank s's rows within gathered block p
  int64_t total = 0;

  Layout(const at::Tensor& counts, int64_t rank_) : world(counts.size(0)), rank(rank_), parts(counts.size(1)) {
    const auto* c = counts.const_data_ptr<int64_t>();
    rows.assign(c, c + world * parts);
    rank_total.assign(world, 0);
    rank_offset.assign(world * parts, 0);
    for (int64_t p = 0; p < parts; ++p) {
      part_offset.push_back(total);
      int64_t within = 0;
      for (int64_t s = 0; s < world; ++s) {
        rank_offset[s * parts + p] = within;
        within += rows[s * parts + p];
        rank_total[s] += rows[s * parts + p];
      }
      total += within;
    }
  }
  int64_t n(int64_t s, int64_t p) const { return rows[s * parts + p]; }
  int64_t gathered_start(int64_t s, int64_t p) const { return part_offset[p] + rank_offset[s * parts + p]; }
};

std::tuple<at::Tensor, at::Tensor> gather_rows(at::TensorList parts_list, const ProcessGroupPtr& group,
                                               bool normalize, bool bf16_transport, c10::string_view options) {
  const std::vector<at::Tensor> parts = parts_list.vec();
  const at::Tensor counts = exchange_header(parts, group, normalize, bf16_transport, options);
  const Layout layout(counts, group->getRank());
  const at::ScalarType dtype = parts[0].scalar_type();
  const at::ScalarType wire = bf16_transport ? at::kBFloat16 : dtype;
  const int64_t dim = parts[0].size(1);
  const int64_t world = layout.world;
  const int64_t mine = layout.rank_total[layout.rank];
  const auto wire_options = parts[0].options().dtype(wire);

  // Equal sizes on every rank: one all-gather. Otherwise all_to_all_single with exact splits,
  // which sends block s of its input to rank s: the local rows, once per rank.
  const bool equal_sizes = std::all_of(layout.rank_total.begin(), layout.rank_total.end(),
                                       [mine](int64_t n) { return n == mine; });
  at::Tensor send = at::empty({equal_sizes ? mine : world * mine, dim}, wire_options);
  int64_t row = 0;
  for (const at::Tensor& x : parts) {
    pack_rows(x.contiguous(), send.narrow(0, row, x.size(0)), normalize);
    row += x.size(0);
  }
  at::Tensor recv = at::empty({layout.total, dim}, wire_options);
  if (equal_sizes) {
    all_gather(group, recv, send);
  } else {
    for (int64_t s = 1; s < world; ++s) {
      send.narrow(0, s * mine, mine).copy_(send.narrow(0, 0, mine));
    }
    all_to_all(group, recv, send, layout.rank_total, std::vector<int64_t>(world, mine));
  }

  // recv is rank-major; the result is block-major (all ranks' block 0, then block 1, ...).
  if (layout.parts == 1 && wire == dtype) {
    return {recv, counts};
  }
  at::Tensor gathered = at::empty({layout.total, dim}, parts[0].options());
  int64_t recv_row = 0;
  for (int64_t s = 0; s < world; ++s) {
    for (int64_t p = 0; p < layout.parts; ++p) {
      const int64_t n = layout.n(s, p);
      gathered.narrow(0, layout.gathered_start(s, p), n).copy_(recv.narrow(0, recv_row, n));
      recv_row += n;
    }
  }
  return {gathered, counts};
}

// d/dx of x / max(||x||, eps): (g - x_hat (x_hat . g)) / ||x||, or g / eps below eps (as autograd of F.normalize).
at::Tensor normalize_backward(const at::Tensor& x, const at::Tensor& grad_hat) {
  const at::Tensor xf = x.to(grad_hat.scalar_type());
  const at::Tensor norm = at::linalg_vector_norm(xf, 2, {1}, /*keepdim=*/true);
  const at::Tensor denom = norm.clamp_min(kNormEps);
  const at::Tensor x_hat = xf / denom;
  const at::Tensor radial = (x_hat * grad_hat).sum(1, /*keepdim=*/true).masked_fill(norm < kNormEps, 0.0);
  return (grad_hat - x_hat * radial) / denom;
}

std::vector<at::Tensor> gather_rows_backward(const at::Tensor& grad, at::TensorList parts_list,
                                             const at::Tensor& counts, const ProcessGroupPtr& group, bool normalize) {
  const std::vector<at::Tensor> parts = parts_list.vec();
  const Layout layout(counts.cpu().contiguous(), group->getRank());
  TORCH_CHECK(static_cast<int64_t>(parts.size()) == layout.parts && layout.world == group->getSize(),
              "fastcse.gather_rows_backward: counts ", counts.sizes(), " do not match ", parts.size(),
              " row blocks on a group of ", group->getSize());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == layout.total, "fastcse.gather_rows_backward: grad must be [",
              layout.total, ", dim], got ", grad.sizes());
  const int64_t world = layout.world;
  const int64_t dim = grad.size(1);
  const at::Tensor g = grad.to(accumulate_dtype(grad.scalar_type())).contiguous();

  // Rank s gets every rank's gradient for its rows: send rank-major, block s = rank s's rows.
  at::Tensor send = at::empty({layout.total, dim}, g.options());
  int64_t row = 0;
  for (int64_t s = 0; s < world; ++s) {
    for (int64_t p = 0; p < layout.parts; ++p) {
      const int64_t n = layout.n(s, p);
      send.narrow(0, row, n).copy_(g.narrow(0, layout.gathered_start(s, p), n));
      row += n;
    }
  }
  const int64_t mine = layout.rank_total[layout.rank];
  at::Tensor recv = at::empty({world * mine, dim}, g.options());
  all_to_all(group, recv, send, std::vector<int64_t>(world, mine), layout.rank_total);
  const at::Tensor summed = recv.view({world, mine, dim}).sum(0);

  std::vector<at::Tensor> grads;
  int64_t offset = 0;
  for (int64_t p = 0; p < layout.parts; ++p) {
    const int64_t n = layout.n(layout.rank, p);
    at::Tensor gp = summed.narrow(0, offset, n);
    offset += n;
    if (normalize) {
      gp = normalize_backward(parts[p], gp);
    }
    grads.push_back(gp.to(parts[p].scalar_type()).contiguous());
  }
  return grads;
}

}  // namespace

void pack_rows_aten(const at::Tensor& x, const at::Tensor& out, bool normalize) {
  if (!normalize) {
    out.copy_(x);
    return;
  }
  const at::Tensor xf = x.to(accumulate_dtype(x.scalar_type()));
  out.copy_(xf / at::linalg_vector_norm(xf, 2, {1}, /*keepdim=*/true).clamp_min(kNormEps));
}

TORCH_LIBRARY(fastcse, m) {
  m.def(
      "gather_rows(Tensor[] parts, __torch__.torch.classes.c10d.ProcessGroup group, bool normalize, "
      "bool bf16_transport, str options) -> (Tensor gathered, Tensor counts)");
  m.def(
      "gather_rows_backward(Tensor grad, Tensor[] parts, Tensor counts, "
      "__torch__.torch.classes.c10d.ProcessGroup group, bool normalize) -> Tensor[]");
  // No tensor arguments: a catch-all kernel (nothing to dispatch on).
  m.def("gather_rows_abort(__torch__.torch.classes.c10d.ProcessGroup group, Device device, str reason) -> ()",
        &gather_rows_abort);
}

TORCH_LIBRARY_IMPL(fastcse, CompositeExplicitAutograd, m) {
  m.impl("gather_rows", &gather_rows);
  m.impl("gather_rows_backward", &gather_rows_backward);
}

}  // namespace fastcse

#ifdef FASTCSE_PYTHON_MODULE
// `import fastcse._C` loads the library (and so runs the registrations above); it has no Python API.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastcse's C++ ops (torch.ops.fastcse)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
