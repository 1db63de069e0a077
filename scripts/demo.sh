#!/usr/bin/env bash
# The whole job on the embedded default, on CPU: convert SmolLM2-135M into a 1/4-softmax hybrid
# (demo budget), serve it with vLLM, and answer one chat request through the official openai client,
# printed beside the teacher's own greedy answer (transformers) so the gap the CPU budget leaves shows.
# Rerunning resumes an interrupted conversion and reuses a finished one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2-demo}
PORT=${PORT:-8011}
export PATH="$PWD/.venv/bin:$PATH"

if [ ! -f "$OUT/config.json" ]; then
  hybrid convert --teacher smollm2-135m --data demo --ratio 0.25 --preset demo --out "$OUT"
fi
hybrid info "$OUT"

hybrid serve "$OUT" --port "$PORT" --served-model-name smollm2-hybrid --max-model-len 2048 --kv-cache-space 1 \
  > "$OUT.serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
echo "waiting for the server (about a minute on 2 cores; log: $OUT.serve.log)"
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -30 "$OUT.serve.log"; exit 1; }
  sleep 2
done

python - "$PORT" <<'PY'
import sys

from openai import OpenAI

from distill.model.teacher import load_teacher

messages = [{"role": "user", "content": "What is the capital of France?"}]
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
reply = client.chat.completions.create(model="smollm2-hybrid", messages=messages, max_tokens=48, temperature=0)
text = reply.choices[0].message.content or ""
print("hybrid  (vLLM):        ", text if text.strip() else
      f"{text!r} ({reply.usage.completion_tokens} tokens, finish_reason {reply.choices[0].finish_reason}: the demo "
      "budget leaves the hybrid far from its teacher)")

teacher, tokenizer = load_teacher("smollm2-135m")
prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   return_tensors="pt", add_special_tokens=False)
answer = teacher.generate(**prompt, max_new_tokens=48, do_sample=False)
print("teacher (transformers):", tokenizer.decode(answer[0, prompt.input_ids.shape[1]:], skip_special_tokens=True))
PY
