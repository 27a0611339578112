"""Fresh checkpoints no other test has seen, made the way a new user makes one: transformers' own model class
on a config of transformers' own config class, `save_pretrained` (whatever it writes: its own key names,
its own config.json keys, bf16 or fp16 storage, shards with an index), then `dflash run DIR` as typed.

Every other test writes its checkpoints from dflash's own weight tables; these are written by transformers
alone, in configurations the family tests do not use (one KV head and as many KV heads as heads, a head_dim
that is not hidden/heads, odd vocabularies, yarn/linear/llama3 rope, tied and untied heads, 16-bit storage,
transformers' per-layer overrides). Greedy `--no-spec` output equals transformers' `generate` on the same
directory, and a random drafter's speculative output equals `--no-spec`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from dflash_cli.cli import main

from .tiny import STORIES, drafter_config, write_drafter

PROMPT = "Once upon a time"  # the stories260K tokenizer (512 ids) is copied beside every checkpoint
NEW_TOKENS = 20
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
            eos_token_id=2)
HYBRID = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
              head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=256,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                               "mrope_section": [2, 1, 1], "mrope_interleaved": True})
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, in_channels=3)
HYBRID_MOE = HYBRID | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48)
GEMMA4 = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, hidden_size_per_layer_input=0, sliding_window=8,
              max_position_embeddings=256, final_logit_softcapping=3.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
T = transformers
CAUSAL = T.AutoModelForCausalLM

# id → (config, model class, save_pretrained's dtype or None, its other keywords)
CASES = {
    "qwen3, 1 KV head, head_dim 24, untied": (
        lambda: T.Qwen3Config(**BASE | dict(num_key_value_heads=1, tie_word_embeddings=False)), CAUSAL, None, {}),
    "qwen3, KV heads = heads, tied, yarn": (
        lambda: T.Qwen3Config(**BASE | dict(num_key_value_heads=4, tie_word_embeddings=True, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})), CAUSAL, None, {}),
    "qwen3, vocab 517, linear rope": (
        lambda: T.Qwen3Config(**BASE | dict(vocab_size=517, rope_scaling={"rope_type": "linear", "factor": 2.0})),
        CAUSAL, None, {}),
    "llama, llama3 rope, head_dim 8, tied": (
        lambda: T.LlamaConfig(**BASE | dict(head_dim=8, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})), CAUSAL, None, {}),
    "llama, stored bf16": (lambda: T.LlamaConfig(**BASE), CAUSAL, torch.bfloat16, {}),
    "llama, stored fp16 in 4 shards": (lambda: T.LlamaConfig(**BASE), CAUSAL, torch.float16,
                                       {"max_shard_size": "100KB"}),
    "qwen3.5 text-only, tied": (lambda: T.Qwen3_5TextConfig(**HYBRID, intermediate_size=96, tie_word_embeddings=True),
                                CAUSAL, None, {}),
    "qwen3.5 VL wrapper, stored bf16": (
        lambda: T.Qwen3_5Config(text_config=HYBRID | {"intermediate_size": 96}, vision_config=VISION,
                                tie_word_embeddings=False), T.Qwen3_5ForConditionalGeneration, torch.bfloat16, {}),
    "qwen3-moe, 1 KV head, vocab 515, tied, no top-k norm": (
        lambda: T.Qwen3MoeConfig(**BASE | dict(vocab_size=515, num_key_value_heads=1, num_experts=6,
                                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                                               tie_word_embeddings=True, num_hidden_layers=2)), CAUSAL, None, {}),
    "qwen3.5-moe VL wrapper": (lambda: T.Qwen3_5MoeConfig(text_config=HYBRID_MOE, vision_config=VISION),
                               T.Qwen3_5MoeForConditionalGeneration, None, {}),
    "gpt-oss, dense experts, yarn": (
        lambda: T.GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
                               layer_types=["sliding_attention", "full_attention"], eos_token_id=2, pad_token_id=0,
                               rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "original_max_position_embeddings": 64, "truncate": False}),
        CAUSAL, None, {}),
    # transformers writes the global layers' head_dim (and with k=v their KV heads) as per_layer_config
    "gemma4 text-only, per_layer_config": (lambda: T.Gemma4TextConfig(**GEMMA4), T.Gemma4ForCausalLM, None, {}),
    "gemma4 text-only, k=v, per_layer_config": (
        lambda: T.Gemma4TextConfig(**GEMMA4, attention_k_eq_v=True, num_global_key_value_heads=1),
        T.Gemma4ForCausalLM, None, {}),
    "gemma4 text-only, routed experts": (
        lambda: T.Gemma4TextConfig(**GEMMA4, enable_moe_block=True, num_experts=4, top_k_experts=2,
                                   moe_intermediate_size=32), T.Gemma4ForCausalLM, None, {}),
    "muse-glimmer, transformers' defaults": (
        lambda: T.MuseGlimmerConfig(text_config=dict(
            vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2), vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2), out_hidden_size=32, projector_hidden_size=32),
        T.MuseGlimmerForConditionalGeneration, None, {}),
}


def scaled(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that make greedy continuations vary (transformers' init makes a tiny model repeat one token):
    unit embeddings, 1/sqrt(fan_in) matrices, norms near 1, small biases; the rest as initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if "embed" in name else math.sqrt(p.shape[-1])))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "bias" in name or "sinks" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def save_pretrained(directory: Path, config, cls, dtype=None, seed: int = 0, **kwargs) -> Path:
    torch.manual_seed(seed)
    model = scaled(cls.from_config(config) if cls is CAUSAL else cls(config), seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, directory / name)
    return directory


def transformers_greedy(directory: Path, cls, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, cut after the first EOS as dflash stops there."""
    model = (cls if cls is not CAUSAL else CAUSAL).from_pretrained(directory, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(2)] if 2 in out else out


def dflash_json(capsys, *args) -> dict:
    capsys.readouterr()  # what came before (transformers' progress bars)
    code = main(["run", *map(str, args), "--device", "cpu", "--raw", "-p", PROMPT, "-n", str(NEW_TOKENS), "--json",
                 "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == "", err  # -q: nothing on stderr but errors (transformers logged its view of a yarn config.json)
    return json.loads(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            config, cls, dtype, kwargs = CASES[case]
            built[case] = save_pretrained(tmp_path_factory.mktemp("heldout") / "model", config(), cls, dtype, **kwargs)
        return built[case]
    return get


@pytest.mark.parametrize("case", CASES)
def test_a_save_pretrained_checkpoint_runs_as_transformers_generates(case, checkpoints, capsys):
    d = checkpoints(case)
    cls = CASES[case][1]
    plain = dflash_json(capsys, d, "--no-spec")  # the directory as MODEL, as a new user types it
    from dflash_cli.loader import load_tokenizer

    ids = load_tokenizer(d).encode(PROMPT)
    assert plain["prompt_tokens"] == len(ids)
    assert plain["token_ids"] == transformers_greedy(d, cls, ids, NEW_TOKENS)
    raw = json.loads((d / "config.json").read_text())
    text = raw.get("text_config", raw)
    drafter = write_drafter(d.parent / "drafter", drafter_config(
        text | {"max_position_embeddings": text.get("max_position_embeddings", 256)}, block_size=4,
        target_layer_ids=(0, 1)))
    spec = dflash_json(capsys, "--target", d, "--drafter", drafter)
    assert spec["token_ids"] == plain["token_ids"]


def test_per_layer_overrides_dflash_does_not_read_are_refused_by_name(tmp_path, capsys):
    """transformers can override any attribute per layer; a Gemma 4 whose layers differ in more than the
    global layers' head geometry is not one dflash runs: one line naming the key, no traceback."""
    d = save_pretrained(tmp_path / "g", T.Gemma4TextConfig(**GEMMA4), T.Gemma4ForCausalLM)
    raw = json.loads((d / "config.json").read_text())
    assert raw["per_layer_config"] == {"2": {"head_dim": 32}, "3": {"head_dim": 32}}  # as transformers writes it
    capsys.readouterr()  # save_pretrained's progress bar
    for overrides, says in (({"2": {"head_dim": 32, "intermediate_size": 48}, "3": {"head_dim": 32}},
                             "per_layer_config['2'] overrides intermediate_size"),
                            ({"2": {"head_dim": 32}, "3": {"head_dim": 64}}, "different shapes"),
                            ({"0": {"head_dim": 32}, "2": {"head_dim": 32}, "3": {"head_dim": 32}}, "different shapes"),
                            ({"9": {"head_dim": 32}}, "per_layer_config['9'] must be the overrides of one of the 4")):
        (d / "config.json").write_text(json.dumps(raw | {"per_layer_config": overrides}))
        code = main(["run", "--target", str(d), "--no-spec", "--device", "cpu", "--raw", "-p", PROMPT, "-n", "2"])
        out, err = capsys.readouterr()
        assert (code, out) == (1, "") and err.count("\n") == 1 and says in err, err


def test_a_checkpoint_saved_without_its_tokenizer_is_one_line_naming_the_fix(checkpoints, tmp_path, capsys):
    """`model.save_pretrained(dir)` alone writes no tokenizer; transformers 5 then builds an empty one for a
    Qwen3 (one token), and every prompt encoded to nothing ("the prompt is empty")."""
    d = shutil.copytree(checkpoints("qwen3, 1 KV head, head_dim 24, untied"), tmp_path / "no-tokenizer",
                        ignore=shutil.ignore_patterns("tokenizer*"))
    code = main(["run", str(d), "--no-spec", "--device", "cpu", "-p", PROMPT, "-n", "2"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "") and err.strip().splitlines()[-1] == (
        f"Error: {d} has no tokenizer (no tokenizer.json, tokenizer.model, vocab.json): copy the tokenizer files of "
        "the model it was made from into it")
    assert "Traceback" not in err


REQUIRED = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types", "num_experts",
            "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "linear_conv_kernel_dim",
            "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
            "tie_word_embeddings", "bos_token_id", "eos_token_id"}


@pytest.mark.parametrize("case", ["qwen3, 1 KV head, head_dim 24, untied", "llama, stored bf16",
                                  "qwen3-moe, 1 KV head, vocab 515, tied, no top-k norm", "qwen3.5 text-only, tied"])
def test_a_config_that_leaves_the_rest_to_transformers_defaults_runs_as_transformers_reads_it(case, checkpoints,
                                                                                               tmp_path, capsys):
    """A hand-written config.json gives the shapes and leaves rope_theta, rms_norm_eps, the rope parameters
    and the rest to the config class's defaults (rope_theta was refused as missing)."""
    d = shutil.copytree(checkpoints(case), tmp_path / "minimal")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k in REQUIRED}))
    plain = dflash_json(capsys, d, "--no-spec")
    from dflash_cli.loader import load_tokenizer

    assert plain["token_ids"] == transformers_greedy(d, CASES[case][1], load_tokenizer(d).encode(PROMPT), NEW_TOKENS)


def test_quiet_means_nothing_on_stderr_whatever_transformers_thinks_of_the_config(checkpoints):
    """transformers logs its view of a YaRN config whose factor is not max/original positions when the
    tokenizer is loaded (it reads config.json too): -q must still leave stderr empty. A real process: the
    log handler writes to the stderr it found at import, which no capture in this process sees."""
    import os
    import subprocess
    import sys

    d = checkpoints("qwen3, KV heads = heads, tied, yarn")
    p = subprocess.run([sys.executable, "-m", "dflash_cli", "run", str(d), "--no-spec", "--device", "cpu", "--raw",
                        "-p", PROMPT, "-n", "3", "-q"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"},
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and p.stdout and p.stderr == "", p.stderr
