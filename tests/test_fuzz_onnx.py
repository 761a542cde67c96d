"""Damaged and hostile copies of a small exported ONNX, fed to Session and `swat info`.

Each copy (seeded: byte flips, truncations, spliced spans, and edits of the parsed model -
op types, attributes, dims, data types, names, metadata, external data locations, offsets)
must either run and match, or raise the project's error (SwatError): never another
exception, never a traceback from `swat info`, and never a read of a file outside the model's
folder (an audit hook watches every open; a secret file sits next to the folder, reachable
through an absolute path, a '..' path, a symlink and a hard link).

"Matches": the Session's logits equal onnxruntime's on the same (damaged) file within 1e-4
when onnxruntime accepts it, else the undamaged model's logits (so a copy onnxruntime refuses
must be refused too, or still compute the original function). The default suite runs 100
copies of each kind (~10 s); `pytest -m slow` runs 400 of each.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from swat_deploy.export import write_onnx
from swat_deploy.prune import prune, to_onnx_model
from training.errors import SwatError
from test_export import make_run

SEED = 1234
FAST_CASES = 100  # per source kind (inline / external data): 200 copies in the default suite
SLOW_CASES = 400

# ---------------------------------------------------------------------- reads outside the folder
_AUDIT: dict = {"forbidden": None, "hits": []}


def _audit(event: str, args: tuple) -> None:
    root = _AUDIT["forbidden"]
    if root is None or event not in ("open", "os.open"):
        return
    path = args[0] if args else None
    if isinstance(path, (str, bytes, os.PathLike)):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if real == root or real.startswith(root + os.sep):
            _AUDIT["hits"].append(real)


sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing unless a test arms it


# ---------------------------------------------------------------------- the model and its copies
@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    run = make_run(root / "run")
    sm = prune(run)
    base = to_onnx_model(sm)  # the quick TorchScript-based exporter; write_onnx adds compact storage + metadata
    for imp in base.opset_import:  # lenet's ops are the same in 17 and 18; compact storage needs 18
        if imp.domain in ("", "ai.onnx"):
            imp.version = 18
    (root / "inline").mkdir()
    inline = write_onnx(base, sm, root / "inline" / "model.onnx")
    ext_dir = root / "ext"
    ext_dir.mkdir()
    external = write_onnx(base, sm, ext_dir / "model.onnx", external_threshold=0)
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.arange(1 << 14, dtype=np.float32).tobytes())
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    from swat_deploy.session import Session

    ref = Session(str(inline), fallback=False, threads=1).run(None, {"input": x})[0]
    return {"root": root, "inline": inline, "external": external, "data": ext_dir / "model.onnx.data",
            "outside": outside, "secret": secret, "x": x, "ref": ref}


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _splice(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 64))
    kind = rng.randrange(4)
    if kind == 0:
        return data[:i]                                    # truncated
    if kind == 1:
        return data[:i] + data[j:]                         # a span deleted
    if kind == 2:
        return data[:i] + bytes(rng.randrange(256) for _ in range(j - i)) + data[i:]  # junk inserted
    return data[:j] + data[i:j] + data[j:]                 # a span duplicated


def _edit(model: onnx.ModelProto, rng: random.Random, files: dict) -> onnx.ModelProto:
    """One structural edit of a parsed copy: what a hostile or careless writer could produce."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = rng.randrange(9)
    nodes = list(g.node)
    if kind == 0 and nodes:
        rng.choice(nodes).op_type = rng.choice(["Conv", "Gemm", "Relu", "Reshape", "Add", "Nope", "MaxPool", ""])
    elif kind == 1:
        with_attrs = [n for n in nodes if n.attribute]
        if with_attrs:
            a = rng.choice(list(rng.choice(with_attrs).attribute))
            if a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice([-7, 0, 1, 3, 1 << 40])
            elif a.HasField("i"):
                a.i = rng.choice([-7, 0, 2, 1 << 40])
            else:
                a.name = rng.choice(["", "bogus", "axis"])
    elif kind == 2 and g.initializer:
        t = rng.choice(list(g.initializer))
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 1 << 40, -1])
        else:
            t.dims.append(rng.choice([0, 2, 1 << 40]))
    elif kind == 3 and g.initializer:
        rng.choice(list(g.initializer)).data_type = rng.choice([0, 2, 3, 7, 9, 10, 11, 16, 25, 99])
    elif kind == 4 and nodes:
        n = rng.choice(nodes)
        if n.input:
            n.input[rng.randrange(len(n.input))] = rng.choice(["", "missing", g.input[0].name, n.output[0]])
    elif kind == 5 and nodes:
        g.node.remove(rng.choice(nodes))
    elif kind == 6:
        p = m.metadata_props.add()
        p.key, p.value = rng.choice(["swat.model", "\x1b]0;pwned\x07", "note"]), "\x1b[2J\x1b[31m\u202eevil\x9b"
    elif kind == 7:
        m.opset_import[0].version = rng.choice([1, 7, 99, -1])
    else:
        ext = [t for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
        targets = ext or list(g.initializer)
        if targets:
            t = rng.choice(targets)
            t.data_location = TensorProto.EXTERNAL
            entries = {e.key: e for e in t.external_data}
            choice = rng.randrange(6)
            if choice < 4 or "location" not in entries:
                loc = [str(files["secret"]), "../outside/secret.bin", "link.bin", "hard.bin",
                       "sub/../../outside/secret.bin", "model.onnx.data"][rng.randrange(6)]
                if "location" in entries:
                    entries["location"].value = loc
                else:
                    e = t.external_data.add()
                    e.key, e.value = "location", loc
            else:
                key = rng.choice(["offset", "length"])
                value = rng.choice(["-1", "abc", str(1 << 40), "0", "7"])
                if key in entries:
                    entries[key].value = value
                else:
                    e = t.external_data.add()
                    e.key, e.value = key, value
    return m


def _cases(files: dict, n: int, seed: int):
    """(label, folder, file bytes) of n damaged copies of each source kind."""
    rng = random.Random(seed)
    for source in ("inline", "external"):
        path = files[source]
        data = path.read_bytes()
        parsed = onnx.load_model_from_string(data)
        for i in range(n):
            op = rng.randrange(3)
            if op == 0:
                out = _flip(data, rng)
            elif op == 1:
                out = _splice(data, rng)
            else:
                out = _edit(parsed, rng, files).SerializeToString()
            yield f"{source}#{i}/{('flip', 'splice', 'edit')[op]}", path.parent, out


def _session_outcome(path: Path, files: dict) -> str:
    from swat_deploy.ort import ort_session
    from swat_deploy.session import Session

    try:
        got = Session(str(path), fallback=False, threads=1).run(None, {"input": files["x"]})[0]
    except SwatError:
        return "refused"
    try:
        want = ort_session(path).run(None, {"input": files["x"]})[0]
    except Exception:  # onnxruntime rejects the copy: the Session must then compute the original
        want = files["ref"]
    assert np.asarray(got).shape == np.asarray(want).shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return "ran"


def _info_outcome(path: Path) -> str:
    import cli.main  # noqa: F401 - registers every command
    from cli._app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["info", str(path)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 1, 2), r.exit_code
    if r.exit_code:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for ch in r.stdout + r.stderr:  # nothing from the file may drive the terminal
        assert ch == "\n" or not (ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0), repr(ch)
    return "shown" if r.exit_code == 0 else "refused"


def _fuzz(files: dict, n: int, monkeypatch) -> dict:
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    # decoys inside each folder that lead outside it
    for folder in (files["inline"].parent, files["external"].parent):
        for name, make in (("link.bin", lambda p: os.symlink(files["secret"], p)),
                           ("hard.bin", lambda p: os.link(files["secret"], p))):
            if not os.path.lexists(folder / name):
                make(folder / name)
    counts: dict = {}
    _AUDIT["forbidden"] = os.path.realpath(files["outside"])
    _AUDIT["hits"].clear()
    try:
        for label, folder, data in _cases(files, n, SEED):
            case = folder / "case.onnx"
            case.write_bytes(data)
            try:
                s = _session_outcome(case, files)
                i = _info_outcome(case)
            except AssertionError as e:
                raise AssertionError(f"{label}: {e}") from None
            counts[(s, i)] = counts.get((s, i), 0) + 1
            assert not _AUDIT["hits"], f"{label}: read outside the model's folder: {_AUDIT['hits'][:3]}"
    finally:
        _AUDIT["forbidden"] = None
    return counts


def test_damaged_copies_run_and_match_or_raise_the_project_error(model_files: dict, monkeypatch) -> None:
    counts = _fuzz(model_files, FAST_CASES, monkeypatch)
    # the corpus must exercise both outcomes, or the test proves nothing
    assert sum(v for (s, _), v in counts.items() if s == "refused") >= 5, counts
    assert sum(v for (s, _), v in counts.items() if s == "ran") >= 5, counts


@pytest.mark.slow
def test_damaged_copies_many(model_files: dict, monkeypatch) -> None:
    _fuzz(model_files, SLOW_CASES, monkeypatch)
