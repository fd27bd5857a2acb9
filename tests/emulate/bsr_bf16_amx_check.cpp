// Runs bsr_bf16_amx (built against tests/emulate/amx.h) on random bf16 block-sparse layers
// (bn 16/32/64, bk 32/64, edge blocks, empty block rows, odd K) and checks it against
// bsr_bf16_scalar: both multiply the same bf16 products exactly and sum in fp32 in other
// orders, so they agree within K * eps * sum |x w| (+ ReLU on both). Prints "ok" or the
// first mismatch; exit status 0 only when every case passes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/bsr_linear.h"

using namespace pysparse::cpu;

namespace {
std::mt19937 rng(777);

uint16_t to_bf16(float f) {  // truncation is enough for test data
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool check(int64_t M, int64_t N, int64_t K, int64_t bn, int64_t bk, double density) {
  const int64_t R = (N + bn - 1) / bn, KB = (K + bk - 1) / bk;
  const int64_t Mp = ((std::max<int64_t>(M, 1) + 31) / 32) * 32, ldx = KB * bk + 1;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<double> u01(0, 1);
  std::vector<int32_t> row_ptr(R + 1, 0), col_idx;
  std::vector<uint16_t> values;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < KB; ++c) {
      if (u01(rng) >= density) continue;
      col_idx.push_back(int32_t(c));
      const size_t base = values.size();
      values.resize(base + bk * bn, 0);
      for (int64_t k = 0; k < bk; ++k)
        for (int64_t n = 0; n < bn; ++n)
          if (r * bn + n < N && c * bk + k < K)  // edge blocks: zero padding
            values[base + (k / 2) * bn * 2 + n * 2 + (k % 2)] = to_bf16(nd(rng));
    }
    row_ptr[r + 1] = int32_t(col_idx.size());
  }
  std::vector<uint16_t> x(Mp * ldx, 0);  // zero past M rows and past K columns
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * ldx + k] = to_bf16(nd(rng));
  std::vector<float> bias(N);
  for (auto& v : bias) v = nd(rng);
  std::vector<float> C(32 * 64);
  for (bool relu : {false, true}) {
    std::vector<float> o1(M * N, NAN), o2(M * N, NAN);
    BsrBf16Args b{{nullptr, M, N, K, 0, bn, bk, row_ptr.data(), col_idx.data(), nullptr, bias.data(), relu,
                   o1.data(), N},
                  x.data(), ldx, values.data()};
    bsr_bf16_amx(b, 0, R, C.data());
    b.f.out = o2.data();
    bsr_bf16_scalar(b, 0, R);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double mag = std::fabs(bias[n]);
        const int64_t r = n / bn;
        for (int32_t j = row_ptr[r]; j < row_ptr[r + 1]; ++j)
          for (int64_t k = 0; k < bk && col_idx[j] * bk + k < K; ++k)
            mag += std::fabs(from_bf16(x[m * ldx + col_idx[j] * bk + k]) *
                             from_bf16(values[size_t(j) * bk * bn + (k / 2) * bn * 2 + (n % bn) * 2 + (k % 2)]));
        const double tol = 2.0 * (K + 1) * 1.2e-7 * mag + 1e-30;
        if (!(std::fabs(double(o1[m * N + n]) - o2[m * N + n]) <= tol)) {
          std::printf("mismatch M=%ld N=%ld K=%ld block=%ldx%ld at (%ld, %ld): %g vs %g\n", long(M), long(N),
                      long(K), long(bn), long(bk), long(m), long(n), o1[m * N + n], o2[m * N + n]);
          return false;
        }
      }
  }
  return true;
}
}  // namespace

int main() {
  const double cases[][6] = {{1, 64, 64, 64, 32, 1.0},   {5, 70, 131, 64, 32, 0.6}, {33, 48, 100, 16, 64, 0.5},
                             {40, 100, 96, 32, 32, 0.7}, {17, 64, 64, 64, 64, 0.0}, {70, 130, 200, 64, 64, 0.4}};
  for (const auto& c : cases)
    if (!check(int64_t(c[0]), int64_t(c[1]), int64_t(c[2]), int64_t(c[3]), int64_t(c[4]), c[5])) return 1;
  std::printf("ok\n");
  return 0;
}
