// Attention of new tokens over the KV cache (decode T = 1, verification T = d + 1): flash-decoding.
//
//   q [B, T, nH, D], k_cache / v_cache [B, nKV, S, D], start [B]:  token t of sequence b (position p = start[b] + t)
//   attends to the slots 0 .. p of its KV head (GQA: query head h reads KV head h / G, G = nH / nKV).
//
// Split kernel, grid (NC chunks, nKV x row groups, B): the slots are cut into position-aligned chunks of LC keys
// (chunk c = slots [c LC, (c + 1) LC)); block (c, kvh, b) reads chunk c of KV head kvh once, for all G query heads and
// all T tokens of sequence b (rows r = t G + g, at most kAttnRows(DP) of them per block: more rows take more row
// groups, which re-read the chunk from L2), and writes per row the chunk's partial softmax (m = max score,
// l = sum exp(score - m), acc = sum exp(score - m) v). Combine kernel, one block per row: the partials of chunks
// 0 .. p / LC merged in a fixed order.
//
// A row's arithmetic depends only on its own q, its position and the cache (never on T, G, the other rows, the
// row groups, S or the launch): a token verified with d others gives bitwise what it gives decoded alone.
// Inside a chunk (tiles of KT keys, in order):  score_s = (sum_d q[d] k_s[d], d ascending, fmaf) * scale;
//   m' = max(m, max_s score_s), corr = exp(m - m'), p_s = exp(score_s - m'), l = l corr + warp_sum(p_s),
//   acc = acc corr, then acc = fmaf(p_s, v_s, acc) for s ascending.
// Combine: M = max_c m_c, w_c = exp(m_c - M); warp w (of kCombineWarps) takes chunks c = w, w + kCombineWarps, ...
//   ascending: L_w = sum l_c w_c, o_w = sum w_c acc_c (fmaf); L = L_0 + L_1 + ..., o = o_0 + o_1 + ... in warp order;
//   out = T(o * (1 / L)).
// Special values as the CPU twin: a key scoring -inf weighs 0 (also before any finite score); a NaN score or q
// propagates; +inf gives NaN; slots past the row's position are never read into the result; a row whose position is
// outside [0, S) is NaN.
//
// Memory: the K and V tiles of a chunk are staged through shared memory with 16-byte loads, both tiles' loads issued
// before the first is used (32 KB in flight per block at D = 128, bfloat16).
//
// The decoder's variant (launch_decoder_attention) also does rope + kv_cache_write: q and the new k / v come raw from
// the q/k/v projection, each block ropes its q rows and, first, writes the new keys (roped) and values that fall in
// its chunk into the caches (every row group of the chunk writes the same bits), exactly as the rope and
// kv_cache_write kernels would: one launch instead of three.
#include "common/limits.h"
#include "cuda/device.cuh"

namespace layerskip::cuda {
namespace {

constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnTiles = 2;  // tiles per chunk, prefetched together
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;

// Per padded head dim DP (64, 128, 256): keys per tile, keys per chunk, rows per block (shared memory < 48 KB).
template <int DP>
__host__ __device__ constexpr int attn_tile_keys() { return DP == 256 ? 16 : 32; }
template <int DP>
__host__ __device__ constexpr int attn_chunk() { return kAttnTiles * attn_tile_keys<DP>(); }
template <int DP>
__host__ __device__ constexpr int attn_rows() { return DP == 256 ? 8 : 16; }

// (No 32 bucket: heads that small are rare, and each bucket is 6 more kernels to compile.)
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 64)
    f(std::integral_constant<int, 64>{});
  else if (D <= 128)
    f(std::integral_constant<int, 128>{});
  else
    f(std::integral_constant<int, 256>{});
}

template <typename Elt>
struct AttnParams {
  const Elt* q;        // [B, T, nH, D]: roped (cache_attention) or raw (decoder)
  const Elt* k_cache;  // [B, nKV, S, D]
  const Elt* v_cache;
  const int64_t* start;
  int64_t B, T, nH, nKV, S, D;
  float scale;
  // decoder only (k_cache_w null otherwise): the caches again, written; the new k, v [B, T, nKV, D] raw; RoPE.
  Elt* k_cache_w;
  Elt* v_cache_w;
  const Elt* k_new;
  const Elt* v_new;
  const int64_t* positions;  // [B, T] (pos_stride_b = T) or [1, T] (0)
  int64_t pos_stride_b, P;
  const float* cos;  // [P, D / 2]
  const float* sin;
  float* part_ml;   // [B, NC, T, nH, 2]
  float* part_acc;  // [B, NC, T, nH, D]
  Elt* out;           // [B, T, nH, D]
};

template <int DP>
__host__ __device__ __forceinline__ int64_t attn_chunks(int64_t S) {
  return (S + attn_chunk<DP>() - 1) / attn_chunk<DP>();
}

// The element of a roped q row (rope op arithmetic), or NaN for a position outside the tables.
template <typename T>
__device__ __forceinline__ float roped(const T* row, int64_t d, int64_t D, int64_t pos, int64_t P, const float* cos,
                                       const float* sin) {
  if (pos < 0 || pos >= P) return nan_f32();
  const int64_t half = D / 2, i = d < half ? d : d - half;
  T y1, y2;
  rope_pair(row[i], row[i + half], cos[pos * half + i], sin[pos * half + i], y1, y2);
  return to_f32(d < half ? y1 : y2);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kAttnThreads) attention_split_kernel(AttnParams<T> p) {
  constexpr int KT = attn_tile_keys<DP>(), LC = attn_chunk<DP>(), R = attn_rows<DP>(), kN = Vec<T>::kN;
  constexpr int kVecsPerKey = DP / kN;
  constexpr int kLoads = (KT * kVecsPerKey + kAttnThreads - 1) / kAttnThreads;  // per thread, per tile, of K and of V
  constexpr int kItems = (R * DP / 4 + kAttnThreads - 1) / kAttnThreads;        // (row, 4 dims) accumulators
  __shared__ __align__(16) float s_q[R][DP];
  __shared__ __align__(16) float s_k[KT][DP + 4];  // + 4: rows 16-byte aligned, float4 reads across keys conflict-free
  __shared__ __align__(16) float s_v[KT][DP];
  __shared__ float s_p[R][KT];
  __shared__ float s_m[R], s_l[R], s_corr[R];
  __shared__ int64_t s_pos[R];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t T_ = p.T, nH = p.nH, nKV = p.nKV, S = p.S, D = p.D;
  const int64_t G = nH / nKV, groups = (G * T_ + R - 1) / R;
  const int64_t c = blockIdx.x, b = blockIdx.z, kvh = blockIdx.y / groups, r0 = (blockIdx.y % groups) * R;
  const int rows = static_cast<int>(G * T_ - r0 < R ? G * T_ - r0 : R);
  const int64_t st = p.start[b], lo = c * LC;
  const int64_t max_pos = st + (r0 + rows - 1) / G;  // the block's last row has the largest position
  if (lo > max_pos || lo >= S) return;               // no row of this block sees this chunk
  const T* K = p.k_cache + (b * nKV + kvh) * S * D;
  const T* V = p.v_cache + (b * nKV + kvh) * S * D;

  // 1. (decoder) the new keys and values of this chunk into the caches, as rope + kv_cache_write.
  if (p.k_cache_w != nullptr) {
    const int64_t half = D / 2;
    const int64_t s_lo = lo > st ? lo : st;
    int64_t s_hi = lo + LC < st + T_ ? lo + LC : st + T_;
    s_hi = s_hi < S ? s_hi : S;
    for (int64_t idx = tid; idx < (s_hi - s_lo) * half; idx += kAttnThreads) {
      const int64_t slot = s_lo + idx / half, i = idx % half, t = slot - st;
      const int64_t src = ((b * T_ + t) * nKV + kvh) * D, dst = ((b * nKV + kvh) * S + slot) * D;
      const int64_t pos = p.positions[b * p.pos_stride_b + t];
      T* kd = p.k_cache_w + dst;
      if (pos < 0 || pos >= p.P) {
        kd[i] = kd[i + half] = from_f32<T>(nan_f32());
      } else {
        rope_pair(p.k_new[src + i], p.k_new[src + i + half], p.cos[pos * half + i], p.sin[pos * half + i], kd[i],
                  kd[i + half]);
      }
      p.v_cache_w[dst + i] = p.v_new[src + i];
      p.v_cache_w[dst + i + half] = p.v_new[src + i + half];
    }
    __syncthreads();  // the block's own cache writes are visible to its loads below
  }

  // 2. q rows (decoder: roped here) and the running (m, l) of each row.
  for (int idx = tid; idx < R * DP; idx += kAttnThreads) {
    const int r = idx / DP, d = idx % DP;
    float v = 0.0f;
    if (r < rows && d < D) {
      const int64_t row = r0 + r, t = row / G, h = kvh * G + row % G;
      const T* qr = p.q + ((b * T_ + t) * nH + h) * D;
      v = p.k_cache_w != nullptr ? roped(qr, d, D, p.positions[b * p.pos_stride_b + t], p.P, p.cos, p.sin)
                                 : to_f32(qr[d]);
    }
    s_q[r][d] = v;
  }
  if (tid < R) {
    s_pos[tid] = st + (r0 + tid) / G;
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
  }

  // 3. both tiles' K and V loads issued before either is used: whole 16-byte vectors when the rows are aligned
  // (predicated, no branches: all of them in flight together), else element by element with zeros past D.
  const bool vec_ok = vec_aligned(p.k_cache, D) && vec_aligned(p.v_cache, D);
  uint4 rk[kAttnTiles][kLoads], rv[kAttnTiles][kLoads];
  auto slot_of = [&](int tile, int i) { return lo + tile * KT + (tid + i * kAttnThreads) / kVecsPerKey; };
  auto dim_of = [&](int i) { return int64_t((tid + i * kAttnThreads) % kVecsPerKey) * kN; };
  auto live = [&](int tile, int i) {
    const int64_t slot = slot_of(tile, i);
    return tid + i * kAttnThreads < KT * kVecsPerKey && slot <= max_pos && slot < S;
  };
  if (vec_ok) {
#pragma unroll
    for (int tile = 0; tile < kAttnTiles; ++tile)
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        rk[tile][i] = rv[tile][i] = make_uint4(0, 0, 0, 0);
        if (live(tile, i) && dim_of(i) < D) {
          rk[tile][i] = *reinterpret_cast<const uint4*>(K + slot_of(tile, i) * D + dim_of(i));
          rv[tile][i] = *reinterpret_cast<const uint4*>(V + slot_of(tile, i) * D + dim_of(i));
        }
      }
  } else {
#pragma unroll
    for (int tile = 0; tile < kAttnTiles; ++tile)
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const bool ok = live(tile, i);
        rk[tile][i] = load_raw<T, Load::kCoherent>(ok ? K + slot_of(tile, i) * D : nullptr, false, dim_of(i), D);
        rv[tile][i] = load_raw<T, Load::kCoherent>(ok ? V + slot_of(tile, i) * D : nullptr, false, dim_of(i), D);
      }
  }

  float4 acc[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

#pragma unroll
  for (int tile = 0; tile < kAttnTiles; ++tile) {
    const int64_t tlo = lo + tile * KT;
    if (tlo > max_pos) break;  // block-uniform
    // a. the tile into shared memory, as float (zeros past D, past S and past the block's last position)
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int idx = tid + i * kAttnThreads;
      if (idx < KT * kVecsPerKey) {
        const int key = idx / kVecsPerKey, d = (idx % kVecsPerKey) * kN;
        float kf[kN], vf[kN];
        widen<T>(rk[tile][i], kf);
        widen<T>(rv[tile][i], vf);
#pragma unroll
        for (int e = 0; e < kN; ++e) {
          s_k[key][d + e] = kf[e];
          s_v[key][d + e] = vf[e];
        }
      }
    }
    __syncthreads();
    // b. scores, one (row, key) per thread at a time, d ascending
    for (int idx = tid; idx < rows * KT; idx += kAttnThreads) {
      const int r = idx / KT, s = idx % KT;
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < DP; d += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(&s_q[r][d]);
        const float4 kv = *reinterpret_cast<const float4*>(&s_k[s][d]);
        dot = fmaf(qv.x, kv.x, dot);
        dot = fmaf(qv.y, kv.y, dot);
        dot = fmaf(qv.z, kv.z, dot);
        dot = fmaf(qv.w, kv.w, dot);
      }
      s_p[r][s] = dot * p.scale;
    }
    __syncthreads();
    // c. the online softmax step of each row over the tile: one warp per row, lane s holds key s
    for (int r = warp; r < rows; r += kAttnWarps) {
      const int64_t lim = s_pos[r] - tlo;  // keys s <= lim are at or before the row's position
      const bool seen = lane < KT && lane <= lim;
      const float sc = seen ? s_p[r][lane] : -INFINITY;
      const float m_old = s_m[r], l_old = s_l[r];
      const float m_new = fmaxf(m_old, warp_max(sc));
      const float corr = m_old == m_new ? 1.0f : expf(m_old - m_new);
      const float pv = (!seen || sc == -INFINITY) ? 0.0f : expf(sc - m_new);
      const float lt = warp_sum(pv);
      if (lane < KT) s_p[r][lane] = pv;
      if (lane == 0) {
        s_m[r] = m_new;
        s_l[r] = l_old * corr + lt;
        s_corr[r] = corr;
      }
    }
    __syncthreads();
    // d. acc = acc corr + sum_s p_s v_s over the keys the row sees
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int idx = tid + i * kAttnThreads;
      const int r = idx / (DP / 4), d = (idx % (DP / 4)) * 4;
      if (idx < R * DP / 4 && r < rows) {
        const float corr = s_corr[r];
        float4 a = acc[i];
        a.x *= corr;
        a.y *= corr;
        a.z *= corr;
        a.w *= corr;
        const int64_t lim = s_pos[r] - tlo;
        const int n = static_cast<int>(lim + 1 < KT ? lim + 1 : KT);
        for (int s = 0; s < n; ++s) {
          const float pv = s_p[r][s];
          const float4 v = *reinterpret_cast<const float4*>(&s_v[s][d]);
          a.x = fmaf(pv, v.x, a.x);
          a.y = fmaf(pv, v.y, a.y);
          a.z = fmaf(pv, v.z, a.z);
          a.w = fmaf(pv, v.w, a.w);
        }
        acc[i] = a;
      }
    }
    __syncthreads();  // s_k, s_v, s_p are rewritten by the next tile
  }

  // 4. the partials of the rows that see this chunk (the combine reads exactly those)
  const int64_t NC = attn_chunks<DP>(S);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int idx = tid + i * kAttnThreads;
    const int r = idx / (DP / 4), d = (idx % (DP / 4)) * 4;
    if (idx < R * DP / 4 && r < rows && s_pos[r] >= lo && s_pos[r] < S) {
      const int64_t row = r0 + r, t = row / G, h = kvh * G + row % G;
      float* o = p.part_acc + (((b * NC + c) * T_ + t) * nH + h) * D;
      const float v[4] = {acc[i].x, acc[i].y, acc[i].z, acc[i].w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (d + e < D) o[d + e] = v[e];
    }
  }
  if (tid < rows && s_pos[tid] >= lo && s_pos[tid] < S) {
    const int64_t row = r0 + tid, t = row / G, h = kvh * G + row % G;
    float* ml = p.part_ml + (((b * NC + c) * T_ + t) * nH + h) * 2;
    ml[0] = s_m[tid];
    ml[1] = s_l[tid];
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(AttnParams<T> p) {
  constexpr int LC = attn_chunk<DP>(), kPerLane = DP / 32;
  __shared__ float s_max[kCombineWarps];
  __shared__ float s_lw[kCombineWarps];
  __shared__ float s_o[kCombineWarps][DP];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t T_ = p.T, nH = p.nH, S = p.S, D = p.D, NC = attn_chunks<DP>(S);
  for (int64_t row = blockIdx.x; row < p.B * T_ * nH; row += gridDim.x) {  // row = (b T + t) nH + h
    const int64_t h = row % nH, bt = row / nH, t = bt % T_, b = bt / T_;
    const int64_t pos = p.start[b] + t;
    T* orow = p.out + row * D;
    if (pos < 0 || pos >= S) {
      for (int64_t d = tid; d < D; d += kCombineThreads) orow[d] = from_f32<T>(nan_f32());
      continue;  // block-uniform
    }
    const int64_t nc = pos / LC + 1;
    const float* ml = p.part_ml + ((b * NC * T_ + t) * nH + h) * 2;  // chunk c at ml + c * T nH 2
    const float* ac = p.part_acc + ((b * NC * T_ + t) * nH + h) * D;
    const int64_t ml_step = T_ * nH * 2, ac_step = T_ * nH * D;
    float mx = -INFINITY;
    for (int64_t c = tid; c < nc; c += kCombineThreads) mx = fmaxf(mx, ml[c * ml_step]);
    mx = warp_max(mx);
    if (lane == 0) s_max[warp] = mx;
    __syncthreads();
    float M = s_max[0];
    for (int w = 1; w < kCombineWarps; ++w) M = fmaxf(M, s_max[w]);
    float lw = 0.0f, o[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;
#pragma unroll 4
    for (int64_t c = warp; c < nc; c += kCombineWarps) {
      const float mc = ml[c * ml_step];
      const float wc = mc == -INFINITY ? 0.0f : expf(mc - M);  // a chunk whose keys all scored -inf weighs 0
      lw += ml[c * ml_step + 1] * wc;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) o[i] = fmaf(wc, ac[c * ac_step + d], o[i]);
      }
    }
    if (lane == 0) s_lw[warp] = lw;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) s_o[warp][lane + 32 * i] = o[i];
    __syncthreads();
    float L = s_lw[0];
    for (int w = 1; w < kCombineWarps; ++w) L += s_lw[w];
    const float inv_L = 1.0f / L;
    for (int64_t d = tid; d < D; d += kCombineThreads) {
      float v = s_o[0][d];
      for (int w = 1; w < kCombineWarps; ++w) v += s_o[w][d];
      orow[d] = from_f32<T>(v * inv_L);
    }
    __syncthreads();  // s_max, s_lw, s_o are reused by the next row
  }
}

template <typename T>
void launch_attention(AttnParams<T> p, float* scratch, cudaStream_t stream) {
  dispatch_head_dim(p.D, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const int64_t NC = attn_chunks<DP>(p.S), G = p.nH / p.nKV;
    const int64_t groups = (G * p.T + attn_rows<DP>() - 1) / attn_rows<DP>();
    p.part_ml = scratch;
    p.part_acc = scratch + p.B * NC * p.T * p.nH * 2;
    launch(attention_split_kernel<T, DP>, dim3(static_cast<unsigned>(NC), static_cast<unsigned>(p.nKV * groups),
                                               static_cast<unsigned>(p.B)),
           kAttnThreads, 0, stream, p);
    launch(attention_combine_kernel<T, DP>, grid_1d(p.B * p.T * p.nH, 1), kCombineThreads, 0, stream, p);
  });
}

template <typename Elt>
AttnParams<Elt> attention_params(const void* q, const void* k_cache, const void* v_cache, const int64_t* start,
                               void* out, int64_t B, int64_t T_, int64_t nH, int64_t nKV, int64_t S, int64_t D,
                               float scale) {
  AttnParams<Elt> p{};
  p.q = static_cast<const Elt*>(q);
  p.k_cache = static_cast<const Elt*>(k_cache);
  p.v_cache = static_cast<const Elt*>(v_cache);
  p.start = start;
  p.B = B;
  p.T = T_;
  p.nH = nH;
  p.nKV = nKV;
  p.S = S;
  p.D = D;
  p.scale = scale;
  p.out = static_cast<Elt*>(out);
  return p;
}

}  // namespace

static_assert(LAYERSKIP_MAX_HEAD_DIM <= 256, "attention.cu handles head dims up to 256");

int64_t attention_scratch(int64_t B, int64_t T, int64_t nH, int64_t S, int64_t D) {
  int64_t n = 0;
  dispatch_head_dim(D, [&](auto dp) { n = B * attn_chunks<decltype(dp)::value>(S) * T * nH * (D + 2); });
  return n;
}

void launch_cache_attention(DType dt, const void* q, const void* k_cache, const void* v_cache, const int64_t* start,
                            void* out, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t S, int64_t D, float scale,
                            float* scratch, cudaStream_t stream) {
  if (B * T * nH == 0 || D == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    launch_attention(attention_params<Ty>(q, k_cache, v_cache, start, out, B, T, nH, nKV, S, D, scale), scratch,
                     stream);
  });
}

void launch_decoder_attention(DType dt, const void* q, const void* k, const void* v, const int64_t* positions,
                              int64_t pos_stride_b, const float* cos, const float* sin, int64_t P, void* k_cache,
                              void* v_cache, const int64_t* start, void* out, int64_t B, int64_t T, int64_t nH,
                              int64_t nKV, int64_t S, int64_t D, float scale, float* scratch, cudaStream_t stream) {
  if (B * T * nH == 0 || D == 0) return;
  dispatch(dt, [&](auto tag) {
    using Ty = decltype(tag);
    AttnParams<Ty> p = attention_params<Ty>(q, k_cache, v_cache, start, out, B, T, nH, nKV, S, D, scale);
    p.k_cache_w = static_cast<Ty*>(k_cache);
    p.v_cache_w = static_cast<Ty*>(v_cache);
    p.k_new = static_cast<const Ty*>(k);
    p.v_new = static_cast<const Ty*>(v);
    p.positions = positions;
    p.pos_stride_b = pos_stride_b;
    p.P = P;
    p.cos = cos;
    p.sin = sin;
    launch_attention(p, scratch, stream);
  });
}

}  // namespace layerskip::cuda
