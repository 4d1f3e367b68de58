// Fused core of the avatar decoder's per-branch MLP (perse_ray/avatar/model.py,
// BranchDecoder.forward with one hidden layer):
//
//   out[u, i, :] = silu(g[i, :] + zp[u, :]) @ w + b
//   g [n, H] (per Gaussian), zp [U, H] (per distinct latent row), w [H, C], b [C]
//
// and its backward: grad_g [n, H] (summed over u), grad_zp [U, H], grad_w [H, C]
// and grad_b [C] (summed over u and i). The hidden activations [U, n, H] are
// never stored: the forward writes out directly, the backward recomputes them.
//
// Layout of the work (float with H a multiple of 8: AVX2 + FMA):
//   Gaussians are cut into blocks of kBlock, shared out over OpenMP threads.
//   The elementwise parts (g + zp, silu, silu', dh * silu') run 8 hidden units
//   per vector along one row, where g, zp and grad_g are contiguous. The three
//   products are small register-blocked GEMMs that need no transposed or
//   gathered operand:
//     forward   out = h @ w            6 rows x 16 channels of accumulators,
//                                      vectors along C (w copied, C padded to 8k)
//     backward  dh = dout @ w^T        1 row x 32 hidden units, vectors along H
//               grad_w += h^T @ dout   4 hidden units x 16 channels, over rows
// Reductions over Gaussians (grad_zp, grad_w, grad_b) keep one partial per
// block, added in block order at the end: the same bits for any thread count.
// Every (u, i) row goes through the same operations whatever U and n are, so a
// row's output does not depend on which other rows are computed with it.
// double (gradcheck) and H not a multiple of 8 take a scalar path with the
// same blocks and the same reduction order.

// Lighter than <torch/extension.h>, which triples the first build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "exp_avx2.h"

namespace {

// Threads for `work` rows, at most one per `grain`: forking for a fraction of
// a millisecond costs more than it saves (as in the rasterizer).
inline int team_size(int max_threads, int64_t work, int64_t grain) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, work / grain)));
}
constexpr int64_t kGrainRows = 2048; // (u, i) rows per thread, ~0.1 ms of work
constexpr int64_t kBlock = 256;      // Gaussians per work item (and per reduction partial)
constexpr int kTileRows = 6;         // forward GEMM rows per register tile
constexpr int64_t kSub = 32;         // backward rows whose h / dout scratch stays in L1

// ---------------------------------------------------------------------------
// AVX2 float path
// ---------------------------------------------------------------------------

// s = sigmoid(x) = 1 / (1 + e^-x), h = silu(x) = x s. The backward recomputes
// both with this same function, so its h is the forward's bit for bit.
inline void silu8(__m256 x, __m256 &h, __m256 &s) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = exp_avx2(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)));
    s = _mm256_div_ps(one, _mm256_add_ps(one, e));
    h = _mm256_mul_ps(x, s);
}

// The first `lanes` (0..8) lanes set.
inline __m256i first_lanes(int64_t lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[r, c0 : c0 + 8 CV] = h[r, :] @ wp[:, c0 : ...] + b for R rows. wp is w
// with its rows padded to Cp channels (zeros); the stores stop at C.
template <int R, int CV>
inline void forward_tile(const float *h, int64_t H, const float *wp, int64_t Cp, const float *bp,
                         float *out, int64_t C, int64_t c0) {
    __m256 acc[R][CV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < CV; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < H; ++k) {
        __m256 wv[CV];
        for (int j = 0; j < CV; ++j) wv[j] = _mm256_loadu_ps(wp + k * Cp + c0 + 8 * j);
        for (int r = 0; r < R; ++r) {
            const __m256 hb = _mm256_broadcast_ss(h + r * H + k);
            for (int j = 0; j < CV; ++j) acc[r][j] = _mm256_fmadd_ps(hb, wv[j], acc[r][j]);
        }
    }
    for (int j = 0; j < CV; ++j) {
        const int64_t c = c0 + 8 * j;
        const __m256 bv = _mm256_loadu_ps(bp + c);
        if (c + 8 <= C) {
            for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * C + c, _mm256_add_ps(acc[r][j], bv));
        } else {
            const __m256i mask = first_lanes(C - c);
            for (int r = 0; r < R; ++r)
                _mm256_maskstore_ps(out + r * C + c, mask, _mm256_add_ps(acc[r][j], bv));
        }
    }
}

template <int CV>
inline void forward_rows(int R, const float *h, int64_t H, const float *wp, int64_t Cp,
                         const float *bp, float *out, int64_t C, int64_t c0) {
    switch (R) {
    case 6: forward_tile<6, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    case 5: forward_tile<5, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    case 4: forward_tile<4, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    case 3: forward_tile<3, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    case 2: forward_tile<2, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    default: forward_tile<1, CV>(h, H, wp, Cp, bp, out, C, c0); break;
    }
}

// w [H, C] -> [H, Cp] and b [C] -> [Cp], zero padded, so full vectors can be loaded.
inline void pad_channels(const float *w, const float *b, int64_t H, int64_t C, int64_t Cp,
                         std::vector<float> &wp, std::vector<float> &bp) {
    wp.assign(H * Cp, 0.0f);
    bp.assign(Cp, 0.0f);
    for (int64_t k = 0; k < H; ++k) std::copy(w + k * C, w + k * C + C, wp.data() + k * Cp);
    if (b) std::copy(b, b + C, bp.data());
}

void forward_avx2(const float *g, const float *zp, const float *w, const float *b, float *out,
                  int64_t n, int64_t U, int64_t H, int64_t C, int nt) {
    const int64_t Cp = (C + 7) / 8 * 8;
    std::vector<float> wp, bp;
    pad_channels(w, b, H, C, Cp, wp, bp);
    const int64_t nblk = (n + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(team_size(nt, U * n, kGrainRows))
    {
        std::vector<float> hbuf(kTileRows * H);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t i_end = std::min(n, (blk + 1) * kBlock);
            for (int64_t u = 0; u < U; ++u) {
                const float *z = zp + u * H;
                for (int64_t i0 = blk * kBlock; i0 < i_end; i0 += kTileRows) {
                    const int R = static_cast<int>(std::min<int64_t>(kTileRows, i_end - i0));
                    for (int r = 0; r < R; ++r) {
                        const float *gr = g + (i0 + r) * H;
                        for (int64_t k = 0; k < H; k += 8) {
                            __m256 h, s;
                            silu8(_mm256_add_ps(_mm256_loadu_ps(gr + k), _mm256_loadu_ps(z + k)), h, s);
                            _mm256_storeu_ps(hbuf.data() + r * H + k, h);
                        }
                    }
                    float *o = out + (u * n + i0) * C;
                    for (int64_t c0 = 0; c0 < C; c0 += 16) {
                        if (C - c0 > 8)
                            forward_rows<2>(R, hbuf.data(), H, wp.data(), Cp, bp.data(), o, C, c0);
                        else
                            forward_rows<1>(R, hbuf.data(), H, wp.data(), Cp, bp.data(), o, C, c0);
                    }
                }
            }
        }
    }
}

// One row, hidden units k0 .. k0 + 8 KV: dh = dout_row @ w^T (wT [C, H]), then
// the recomputed h (kept for grad_w) and dpre = dh * silu'(pre), added into
// grad_g's row (assigned for the first u) and into the block's grad_zp row.
template <int KV>
inline void backward_chunk(const float *grow, const float *z, const float *wT, int64_t H,
                           int64_t C, const float *drow, int64_t k0, float *hrow, float *gg,
                           bool first_u, float *pz) {
    __m256 dh[KV];
    for (int j = 0; j < KV; ++j) dh[j] = _mm256_setzero_ps();
    if (gg || pz) {
        for (int64_t c = 0; c < C; ++c) {
            const __m256 d = _mm256_broadcast_ss(drow + c);
            for (int j = 0; j < KV; ++j)
                dh[j] = _mm256_fmadd_ps(d, _mm256_loadu_ps(wT + c * H + k0 + 8 * j), dh[j]);
        }
    }
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < KV; ++j) {
        const int64_t k = k0 + 8 * j;
        __m256 h, s;
        silu8(_mm256_add_ps(_mm256_loadu_ps(grow + k), _mm256_loadu_ps(z + k)), h, s);
        _mm256_storeu_ps(hrow + k, h);
        // silu'(x) = s + x s (1 - s) = s + h (1 - s)
        const __m256 dp = _mm256_mul_ps(dh[j], _mm256_fmadd_ps(h, _mm256_sub_ps(one, s), s));
        if (gg) _mm256_storeu_ps(gg + k, first_u ? dp : _mm256_add_ps(_mm256_loadu_ps(gg + k), dp));
        if (pz) _mm256_storeu_ps(pz + k, _mm256_add_ps(_mm256_loadu_ps(pz + k), dp));
    }
}

// pw[k0 .. k0+4, c0 .. c0+8 CV] += h[0:S, k0 .. k0+4]^T @ d[0:S, c0 ..], rows in order.
template <int CV>
inline void grad_w_tile(const float *h, const float *d, int64_t S, int64_t H, int64_t Cp,
                        int64_t k0, int64_t c0, float *pw) {
    __m256 acc[4][CV];
    for (int kk = 0; kk < 4; ++kk)
        for (int j = 0; j < CV; ++j) acc[kk][j] = _mm256_setzero_ps();
    for (int64_t r = 0; r < S; ++r) {
        __m256 dv[CV];
        for (int j = 0; j < CV; ++j) dv[j] = _mm256_loadu_ps(d + r * Cp + c0 + 8 * j);
        for (int kk = 0; kk < 4; ++kk) {
            const __m256 hb = _mm256_broadcast_ss(h + r * H + k0 + kk);
            for (int j = 0; j < CV; ++j) acc[kk][j] = _mm256_fmadd_ps(hb, dv[j], acc[kk][j]);
        }
    }
    for (int kk = 0; kk < 4; ++kk)
        for (int j = 0; j < CV; ++j) {
            float *p = pw + (k0 + kk) * Cp + c0 + 8 * j;
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc[kk][j]));
        }
}

// Outputs may be null (gradient not needed). gzp / gw / gb get the block
// partials' sum; partials are [nblk][H * Cp + U * H + Cp].
void backward_avx2(const float *g, const float *zp, const float *w, const float *dout,
                   int64_t n, int64_t U, int64_t H, int64_t C, int nt, float *gg, float *gzp,
                   float *gw, float *gb) {
    const int64_t Cp = (C + 7) / 8 * 8;
    std::vector<float> wT(C * H);
    for (int64_t k = 0; k < H; ++k)
        for (int64_t c = 0; c < C; ++c) wT[c * H + k] = w[k * C + c];
    const int64_t nblk = (n + kBlock - 1) / kBlock;
    const int64_t PW = H * Cp, PZ = U * H, PB = Cp, stride = PW + PZ + PB;
    std::vector<float> parts(nblk * stride, 0.0f);
    const bool need_h = gw != nullptr, need_d = gw != nullptr || gb != nullptr;
#pragma omp parallel num_threads(team_size(nt, U * n, kGrainRows))
    {
        std::vector<float> hbuf(kSub * H), dbuf(kSub * Cp, 0.0f);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            float *pw = parts.data() + blk * stride, *pzu = pw + PW, *pb = pzu + PZ;
            const int64_t i_end = std::min(n, (blk + 1) * kBlock);
            for (int64_t u = 0; u < U; ++u) {
                const float *z = zp + u * H;
                for (int64_t s0 = blk * kBlock; s0 < i_end; s0 += kSub) {
                    const int64_t S = std::min(kSub, i_end - s0);
                    for (int64_t r = 0; r < S; ++r) {
                        const int64_t i = s0 + r;
                        const float *drow = dout + (u * n + i) * C;
                        if (need_d) std::copy(drow, drow + C, dbuf.data() + r * Cp); // pad stays 0
                        if (!gg && !gzp && !need_h) continue;
                        float *ggr = gg ? gg + i * H : nullptr, *pz = gzp ? pzu + u * H : nullptr;
                        float *hr = hbuf.data() + r * H;
                        for (int64_t k0 = 0; k0 < H; k0 += 32) {
#define PERSE_CHUNK(KV) backward_chunk<KV>(g + i * H, z, wT.data(), H, C, drow, k0, hr, ggr, u == 0, pz)
                            switch (std::min<int64_t>(4, (H - k0) / 8)) {
                            case 4: PERSE_CHUNK(4); break;
                            case 3: PERSE_CHUNK(3); break;
                            case 2: PERSE_CHUNK(2); break;
                            default: PERSE_CHUNK(1); break;
                            }
#undef PERSE_CHUNK
                        }
                    }
                    if (gw) {
                        for (int64_t k0 = 0; k0 < H; k0 += 4)
                            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                                if (C - c0 > 8)
                                    grad_w_tile<2>(hbuf.data(), dbuf.data(), S, H, Cp, k0, c0, pw);
                                else
                                    grad_w_tile<1>(hbuf.data(), dbuf.data(), S, H, Cp, k0, c0, pw);
                            }
                    }
                    if (gb) {
                        for (int64_t r = 0; r < S; ++r)
                            for (int64_t c = 0; c < Cp; c += 8)
                                _mm256_storeu_ps(pb + c, _mm256_add_ps(_mm256_loadu_ps(pb + c),
                                                                        _mm256_loadu_ps(dbuf.data() + r * Cp + c)));
                    }
                }
            }
        }
    }
    // Block partials summed in block order (elementwise, so vectorizing it keeps the order).
    std::vector<float> sum(stride, 0.0f);
    for (int64_t blk = 0; blk < nblk; ++blk) {
        const float *p = parts.data() + blk * stride;
        for (int64_t e = 0; e < stride; ++e) sum[e] += p[e];
    }
    if (gw)
        for (int64_t k = 0; k < H; ++k)
            for (int64_t c = 0; c < C; ++c) gw[k * C + c] = sum[k * Cp + c];
    if (gzp) std::copy(sum.begin() + PW, sum.begin() + PW + PZ, gzp);
    if (gb) std::copy(sum.begin() + PW + PZ, sum.begin() + PW + PZ + C, gb);
}

// ---------------------------------------------------------------------------
// Scalar path: double, or float with H not a multiple of 8. Same blocks, same
// reduction order; plain loops.
// ---------------------------------------------------------------------------

template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
void forward_scalar(const T *g, const T *zp, const T *w, const T *b, T *out, int64_t n,
                    int64_t U, int64_t H, int64_t C, int nt) {
    const int64_t nblk = (n + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(team_size(nt, U * n, kGrainRows))
    {
        std::vector<T> h(H);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t i_end = std::min(n, (blk + 1) * kBlock);
            for (int64_t u = 0; u < U; ++u)
                for (int64_t i = blk * kBlock; i < i_end; ++i) {
                    for (int64_t k = 0; k < H; ++k) {
                        const T x = g[i * H + k] + zp[u * H + k];
                        h[k] = x * sigmoid(x);
                    }
                    T *o = out + (u * n + i) * C;
                    for (int64_t c = 0; c < C; ++c) {
                        T acc = 0;
                        for (int64_t k = 0; k < H; ++k) acc += h[k] * w[k * C + c];
                        o[c] = acc + b[c];
                    }
                }
        }
    }
}

template <typename T>
void backward_scalar(const T *g, const T *zp, const T *w, const T *dout, int64_t n, int64_t U,
                     int64_t H, int64_t C, int nt, T *gg, T *gzp, T *gw, T *gb) {
    const int64_t nblk = (n + kBlock - 1) / kBlock;
    const int64_t PW = H * C, PZ = U * H, stride = PW + PZ + C;
    std::vector<T> parts(nblk * stride, T(0));
#pragma omp parallel num_threads(team_size(nt, U * n, kGrainRows))
    {
        std::vector<T> h(H);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            T *pw = parts.data() + blk * stride, *pz = pw + PW, *pb = pz + PZ;
            const int64_t i_end = std::min(n, (blk + 1) * kBlock);
            for (int64_t u = 0; u < U; ++u)
                for (int64_t i = blk * kBlock; i < i_end; ++i) {
                    const T *d = dout + (u * n + i) * C;
                    for (int64_t k = 0; k < H; ++k) {
                        const T x = g[i * H + k] + zp[u * H + k];
                        const T s = sigmoid(x);
                        h[k] = x * s;
                        if (!gg && !gzp) continue;
                        T dh = 0;
                        for (int64_t c = 0; c < C; ++c) dh += d[c] * w[k * C + c];
                        const T dp = dh * (s + h[k] * (T(1) - s));
                        if (gg) gg[i * H + k] = u == 0 ? dp : gg[i * H + k] + dp;
                        if (gzp) pz[u * H + k] += dp;
                    }
                    if (gw)
                        for (int64_t k = 0; k < H; ++k)
                            for (int64_t c = 0; c < C; ++c) pw[k * C + c] += h[k] * d[c];
                    if (gb)
                        for (int64_t c = 0; c < C; ++c) pb[c] += d[c];
                }
        }
    }
    std::vector<T> sum(stride, T(0));
    for (int64_t blk = 0; blk < nblk; ++blk)
        for (int64_t e = 0; e < stride; ++e) sum[e] += parts[blk * stride + e];
    if (gw) std::copy(sum.begin(), sum.begin() + PW, gw);
    if (gzp) std::copy(sum.begin() + PW, sum.begin() + PW + PZ, gzp);
    if (gb) std::copy(sum.begin() + PW + PZ, sum.end(), gb);
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

void check(const at::Tensor &t, const at::Tensor &like, int64_t dim, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "silu_mlp: ", name, " must be a CPU tensor");
    TORCH_CHECK(t.dim() == dim, "silu_mlp: ", name, " must have ", dim, " dimensions, got ", t.dim());
    TORCH_CHECK(t.is_contiguous(), "silu_mlp: ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "silu_mlp: ", name, " has dtype ",
                t.scalar_type(), ", expected ", like.scalar_type());
}

struct Dims {
    int64_t n, U, H, C;
};

Dims check_all(const at::Tensor &g, const at::Tensor &zp, const at::Tensor &w) {
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
                "silu_mlp: expected float32 or float64, got ", g.scalar_type());
    check(g, g, 2, "g");
    check(zp, g, 2, "zp");
    check(w, g, 2, "w");
    const Dims d{g.size(0), zp.size(0), g.size(1), w.size(1)};
    TORCH_CHECK(zp.size(1) == d.H && w.size(0) == d.H, "silu_mlp: g [n, H], zp [U, H] and w [H, C] "
                "disagree on H: ", g.sizes(), ", ", zp.sizes(), ", ", w.sizes());
    return d;
}

// The AVX2 path needs whole vectors along H; everything else is scalar.
bool use_avx2(const at::Tensor &g, int64_t H) { return g.scalar_type() == at::kFloat && H % 8 == 0; }

template <typename T> T *ptr_or_null(at::Tensor &t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// g [n, H], zp [U, H], w [H, C], b [C] -> out [U, n, C].
at::Tensor silu_mlp_forward(at::Tensor g, at::Tensor zp, at::Tensor w, at::Tensor b,
                            int64_t num_threads) {
    const Dims d = check_all(g, zp, w);
    check(b, g, 1, "b");
    TORCH_CHECK(b.size(0) == d.C, "silu_mlp: b must have ", d.C, " entries, got ", b.size(0));
    auto out = at::empty({d.U, d.n, d.C}, g.options());
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));
    if (use_avx2(g, d.H)) {
        forward_avx2(g.data_ptr<float>(), zp.data_ptr<float>(), w.data_ptr<float>(),
                     b.data_ptr<float>(), out.data_ptr<float>(), d.n, d.U, d.H, d.C, nt);
    } else if (g.scalar_type() == at::kFloat) {
        forward_scalar<float>(g.data_ptr<float>(), zp.data_ptr<float>(), w.data_ptr<float>(),
                              b.data_ptr<float>(), out.data_ptr<float>(), d.n, d.U, d.H, d.C, nt);
    } else {
        forward_scalar<double>(g.data_ptr<double>(), zp.data_ptr<double>(), w.data_ptr<double>(),
                               b.data_ptr<double>(), out.data_ptr<double>(), d.n, d.U, d.H, d.C, nt);
    }
    return out;
}

// -> [grad_g, grad_zp, grad_w, grad_b]; a gradient whose need_* flag is false is None.
std::vector<at::Tensor> silu_mlp_backward(at::Tensor g, at::Tensor zp, at::Tensor w,
                                          at::Tensor grad_out, bool need_g, bool need_zp,
                                          bool need_w, bool need_b, int64_t num_threads) {
    const Dims d = check_all(g, zp, w);
    check(grad_out, g, 3, "grad_out");
    TORCH_CHECK(grad_out.size(0) == d.U && grad_out.size(1) == d.n && grad_out.size(2) == d.C,
                "silu_mlp: grad_out must be [", d.U, ", ", d.n, ", ", d.C, "], got ", grad_out.sizes());
    const auto opt = g.options();
    // grad_g is written row by row (assigned at u = 0): zero-filled only when there is no u.
    at::Tensor gg = need_g ? (d.U == 0 ? at::zeros({d.n, d.H}, opt) : at::empty({d.n, d.H}, opt))
                           : at::Tensor();
    at::Tensor gzp = need_zp ? at::empty({d.U, d.H}, opt) : at::Tensor();
    at::Tensor gw = need_w ? at::empty({d.H, d.C}, opt) : at::Tensor();
    at::Tensor gb = need_b ? at::empty({d.C}, opt) : at::Tensor();
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));
    if (use_avx2(g, d.H)) {
        backward_avx2(g.data_ptr<float>(), zp.data_ptr<float>(), w.data_ptr<float>(),
                      grad_out.data_ptr<float>(), d.n, d.U, d.H, d.C, nt, ptr_or_null<float>(gg),
                      ptr_or_null<float>(gzp), ptr_or_null<float>(gw), ptr_or_null<float>(gb));
    } else if (g.scalar_type() == at::kFloat) {
        backward_scalar<float>(g.data_ptr<float>(), zp.data_ptr<float>(), w.data_ptr<float>(),
                               grad_out.data_ptr<float>(), d.n, d.U, d.H, d.C, nt,
                               ptr_or_null<float>(gg), ptr_or_null<float>(gzp),
                               ptr_or_null<float>(gw), ptr_or_null<float>(gb));
    } else {
        backward_scalar<double>(g.data_ptr<double>(), zp.data_ptr<double>(), w.data_ptr<double>(),
                                grad_out.data_ptr<double>(), d.n, d.U, d.H, d.C, nt,
                                ptr_or_null<double>(gg), ptr_or_null<double>(gzp),
                                ptr_or_null<double>(gw), ptr_or_null<double>(gb));
    }
    return {gg, gzp, gw, gb};
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("silu_mlp_forward", &silu_mlp_forward, "silu(g + zp) @ w + b, fused (CPU)");
    m.def("silu_mlp_backward", &silu_mlp_backward, "gradients of silu_mlp_forward (CPU)");
}
