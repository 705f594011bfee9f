"""What the bench scripts share: the project's interpreter, an isolated environment for the processes they time,
the `mlxk` command, and the mlx-knife 2.0.8 reference install (one venv for every bench, so it is installed once).

A script runs as `bench/<name>` or `.venv/bin/python bench/<name>`; either way its directory is first on sys.path,
and it imports this module first, before anything third-party: run by another interpreter (its shebang's python3),
importing this module re-executes the script with the project's .venv/bin/python (`make install` makes it), where
httpx, mlx and the repo are installed. So this module imports nothing but the standard library.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def _reexec_in_project_venv() -> None:
    """Replace this process by the same bench script under the project's .venv, unless it runs there already (or
    there is none: then the script's own imports say what is missing)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.parent != Path(__file__).resolve().parent:
        return   # imported by something other than a bench script (a test): leave the interpreter alone
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(script), *sys.argv[1:]])


_reexec_in_project_venv()

REF_VERSION = "2.0.8"
REF_PACKAGES = [f"mlx-knife=={REF_VERSION}", "mlx-cpu==0.32.0"]
REF_VENV_DEFAULT = Path(tempfile.gettempdir()) / "mlxk-bench-mlx-knife"
REF_INSTALL_TIMEOUT_S = 900

# Besides every MLXK_* and HF_* variable: what would point a child at a user's cache or files.
_ESCAPES = ("HUGGINGFACE_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN", "XDG_CACHE_HOME")


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child that must touch nothing outside `root`: no MLXK_* or HF_* variable
    is inherited; MLXK_HOME, HF_HOME (mlx-knife reads HF_HOME/hub), HF_HUB_CACHE and HOME point under root,
    telemetry is off, and `extra` is set last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXK_", "HF_")) and k not in _ESCAPES}
    env.update({
        "MLXK_HOME": str(root / "mlxk"),
        "HF_HOME": str(root / "hf"),
        "HF_HUB_CACHE": str(root / "hf" / "hub"),
        "HOME": str(root / "user"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    })
    env.update(extra)
    return env


def mlxk_command() -> list[str]:
    """`mlxk` as a user runs it: the console script next to this interpreter (`make install` puts it in .venv/bin),
    else this interpreter running the CLI."""
    script = Path(sys.executable).with_name("mlxk")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mlxk.cli import main; main()"]


def reference_venv() -> Path:
    """Where mlx-knife lives: MLXK_BENCH_REF_VENV, else a venv in the temp dir."""
    return Path(os.environ.get("MLXK_BENCH_REF_VENV") or REF_VENV_DEFAULT)


def reference_bin() -> Path:
    """The bin dir of the mlx-knife venv (`mlxk2`, and its `mlxk`), installed on first use.

    Raises RuntimeError, with pip's last words, when the install fails."""
    venv = reference_venv()
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import mlxk2"], capture_output=True).returncode == 0:
        return python.parent
    print(f"installing {' '.join(REF_PACKAGES)} into {venv} (once) ...", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REF_PACKAGES], check=True,
                       capture_output=True, timeout=REF_INSTALL_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = (getattr(error, "stderr", None) or b"").decode(errors="replace")[-300:]
        raise RuntimeError(f"installing mlx-knife {REF_VERSION} into {venv} failed: {detail}") from None
    return python.parent
