// A 64-bit FNV-1a hash, for fingerprints (model identity, token history), not for security.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace sambay {

struct fnv1a {
    uint64_t h = 0xcbf29ce484222325ull;
    void add(const void * p, size_t n) {
        const uint8_t * b = (const uint8_t *) p;
        for (size_t i = 0; i < n; ++i) {
            h ^= b[i];
            h *= 0x100000001b3ull;
        }
    }
    template <typename T> void add(const T & v) { add(&v, sizeof(v)); }
    void add(const std::string & s) { add(s.size()); add(s.data(), s.size()); }
};

} // namespace sambay
