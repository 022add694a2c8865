// ReLU and its gradient with the stock layers' NaN semantics, for every CPU kernel that applies a ReLU.
#pragma once

namespace fastmnist_cpu {

// ReLU as torch.relu: NaN passes through (a max(v, 0) would turn it into 0
// and hide a broken model behind a finite loss).
template <typename scalar_t>
inline scalar_t relu(scalar_t v) {
  return v < scalar_t(0) ? scalar_t(0) : v;
}

// ReLU's gradient as torch's threshold_backward: g where the output r is not
// <= 0 (so also where r is NaN), else 0.
template <typename scalar_t>
inline scalar_t relu_grad(scalar_t r, scalar_t g) {
  return r <= scalar_t(0) ? scalar_t(0) : g;
}

}  // namespace fastmnist_cpu
