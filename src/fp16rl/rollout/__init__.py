"""The sampler engine: completions drawn in the sampler dtype, with their token logprobs mu.

sampler.py      ``Sampler``: batched KV-cache decoding, counter-based paired noise, weight sync from the masters
fast_decode.py  ``LlamaFamilyDecoder``: a lean decode loop for Llama/Qwen2/Mistral; ``SharedPromptKV``

Imports: ``fp16rl.model``, ``fp16rl.sandbox``, ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows
below it in pyproject.toml [tool.importlinter]); not its siblings algo, learner and tasks.

The sampler's parts: draw.py (``SamplingParams``, logits processing: penalty, top-k, top-p; the
exponential race), noise.py (``TokenNoise``: counter-based Exp(1) noise keyed by seed, slot and
completion, which pairs arms), hf_decoder.py (``HFCacheDecoder``: the engine for any HF causal LM).
"""
