#!/usr/bin/env bash
# Serve a tlq_hf checkpoint with vLLM (documented, not executed by the tests: vLLM needs a GPU).
#
#   python examples/quantize_on_load.py --model Qwen/Qwen2-VL-2B-Instruct --out qwen2-vl-2b-tlq-w4
#   bash examples/serve_with_vllm.sh qwen2-vl-2b-tlq-w4
#
# The default save format is compressed-tensors with the decoder's linears packed and the vision tower,
# projector and lm_head listed in `ignore` as anchored regexes, which vLLM's loader matches under its own
# module names (tests/test_vllm_names.py checks this for every supported family). vLLM's GPU kernels take
# 4- and 8-bit weights (W4A16, W8A8, W4A8); W3/W2 checkpoints load in transformers, and in vLLM only where a
# kernel for that width exists.
set -euo pipefail
CHECKPOINT="${1:-qwen2-vl-2b-tlq-w4}"
vllm serve "$CHECKPOINT" --max-model-len 4096 --limit-mm-per-prompt '{"image": 1}'
# then, e.g.:
# curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
#   "model": "'"$CHECKPOINT"'",
#   "messages": [{"role": "user", "content": [
#     {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/wikipedia/commons/3/3a/Cat03.jpg"}},
#     {"type": "text", "text": "What is in the picture?"}]}]}'
