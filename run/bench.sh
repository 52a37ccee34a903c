#!/usr/bin/env bash
# The main job: the prefill benchmark on its embedded default (Llama-3.3-70B shapes over all
# local GPUs; the tiny preset on 8 virtual CPU devices where there is no GPU).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
exec python run/bench_prefill.py "$@"
