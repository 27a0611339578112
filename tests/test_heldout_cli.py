"""The command line as a new user drives it, mistakes included: every bad input is one line on stderr that
says what to do, a non-zero exit, nothing on stdout and no traceback (parser errors too, which click
prints as four lines of its own)."""
from __future__ import annotations

import pytest

from dflash_cli import registry
from dflash_cli.cli import main


def one_line_error(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("Error: ") and "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("args, says", [
    (["run", "demo", "-n", "0"], "Invalid value for '--max-tokens' / '-n': Input should be greater than or equal to 1 "
                                 "(see `dflash run -h`)"),
    (["run", "demo", "-n", "-3"], "greater than or equal to 1 (see `dflash run -h`)"),
    (["run", "demo", "-n", "many"], "Input should be a valid integer"),
    (["run", "demo", "-t", "hot"], "Input should be a valid number"),
    (["run", "demo", "--max-context", "1"], "'--max-context': Input should be greater than or equal to 2"),
    (["run", "demo", "--bogus"], "No such option: --bogus (see `dflash run -h`)"),
    (["chat", "demo", "--draft-window", "0"], "(see `dflash chat -h`)"),
    (["serve", "demo", "--port", "http"], "(see `dflash serve -h`)"),
    (["completions"], "Missing argument 'SHELL' (see `dflash completions -h`)"),
    (["frobnicate"], "No such command 'frobnicate' (see `dflash -h`)"),
    (["run", "demo", "--temperature"], "Option '--temperature' requires an argument"),
])
def test_a_parser_error_is_one_line_naming_the_help(capsys, args, says):
    code, err = one_line_error(capsys, *args)
    assert code == 2 and says in err


@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_a_model_path_that_does_not_exist_is_one_line(capsys, model):
    code, err = one_line_error(capsys, "run", model, "-p", "hi")
    assert code == 2 and f"{model}: no such directory" in err


def test_a_released_target_or_drafter_repo_id_names_its_pair():
    pair = registry.resolve("qwen3-8b")
    assert registry.resolve("Qwen/Qwen3-8B") is pair is registry.resolve("z-lab/qwen3-8b-dflash-b16")


def test_an_unknown_hub_id_as_model_says_it_goes_after_target(capsys):
    code, err = one_line_error(capsys, "run", "someone/some-model", "-p", "hi")
    assert code == 2 and "--target someone/some-model" in err


def test_a_prompt_past_the_model_s_positions_does_not_send_the_user_to_max_context(capsys):
    """--max-context cannot go past the model's positions (that is refused too): the fix is a shorter prompt."""
    long_prompt = "Once upon a time there was a cat. " * 80  # > 512 tokens, the demo model's positions
    code, err = one_line_error(capsys, "run", "demo", "--no-spec", "--raw", "-n", "2", "-q", "-p", long_prompt)
    assert code == 1 and "the context limit is 512 (shorten the prompt: the model has no more positions)" in err
    code, err = one_line_error(capsys, "run", "demo", "--no-spec", "--raw", "-n", "2", "-q", "--max-context", "64",
                               "-p", long_prompt)
    assert code == 1 and "the context limit is 64 (raise it with --max-context, or shorten the prompt)" in err


def test_bench_takes_a_directory_as_model_as_run_does(capsys):
    code, err = one_line_error(capsys, "bench", "./no-such-model", "--device", "cpu")
    assert code == 2 and "./no-such-model: no such directory" in err


def test_doctor_checks_a_local_directory(capsys, tmp_path):
    """`dflash doctor DIR`: whether this version runs the checkpoint (it was looked up as an alias)."""
    import json
    import shutil

    target = registry.demo_dirs()[0]
    main(["doctor", str(target)])
    out = capsys.readouterr().out
    assert f"{target}: a llama checkpoint this version runs (5 layers, hidden 64)" in out
    d = shutil.copytree(target, tmp_path / "dynamic")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
    assert main(["doctor", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"{d}: unsupported rope scaling type 'dynamic' in config.json (dflash runs default, linear, llama3, yarn " \
           "and proportional rope)" in " ".join(out.split())


def test_a_drafter_given_as_the_target_is_one_line_saying_so(capsys):
    """A drafter's config.json is a Qwen3 one: it was read as a Qwen3 target (and failed on its tokenizer)."""
    target, drafter = registry.demo_dirs()
    for args in ([str(drafter), "--no-spec"], ["--target", str(drafter), "--drafter", str(target)]):
        code, err = one_line_error(capsys, "run", *args, "--device", "cpu", "-p", "hi")
        assert code == 1 and f"{drafter} is a DFlash drafter (DFlashDraftModel), not a target: pass it as " \
                              "--drafter, with the model it drafts for as MODEL or --target" in err


def test_a_warning_is_one_line(capsys, tmp_path):
    """Python's own form is two lines (file:line: UserWarning: …, then the source line that warned)."""
    from .tiny import drafter_config, target_config, write_drafter, write_target

    cfg = target_config("qwen3", layers=6)
    target = write_target(tmp_path / "t", cfg)
    dcfg = drafter_config(cfg, layers=2, target_layer_ids=(1, 3))
    del dcfg["dflash_config"]["target_layer_ids"]  # guessed: [1, 3]
    d = write_drafter(tmp_path / "d", dcfg)
    code = main(["run", "--target", str(target), "--drafter", str(d), "--device", "cpu", "--raw", "-p", "The cat",
                 "-n", "4", "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and out
    assert err.count("\n") == 1 and err.startswith(f"dflash: warning: {d}: no dflash_config.target_layer_ids"), err


@pytest.mark.parametrize("layers, ids, says", [(4, (1, 1), "target_layer_ids [1, 1] name a layer twice"),
                                               (4, None, "target_layer_ids [1, 1] name a layer twice"),  # the guess
                                               (2, None, "target_layer_ids [-1] outside the target's 2 layers")])
def test_target_layer_ids_that_name_a_layer_twice_are_one_line(capsys, tmp_path, layers, ids, says):
    """A repeated layer crashed the first draft with a shape error (its features are gathered once)."""
    from .tiny import drafter_config, target_config, write_drafter, write_target

    cfg = target_config("qwen3", layers=layers)
    target = write_target(tmp_path / "t", cfg)
    dcfg = drafter_config(cfg, layers=2, target_layer_ids=ids or (0, 1))
    if ids is None:
        del dcfg["dflash_config"]["target_layer_ids"]
    d = write_drafter(tmp_path / "d", dcfg)
    code = main(["run", "--target", str(target), "--drafter", str(d), "--device", "cpu", "--raw", "-p", "The cat",
                 "-n", "4", "-q"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "") and err.splitlines()[-1].startswith("Error: ") and says in err, err
