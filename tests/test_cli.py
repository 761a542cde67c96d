"""The CLI's own jobs: error kinds -> exit codes, flag spellings, interrupt advice, --threads,
explicit command registration. In process (typer's runner), no training."""
from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from training.errors import BAD_INPUT, FAILED, SwatError, option


def _invoke(*args: str):  # noqa: ANN202
    from cli.main import app

    return CliRunner().invoke(app, list(args))


def test_library_messages_name_parameters_the_cli_spells_them_as_flags() -> None:
    from cli._app import exit_code, flag, message

    e = SwatError(f"{option('batch_size')} 7 must split over 2 processes; {option('per_layer')} too")
    assert str(e) == "`batch_size` 7 must split over 2 processes; `per_layer` too"
    assert message(e) == "--batch-size 7 must split over 2 processes; --layer-sparsity too"
    assert flag("cache_weight_threshold") == "--refresh-weights"
    assert exit_code(e) == 2 and exit_code(SwatError("damaged", FAILED)) == 1
    assert e.kind == BAD_INPUT
    with pytest.raises(ValueError, match="unknown SwatError kind"):
        SwatError("x", "exit 3")


@pytest.mark.parametrize("kind,code", [(BAD_INPUT, 2), (FAILED, 1)])
def test_handled_maps_kinds_to_exit_codes_in_one_line(kind: str, code: int, capsys) -> None:  # noqa: ANN001
    from cli._app import handled

    @handled
    def command() -> None:
        raise SwatError(f"bad {option('epochs')}\nsecond line", kind)

    with pytest.raises(typer.Exit) as raised:
        command()
    assert raised.value.exit_code == code
    assert capsys.readouterr().err.strip() == "error: bad --epochs second line"


def _interrupted(name: str, **kwargs) -> str:  # noqa: ANN003
    from cli._app import handled

    def command(**_):  # noqa: ANN003, ANN202
        raise KeyboardInterrupt

    command.__name__ = name
    with pytest.raises(typer.Exit) as raised:
        handled(command)(**kwargs)
    assert raised.value.exit_code == 130
    return raised


def test_an_interrupted_command_says_how_to_continue_that_command(capsys) -> None:  # noqa: ANN001
    _interrupted("train", out=Path("runs/a"), resume=None, nproc=2)
    assert "swat train --resume runs/a --nproc 2" in capsys.readouterr().err
    _interrupted("train", out=None, resume=Path("runs/b"), nproc=1)
    err = capsys.readouterr().err
    assert "swat train --resume runs/b`" in err and "--nproc" not in err
    _interrupted("study")
    assert "run the same command again" in capsys.readouterr().err
    _interrupted("export")
    err = capsys.readouterr().err
    assert "swat export" in err and "--resume" not in err


def test_train_threads_reaches_the_library(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    import training.launch as launch

    seen = {}

    def fake_train(config, out, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(kw)
        return launch.TrainResult(Path(out), 0.5, 0.1, {}, True)

    monkeypatch.setattr(launch, "train", fake_train)
    r = _invoke("train", "--out", str(tmp_path / "run"), "--threads", "1")
    assert r.exit_code == 0, r.output
    assert seen["threads"] == 1
    r = _invoke("train", "--out", str(tmp_path / "run"))
    assert r.exit_code == 0 and seen["threads"] is None


def test_torch_threads_scope_sets_and_restores(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from training.launch import _torch_threads

    before = torch.get_num_threads()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(SwatError, match="`threads` 0 must be an integer >= 1"):
        with _torch_threads(0):
            pass


def test_every_command_is_registered() -> None:
    r = _invoke("--help")
    assert r.exit_code == 0
    for name in ("train", "export", "verify", "prune", "bench", "info", "study"):
        assert name in r.output


def test_list_options_are_parsed_by_typer(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    import swat_deploy.bench as bench
    import training.launch as launch

    seen = {}

    def fake_train(config, out, **kw):  # noqa: ANN001, ANN003, ANN202
        seen["config"] = config
        return launch.TrainResult(Path(out), 0.5, 0.1, {}, True)

    monkeypatch.setattr(launch, "train", fake_train)
    r = _invoke("train", "--out", str(tmp_path / "run"), "--exclude", "conv1, fc", "--layer-sparsity", "conv2=0.5",
                "--layer-sparsity", "fc=0.25")
    assert r.exit_code == 0, r.output
    assert seen["config"].exclude == ("conv1", "fc") and seen["config"].per_layer == {"conv2": 0.5, "fc": 0.25}

    def fake_bench(target, batch_sizes, threads, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(batch_sizes=batch_sizes, sweep=kw["sweep_sparsities"])
        raise SwatError("stop here")

    monkeypatch.setattr(bench, "bench", fake_bench)
    r = _invoke("bench", str(tmp_path), "--batch-size", "1,64", "--sweep-sparsities", "0.5,0.9")
    assert r.exit_code == 2 and seen["batch_sizes"] == [1, 64] and seen["sweep"] == [0.5, 0.9]
    # a malformed value is Typer's usage error naming the flag (exit 2), before any library call
    for args, needle in ((("bench", "x", "--batch-size", "1,a"), "integers"),
                         (("train", "--layer-sparsity", "conv2"), "NAME=SPARSITY")):
        r = _invoke(*args)
        assert r.exit_code == 2 and needle in r.output, r.output
