#!/usr/bin/env bash
# The structured mutation fuzzer of tests/fuzz.rs at scale: CASES cases (default
# 100000) from SEED (default 1). Reports the cases run, how many still loaded, and
# panics and escapes (files opened outside the model's folder); any panic or escape
# fails the run, a hang aborts it naming the case.
#
#   benches/fuzz.sh                 CASES=20000 SEED=7 benches/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LORA_GRAFT_FUZZ_CASES="${CASES:-100000}" LORA_GRAFT_FUZZ_SEED="${SEED:-1}" \
    cargo test --release --test fuzz -- --nocapture 2>&1 | grep -E "^fuzz:|panicked|hangs|test result"
