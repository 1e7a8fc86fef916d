// CPU kernels of Batch Normalization for float32 and float64 input.
//
// Two memory layouts cover every input that normlab passes here:
//   - channel-major: a contiguous (N, C, *) tensor with a spatial size S > 1, where
//     element (n, c, s) sits at (n * C + c) * S + s. Kernels parallelize over channels
//     and sweep one channel's data while it is in cache.
//   - rows of channels: channels_last(_3d) tensors and contiguous (N, C) tensors,
//     seen as R rows of C contiguous values. Kernels parallelize over rows with
//     per-thread accumulators that are merged in a fixed order.
//
// Statistics: each block of at most kBlockElements values takes a two-pass mean and
// sum of squared deviations from its own mean while the block is in L1 cache, in the
// input dtype. Blocks merge in double precision by the parallel formula of Chan,
// Golub and LeVeque (1979). The normalized value is (x - mean_hi) - mean_lo, where
// mean_hi is the mean rounded to the input dtype and mean_lo the rounding error, so
// inputs far from zero (1e4 with unit spread in float32) keep their digits.
//
// The output is fma(x - mean_hi, scale, shift), one rounding for the multiply-add as
// in torch 2.13's AVX2 addcmul and batch_norm kernels, so eval outputs for inputs far
// from zero match torch's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockElements = 2048;
// Below this many elements a kernel runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

struct Layout {
  bool channel_major;
  int64_t channels;
  int64_t outer;  // N for channel-major, R for rows of channels.
  int64_t inner;  // S for channel-major, 1 for rows of channels.
};

Layout layout_of(const at::Tensor& input) {
  const int64_t channels = input.size(1);
  const int64_t numel = input.numel();
  if (input.is_contiguous()) {
    const int64_t inner = numel / std::max<int64_t>(input.size(0) * channels, 1);
    if (inner > 1) {
      return {true, channels, input.size(0), inner};
    }
  } else {
    TORCH_CHECK(
        input.is_contiguous(input.suggest_memory_format()),
        "normlab batch_norm kernels expected a contiguous or channels_last input, got "
        "strides ", input.strides());
  }
  return {false, channels, numel / std::max<int64_t>(channels, 1), 1};
}

// Mean and sum of squared deviations (M2) of a set of values, merged by Chan et al.
struct Moments {
  double count = 0.0;
  double mean = 0.0;
  double m2 = 0.0;

  void merge(double other_count, double other_mean, double other_m2) {
    if (other_count == 0.0) {
      return;
    }
    const double total = count + other_count;
    const double delta = other_mean - mean;
    mean += delta * (other_count / total);
    m2 += other_m2 + delta * delta * (count * other_count / total);
    count = total;
  }
};

int64_t num_chunks(int64_t work, int64_t numel) {
  const int64_t by_size = std::max<int64_t>(numel / kParallelGrain, 1);
  return std::max<int64_t>(
      std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_size, work}),
      1);
}

// Runs body(chunk, begin, end) over `chunks` equal ranges of [0, work).
template <typename F>
void for_each_chunk(int64_t work, int64_t chunks, const F& body) {
  const int64_t chunk_size = (work + chunks - 1) / chunks;
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t begin = chunk * chunk_size;
      const int64_t end = std::min(work, begin + chunk_size);
      if (begin < end) {
        body(chunk, begin, end);
      }
    }
  };
  if (chunks == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, chunks, 1, run);
  }
}

// ---------------------------------------------------------------- statistics

// Moments of one channel of a channel-major tensor.
template <typename T>
Moments channel_moments(const T* data, const Layout& layout, int64_t c) {
  Moments moments;
  const int64_t inner = layout.inner;
  const int64_t row_stride = layout.channels * inner;
  const int64_t rows_per_block = std::max<int64_t>(kBlockElements / inner, 1);
  const int64_t segment = std::min(inner, kBlockElements);
  for (int64_t n0 = 0; n0 < layout.outer; n0 += rows_per_block) {
    const int64_t n1 = std::min(layout.outer, n0 + rows_per_block);
    for (int64_t s0 = 0; s0 < inner; s0 += segment) {
      const int64_t s1 = std::min(inner, s0 + segment);
      const int64_t length = s1 - s0;
      const T count = static_cast<T>((n1 - n0) * length);
      T sum = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const T* row = data + n * row_stride + c * inner + s0;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < length; ++s) {
          sum += row[s];
        }
      }
      const T block_mean = sum / count;
      T deviation_sum = 0;
      T square_sum = 0;
      for (int64_t n = n0; n < n1; ++n) {
        const T* row = data + n * row_stride + c * inner + s0;
#pragma omp simd reduction(+ : deviation_sum, square_sum)
        for (int64_t s = 0; s < length; ++s) {
          const T d = row[s] - block_mean;
          deviation_sum += d;
          square_sum += d * d;
        }
      }
      const double residual = static_cast<double>(deviation_sum) / count;
      moments.merge(
          count,
          static_cast<double>(block_mean) + residual,
          static_cast<double>(square_sum) - residual * deviation_sum);
    }
  }
  return moments;
}

// Moments of every channel of R rows of C values. Every channel of a block or chunk
// has the same count, so the merges run as vector loops over the channels.
template <typename T>
std::vector<Moments> row_moments(const T* data, const Layout& layout) {
  const int64_t channels = layout.channels;
  const int64_t rows = layout.outer;
  const int64_t rows_per_block =
      std::max<int64_t>(2 * kBlockElements / std::max<int64_t>(channels, 1), 16);
  const int64_t chunks = num_chunks(rows, rows * channels);
  // Per chunk: the row count, then C means and C sums of squared deviations.
  std::vector<double> chunk_count(chunks, 0.0);
  std::vector<double> chunk_moments(2 * chunks * channels, 0.0);

  for_each_chunk(rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<T> block_mean(channels);
    std::vector<T> deviation_sum(channels);
    std::vector<T> square_sum(channels);
    T* mean_ptr = block_mean.data();
    T* dev_ptr = deviation_sum.data();
    T* sq_ptr = square_sum.data();
    double* total_mean = chunk_moments.data() + 2 * chunk * channels;
    double* total_m2 = total_mean + channels;
    double total_count = 0.0;
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
      const int64_t r1 = std::min(end, r0 + rows_per_block);
      const T count = static_cast<T>(r1 - r0);
      std::fill(block_mean.begin(), block_mean.end(), T(0));
      std::fill(deviation_sum.begin(), deviation_sum.end(), T(0));
      std::fill(square_sum.begin(), square_sum.end(), T(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = data + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          mean_ptr[c] += row[c];
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        mean_ptr[c] /= count;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = data + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          const T d = row[c] - mean_ptr[c];
          dev_ptr[c] += d;
          sq_ptr[c] += d * d;
        }
      }
      // Chan et al.: merge the block (count, mean_b, m2_b) into the chunk.
      const double merged = total_count + count;
      const double mean_weight = count / merged;
      const double m2_weight = total_count * count / merged;
      const double inverse_count = 1.0 / count;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const double residual = static_cast<double>(dev_ptr[c]) * inverse_count;
        const double mean_b = static_cast<double>(mean_ptr[c]) + residual;
        const double m2_b = static_cast<double>(sq_ptr[c]) - residual * dev_ptr[c];
        const double delta = mean_b - total_mean[c];
        total_mean[c] += delta * mean_weight;
        total_m2[c] += m2_b + delta * delta * m2_weight;
      }
      total_count = merged;
    }
    chunk_count[chunk] = total_count;
  });

  std::vector<Moments> total(channels);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* mean = chunk_moments.data() + 2 * chunk * channels;
    const double* m2 = mean + channels;
    for (int64_t c = 0; c < channels; ++c) {
      total[c].merge(chunk_count[chunk], mean[c], m2[c]);
    }
  }
  return total;
}

// ---------------------------------------------------------------- elementwise

// y = (x - hi) * scale + shift per channel.
template <typename T>
void normalize(
    const T* x,
    T* y,
    const Layout& layout,
    const T* hi,
    const T* scale,
    const T* shift) {
  const int64_t channels = layout.channels;
  if (layout.channel_major) {
    const int64_t inner = layout.inner;
    const int64_t planes = layout.outer * channels;
    const int64_t chunks = num_chunks(planes, planes * inner);
    for_each_chunk(planes, chunks, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const T h = hi[c], a = scale[c], b = shift[c];
        const T* in = x + plane * inner;
        T* out = y + plane * inner;
#pragma omp simd
        for (int64_t s = 0; s < inner; ++s) {
          out[s] = std::fma(in[s] - h, a, b);
        }
      }
    });
    return;
  }
  const int64_t rows = layout.outer;
  const int64_t chunks = num_chunks(rows, rows * channels);
  for_each_chunk(rows, chunks, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* in = x + r * channels;
      T* out = y + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        out[c] = std::fma(in[c] - hi[c], scale[c], shift[c]);
      }
    }
  });
}

// Per channel, sum(g) and sum(g * (x - hi)) in double.
template <typename T>
void gradient_sums(
    const T* g,
    const T* x,
    const Layout& layout,
    const T* hi,
    double* grad_sum,
    double* grad_dot) {
  const int64_t channels = layout.channels;
  if (layout.channel_major) {
    const int64_t inner = layout.inner;
    const int64_t row_stride = channels * inner;
    const int64_t rows_per_block = std::max<int64_t>(kBlockElements / inner, 1);
    const int64_t chunks = num_chunks(channels, layout.outer * row_stride);
    for_each_chunk(channels, chunks, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const T h = hi[c];
        double total_sum = 0.0;
        double total_dot = 0.0;
        for (int64_t n0 = 0; n0 < layout.outer; n0 += rows_per_block) {
          const int64_t n1 = std::min(layout.outer, n0 + rows_per_block);
          for (int64_t s0 = 0; s0 < inner; s0 += kBlockElements) {
            const int64_t length = std::min(inner - s0, kBlockElements);
            T sum = 0;
            T dot = 0;
            for (int64_t n = n0; n < n1; ++n) {
              const int64_t offset = n * row_stride + c * inner + s0;
              const T* grow = g + offset;
              const T* xrow = x + offset;
#pragma omp simd reduction(+ : sum, dot)
              for (int64_t s = 0; s < length; ++s) {
                sum += grow[s];
                dot += grow[s] * (xrow[s] - h);
              }
            }
            total_sum += sum;
            total_dot += dot;
          }
        }
        grad_sum[c] = total_sum;
        grad_dot[c] = total_dot;
      }
    });
    return;
  }

  const int64_t rows = layout.outer;
  const int64_t rows_per_block =
      std::max<int64_t>(kBlockElements / std::max<int64_t>(channels, 1), 16);
  const int64_t chunks = num_chunks(rows, rows * channels);
  std::vector<double> partial(2 * chunks * channels, 0.0);
  for_each_chunk(rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<T> block_sum(channels);
    std::vector<T> block_dot(channels);
    T* sum_ptr = block_sum.data();
    T* dot_ptr = block_dot.data();
    double* chunk_sum = partial.data() + 2 * chunk * channels;
    double* chunk_dot = chunk_sum + channels;
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
      const int64_t r1 = std::min(end, r0 + rows_per_block);
      std::fill(block_sum.begin(), block_sum.end(), T(0));
      std::fill(block_dot.begin(), block_dot.end(), T(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* grow = g + r * channels;
        const T* xrow = x + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          sum_ptr[c] += grow[c];
          dot_ptr[c] += grow[c] * (xrow[c] - hi[c]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        chunk_sum[c] += sum_ptr[c];
        chunk_dot[c] += dot_ptr[c];
      }
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double total_sum = 0.0;
    double total_dot = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total_sum += partial[2 * chunk * channels + c];
      total_dot += partial[(2 * chunk + 1) * channels + c];
    }
    grad_sum[c] = total_sum;
    grad_dot[c] = total_dot;
  }
}

// dx = g * a + (x - hi) * b + k per channel. With b == nullptr, dx = g * a.
template <typename T>
void input_gradient(
    const T* g,
    const T* x,
    T* dx,
    const Layout& layout,
    const T* hi,
    const T* a,
    const T* b,
    const T* k) {
  const int64_t channels = layout.channels;
  if (layout.channel_major) {
    const int64_t inner = layout.inner;
    const int64_t planes = layout.outer * channels;
    const int64_t chunks = num_chunks(planes, planes * inner);
    for_each_chunk(planes, chunks, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const T* grow = g + plane * inner;
        T* out = dx + plane * inner;
        const T ac = a[c];
        if (b == nullptr) {
#pragma omp simd
          for (int64_t s = 0; s < inner; ++s) {
            out[s] = grow[s] * ac;
          }
          continue;
        }
        const T* xrow = x + plane * inner;
        const T h = hi[c], bc = b[c], kc = k[c];
#pragma omp simd
        for (int64_t s = 0; s < inner; ++s) {
          out[s] = grow[s] * ac + (xrow[s] - h) * bc + kc;
        }
      }
    });
    return;
  }
  const int64_t rows = layout.outer;
  const int64_t chunks = num_chunks(rows, rows * channels);
  for_each_chunk(rows, chunks, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* grow = g + r * channels;
      T* out = dx + r * channels;
      if (b == nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          out[c] = grow[c] * a[c];
        }
        continue;
      }
      const T* xrow = x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        out[c] = grow[c] * a[c] + (xrow[c] - hi[c]) * b[c] + k[c];
      }
    }
  });
}

// ---------------------------------------------------------------- operators

at::Tensor per_channel_or(const c10::optional<at::Tensor>& tensor, const at::Tensor& like,
                          double fill) {
  if (tensor.has_value() && tensor->defined()) {
    return tensor->contiguous();
  }
  return at::full({like.size(1)}, fill, like.options());
}

// Writes running = (1 - momentum) * running + momentum * batch, with the unbiased
// batch variance, computed in the buffer dtype as the reference path does.
template <typename T>
void update_running_stats(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const std::vector<Moments>& moments,
    double momentum) {
  const int64_t channels = static_cast<int64_t>(moments.size());
  at::Tensor new_mean = at::empty({channels}, running_mean.options());
  at::Tensor new_var = at::empty({channels}, running_var.options());
  at::Tensor old_mean = running_mean.contiguous();
  at::Tensor old_var = running_var.contiguous();
  const T* old_mean_ptr = old_mean.data_ptr<T>();
  const T* old_var_ptr = old_var.data_ptr<T>();
  T* mean_ptr = new_mean.data_ptr<T>();
  T* var_ptr = new_var.data_ptr<T>();
  const T keep = static_cast<T>(1.0 - momentum);
  const T weight = static_cast<T>(momentum);
  for (int64_t c = 0; c < channels; ++c) {
    const double count = moments[c].count;
    const T batch_mean = static_cast<T>(moments[c].mean);
    const T unbiased = static_cast<T>(std::max(moments[c].m2, 0.0) / (count - 1.0));
    mean_ptr[c] = batch_mean * weight + old_mean_ptr[c] * keep;
    var_ptr[c] = unbiased * weight + old_var_ptr[c] * keep;
  }
  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train_impl(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    c10::optional<at::Tensor> running_mean,
    c10::optional<at::Tensor> running_var,
    double momentum,
    double eps) {
  const Layout layout = layout_of(input);
  const int64_t channels = layout.channels;
  const T* x = input.const_data_ptr<T>();

  std::vector<Moments> moments(channels);
  if (layout.channel_major) {
    const int64_t chunks = num_chunks(channels, input.numel());
    for_each_chunk(channels, chunks, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        moments[c] = channel_moments<T>(x, layout, c);
      }
    });
  } else {
    moments = row_moments<T>(x, layout);
  }

  if (running_mean.has_value() && running_mean->defined()) {
    update_running_stats<T>(*running_mean, *running_var, moments, momentum);
  }

  at::Tensor mean_hi = at::empty({channels}, input.options());
  at::Tensor mean_lo = at::empty({channels}, input.options());
  at::Tensor invstd = at::empty({channels}, input.options());
  at::Tensor scale = at::empty({channels}, input.options());
  at::Tensor shift = at::empty({channels}, input.options());
  const at::Tensor w = per_channel_or(weight, input, 1.0);
  const at::Tensor b = per_channel_or(bias, input, 0.0);
  const T* w_ptr = w.const_data_ptr<T>();
  const T* b_ptr = b.const_data_ptr<T>();
  T* hi = mean_hi.data_ptr<T>();
  T* lo = mean_lo.data_ptr<T>();
  T* inv = invstd.data_ptr<T>();
  T* scale_ptr = scale.data_ptr<T>();
  T* shift_ptr = shift.data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c) {
    const double mean = moments[c].mean;
    hi[c] = static_cast<T>(mean);
    lo[c] = static_cast<T>(mean - static_cast<double>(hi[c]));
    const T var = static_cast<T>(std::max(moments[c].m2, 0.0) / moments[c].count);
    inv[c] = T(1) / std::sqrt(var + static_cast<T>(eps));
    scale_ptr[c] = inv[c] * w_ptr[c];
    // (x - hi - lo) * scale + bias, with lo folded into the shift.
    shift_ptr[c] = -lo[c] * scale_ptr[c] + b_ptr[c];
  }

  at::Tensor output = at::empty_like(input);
  normalize<T>(x, output.data_ptr<T>(), layout, hi, scale_ptr, shift_ptr);
  return {output, mean_hi, mean_lo, invstd};
}

template <typename T>
at::Tensor forward_eval_impl(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  const Layout layout = layout_of(input);
  const int64_t channels = layout.channels;
  const at::Tensor mean = running_mean.contiguous();
  const at::Tensor var = running_var.contiguous();
  const at::Tensor w = per_channel_or(weight, input, 1.0);
  const at::Tensor b = per_channel_or(bias, input, 0.0);
  std::vector<T> zero(channels, T(0));
  std::vector<T> scale(channels);
  std::vector<T> shift(channels);
  const T* mean_ptr = mean.const_data_ptr<T>();
  const T* var_ptr = var.const_data_ptr<T>();
  const T* w_ptr = w.const_data_ptr<T>();
  const T* b_ptr = b.const_data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c) {
    // The same roundings as torch.rsqrt and the reference path: NOTE that
    // shift = bias - mean * scale is rounded, which costs digits when |mean| >> std.
    const T invstd = T(1) / std::sqrt(var_ptr[c] + static_cast<T>(eps));
    scale[c] = invstd * w_ptr[c];
    shift[c] = -mean_ptr[c] * scale[c] + b_ptr[c];
  }
  at::Tensor output = at::empty_like(input);
  normalize<T>(
      input.const_data_ptr<T>(), output.data_ptr<T>(), layout, zero.data(),
      scale.data(), shift.data());
  return output;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean_hi,
    const at::Tensor& mean_lo,
    const at::Tensor& invstd,
    bool training,
    bool need_input,
    bool need_weight,
    bool need_bias) {
  const Layout layout = layout_of(input);
  const int64_t channels = layout.channels;
  const at::Tensor g = grad_output.contiguous(input.suggest_memory_format());
  const T* g_ptr = g.const_data_ptr<T>();
  const T* x = input.const_data_ptr<T>();
  const T* hi = mean_hi.const_data_ptr<T>();
  const T* lo = mean_lo.const_data_ptr<T>();
  const T* inv = invstd.const_data_ptr<T>();
  const at::Tensor w = per_channel_or(weight, input, 1.0);
  const T* w_ptr = w.const_data_ptr<T>();
  const double count = static_cast<double>(layout.outer * layout.inner);

  std::vector<double> grad_sum(channels, 0.0);
  std::vector<double> grad_dot(channels, 0.0);
  const bool need_sums = need_weight || need_bias || (need_input && training);
  if (need_sums) {
    gradient_sums<T>(g_ptr, x, layout, hi, grad_sum.data(), grad_dot.data());
    for (int64_t c = 0; c < channels; ++c) {
      // sum(g * (x - mean)) = sum(g * (x - hi)) - lo * sum(g).
      grad_dot[c] -= static_cast<double>(lo[c]) * grad_sum[c];
    }
  }

  at::Tensor grad_input, grad_weight, grad_bias;
  if (need_weight) {
    grad_weight = at::empty({channels}, input.options());
    T* ptr = grad_weight.data_ptr<T>();
    for (int64_t c = 0; c < channels; ++c) {
      ptr[c] = static_cast<T>(grad_dot[c] * inv[c]);
    }
  }
  if (need_bias) {
    grad_bias = at::empty({channels}, input.options());
    T* ptr = grad_bias.data_ptr<T>();
    for (int64_t c = 0; c < channels; ++c) {
      ptr[c] = static_cast<T>(grad_sum[c]);
    }
  }
  if (need_input) {
    std::vector<T> a(channels), b(channels), k(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double input_scale = static_cast<double>(inv[c]) * w_ptr[c];
      a[c] = static_cast<T>(input_scale);
      if (training) {
        // dx = a * (g - sum(g) / M - xhat * sum(g * xhat) / M), written as
        // a * g + b * (x - hi) + k with b = -a * invstd^2 * sum(g * (x - mean)) / M
        // and k = -a * sum(g) / M - b * lo.
        const double inv_c = inv[c];
        const double centered_coef =
            -input_scale * inv_c * inv_c * grad_dot[c] / std::max(count, 1.0);
        b[c] = static_cast<T>(centered_coef);
        k[c] = static_cast<T>(
            -input_scale * grad_sum[c] / std::max(count, 1.0) -
            centered_coef * static_cast<double>(lo[c]));
      }
    }
    grad_input = at::empty_like(input);
    input_gradient<T>(
        g_ptr, x, grad_input.data_ptr<T>(), layout, hi, a.data(),
        training ? b.data() : nullptr, k.data());
  }
  return {grad_input, grad_weight, grad_bias};
}

void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "normlab batch_norm kernels expected a CPU "
              "tensor, got device ", input.device());
  TORCH_CHECK(input.dim() >= 2, "normlab batch_norm kernels expected at least 2 "
              "dimensions, got ", input.dim());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    c10::optional<at::Tensor> running_mean,
    c10::optional<at::Tensor> running_var,
    double momentum,
    double eps) {
  check_input(input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "forward_train", [&] {
    return forward_train_impl<scalar_t>(
        input, weight, bias, running_mean, running_var, momentum, eps);
  });
}

at::Tensor forward_eval(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  check_input(input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "forward_eval", [&] {
    return forward_eval_impl<scalar_t>(input, weight, bias, running_mean, running_var, eps);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean_hi,
    const at::Tensor& mean_lo,
    const at::Tensor& invstd,
    bool training,
    bool need_input,
    bool need_weight,
    bool need_bias) {
  check_input(input);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "backward", [&] {
    return backward_impl<scalar_t>(
        grad_output, input, weight, mean_hi, mean_lo, invstd, training, need_input,
        need_weight, need_bias);
  });
}

}  // namespace

TORCH_LIBRARY(normlab_bn, m) {
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &forward_train);
  m.def(
      "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> Tensor",
      &forward_eval);
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean_hi, "
      "Tensor mean_lo, Tensor invstd, bool training, bool need_input, "
      "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)",
      &backward);
}
