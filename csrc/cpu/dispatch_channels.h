// Compile-time channel counts for the per-pixel loops of the CPU kernels.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fastmnist_cpu {

// Calls fn(std::integral_constant<int64_t, N>) with N = channels for the
// channel counts the networks use and the common multiples of 8 up to 64,
// else N = 0 (meaning "read it at run time"), so the per-pixel channel loops
// compile to straight vector moves.
template <typename Fn>
void dispatch_channels(int64_t channels, const Fn& fn) {
  switch (channels) {
    case 1: return fn(std::integral_constant<int64_t, 1>{});
    case 8: return fn(std::integral_constant<int64_t, 8>{});
    case 16: return fn(std::integral_constant<int64_t, 16>{});
    case 24: return fn(std::integral_constant<int64_t, 24>{});
    case 32: return fn(std::integral_constant<int64_t, 32>{});
    case 40: return fn(std::integral_constant<int64_t, 40>{});
    case 48: return fn(std::integral_constant<int64_t, 48>{});
    case 64: return fn(std::integral_constant<int64_t, 64>{});
    default: return fn(std::integral_constant<int64_t, 0>{});
  }
}

}  // namespace fastmnist_cpu
