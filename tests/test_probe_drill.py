"""``fp16rl probe --drill-down``: the layer-by-layer comparison of the sampler's decode and the trainer's
forward against an fp32 reference, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fp16rl.cli import app
from fp16rl.probe.drill import drill_points, run_drill_down
from fp16rl.probe.drill_output import dtype_summary, layer_curve
from fp16rl.probe.settings import BUILTIN_PROMPTS, ProbeSettings, encode_prompts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _drill(tiny_path, tiny_tokenizer, dtypes, **options):
    settings = ProbeSettings(model_path=str(tiny_path), dtypes=dtypes, batch_sizes=(2,), max_new_tokens=10,
                             drill_down=True, drill_down_samples=3, **options)
    settings.validate()
    prompts = encode_prompts(BUILTIN_PROMPTS, tiny_tokenizer)
    return run_drill_down(settings, tiny_path, tiny_tokenizer, prompts, [], torch.device("cpu"))


@pytest.fixture(scope="module")
def drill_doc(tiny_path, tiny_tokenizer):
    return _drill(tiny_path, tiny_tokenizer, ("float32", "bfloat16"))


def test_points_cover_every_layer_in_forward_order(tiny_path):
    from fp16rl.model.loading import load_model

    keys = [key for key, _, _ in drill_points(load_model(tiny_path))]
    assert keys[0] == "embedding" and keys[-1] == "final_norm"
    assert keys[1:6] == ["layer.0.input_layernorm", "layer.0.attention", "layer.0.post_attention_layernorm",
                         "layer.0.mlp", "layer.0.output"]
    assert sum(key.endswith(".output") for key in keys) == 2


def test_fp32_against_fp32_is_zero_everywhere(drill_doc):
    fp32 = drill_doc["dtypes"]["float32"]
    assert fp32["num_tokens"] > 0 and fp32["replay_mu_max_abs_diff"] == 0.0  # the replay is the sampler's decode
    assert set(fp32["relative_error"]) == set(drill_doc["keys"])
    for key, errors in fp32["relative_error"].items():
        assert errors["trainer_vs_reference"] == 0.0, key  # the same forward in the same dtype
        assert errors["sampler_vs_trainer"] < 1e-5, (key, errors)  # decode vs full forward: rounding order only
    assert "agree exactly" in dtype_summary("float32", fp32) or "enters" in dtype_summary("float32", fp32)


def test_bf16_error_is_nonzero_and_its_logits_match_a_direct_computation(drill_doc, tiny_path, tiny_tokenizer):
    """The final-logit relative error equals one computed here from the sampler's logits: the fast decoder
    gives what ``model.generate`` with a cache gives (tests/test_fast_decode.py), so the logits are
    recomputed with an HF cache decode in bf16 and the trainer's full forward in bf16."""
    bf16 = drill_doc["dtypes"]["bfloat16"]
    assert bf16["replay_mu_max_abs_diff"] == 0.0
    errors = bf16["relative_error"]
    assert errors["embedding"]["sampler_vs_trainer"] == 0.0  # a table lookup: no rounding difference yet
    assert errors["logits"]["sampler_vs_trainer"] > 1e-4
    for pair in ("sampler_vs_reference", "trainer_vs_reference"):
        assert errors["logits"][pair] > errors["logits"]["sampler_vs_trainer"] / 10
    assert bf16["logprob_abs_diff_mean"]["sampler_vs_trainer"] > 1e-5
    residual = layer_curve(bf16, "output")
    assert [layer for layer, _ in residual] == [0, 1] and all(value > 0 for _, value in residual)
    summary = dtype_summary("bfloat16", bf16)
    assert summary.startswith("bfloat16: the error enters at layer.0.") and "largest contributors" in summary


def test_final_logit_error_equals_a_direct_computation(tiny_path, tiny_tokenizer):
    """Independent of the hooks: sample with the Sampler, recompute every step's logits with an HF cache
    decode (``model(...)`` with ``past_key_values``) and the trainer's logits with one ``model(...)`` call,
    both bf16, the reference in fp32; the relative error of the logits must match the drill-down's."""
    from fp16rl.learner.weights import MasterWeights
    from fp16rl.model.loading import load_model, load_trainer_model, stop_token_ids
    from fp16rl.model.precision import PrecisionPolicy
    from fp16rl.rollout.sampler import Sampler, SamplingParams
    from fp16rl.core.seeds import derived_seed

    doc = _drill(tiny_path, tiny_tokenizer, ("bfloat16",), lora_r=0, sampler_engine="hf")
    policy = PrecisionPolicy.from_options("bfloat16")
    model = load_trainer_model(tiny_path, policy.trainer_dtype, None).eval()
    MasterWeights(model, policy)
    sampler = Sampler(model, policy.sampler_dtype, tiny_tokenizer.pad_token_id, stop_token_ids(model, tiny_tokenizer),
                      engine="hf")
    reference = load_model(tiny_path).eval()
    prompts = encode_prompts(BUILTIN_PROMPTS, tiny_tokenizer)
    diff = ref_norm = 0.0
    for rows in (range(0, 2), range(2, 3)):
        rollouts = sampler.generate([prompts[j] for j in rows], 1, SamplingParams(max_new_tokens=10),
                                    seed=derived_seed(0), slots=rows)
        for row in range(len(rows)):
            prompt, length = rollouts.prompt_ids[row], int(rollouts.completion_mask[row].sum())
            ids = torch.tensor([prompt + rollouts.completion_ids[row, :length].tolist()])
            with torch.no_grad():
                out = sampler.model(input_ids=ids[:, :len(prompt)], use_cache=True)
                steps = [out.logits[0, -1]]
                for t in range(length - 1):
                    out = sampler.model(input_ids=ids[:, len(prompt) + t: len(prompt) + t + 1],
                                        cache=out.cache, use_cache=True)
                    steps.append(out.logits[0, -1])
                sampled = torch.stack(steps).float()
                window = slice(len(prompt) - 1, len(prompt) - 1 + length)
                trained = model(input_ids=ids).logits[0, window].float()
                referenced = reference(input_ids=ids).logits[0, window].float()
            diff += (sampled - trained).square().sum().item()
            ref_norm += referenced.square().sum().item()
    direct = (diff / ref_norm) ** 0.5
    drilled = doc["dtypes"]["bfloat16"]["relative_error"]["logits"]["sampler_vs_trainer"]
    # Single-row decodes here, batched ones (left padding) in the drill-down: kernels may round differently.
    assert drilled == pytest.approx(direct, rel=0.5), (drilled, direct)


def test_cli_writes_json_markdown_and_figure(tmp_path, tiny_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["probe", "--model-path", "tiny", "--dtypes", "bf16,fp16", "--batch-sizes", "2",
                                      "--num-samples", "2", "--max-new-tokens", "8", "--drill-down",
                                      "--drill-down-samples", "2", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "drill_down.json").read_text())
    assert set(doc["dtypes"]) == {"bfloat16", "float16"} and doc["num_layers"] == 2
    assert any(line.startswith("bf16/fp16: final-logit relative error") for line in doc["summary"])
    assert any("in the probe" in line for line in doc["summary"])
    markdown = (out / "drill_down.md").read_text()
    assert "| layer.1.output |" in markdown and "](drill_down.png)" in markdown
    assert (out / "drill_down.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "drill-down bfloat16: the error enters at" in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--drill-down", "--drill-down-samples", "0"], "--drill-down-samples must be >= 1"),
    (["--fp32-modules", "flagged", "--no-check-fp16-range"], "needs the fp16 range check"),
    (["--fp32-modules", "norms", "--lora-r", "0", "--trainer-compute", "autocast"], "autocast"),
    (["--fp32-modules", "no such/module"], "--fp32-modules 'no such/module'"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_options_are_one_error_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["probe", "--model-path", "tiny", *args, "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "o").exists()
