// Runs gemm_amx (built against tests/emulate/amx.h) on random int8 data and checks it:
// raw int32 sums bit for bit against int64, and the float epilogue (scales, bias, every
// output type, per-group scales) bit for bit against gemm_scalar. Prints "ok" or the first
// mismatch; exit status 0 only when every case passes.
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

// As csrc/ops/int8_linear.cpp run_gemm, single-threaded: 256-row tasks x 64-column chunks.
void run(Gemm fn, const GemmArgs& g) {
  std::vector<int32_t> cbuf(256 * 64);
  std::vector<float> fbuf(256 * 64);
  for (int64_t m0 = 0; m0 < g.M; m0 += 256) fn(g, m0, std::min(g.M, m0 + 256), 0, g.Np / 64, cbuf.data(), fbuf.data());
}

bool check(int64_t M, int64_t N, int64_t K, int64_t group) {
  const int64_t Np = round_up(N, 64), Kp = group ? std::max(round_up(K, group), group) : std::max(round_up(K, 64), int64_t(64));
  const int64_t gk = group ? group : Kp, G = Kp / gk, Mp = round_up(M, 32);
  std::uniform_int_distribution<int> i8(-128, 127);
  std::vector<int8_t> w(N * K), a(Mp * Kp, 0);
  for (auto& v : w) v = int8_t(i8(rng));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * Kp + k] = int8_t(i8(rng));
  if (M > 1) a[0] = -128, w[0] = -128;  // the extreme product
  std::vector<int8_t> b;
  std::vector<int32_t> colsum;
  pack(w, N, K, Np, Kp, gk, b, colsum);
  if (G == 1) {  // raw int32 against int64
    std::vector<int32_t> out(M * N);
    GemmArgs g{a.data(), M, Mp, N, Np, Kp, b.data(), colsum.data(), nullptr, nullptr, Kp, nullptr,
               out.data(), N, OutType::I32};
    run(gemm_amx, g);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        int64_t ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += int64_t(a[m * Kp + k]) * w[n * K + k];
        if (out[m * N + n] != ref) {
          std::printf("int32 mismatch M=%ld N=%ld K=%ld at (%ld, %ld): %d vs %ld\n", long(M), long(N), long(K),
                      long(m), long(n), out[m * N + n], long(ref));
          return false;
        }
      }
  }
  std::uniform_real_distribution<float> u(0.001f, 0.02f);
  std::vector<float> a_scale(M), w_scale(G * Np, 1.f), bias(N);
  for (auto& v : a_scale) v = u(rng);
  for (int64_t i = 0; i < G * N; ++i) w_scale[(i / N) * Np + i % N] = u(rng);
  for (auto& v : bias) v = u(rng) - 0.01f;
  for (OutType ot : {OutType::F32, OutType::BF16, OutType::F16}) {
    const int64_t es = ot == OutType::F32 ? 4 : 2;
    std::vector<uint8_t> o1(M * N * es), o2(M * N * es);
    GemmArgs g{a.data(), M, Mp, N, Np, Kp, b.data(), colsum.data(), a_scale.data(), w_scale.data(), gk,
               bias.data(), o1.data(), N, ot};
    run(gemm_amx, g);
    g.out = o2.data();
    run(gemm_scalar, g);
    if (o1 != o2) {
      std::printf("epilogue mismatch M=%ld N=%ld K=%ld group=%ld out_type=%d\n", long(M), long(N), long(K),
                  long(group), int(ot));
      return false;
    }
  }
  return true;
}
}  // namespace

int main() {
  const int64_t cases[][4] = {{1, 1, 1, 0},     {5, 70, 130, 0},   {33, 64, 64, 0},   {31, 100, 200, 0},
                              {300, 130, 96, 0}, {64, 17, 257, 0}, {40, 70, 300, 128}, {17, 64, 512, 64}};
  for (const auto& c : cases)
    if (!check(c[0], c[1], c[2], c[3])) return 1;
  std::printf("ok\n");
  return 0;
}
