// The CUDA kernels of relora-model's fused ops (src/fused/*.rs describes each op's math; the
// CPU kernels there are the reference these are checked against).
//
// Built to PTX by crates/model/build.rs (feature `cuda`) and loaded by src/fused/cuda.rs.
// The same file also compiles as C++ under src/fused/emulate/emulate.h, which runs every
// thread of a block on a CPU thread, so the tests check this code's indexing and reductions
// without a GPU. That sets two rules for the code below:
// - a warp's lanes take the same branches around every shuffle (whole warps return early,
//   never single lanes), which CUDA's full-mask shuffles require anyway;
// - no shared memory and no __syncthreads: rows go one per warp, reductions by shuffles.
//
// Every value is f32 in memory and in arithmetic (bf16 tensors are widened by the caller,
// as on the CPU). Every sum runs in an order fixed by the shapes alone: no atomics, so the
// same inputs give the same bits on every run, as the CPU kernels do.

#define WARP 32u
// head_dim up to MAX_PER_LANE × 32 = 128 (LLaMA's is 64 or 128).
#define MAX_PER_LANE 4

// Butterfly sums: every lane ends with the same value (each step adds the same two
// operands on both partners).
__device__ __forceinline__ float warp_sum(float v) {
    for (unsigned m = WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (unsigned m = WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (unsigned m = WARP / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// The global index of this thread's warp (rows go one per warp), and its lane.
__device__ __forceinline__ size_t warp_index() {
    return ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
}

__device__ __forceinline__ unsigned lane_index() { return threadIdx.x % WARP; }

__device__ __forceinline__ size_t thread_index() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t thread_count() { return (size_t)gridDim.x * blockDim.x; }

// ---- RMSNorm: y = x · w · r, r = 1 / sqrt(mean(x²) + eps), per row of h ----

extern "C" __global__ void rms_norm_fwd(const float* x, const float* w, float* y, float* inv_rms,
                                        unsigned rows, unsigned h, float eps) {
    size_t row = warp_index();
    if (row >= rows) return;
    unsigned lane = lane_index();
    const float* xr = x + row * h;
    float* yr = y + row * h;
    float ss = 0.f;
    for (unsigned j = lane; j < h; j += WARP) ss += xr[j] * xr[j];
    float r = 1.f / sqrtf(warp_sum(ss) / (float)h + eps);
    for (unsigned j = lane; j < h; j += WARP) yr[j] = xr[j] * r * w[j];
    if (lane == 0) inv_rms[row] = r;
}

// dx = r·dy·w − x · r³ · mean(dy·w·x), per row.
extern "C" __global__ void rms_norm_bwd_x(const float* x, const float* w, const float* dy,
                                          const float* inv_rms, float* dx, unsigned rows,
                                          unsigned h) {
    size_t row = warp_index();
    if (row >= rows) return;
    unsigned lane = lane_index();
    const float* xr = x + row * h;
    const float* dyr = dy + row * h;
    float* dxr = dx + row * h;
    float dot = 0.f;
    for (unsigned j = lane; j < h; j += WARP) dot += dyr[j] * w[j] * xr[j];
    float r = inv_rms[row];
    float c = r * r * r * warp_sum(dot) / (float)h;
    for (unsigned j = lane; j < h; j += WARP) dxr[j] = r * dyr[j] * w[j] - xr[j] * c;
}

// dw partial sums: chunk blockIdx.y of `rows_per_chunk` rows, one thread per column.
extern "C" __global__ void rms_norm_bwd_w_partial(const float* x, const float* dy,
                                                  const float* inv_rms, float* partial,
                                                  unsigned rows, unsigned h,
                                                  unsigned rows_per_chunk) {
    size_t j = thread_index();
    if (j >= h) return;
    size_t first = (size_t)blockIdx.y * rows_per_chunk;
    size_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
    float acc = 0.f;
    for (size_t r = first; r < last; r++) acc += dy[r * h + j] * x[r * h + j] * inv_rms[r];
    partial[(size_t)blockIdx.y * h + j] = acc;
}

// out[j] = Σ_c partial[c][j], chunks in order. Shared by every column sum below.
extern "C" __global__ void sum_chunks(const float* partial, float* out, unsigned chunks,
                                      unsigned h) {
    size_t j = thread_index();
    if (j >= h) return;
    float acc = 0.f;
    for (unsigned c = 0; c < chunks; c++) acc += partial[(size_t)c * h + j];
    out[j] = acc;
}

// ---- SwiGLU: y = silu(g) · u ----

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* y, size_t n) {
    for (size_t i = thread_index(); i < n; i += thread_count()) {
        float s = sigmoid(g[i]);
        y[i] = g[i] * s * u[i];
    }
}

// dg and du, into one buffer: dg at [0, n), du at [n, 2n).
extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dy,
                                      float* dgu, size_t n) {
    for (size_t i = thread_index(); i < n; i += thread_count()) {
        float s = sigmoid(g[i]);
        dgu[n + i] = dy[i] * g[i] * s;
        dgu[i] = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    }
}

// ---- RoPE, rotate-half, on x [rows = b·t, heads · d]; sign −1 turns back (the backward) ----

extern "C" __global__ void rope(const float* x, const float* cos_t, const float* sin_t, float* y,
                                unsigned rows, unsigned t, unsigned row_len, unsigned d,
                                float sign) {
    unsigned half = d / 2;
    size_t pairs_per_row = row_len / 2;
    size_t n = (size_t)rows * pairs_per_row;
    for (size_t p = thread_index(); p < n; p += thread_count()) {
        size_t r = p / pairs_per_row;
        unsigned in_row = (unsigned)(p % pairs_per_row);
        unsigned head = in_row / half, i = in_row % half;
        unsigned pos = (unsigned)(r % t);
        float c = cos_t[pos * half + i], s = sign * sin_t[pos * half + i];
        size_t at = r * row_len + (size_t)head * d + i;
        float x1 = x[at], x2 = x[at + half];
        y[at] = x1 * c - x2 * s;
        y[at + half] = x2 * c + x1 * s;
    }
}

// ---- Cross-entropy over the vocabulary, fused with log-softmax ----

// Per row of logits [rows, vocab]: lse = log Σ exp, and the weighted loss (lse − x[target])·w.
extern "C" __global__ void xent_fwd(const float* x, const unsigned* targets, const float* weights,
                                    float* lse, double* row_loss, unsigned rows, unsigned vocab) {
    size_t row = warp_index();
    if (row >= rows) return;
    unsigned lane = lane_index();
    const float* xr = x + row * vocab;
    float m = -INFINITY;
    for (unsigned j = lane; j < vocab; j += WARP) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.f;
    for (unsigned j = lane; j < vocab; j += WARP) s += expf(xr[j] - m);
    float l = m + logf(warp_sum(s));
    if (lane == 0) {
        lse[row] = l;
        float w = weights[row];
        row_loss[row] = w == 0.f ? 0.0 : (double)((l - xr[targets[row]]) * w);
    }
}

// out[0] = Σ row_loss · scale, in a fixed order (one warp: lane-strided, then the butterfly).
extern "C" __global__ void sum_rows_f64(const double* row_loss, float* out, unsigned rows,
                                        double scale) {
    if (warp_index() != 0) return;
    unsigned lane = lane_index();
    double acc = 0.0;
    for (unsigned i = lane; i < rows; i += WARP) acc += row_loss[i];
    acc = warp_sum_f64(acc);
    if (lane == 0) out[0] = (float)(acc * scale);
}

// The logits' gradient for a loss gradient g: (softmax − onehot) · g · w / Σw.
extern "C" __global__ void xent_bwd(const float* x, const unsigned* targets, const float* weights,
                                    const float* lse, float* dx, unsigned rows, unsigned vocab,
                                    double g_over_total) {
    size_t row = warp_index();
    if (row >= rows) return;
    unsigned lane = lane_index();
    const float* xr = x + row * vocab;
    float* dxr = dx + row * vocab;
    float c = (float)(g_over_total * (double)weights[row]), l = lse[row];
    unsigned target = targets[row];
    for (unsigned j = lane; j < vocab; j += WARP) {
        float v = c == 0.f ? 0.f : c * expf(xr[j] - l);
        if (j == target) v -= c;
        dxr[j] = v;
    }
}

// ---- AdamW, one in-place pass (the constants as src/fused/adamw.rs computes them) ----

extern "C" __global__ void adamw(float* p, float* m, float* v, const float* g, size_t n, float lr,
                                 float beta1, float beta2, float one_minus_beta1,
                                 float one_minus_beta2, float eps, float weight_decay,
                                 float bias1, float bias2, float grad_scale) {
    for (size_t i = thread_index(); i < n; i += thread_count()) {
        float gi = g[i] * grad_scale;
        float mi = m[i] * beta1 + gi * one_minus_beta1;
        float vi = v[i] * beta2 + gi * gi * one_minus_beta2;
        m[i] = mi;
        v[i] = vi;
        float u = (mi / bias1) / (sqrtf(vi / bias2) + eps);
        if (weight_decay != 0.f) u += p[i] * weight_decay;
        p[i] -= u * lr;
    }
}

// ---- Causal attention on q, k, v [b, t, heads · d]: one warp per (sequence, head, query) ----
//
// A lane holds elements lane, lane + 32, … of a head's d values. Scores are computed the same
// way in all three kernels, (q · scale) · k summed lane-wise then by the butterfly, so the
// backward pass recomputes exactly the probabilities the forward pass normalised.

struct Head {
    size_t base;  // offset of (sequence, head) position 0
    size_t row;   // distance between positions
    unsigned i;   // this warp's position
    size_t bh;    // sequence · heads + head: the index of its lse row
};

__device__ __forceinline__ Head head_of(size_t w, unsigned t, unsigned h, unsigned d) {
    Head o;
    o.i = (unsigned)(w % t);
    o.bh = w / t;
    size_t hi = o.bh % h, bi = o.bh / h;
    o.row = (size_t)h * d;
    o.base = bi * t * o.row + hi * d;
    return o;
}

__device__ __forceinline__ void load(float* dst, const float* src, unsigned lane, unsigned d,
                                     float scale) {
    for (unsigned e = 0; e < MAX_PER_LANE; e++) {
        unsigned c = lane + e * WARP;
        dst[e] = c < d ? src[c] * scale : 0.f;
    }
}

__device__ __forceinline__ float dot(const float* mine, const float* other, unsigned lane,
                                     unsigned d) {
    float part = 0.f;
    for (unsigned e = 0; e < MAX_PER_LANE; e++) {
        unsigned c = lane + e * WARP;
        if (c < d) part += mine[e] * other[c];
    }
    return warp_sum(part);
}

// o = softmax(q·kᵀ·scale, causal) · v, and lse per query, by the online softmax.
extern "C" __global__ void attn_fwd(const float* q, const float* k, const float* v, float* o,
                                    float* lse, unsigned b, unsigned t, unsigned h, unsigned d,
                                    float scale) {
    size_t w = warp_index();
    if (w >= (size_t)b * h * t) return;
    unsigned lane = lane_index();
    Head hd = head_of(w, t, h, d);
    float qs[MAX_PER_LANE], acc[MAX_PER_LANE];
    load(qs, q + hd.base + hd.i * hd.row, lane, d, scale);
    for (unsigned e = 0; e < MAX_PER_LANE; e++) acc[e] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (unsigned j = 0; j <= hd.i; j++) {
        float s = dot(qs, k + hd.base + j * hd.row, lane, d);
        float m_new = fmaxf(m, s);
        float keep = expf(m - m_new), p = expf(s - m_new);
        l = l * keep + p;
        const float* vj = v + hd.base + j * hd.row;
        for (unsigned e = 0; e < MAX_PER_LANE; e++) {
            unsigned c = lane + e * WARP;
            acc[e] = acc[e] * keep + (c < d ? p * vj[c] : 0.f);
        }
        m = m_new;
    }
    float* oi = o + hd.base + hd.i * hd.row;
    for (unsigned e = 0; e < MAX_PER_LANE; e++) {
        unsigned c = lane + e * WARP;
        if (c < d) oi[c] = acc[e] / l;
    }
    if (lane == 0) lse[hd.bh * t + hd.i] = m + logf(l);
}

// Per query: D = dO·O (kept for the key pass), and dQ = scale · Σ_j P(dP − D) k_j with
// P = exp(s − lse), dP = dO·v_j. grads holds dQ, dK, dV one after another (n each).
extern "C" __global__ void attn_bwd_q(const float* q, const float* k, const float* v,
                                      const float* o, const float* d_o, const float* lse,
                                      float* big_d, float* grads, unsigned b, unsigned t,
                                      unsigned h, unsigned d, float scale) {
    size_t w = warp_index();
    if (w >= (size_t)b * h * t) return;
    unsigned lane = lane_index();
    Head hd = head_of(w, t, h, d);
    size_t at = hd.base + hd.i * hd.row;
    float qs[MAX_PER_LANE], dos[MAX_PER_LANE], dq[MAX_PER_LANE];
    load(qs, q + at, lane, d, scale);
    load(dos, d_o + at, lane, d, 1.f);
    for (unsigned e = 0; e < MAX_PER_LANE; e++) dq[e] = 0.f;
    float di = dot(dos, o + at, lane, d);
    float li = lse[hd.bh * t + hd.i];
    for (unsigned j = 0; j <= hd.i; j++) {
        const float* kj = k + hd.base + j * hd.row;
        float p = expf(dot(qs, kj, lane, d) - li);
        float ds = p * (dot(dos, v + hd.base + j * hd.row, lane, d) - di);
        for (unsigned e = 0; e < MAX_PER_LANE; e++) {
            unsigned c = lane + e * WARP;
            if (c < d) dq[e] += ds * kj[c];
        }
    }
    float* dqi = grads + at;
    for (unsigned e = 0; e < MAX_PER_LANE; e++) {
        unsigned c = lane + e * WARP;
        if (c < d) dqi[c] = scale * dq[e];
    }
    if (lane == 0) big_d[hd.bh * t + hd.i] = di;
}

// Per key j: dK = scale · Σ_{i ≥ j} P(dP − D) q_i and dV = Σ_{i ≥ j} P dO_i.
extern "C" __global__ void attn_bwd_kv(const float* q, const float* k, const float* v,
                                       const float* d_o, const float* lse, const float* big_d,
                                       float* grads, unsigned b, unsigned t, unsigned h,
                                       unsigned d, float scale) {
    size_t w = warp_index();
    if (w >= (size_t)b * h * t) return;
    unsigned lane = lane_index();
    Head hd = head_of(w, t, h, d);
    unsigned j = hd.i;
    size_t at = hd.base + j * hd.row, n = (size_t)b * t * hd.row;
    float ks[MAX_PER_LANE], vs[MAX_PER_LANE], dk[MAX_PER_LANE], dv[MAX_PER_LANE];
    load(ks, k + at, lane, d, 1.f);
    load(vs, v + at, lane, d, 1.f);
    for (unsigned e = 0; e < MAX_PER_LANE; e++) dk[e] = dv[e] = 0.f;
    for (unsigned i = j; i < t; i++) {
        const float* qi = q + hd.base + i * hd.row;
        const float* doi = d_o + hd.base + i * hd.row;
        // The score as the other kernels form it: lane-wise (q·scale)·k, then the butterfly.
        float part = 0.f;
        for (unsigned e = 0; e < MAX_PER_LANE; e++) {
            unsigned c = lane + e * WARP;
            if (c < d) part += (qi[c] * scale) * ks[e];
        }
        float p = expf(warp_sum(part) - lse[hd.bh * t + i]);
        float dp = 0.f;
        for (unsigned e = 0; e < MAX_PER_LANE; e++) {
            unsigned c = lane + e * WARP;
            if (c < d) dp += doi[c] * vs[e];
        }
        float ds = p * (warp_sum(dp) - big_d[hd.bh * t + i]);
        for (unsigned e = 0; e < MAX_PER_LANE; e++) {
            unsigned c = lane + e * WARP;
            if (c < d) {
                dk[e] += ds * qi[c];
                dv[e] += p * doi[c];
            }
        }
    }
    for (unsigned e = 0; e < MAX_PER_LANE; e++) {
        unsigned c = lane + e * WARP;
        if (c < d) {
            grads[n + at + c] = scale * dk[e];
            grads[2 * n + at + c] = dv[e];
        }
    }
}

// ---- A frozen W in a compact format (src/quant.rs), dequantised for cuBLAS ----
// W is rows × cols, row-major, n = rows · cols weights. format 1: bf16 (2 bytes a weight,
// little-endian); 2: int8 (a code a byte, one scale per row of `cols`); 3: NF4 (two level
// indices a byte, the earlier weight in the low nibble, one scale per `block` weights of the
// flattened W). Each weight is computed as quant.rs's dequantize_rows computes it: the same
// f32 product, so the same bits as the CPU.

__device__ __forceinline__ float nf4_level(unsigned i) {
    // QLoRA's NormalFloat-4 levels (quant.rs NF4_LEVELS).
    const float levels[16] = {-1.0f,          -0.6961928f,  -0.52507305f, -0.3949175f,
                              -0.28444138f,   -0.18477343f, -0.091050036f, 0.0f,
                              0.0795803f,     0.1609302f,   0.2461123f,   0.33791524f,
                              0.44070983f,    0.562617f,    0.72295684f,  1.0f};
    return levels[i];
}

__device__ __forceinline__ float compact_weight(const unsigned char* codes, const float* scales,
                                                size_t i, unsigned cols, unsigned block,
                                                unsigned format) {
    if (format == 1) {
        unsigned bits = (unsigned)codes[2 * i] | ((unsigned)codes[2 * i + 1] << 8);
        return __uint_as_float(bits << 16);
    }
    if (format == 2) return (float)(signed char)codes[i] * scales[i / cols];
    unsigned nibble = (codes[i >> 1] >> ((i & 1) * 4)) & 15u;
    return nf4_level(nibble) * scales[i / block];
}

extern "C" __global__ void dequantize_f32(const unsigned char* codes, const float* scales,
                                          float* w, size_t n, unsigned cols, unsigned block,
                                          unsigned format) {
    for (size_t i = thread_index(); i < n; i += thread_count())
        w[i] = compact_weight(codes, scales, i, cols, block, format);
}

// The same, rounded to bf16 (to nearest, ties to even, as candle's casts round) for a bf16
// matmul: the bits of the f32 weight's cast.
extern "C" __global__ void dequantize_bf16(const unsigned char* codes, const float* scales,
                                           unsigned short* w, size_t n, unsigned cols,
                                           unsigned block, unsigned format) {
    for (size_t i = thread_index(); i < n; i += thread_count()) {
        float x = compact_weight(codes, scales, i, cols, block, format);
        unsigned b = __float_as_uint(x);
        if (x != x) {
            w[i] = (unsigned short)((b >> 16) | 0x40u);
        } else {
            w[i] = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
        }
    }
}
