// Runs the AMX int8 GEMMs (built against tests/emulate/amx.h) on random int8 data and
// checks them: gemm_amx (issue 12's kernel) with tile-packed A and with row-major A (as
// int8_conv2d hands it), prefetch on and off, and gemm_amx_rows (the previous kernel). Raw
// int32 sums bit for bit against int64 (-128 x -128 included), and the float epilogue (scales,
// bias, every output type, per-group scales) bit for bit against gemm_scalar. Rows 1..70
// (every tail of the 16- and 32-row passes), K not a multiple of 64, tasks split over rows and
// column chunks as csrc/ops/int8_linear.cpp splits them. Prints "ok" or the first mismatch;
// exit status 0 only when every case passes.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/int8_linear.h"

using namespace pysparse::cpu;

namespace {
std::mt19937 rng(12345);

// w [N][K] -> packed [Np/16][Kp/4][16][4] (csrc/cpu/int8_linear.h), colsum [G][Np]
void pack(const std::vector<int8_t>& w, int64_t N, int64_t K, int64_t Np, int64_t Kp, int64_t gk,
          std::vector<int8_t>& b, std::vector<int32_t>& colsum) {
  b.assign(Np * Kp, 0);
  colsum.assign((Kp / gk) * Np, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = w[n * K + k];
      b[(n / 16) * Kp * 16 + (k / 4) * 64 + (n % 16) * 4 + (k % 4)] = v;
      colsum[(k / gk) * Np + n] += v;
    }
}

using Gemm = void (*)(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*, float*);

// As csrc/ops/int8_linear.cpp run_gemm, single-threaded: 256-row tasks (`task` rows here, to
// reach the second task with small M) x column chunks, split in two ranges when there are two
// or more (a task that starts at c0 > 0).
void run(Gemm fn, const GemmArgs& g, int64_t task = 256) {
  std::vector<int32_t> cbuf(256 * 64, 0x5a5a5a5a);
  std::vector<float> fbuf(256 * 64, -1.f);
  const int64_t nc = g.Np / 64, half = nc / 2;
  for (int64_t m0 = 0; m0 < g.M; m0 += task) {
    const int64_t m1 = std::min(g.M, m0 + task);
    if (half > 0) {
      fn(g, m0, m1, 0, half, cbuf.data(), fbuf.data());
      fn(g, m0, m1, half, nc, cbuf.data(), fbuf.data());
    } else {
      fn(g, m0, m1, 0, nc, cbuf.data(), fbuf.data());
    }
  }
}

struct Variant {
  const char* name;
  Gemm fn;
  bool tiles;    // A tile-packed (a_tiles) or row-major
  int prefetch;  // GemmArgs.prefetch (software prefetch never changes a result; both paths run)
};
const Variant kVariants[] = {{"gemm_amx tiles", gemm_amx, true, -1},
                             {"gemm_amx tiles no-prefetch", gemm_amx, true, 0},
                             {"gemm_amx row-major A", gemm_amx, false, -1},
                             {"gemm_amx_rows", gemm_amx_rows, false, -1}};

bool check(int64_t M, int64_t N, int64_t K, int64_t group, int64_t task) {
  const int64_t Np = round_up(N, 64), Kp = group ? std::max(round_up(K, group), group) : std::max(round_up(K, 64), int64_t(64));
  const int64_t gk = group ? group : Kp, G = Kp / gk, Mp = round_up(M, 32);
  std::uniform_int_distribution<int> i8(-128, 127);
  std::vector<int8_t> w(N * K), a(Mp * Kp, 0);
  for (auto& v : w) v = int8_t(i8(rng));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * Kp + k] = int8_t(i8(rng));
  a[0] = -128, w[0] = -128;  // the extreme product
  std::vector<int8_t> b;
  std::vector<int32_t> colsum;
  pack(w, N, K, Np, Kp, gk, b, colsum);
  // the tile-packed copy, filled with junk first so that a byte the packing misses shows
  std::vector<int8_t> at(a_tiles_bytes(M, Kp), 0x7f);
  pack_a_tiles(a.data(), Kp, K, Kp, 0, M, at.data());
  zero_tile_padding(M, Kp, at.data());
  auto args = [&](const Variant* v, void* out, OutType ot, const float* as, const float* ws, const float* bias) {
    const bool tiles = v && v->tiles;
    GemmArgs g{tiles ? nullptr : a.data(), M, tiles ? round_up(M, 16) : Mp, N, Np, Kp, b.data(), colsum.data(), as,
               ws, gk, bias, out, N, ot};
    g.a_tiles = tiles ? at.data() : nullptr;
    g.prefetch = v ? v->prefetch : -1;
    return g;
  };
  if (G == 1) {  // raw int32 against int64
    std::vector<int64_t> ref(M * N, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) ref[m * N + n] += int64_t(a[m * Kp + k]) * w[n * K + k];
    for (const Variant& v : kVariants) {
      std::vector<int32_t> out(M * N, 0x5a5a5a5a);
      run(v.fn, args(&v, out.data(), OutType::I32, nullptr, nullptr, nullptr), task);
      for (int64_t i = 0; i < M * N; ++i)
        if (out[i] != ref[i]) {
          std::printf("%s: int32 mismatch M=%ld N=%ld K=%ld at (%ld, %ld): %d vs %ld\n", v.name, long(M), long(N),
                      long(K), long(i / N), long(i % N), out[i], long(ref[i]));
          return false;
        }
    }
  }
  std::uniform_real_distribution<float> u(0.001f, 0.02f);
  std::vector<float> a_scale(M), w_scale(G * Np, 1.f), bias(N);
  for (auto& x : a_scale) x = u(rng);
  for (int64_t i = 0; i < G * N; ++i) w_scale[(i / N) * Np + i % N] = u(rng);
  for (auto& x : bias) x = u(rng) - 0.01f;
  for (OutType ot : {OutType::F32, OutType::BF16, OutType::F16})
    for (bool with_bias : {true, false}) {
      if (!with_bias && ot != OutType::F32) continue;  // (bias is added before the conversion)
      const float* bp = with_bias ? bias.data() : nullptr;
      const int64_t es = ot == OutType::F32 ? 4 : 2;
      std::vector<uint8_t> ref(M * N * es, 0xCD);
      run(gemm_scalar, args(nullptr, ref.data(), ot, a_scale.data(), w_scale.data(), bp), task);
      for (const Variant& v : kVariants) {
        std::vector<uint8_t> o(M * N * es, 0xAB);
        run(v.fn, args(&v, o.data(), ot, a_scale.data(), w_scale.data(), bp), task);
        if (o != ref) {
          std::printf("%s: epilogue mismatch M=%ld N=%ld K=%ld group=%ld out_type=%d bias=%d\n", v.name, long(M),
                      long(N), long(K), long(group), int(ot), int(with_bias));
          return false;
        }
      }
    }
  return true;
}
}  // namespace

int main() {
  // every M of 1..70 (tails 1, 15, 16, 17, 31, 32, 33, ... of the 16- and 32-row passes) on a
  // K that is not a multiple of 64, per channel and per group of 64 (two groups)
  for (int64_t M = 1; M <= 70; ++M)
    for (int64_t group : {0, 64})
      if (!check(M, 70, 100, group, 256)) return 1;
  // K = 4160 (65 tiles of 64): per channel and per group of 128 (33 groups); N = 70: a partial chunk
  for (int64_t M : {1, 15, 16, 17, 31, 32, 33, 48, 70})
    for (int64_t group : {0, 128})
      if (!check(M, 70, 4160, group, 256)) return 1;
  // tasks of 32 and 64 rows (m0 > 0: a later task's row tiles), grouped scales, odd shapes
  const int64_t cases[][5] = {{70, 130, 300, 0, 32}, {70, 64, 512, 64, 64},  {33, 17, 257, 0, 32},
                              {40, 70, 300, 128, 32}, {300, 130, 96, 0, 256}, {5, 1, 1, 0, 256}};
  for (const auto& c : cases)
    if (!check(c[0], c[1], c[2], c[3], c[4])) return 1;
  std::printf("ok\n");
  return 0;
}
