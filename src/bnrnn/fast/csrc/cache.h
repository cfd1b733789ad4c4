// The buffer cache of the compiled loops.
//
// The fast path's internal buffers (the saved W_hh h and c, the backward's gradient
// buffers, the GEMMs' weight copies, ...) are large and short-lived: a fresh one from the
// system costs its page faults on first touch. Freed blocks are kept and handed out again
// for requests of their size or up to a fifth smaller (a block at most 1.25 times the
// request), as PyTorch's CUDA caching allocator does, up to a limit of free bytes.
//
//   cached_empty(n, dtype) -> (n,)   an uninitialised tensor whose memory comes from the
//                                     cache and returns to it when the tensor is freed
//   set_cache_limit(bytes) -> old    the most free bytes kept (0: keep none)
//   empty_cache()                    return every free block to the system
//   cache_info() -> [free bytes, free blocks, limit]

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace bnrnn_fast {

struct Cache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // by size
  size_t free_bytes = 0;
  size_t limit = size_t(1) << 30;
  static constexpr size_t ALIGN = 4096, GRAIN = 64 << 10;

  std::pair<void*, size_t> take(size_t bytes) {
    bytes = std::max<size_t>(GRAIN, (bytes + GRAIN - 1) / GRAIN * GRAIN);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_blocks.lower_bound(bytes);
      if (it != free_blocks.end() && it->first <= bytes + bytes / 4) {
        auto block = std::make_pair(it->second, it->first);
        free_bytes -= it->first;
        free_blocks.erase(it);
        return block;
      }
    }
    void* p = std::aligned_alloc(ALIGN, bytes);
    if (!p) {  // free what is kept, then try once more
      release();
      p = std::aligned_alloc(ALIGN, bytes);
    }
    TORCH_CHECK(p, "bnrnn_fast: out of memory allocating ", bytes, " bytes");
    return {p, bytes};
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (free_bytes + bytes <= limit) {
        free_blocks.emplace(bytes, p);
        free_bytes += bytes;
        return;
      }
    }
    std::free(p);
  }
  void release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu);
      blocks.swap(free_blocks);
      free_bytes = 0;
    }
    for (auto& b : blocks) std::free(b.second);
  }
};

inline Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: tensors may outlive static destruction
  return *c;
}

// An uninitialised 1-d tensor of n elements from the cache.
inline at::Tensor cached_empty(int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0, "cached_empty: negative size");
  auto [p, bytes] = cache().take(size_t(n) * at::elementSize(dtype));
  return at::from_blob(
      p, {n}, [bytes = bytes](void* q) { cache().give(q, bytes); },
      at::TensorOptions().dtype(dtype));
}

inline int64_t set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cache_limit: negative limit");
  std::lock_guard<std::mutex> lock(cache().mu);
  const int64_t old = (int64_t)cache().limit;
  cache().limit = (size_t)bytes;
  return old;
}

inline void empty_cache() { cache().release(); }

inline std::vector<int64_t> cache_info() {  // free bytes kept, free blocks kept, limit
  std::lock_guard<std::mutex> lock(cache().mu);
  return {(int64_t)cache().free_bytes, (int64_t)cache().free_blocks.size(),
          (int64_t)cache().limit};
}

}  // namespace bnrnn_fast
