"""Build ``.whl/transformers-VERSION-trimmed.zip`` for a GPU machine that has no registry.

    python benchmarks/pack_transformers.py            # the version installed here
    python benchmarks/pack_transformers.py --version 5.24.0

The device machines' image holds an older transformers than specbeam needs, and a call may carry at
most 64 MiB: the demo models take ~52 MB and the full wheel ~14 MB. This downloads the wheel, keeps
``transformers/models/`` only for the families the tests, benchmarks and ``specbeam_hf`` name (plus
the modules those import, found by running the CUDA, model-family, demo-pair and beam tests here
against the trimmed copy), and zips the
package with its ``dist-info``. ``benchmarks/gpu_check.sh`` unpacks ``.whl/*.zip`` onto ``PYTHONPATH``;
carry ``.whl`` with the call.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/*.py", "specbeam_hf/*.py", "benchmarks/*.py"]
CHECK = ["tests/test_cuda.py", "tests/test_model_families.py", "tests/test_demo_pair.py", "tests/test_beam_search.py"]


def families_named(models: list[str]) -> set[str]:
    """Model folders named in our code: as a quoted model type, or by a ``<Family>Config`` class."""
    text = "".join(p.read_text() for pattern in SOURCES for p in ROOT.glob(pattern))
    configs = {c.lower() for c in re.findall(r"\b([A-Z][A-Za-z0-9]*)Config\b", text)}
    return {"auto"} | {m for m in models if re.search(rf"[\"']{re.escape(m)}[\"']", text) or m.replace("_", "") in configs}


def missing_module(site: Path) -> str | None:
    """The first ``transformers.models.X`` the checked tests (run here, on the CPU) fail to import, if any."""
    env = dict(os.environ, PYTHONPATH=f"{site}:{ROOT}")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CHECK],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    found = re.search(r"No module named 'transformers\.models\.([a-z0-9_]+)", out.stdout + out.stderr)
    return found.group(1) if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default=metadata.version("transformers"))
    p.add_argument("--out", type=Path, default=ROOT / ".whl")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp),
                        f"transformers=={args.version}"], check=True)
        wheel = next(tmp.glob("transformers-*.whl"))
        full, site = tmp / "full", tmp / "site"
        zipfile.ZipFile(wheel).extractall(full)
        shutil.copytree(full, site)
        models = sorted(d.name for d in (full / "transformers/models").iterdir() if d.is_dir())
        keep = families_named(models)
        for m in models:
            if m not in keep:
                shutil.rmtree(site / "transformers/models" / m)
        while (m := missing_module(site)) is not None:  # families that the kept ones import
            print(f"also keeping {m}")
            shutil.copytree(full / "transformers/models" / m, site / "transformers/models" / m)
        args.out.mkdir(exist_ok=True)
        path = args.out / f"transformers-{args.version}-trimmed.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(site.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    z.write(f, f.relative_to(site))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
