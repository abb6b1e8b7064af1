// DuoAttention split-head paged decode: one launch computes decode attention for every
// (sequence, KV slot) pair, retrieval slots over all keys and streaming slots over sink + window.
//
// Work item = one CTA per (partition, slot, sequence). A slot's keys form a virtual range
// [0, n) (retrieval: all L keys; streaming: sink then window, never the gap between), split into
// partitions flash-decoding style. Each CTA loads every K/V row of its partition once (the
// tensor-core kernel through shared memory, the scalar one with 16-byte loads straight into
// registers) and uses it for all G query heads of the slot's group.
// An fp8 e4m3 cache (8-byte loads) is dequantized by folding k_scale into the query's score scale
// and v_scale into the output, so the inner loop only converts fp8 to float.
// One-partition rows are written directly; longer rows go through tmp_out/tmp_lse and a
// log-sum-exp combine kernel. The grid depends only on (partitions, slots, sequences), so the
// launch is CUDA-graph safe; per-row lengths are read on the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

#include "common.cuh"
#include "mma.cuh"
#include "ops.h"

namespace vllm_duo {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxGroup = 8;  // query heads per KV head held in registers
// Finite "no score yet": exp2(kNoScore - kNoScore) = 1 keeps empty lanes free of NaN.
constexpr float kNoScore = -1e30f;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeParams {
  void* out;
  const void* q;
  int64_t q_stride_seq, q_stride_head, out_stride_seq, out_stride_head;
  const int64_t* kv_ptrs;
  const int64_t* block_table_ptrs;
  const int64_t* block_table_strides;
  const int* slot_kv_head;
  const int* slot_streaming;
  const int* seq_lens;
  float* tmp_out;  // [num_seqs, num_q_heads, num_partitions, D], each partition normalised
  float* tmp_lse;  // [num_seqs, num_q_heads, num_partitions], log2 domain
  int num_q_heads, group, block_shift, block_mask, sink, window, partition_size, num_partitions;
  float scale_log2;  // softmax scale * log2(e): scores live in the exp2 domain
  const float* k_scale;  // fp8 cache: one-element dequantization scales on the device, else null
  const float* v_scale;
};

// Keys a (sequence, slot) attends, as virtual indices v in [0, n): v < sink_end is position v,
// otherwise position v - sink_end + win_start. Retrieval rows have sink_end = win_start = n = L.
struct KeyRange {
  int sink_end, win_start, n;
};

__device__ __forceinline__ KeyRange key_range(const DecodeParams& p, int seq, int slot) {
  const int L = p.seq_lens[seq];
  if (p.slot_streaming[slot] == 0) return {L, L, L};
  const int sink_end = min(p.sink, L);
  const int win_start = max(p.sink, L - p.window);
  return {sink_end, win_start, sink_end + max(0, L - win_start)};
}

// A row that needs more partitions than the launch has gets longer partitions, so the result is
// right whatever max_seq_len the launch was planned with (only the speed changes).
__device__ __forceinline__ int row_partitions(const DecodeParams& p, int n, int* psize) {
  *psize = max(p.partition_size, ceil_div(n, p.num_partitions));
  return max(1, ceil_div(n, *psize));
}

// A decode CTA's share of its (sequence, slot) row (grid: partition, slot, sequence).
template <typename T>
struct RowTask {
  KeyRange r;
  int psize, nparts, qh0;  // partition length and count; the group's first query head
  T* out;                  // the group's output rows
};

// Fills `w`; false when the CTA has nothing to compute: a padding slot, a partition past the row's
// end, or a padding row (`seq_len` 0), whose output it writes as zeros.
template <typename T, int D>
__device__ __forceinline__ bool row_task(const DecodeParams& p, RowTask<T>& w) {
  const int part = blockIdx.x, slot = blockIdx.y, seq = blockIdx.z;
  const int kv_head = p.slot_kv_head[slot];
  if (kv_head < 0) return false;
  w.r = key_range(p, seq, slot);
  w.nparts = row_partitions(p, w.r.n, &w.psize);
  if (part >= w.nparts) return false;
  w.qh0 = kv_head * p.group;
  w.out = static_cast<T*>(p.out) + seq * p.out_stride_seq + w.qh0 * p.out_stride_head;
  if (w.r.n == 0) {  // padding row: defined output, nothing read
    for (int i = threadIdx.x; i < p.group * D; i += kThreads)
      w.out[(i / D) * p.out_stride_head + i % D] = from_float<T>(0.f);
    return false;
  }
  return true;
}

// Joins the warps' states (each warp's output normalised by nothing yet: acc, max m, sum l per
// head, in shared memory) and stores the partition's result: `out` for a one-partition row, else
// the normalised partial output and its log2-domain LSE for the combine kernel.
template <typename T, int D, int GMAX, bool kFp8>
__device__ __forceinline__ void store_merged(const DecodeParams& p, const float (&s_acc)[kWarps][GMAX][D],
                                             const float (&s_m)[kWarps][GMAX],
                                             const float (&s_l)[kWarps][GMAX], T* out, int G,
                                             int nparts, int seq, int qh0, int part) {
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float mx = s_m[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(s_m[w][g] - mx);
      sum = fmaf(s_l[w][g], a, sum);
      o = fmaf(s_acc[w][g][d], a, o);
    }
    if constexpr (kFp8) o *= __ldg(p.v_scale);  // V was read unscaled; the combine is linear
    if (nparts == 1) {
      out[g * p.out_stride_head + d] = from_float<T>(o / sum);
    } else {
      const int64_t row = (int64_t(seq) * p.num_q_heads + qh0 + g) * p.num_partitions + part;
      p.tmp_out[row * D + d] = o / sum;
      if (d == 0) p.tmp_lse[row] = mx + log2f(sum);
    }
  }
}

// T: q/out type; C: cache element type, T or fp8 e4m3. R: vectors of kVec elements each thread
// owns of a K/V row (R = 1: D/8 threads per token; R = 2 halves the lanes per token, so each
// score takes one shuffle fewer and each exp2 is repeated on half as many lanes).
template <typename T, typename C, int D, int GMAX, int NT, int R>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeParams p) {
  constexpr bool kFp8 = std::is_same_v<C, __nv_fp8_e4m3>;
  constexpr int EPT = R * kVec;             // elements of a row per thread
  constexpr int TPT = D / EPT;              // threads sharing one token's K/V row
  constexpr int NGROUPS = kThreads / TPT;   // tokens the CTA reads side by side
  constexpr int STEP = NGROUPS * NT;        // tokens per loop iteration
  const int part = blockIdx.x, slot = blockIdx.y, seq = blockIdx.z;
  RowTask<T> w;
  if (!row_task<T, D>(p, w)) return;
  const KeyRange r = w.r;
  const int psize = w.psize, nparts = w.nparts, G = p.group, qh0 = w.qh0;
  T* out = w.out;

  const int lane_t = threadIdx.x % TPT, grp = threadIdx.x / TPT;
  float q_scale = p.scale_log2;
  if constexpr (kFp8) q_scale *= __ldg(p.k_scale);  // score = (q . k_fp8) * k_scale * scale
  float q[GMAX][R][kVec];
  const T* qp = static_cast<const T*>(p.q) + seq * p.q_stride_seq + qh0 * p.q_stride_head +
                lane_t * EPT;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (g < G) {
        to_float8<T>(load16(qp + g * p.q_stride_head + r * kVec), q[g][r]);
#pragma unroll
        for (int i = 0; i < kVec; ++i) q[g][r][i] *= q_scale;
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) q[g][r][i] = 0.f;  // padded head: computed, never stored
      }
    }
  }

  const C* kv = reinterpret_cast<const C*>(p.kv_ptrs[slot]);
  const int* bt = reinterpret_cast<const int*>(p.block_table_ptrs[slot]) +
                  seq * p.block_table_strides[slot];
  const int v_begin = part * psize, v_end = min(r.n, v_begin + psize);
  // Element offset of this thread's slice of key v's K row; -1 past the partition's end. Only
  // attended positions reach the block table, so gap entries are never even looked up.
  auto locate = [&](int v) -> int64_t {
    if (v >= v_end) return -1;
    const int pos = v < r.sink_end ? v : v - r.sink_end + r.win_start;
    const int64_t block = __ldg(bt + (pos >> p.block_shift));  // global, read-only path
    return ((block << p.block_shift) + (pos & p.block_mask)) * (2 * D) + lane_t * EPT;
  };

  float m[GMAX], l[GMAX], acc[GMAX][EPT];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = kNoScore;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPT; ++i) acc[g][i] = 0.f;
  }

  int64_t off[NT];  // block-table lookups run one iteration ahead of the K/V loads
#pragma unroll
  for (int j = 0; j < NT; ++j) off[j] = locate(v_begin + grp + j * NGROUPS);

  for (int base = v_begin; base < v_end; base += STEP) {
    CacheVec<C> kraw[NT][R], vraw[NT][R];
    bool valid[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      valid[j] = off[j] >= 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        kraw[j][r] = valid[j] ? load_vec(kv + off[j] + r * kVec) : CacheVec<C>{};
        vraw[j][r] = valid[j] ? load_vec(kv + off[j] + D + r * kVec) : CacheVec<C>{};
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) off[j] = locate(base + STEP + grp + j * NGROUPS);

    float s[NT][GMAX];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float kf[R][kVec];
#pragma unroll
      for (int r = 0; r < R; ++r) to_float8<C>(kraw[j][r], kf[r]);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < kVec; ++i) dot = fmaf(q[g][r][i], kf[r][i], dot);
        dot = group_sum<TPT>(dot);  // every lane shuffles, valid or not
        s[j][g] = valid[j] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mx = m[g];
#pragma unroll
      for (int j = 0; j < NT; ++j) mx = fmaxf(mx, s[j][g]);
      const float alpha = exp2f(m[g] - mx);
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < EPT; ++i) acc[g][i] *= alpha;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float vf[R][kVec];
#pragma unroll
      for (int r = 0; r < R; ++r) to_float8<C>(vraw[j][r], vf[r]);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float pj = exp2f(s[j][g] - m[g]);
        l[g] += pj;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[g][r * kVec + i] = fmaf(pj, vf[r][i], acc[g][r * kVec + i]);
      }
    }
  }

  // Merge the token groups: first inside each warp with shuffles, then across warps in smem.
  __shared__ float s_acc[kWarps][GMAX][D];
  __shared__ float s_m[kWarps][GMAX], s_l[kWarps][GMAX];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    float mw = m[g];
#pragma unroll
    for (int o = TPT; o < kWarp; o <<= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, o));
    const float a = exp2f(m[g] - mw);
    float lw = l[g] * a;
#pragma unroll
    for (int o = TPT; o < kWarp; o <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, o);
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      float x = acc[g][i] * a;
#pragma unroll
      for (int o = TPT; o < kWarp; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      acc[g][i] = x;
    }
    if (lane < TPT) {
      float4* dst = reinterpret_cast<float4*>(&s_acc[warp][g][lane * EPT]);
#pragma unroll
      for (int i = 0; i < EPT / 4; ++i)
        dst[i] = make_float4(acc[g][4 * i], acc[g][4 * i + 1], acc[g][4 * i + 2], acc[g][4 * i + 3]);
    }
    if (lane == 0) {
      s_m[warp][g] = mw;
      s_l[warp][g] = lw;
    }
  }
  __syncthreads();
  store_merged<T, D, GMAX, kFp8>(p, s_acc, s_m, s_l, out, G, nparts, seq, qh0, part);
}

// Shared-memory tiles of the tensor-core kernel: per warp kStages tiles of 16 cache rows (K then V,
// as stored). 16-byte chunk c of row r sits at chunk c ^ swizzle(r): the fragment reads of 8
// lanes (one shared-memory wavefront) then hit 8 different bank groups, for K (rows g, chunks
// t + 4i) and for V (rows 2t + s, chunks g + 8i) alike (2-byte caches).
template <typename C, int D>
struct MmaSmem {
  static constexpr int kStages = 3;
  static constexpr int kRowBytes = 2 * D * int(sizeof(C));
  static constexpr int kTileBytes = 16 * kRowBytes;
  static constexpr int kBytes = kWarps * kStages * kTileBytes;
  static_assert(kRowBytes >= 128, "the swizzle permutes 8 chunks of a row");
};

template <int kRowBytes>
__device__ __forceinline__ int smem_offset(int row, int byte) {
  const int swizzle = ((row & 1) << 2) ^ (((row >> 1) & 3) << 1);
  return row * kRowBytes + (((byte >> 4) ^ swizzle) << 4) + (byte & 15);
}

// Tensor-core variant for head_dim 64 and 128 (any G <= 8), 2-byte or fp8 e4m3 caches. Each warp
// takes tiles of 16 keys (tile w, w + 4, ... of the partition); S = q K^T and O += P V run as
// mma.sync m16n8k16 with the group's query heads as rows (rows G..15 zero), so a key costs a few
// instructions where the scalar kernel issues hundreds.
// Loads: cp.async copies a tile's 16 cache rows to shared memory, one 16-byte chunk per lane, so
// each copy instruction reads whole rows in full 128-byte lines, and kStages - 1 tiles per warp
// are in flight while one is computed, without holding registers. (Loading the fragments straight
// into registers reads 64-byte pieces of a row: 80 % of DRAM peak with the L2 at 90 %, Nsight
// Compute on the H200; this reaches FA3's bandwidth.) A tile's block-table lookups run one tile
// ahead of its copy.
// Fragments, read back from shared memory (lane = 4g + t; tile token n (0..15) is key start + n):
// - K: lane (g, t) reads tokens g and 8 + g, elements 32i + 8t .. +8 (i < D/32). The QK mma of
//   k-chunk c (i = c/2, h = c%2) takes dims 32i + 8t + 4h + {0,1} (b0) and + {2,3} (b1); q is
//   read in the same order (a0, a2), so each score sums all D products, in another order.
// - V: lane (g, t) reads tokens 2t, 2t+1, 2t+8, 2t+9, elements 64i + 8g .. +8 (i < D/64). Output
//   tile j (8 dims) holds in lane (g, t) dims 64(j/8) + 16t + j%8 (c0) and that + 8 (c1) of head g.
// P goes to the PV mma in the mma's 16-bit type, as FA3 does. An fp8 cache is converted pairwise
// to fp16 (exact) and the mma runs in fp16, q stored as fp16(q / 16) (exact for |q| < 2^20; the
// 16 and k_scale go into the score scale), v_scale into the merged output.
template <typename T, typename C, int D>
__global__ void __launch_bounds__(kThreads) paged_decode_mma_kernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "tensor-core decode: head_dim 64 or 128");
  constexpr bool kFp8 = std::is_same_v<C, __nv_fp8_e4m3>;
  using M = std::conditional_t<kFp8, __half, T>;  // mma element type
  using Sm = MmaSmem<C, D>;
  constexpr int kStages = Sm::kStages;
  constexpr int KV = D / 32, VV = D / 64, NTILE = 16, NJ = D / 8, kChunks = Sm::kRowBytes / 16;
  constexpr float kQDiv = 16.f;  // fp8: q / 16 in fp16 keeps |q| up to 2^20 finite
  const int part = blockIdx.x, slot = blockIdx.y, seq = blockIdx.z;
  RowTask<T> w;
  if (!row_task<T, D>(p, w)) return;
  const KeyRange r = w.r;
  const int psize = w.psize, nparts = w.nparts, G = p.group, qh0 = w.qh0;
  T* out = w.out;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  // The group's q (rows past G zero) in shared memory: each QK mma reads its A words from there.
  __shared__ __align__(16) M s_q[kMaxGroup][D];
  const T* qp = static_cast<const T*>(p.q) + seq * p.q_stride_seq + qh0 * p.q_stride_head;
  for (int i = threadIdx.x; i < kMaxGroup * D / kVec; i += kThreads) {
    const int h = i / (D / kVec), d = (i % (D / kVec)) * kVec;
    uint4 w = make_uint4(0, 0, 0, 0);
    if (h < G) {
      w = load16(qp + h * p.q_stride_head + d);
      if constexpr (kFp8) {
        float f[kVec];
        to_float8<T>(w, f);
        uint32_t* hw = reinterpret_cast<uint32_t*>(&w);
#pragma unroll
        for (int k = 0; k < kVec / 2; ++k) hw[k] = pack2<__half>(f[2 * k] / kQDiv, f[2 * k + 1] / kQDiv);
      }
    }
    *reinterpret_cast<uint4*>(&s_q[h][d]) = w;
  }
  __syncthreads();
  float s_scale = p.scale_log2;
  if constexpr (kFp8) s_scale *= __ldg(p.k_scale) * kQDiv;

  const C* kv = reinterpret_cast<const C*>(p.kv_ptrs[slot]);
  const int* bt = reinterpret_cast<const int*>(p.block_table_ptrs[slot]) +
                  seq * p.block_table_strides[slot];
  const int v_begin = part * psize, v_end = min(r.n, v_begin + psize);
  // Cache row of this lane's token of the tile at `start` (lanes 0..15), -1 past the partition.
  auto lookup = [&](int start) -> int {
    const int v = start + lane;
    if (lane >= NTILE || v >= v_end) return -1;
    const int pos = v < r.sink_end ? v : v - r.sink_end + r.win_start;
    return (__ldg(bt + (pos >> p.block_shift)) << p.block_shift) + (pos & p.block_mask);
  };
  extern __shared__ __align__(128) unsigned char s_dyn[];
  unsigned char* s_tiles = s_dyn + warp * kStages * Sm::kTileBytes;
  const unsigned char* kv_bytes = reinterpret_cast<const unsigned char*>(kv);
  // Copies the tile whose rows lanes 0..15 hold (`row`, -1: zeros) into stage `stage`.
  auto issue = [&](int stage, int row) {
    unsigned char* dst = s_tiles + stage * Sm::kTileBytes;
#pragma unroll
    for (int j = 0; j < kChunks / 2; ++j) {
      const int c = lane + kWarp * j, rt = c / kChunks, ch = c % kChunks;
      const int rr = __shfl_sync(0xffffffffu, row, rt);
      cp_async16(dst + smem_offset<Sm::kRowBytes>(rt, 16 * ch),
                 kv_bytes + int64_t(max(rr, 0)) * Sm::kRowBytes + 16 * ch, rr >= 0);
    }
  };
  struct Tile {
    CacheVec<C> k[2][KV], v[4][VV];
  };
  auto read = [&](Tile& b, int stage) {
    const unsigned char* src = s_tiles + stage * Sm::kTileBytes;
    auto vec = [&](int rt, int e) {
      return *reinterpret_cast<const CacheVec<C>*>(src + smem_offset<Sm::kRowBytes>(rt, e * int(sizeof(C))));
    };
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int i = 0; i < KV; ++i) b.k[u][i] = vec(8 * u + g, 8 * t + 32 * i);
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int i = 0; i < VV; ++i) b.v[s][i] = vec(2 * t + (s & 1) + 8 * (s >> 1), D + 8 * g + 64 * i);
  };

  float m = kNoScore, l = 0.f, acc[NJ][2];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = 0.f;
  auto consume = [&](const Tile& b, int start) {
    float s[2][2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][1] = 0.f;
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        const uint2 qw = *reinterpret_cast<const uint2*>(&s_q[g][32 * (c / 2) + 8 * t + 4 * (c % 2)]);
        mma_rows8<M>(s[u], qw.x, qw.y, word16<C>(b.k[u][c / 2], 2 * (c % 2)),
                     word16<C>(b.k[u][c / 2], 2 * (c % 2) + 1));
      }
    }
    float mx = kNoScore;
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[u][e] = start + 8 * u + 2 * t + e < v_end ? s[u][e] * s_scale : -INFINITY;
        mx = fmaxf(mx, s[u][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx), alpha = exp2f(m - m_new);
    m = m_new;
    float pr[2][2];
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int e = 0; e < 2; ++e) pr[u][e] = exp2f(s[u][e] - m);
    l = l * alpha + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    const uint32_t pa0 = pack2<M>(pr[0][0], pr[0][1]), pa2 = pack2<M>(pr[1][0], pr[1][1]);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int i = j / 8, w = (j % 8) / 2, e = j % 2;
      const uint32_t b0 = pair16(word16<C>(b.v[0][i], w), word16<C>(b.v[1][i], w), e);
      const uint32_t b1 = pair16(word16<C>(b.v[2][i], w), word16<C>(b.v[3][i], w), e);
      acc[j][0] *= alpha;
      acc[j][1] *= alpha;
      mma_rows8<M>(acc[j], pa0, pa2, b0, b1);
    }
  };

  // kStages - 1 tiles in flight; each iteration refills the stage the previous one computed.
  constexpr int kStride = kWarps * NTILE;
  const int first = v_begin + warp * NTILE;
  const int ntiles = first < v_end ? ceil_div(v_end - first, kStride) : 0;
  int row = lookup(first);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) {
      issue(s, row);
      row = lookup(first + (s + 1) * kStride);
    }
    cp_async_commit();
  }
  for (int k = 0; k < ntiles; ++k) {
    const int nk = k + kStages - 1;
    if (nk < ntiles) {
      issue(nk % kStages, row);
      row = lookup(first + (nk + 1) * kStride);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    Tile b;
    read(b, k % kStages);
    consume(b, first + k * kStride);
    __syncwarp();
  }
  cp_async_wait<0>();

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  // The warps' states go where the tiles were, once every warp is done with its tiles.
  __syncthreads();
  auto& s_acc = *reinterpret_cast<float (*)[kWarps][kMaxGroup][D]>(s_dyn);
  __shared__ float s_m[kWarps][kMaxGroup], s_l[kWarps][kMaxGroup];
  if (g < G) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int d = 64 * (j / 8) + 16 * t + j % 8;
      s_acc[warp][g][d] = acc[j][0];
      s_acc[warp][g][d + 8] = acc[j][1];
    }
    if (t == 0) {
      s_m[warp][g] = m;
      s_l[warp][g] = l;
    }
  }
  __syncthreads();
  store_merged<T, D, kMaxGroup, kFp8>(p, s_acc, s_m, s_l, out, G, nparts, seq, qh0, part);
}

// Joins a multi-partition row: out = sum_j w_j out_j / sum_j w_j with w_j = 2^(lse_j - max lse).
// One CTA per (query head in group, slot, sequence), one thread per output element.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const DecodeParams p) {
  const int g = blockIdx.x, slot = blockIdx.y, seq = blockIdx.z;
  const int kv_head = p.slot_kv_head[slot];
  if (kv_head < 0) return;
  const KeyRange r = key_range(p, seq, slot);
  int psize;
  const int nparts = row_partitions(p, r.n, &psize);
  if (nparts == 1) return;  // written directly by the decode kernel
  const int qh = kv_head * p.group + g;
  const int64_t row = (int64_t(seq) * p.num_q_heads + qh) * p.num_partitions;
  const float* lse = p.tmp_lse + row;
  extern __shared__ float s_w[];  // [num_partitions] weights, then one float per warp
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < nparts; j += D) mx = fmaxf(mx, lse[j]);
  mx = block_max(mx, s_w + p.num_partitions);
  for (int j = threadIdx.x; j < nparts; j += D) s_w[j] = exp2f(lse[j] - mx);
  __syncthreads();
  const float* part_out = p.tmp_out + row * D + threadIdx.x;
  float o = 0.f, sum = 0.f;
#pragma unroll 4
  for (int j = 0; j < nparts; ++j) {
    sum += s_w[j];
    o = fmaf(s_w[j], part_out[int64_t(j) * D], o);
  }
  T* out = static_cast<T*>(p.out) + seq * p.out_stride_seq + qh * p.out_stride_head;
  out[threadIdx.x] = from_float<T>(o / sum);
}

// Tokens per thread group per iteration: more in flight when fewer heads hold registers.
template <int GMAX>
constexpr int tokens_in_flight() {
  return GMAX <= 2 ? 8 : (GMAX <= 4 ? 4 : 2);
}

// Head_dim 64 / 128 takes the tensor-core kernel (where the GPU has the shared memory for it,
// `launch_mma`) unless VLLM_DUO_DECODE_KERNEL=scalar, read at each launch (a captured graph keeps
// the kernel it was captured with).
bool tensor_core_decode() {
  const char* e = std::getenv("VLLM_DUO_DECODE_KERNEL");
  return !(e && std::string(e) == "scalar");
}

// The tiles need more than the 48 KB of shared memory a launch gets by default: the limit is
// raised once per kernel and device (a function attribute, so not part of a captured graph). A
// GPU whose per-block maximum is smaller (sm_86/sm_89: 99 KB, short of the 96 KB of tiles plus
// the kernel's own at D = 128) gets false, and the caller launches the scalar kernel.
template <typename T, typename C, int D>
bool launch_mma(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int smem = MmaSmem<C, D>::kBytes;
  static_assert(smem >= int(sizeof(float)) * kWarps * kMaxGroup * D, "the merge reuses the tiles");
  static std::atomic<uint64_t> raised{0}, too_small{0};  // bit per device index (mod 64)
  const int device = c10::cuda::current_device();
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (too_small.load(std::memory_order_relaxed) & bit) return false;
  if (!(raised.load(std::memory_order_relaxed) & bit)) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, paged_decode_mma_kernel<T, C, D>));
    if (static_cast<int>(attr.sharedSizeBytes) + smem > optin) {
      too_small.fetch_or(bit);
      return false;
    }
    C10_CUDA_CHECK(cudaFuncSetAttribute(paged_decode_mma_kernel<T, C, D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    raised.fetch_or(bit);
  }
  paged_decode_mma_kernel<T, C, D><<<grid, kThreads, smem, stream>>>(p);
  return true;
}

// Lanes per token. At head_dim 128 with 3-4 query heads per KV head, D/16 lanes (R = 2: each
// score takes one shuffle fewer, each exp2 runs on half as many lanes) took 0.95x the time of
// D/8 lanes in bf16 and 0.82x in fp8 (H200, 64K keys, batch 16, 50 % streaming heads;
// docs/results.md, eighth session). Elsewhere D/8: G 8 with R = 2 spills (ptxas), and G <= 2
// and other head dims were not measured.
template <typename T, typename C, int D, int GMAX>
void launch(const DecodeParams& p, int num_seqs, int num_slots, cudaStream_t stream) {
  constexpr int R = (D == 128 && GMAX == 4) ? 2 : 1;
  const dim3 grid(p.num_partitions, num_slots, num_seqs);
  if constexpr (D == 64 || D == 128) {
    if (!(tensor_core_decode() && launch_mma<T, C, D>(p, grid, stream)))
      paged_decode_kernel<T, C, D, GMAX, tokens_in_flight<GMAX>(), R><<<grid, kThreads, 0, stream>>>(p);
  } else {
    paged_decode_kernel<T, C, D, GMAX, tokens_in_flight<GMAX>(), R><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_partitions > 1) {
    const size_t smem = (p.num_partitions + D / kWarp) * sizeof(float);
    combine_kernel<T, D><<<dim3(p.group, num_slots, num_seqs), D, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename C, int D>
void dispatch_group(const DecodeParams& p, int num_seqs, int num_slots, cudaStream_t stream) {
  if (p.group <= 1) return launch<T, C, D, 1>(p, num_seqs, num_slots, stream);
  if (p.group <= 2) return launch<T, C, D, 2>(p, num_seqs, num_slots, stream);
  if (p.group <= 4) return launch<T, C, D, 4>(p, num_seqs, num_slots, stream);
  launch<T, C, D, kMaxGroup>(p, num_seqs, num_slots, stream);
}

template <typename T, typename C>
void dispatch_head_dim(const DecodeParams& p, int head_dim, int num_seqs, int num_slots,
                       cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_group<T, C, 64>(p, num_seqs, num_slots, stream);
    case 128: return dispatch_group<T, C, 128>(p, num_seqs, num_slots, stream);
    case 256: return dispatch_group<T, C, 256>(p, num_seqs, num_slots, stream);
    default: TORCH_CHECK(false, "paged_decode: unsupported head_dim ", head_dim);
  }
}

void check_slot_vector(const at::Tensor& t, const char* name, at::ScalarType dtype,
                       int64_t num_slots, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "paged_decode: ", name, " must be on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "paged_decode: ", name, " must be ", dtype);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_slots && t.is_contiguous(), "paged_decode: ",
              name, " must be a contiguous [num_slots=", num_slots, "] vector");
}

}  // namespace

void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_ptrs,
                  const at::Tensor& block_table_ptrs, const at::Tensor& block_table_strides,
                  const at::Tensor& slot_kv_head, const at::Tensor& slot_streaming,
                  const at::Tensor& seq_lens, int64_t num_kv_heads, int64_t block_size,
                  int64_t sink_size, int64_t window, double scale, int64_t partition_size,
                  at::Tensor& tmp_out, at::Tensor& tmp_lse,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.is_cuda(), "paged_decode: q must be a CUDA tensor");
  const at::Device device = q.device();
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "paged_decode: q must be bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [num_seqs, num_q_heads, head_dim]");
  const int64_t num_seqs = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(out.device() == device && out.scalar_type() == dtype && out.sizes() == q.sizes(),
              "paged_decode: out must match q in device, dtype and shape");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) % kVec == 0 && q.stride(0) % kVec == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "paged_decode: q needs a contiguous, 16-byte aligned last dimension");
  TORCH_CHECK(out.stride(2) == 1, "paged_decode: out needs a contiguous last dimension");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0,
              "paged_decode: num_q_heads (", num_q_heads, ") must be a multiple of num_kv_heads (",
              num_kv_heads, ")");
  const int64_t group = num_q_heads / num_kv_heads;
  TORCH_CHECK(group <= kMaxGroup, "paged_decode: at most ", kMaxGroup,
              " query heads per KV head, got ", group);
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0,
              "paged_decode: block_size must be a power of two, got ", block_size);
  TORCH_CHECK(sink_size >= 0 && window >= 1, "paged_decode: need sink_size >= 0 and window >= 1");
  TORCH_CHECK(partition_size >= 1, "paged_decode: partition_size must be positive");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(sink_size <= kIntMax && window <= kIntMax && partition_size <= kIntMax,
              "paged_decode: sink_size, window and partition_size must fit in int32");
  const int64_t num_slots = kv_ptrs.numel();
  check_slot_vector(kv_ptrs, "kv_ptrs", at::kLong, num_slots, device);
  check_slot_vector(block_table_ptrs, "block_table_ptrs", at::kLong, num_slots, device);
  check_slot_vector(block_table_strides, "block_table_strides", at::kLong, num_slots, device);
  check_slot_vector(slot_kv_head, "slot_kv_head", at::kInt, num_slots, device);
  check_slot_vector(slot_streaming, "slot_streaming", at::kInt, num_slots, device);
  TORCH_CHECK(seq_lens.device() == device && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.dim() == 1 && seq_lens.size(0) == num_seqs && seq_lens.is_contiguous(),
              "paged_decode: seq_lens must be a contiguous int32 [num_seqs] tensor on ", device);
  TORCH_CHECK(tmp_lse.device() == device && tmp_lse.scalar_type() == at::kFloat &&
                  tmp_lse.dim() == 3 && tmp_lse.is_contiguous() && tmp_lse.size(0) == num_seqs &&
                  tmp_lse.size(1) == num_q_heads && tmp_lse.size(2) >= 1,
              "paged_decode: tmp_lse must be contiguous float32 [num_seqs, num_q_heads, P]");
  const int64_t num_partitions = tmp_lse.size(2);
  TORCH_CHECK(tmp_out.device() == device && tmp_out.scalar_type() == at::kFloat &&
                  tmp_out.is_contiguous() &&
                  tmp_out.sizes() == at::IntArrayRef({num_seqs, num_q_heads, num_partitions,
                                                      head_dim}),
              "paged_decode: tmp_out must be contiguous float32 [num_seqs, num_q_heads, P, "
              "head_dim] with P = tmp_lse.size(2)");
  TORCH_CHECK(num_seqs <= 65535 && num_slots <= 65535 && num_partitions <= 8192,
              "paged_decode: at most 65535 sequences, 65535 slots and 8192 partitions");
  const bool fp8 = check_kv_scales("paged_decode", k_scale, v_scale, device);
  if (num_seqs == 0 || num_slots == 0) return;

  DecodeParams p;
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.q_stride_seq = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.out_stride_seq = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.kv_ptrs = kv_ptrs.data_ptr<int64_t>();
  p.block_table_ptrs = block_table_ptrs.data_ptr<int64_t>();
  p.block_table_strides = block_table_strides.data_ptr<int64_t>();
  p.slot_kv_head = slot_kv_head.data_ptr<int>();
  p.slot_streaming = slot_streaming.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.tmp_out = tmp_out.data_ptr<float>();
  p.tmp_lse = tmp_lse.data_ptr<float>();
  p.k_scale = fp8 ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 ? v_scale->data_ptr<float>() : nullptr;
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.group = static_cast<int>(group);
  p.block_shift = __builtin_ctzll(block_size);
  p.block_mask = static_cast<int>(block_size - 1);
  p.sink = static_cast<int>(sink_size);
  p.window = static_cast<int>(window);
  p.partition_size = static_cast<int>(partition_size);
  p.num_partitions = static_cast<int>(num_partitions);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int seqs = static_cast<int>(num_seqs), slots = static_cast<int>(num_slots);
  const int d = static_cast<int>(head_dim);
  if (dtype == at::kBFloat16 && fp8)
    dispatch_head_dim<__nv_bfloat16, __nv_fp8_e4m3>(p, d, seqs, slots, stream);
  else if (dtype == at::kBFloat16)
    dispatch_head_dim<__nv_bfloat16, __nv_bfloat16>(p, d, seqs, slots, stream);
  else if (fp8)
    dispatch_head_dim<__half, __nv_fp8_e4m3>(p, d, seqs, slots, stream);
  else
    dispatch_head_dim<__half, __half>(p, d, seqs, slots, stream);
}

}  // namespace vllm_duo
