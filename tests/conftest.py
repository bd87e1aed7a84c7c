import os
import subprocess
import sys

import pytest
import torch

from support.paths import ROOT

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, input=None, env=None, timeout=600):
    """Run `python -m moecli.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.pop("MOE_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "moecli.cli", *map(str, args)], input=input, capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=ROOT)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny recipe YAML and return its path; kwargs override sections."""
    import yaml

    def make(name="tiny", **sections):
        data = {
            "name": name,
            "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "context": 64},
            "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 32},
            "train": {"batch_size": 4, "seq_len": 32, "max_steps": 6, "warmup_steps": 2, "eval_interval": 3,
                      "eval_batches": 2, "ckpt_interval": 3},
        }
        for sec, vals in sections.items():
            data.setdefault(sec, {}).update(vals)
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    return make


# The longest end-to-end runs (measured over 25 s on the 2-core CI machine): left out of the default suite, which
# the README's test command runs, and run by .ci/run with `-m slow` after it. Each stays a test of its own. This list
# is the one way a test is marked slow (FILE::NAME[PARAMS], whatever folder the file is in).
SLOW = {
    "test_train.py::test_a_signal_saves_the_step_it_stopped_after[2]",
    "test_train.py::test_kill_9_mid_run_then_resume",
    "test_train.py::test_init_takes_fine_tuning_defaults_that_keep_a_pretrained_models_loss",
    "test_train.py::test_data_weights_mix_sources_with_their_own_validation",
    "test_train.py::test_val_data_is_the_validation_set_and_resumes_from_its_cache",
    "test_train.py::test_init_continues_an_upcycled_model",
    "test_train.py::test_keep_best",
    "test_train.py::test_eval_defaults_to_the_runs_validation_split_and_scores_short_text",
    "test_train.py::test_bf16_mixed_precision",
    "test_train.py::test_epochs_set_max_steps_from_the_training_tokens",
    "test_distributed.py::test_a_signal_stops_every_rank_after_the_same_step[True]",
    "test_distributed.py::test_ddp_matches_single_process",
    "test_generate.py::test_generate_streams_what_json_reports",
    "test_generate.py::test_generate_many_prompts",
    "test_generate.py::test_several_samples_in_one_batch",
    "test_inspect.py::test_saturation_between_different_checkpoints",
    "test_upcycle.py::test_hugging_face_chain_end_to_end[llama-mixtral]",
    "test_glm4_moe.py::test_glm_recipe_exports_to_glm4_moe",
    "test_deepseek_v3.py::test_deepseek_recipes_are_mla_and_export",
    "test_rope.py::test_export_writes_the_variant_back[yarn]",
    "test_rope.py::test_upcycled_scaled_rope_keeps_the_dense_logits[qwen2-yarn-qwen2_moe]",
    "test_upcycle_sources.py::test_layer_by_layer_verification_stays_within_one_and_a_half_times_the_unverified_peak",
    "test_gpt_oss.py::test_init_train_export_round_trip",
    "test_gpt_oss.py::test_gpt_oss_recipe_trains_and_exports",
    "test_qwen3_next.py::test_init_train_export_round_trip",
    "test_qwen3_next.py::test_qwen3_next_recipe_is_the_hybrid_and_exports",
    "test_llama4.py::test_init_train_export_round_trip",
    "test_llama4.py::test_llama4_recipe_trains_and_exports",
    "test_streaming.py::test_streamed_eval_and_routing_equal_the_in_memory_run[moecli]",
    "test_upcycle.py::test_hugging_face_chain_end_to_end[qwen2-qwen2_moe]",
    "test_upcycle.py::test_hugging_face_chain_end_to_end[qwen3-qwen3_moe]",
    # expert surgery, LoRA and output locks (2026-12-07: 15-32 s each here)
    "test_lora_peft.py::test_an_adapter_is_refused_where_peft_cannot_hold_it",
    "test_lora_peft.py::test_peft_loads_the_adapter_with_the_merged_logits[deepseek_v3]",
    "test_prune.py::test_other_models_dense_models_and_outputs_inside_the_input_are_refused",
    "test_prune.py::test_prune_writes_a_moecli_checkpoint_the_other_commands_read",
    "test_prune.py::test_streamed_pass_and_inspect_routing_give_the_same_scores",
    "test_outputs.py::test_one_writer_per_output_and_a_dead_writers_lock_is_taken_over",
    "test_outputs.py::test_two_trainings_started_together_on_one_output",
    "test_lora.py::test_resume_is_exact_and_the_run_reads_as_its_merged_model",
    "test_lora.py::test_lora_under_two_processes_matches_one",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.rsplit("/", 1)[-1] in SLOW:  # tests/<unit|parity|e2e>/FILE::NAME
            item.add_marker(pytest.mark.slow)
