// Runs bsr_i8_amx (built against tests/emulate/amx.h) on random block-sparse int8 layers
// and checks every output type, with and without ReLU, bit for bit against bsr_i8_scalar
// (both multiply s8 x s8 into exact int32 and share the epilogue). Prints "ok" or the
// first mismatch; exit status 0 only when every case passes.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/bsr_linear.h"

using namespace pysparse::cpu;

namespace {
std::mt19937 rng(54321);

bool check(int64_t M, int64_t N, int64_t K, double density) {
  constexpr int64_t B = kBsrI8Block;
  const int64_t R = (N + B - 1) / B, KB = (K + B - 1) / B, Np = R * B, Kp = std::max<int64_t>(KB, 1) * B;
  const int64_t Mp = round_up(std::max<int64_t>(M, 1), 32);
  std::uniform_int_distribution<int> i8(-128, 127);
  std::uniform_real_distribution<double> u01(0, 1);
  std::vector<int32_t> row_ptr(R + 1, 0), col_idx;
  std::vector<int8_t> values;
  std::vector<int32_t> colsum(Np, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < KB; ++c) {
      if (u01(rng) >= density) continue;
      col_idx.push_back(int32_t(c));
      const size_t base = values.size();
      values.resize(base + B * B, 0);
      for (int64_t n = 0; n < B; ++n)
        for (int64_t k = 0; k < B; ++k) {
          if (r * B + n >= N || c * B + k >= K) continue;  // edge blocks: zero padding
          const int8_t v = int8_t(i8(rng));
          values[base + (n / 16) * 1024 + (k / 4) * 64 + (n % 16) * 4 + (k % 4)] = v;
          colsum[r * B + n] += v;
        }
    }
    row_ptr[r + 1] = int32_t(col_idx.size());
  }
  std::vector<int8_t> a(Mp * Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * Kp + k] = int8_t(i8(rng));
  if (M > 0 && K > 0) a[0] = -128;
  std::vector<int8_t> at(a_tiles_bytes(M, Kp), 0x7f);  // junk first: a byte the packing misses shows
  pack_a_tiles(a.data(), Kp, K, Kp, 0, M, at.data());
  zero_tile_padding(M, Kp, at.data());
  std::uniform_real_distribution<float> u(0.001f, 0.02f);
  std::vector<float> a_scale(std::max<int64_t>(M, 1)), w_scale(Np, 1.f), bias(N);
  for (auto& v : a_scale) v = u(rng);
  for (int64_t n = 0; n < N; ++n) w_scale[n] = u(rng), bias[n] = u(rng) - 0.01f;
  std::vector<int32_t> cbuf(kBsrI8Scratch, 0x5a5a5a5a);
  struct Variant {
    const char* name;
    bool tiles;
    int prefetch;
  };
  const Variant variants[] = {{"tile-packed A", true, -1}, {"tile-packed A, no prefetch", true, 0},
                              {"tile-packed A, prefetch 1", true, 1}, {"row-major A", false, -1}};
  for (OutType ot : {OutType::F32, OutType::BF16, OutType::F16})
    for (bool relu : {false, true}) {
      const int64_t es = ot == OutType::F32 ? 4 : 2;
      std::vector<uint8_t> ref(M * N * es, 0xCD);
      BsrI8Args b{{a.data(), M, Mp, N, Np, Kp, nullptr, colsum.data(), a_scale.data(), w_scale.data(), Kp,
                   bias.data(), ref.data(), N, ot},
                  row_ptr.data(), col_idx.data(), values.data(), relu};
      bsr_i8_scalar(b, 0, R, cbuf.data(), nullptr);
      for (const Variant& v : variants) {
        std::vector<uint8_t> o(M * N * es, 0xAB);
        BsrI8Args c = b;
        c.g.out = o.data();
        c.g.a = v.tiles ? nullptr : a.data();
        c.g.a_tiles = v.tiles ? at.data() : nullptr;
        c.g.prefetch = v.prefetch;
        // two ranges of block rows, as two threads of parallel_rows get them
        bsr_i8_amx(c, 0, R / 2, cbuf.data(), nullptr);
        bsr_i8_amx(c, R / 2, R, cbuf.data(), nullptr);
        if (o != ref) {
          std::printf("%s: mismatch M=%ld N=%ld K=%ld density=%.2f out_type=%d relu=%d\n", v.name, long(M), long(N),
                      long(K), density, int(ot), int(relu));
          return false;
        }
      }
    }
  return true;
}
}  // namespace

int main() {
  const double cases[][4] = {{1, 64, 64, 1.0}, {5, 70, 130, 0.6},  {33, 128, 256, 0.3}, {40, 100, 300, 0.5},
                             {17, 64, 64, 0.0}, {64, 130, 70, 0.8}, {70, 256, 128, 0.4}, {3, 256, 200, 0.0}};
  for (const auto& c : cases)
    if (!check(int64_t(c[0]), int64_t(c[1]), int64_t(c[2]), c[3])) return 1;
  // every row tail of the 16- and 32-row passes; density 0.3 over 6 block rows leaves some empty
  for (int64_t M : {1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 70})
    if (!check(M, 384, 320, 0.3)) return 1;
  std::printf("ok\n");
  return 0;
}
