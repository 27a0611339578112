"""Build a CPU demo pair: the trained stories260K Llama (shipped in dflash_cli/data/demo) and a DFlash drafter
fitted to it in a few seconds. Usage: python scripts/make_demo_pair.py OUT_DIR
then: dflash chat --target OUT_DIR/stories --drafter OUT_DIR/stories-drafter --device cpu"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli.loader import load_tokenizer  # noqa: E402
from tests.conftest import STORY_PROMPTS  # noqa: E402
from tests.fit import fit_drafter  # noqa: E402
from tests.tiny import copy_stories, drafter_config  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    target = copy_stories(out / "stories")
    cfg = json.loads((target / "config.json").read_text()) | {"head_dim": 8}
    tokenizer = load_tokenizer(target)
    dcfg = drafter_config(cfg, block_size=8, layers=1, target_layer_ids=(1, 3), heads=8, kv_heads=4, head_dim=8,
                          intermediate=172, mask_token_id=0)
    fit_drafter(target, out / "stories-drafter", dcfg, [tokenizer.encode(p) for p in STORY_PROMPTS], steps=1500)
    print(f"dflash chat --target {out / 'stories'} --drafter {out / 'stories-drafter'} --device cpu")
