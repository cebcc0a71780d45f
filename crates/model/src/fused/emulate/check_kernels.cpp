// Checks every kernel of ../kernels.cu, run on the CPU by emulate.h, against a plain
// double-precision computation of the same math written here, loop by loop. Built and run
// by the model crate's test `cuda_kernels_match_plain_math_in_emulation`:
//
//   g++ -std=c++20 -O1 -pthread check_kernels.cpp -o check && ./check
//
// Prints one line per check and `KERNELS <n> checks, <failed> failed`; exits 1 on a failure.
#include "emulate.h"
#include "../kernels.cu"

#include <string>

using Vec = std::vector<float>;
using Ref = std::vector<double>;

static int checks = 0, failed = 0;

// ‖got − want‖ / ‖want‖ against `tol`.
static void expect(const std::string& what, const Vec& got, const Ref& want, double tol) {
    double num = 0, den = 0;
    bool finite = got.size() == want.size();
    for (size_t i = 0; i < got.size() && i < want.size(); i++) {
        finite = finite && std::isfinite(got[i]);
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    double err = std::sqrt(num / (den > 0 ? den : 1e-300));
    bool ok = finite && err <= tol;
    checks++;
    failed += !ok;
    std::printf("%s %s: relative error %.2e (tolerance %.0e)\n", ok ? "ok  " : "FAIL", what.c_str(),
                err, tol);
}

static unsigned long long seed = 12345;
static float uniform() {  // in [-1, 1)
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((seed >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}
static Vec random(size_t n, float scale = 1.f) {
    Vec v(n);
    for (auto& x : v) x = uniform() * scale;
    return v;
}

// The launch shapes of src/fused/cuda.rs: a warp per row in blocks of 4 warps; grid-stride
// kernels with a deliberately small grid, so the stride loop is exercised.
static dim3 rows_grid(size_t rows) { return dim3((unsigned)((rows + 3) / 4)); }
static const dim3 ROWS_BLOCK(128), SMALL_GRID(2), ELEM_BLOCK(64);

static void rms_norm() {
    const unsigned rows = 37, h = 80, per_chunk = 8, chunks = (rows + per_chunk - 1) / per_chunk;
    const float eps = 1e-6f;
    Vec x = random(rows * h), w = random(h), dy = random(rows * h);
    Vec y(rows * h), inv(rows), dx(rows * h), partial(chunks * h), dw(h);
    emu::launch(rows_grid(rows), ROWS_BLOCK, rms_norm_fwd, x.data(), w.data(), y.data(),
                inv.data(), rows, h, eps);
    emu::launch(rows_grid(rows), ROWS_BLOCK, rms_norm_bwd_x, x.data(), w.data(), dy.data(),
                inv.data(), dx.data(), rows, h);
    emu::launch(dim3((h + 63) / 64, chunks), dim3(64), rms_norm_bwd_w_partial, x.data(),
                dy.data(), inv.data(), partial.data(), rows, h, per_chunk);
    emu::launch(dim3((h + 63) / 64), dim3(64), sum_chunks, partial.data(), dw.data(), chunks, h);
    Ref ry(rows * h), rinv(rows), rdx(rows * h), rdw(h, 0.0);
    for (unsigned r = 0; r < rows; r++) {
        double ss = 0, dot = 0;
        for (unsigned j = 0; j < h; j++) ss += (double)x[r * h + j] * x[r * h + j];
        double rr = 1 / std::sqrt(ss / h + eps);
        rinv[r] = rr;
        for (unsigned j = 0; j < h; j++) {
            ry[r * h + j] = x[r * h + j] * rr * w[j];
            dot += (double)dy[r * h + j] * w[j] * x[r * h + j];
        }
        for (unsigned j = 0; j < h; j++) {
            rdx[r * h + j] = rr * dy[r * h + j] * w[j] - x[r * h + j] * rr * rr * rr * dot / h;
            rdw[j] += (double)dy[r * h + j] * x[r * h + j] * rr;
        }
    }
    expect("rms_norm y", y, ry, 1e-6);
    expect("rms_norm inverse rms", inv, rinv, 1e-6);
    expect("rms_norm dx", dx, rdx, 1e-5);
    expect("rms_norm dw", dw, rdw, 1e-5);
}

static void swiglu() {
    const size_t n = 1000;
    Vec g = random(n, 4), u = random(n), dy = random(n), y(n), dgu(2 * n);
    emu::launch(SMALL_GRID, ELEM_BLOCK, swiglu_fwd, g.data(), u.data(), y.data(), n);
    emu::launch(SMALL_GRID, ELEM_BLOCK, swiglu_bwd, g.data(), u.data(), dy.data(), dgu.data(), n);
    Ref ry(n), rdgu(2 * n);
    for (size_t i = 0; i < n; i++) {
        double s = 1 / (1 + std::exp(-(double)g[i]));
        ry[i] = g[i] * s * u[i];
        rdgu[i] = dy[i] * u[i] * s * (1 + g[i] * (1 - s));  // d/dg of g·σ(g)·u
        rdgu[n + i] = dy[i] * g[i] * s;
    }
    expect("swiglu y", y, ry, 1e-6);
    expect("swiglu dg, du", dgu, rdgu, 1e-6);
}

static void rope_check() {
    const unsigned b = 2, t = 5, heads = 3, d = 8, half = d / 2, row = heads * d, rows = b * t;
    Vec x = random(rows * row), cs(t * half), sn(t * half), y(rows * row), back(rows * row);
    for (unsigned p = 0; p < t; p++)
        for (unsigned i = 0; i < half; i++) {
            double a = p / std::pow(10000.0, 2.0 * i / d);
            cs[p * half + i] = (float)std::cos(a);
            sn[p * half + i] = (float)std::sin(a);
        }
    emu::launch(SMALL_GRID, ELEM_BLOCK, rope, x.data(), cs.data(), sn.data(), y.data(), rows, t,
                row, d, 1.f);
    emu::launch(SMALL_GRID, ELEM_BLOCK, rope, y.data(), cs.data(), sn.data(), back.data(), rows,
                t, row, d, -1.f);
    Ref ry(rows * row), rx(x.begin(), x.end());
    for (unsigned r = 0; r < rows; r++)
        for (unsigned hh = 0; hh < heads; hh++)
            for (unsigned i = 0; i < half; i++) {
                double a = (r % t) / std::pow(10000.0, 2.0 * i / d);
                size_t at = r * row + hh * d + i;
                ry[at] = x[at] * std::cos(a) - x[at + half] * std::sin(a);
                ry[at + half] = x[at + half] * std::cos(a) + x[at] * std::sin(a);
            }
    expect("rope", y, ry, 1e-6);
    expect("rope then its inverse", back, rx, 1e-6);
}

static void cross_entropy() {
    const unsigned rows = 13, vocab = 100;
    Vec x = random(rows * vocab, 5), weights(rows), lse(rows), loss(1), dx(rows * vocab);
    std::vector<unsigned> targets(rows);
    std::vector<double> row_loss(rows);
    double total = 0;
    for (unsigned r = 0; r < rows; r++) {
        targets[r] = (r * 37) % vocab;
        weights[r] = r == 4 ? 0.f : 1.f + 0.1f * r;  // a padded token counts for nothing
        total += weights[r];
    }
    const double g = 0.75;  // the loss's gradient from above
    emu::launch(rows_grid(rows), ROWS_BLOCK, xent_fwd, x.data(), targets.data(), weights.data(),
                lse.data(), row_loss.data(), rows, vocab);
    emu::launch(dim3(1), dim3(32), sum_rows_f64, row_loss.data(), loss.data(), rows, 1 / total);
    emu::launch(rows_grid(rows), ROWS_BLOCK, xent_bwd, x.data(), targets.data(), weights.data(),
                lse.data(), dx.data(), rows, vocab, g / total);
    Ref rlse(rows), rloss(1, 0.0), rdx(rows * vocab);
    for (unsigned r = 0; r < rows; r++) {
        double m = -INFINITY, s = 0;
        for (unsigned j = 0; j < vocab; j++) m = std::max(m, (double)x[r * vocab + j]);
        for (unsigned j = 0; j < vocab; j++) s += std::exp(x[r * vocab + j] - m);
        rlse[r] = m + std::log(s);
        rloss[0] += (rlse[r] - x[r * vocab + targets[r]]) * weights[r] / total;
        for (unsigned j = 0; j < vocab; j++) {
            double p = std::exp(x[r * vocab + j] - rlse[r]);
            rdx[r * vocab + j] = g * weights[r] / total * (p - (j == targets[r]));
        }
    }
    expect("cross-entropy lse", lse, rlse, 1e-6);
    expect("cross-entropy loss", loss, rloss, 1e-6);
    expect("cross-entropy dlogits", dx, rdx, 1e-5);
}

static void adamw_check() {
    const size_t n = 1000;
    Vec p = random(n), m = random(n, 0.1f), v = random(n, 0.01f), g = random(n);
    for (auto& x : v) x = std::fabs(x);
    Vec p0 = p, m0 = m, v0 = v;
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.01f, gs = 0.5f;
    const float bias1 = 1 - std::pow(b1, 3.f), bias2 = 1 - std::pow(b2, 3.f);
    emu::launch(SMALL_GRID, ELEM_BLOCK, adamw, p.data(), m.data(), v.data(), g.data(), n, lr, b1,
                b2, 1 - b1, 1 - b2, eps, wd, bias1, bias2, gs);
    Ref rp(n), rm(n), rv(n);
    for (size_t i = 0; i < n; i++) {
        double gi = (double)g[i] * gs;
        rm[i] = m0[i] * (double)b1 + gi * (1 - (double)b1);
        rv[i] = v0[i] * (double)b2 + gi * gi * (1 - (double)b2);
        double u = rm[i] / bias1 / (std::sqrt(rv[i] / bias2) + eps) + p0[i] * (double)wd;
        rp[i] = p0[i] - lr * u;
    }
    expect("adamw m", m, rm, 1e-6);
    expect("adamw v", v, rv, 1e-6);
    expect("adamw p", p, rp, 1e-6);
}

// Attention by the book in double: S = q·kᵀ·scale (causal), P = softmax(S), O = P·v; then
// dV = Pᵀ·dO, dP = dO·vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)), dQ = scale·dS·k, dK = scale·dSᵀ·q.
static void attention(unsigned b, unsigned t, unsigned h, unsigned d) {
    const size_t row = (size_t)h * d, n = (size_t)b * t * row;
    const float scale = 1.f / std::sqrt((float)d);
    Vec q = random(n), k = random(n), v = random(n), dout = random(n);
    Vec o(n), lse((size_t)b * h * t), big_d((size_t)b * h * t), grads(3 * n);
    size_t warps = (size_t)b * h * t;
    emu::launch(rows_grid(warps), ROWS_BLOCK, attn_fwd, q.data(), k.data(), v.data(), o.data(),
                lse.data(), b, t, h, d, scale);
    emu::launch(rows_grid(warps), ROWS_BLOCK, attn_bwd_q, q.data(), k.data(), v.data(), o.data(),
                dout.data(), lse.data(), big_d.data(), grads.data(), b, t, h, d, scale);
    emu::launch(rows_grid(warps), ROWS_BLOCK, attn_bwd_kv, q.data(), k.data(), v.data(),
                dout.data(), lse.data(), big_d.data(), grads.data(), b, t, h, d, scale);
    Ref ro(n, 0.0), rlse((size_t)b * h * t), rg(3 * n, 0.0);
    for (unsigned bi = 0; bi < b; bi++)
        for (unsigned hi = 0; hi < h; hi++) {
            size_t base = (size_t)bi * t * row + (size_t)hi * d;
            auto at = [&](unsigned pos, unsigned c) { return base + pos * row + c; };
            std::vector<double> P((size_t)t * t, 0.0), dP((size_t)t * t, 0.0);
            for (unsigned i = 0; i < t; i++) {
                double m = -INFINITY, s = 0;
                for (unsigned j = 0; j <= i; j++) {
                    double sc = 0;
                    for (unsigned c = 0; c < d; c++) sc += (double)q[at(i, c)] * k[at(j, c)];
                    P[i * t + j] = sc * scale;
                    m = std::max(m, P[i * t + j]);
                }
                for (unsigned j = 0; j <= i; j++) s += std::exp(P[i * t + j] - m);
                rlse[((size_t)bi * h + hi) * t + i] = m + std::log(s);
                for (unsigned j = 0; j <= i; j++) P[i * t + j] = std::exp(P[i * t + j] - m) / s;
                for (unsigned j = 0; j <= i; j++)
                    for (unsigned c = 0; c < d; c++) ro[at(i, c)] += P[i * t + j] * v[at(j, c)];
            }
            for (unsigned i = 0; i < t; i++) {
                double rowsum = 0;
                for (unsigned j = 0; j <= i; j++) {
                    for (unsigned c = 0; c < d; c++) dP[i * t + j] += (double)dout[at(i, c)] * v[at(j, c)];
                    rowsum += dP[i * t + j] * P[i * t + j];
                }
                for (unsigned j = 0; j <= i; j++) {
                    double ds = P[i * t + j] * (dP[i * t + j] - rowsum);
                    for (unsigned c = 0; c < d; c++) {
                        rg[at(i, c)] += scale * ds * k[at(j, c)];
                        rg[n + at(j, c)] += scale * ds * q[at(i, c)];
                        rg[2 * n + at(j, c)] += P[i * t + j] * dout[at(i, c)];
                    }
                }
            }
        }
    std::string shape = " (b " + std::to_string(b) + ", t " + std::to_string(t) + ", heads " +
                        std::to_string(h) + ", head_dim " + std::to_string(d) + ")";
    expect("attention output" + shape, o, ro, 1e-5);
    expect("attention lse" + shape, lse, rlse, 1e-6);
    expect("attention dq, dk, dv" + shape, grads, rg, 1e-5);
}

// Exact checks: a dequantised weight is one f32 product, the same bits on every device.
static void expect_bits(const std::string& what, const std::vector<unsigned>& got,
                        const std::vector<unsigned>& want) {
    size_t wrong = got.size() == want.size() ? 0 : 1;
    for (size_t i = 0; i < got.size() && i < want.size(); i++) wrong += got[i] != want[i];
    checks++;
    failed += wrong != 0;
    std::printf("%s %s: %zu of %zu values differ in their bits\n", wrong ? "FAIL" : "ok  ",
                what.c_str(), wrong, want.size());
}

// The nearest bf16 to x (ties to the even one), by comparing the two candidates in double.
static unsigned bf16_nearest(float x) {
    unsigned b = std::bit_cast<unsigned>(x), lo = b & 0xffff0000u, hi = lo + 0x10000u;
    double dl = std::fabs((double)std::bit_cast<float>(lo) - x);
    double dh = std::fabs((double)std::bit_cast<float>(hi) - x);
    if (dl < dh || (dl == dh && ((lo >> 16) & 1u) == 0)) return lo >> 16;
    return hi >> 16;
}

// W of 7 × 37 (odd, so NF4's last byte holds one weight), NF4 blocks of 16 straddling rows.
static void dequantize_check() {
    const unsigned rows = 7, cols = 37, block = 16;
    const size_t n = (size_t)rows * cols;
    static const double levels[16] = {-1.0,         -0.6961928,  -0.52507305, -0.3949175,
                                      -0.28444138,  -0.18477343, -0.091050036, 0.0,
                                      0.0795803,    0.1609302,   0.2461123,   0.33791524,
                                      0.44070983,   0.562617,    0.72295684,  1.0};
    for (unsigned format = 1; format <= 3; format++) {
        std::vector<unsigned char> codes;
        Vec scales;
        std::vector<double> want(n);
        if (format == 1) {
            Vec w = random(n, 3.f);
            for (size_t i = 0; i < n; i++) {
                unsigned h = bf16_nearest(w[i]);
                codes.push_back(h & 0xff);
                codes.push_back(h >> 8);
                want[i] = std::bit_cast<float>(h << 16);
            }
        } else if (format == 2) {
            scales = random(rows, 0.02f);
            for (size_t i = 0; i < n; i++) {
                int c = (int)std::lround(uniform() * 127);
                codes.push_back((unsigned char)(signed char)c);
                want[i] = c * (double)scales[i / cols];
            }
        } else {
            scales = random((n + block - 1) / block, 0.05f);
            codes.assign((n + 1) / 2, 0);
            for (size_t i = 0; i < n; i++) {
                unsigned idx = (unsigned)((uniform() + 1) * 8) & 15u;
                codes[i / 2] |= (unsigned char)(idx << (4 * (i % 2)));
                // The levels are f32 constants (quant.rs): rounded before the product.
                want[i] = (double)(float)levels[idx] * scales[i / block];
            }
        }
        if (scales.empty()) scales.push_back(0.f);
        Vec w32(n);
        std::vector<unsigned short> w16(n);
        emu::launch(SMALL_GRID, ELEM_BLOCK, dequantize_f32, codes.data(), scales.data(),
                    w32.data(), n, cols, block, format);
        emu::launch(SMALL_GRID, ELEM_BLOCK, dequantize_bf16, codes.data(), scales.data(),
                    w16.data(), n, cols, block, format);
        std::vector<unsigned> got32(n), want32(n), got16(n), want16(n);
        for (size_t i = 0; i < n; i++) {
            float f = (float)want[i];  // one rounding of the exact product
            got32[i] = std::bit_cast<unsigned>(w32[i]);
            want32[i] = std::bit_cast<unsigned>(f);
            got16[i] = w16[i];
            want16[i] = bf16_nearest(f);
        }
        const char* name[] = {"", "bf16", "int8", "nf4"};
        expect_bits(std::string("dequantize ") + name[format] + " to f32", got32, want32);
        expect_bits(std::string("dequantize ") + name[format] + " to bf16", got16, want16);
    }
}

int main() {
    rms_norm();
    swiglu();
    rope_check();
    cross_entropy();
    adamw_check();
    attention(2, 7, 2, 40);   // lanes 8..31 hold one element, lanes 0..7 two
    attention(1, 9, 3, 16);   // head_dim below a warp
    attention(1, 5, 1, 128);  // the largest head_dim: four elements per lane
    dequantize_check();
    std::printf("KERNELS %d checks, %d failed\n", checks, failed);
    return failed ? 1 : 0;
}
