"""Writing a teacher folder safely: atomic publish, relocation, and a build lock.

A build writes into a hidden sibling folder and renames it into place only when everything,
``report.json`` included, is written, so a reader never sees half a teacher. The text tower's
config must name a folder (open_clip hands ``hf_model_name`` to transformers), and it names the
teacher folder itself; if the folder was moved, :func:`relocate` rewrites that path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import save_file

from ..errors import SetupError

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
REPORT = "report.json"
REQUIRED = (CONFIG, WEIGHTS, REPORT, "config.json", "tokenizer.json")


class DemoTeacherError(SetupError):
    """The demo teacher cannot be built or published (bad output folder, missing package...)."""


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a fully published teacher."""
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED)


def write_config(path: Path, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any], text_dir: Path) -> None:
    """(Re)write ``open_clip_config.json`` with the text tower pointing at ``text_dir``."""
    cfg = json.loads(json.dumps(model_cfg))
    cfg["text_cfg"]["hf_model_name"] = str(text_dir)
    cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
    tmp = path / (CONFIG + ".tmp")
    tmp.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    os.replace(tmp, path / CONFIG)


def save_weights(model, path: Path) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))


def relocate(path: Path) -> Path:
    """Make a moved or copied teacher folder point its text tower at itself again."""
    path = Path(path).resolve()
    config = json.loads((path / CONFIG).read_text())
    if config["model_cfg"]["text_cfg"].get("hf_model_name") != str(path):
        write_config(path, config["model_cfg"], config.get("preprocess_cfg", {}), path)
    return path


def check_output(out: Path) -> None:
    """Fail early, with one line, when ``out`` cannot become a teacher folder."""
    if out.exists() and not out.is_dir():
        raise DemoTeacherError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).is_file():
        raise DemoTeacherError(f"output folder {out} is not empty and is not a teacher folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DemoTeacherError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to build into."""
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` into ``out`` (replacing an older teacher there)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock so two processes do not build the same teacher at once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
