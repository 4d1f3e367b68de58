// Fused composition of the avatar decoder's parts (perse_ray/avatar/model.py,
// AvatarModel.gaussians with attribute_composition "union" or "owned" and
// color_dominance 0), forward and backward.
//
// Per Gaussian n and frame b, with e = expression[b, n] and p_a =
// attributes[a, b, n] (14 channels: 0:3 mean, 3:7 quat, 7:10 scale,
// 10 opacity, 11:14 colour):
//
//   l       = opacity_logits[n] + uo e[10],          d_a = uo p_a[10]
//   keep    = sum_a [ls(l + lower_a) - ls(l)],       lower_a = d_a if d_a <= 0 else 0
//   clear_a = ls(-l - raise_a) - ls(-l),             raise_a = d_a - lower_a
//   opacity = 1 - (1 - sigmoid(l) exp(keep)) exp(sum_a clear_a)
//   owned:  source = sigmoid(l) exp(keep), add_a = -expm1(clear_a),
//           total = source + sum_a add_a,
//           w_a = (source + add_a) / total if total > FLT_MIN (DBL_MIN) else 1
//   union:  w_a = 1
//   delta[c]  = e[c] + sum_a w_a p_a[c]                                  c < 10
//   colour[k] = sigmoid((color_logits[n, k] + uc e[11 + k]) + sum_a uc (w_a p_a[11 + k]))
//
// with ls = log sigmoid; sums run over a in order, as torch's code does, so an
// attribute whose outputs are exactly zero (one added later, at its source)
// changes no bit of any output wherever it sits in the order. Only one of
// lower_a, raise_a is nonzero, and the other side's term is exactly 0 in torch
// too (ls(x) - ls(x)), so it is not computed. At d_a == 0 exactly the gradient
// takes the lowering side, as torch.where(delta <= 0, ...) gives it.
//
// Layout of the work: Gaussians are cut into blocks of kBlock, shared out over
// OpenMP threads; within a block, per frame, tiles of 8 Gaussians (float,
// AVX2: one Gaussian per lane, channel 10 gathered from the rows) compute the
// opacity terms and the shares, then each row adds its parts' geometry and
// colour channels. double (for gradcheck) runs the same code one Gaussian at a
// time on std:: functions. The backward recomputes the terms with the same code
// (the same bits as the forward) and takes the colour from the forward's
// output. Every Gaussian is handled by one thread, which adds its gradient over
// the frames in frame order: the same bits for any thread count.

// Lighter than <torch/extension.h>, which triples the first build time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "exp_avx2.h"

namespace {

// Threads for `work` rows, at most one per `grain`: forking for a fraction of
// a millisecond costs more than it saves (as in the rasterizer).
inline int team_size(int max_threads, int64_t work, int64_t grain) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, work / grain)));
}
constexpr int64_t kGrainRows = 2048; // (b, n) rows per thread, ~0.1 ms of work at A = 3
constexpr int64_t kBlock = 256;      // Gaussians per work item
constexpr int kC = 14;               // channels per part
constexpr int kGeometry = 10;        // channels 0:10: mean, quat, scale
constexpr int kOpacity = 10;
constexpr int kColour = 11;

// ---------------------------------------------------------------------------
// Lanes: the per-Gaussian terms run on L Gaussians at once, V holding one
// value per lane and M a per-lane condition. float: L = 8 (AVX2), double
// (gradcheck): L = 1, plain scalars and std:: functions.
// ---------------------------------------------------------------------------

struct F8 {
    __m256 v;
    F8() = default;
    F8(__m256 x) : v(x) {}
    F8(float x) : v(_mm256_set1_ps(x)) {}
};
struct M8 {
    __m256 v; // all bits set in the lanes where it holds
};

inline F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
inline F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
inline F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
inline F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
inline F8 operator-(F8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline M8 operator<=(F8 a, F8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline M8 operator>=(F8 a, F8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline M8 operator>(F8 a, F8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline M8 operator<(F8 a, F8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline F8 select(M8 m, F8 a, F8 b) { return _mm256_blendv_ps(b.v, a.v, m.v); }
inline F8 vmin(F8 a, F8 b) { return _mm256_min_ps(a.v, b.v); }
inline F8 vabs(F8 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
inline M8 no_lanes(F8) { return {_mm256_setzero_ps()}; }

inline F8 vexp(F8 xv) { return exp_avx2(xv.v); }

// log(1 + y) for y in [0, 1] (here y = e^-|x|): 2 atanh(s) with s = y / (2 + y)
// <= 1/3, by its series up to s^15 (truncation below 2e-9 relative); ~3 ulp.
inline F8 vlog1p(F8 yv) {
    const __m256 s = _mm256_div_ps(yv.v, _mm256_add_ps(_mm256_set1_ps(2.0f), yv.v));
    const __m256 s2 = _mm256_mul_ps(s, s);
    __m256 p = _mm256_set1_ps(1.0f / 15.0f);
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 13.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 11.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 9.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 7.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}

// e^x - 1: its Taylor series up to x^9 where |x| < 0.5 (exactly 0 at 0), else e^x - 1.
inline F8 vexpm1(F8 xv) {
    const __m256 x = xv.v;
    __m256 p = _mm256_set1_ps(1.0f / 362880.0f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 40320.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 5040.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(0.5f));
    p = _mm256_mul_ps(_mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f)), x);
    const __m256 big = _mm256_sub_ps(vexp(xv).v, _mm256_set1_ps(1.0f));
    return _mm256_blendv_ps(big, p, _mm256_cmp_ps(vabs(xv).v, _mm256_set1_ps(0.5f), _CMP_LT_OQ));
}

inline double select(bool m, double a, double b) { return m ? a : b; }
inline double vmin(double a, double b) { return std::min(a, b); }
inline double vabs(double a) { return std::abs(a); }
inline double vexp(double x) { return std::exp(x); }
inline double vlog1p(double x) { return std::log1p(x); }
inline double vexpm1(double x) { return std::expm1(x); }
inline bool no_lanes(double) { return false; }

template <typename T> struct Lanes;
template <> struct Lanes<float> {
    using V = F8;
    using M = M8;
    static constexpr int L = 8;
    // the first `lanes` lanes set
    static __m256i first(int lanes) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    // p[0 .. lanes), the others 0
    static V load(const float *p, int lanes) { return _mm256_maskload_ps(p, first(lanes)); }
    // p[0], p[kC], p[2 kC], ... (one channel of consecutive rows), the others 0
    static V load_rows(const float *p, int lanes) {
        const __m256i index = _mm256_setr_epi32(0, kC, 2 * kC, 3 * kC, 4 * kC, 5 * kC, 6 * kC, 7 * kC);
        return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, index, _mm256_castsi256_ps(first(lanes)), 4);
    }
    static void store(float *p, V v, int lanes) { _mm256_maskstore_ps(p, first(lanes), v.v); }
    static void put(float *p, V v) { _mm256_storeu_ps(p, v.v); }
    static V get(const float *p) { return _mm256_loadu_ps(p); }
};
template <> struct Lanes<double> {
    using V = double;
    using M = bool;
    static constexpr int L = 1;
    static V load(const double *p, int) { return *p; }
    static V load_rows(const double *p, int) { return *p; }
    static void store(double *p, V v, int) { *p = v; }
    static void put(double *p, V v) { *p = v; }
    static V get(const double *p) { return *p; }
};

template <typename V> struct LogSigmoid {
    V value; // log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), as torch computes it
    V slope; // its derivative sigmoid(-x)
};

// Not inlined: one compiled copy, so log sigmoid of equal inputs has equal bits
// wherever it is called (keep's terms ls(l + 0) - ls(l) are exactly 0).
template <typename V> [[gnu::noinline]] LogSigmoid<V> log_sigmoid(V x) {
    const V e = vexp(-vabs(x));
    return {vmin(x, V(0)) - vlog1p(e), select(x >= V(0), e, V(1)) / (V(1) + e)};
}

template <typename V> inline V sigmoid(V x) { return V(1) / (V(1) + vexp(-x)); }

// The composition's terms of one tile of L Gaussians (one frame).
template <typename T> struct Terms {
    using V = typename Lanes<T>::V;
    using M = typename Lanes<T>::M;
    V s, K, E, source, total; // sigmoid(l), exp(keep), exp(sum clear), s K, source + sum add
    V ls_l_slope, ls_nl_slope; // sigmoid(-l), sigmoid(l)
    M shared;                  // owned and total > tiny: the shares carry a gradient
    // per attribute
    std::vector<M> lowering; // d_a <= 0
    std::vector<V> slope;    // the slope of its one log sigmoid term
    std::vector<V> clear, add, w;
    explicit Terms(int64_t A) : lowering(A), slope(A), clear(A), add(A), w(A) {}
};

// ol, e10: the canonical logit and the expression's channel 10; p10[a]: each attribute's.
template <typename T>
void compute_terms(typename Lanes<T>::V ol, typename Lanes<T>::V e10, const typename Lanes<T>::V *p10,
                   int64_t A, bool owned, T uo, Terms<T> &t) {
    using V = typename Lanes<T>::V;
    using M = typename Lanes<T>::M;
    const V l = ol + V(uo) * e10;
    const LogSigmoid<V> ls_l = log_sigmoid(l), ls_nl = log_sigmoid(-l);
    V keep(0), C(0);
    for (int64_t a = 0; a < A; ++a) {
        const V d = V(uo) * p10[a];
        // lowering: the clearing term is ls(-l - 0) - ls(-l) = 0; raising (or NaN): the keeping
        // term ls(l + 0) - ls(l) = 0. Only the other one is computed.
        const M low = d <= V(0);
        const LogSigmoid<V> ls = log_sigmoid(select(low, l + d, -l - d));
        keep = keep + select(low, ls.value - ls_l.value, V(0));
        t.clear[a] = select(low, V(0), ls.value - ls_nl.value);
        C = C + t.clear[a];
        t.lowering[a] = low, t.slope[a] = ls.slope;
    }
    t.s = sigmoid(l);
    t.K = vexp(keep);
    t.E = vexp(C);
    t.source = t.s * t.K;
    t.ls_l_slope = ls_l.slope, t.ls_nl_slope = ls_nl.slope;
    t.shared = no_lanes(l);
    if (owned) {
        V total = t.source;
        for (int64_t a = 0; a < A; ++a) {
            t.add[a] = -vexpm1(t.clear[a]);
            total = total + t.add[a];
        }
        t.total = total;
        t.shared = total > V(std::numeric_limits<T>::min()); // torch.finfo(dtype).tiny
        for (int64_t a = 0; a < A; ++a) t.w[a] = select(t.shared, (t.source + t.add[a]) / total, V(1));
    } else {
        for (int64_t a = 0; a < A; ++a) t.w[a] = V(1);
    }
}

struct Dims {
    int64_t A, B, N;
};

// Per-thread scratch: the terms, channel 10 of the parts, the shares' gradients and per-row arrays.
template <typename T> struct Scratch {
    static constexpr int L = Lanes<T>::L;
    using V = typename Lanes<T>::V;
    Terms<T> t;
    std::vector<V> p10, gw;
    std::vector<T> w, buf; // w [A][L]; buf: the colour logits [3][L] or gradients [A + 1][L]
    std::vector<const T *> p;
    explicit Scratch(int64_t A) : t(A), p10(A), gw(A), w(A * L), buf((A + 4) * L), p(A) {}
};

// Loads one tile's channel 10 and computes its terms; also sets s.p (each part's row n0) and s.w.
template <typename T>
inline void tile_terms(const T *ol, const T *e, const T *p, Dims d, bool owned, T uo, int64_t b,
                       int64_t n0, int lanes, Scratch<T> &s) {
    using Ln = Lanes<T>;
    const int64_t row0 = b * d.N + n0;
    for (int64_t a = 0; a < d.A; ++a) {
        s.p[a] = p + (a * d.B * d.N + row0) * kC;
        s.p10[a] = Ln::load_rows(s.p[a] + kOpacity, lanes);
    }
    compute_terms<T>(Ln::load(ol + n0, lanes), Ln::load_rows(e + row0 * kC + kOpacity, lanes), s.p10.data(),
                     d.A, owned, uo, s.t);
    for (int64_t a = 0; a < d.A; ++a) Ln::put(s.w.data() + a * Ln::L, s.t.w[a]);
}

template <typename T>
void forward(const T *ol, const T *cl, const T *e, const T *p, Dims d, bool owned, T uo, T uc,
             T *mean, T *quat, T *scale, T *opacity, T *colour, int nt) {
    using Ln = Lanes<T>;
    using V = typename Ln::V;
    constexpr int L = Ln::L;
    const int64_t A = d.A, N = d.N, nblk = (N + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(team_size(nt, d.B * N, kGrainRows))
    {
        Scratch<T> s(A);
        T *z = s.buf.data(); // [3][L]
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t n_end = std::min(N, (blk + 1) * kBlock);
            for (int64_t b = 0; b < d.B; ++b)
                for (int64_t n0 = blk * kBlock; n0 < n_end; n0 += L) {
                    const int lanes = static_cast<int>(std::min<int64_t>(L, n_end - n0));
                    tile_terms(ol, e, p, d, owned, uo, b, n0, lanes, s);
                    const int64_t row0 = b * N + n0;
                    Ln::store(opacity + row0, V(1) - (V(1) - s.t.source) * s.t.E, lanes);
                    // per row: the geometry deltas and the colour logits
                    for (int i = 0; i < lanes; ++i) {
                        const int64_t row = row0 + i;
                        const T *er = e + row * kC;
                        T delta[kGeometry], change[3] = {0, 0, 0};
                        for (int c = 0; c < kGeometry; ++c) delta[c] = er[c];
                        for (int64_t a = 0; a < A; ++a) {
                            const T w = s.w[a * L + i], *pr = s.p[a] + i * kC;
                            for (int c = 0; c < kGeometry; ++c) delta[c] = delta[c] + w * pr[c];
                            for (int k = 0; k < 3; ++k) change[k] = change[k] + uc * (w * pr[kColour + k]);
                        }
                        for (int c = 0; c < 3; ++c) mean[row * 3 + c] = delta[c];
                        for (int c = 0; c < 4; ++c) quat[row * 4 + c] = delta[3 + c];
                        for (int c = 0; c < 3; ++c) scale[row * 3 + c] = delta[7 + c];
                        for (int k = 0; k < 3; ++k)
                            z[k * L + i] = (cl[(n0 + i) * 3 + k] + uc * er[kColour + k]) + change[k];
                    }
                    for (int k = 0; k < 3; ++k) Ln::put(z + k * L, sigmoid(Ln::get(z + k * L)));
                    for (int i = 0; i < lanes; ++i)
                        for (int k = 0; k < 3; ++k) colour[(row0 + i) * 3 + k] = z[k * L + i];
                }
        }
    }
}

// Gradients; a null output is not needed. g_* are the outputs' gradients, colour the forward's.
template <typename T>
void backward(const T *ol, const T *e, const T *p, const T *colour, Dims d, bool owned, T uo, T uc,
              const T *g_mean, const T *g_quat, const T *g_scale, const T *g_opacity,
              const T *g_colour, T *gol, T *gcl, T *ge, T *gp, int nt) {
    using Ln = Lanes<T>;
    using V = typename Ln::V;
    constexpr int L = Ln::L;
    const int64_t A = d.A, N = d.N, nblk = (N + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(team_size(nt, d.B * N, kGrainRows))
    {
        Scratch<T> s(A);
        Terms<T> &t = s.t;
        T *gw = s.buf.data(), *g_d = gw; // [A][L]: the shares' gradients, then channel 10's
        T *g_l = gw + A * L;             // [L]
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t n0_blk = blk * kBlock, n_end = std::min(N, (blk + 1) * kBlock);
            if (d.B == 0) { // nothing to add up
                if (gol) std::fill(gol + n0_blk, gol + n_end, T(0));
                if (gcl) std::fill(gcl + n0_blk * 3, gcl + n_end * 3, T(0));
            }
            for (int64_t b = 0; b < d.B; ++b)
                for (int64_t n0 = n0_blk; n0 < n_end; n0 += L) {
                    const int lanes = static_cast<int>(std::min<int64_t>(L, n_end - n0));
                    tile_terms(ol, e, p, d, owned, uo, b, n0, lanes, s);
                    const int64_t row0 = b * N + n0;
                    // per row: the geometry and colour channels, and each share's gradient
                    for (int i = 0; i < lanes; ++i) {
                        const int64_t row = row0 + i, n = n0 + i;
                        T gd[kGeometry], gz[3], uz[3];
                        for (int c = 0; c < 3; ++c) gd[c] = g_mean[row * 3 + c];
                        for (int c = 0; c < 4; ++c) gd[3 + c] = g_quat[row * 4 + c];
                        for (int c = 0; c < 3; ++c) gd[7 + c] = g_scale[row * 3 + c];
                        for (int k = 0; k < 3; ++k) {
                            const T y = colour[row * 3 + k];
                            gz[k] = g_colour[row * 3 + k] * (T(1) - y) * y; // colour logit
                            uz[k] = uc * gz[k];                             // a part's colour channel, per share
                        }
                        for (int64_t a = 0; a < A; ++a) {
                            const T w = s.w[a * L + i], *pr = s.p[a] + i * kC;
                            if (owned) {
                                T g = 0;
                                for (int c = 0; c < kGeometry; ++c) g += gd[c] * pr[c];
                                for (int k = 0; k < 3; ++k) g += uz[k] * pr[kColour + k];
                                gw[a * L + i] = g;
                            }
                            if (gp) {
                                T *gr = gp + (a * d.B * N + row) * kC;
                                for (int c = 0; c < kGeometry; ++c) gr[c] = w * gd[c];
                                for (int k = 0; k < 3; ++k) gr[kColour + k] = w * uz[k];
                            }
                        }
                        if (ge) {
                            T *gr = ge + row * kC;
                            for (int c = 0; c < kGeometry; ++c) gr[c] = gd[c];
                            for (int k = 0; k < 3; ++k) gr[kColour + k] = uz[k];
                        }
                        if (gcl)
                            for (int k = 0; k < 3; ++k) gcl[n * 3 + k] = b == 0 ? gz[k] : gcl[n * 3 + k] + gz[k];
                    }
                    // per lane: opacity = 1 - (1 - source) E, E = exp(sum clear)
                    const V go = Ln::load(g_opacity + row0, lanes);
                    V g_source = go * t.E;
                    const V g_C = -go * (V(1) - t.source) * t.E;
                    if (owned) { // w_a = (source + add_a) / total where shared, else 1
                        const V inv = V(1) / t.total;
                        V g_total(0), g_shared(g_source);
                        for (int64_t a = 0; a < A; ++a) {
                            const V g = Ln::get(gw + a * L);
                            s.gw[a] = g * inv; // -> source + add_a
                            g_total = g_total - g * t.w[a] * inv;
                        }
                        g_shared = g_shared + g_total;
                        for (int64_t a = 0; a < A; ++a) {
                            g_shared = g_shared + s.gw[a];
                            s.gw[a] = select(t.shared, s.gw[a] + g_total, V(0)); // -> add_a
                        }
                        g_source = select(t.shared, g_shared, g_source);
                    }
                    // source = s K, K = exp(keep)
                    const V g_keep = g_source * t.s * t.K;
                    V gl = g_source * t.K * t.s * (V(1) - t.s);
                    for (int64_t a = 0; a < A; ++a) {
                        const V slope = t.slope[a];
                        // raising: clear = ls(-l - d) - ls(-l), add = -expm1(clear)
                        const V g_clear = owned ? g_C - s.gw[a] * vexp(t.clear[a]) : g_C;
                        // lowering: keep += ls(l + d) - ls(l)
                        gl = gl + select(t.lowering[a], g_keep * (slope - t.ls_l_slope),
                                         g_clear * (t.ls_nl_slope - slope));
                        Ln::put(g_d + a * L, V(uo) * select(t.lowering[a], g_keep * slope, -g_clear * slope));
                    }
                    Ln::put(g_l, gl);
                    for (int i = 0; i < lanes; ++i) {
                        const int64_t row = row0 + i;
                        if (gp)
                            for (int64_t a = 0; a < A; ++a) gp[(a * d.B * N + row) * kC + kOpacity] = g_d[a * L + i];
                        if (ge) ge[row * kC + kOpacity] = uo * g_l[i];
                    }
                    if (gol) Ln::store(gol + n0, b == 0 ? gl : Ln::load(gol + n0, lanes) + gl, lanes);
                }
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

void check(const at::Tensor &t, const at::Tensor &like, int64_t dim, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "compose_parts: ", name, " must be a CPU tensor");
    TORCH_CHECK(t.dim() == dim, "compose_parts: ", name, " must have ", dim, " dimensions, got ", t.dim());
    TORCH_CHECK(t.is_contiguous(), "compose_parts: ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "compose_parts: ", name, " has dtype ",
                t.scalar_type(), ", expected ", like.scalar_type());
}

void check_shape(const at::Tensor &t, at::IntArrayRef want, const char *name) {
    TORCH_CHECK(t.sizes() == want, "compose_parts: ", name, " must be ", want, ", got ", t.sizes());
}

// opacity_logits [N], color_logits [N, 3], expression [B, N, 14], attributes [A, B, N, 14].
Dims check_inputs(const at::Tensor &ol, const at::Tensor &cl, const at::Tensor &e,
                  const at::Tensor &p) {
    TORCH_CHECK(e.scalar_type() == at::kFloat || e.scalar_type() == at::kDouble,
                "compose_parts: expected float32 or float64, got ", e.scalar_type());
    check(ol, e, 1, "opacity_logits");
    check(cl, e, 2, "color_logits");
    check(e, e, 3, "expression");
    check(p, e, 4, "attributes");
    const Dims d{p.size(0), e.size(0), e.size(1)};
    check_shape(ol, {d.N}, "opacity_logits");
    check_shape(cl, {d.N, 3}, "color_logits");
    check_shape(e, {d.B, d.N, kC}, "expression");
    check_shape(p, {d.A, d.B, d.N, kC}, "attributes");
    return d;
}

template <typename T> const T *data(const at::Tensor &t) { return t.data_ptr<T>(); }
template <typename T> T *data_or_null(at::Tensor &t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// -> [d_mean [B, N, 3], d_quat [B, N, 4], d_scale [B, N, 3], opacity [B, N], colour [B, N, 3]]
std::vector<at::Tensor> compose_forward(at::Tensor ol, at::Tensor cl, at::Tensor e, at::Tensor p,
                                        bool owned, double opacity_unit, double color_unit,
                                        int64_t num_threads) {
    const Dims d = check_inputs(ol, cl, e, p);
    const auto opt = e.options();
    auto mean = at::empty({d.B, d.N, 3}, opt), quat = at::empty({d.B, d.N, 4}, opt),
         scale = at::empty({d.B, d.N, 3}, opt), opacity = at::empty({d.B, d.N}, opt),
         colour = at::empty({d.B, d.N, 3}, opt);
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));
    AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "compose_forward", [&] {
        forward<scalar_t>(data<scalar_t>(ol), data<scalar_t>(cl), data<scalar_t>(e), data<scalar_t>(p), d,
                          owned, static_cast<scalar_t>(opacity_unit), static_cast<scalar_t>(color_unit),
                          mean.data_ptr<scalar_t>(), quat.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                          opacity.data_ptr<scalar_t>(), colour.data_ptr<scalar_t>(), nt);
    });
    return {mean, quat, scale, opacity, colour};
}

// -> [grad_opacity_logits, grad_color_logits, grad_expression, grad_attributes]; a gradient
// whose need_* flag is false is None. `colour` is the forward's output.
std::vector<at::Tensor> compose_backward(at::Tensor ol, at::Tensor cl, at::Tensor e, at::Tensor p,
                                         at::Tensor colour, bool owned, double opacity_unit,
                                         double color_unit, at::Tensor g_mean, at::Tensor g_quat,
                                         at::Tensor g_scale, at::Tensor g_opacity, at::Tensor g_colour,
                                         bool need_ol, bool need_cl, bool need_e, bool need_p,
                                         int64_t num_threads) {
    const Dims d = check_inputs(ol, cl, e, p);
    check(colour, e, 3, "colour");
    check_shape(colour, {d.B, d.N, 3}, "colour");
    check(g_mean, e, 3, "grad d_mean");
    check_shape(g_mean, {d.B, d.N, 3}, "grad d_mean");
    check(g_quat, e, 3, "grad d_quat");
    check_shape(g_quat, {d.B, d.N, 4}, "grad d_quat");
    check(g_scale, e, 3, "grad d_scale");
    check_shape(g_scale, {d.B, d.N, 3}, "grad d_scale");
    check(g_opacity, e, 2, "grad opacity");
    check_shape(g_opacity, {d.B, d.N}, "grad opacity");
    check(g_colour, e, 3, "grad colour");
    check_shape(g_colour, {d.B, d.N, 3}, "grad colour");
    const auto opt = e.options();
    // every entry is written (the sums over frames zero-filled where there are none)
    at::Tensor gol = need_ol ? at::empty({d.N}, opt) : at::Tensor();
    at::Tensor gcl = need_cl ? at::empty({d.N, 3}, opt) : at::Tensor();
    at::Tensor ge = need_e ? at::empty({d.B, d.N, kC}, opt) : at::Tensor();
    at::Tensor gp = need_p ? at::empty({d.A, d.B, d.N, kC}, opt) : at::Tensor();
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));
    if (need_ol || need_cl || need_e || need_p) {
        AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "compose_backward", [&] {
            backward<scalar_t>(data<scalar_t>(ol), data<scalar_t>(e), data<scalar_t>(p), data<scalar_t>(colour),
                               d, owned, static_cast<scalar_t>(opacity_unit), static_cast<scalar_t>(color_unit),
                               data<scalar_t>(g_mean), data<scalar_t>(g_quat), data<scalar_t>(g_scale),
                               data<scalar_t>(g_opacity), data<scalar_t>(g_colour), data_or_null<scalar_t>(gol),
                               data_or_null<scalar_t>(gcl), data_or_null<scalar_t>(ge),
                               data_or_null<scalar_t>(gp), nt);
        });
    }
    return {gol, gcl, ge, gp};
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("compose_forward", &compose_forward, "union/owned composition of the decoder's parts (CPU)");
    m.def("compose_backward", &compose_backward, "gradients of compose_forward (CPU)");
}
