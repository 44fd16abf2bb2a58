"""Every option a TRL GRPO user writes, classified: what fp16rl does with each of TRL's names.

The names are those of TRL 1.16's ``GRPOConfig`` (its own fields and the ``transformers.TrainingArguments``
fields it inherits), of the ``ModelConfig``/``ScriptArguments``/``DatasetMixtureConfig`` read by TRL's
``trl grpo`` script (a TRL YAML file mixes them), and a few of older TRL's (``max_prompt_length``,
``warmup_ratio``, ``torch_dtype``). Each one is:

* ``honoured``: the fp16rl option of the same meaning takes the value (``target``);
* ``mapped``: converted by :mod:`fp16rl.config.trl_names` (``group``), with the difference in ``note``;
* ``default only``: accepted at TRL's default, where it changes nothing; any other value is refused
  with one line (``note``: the fp16rl equivalent, or why it is not supported);
* ``ignored``: accepted at any value because it changes nothing that fp16rl computes (``note`` says why).

The defaults are TRL's, written here so this module needs neither TRL nor torch (TRL is not a dependency);
``tests/test_trl_api.py`` checks them, and that every field of the installed ``trl.GRPOConfig`` is listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HONOURED, MAPPED, DEFAULT_ONLY, IGNORED = "honoured", "mapped", "default only", "ignored"
GRPO, ARGS, MODEL, SCRIPT, OLD = "GRPOConfig", "TrainingArguments", "ModelConfig", "ScriptArguments", "older TRL"


@dataclass(frozen=True)
class TrlField:
    """One TRL name: its default, what fp16rl does with it, and the value type its text form parses to."""

    name: str
    default: Any
    kind: str
    note: str = ""
    origin: str = GRPO
    type: type = str  # of a value given as text (command line); None defaults need it
    target: str | None = None  # honoured: the fp16rl field
    group: str | None = None  # mapped: the converter in trl_names


def _h(name: str, default: Any, target: str | None = None, note: str = "", origin: str = GRPO,
       type_: type | None = None) -> TrlField:
    return TrlField(name, default, HONOURED, note, origin, type_ or type(default), target or name)


def _m(name: str, default: Any, group: str, note: str, origin: str = GRPO, type_: type | None = None) -> TrlField:
    return TrlField(name, default, MAPPED, note, origin, type_ or type(default), None, group)


def _d(name: str, default: Any, note: str, origin: str = GRPO, type_: type | None = None) -> TrlField:
    return TrlField(name, default, DEFAULT_ONLY, note, origin, type_ or type(default))


def _i(name: str, default: Any, note: str, origin: str = GRPO, type_: type | None = None) -> TrlField:
    return TrlField(name, default, IGNORED, note, origin, type_ or type(default))


_NO_EVAL = "fp16rl has no evaluation loop during training (`fp16rl probe` measures a checkpoint)"
_HUB = "fp16rl uploads nothing; `fp16rl export` writes a model folder to push yourself"
_VLLM = "used only with use_vllm=True, which is refused (fp16rl's own sampler plays vLLM's part)"
_DDP = "fp16rl sets up DDP/FSDP itself under torchrun"
_ROWS: list[TrlField] = [
    # --- transformers.TrainingArguments, in GRPOConfig's field order --------------------------------------
    _m("output_dir", None, "output", "None = 'trainer_output' as in transformers; a folder in use is refused "
       "(fp16rl never overwrites a run: resume_from_checkpoint=True continues it)", ARGS, str),
    _m("per_device_train_batch_size", 8, "batch", "completions per device per optimizer step; x world size x "
       "gradient_accumulation_steps / num_generations = fp16rl's --prompts-per-step", ARGS),
    _h("num_train_epochs", 3.0, "epochs", origin=ARGS),
    _m("max_steps", -1, "steps", "optimizer steps; fp16rl counts RL steps of num_iterations optimizer steps "
       "each, so it must be a multiple of num_iterations", ARGS),
    _h("learning_rate", 1e-6, origin=ARGS),
    _h("lr_scheduler_type", "linear", note="linear, cosine, constant, constant_with_warmup", origin=ARGS),
    _d("lr_scheduler_kwargs", None, "fp16rl's schedules take no extra parameters", ARGS, dict),
    _m("warmup_steps", 0, "warmup", "a fraction (< 1) is --warmup-ratio; a count needs max_steps", ARGS, float),
    _m("optim", "adamw_torch_fused", "optim", "adamw_torch and adamw_torch_fused (fp16rl's AdamW, fused on "
       "CUDA); other optimizers are refused", ARGS),
    _d("optim_args", None, "fp16rl's AdamW takes no extra arguments", ARGS, str),
    _h("weight_decay", 0.0, note="not applied to biases and norm weights, as in transformers", origin=ARGS),
    _d("adam_beta1", 0.9, "fp16rl's AdamW uses torch's betas (0.9, 0.999)", ARGS),
    _d("adam_beta2", 0.999, "fp16rl's AdamW uses torch's betas (0.9, 0.999)", ARGS),
    _d("adam_epsilon", 1e-8, "fp16rl's AdamW uses torch's eps 1e-8", ARGS),
    _d("optim_target_modules", None, "no GaLore-style optimizers", ARGS, str),
    _m("gradient_accumulation_steps", 1, "batch", "the same meaning: one optimizer step over this many "
       "micro-batches of per_device_train_batch_size completions", ARGS),
    _d("average_tokens_across_devices", True, "the loss normalisation follows loss_type", ARGS),
    _h("max_grad_norm", 1.0, origin=ARGS),
    _d("label_smoothing_factor", 0.0, "not a GRPO option", ARGS),
    _m("bf16", None, "precision", "bf16=True is --dtype bfloat16: sampler and trainer both compute in bf16 "
       "(FP32 master weights), not autocast mixed precision", ARGS, bool),
    _m("fp16", False, "precision", "fp16=True is --dtype float16 (sampler and trainer in fp16, dynamic loss "
       "scaling); both False is float32; both True is refused", ARGS),
    _d("bf16_full_eval", False, _NO_EVAL, ARGS),
    _d("fp16_full_eval", False, _NO_EVAL, ARGS),
    _d("tf32", None, "not supported: fp16rl's precision is --dtype", ARGS, bool),
    _d("activation_checkpointing", None, "use gradient_checkpointing", ARGS, bool),
    _d("activation_checkpointing_kwargs", None, "use gradient_checkpointing", ARGS, dict),
    _h("gradient_checkpointing", True, origin=ARGS),
    _d("gradient_checkpointing_kwargs", None, "fp16rl picks the checkpointing implementation (non-reentrant)",
       ARGS, dict),
    _d("torch_compile", False, "not supported", ARGS),
    _d("torch_compile_backend", None, "not supported", ARGS, str),
    _d("torch_compile_mode", None, "not supported", ARGS, str),
    _d("use_liger_kernel", False, "not supported: fp16rl computes the loss in chunks (--logprob-chunk-tokens)",
       ARGS),
    _d("liger_kernel_config", None, "not supported", ARGS, dict),
    _i("use_cache", False, "the sampler always keeps a KV cache, the trainer's forward never", ARGS),
    _d("neftune_noise_alpha", None, "not supported", ARGS, float),
    _d("torch_empty_cache_steps", None, "not supported: fp16rl manages the sampler's and trainer's memory",
       ARGS, int),
    _d("auto_find_batch_size", False, "not supported (TRL refuses it for GRPO too)", ARGS),
    _d("logging_strategy", "steps", "fp16rl logs every step's metrics", ARGS),
    _m("logging_steps", 10, "steps", "fp16rl logs metrics every step; this is how often completions are "
       "saved to samples/ (--save-samples-steps); a fraction of the run is refused", ARGS, float),
    _i("logging_first_step", False, "step 1 is always logged", ARGS),
    _i("log_on_each_node", True, "rank 0 logs", ARGS),
    _i("logging_nan_inf_filter", True, "metrics are logged as computed", ARGS),
    _d("include_num_input_tokens_seen", "no", "not supported", ARGS),
    _i("log_level", "passive", "fp16rl's own logging", ARGS),
    _i("log_level_replica", "warning", "fp16rl's own logging", ARGS),
    _m("disable_tqdm", None, "progress", "GRPOTrainer.train shows a progress bar unless disable_tqdm=True",
       ARGS, bool),
    _m("report_to", "none", "report_to", "tensorboard, wandb, trackio, mlflow or none (a list or one name); "
       "'all' is refused: name the trackers; metrics.jsonl is always written", ARGS),
    _i("run_name", None, "the run folder (output_dir) names the run", ARGS, str),
    _i("project", "huggingface", "trackers use fp16rl's project names", ARGS),
    _d("trackio_space_id", None, "trackio runs locally", ARGS, str),
    _d("trackio_bucket_id", None, "trackio runs locally", ARGS, str),
    _d("trackio_static_space_id", None, "trackio runs locally", ARGS, str),
    _d("eval_strategy", "no", _NO_EVAL, ARGS),
    _i("eval_steps", None, "used only with eval_strategy", ARGS, float),
    _i("eval_delay", 0, "used only with eval_strategy", ARGS, float),
    _i("per_device_eval_batch_size", 8, "used only with eval_strategy", ARGS),
    _i("prediction_loss_only", False, "used only with eval_strategy", ARGS),
    _d("eval_on_start", False, _NO_EVAL, ARGS),
    _i("eval_do_concat_batches", True, "used only with eval_strategy", ARGS),
    _i("eval_use_gather_object", False, "used only with eval_strategy", ARGS),
    _i("eval_accumulation_steps", None, "used only with eval_strategy", ARGS, int),
    _i("include_for_metrics", [], "used only with eval_strategy", ARGS, list),
    _i("batch_eval_metrics", False, "used only with eval_strategy", ARGS),
    _d("save_only_model", False, "checkpoints always hold the optimizer state (exact resume)", ARGS),
    _d("save_strategy", "steps", "fp16rl checkpoints every save_steps, at the end and on Ctrl-C", ARGS),
    _m("save_steps", 500, "steps", "in optimizer steps; fp16rl checkpoints every ceil(save_steps / "
       "num_iterations) RL steps (--save-steps)", ARGS, float),
    _d("save_on_each_node", False, "rank 0 writes the checkpoints", ARGS),
    _h("save_total_limit", None, origin=ARGS, type_=int),
    _d("enable_jit_checkpoint", False, "fp16rl checkpoints on Ctrl-C/SIGTERM anyway", ARGS),
    _d("push_to_hub", False, _HUB, ARGS),
    _i("hub_token", None, "used only with push_to_hub", ARGS, str),
    _i("hub_private_repo", None, "used only with push_to_hub", ARGS, bool),
    _i("hub_model_id", None, "used only with push_to_hub", ARGS, str),
    _i("hub_strategy", "every_save", "used only with push_to_hub", ARGS),
    _i("hub_always_push", False, "used only with push_to_hub", ARGS),
    _i("hub_revision", None, "used only with push_to_hub", ARGS, str),
    _d("load_best_model_at_end", False, _NO_EVAL, ARGS),
    _i("metric_for_best_model", None, "used only with load_best_model_at_end", ARGS, str),
    _i("greater_is_better", None, "used only with load_best_model_at_end", ARGS, bool),
    _d("ignore_data_skip", False, "a resume continues at the exact data position", ARGS),
    _d("restore_callback_states_from_checkpoint", False, "not supported", ARGS),
    _i("full_determinism", False, "fp16rl runs are reproducible from their seed on one machine anyway", ARGS),
    _h("seed", 42, origin=ARGS),
    _d("data_seed", None, "the prompt order follows seed", ARGS, int),
    _m("use_cpu", False, "device", "use_cpu=True is --device cpu", ARGS),
    _d("accelerator_config", None, _DDP, ARGS, dict),
    _d("parallelism_config", None, _DDP, ARGS, dict),
    _d("dataloader_drop_last", False, "prompts wrap around into the next epoch", ARGS),
    _i("dataloader_num_workers", 0, "prompts are read in the training process", ARGS),
    _i("dataloader_pin_memory", True, "prompts are read in the training process", ARGS),
    _i("dataloader_persistent_workers", False, "prompts are read in the training process", ARGS),
    _i("dataloader_prefetch_factor", None, "prompts are read in the training process", ARGS, int),
    _i("dataloader_multiprocessing_context", None, "prompts are read in the training process", ARGS, str),
    _i("dataloader_in_order", True, "prompts are read in the training process", ARGS),
    _d("remove_unused_columns", False, "every dataset column reaches the reward functions", ARGS),
    _d("label_names", None, "not a GRPO option", ARGS, list),
    _d("train_sampling_strategy", "random", "each epoch visits the prompts in a seeded permutation", ARGS),
    _i("length_column_name", "length", "used only with group_by_length sampling", ARGS),
    _d("ddp_find_unused_parameters", None, _DDP, ARGS, bool),
    _d("ddp_bucket_cap_mb", None, _DDP, ARGS, int),
    _d("ddp_broadcast_buffers", None, _DDP, ARGS, bool),
    _d("ddp_static_graph", None, _DDP, ARGS, bool),
    _d("ddp_backend", None, _DDP, ARGS, str),
    _i("ddp_timeout", 1800, "torchrun's default timeout applies", ARGS),
    _m("fsdp", None, "fsdp", "full_shard (or True) is fp16rl's --fsdp (FSDP2 sharding of full fine-tuning); "
       "other FSDP modes are refused", ARGS, str),
    _d("fsdp_config", None, "fp16rl's --fsdp takes no configuration", ARGS, dict),
    _d("deepspeed", None, "not supported: use --fsdp under torchrun", ARGS, str),
    _d("debug", "", "not supported", ARGS),
    _i("skip_memory_metrics", True, "fp16rl logs memory every step", ARGS),
    _i("do_train", False, "a script flag; training always runs", ARGS),
    _i("do_eval", False, "used only with eval_strategy", ARGS),
    _i("do_predict", False, "a script flag", ARGS),
    _m("resume_from_checkpoint", None, "resume", "True is --resume: continue output_dir from its latest "
       "checkpoint; a checkpoint path is refused (pass True and its run folder as output_dir)", ARGS, str),
    _i("local_rank", -1, "torchrun sets the ranks", ARGS),
    # --- GRPOConfig's own fields ---------------------------------------------------------------------------
    _m("model_init_kwargs", None, "model_init", "dtype/torch_dtype (auto, float32 or the training dtype), "
       "attn_implementation (sdpa, eager); other keys are refused: fp16rl loads the model", GRPO, dict),
    _d("trust_remote_code", False, "fp16rl loads models transformers implements", GRPO),
    _d("router_aux_loss_coef", None, "MoE auxiliary losses are not supported", GRPO, float),
    _m("disable_dropout", False, "dropout", "fp16rl always trains without dropout (the trainer must compute "
       "the sampler's function), as disable_dropout=True"),
    _d("cast_lm_head_to_fp32", False, "not supported: the lm_head computes in --dtype"),
    _m("num_generations", 8, "batch", "the group size G, as TRL (--num-generations)"),
    _i("num_generations_eval", None, _NO_EVAL, GRPO, int),
    _m("max_completion_length", 512, "lengths", "as TRL (--max-completion-length)"),
    _i("ds3_gather_for_generation", True, "DeepSpeed only"),
    _d("shuffle_dataset", True, "each epoch visits the prompts in a seeded permutation"),
    _i("pad_to_multiple_of", "auto", "padding does not change what is computed"),
    _m("generation_batch_size", None, "batch", "must be per_device_train_batch_size x world size x "
       "gradient_accumulation_steps: fp16rl takes one optimizer step per generation batch (and pass)", GRPO, int),
    _m("steps_per_generation", None, "batch", "must equal gradient_accumulation_steps (see generation_batch_size)",
       GRPO, int),
    _h("temperature", 1.0),
    _h("top_p", 1.0),
    _m("top_k", 0, "top_k", "as TRL; None is 0 (off)"),
    _d("min_p", None, "not supported: use top_p/top_k", GRPO, float),
    _d("generation_kwargs", None, "use temperature, top_p, top_k and repetition_penalty", GRPO, dict),
    _d("chat_template_kwargs", None, "the chat template is applied with its defaults", GRPO, dict),
    _h("repetition_penalty", 1.0),
    _i("cache_implementation", None, "fp16rl's sampler has its own KV cache", GRPO, str),
    _d("use_vllm", False, "not supported: fp16rl samples with its own engine in the training precision "
       "(--sampler-engine, --gpu-memory-utilization)"),
    _i("vllm_mode", "colocate", _VLLM),
    _i("vllm_model_impl", "vllm", _VLLM),
    _i("vllm_enable_sleep_mode", False, _VLLM),
    _i("vllm_structured_outputs_regex", None, _VLLM, GRPO, str),
    _i("vllm_server_base_url", None, _VLLM, GRPO, str),
    _i("vllm_server_host", "0.0.0.0", _VLLM),
    _i("vllm_server_port", 8000, _VLLM),
    _i("vllm_server_timeout", 240.0, _VLLM),
    _i("vllm_group_port", 51216, _VLLM),
    _i("vllm_gpu_memory_utilization", 0.3, _VLLM + "; fp16rl's sampler: --gpu-memory-utilization"),
    _i("vllm_max_model_length", None, _VLLM, GRPO, int),
    _i("vllm_tensor_parallel_size", 1, _VLLM),
    _h("beta", 0.0),
    _m("num_iterations", 1, "steps", "as TRL (mu): fp16rl's RL step is num_iterations optimizer steps"),
    _h("epsilon", 0.2),
    _d("delta", None, "two-sided clipping (INTELLECT-2) is not supported", GRPO, float),
    _h("epsilon_high", None, type_=float),
    _i("sapo_temperature_neg", 1.05, "used only by loss_type sapo (refused)"),
    _i("sapo_temperature_pos", 1.0, "used only by loss_type sapo (refused)"),
    _i("vespo_k_pos", 2.0, "used only by loss_type vespo (refused)"),
    _i("vespo_lambda_pos", 3.0, "used only by loss_type vespo (refused)"),
    _i("vespo_k_neg", 3.0, "used only by loss_type vespo (refused)"),
    _i("vespo_lambda_neg", 2.0, "used only by loss_type vespo (refused)"),
    _h("importance_sampling_level", "token"),
    _m("reward_weights", None, "reward_weights", "as TRL; None weighs each function 1", GRPO, list),
    _d("multi_objective_aggregation", "sum_then_normalize", "fp16rl sums the weighted rewards, then "
       "normalises (TRL's default)"),
    _m("scale_rewards", "group", "scale_rewards", "as TRL: group, batch, none (True is group, False none)"),
    _m("loss_type", "dapo", "loss_type", "grpo, bnpo, dapo, dr_grpo as TRL; cispo, sapo, luspo and vespo are "
       "refused"),
    _h("mask_truncated_completions", False),
    _d("sync_ref_model", False, "TR-DPO reference syncing is not supported"),
    _i("ref_model_mixup_alpha", 0.6, "used only with sync_ref_model (refused)"),
    _i("ref_model_sync_steps", 512, "used only with sync_ref_model (refused)"),
    _d("top_entropy_quantile", 1.0, "entropy masking is not supported"),
    _d("entropy_coef", 0.0, "an entropy bonus is not supported"),
    _d("use_adaptive_entropy", False, "an entropy bonus is not supported"),
    _i("entropy_coef_min", 0.0, "used only with use_adaptive_entropy (refused)"),
    _i("entropy_coef_max", 1.0, "used only with use_adaptive_entropy (refused)"),
    _i("entropy_coef_delta", 0.005, "used only with use_adaptive_entropy (refused)"),
    _i("entropy_target", 0.2, "used only with use_adaptive_entropy (refused)"),
    _d("max_tool_calling_iterations", None, "tool calling is not supported", GRPO, int),
    _m("vllm_importance_sampling_correction", True, "is", "fp16rl's sampler is TRL's vLLM: the correction of "
       "the sampler/trainer mismatch is --is-correction <mode> (False: none) against the distribution "
       "sampled (--is-reference behaviour, vLLM's processed logprobs)"),
    _m("vllm_importance_sampling_mode", "sequence_mask", "is", "token_truncate, token_mask, sequence_truncate, "
       "sequence_mask: --is-correction"),
    _m("vllm_importance_sampling_clip_max", 3.0, "is", "--is-clip-max (None is refused: fp16rl needs a bound)"),
    _m("vllm_importance_sampling_clip_min", None, "is", "--is-clip-min (None is 0)", GRPO, float),
    _d("off_policy_mask_threshold", None, "off-policy sequence masking is not supported", GRPO, float),
    _m("use_bias_correction_kl", True, "kl", "fp16rl's KL term is the plain k3 (TRL's False); True is accepted "
       "with a warning when beta > 0"),
    _i("log_completions", False, "completions are always saved to samples/ every logging_steps"),
    _i("log_multimodal", True, "text only"),
    _i("num_completions_to_print", None, "completions go to samples/, not the console", GRPO, int),
    _i("log_unique_prompts", False, "samples/ holds every prompt's completions"),
    _d("log_completions_hub_repo", None, _HUB, GRPO, str),
    _d("use_transformers_continuous_batching", False, "fp16rl's sampler engine: --sampler-engine"),
    _d("transformers_continuous_batching_config", None, "fp16rl's sampler engine: --sampler-engine", GRPO, dict),
    _d("use_transformers_paged", False, "fp16rl's sampler engine: --sampler-engine"),
    _m("vllm_importance_sampling_cap", None, "is", "deprecated in TRL: vllm_importance_sampling_clip_max",
       GRPO, float),
    # --- older TRL/transformers names still found in scripts -----------------------------------------------
    _m("max_prompt_length", None, "lengths", "prompt + max_completion_length is --max-seq-length: a longer "
       "prompt is skipped (counted), not truncated from the left", OLD, int),
    _m("warmup_ratio", None, "warmup", "--warmup-ratio (transformers < 5; refused together with warmup_steps)",
       OLD, float),
    _m("torch_dtype", None, "model_dtype", "the old name of ModelConfig's dtype", OLD, str),
    _d("overwrite_output_dir", False, "fp16rl never overwrites a run: use another output_dir or "
       "resume_from_checkpoint", OLD),
    _i("logging_dir", None, "TensorBoard logs go to <output_dir>/tb", OLD, str),
    # --- trl grpo's ModelConfig and ScriptArguments (YAML and command line only) -----------------------
    _h("model_name_or_path", None, "model_path", "a local folder, a prepared name or tiny (nothing is "
       "downloaded)", MODEL, str),
    _d("model_revision", "main", "fp16rl loads local folders", MODEL),
    _m("dtype", "float32", "model_dtype", "the model's load dtype: auto, float32 or the training dtype "
       "(bf16/fp16); fp16rl loads the model in its training precision", MODEL),
    _h("attn_implementation", None, note="sdpa or eager", origin=MODEL, type_=str),
    _m("use_peft", False, "lora", "False is full fine-tuning (--lora-r 0); True trains LoRA adapters", MODEL),
    _m("lora_r", 16, "lora", "--lora-r when use_peft", MODEL),
    _m("lora_alpha", 32, "lora", "--lora-alpha when use_peft", MODEL),
    _m("lora_dropout", 0.05, "lora", "not applied: fp16rl trains without dropout (a warning says so)", MODEL),
    _m("lora_target_modules", None, "lora", "--lora-target-modules; None: fp16rl's attention + MLP "
       "projections", MODEL, list),
    _d("lora_target_parameters", None, "not supported", MODEL, list),
    _d("lora_modules_to_save", None, "not supported", MODEL, list),
    _d("lora_task_type", "CAUSAL_LM", "fp16rl trains causal LMs", MODEL),
    _m("use_rslora", False, "lora", "--use-rslora when use_peft (fp16rl's own default is True)", MODEL),
    _d("use_dora", False, "not supported", MODEL),
    _d("load_in_8bit", False, "not supported: --load-in-4bit (QLoRA)", MODEL),
    _m("load_in_4bit", False, "lora", "--load-in-4bit (NF4 QLoRA, with use_peft)", MODEL),
    _d("bnb_4bit_quant_type", "nf4", "fp16rl's 4-bit is NF4", MODEL),
    _d("use_bnb_nested_quant", False, "not supported", MODEL),
    _d("bnb_4bit_quant_storage", None, "not supported", MODEL, str),
    _m("dataset_name", None, "dataset", "--dataset-path: a local file or save_to_disk folder (nothing is "
       "downloaded)", SCRIPT, str),
    _d("dataset_config", None, "local datasets have no configurations", SCRIPT, str),
    _d("dataset_train_split", "train", "the 'train' split of a saved DatasetDict is used", SCRIPT),
    _i("dataset_test_split", "test", _NO_EVAL, SCRIPT),
    _d("dataset_streaming", False, "local datasets are memory-mapped, not streamed", SCRIPT),
    _i("ignore_bias_buffers", False, "not a GRPO option", SCRIPT),
    _m("reward_model_name_or_path", None, "reward_funcs", "a local sequence-classification model folder, the first "
       "reward function as in trl grpo (scored as TRL: logit 0); a hub id is refused (nothing is downloaded)",
       SCRIPT, str),
    _m("reward_funcs", None, "reward_funcs", "TRL's names (accuracy_reward, think_format_reward, "
       "reasoning_accuracy_reward, from trl.rewards; get_soft_overlong_punishment is trl grpo's (1280, 256): "
       "soft_overlong_punishment with --overlong-max-completion-len 1280 --overlong-soft-punish-cache 256) and "
       "dotted paths (a.b.f is a.b:f); fp16rl's names too", SCRIPT, list),
    _d("datasets", [], "use dataset_name (one local dataset)", SCRIPT, list),
    _d("streaming", False, "local datasets are memory-mapped, not streamed", SCRIPT),
    _d("test_split_size", None, _NO_EVAL, SCRIPT, float),
]


TRL_FIELDS: dict[str, TrlField] = {row.name: row for row in _ROWS}
# The names GRPOConfig takes: its own, the TrainingArguments it inherits and the older ones scripts still use.
GRPO_CONFIG_NAMES = tuple(n for n, row in TRL_FIELDS.items() if row.origin in (GRPO, ARGS, OLD) and n != "torch_dtype")
