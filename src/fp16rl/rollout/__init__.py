"""The sampler engine: completions drawn in the sampler dtype, with their token logprobs mu.

sampler.py      ``Sampler``: batched KV-cache decoding, the decode loop, weight sync from the masters
draw.py         ``SamplingParams``, logits processing (penalty, top-k, top-p) and the exponential race
noise.py        ``TokenNoise``: counter-based Exp(1) noise keyed by seed, slot and completion (pairs arms)
hf_decoder.py   ``HFCacheDecoder``: the decoding engine for any HF causal LM
fast_decode.py  ``LlamaFamilyDecoder``: a lean decode loop for Llama/Qwen2/Mistral; ``SharedPromptKV``

Imports: ``fp16rl.model``, ``fp16rl.sandbox``, ``fp16rl.runs``, ``fp16rl.config``, ``fp16rl.core`` (the rows
below it in pyproject.toml [tool.importlinter]); not its siblings algo, learner and tasks.
"""
