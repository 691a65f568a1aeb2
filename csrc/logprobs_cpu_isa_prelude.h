// Included first by the ISA-specific kernel files (csrc/logprobs_cpu_avx2.cpp, _avx512.cpp), BEFORE
// their `#pragma GCC target`: every header that defines inline functions outside the at::vec::<ISA>
// namespace is parsed here for the baseline ISA, so no AVX-compiled copy of a shared inline function
// (c10::BFloat16 conversions, <cmath>, ...) can be picked by the linker for code that runs anywhere.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>

#include "logprobs_cpu.h"
