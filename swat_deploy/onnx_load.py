"""Reading ONNX models from untrusted sources: the one place the project turns bytes into a ModelProto.

An ONNX tensor may keep its bytes in another file ("external data": a ``location`` relative to
the model). onnx resolves that location against whatever base directory it is given - the
current directory for a model given as bytes or a ModelProto - and older onnx versions follow a
symlink out of the model's folder. So the project never lets onnx (or onnxruntime) read external
data on its own: :func:`inline_external_data` resolves every location itself and reads the
bytes into the proto, after checking that

- the model came from a file (bytes or a ModelProto have no folder: external data is refused);
- the location is relative, has no ``..`` part, and - symlinks resolved - names a regular file
  inside the model's folder with a single hard link;
- offset and length lie inside that file.

Anything else raises :class:`training.errors.UnsafeInputError` (worded as a refusal, never as
"truncated"); a file that is not ONNX at all raises a plain SwatError. This holds whatever onnx
version is installed.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterator

from training.errors import FAILED, SwatError, UnsafeInputError, option

EXTERNAL = 1  # onnx.TensorProto.EXTERNAL


def read_model(path: str | Path) -> Any:
    """Parse the ONNX file at ``path``; its external data (if any) read safely from its folder."""
    path = Path(path)
    if path.is_dir():
        raise SwatError(f"{path} is a directory, not an ONNX file; give the path of a .onnx file")
    if not path.exists():
        raise SwatError(f"{path} not found; check the path, or export one from its run dir ({option('fmt')} onnx)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SwatError(f"cannot read {path} ({e.strerror or type(e).__name__}); check its permissions") from None
    return parse_model(data, base_dir=path.parent, what=str(path))


def parse_model(data: bytes, base_dir: str | Path | None = None, what: str = "the bytes given") -> Any:
    """ModelProto from serialized ``data``; external data only from inside ``base_dir`` (None: refused)."""
    import onnx

    if not data:
        raise SwatError(f"{what} is empty (0 bytes); re-export the model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # DecodeError, or the C++ parser's own types: all mean "not ONNX"
        raise SwatError(f"{what} is not a readable ONNX model ({type(e).__name__}); it may be truncated or "
                        f"another kind of file - re-export it") from None
    check_structure(model, what)
    inline_external_data(model, base_dir, what)
    return model


def from_proto(model: Any, base_dir: str | Path | None = None, what: str = "the ModelProto given") -> Any:
    """``model`` ready to read: a copy with external data inlined if it has any, else itself."""
    check_structure(model, what)
    if not any(uses_external_data(t) for t in iter_tensors(model)):
        return model
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inline_external_data(copy, base_dir, what)
    return copy


def check_structure(model: Any, what: str) -> None:
    """A parsed proto that holds no graph (an empty or foreign file parses as an empty message)."""
    if not model.HasField("graph") or not model.graph.output:
        raise SwatError(f"{what} holds no ONNX graph (empty, truncated or not an ONNX file); re-export it")


def check_valid(model: Any, what: str) -> None:
    """Strict ONNX type and shape inference, as onnxruntime validates a model at load.

    A damaged attribute (a Cast to another type, an out-of-range axis) can leave a graph that
    parses but means something else; onnxruntime refuses it, so the Session does too instead of
    computing a different function. Models over protobuf's 2 GiB limit are checked by the
    runtime's own ops only.
    """
    import onnx

    if model.ByteSize() >= 2**31 - 2**20:
        return
    try:
        # type and shape inference in strict mode, not the checker: the checker also demands
        # what onnxruntime does not (shapes on every value_info), and refuses models it runs
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # InferenceError, or the C++ side's own types
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise SwatError(f"{what} is not a valid ONNX model ({first}); the file is damaged or was not "
                        f"written by an ONNX exporter - re-export it") from None


def check_integrity(model: Any, what: str) -> None:
    """A swat export carries a hash of its tensors (``swat.weights_sha256``): refuse to run one
    whose tensors no longer match it (damaged or edited after export). Other models pass."""
    claimed = next((p.value for p in model.metadata_props if p.key == "swat.weights_sha256"), None)
    if claimed is None:
        return
    if onnx_weights_sha256(model) != claimed:
        raise SwatError(f"{what}: its weights do not match the hash recorded at export (swat.weights_sha256); "
                        f"the file was damaged or edited - re-export it (or remove that metadata entry to run "
                        f"an intentionally edited model)", kind=FAILED)


def onnx_weights_sha256(model: Any) -> str:
    """Canonical hash (:func:`training.fileio.canonical_digest`) of every stored tensor:
    initializers, sparse initializers (values and ``#idx``) and Constant nodes, by name.

    A tensor that does not decode (damaged file) is hashed by its serialized proto, so the hash
    simply disagrees with the metadata instead of raising.
    """
    from training.fileio import canonical_digest

    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(st.values.name, st.values) for st in model.graph.sparse_initializer]
    tensors += [(st.values.name + "#idx", st.indices) for st in model.graph.sparse_initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and node.output:
                    tensors.append((node.output[0], a.t))
    return canonical_digest(_onnx_item(name, t) for name, t in tensors)


def _onnx_item(name: str, t: Any) -> tuple[str, str, list[int], bytes]:
    from onnx import numpy_helper

    from training.fileio import array_item

    try:
        return array_item(name, numpy_helper.to_array(t))
    except Exception:
        return name, "undecodable", [int(d) for d in t.dims], t.SerializeToString()


# ------------------------------------------------------------------------------ external data
def uses_external_data(tensor: Any) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == EXTERNAL


def iter_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers, sparse ones, node attributes, subgraphs, functions."""
    def graph_tensors(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from node_tensors(g.node)

    def node_tensors(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                for sp in a.sparse_tensors:
                    yield sp.values
                    yield sp.indices
                if a.HasField("g"):
                    yield from graph_tensors(a.g)
                for sub in a.graphs:
                    yield from graph_tensors(sub)

    if model.HasField("graph"):
        yield from graph_tensors(model.graph)
    for fn in model.functions:
        yield from node_tensors(fn.node)
    for info in model.training_info:
        for g in (info.initialization, info.algorithm):
            yield from graph_tensors(g)


def inline_external_data(model: Any, base_dir: str | Path | None, what: str) -> None:
    """Read every external tensor's bytes into the proto (in place), or refuse (see module doc)."""
    tensors = [t for t in iter_tensors(model) if uses_external_data(t)]
    if not tensors:
        return
    if base_dir is None:
        raise UnsafeInputError(
            f"refused: tensor {tensors[0].name!r} of {what} is stored as external data, and a model given as bytes "
            f"or a ModelProto has no folder to confine it to; load the model from its .onnx file")
    base = Path(os.path.realpath(base_dir))
    opened: dict[str, bytes] = {}
    for t in tensors:
        entries = {e.key: e.value for e in t.external_data}
        location = entries.get("location", "")
        target = _confined(base, location, t.name, what)
        if target not in opened:
            opened[target] = _read_confined(target, base, location, t.name, what)
        blob = opened[target]
        offset = _int_entry(entries, "offset", 0, t.name, what)
        length = _int_entry(entries, "length", len(blob) - offset, t.name, what)
        if offset > len(blob) or length < 0 or offset + length > len(blob):
            raise SwatError(f"{what}: tensor {t.name!r} wants bytes {offset}..{offset + length} of {location!r}, "
                            f"which holds {len(blob)}; the external data file is truncated or from another "
                            f"export - re-export the model")
        t.raw_data = blob[offset:offset + length]
        t.data_location = 0  # DEFAULT: the bytes now live in the proto
        del t.external_data[:]


def _refuse(what: str, name: str, location: str, why: str, base: Path) -> UnsafeInputError:
    return UnsafeInputError(f"refused: {what} asks to read tensor {name!r} from {location!r}, {why}; external "
                            f"data must be a plain file inside the model's folder {base}")


def _confined(base: Path, location: str, name: str, what: str) -> str:
    """The real path of ``location`` if it lies inside ``base``; else a refusal."""
    if not location:
        raise SwatError(f"{what}: tensor {name!r} is marked external but names no file; re-export the model")
    if "\0" in location:
        raise _refuse(what, name, location, "a path with a NUL byte", base)
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise _refuse(what, name, location, "an absolute path", base)
    if ".." in parts:
        raise _refuse(what, name, location, "a path that climbs out with '..'", base)
    real = os.path.realpath(base / location)
    if os.path.commonpath([real, str(base)]) != str(base):
        raise _refuse(what, name, location, f"a link that leads outside the folder (to {real})", base)
    if real == str(base):
        raise _refuse(what, name, location, "the folder itself", base)
    return real


def _read_confined(real: str, base: Path, location: str, name: str, what: str) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise SwatError(f"{what}: external data file {location!r} of tensor {name!r} is missing; keep it next to "
                        f"the .onnx file (or re-export the model)") from None
    except OSError as e:
        raise SwatError(f"{what}: cannot read external data file {location!r} ({e.strerror or e}); check it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(what, name, location, "not a regular file", base)
        if st.st_nlink > 1:
            raise _refuse(what, name, location, f"a file with {st.st_nlink} hard links (it may be another "
                                                "file's contents)", base)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _int_entry(entries: dict[str, str], key: str, default: int, name: str, what: str) -> int:
    if key not in entries:
        return default
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise SwatError(f"{what}: tensor {name!r} has external data {key} {entries[key]!r}, not a byte count; "
                        f"re-export the model")
    return value
