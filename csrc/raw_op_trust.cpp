// The per-thread "trusted call" flag of csrc/raw_op_trust.h, set from Python through
// torch.ops.fastvision_contract.trust_raw_calls (a namespace of its own: it is no kernel of an op).
#include "raw_op_trust.h"

#include <torch/library.h>

namespace fastvision {
namespace {

thread_local bool trusted = false;

// Sets this thread's flag and returns the previous value (the caller restores it).
bool trust_raw_calls(bool value) {
  const bool previous = trusted;
  trusted = value;
  return previous;
}

}  // namespace

bool raw_op_calls_trusted() { return trusted; }

TORCH_LIBRARY(fastvision_contract, m) { m.def("trust_raw_calls(bool trusted) -> bool", &trust_raw_calls); }

}  // namespace fastvision
