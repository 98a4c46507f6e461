"""Greedy answers of vLLM (run with the vLLM environment's Python, ``make test-engines``):
the base, each PEFT LoRA alone, and one batch with a LoRA per prompt.

    python engines/vllm_generate.py REQUEST.json OUT.json

REQUEST: ``{"model": folder, "prompts": [token ids, ...], "loras": {name: folder},
"mixed": [name per prompt], "max_new_tokens": N, "max_lora_rank": R}``; OUT: texts by
``base``, each LoRA's name and ``mixed``, and the seconds each took.
"""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    request = json.loads(open(request_path).read())
    llm = LLM(
        model=request["model"], enable_lora=True, max_lora_rank=request["max_lora_rank"],
        max_loras=len(request["loras"]), dtype="float32", max_model_len=512,
        enforce_eager=True, seed=0,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    loras = {
        name: LoRARequest(name, i + 1, folder)
        for i, (name, folder) in enumerate(sorted(request["loras"].items()))
    }
    out, seconds = {}, {}

    def answers(key, lora):
        start = time.perf_counter()
        done = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds[key] = time.perf_counter() - start
        out[key] = [d.outputs[0].text for d in done]

    answers("base", None)
    for name, lora in loras.items():
        answers(name, lora)
    answers("mixed", [loras[name] for name in request["mixed"]])
    open(out_path, "w").write(json.dumps({"texts": out, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
