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
