"""Drafters released in formats other than z-lab's, read as the DFlash drafter they are (drafter.py).

`native_config(raw, directory)` turns such a config.json into the native one (`DrafterConfig.from_raw` reads
the rest) and names the tensors the checkpoint stores under other names. Every key of the format that
changes the drafter's math is read or refused by name; an architecture that is not a DFlash drafter is
refused by name, never loaded as something it is not.

- vLLM's `speculators` format (`speculators_model_type: "dflash"`, `DFlashSpeculatorConfig` in
  vllm-project/speculators src/speculators/models/dflash/config.py): the draft's Qwen3 config under
  `transformer_layer_config`; `aux_hidden_state_layer_ids` count the target's hidden states from the
  embedding (HF's `hidden_states` index), so layer i's output is i + 1 (vLLM's `update_dflash` maps them
  back with i - 1); sliding layers are causal inside the block unless `sliding_window_non_causal`, full
  ones never; `sample_from_anchor` (the anchor slot drafts too) and a reduced draft vocabulary (`t2d`/`d2t`)
  change what the drafts are and are refused. Tensors: the native names (`layers.*`, `fc`, `hidden_norm`,
  `norm`) plus the verifier's `embed_tokens`/`lm_head` copies, which are not read: the target's serve.
- Meta's v1 assistant head (`MuseGlimmerAssistantModel`, transformers' models/muse_glimmer_assistant): its keys
  at the top level with MuseGlimmerAssistantConfig's defaults, every layer attending to the whole block
  (non-causal), and two tensors renamed (`encoder.fc`, `encoder.output_norm_enc`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import DflashError, UsageError

NATIVE = ("DFlashDraftModel", "DFlash2DraftModel")
ASSISTANT = "MuseGlimmerAssistantModel"
SPECULATOR = "DFlashSpeculator"

# Drafters of other kinds that users meet beside DFlash ones (research/landscape-and-quantization.md §A3):
# what each adds, for the refusal.
DSPARK = "DSpark: a Markov head over the DFlash backbone, drafting from the anchor"
LILICORR = "LiLiCorr: a learned correlator scoring combinations of per-position candidates"
OTHER_DRAFTERS = {"dspark": DSPARK, "dsparkdraftmodel": DSPARK, "lilicorr": LILICORR, "lilicorrdraftmodel": LILICORR,
                  "eagle": "EAGLE", "eagle3": "EAGLE-3", "peagle": "Parallel EAGLE",
                  "domino": "Domino: a GRU correction head", "jetspec": "JetSpec: a block-causal tree drafter"}

# MuseGlimmerAssistantConfig's defaults (transformers 5.25), for the keys a config.json leaves out.
ASSISTANT_DEFAULTS = {"hidden_size": 6656, "intermediate_size": 19968, "num_hidden_layers": 5,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
                      "max_position_embeddings": 131072, "sliding_window": 2048}
ASSISTANT_BLOCK = {"block_size": 16, "mask_token_id": 201818, "target_layer_ids": [1, 13, 25, 37, 49]}
ASSISTANT_THETA = 500000.0  # MuseGlimmerAssistantConfig.default_theta
ASSISTANT_RENAMES = (("fc.weight", "encoder.fc.weight"), ("hidden_norm.weight", "encoder.output_norm_enc.weight"))


def refuse(directory: Path, what: str, hint: str = "") -> None:
    """One line: `what` (a drafter's architecture or format) is not one this version runs."""
    kind = OTHER_DRAFTERS.get(what.lower())
    raise UsageError(f"{directory}: drafter architecture {what}{f' ({kind})' if kind else ''} is not supported: "
                     f"this version runs {', '.join(NATIVE)}, {ASSISTANT} and speculators' dflash{hint}")


def native_config(raw: dict, directory: Path) -> tuple[dict, tuple[tuple[str, str], ...]]:
    """(the native config.json this drafter's config means, (native name, stored name) of renamed tensors)."""
    if "speculators_model_type" in raw:
        return speculators_config(raw, directory), ()
    archs = raw.get("architectures") or ["DFlashDraftModel"]
    if archs == [ASSISTANT]:
        return assistant_config(raw, directory), ASSISTANT_RENAMES
    if archs not in ([a] for a in NATIVE):
        hint = "" if "num_target_layers" in raw or "dflash_config" in raw else " (a target, not a drafter?)"
        refuse(directory, ", ".join(map(str, archs)), hint)
    return raw, ()


def assistant_config(raw: dict, directory: Path) -> dict:
    """Meta's assistant head as a native v1 config: non-causal in every layer (no `is_causal` key exists)."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise DflashError(f"{directory}/config.json: hidden_act '{act}' is not supported (the assistant: silu)")
    out = ASSISTANT_DEFAULTS | {k: v for k, v in raw.items() if v is not None}
    layers = int(out["num_hidden_layers"])
    out.setdefault("layer_types", ["sliding_attention"] * layers)
    if not raw.get("rope_parameters") and raw.get("rope_theta") is None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": ASSISTANT_THETA}
    block = {k: raw.get(k) if raw.get(k) is not None else v for k, v in ASSISTANT_BLOCK.items()}
    return out | {"architectures": ["DFlashDraftModel"], "is_causal": False, "attention_bias": False,
                  "dflash_config": block}


# The sliding-window keys some writers put beside transformer_layer_config; vLLM keeps them over the nested ones.
WINDOW_KEYS = ("layer_types", "use_sliding_window", "sliding_window", "max_window_layers")
# speculators config keys that are not the draft transformer's, each read here or refused (the training-only
# ones and the bookkeeping change nothing at inference).
SPECULATOR_KEYS = {"speculators_model_type", "architectures", "transformer_layer_config", "draft_vocab_size",
                   "block_size", "target_hidden_size", "aux_hidden_state_layer_ids", "mask_token_id",
                   "sliding_window_non_causal", "sample_from_anchor", "speculators_config", "speculators_version",
                   "proposal_speculative_tokens", "max_anchors", "torch_dtype", "dtype", "transformers_version",
                   "model_type", "auto_map", "has_no_defaults_at_init", "_name_or_path", *WINDOW_KEYS}


def speculators_config(raw: dict, directory: Path) -> dict:
    """A speculators DFlash config as the native one, or a one-line refusal naming the key."""
    kind = str(raw.get("speculators_model_type"))
    if kind != "dflash":
        refuse(directory, f"speculators '{kind}'" if kind.lower() not in OTHER_DRAFTERS else kind)
    where = f"{directory}/config.json"
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise DflashError(f"{where}: a speculators DFlash config needs its 'transformer_layer_config'")
    layer = layer | {k: raw[k] for k in WINDOW_KEYS if raw.get(k) is not None}
    methods = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
    drafted = raw.get("proposal_speculative_tokens", methods[0].get("speculative_tokens"))
    if raw.get("sample_from_anchor") or (drafted is not None and drafted == raw.get("block_size")):
        raise DflashError(f"{where}: 'sample_from_anchor' = true (block_size drafts, the anchor slot's too: "
                          "DSpark's layout) changes what the drafts are and is not supported")
    vocab, draft_vocab = layer.get("vocab_size"), raw.get("draft_vocab_size")
    if draft_vocab is not None and vocab is not None and int(draft_vocab) != int(vocab):
        raise DflashError(f"{where}: 'draft_vocab_size' {draft_vocab} is not the target's vocabulary ({vocab}): "
                          "a reduced draft vocabulary (t2d/d2t) is not supported")
    hidden = layer.get("hidden_size")
    if raw.get("target_hidden_size") not in (None, hidden):
        raise DflashError(f"{where}: 'target_hidden_size' {raw['target_hidden_size']} differs from the draft's "
                          f"hidden_size {hidden}: not supported")
    aux = raw.get("aux_hidden_state_layer_ids")
    if not aux or any(int(i) < 1 for i in aux):
        raise DflashError(f"{where}: 'aux_hidden_state_layer_ids' must list the target's hidden states to read, "
                          f"each at least 1 (0 is the embedding), got {aux!r}")
    for key in ("block_size", "mask_token_id"):
        if raw.get(key) is None:
            raise DflashError(f"{where} is missing '{key}'")
    unknown = sorted(k for k, v in raw.items() if k not in SPECULATOR_KEYS and v not in (None, False, 0, {}, []))
    if unknown:  # a key of a newer format version may change the math: refuse rather than ignore
        raise DflashError(f"{where}: '{unknown[0]}' is not a speculators DFlash key this version reads")
    if "sliding_attention" in (layer.get("layer_types") or []) and not layer.get("use_sliding_window"):
        raise DflashError(f"{where}: sliding_attention layers without use_sliding_window (Qwen3Config then drops "
                          "the window, vLLM reads it): ambiguous, not supported")
    if layer.get("use_sliding_window") and not layer.get("layer_types"):
        raise DflashError(f"{where}: use_sliding_window without layer_types (which layers slide is "
                          "max_window_layers' rule): not supported")
    out = dict(layer)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "sliding_attention" in rope:  # per layer type (Laguna): the sliding one's
        out["rope_parameters"] = rope["sliding_attention"]
    for native in ("dflash_config", "is_causal", "block_size", "mask_token_id"):
        out.pop(native, None)  # the speculators keys decide these
    out |= {"architectures": ["DFlashDraftModel"],
            "dflash_config": {"target_layer_ids": [int(i) - 1 for i in aux], "block_size": int(raw["block_size"]),
                              "mask_token_id": int(raw["mask_token_id"])}}
    if raw.get("sliding_window_non_causal"):
        out["is_causal"] = False  # full layers are never causal; sliding ones now neither
    return out
