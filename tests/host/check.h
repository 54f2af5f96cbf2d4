// check.h -- the failure counter and printf-style CHECK shared by the host-compiled kernel tests.
#pragma once

#include <cstdio>

static int failures = 0;

// CHECK(condition, printf-format, args...): count a failure and print the first 20.
#define CHECK(cond, ...)                                \
  do {                                                  \
    if (!(cond) && ++failures <= 20) {                  \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
    }                                                   \
  } while (0)
