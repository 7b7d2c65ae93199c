// Portability macros shared by the CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__)
#define MELDKIT_HD __host__ __device__
#define MELDKIT_DEVICE __device__
#else
#define MELDKIT_HD
#define MELDKIT_DEVICE
#endif

#define MELDKIT_INLINE MELDKIT_HD inline
