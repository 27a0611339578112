"""vLLM's speculators drafter format (`DFlashSpeculatorConfig`, vllm-project/speculators) read as the DFlash
drafter it is, every key that changes the math read or refused by name, and drafters of other architectures
refused by name (dflash_cli/speculators.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dflash_cli import loader
from dflash_cli.cli import main
from dflash_cli.config import DrafterConfig
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError, UsageError

from .conftest import HYBRID_PROMPTS
from .tiny import drafter_config, save_weights, target_config

# What speculators' DFlashConverter leaves out of transformer_layer_config (its _NON_TRANSFORMER_KEYS).
NOT_TRANSFORMER = ("architectures", "auto_map", "block_size", "dflash_config", "num_target_layers", "is_causal")


def speculators_config(native: dict, vocab: int) -> dict:
    """A native drafter config.json as speculators writes the same drafter (DFlashSpeculatorConfig)."""
    layer = {k: v for k, v in native.items() if k not in NOT_TRANSFORMER}
    if "sliding_attention" in (layer.get("layer_types") or []):
        layer["use_sliding_window"] = True  # Qwen3Config keeps sliding_window only then
    dflash = native["dflash_config"]
    block = dflash.get("block_size", native.get("block_size"))
    return {"speculators_model_type": "dflash", "architectures": ["DFlashSpeculator"],
            "transformer_layer_config": layer, "draft_vocab_size": vocab, "block_size": block,
            "aux_hidden_state_layer_ids": [i + 1 for i in dflash["target_layer_ids"]],
            "mask_token_id": dflash.get("mask_token_id", native.get("mask_token_id")),
            "sliding_window_non_causal": native.get("is_causal") is False, "sample_from_anchor": False,
            "speculators_config": {"algorithm": "dflash", "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block - 1}],
                                   "verifier": {"name_or_path": "tiny", "architectures": ["Tiny"]}},
            "speculators_version": "0.5.0", "torch_dtype": "float32"}


def write_speculators(directory: Path, drafter_dir: Path, target_dir: Path) -> Path:
    """A drafter of ours rewritten in the speculators layout: its config, its tensors under the same names, and
    the verifier's embedding and head copied in (the converter's `load_verifier_weights`)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = load_file(str(target_dir / "model.safetensors"))
    embed = next(v for k, v in target.items() if k.endswith("embed_tokens.weight"))
    extra = {"embed_tokens.weight": embed, "lm_head.weight": target.get("lm_head.weight", embed)}
    save_weights(directory, load_file(str(drafter_dir / "model.safetensors")) | extra)
    native = json.loads((drafter_dir / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(speculators_config(native, embed.shape[0])))
    return directory


@pytest.fixture(scope="module")
def speculators_pair(muse_pair, tmp_path_factory):
    t, d = muse_pair
    return t, d, write_speculators(tmp_path_factory.mktemp("speculators") / "s", d, t)


def test_the_speculators_drafter_drafts_what_the_original_drafts(speculators_pair):
    """Same config read (target layers back from the hidden-state count, the block non-causal), the same
    drafts after each of several contexts, and lossless greedy decoding with its drafts accepted."""
    t, native, spec = speculators_pair
    assert DrafterConfig.from_dir(spec) == DrafterConfig.from_dir(native)
    original, model = loader.load(t, native, device="cpu"), loader.load(t, spec, device="cpu")
    target = model.target
    ids = torch.tensor(HYBRID_PROMPTS[0] + HYBRID_PROMPTS[2] + HYBRID_PROMPTS[4])
    _, feats = target.forward(ids, target.new_cache(128), feature_layers=model.drafter.cfg.target_layer_ids,
                              commit=True)
    for n in (1, 5, 17, len(ids) - 1):  # past the window of 16 too
        drafts = []
        for drafter in (original.drafter, model.drafter):
            cache = drafter.new_cache(128)
            drafter.add_context(feats[:n], cache)
            drafts.append((drafter.draft(ids[n:n + 1], cache, 8), drafter.draft_logits(ids[n:n + 1], cache, 8)))
        assert torch.equal(drafts[0][0], drafts[1][0]), n
        # the same weights from another file: a GEMM may round differently on other alignments (5e-6 seen)
        torch.testing.assert_close(drafts[0][1], drafts[1][1], rtol=0, atol=1e-5)
    prompt = HYBRID_PROMPTS[0]
    plain = [x for s in Engine(target).generate(Request(prompt, 24)) for x in s.tokens]
    steps = list(Engine(target, model.drafter).generate(Request(prompt, 24)))
    assert [x for s in steps for x in s.tokens] == plain
    assert max(s.acceptance_length for s in steps if not s.prefill) >= 6  # a fitted drafter, really accepted


def _write(tmp_path: Path, cfg: dict) -> Path:
    d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


NATIVE = drafter_config(target_config("qwen3"), layers=2, target_layer_ids=(1, 3),
                        layer_types=["sliding_attention", "full_attention"], sliding_window=16)


def test_the_keys_that_change_the_math_are_read(tmp_path):
    cfg = speculators_config(NATIVE, 512)
    read = DrafterConfig.from_dir(_write(tmp_path, cfg))
    assert read.target_layer_ids == (1, 3)  # aux ids 2, 4: hidden states counted from the embedding
    assert read.causal == (True, False) and read.sliding_windows == (16, None)  # sliding layers causal in the block
    assert DrafterConfig.from_dir(_write(tmp_path, cfg | {"sliding_window_non_causal": True})).causal == (False, False)
    layer = cfg["transformer_layer_config"] | {"rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1234.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    del layer["rope_theta"]
    assert DrafterConfig.from_dir(_write(tmp_path, cfg | {"transformer_layer_config": layer})).rope_theta == 1234.0
    assert DrafterConfig.from_dir(_write(tmp_path, cfg | {"block_size": 4, "mask_token_id": 7})).block_size == 4
    beside = cfg | {"layer_types": ["sliding_attention"] * 2, "sliding_window": 32, "max_anchors": 512}
    assert DrafterConfig.from_dir(_write(tmp_path, beside)).sliding_windows == (32, 32)  # vLLM keeps these over


@pytest.mark.parametrize("change, message", [
    ({"sample_from_anchor": True}, "'sample_from_anchor' = true"),
    ({"proposal_speculative_tokens": 8}, "'sample_from_anchor' = true"),  # block_size drafts: the anchor's too
    ({"draft_vocab_size": 256}, "'draft_vocab_size' 256 is not the target's vocabulary"),
    ({"target_hidden_size": 128}, "'target_hidden_size' 128 differs"),
    ({"aux_hidden_state_layer_ids": [0, 2]}, "each at least 1"),
    ({"mask_token_id": None}, "missing 'mask_token_id'"),
    ({"markov_rank": 256}, "'markov_rank' is not a speculators DFlash key"),
    ({"transformer_layer_config": {k: v for k, v in speculators_config(NATIVE, 512)["transformer_layer_config"].items()
                                   if k != "use_sliding_window"}}, "without use_sliding_window"),
])
def test_keys_it_cannot_honour_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(DflashError, match=message):
        DrafterConfig.from_dir(_write(tmp_path, speculators_config(NATIVE, 512) | change))


@pytest.mark.parametrize("cfg, name", [
    (speculators_config(NATIVE, 512) | {"speculators_model_type": "dspark"}, r"dspark \(DSpark: a Markov head"),
    (speculators_config(NATIVE, 512) | {"speculators_model_type": "eagle3"}, r"eagle3 \(EAGLE-3\)"),
    (NATIVE | {"architectures": ["DSparkDraftModel"]}, r"DSparkDraftModel \(DSpark"),
    (NATIVE | {"architectures": ["LiLiCorrDraftModel"]}, r"LiLiCorrDraftModel \(LiLiCorr: a learned correlator"),
    (NATIVE | {"architectures": ["BrandNewDraftModel"]}, r"drafter architecture BrandNewDraftModel is not supported"),
])
def test_drafters_of_other_architectures_are_refused_by_name(tmp_path, cfg, name):
    with pytest.raises(UsageError, match=name):
        DrafterConfig.from_dir(_write(tmp_path, cfg))


def test_the_cli_refuses_an_unknown_drafter_in_one_line_with_exit_2(muse_pair, tmp_path, capsys):
    t, d = muse_pair
    native = json.loads((d / "config.json").read_text())
    dspark = _write(tmp_path, native | {"architectures": ["DSparkDraftModel"]})
    (dspark / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    assert main(["run", "--target", str(t), "--drafter", str(dspark), "-p", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and "DSparkDraftModel (DSpark" in err, err
