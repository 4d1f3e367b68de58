// Exact CPU Gaussian-splatting rasterizer (classic 3DGS, pinhole camera).
//
// Reproduces the per-pixel result of gsplat 1.5.3 `rasterization` (non-packed,
// classic mode): EWA projection with the FOV-clamped Jacobian, eps2d blur,
// opacity-aware radii, 16x16 tile binning by the radius box, depth-ordered
// front-to-back compositing with the 1/255 alpha cut, 0.999 alpha clamp and the
// 1e-4 transmittance stop. Constants and rules follow gsplat's
// cuda/include/Utils.cuh, cuda/csrc/ProjectionEWA3DGSFused.cu,
// IntersectTile.cu and RasterizeToPixels3DGS{Fwd,Bwd}.cu.
//
// Layout of the work:
//   projection   parallel over (camera, Gaussian)
//   binning      per camera: sort visible Gaussians by (depth, index), then a
//                counting sort into tiles, so every tile list is depth ordered
//   rasterizing  parallel over (camera, tile). Inside a tile the loop runs over
//                Gaussians (outer) and 8-pixel row segments (inner, AVX2), with
//                per-pixel state kept in small L1-resident arrays. Each Gaussian
//                only visits the rows/segments where its alpha can reach 1/255.
//   backward     same tile walk back to front (as gsplat's backward kernel),
//                gradients summed per (tile, Gaussian) into a per-intersection
//                buffer (no races, deterministic), then reduced per Gaussian and
//                pushed through a hand-written projection VJP.
// float uses AVX2 (8 pixels per step); double uses the same code with 1 lane.

// Lighter than <torch/extension.h>, which triples the first build time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kTile = 16;
constexpr int kTilePix = kTile * kTile;

// Threads for a loop of `work` items, at most one per `grain` items: forking
// for a fraction of a millisecond of work costs more than it saves, and on a
// busy machine every barrier waits for a descheduled peer.
inline int team_size(int max_threads, int64_t work, int64_t grain) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, work / grain)));
}
constexpr int64_t kGrainGaussians = 4096; // projections per thread
constexpr int64_t kGrainIsects = 4096;    // tile-Gaussian pairs per thread

// Compositing thresholds of gsplat 1.5.3.
template <typename T> struct Thresholds {
    static constexpr T alpha_min = T(1) / T(255);
    static constexpr T alpha_max = T(0.999);
    static constexpr T trans_min = T(1e-4);
    static constexpr T extend_max = T(3.33);
};

// ---------------------------------------------------------------------------
// SIMD abstraction: Simd<float> = 8 AVX2 lanes, Simd<double> = 1 scalar lane.
// Masks are kept as values of the lane type (all-ones bits or 0) so they can be
// stored in the same per-pixel arrays.
// ---------------------------------------------------------------------------
template <typename T> struct Simd;

template <> struct Simd<float> {
    static constexpr int W = 8;
    using V = __m256;
    using M = __m256;

    static V set1(float a) { return _mm256_set1_ps(a); }
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float *p) { return _mm256_loadu_ps(p); }
    static void store(float *p, V v) { _mm256_storeu_ps(p, v); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V min(V a, V b) { return _mm256_min_ps(a, b); }
    static M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
    static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
    static M mand(M a, M b) { return _mm256_and_ps(a, b); }
    static M mandnot(M a, M b) { return _mm256_andnot_ps(b, a); } // a & ~b
    static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
    static int count(M m) { return __builtin_popcount(_mm256_movemask_ps(m)); }
    static V select(M m, V a) { return _mm256_and_ps(m, a); } // m ? a : 0
    static V blend(V a, V b, M m) { return _mm256_blendv_ps(a, b, m); } // m ? b : a
    static M load_mask(const float *p) { return _mm256_loadu_ps(p); }
    static void store_mask(float *p, M m) { _mm256_storeu_ps(p, m); }
    static float lane_mask(bool b) {
        const uint32_t bits = b ? 0xffffffffu : 0u;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        return f;
    }
    static V iota() { return _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f); }
    // lanes whose stored index is >= k
    static M index_ge(const int32_t *p, int32_t k) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
        return _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(k - 1)));
    }
    static void store_index(int32_t *p, M m, int32_t k) {
        _mm256_maskstore_epi32(p, _mm256_castps_si256(m), _mm256_set1_epi32(k));
    }
    static float hsum(V v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    // Cephes-style expf (range reduction by ln 2, degree-5 polynomial), ~1 ulp.
    // The compiler does not vectorize std::exp, and this loop is the hot path.
    static V exp(V x) {
        x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
        x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
        V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
        x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
        V y = _mm256_set1_ps(1.9875691500e-4f);
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
        __m256i e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    }
};

template <> struct Simd<double> {
    static constexpr int W = 1;
    using V = double;
    using M = bool;

    static V set1(double a) { return a; }
    static V zero() { return 0.0; }
    static V load(const double *p) { return *p; }
    static void store(double *p, V v) { *p = v; }
    static V add(V a, V b) { return a + b; }
    static V sub(V a, V b) { return a - b; }
    static V mul(V a, V b) { return a * b; }
    static V div(V a, V b) { return a / b; }
    static V fmadd(V a, V b, V c) { return a * b + c; }
    static V min(V a, V b) { return a < b ? a : b; }
    static M le(V a, V b) { return a <= b; }
    static M ge(V a, V b) { return a >= b; }
    static M mand(M a, M b) { return a && b; }
    static M mandnot(M a, M b) { return a && !b; }
    static bool any(M m) { return m; }
    static int count(M m) { return m ? 1 : 0; }
    static V select(M m, V a) { return m ? a : 0.0; }
    static V blend(V a, V b, M m) { return m ? b : a; }
    static M load_mask(const double *p) { return *p != 0.0; }
    static void store_mask(double *p, M m) { *p = m ? 1.0 : 0.0; }
    static double lane_mask(bool b) { return b ? 1.0 : 0.0; }
    static V iota() { return 0.0; }
    static M index_ge(const int32_t *p, int32_t k) { return *p >= k; }
    static void store_index(int32_t *p, M m, int32_t k) {
        if (m) *p = k;
    }
    static double hsum(V v) { return v; }
    static V exp(V x) { return std::exp(x); }
};

// ---------------------------------------------------------------------------
// Projection (gsplat 1.5.3 ProjectionEWA3DGSFused + persp_proj), one Gaussian
// in one camera. All intermediates are kept for the VJP.
// ---------------------------------------------------------------------------
template <typename T> struct Camera {
    T W[9]; // world-to-camera rotation part, row major
    T t[3];
    T fx, fy, cx, cy;
    T lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
};

template <typename T>
Camera<T> make_camera(const T *viewmat, const T *K, int width, int height) {
    Camera<T> c;
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) c.W[3 * i + j] = viewmat[4 * i + j];
        c.t[i] = viewmat[4 * i + 3];
    }
    c.fx = K[0];
    c.fy = K[4];
    c.cx = K[2];
    c.cy = K[5];
    // The Jacobian is evaluated at x/z, y/z clamped to 30% beyond the image
    // borders, which keeps it bounded for Gaussians far outside the view.
    const T tan_fovx = T(0.5) * T(width) / c.fx;
    const T tan_fovy = T(0.5) * T(height) / c.fy;
    c.lim_x_pos = (T(width) - c.cx) / c.fx + T(0.3) * tan_fovx;
    c.lim_x_neg = c.cx / c.fx + T(0.3) * tan_fovx;
    c.lim_y_pos = (T(height) - c.cy) / c.fy + T(0.3) * tan_fovy;
    c.lim_y_neg = c.cy / c.fy + T(0.3) * tan_fovy;
    return c;
}

template <typename T> struct Proj {
    T qn[4];   // normalised quaternion (w, x, y, z)
    T inv_qnorm;
    T R[9];    // rotation of the Gaussian
    T M[9];    // R * diag(scale)
    T Sig[9];  // world covariance M M^T
    T mc[3];   // camera-space mean
    T Sc[9];   // camera-space covariance W Sig W^T
    T J[6];    // 2x3 projection Jacobian
    T cov[3];  // blurred 2D covariance (xx, xy, yy)
    T tx, ty;  // clamped x, y used in J
    bool clamp_x, clamp_y;
    T mean2d[2];
    T conic[3];
};

// Mean, blurred 2D covariance and conic. Returns false when culled by depth or
// a non-positive determinant.
template <typename T>
bool project(const T *p, const T *q, const T *s, const Camera<T> &cam, T near_plane,
             T far_plane, T eps2d, Proj<T> &o) {
    const T *W = cam.W;
    for (int i = 0; i < 3; ++i)
        o.mc[i] = W[3 * i] * p[0] + W[3 * i + 1] * p[1] + W[3 * i + 2] * p[2] + cam.t[i];
    const T x = o.mc[0], y = o.mc[1], z = o.mc[2];
    if (!(z >= near_plane && z <= far_plane)) return false;

    o.inv_qnorm = T(1) / std::sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    for (int i = 0; i < 4; ++i) o.qn[i] = q[i] * o.inv_qnorm;
    const T qw = o.qn[0], qx = o.qn[1], qy = o.qn[2], qz = o.qn[3];
    T *R = o.R;
    R[0] = T(1) - T(2) * (qy * qy + qz * qz);
    R[1] = T(2) * (qx * qy - qw * qz);
    R[2] = T(2) * (qx * qz + qw * qy);
    R[3] = T(2) * (qx * qy + qw * qz);
    R[4] = T(1) - T(2) * (qx * qx + qz * qz);
    R[5] = T(2) * (qy * qz - qw * qx);
    R[6] = T(2) * (qx * qz - qw * qy);
    R[7] = T(2) * (qy * qz + qw * qx);
    R[8] = T(1) - T(2) * (qx * qx + qy * qy);
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) o.M[3 * i + j] = R[3 * i + j] * s[j];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            o.Sig[3 * i + j] = o.M[3 * i] * o.M[3 * j] + o.M[3 * i + 1] * o.M[3 * j + 1] +
                               o.M[3 * i + 2] * o.M[3 * j + 2];
    T WS[9];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            WS[3 * i + j] = W[3 * i] * o.Sig[j] + W[3 * i + 1] * o.Sig[3 + j] +
                            W[3 * i + 2] * o.Sig[6 + j];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            o.Sc[3 * i + j] = WS[3 * i] * W[3 * j] + WS[3 * i + 1] * W[3 * j + 1] +
                              WS[3 * i + 2] * W[3 * j + 2];

    const T rz = T(1) / z, rz2 = rz * rz;
    const T u = x * rz, v = y * rz;
    o.clamp_x = !(u <= cam.lim_x_pos && u >= -cam.lim_x_neg);
    o.clamp_y = !(v <= cam.lim_y_pos && v >= -cam.lim_y_neg);
    o.tx = z * std::min(cam.lim_x_pos, std::max(-cam.lim_x_neg, u));
    o.ty = z * std::min(cam.lim_y_pos, std::max(-cam.lim_y_neg, v));
    T *J = o.J;
    J[0] = cam.fx * rz;
    J[1] = T(0);
    J[2] = -cam.fx * o.tx * rz2;
    J[3] = T(0);
    J[4] = cam.fy * rz;
    J[5] = -cam.fy * o.ty * rz2;
    T JS[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            JS[3 * i + j] = J[3 * i] * o.Sc[j] + J[3 * i + 1] * o.Sc[3 + j] +
                            J[3 * i + 2] * o.Sc[6 + j];
    o.cov[0] = JS[0] * J[0] + JS[1] * J[1] + JS[2] * J[2] + eps2d;
    o.cov[1] = JS[0] * J[3] + JS[1] * J[4] + JS[2] * J[5];
    o.cov[2] = JS[3] * J[3] + JS[4] * J[4] + JS[5] * J[5] + eps2d;
    o.mean2d[0] = cam.fx * x * rz + cam.cx;
    o.mean2d[1] = cam.fy * y * rz + cam.cy;

    const T det = o.cov[0] * o.cov[2] - o.cov[1] * o.cov[1];
    if (!(det > T(0))) return false;
    const T inv_det = T(1) / det;
    o.conic[0] = o.cov[2] * inv_det;
    o.conic[1] = -o.cov[1] * inv_det;
    o.conic[2] = o.cov[0] * inv_det;
    return true;
}

// Radius box of a projected Gaussian. Returns false when gsplat culls it
// (too transparent, zero radius, or entirely outside the image).
template <typename T>
bool screen_radius(const Proj<T> &o, T opacity, int width, int height, int32_t radius[2]) {
    // Opacity-aware box: alpha < 1/255 beyond extend * sigma on each axis.
    if (!(opacity >= Thresholds<T>::alpha_min)) return false;
    const T extend = std::min(Thresholds<T>::extend_max,
                              std::sqrt(T(2) * std::log(opacity / Thresholds<T>::alpha_min)));
    const T rx = std::ceil(extend * std::sqrt(o.cov[0]));
    const T ry = std::ceil(extend * std::sqrt(o.cov[2]));
    if (rx <= T(0) && ry <= T(0)) return false;
    if (o.mean2d[0] + rx <= T(0) || o.mean2d[0] - rx >= T(width) ||
        o.mean2d[1] + ry <= T(0) || o.mean2d[1] - ry >= T(height))
        return false;
    radius[0] = static_cast<int32_t>(std::min(rx, T(INT_MAX / 2)));
    radius[1] = static_cast<int32_t>(std::min(ry, T(INT_MAX / 2)));
    return true;
}

// Reverse-mode derivative of `project` for the outputs mean2d and conic.
template <typename T>
void project_vjp(const T *p, const T *s, const Camera<T> &cam, const Proj<T> &o,
                 const T v_mean2d[2], const T v_conic[3], T v_p[3], T v_q[4], T v_s[3],
                 double v_view[12]) {
    const T *W = cam.W;
    const T x = o.mc[0], y = o.mc[1], z = o.mc[2];
    const T rz = T(1) / z, rz2 = rz * rz, rz3 = rz2 * rz;
    const T fx = cam.fx, fy = cam.fy;

    // conic = cov^-1: dL/dcov = -Q G_Q Q with G_Q the symmetric gradient (the
    // off-diagonal conic entry appears once in sigma, so it counts half per side).
    const T A = o.conic[0], B = o.conic[1], C = o.conic[2];
    const T ga = v_conic[0], gb = T(0.5) * v_conic[1], gc = v_conic[2];
    const T X00 = ga * A + gb * B, X01 = ga * B + gb * C;
    const T X10 = gb * A + gc * B, X11 = gb * B + gc * C;
    const T G[4] = {-(A * X00 + B * X10), -(A * X01 + B * X11), -(B * X00 + C * X10),
                    -(B * X01 + C * X11)};

    // cov = J Sc J^T (+ eps I): dSc = J^T G J, dJ = 2 G J Sc.
    const T *J = o.J;
    T GJ[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j) GJ[3 * i + j] = G[2 * i] * J[j] + G[2 * i + 1] * J[3 + j];
    T vSc[9];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) vSc[3 * i + j] = J[i] * GJ[j] + J[3 + i] * GJ[3 + j];
    T vJ[6];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            vJ[3 * i + j] = T(2) * (GJ[3 * i] * o.Sc[j] + GJ[3 * i + 1] * o.Sc[3 + j] +
                                    GJ[3 * i + 2] * o.Sc[6 + j]);

    // Camera-space mean: through mean2d and through J. When x/z is clamped,
    // J[2] = -fx * lim / z no longer depends on x (same for y).
    T vmc[3];
    vmc[0] = fx * rz * v_mean2d[0];
    vmc[1] = fy * rz * v_mean2d[1];
    vmc[2] = -(fx * x * v_mean2d[0] + fy * y * v_mean2d[1]) * rz2;
    vmc[2] += -fx * rz2 * vJ[0] - fy * rz2 * vJ[4];
    if (o.clamp_x) {
        vmc[2] += fx * o.tx * rz3 * vJ[2];
    } else {
        vmc[0] += -fx * rz2 * vJ[2];
        vmc[2] += T(2) * fx * o.tx * rz3 * vJ[2];
    }
    if (o.clamp_y) {
        vmc[2] += fy * o.ty * rz3 * vJ[5];
    } else {
        vmc[1] += -fy * rz2 * vJ[5];
        vmc[2] += T(2) * fy * o.ty * rz3 * vJ[5];
    }

    // mc = W p + t, Sc = W Sig W^T.
    for (int j = 0; j < 3; ++j) v_p[j] += W[j] * vmc[0] + W[3 + j] * vmc[1] + W[6 + j] * vmc[2];
    T vScW[9]; // vSc W
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            vScW[3 * i + j] = vSc[3 * i] * W[j] + vSc[3 * i + 1] * W[3 + j] + vSc[3 * i + 2] * W[6 + j];
    T vSig[9]; // W^T vSc W
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            vSig[3 * i + j] = W[i] * vScW[j] + W[3 + i] * vScW[3 + j] + W[6 + i] * vScW[6 + j];
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
            // dW = vmc p^T + 2 vSc W Sig
            const T wsig = vScW[3 * i] * o.Sig[j] + vScW[3 * i + 1] * o.Sig[3 + j] +
                           vScW[3 * i + 2] * o.Sig[6 + j];
            v_view[4 * i + j] += double(vmc[i] * p[j] + T(2) * wsig);
        }
        v_view[4 * i + 3] += double(vmc[i]);
    }

    // Sig = M M^T, M = R diag(s).
    T vR[9];
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
            const T vM = T(2) * (vSig[3 * i] * o.M[j] + vSig[3 * i + 1] * o.M[3 + j] +
                                 vSig[3 * i + 2] * o.M[6 + j]);
            v_s[j] += vM * o.R[3 * i + j];
            vR[3 * i + j] = vM * s[j];
        }
    }

    // R(q) for the normalised quaternion, then through the normalisation.
    const T w = o.qn[0], qx = o.qn[1], qy = o.qn[2], qz = o.qn[3];
    T vqn[4];
    vqn[0] = T(2) * (-qz * vR[1] + qy * vR[2] + qz * vR[3] - qx * vR[5] - qy * vR[6] + qx * vR[7]);
    vqn[1] = T(2) * (qy * vR[1] + qz * vR[2] + qy * vR[3] - T(2) * qx * vR[4] - w * vR[5] +
                     qz * vR[6] + w * vR[7] - T(2) * qx * vR[8]);
    vqn[2] = T(2) * (-T(2) * qy * vR[0] + qx * vR[1] + w * vR[2] + qx * vR[3] + qz * vR[5] -
                     w * vR[6] + qz * vR[7] - T(2) * qy * vR[8]);
    vqn[3] = T(2) * (-T(2) * qz * vR[0] - w * vR[1] + qx * vR[2] + w * vR[3] -
                     T(2) * qz * vR[4] + qy * vR[5] + qx * vR[6] + qy * vR[7]);
    const T dot = vqn[0] * w + vqn[1] * qx + vqn[2] * qy + vqn[3] * qz;
    for (int i = 0; i < 4; ++i) v_q[i] += (vqn[i] - dot * o.qn[i]) * o.inv_qnorm;
}

// ---------------------------------------------------------------------------
// Per-Gaussian 2D data used by the rasterizer, per camera.
// ---------------------------------------------------------------------------
constexpr int kAux = 3; // x extent, y extent, sigma cut

// Pixel rows/columns where alpha can reach 1/255 lie inside the ellipse
// sigma <= log(255 * opacity); the loops use that box (with a float-rounding
// margin) inside each tile. The tile lists themselves follow gsplat's radius
// box, so the set of Gaussians seen by a pixel is exactly gsplat's.
template <typename T> void ellipse_bounds(const Proj<T> &o, T opacity, T aux[kAux]) {
    const T smax = std::log(opacity / Thresholds<T>::alpha_min);
    // sigma is a quadratic form whose float error grows with the conic's
    // anisotropy; the margin covers that so the cut never changes a decision.
    const T tr = o.cov[0] + o.cov[2];
    const T det = o.cov[0] * o.cov[2] - o.cov[1] * o.cov[1];
    const T lmax = T(0.5) * tr + std::sqrt(std::max(T(0), T(0.25) * tr * tr - det));
    const T aniso = lmax * lmax / det;
    const T margin = T(1e-3) + T(16) * std::numeric_limits<T>::epsilon() * (smax + T(1)) * aniso;
    const T scut = smax + margin;
    const T srange = T(2) * (scut + margin);
    aux[0] = std::sqrt(srange * o.cov[0]) + T(1e-3);
    aux[1] = std::sqrt(srange * o.cov[2]) + T(1e-3);
    aux[2] = scut;
}

// First/last pixel index (clamped to [lo, hi]) whose center lies within
// center +- ext. Returns false when the range is empty.
template <typename T>
inline bool pixel_range(T center, T ext, int lo, int hi, int &first, int &last) {
    const T a = std::ceil(center - ext - T(0.5));
    const T b = std::floor(center + ext - T(0.5));
    if (!(a <= T(hi) && b >= T(lo))) return false;
    first = a > T(lo) ? static_cast<int>(a) : lo;
    last = b < T(hi) ? static_cast<int>(b) : hi;
    return first <= last;
}

template <typename T> struct ImageData {
    const T *means2d;    // [N, 2]
    const T *conics;     // [N, 3]
    const T *aux;        // [N, kAux]
    const T *opacities;  // [N]
    const T *colors;     // [N, D]
    const T *background; // [D] or null
};

// Front-to-back compositing of one tile.
template <typename T, int DC>
void tile_forward(const ImageData<T> &g, const int32_t *ids, int32_t begin, int32_t end,
                  int tx0, int ty0, int width, int height, int D_rt, T *scratch,
                  T *out_color, T *out_alpha, T *out_trans, int32_t *out_last) {
    using S = Simd<T>;
    using V = typename S::V;
    using M = typename S::M;
    constexpr int LW = S::W;
    const int D = DC > 0 ? DC : D_rt;

    T *trans = scratch;               // [256]
    T *live = trans + kTilePix;       // [256] mask: pixel still compositing
    T *accum = live + kTilePix;       // [D][256]
    alignas(32) int32_t last[kTilePix];

    const int rows = std::min(kTile, height - ty0);
    const int cols = std::min(kTile, width - tx0);
    int n_live = 0;
    for (int r = 0; r < kTile; ++r) {
        for (int c = 0; c < kTile; ++c) {
            const bool in = r < rows && c < cols;
            trans[r * kTile + c] = T(1);
            live[r * kTile + c] = S::lane_mask(in);
            last[r * kTile + c] = -1;
            n_live += in;
        }
    }
    std::fill(accum, accum + D * kTilePix, T(0));

    const V v_amin = S::set1(Thresholds<T>::alpha_min);
    const V v_amax = S::set1(Thresholds<T>::alpha_max);
    const V v_tmin = S::set1(Thresholds<T>::trans_min);
    const V v_one = S::set1(T(1));
    const V v_zero = S::zero();

    for (int32_t k = begin; k < end && n_live > 0; ++k) {
        const int32_t n = ids[k];
        const T mx = g.means2d[2 * n], my = g.means2d[2 * n + 1];
        const T *aux = g.aux + kAux * n;
        int r0, r1, c0, c1;
        if (!pixel_range(my, aux[1], ty0, ty0 + rows - 1, r0, r1)) continue;
        if (!pixel_range(mx, aux[0], tx0, tx0 + cols - 1, c0, c1)) continue;
        const int s0 = (c0 - tx0) / LW, s1 = (c1 - tx0) / LW;
        const T ca = g.conics[3 * n], cb = g.conics[3 * n + 1], cc = g.conics[3 * n + 2];
        const V v_mx = S::set1(mx), v_ha = S::set1(T(0.5) * ca), v_cut = S::set1(aux[2]);
        const V v_op = S::set1(g.opacities[n]);
        const T *col = g.colors + static_cast<int64_t>(n) * D;

        for (int r = r0; r <= r1; ++r) {
            const T dy = my - (T(r) + T(0.5));
            const V v_bdy = S::set1(cb * dy), v_cterm = S::set1(T(0.5) * cc * dy * dy);
            for (int sg = s0; sg <= s1; ++sg) {
                const int pi = (r - ty0) * kTile + sg * LW;
                const M lv = S::load_mask(live + pi);
                if (!S::any(lv)) continue;
                const V px = S::add(S::set1(T(tx0 + sg * LW) + T(0.5)), S::iota());
                const V dx = S::sub(v_mx, px);
                const V sigma = S::fmadd(dx, S::fmadd(v_ha, dx, v_bdy), v_cterm);
                if (!S::any(S::mand(lv, S::le(sigma, v_cut)))) continue;
                const V alpha = S::min(v_amax, S::mul(v_op, S::exp(S::sub(v_zero, sigma))));
                const M valid = S::mand(S::mand(lv, S::ge(sigma, v_zero)), S::ge(alpha, v_amin));
                if (!S::any(valid)) continue;
                const V tr = S::load(trans + pi);
                const V next = S::mul(tr, S::sub(v_one, alpha));
                const M stop = S::mand(valid, S::le(next, v_tmin)); // excluded, pixel done
                const M contrib = S::mandnot(valid, stop);
                const V wgt = S::select(contrib, S::mul(alpha, tr));
                for (int d = 0; d < D; ++d) {
                    T *a = accum + d * kTilePix + pi;
                    S::store(a, S::fmadd(wgt, S::set1(col[d]), S::load(a)));
                }
                S::store(trans + pi, S::blend(tr, next, contrib));
                S::store_index(last + pi, contrib, k);
                if (S::any(stop)) {
                    S::store_mask(live + pi, S::mandnot(lv, stop));
                    n_live -= S::count(stop);
                }
            }
        }
    }

    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            const int i = r * kTile + c;
            const int64_t pix = static_cast<int64_t>(ty0 + r) * width + tx0 + c;
            const T tf = trans[i];
            out_trans[pix] = tf;
            out_alpha[pix] = T(1) - tf;
            out_last[pix] = last[i];
            for (int d = 0; d < D; ++d)
                out_color[pix * D + d] =
                    accum[d * kTilePix + i] + (g.background ? tf * g.background[d] : T(0));
        }
    }
}

// Back-to-front gradient walk of one tile (gsplat's backward recurrence:
// T is recovered by dividing by (1 - alpha), the colour behind is accumulated).
// Gradients per (tile, Gaussian) go to grad_isect[k] = [mean2d(2), conic(3),
// opacity, colors(D)].
template <typename T, int DC>
void tile_backward(const ImageData<T> &g, const int32_t *ids, int32_t begin, int32_t end,
                   int tx0, int ty0, int width, int height, int D_rt, T *scratch,
                   const T *in_trans, const int32_t *in_last, const T *v_color,
                   const T *v_alpha_img, T *grad_isect) {
    using S = Simd<T>;
    using V = typename S::V;
    using M = typename S::M;
    constexpr int LW = S::W;
    const int D = DC > 0 ? DC : D_rt;
    const int G = 6 + D;

    T *trans = scratch;            // [256] transmittance before the current Gaussian
    T *qterm = trans + kTilePix;   // [256] T_final * (dL/dalpha_out - bg . dL/dcolor)
    T *behind = qterm + kTilePix;  // [D][256] colour composited behind
    T *vcol = behind + D * kTilePix; // [D][256] dL/dcolor of the pixel
    alignas(32) int32_t last[kTilePix];

    const int rows = std::min(kTile, height - ty0);
    const int cols = std::min(kTile, width - tx0);
    int32_t kmax = -1;
    for (int r = 0; r < kTile; ++r) {
        for (int c = 0; c < kTile; ++c) {
            const int i = r * kTile + c;
            if (r < rows && c < cols) {
                const int64_t pix = static_cast<int64_t>(ty0 + r) * width + tx0 + c;
                const T tf = in_trans[pix];
                T bg_dot = T(0);
                for (int d = 0; d < D; ++d) {
                    const T vc = v_color[pix * D + d];
                    vcol[d * kTilePix + i] = vc;
                    if (g.background) bg_dot += g.background[d] * vc;
                }
                trans[i] = tf;
                qterm[i] = tf * (v_alpha_img[pix] - bg_dot);
                last[i] = in_last[pix];
                kmax = std::max(kmax, last[i]);
            } else {
                trans[i] = T(0);
                qterm[i] = T(0);
                for (int d = 0; d < D; ++d) vcol[d * kTilePix + i] = T(0);
                last[i] = -1;
            }
        }
    }
    std::fill(behind, behind + D * kTilePix, T(0));

    const V v_amin = S::set1(Thresholds<T>::alpha_min);
    const V v_amax = S::set1(Thresholds<T>::alpha_max);
    const V v_one = S::set1(T(1));
    const V v_half = S::set1(T(0.5));
    const V v_zero = S::zero();
    // colour-gradient accumulators: registers for fixed D, heap for any D
    struct Acc {
        V v;
    };
    Acc acc_fixed[DC > 0 ? DC : 1];
    std::vector<Acc> acc_dyn(DC > 0 ? 0 : D);
    Acc *acc_c = DC > 0 ? acc_fixed : acc_dyn.data();

    for (int32_t k = std::min(kmax, end - 1); k >= begin; --k) {
        const int32_t n = ids[k];
        const T mx = g.means2d[2 * n], my = g.means2d[2 * n + 1];
        const T *aux = g.aux + kAux * n;
        int r0, r1, c0, c1;
        if (!pixel_range(my, aux[1], ty0, ty0 + rows - 1, r0, r1)) continue;
        if (!pixel_range(mx, aux[0], tx0, tx0 + cols - 1, c0, c1)) continue;
        const int s0 = (c0 - tx0) / LW, s1 = (c1 - tx0) / LW;
        const T ca = g.conics[3 * n], cb = g.conics[3 * n + 1], cc = g.conics[3 * n + 2];
        const T op = g.opacities[n];
        const V v_mx = S::set1(mx), v_ha = S::set1(T(0.5) * ca), v_cut = S::set1(aux[2]);
        const V v_op = S::set1(op), v_ca = S::set1(ca), v_cb = S::set1(cb), v_cc = S::set1(cc);
        const T *col = g.colors + static_cast<int64_t>(n) * D;

        for (int d = 0; d < D; ++d) acc_c[d].v = v_zero;
        V acc_a = v_zero, acc_b = v_zero, acc_cc = v_zero, acc_x = v_zero, acc_y = v_zero,
          acc_o = v_zero;
        bool touched = false;

        for (int r = r0; r <= r1; ++r) {
            const T dy_s = my - (T(r) + T(0.5));
            const V dy = S::set1(dy_s);
            const V v_bdy = S::set1(cb * dy_s), v_cterm = S::set1(T(0.5) * cc * dy_s * dy_s);
            for (int sg = s0; sg <= s1; ++sg) {
                const int pi = (r - ty0) * kTile + sg * LW;
                const M act = S::index_ge(last + pi, k);
                if (!S::any(act)) continue;
                const V px = S::add(S::set1(T(tx0 + sg * LW) + T(0.5)), S::iota());
                const V dx = S::sub(v_mx, px);
                const V sigma = S::fmadd(dx, S::fmadd(v_ha, dx, v_bdy), v_cterm);
                if (!S::any(S::mand(act, S::le(sigma, v_cut)))) continue;
                const V vis = S::exp(S::sub(v_zero, sigma));
                const V ovis = S::mul(v_op, vis);
                const V alpha = S::min(v_amax, ovis);
                const M valid = S::mand(S::mand(act, S::ge(sigma, v_zero)), S::ge(alpha, v_amin));
                if (!S::any(valid)) continue;
                touched = true;

                const V ra = S::div(v_one, S::sub(v_one, alpha));
                const V tr_after = S::load(trans + pi);
                const V tr = S::mul(tr_after, ra); // transmittance in front of this Gaussian
                S::store(trans + pi, S::blend(tr_after, tr, valid));
                const V fac = S::select(valid, S::mul(alpha, tr));

                V v_alpha = S::mul(ra, S::load(qterm + pi));
                for (int d = 0; d < D; ++d) {
                    const V vc = S::load(vcol + d * kTilePix + pi);
                    T *bh = behind + d * kTilePix + pi;
                    const V b = S::load(bh);
                    const V cd = S::set1(col[d]);
                    acc_c[d].v = S::fmadd(fac, vc, acc_c[d].v);
                    v_alpha = S::fmadd(S::sub(S::mul(cd, tr), S::mul(b, ra)), vc, v_alpha);
                    S::store(bh, S::fmadd(fac, cd, b));
                }
                // alpha = min(0.999, o * vis): no gradient through the clamp.
                const M unclamped = S::mand(valid, S::le(ovis, v_amax));
                const V v_sigma = S::select(unclamped, S::sub(v_zero, S::mul(ovis, v_alpha)));
                const V vs_dx = S::mul(v_sigma, dx);
                acc_a = S::fmadd(S::mul(v_half, vs_dx), dx, acc_a);
                acc_b = S::fmadd(vs_dx, dy, acc_b);
                acc_cc = S::fmadd(S::mul(v_half, S::mul(v_sigma, dy)), dy, acc_cc);
                acc_x = S::fmadd(v_sigma, S::fmadd(v_ca, dx, S::mul(v_cb, dy)), acc_x);
                acc_y = S::fmadd(v_sigma, S::fmadd(v_cb, dx, S::mul(v_cc, dy)), acc_y);
                acc_o = S::add(acc_o, S::select(unclamped, S::mul(vis, v_alpha)));
            }
        }
        if (touched) {
            T *gk = grad_isect + static_cast<int64_t>(k) * G;
            gk[0] = S::hsum(acc_x);
            gk[1] = S::hsum(acc_y);
            gk[2] = S::hsum(acc_a);
            gk[3] = S::hsum(acc_b);
            gk[4] = S::hsum(acc_cc);
            gk[5] = S::hsum(acc_o);
            for (int d = 0; d < D; ++d) gk[6 + d] = S::hsum(acc_c[d].v);
        }
    }
}

// ---------------------------------------------------------------------------
// Host-side driver
// ---------------------------------------------------------------------------
struct Dims {
    int64_t B, C, N, D, Cc; // Cc: 1 when colors are shared by all cameras, else C
    int width, height, tiles_x, tiles_y;
    int64_t n_tiles() const { return int64_t(tiles_x) * tiles_y; }
    int64_t images() const { return B * C; }
};

Dims get_dims(const at::Tensor &means, const at::Tensor &colors,
              const at::Tensor &viewmats, int64_t width, int64_t height) {
    Dims d;
    d.B = means.size(0);
    d.N = means.size(1);
    d.C = viewmats.size(1);
    d.Cc = colors.size(1);
    d.D = colors.size(3);
    d.width = static_cast<int>(width);
    d.height = static_cast<int>(height);
    d.tiles_x = static_cast<int>((width + kTile - 1) / kTile);
    d.tiles_y = static_cast<int>((height + kTile - 1) / kTile);
    return d;
}

template <typename T>
ImageData<T> image_data(const Dims &dm, int64_t img, const T *means2d, const T *conics,
                        const T *aux, const T *opac, const T *colors, const T *bg) {
    const int64_t b = img / dm.C, c = img % dm.C;
    ImageData<T> g;
    g.means2d = means2d + img * dm.N * 2;
    g.conics = conics + img * dm.N * 3;
    g.aux = aux + img * dm.N * kAux;
    g.opacities = opac + b * dm.N;
    g.colors = colors + (b * dm.Cc + (dm.Cc == 1 ? 0 : c)) * dm.N * dm.D;
    g.background = bg ? bg + img * dm.D : nullptr;
    return g;
}

template <typename T>
std::vector<Camera<T>> make_cameras(const Dims &dm, const T *viewmats, const T *Ks) {
    std::vector<Camera<T>> cams;
    for (int64_t img = 0; img < dm.images(); ++img)
        cams.push_back(make_camera(viewmats + img * 16, Ks + img * 9, dm.width, dm.height));
    return cams;
}

// Sorts Gaussian indices (given in increasing order) by depth; equal depths
// keep index order, like gsplat's stable radix sort of (tile, depth) keys.
inline void sort_by_depth(std::vector<int32_t> &ids, const double *depth) {
    std::stable_sort(ids.begin(), ids.end(),
                     [depth](int32_t a, int32_t b) { return depth[a] < depth[b]; });
}

// float: LSD radix sort on the order-preserving bit pattern of the depth
// (three 11-bit passes), several times faster than a comparison sort here.
inline void sort_by_depth(std::vector<int32_t> &ids, const float *depth) {
    const size_t n = ids.size();
    std::vector<uint32_t> key(n), key2(n);
    std::vector<int32_t> ids2(n);
    for (size_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, depth + ids[i], sizeof u);
        key[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
    for (int shift = 0; shift < 32; shift += 11) {
        size_t hist[2049] = {0};
        for (size_t i = 0; i < n; ++i) ++hist[((key[i] >> shift) & 2047u) + 1];
        for (int b = 0; b < 2048; ++b) hist[b + 1] += hist[b];
        for (size_t i = 0; i < n; ++i) {
            const size_t dst = hist[(key[i] >> shift) & 2047u]++;
            key2[dst] = key[i];
            ids2[dst] = ids[i];
        }
        key.swap(key2);
        ids.swap(ids2);
    }
}

template <typename T, int DC>
void forward_impl(const Dims &dm, const T *means, const T *quats, const T *scales,
                  const T *opac, const T *colors, const T *viewmats, const T *Ks, const T *bg,
                  T near_plane, T far_plane, T eps2d, int nt, int32_t *radii, T *means2d,
                  T *depths, T *conics, T *aux, T *out_color, T *out_alpha, T *out_trans,
                  int32_t *out_last, at::Tensor &tile_offsets, at::Tensor &flatten_ids) {
    const int64_t I = dm.images(), N = dm.N, NT = dm.n_tiles();

    // 1. projection
    const std::vector<Camera<T>> cams = make_cameras(dm, viewmats, Ks);
#pragma omp parallel for num_threads(team_size(nt, I * N, kGrainGaussians)) schedule(static)
    for (int64_t idx = 0; idx < I * N; ++idx) {
        const int64_t img = idx / N, n = idx % N, b = img / dm.C;
        const Camera<T> &cam = cams[img];
        const int64_t gi = b * N + n;
        Proj<T> o;
        int32_t rad[2];
        if (project(means + 3 * gi, quats + 4 * gi, scales + 3 * gi, cam, near_plane, far_plane,
                    eps2d, o) &&
            screen_radius(o, opac[gi], dm.width, dm.height, rad)) {
            radii[2 * idx] = rad[0];
            radii[2 * idx + 1] = rad[1];
            means2d[2 * idx] = o.mean2d[0];
            means2d[2 * idx + 1] = o.mean2d[1];
            depths[idx] = o.mc[2];
            for (int i = 0; i < 3; ++i) conics[3 * idx + i] = o.conic[i];
            ellipse_bounds(o, opac[gi], aux + kAux * idx);
        } else {
            radii[2 * idx] = radii[2 * idx + 1] = 0;
            means2d[2 * idx] = means2d[2 * idx + 1] = T(0);
            depths[idx] = T(0);
            for (int i = 0; i < 3; ++i) conics[3 * idx + i] = T(0);
            for (int i = 0; i < kAux; ++i) aux[kAux * idx + i] = T(0);
        }
    }

    // one thread per image at most, and none for little work
    const int per_image = team_size(static_cast<int>(std::min<int64_t>(nt, I)), I * N, kGrainGaussians);

    // 2. binning: depth order (ties by index, as gsplat's stable radix sort),
    // then tiles covered by the radius box (IntersectTile.cu).
    std::vector<std::vector<int32_t>> order(I);
    std::vector<std::vector<int32_t>> rects(I); // 4 per sorted Gaussian
    std::vector<int64_t> counts(I * NT + 1, 0);
#pragma omp parallel for num_threads(per_image) schedule(dynamic, 1)
    for (int64_t img = 0; img < I; ++img) {
        const int32_t *rad = radii + img * N * 2;
        const T *dep = depths + img * N;
        const T *m2 = means2d + img * N * 2;
        auto &ord = order[img];
        for (int32_t n = 0; n < N; ++n)
            if (rad[2 * n] > 0 && rad[2 * n + 1] > 0) ord.push_back(n);
        sort_by_depth(ord, dep);
        auto &rc = rects[img];
        rc.resize(4 * ord.size());
        int64_t *cnt = counts.data() + img * NT;
        const T ts = T(kTile);
        for (size_t i = 0; i < ord.size(); ++i) {
            const int32_t n = ord[i];
            const T tx = m2[2 * n] / ts, ty = m2[2 * n + 1] / ts;
            const T rx = T(rad[2 * n]) / ts, ry = T(rad[2 * n + 1]) / ts;
            auto clampi = [](T v, int hi) {
                return v <= T(0) ? 0 : (v >= T(hi) ? hi : static_cast<int>(v));
            };
            const int x0 = clampi(std::floor(tx - rx), dm.tiles_x);
            const int x1 = clampi(std::ceil(tx + rx), dm.tiles_x);
            const int y0 = clampi(std::floor(ty - ry), dm.tiles_y);
            const int y1 = clampi(std::ceil(ty + ry), dm.tiles_y);
            rc[4 * i] = x0;
            rc[4 * i + 1] = x1;
            rc[4 * i + 2] = y0;
            rc[4 * i + 3] = y1;
            for (int y = y0; y < y1; ++y)
                for (int x = x0; x < x1; ++x) ++cnt[int64_t(y) * dm.tiles_x + x];
        }
    }
    int64_t total = 0;
    for (int64_t i = 0; i < I * NT; ++i) {
        const int64_t c = counts[i];
        counts[i] = total;
        total += c;
    }
    counts[I * NT] = total;
    TORCH_CHECK(total < INT32_MAX, "too many tile intersections: ", total);
    tile_offsets = at::empty({I * NT + 1}, at::kInt);
    flatten_ids = at::empty({total}, at::kInt);
    int32_t *offs = tile_offsets.data_ptr<int32_t>();
    int32_t *fids = flatten_ids.data_ptr<int32_t>();
    for (int64_t i = 0; i <= I * NT; ++i) offs[i] = static_cast<int32_t>(counts[i]);
#pragma omp parallel for num_threads(per_image) schedule(dynamic, 1)
    for (int64_t img = 0; img < I; ++img) {
        std::vector<int32_t> cursor(offs + img * NT, offs + (img + 1) * NT);
        const auto &ord = order[img];
        const auto &rc = rects[img];
        for (size_t i = 0; i < ord.size(); ++i)
            for (int y = rc[4 * i + 2]; y < rc[4 * i + 3]; ++y)
                for (int x = rc[4 * i]; x < rc[4 * i + 1]; ++x)
                    fids[cursor[int64_t(y) * dm.tiles_x + x]++] = ord[i];
    }

    // 3. rasterization
    const int64_t HW = int64_t(dm.width) * dm.height;
#pragma omp parallel num_threads(team_size(nt, total, kGrainIsects))
    {
        std::vector<T> scratch((2 + dm.D) * kTilePix);
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < I * NT; ++w) {
            const int64_t img = w / NT, tile = w % NT;
            const ImageData<T> g = image_data(dm, img, means2d, conics, aux, opac, colors, bg);
            const int tx0 = int(tile % dm.tiles_x) * kTile, ty0 = int(tile / dm.tiles_x) * kTile;
            tile_forward<T, DC>(g, fids, offs[w], offs[w + 1], tx0, ty0, dm.width, dm.height,
                                int(dm.D), scratch.data(), out_color + img * HW * dm.D,
                                out_alpha + img * HW, out_trans + img * HW, out_last + img * HW);
        }
    }
}

template <typename T, int DC>
void backward_impl(const Dims &dm, const T *means, const T *quats, const T *scales,
                   const T *opac, const T *colors, const T *viewmats, const T *Ks, const T *bg,
                   T near_plane, T far_plane, T eps2d, int nt, const int32_t *radii,
                   const T *means2d, const T *conics, const T *aux, const T *trans,
                   const int32_t *last, const int32_t *offs, const int32_t *fids,
                   int64_t n_isect, const T *v_color, const T *v_alpha, T *v_means, T *v_quats,
                   T *v_scales, T *v_opac, T *v_colors, T *v_viewmats) {
    const int64_t I = dm.images(), N = dm.N, NT = dm.n_tiles(), D = dm.D, G = 6 + D;
    const int64_t HW = int64_t(dm.width) * dm.height;

    // 1. per-tile gradients of the 2D quantities
    std::vector<T> grad_isect(n_isect * G, T(0));
#pragma omp parallel num_threads(team_size(nt, n_isect, kGrainIsects))
    {
        std::vector<T> scratch((2 + 2 * D) * kTilePix);
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < I * NT; ++w) {
            const int64_t img = w / NT, tile = w % NT;
            if (offs[w] == offs[w + 1]) continue;
            const ImageData<T> g = image_data(dm, img, means2d, conics, aux, opac, colors, bg);
            const int tx0 = int(tile % dm.tiles_x) * kTile, ty0 = int(tile / dm.tiles_x) * kTile;
            tile_backward<T, DC>(g, fids, offs[w], offs[w + 1], tx0, ty0, dm.width, dm.height,
                                 int(D), scratch.data(), trans + img * HW, last + img * HW,
                                 v_color + img * HW * D, v_alpha + img * HW, grad_isect.data());
        }
    }

    // 2. reduce per (image, Gaussian); images own disjoint intersection ranges
    const int per_image = team_size(static_cast<int>(std::min<int64_t>(nt, I)), n_isect, kGrainIsects);
    std::vector<T> g2d(I * N * G, T(0));
#pragma omp parallel for num_threads(per_image) schedule(dynamic, 1)
    for (int64_t img = 0; img < I; ++img) {
        T *gi = g2d.data() + img * N * G;
        for (int32_t k = offs[img * NT]; k < offs[(img + 1) * NT]; ++k) {
            const T *src = grad_isect.data() + int64_t(k) * G;
            T *dst = gi + int64_t(fids[k]) * G;
            for (int64_t j = 0; j < G; ++j) dst[j] += src[j];
        }
    }

    // 3. projection VJP, parallel over Gaussians so each thread owns its
    // outputs; view-matrix gradients are summed per thread.
    const std::vector<Camera<T>> cams = make_cameras(dm, viewmats, Ks);
    const int nt_proj = team_size(nt, I * N, kGrainGaussians);
    std::vector<double> view_acc(size_t(nt_proj) * I * 12, 0.0);
#pragma omp parallel num_threads(nt_proj)
    {
        double *vacc = view_acc.data() + size_t(omp_get_thread_num()) * I * 12;
#pragma omp for schedule(static)
        for (int64_t bn = 0; bn < dm.B * N; ++bn) {
            const int64_t b = bn / N, n = bn % N;
            T vp[3] = {0, 0, 0}, vq[4] = {0, 0, 0, 0}, vs[3] = {0, 0, 0}, vo = T(0);
            if (dm.Cc == 1)
                for (int64_t d = 0; d < D; ++d) v_colors[bn * D + d] = T(0);
            for (int64_t c = 0; c < dm.C; ++c) {
                const int64_t img = b * dm.C + c, idx = img * N + n;
                const T *gg = g2d.data() + idx * G;
                T *vc_out = v_colors + ((b * dm.Cc + (dm.Cc == 1 ? 0 : c)) * N + n) * D;
                for (int64_t d = 0; d < D; ++d) {
                    if (dm.Cc == 1)
                        vc_out[d] += gg[6 + d];
                    else
                        vc_out[d] = gg[6 + d];
                }
                if (radii[2 * idx] <= 0 || radii[2 * idx + 1] <= 0) continue;
                vo += gg[5];
                const Camera<T> &cam = cams[img];
                Proj<T> o;
                project(means + 3 * bn, quats + 4 * bn, scales + 3 * bn, cam, near_plane,
                        far_plane, eps2d, o);
                project_vjp(means + 3 * bn, scales + 3 * bn, cam, o, gg, gg + 2, vp, vq, vs,
                            vacc + img * 12);
            }
            for (int i = 0; i < 3; ++i) v_means[3 * bn + i] = vp[i];
            for (int i = 0; i < 4; ++i) v_quats[4 * bn + i] = vq[i];
            for (int i = 0; i < 3; ++i) v_scales[3 * bn + i] = vs[i];
            v_opac[bn] = vo;
        }
    }
    for (int64_t img = 0; img < I; ++img) {
        for (int j = 0; j < 16; ++j) v_viewmats[img * 16 + j] = T(0);
        for (int t = 0; t < nt_proj; ++t)
            for (int j = 0; j < 12; ++j)
                v_viewmats[img * 16 + j] += T(view_acc[(size_t(t) * I + img) * 12 + j]);
    }
}

void check_inputs(const std::vector<at::Tensor> &ts) {
    for (const auto &t : ts) {
        TORCH_CHECK(t.device().is_cpu(), "expected CPU tensors");
        TORCH_CHECK(t.is_contiguous(), "expected contiguous tensors");
        TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), "all tensors must share one dtype");
    }
}

// Calls f.template operator()<DC>() with DC specialised for common channel counts.
template <typename F> void dispatch_channels(int64_t D, F &&f) {
    switch (D) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
    }
}

// Inputs: means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N],
// colors [B,Cc,N,D] (Cc = 1 or C), viewmats [B,C,4,4], Ks [B,C,3,3],
// backgrounds [B,C,D] (or empty). Returns render_colors [B,C,H,W,D],
// render_alphas [B,C,H,W,1], radii [B,C,N,2], means2d [B,C,N,2],
// depths [B,C,N], conics [B,C,N,3], and the state the backward pass needs:
// aux [B,C,N,3], final transmittance [B,C,H,W], last ids [B,C,H,W],
// tile offsets [B*C*tiles+1], flatten ids [n_isect].
std::vector<at::Tensor> rasterize_forward(
    at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
    at::Tensor colors, at::Tensor viewmats, at::Tensor Ks, at::Tensor backgrounds,
    int64_t width, int64_t height, double near_plane, double far_plane, double eps2d,
    int64_t num_threads) {
    check_inputs({means, quats, scales, opacities, colors, viewmats, Ks});
    const bool has_bg = backgrounds.numel() > 0;
    if (has_bg) check_inputs({means, backgrounds});
    const Dims dm = get_dims(means, colors, viewmats, width, height);
    auto opt = means.options();
    auto iopt = opt.dtype(at::kInt);
    auto radii = at::empty({dm.B, dm.C, dm.N, 2}, iopt);
    auto means2d = at::empty({dm.B, dm.C, dm.N, 2}, opt);
    auto depths = at::empty({dm.B, dm.C, dm.N}, opt);
    auto conics = at::empty({dm.B, dm.C, dm.N, 3}, opt);
    auto aux = at::empty({dm.B, dm.C, dm.N, kAux}, opt);
    auto out_color = at::empty({dm.B, dm.C, height, width, dm.D}, opt);
    auto out_alpha = at::empty({dm.B, dm.C, height, width, 1}, opt);
    auto out_trans = at::empty({dm.B, dm.C, height, width}, opt);
    auto out_last = at::empty({dm.B, dm.C, height, width}, iopt);
    at::Tensor tile_offsets, flatten_ids;
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));

    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "rasterize_forward", [&] {
        dispatch_channels(dm.D, [&](auto dc) {
            forward_impl<scalar_t, decltype(dc)::value>(
                dm, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
                scales.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
                colors.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(),
                Ks.data_ptr<scalar_t>(), has_bg ? backgrounds.data_ptr<scalar_t>() : nullptr,
                scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), nt,
                radii.data_ptr<int32_t>(), means2d.data_ptr<scalar_t>(),
                depths.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                aux.data_ptr<scalar_t>(), out_color.data_ptr<scalar_t>(),
                out_alpha.data_ptr<scalar_t>(), out_trans.data_ptr<scalar_t>(),
                out_last.data_ptr<int32_t>(), tile_offsets, flatten_ids);
        });
    });
    return {out_color, out_alpha, radii,    means2d,      depths,     conics,
            aux,       out_trans, out_last, tile_offsets, flatten_ids};
}

// Returns gradients for means, quats, scales, opacities, colors (shape of the
// colors input) and viewmats.
std::vector<at::Tensor> rasterize_backward(
    at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
    at::Tensor colors, at::Tensor viewmats, at::Tensor Ks, at::Tensor backgrounds,
    int64_t width, int64_t height, double near_plane, double far_plane, double eps2d,
    at::Tensor radii, at::Tensor means2d, at::Tensor conics, at::Tensor aux,
    at::Tensor trans, at::Tensor last, at::Tensor tile_offsets,
    at::Tensor flatten_ids, at::Tensor v_color, at::Tensor v_alpha,
    int64_t num_threads) {
    check_inputs({means, quats, scales, opacities, colors, viewmats, Ks, means2d, conics, aux,
                  trans, v_color, v_alpha});
    const bool has_bg = backgrounds.numel() > 0;
    const Dims dm = get_dims(means, colors, viewmats, width, height);
    auto v_means = at::empty_like(means);
    auto v_quats = at::empty_like(quats);
    auto v_scales = at::empty_like(scales);
    auto v_opac = at::empty_like(opacities);
    auto v_colors = at::empty_like(colors);
    auto v_viewmats = at::empty_like(viewmats);
    const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));

    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "rasterize_backward", [&] {
        dispatch_channels(dm.D, [&](auto dc) {
            backward_impl<scalar_t, decltype(dc)::value>(
                dm, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
                scales.data_ptr<scalar_t>(), opacities.data_ptr<scalar_t>(),
                colors.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(),
                Ks.data_ptr<scalar_t>(), has_bg ? backgrounds.data_ptr<scalar_t>() : nullptr,
                scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), nt,
                radii.data_ptr<int32_t>(), means2d.data_ptr<scalar_t>(),
                conics.data_ptr<scalar_t>(), aux.data_ptr<scalar_t>(),
                trans.data_ptr<scalar_t>(), last.data_ptr<int32_t>(),
                tile_offsets.data_ptr<int32_t>(), flatten_ids.data_ptr<int32_t>(),
                flatten_ids.numel(), v_color.data_ptr<scalar_t>(),
                v_alpha.data_ptr<scalar_t>(), v_means.data_ptr<scalar_t>(),
                v_quats.data_ptr<scalar_t>(), v_scales.data_ptr<scalar_t>(),
                v_opac.data_ptr<scalar_t>(), v_colors.data_ptr<scalar_t>(),
                v_viewmats.data_ptr<scalar_t>());
        });
    });
    return {v_means, v_quats, v_scales, v_opac, v_colors, v_viewmats};
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rasterize_forward", &rasterize_forward, "Gaussian splatting forward (CPU)");
    m.def("rasterize_backward", &rasterize_backward, "Gaussian splatting backward (CPU)");
}
