"""Why ``dynamo_openrlhf._core`` may not import, for the package's import-time message.

``ray job submit --working-dir <checkout> -- python -m dynamo_openrlhf.train`` uploads the checkout without
its git-ignored files, so without the compiled ``_core`` extension, and Ray puts the upload first on
``sys.path``: it shadows the installed package and the import fails with a bare ``ModuleNotFoundError``.
:func:`shadowed_package_message` says so, and what to do, when the package being imported is not the
installed one. Standard library only (it runs while ``dynamo_openrlhf`` itself fails to import).
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import List, Optional, Sequence

__all__ = ["installed_package_dirs", "shadowed_package_message"]

DIST_NAME = "dynamo_openrlhf"


def installed_package_dirs(dist_name: str = DIST_NAME) -> List[str]:
    """Real paths of the ``dynamo_openrlhf`` package directories the installed distribution provides: the
    package in site-packages (a wheel install), or the source tree a ``.pth`` file points at (``pip install
    -e``). Empty when the distribution is not installed."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return []
    out = []
    for f in dist.files or ():
        if f.suffix == ".pth":
            try:
                lines = dist.locate_file(f).read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            out += [os.path.join(line.strip(), "dynamo_openrlhf") for line in lines
                    if line.strip() and not line.startswith(("#", "import"))]
        elif len(f.parts) == 2 and f.parts == ("dynamo_openrlhf", "__init__.py"):
            out.append(os.path.dirname(str(dist.locate_file(f))))
    seen = []
    for d in out:
        r = os.path.realpath(d)
        if os.path.isdir(r) and r not in seen:
            seen.append(r)
    return seen


def shadowed_package_message(package_dir: str, installed_dirs: Sequence[str]) -> Optional[str]:
    """The ImportError message when ``package_dir`` (the directory ``dynamo_openrlhf`` is being imported
    from, which has no ``_core``) is not one of ``installed_dirs`` (:func:`installed_package_dirs`), else
    None (then the original error stands: the extension is simply not built)."""
    here = os.path.realpath(package_dir)
    installed = [os.path.realpath(d) for d in installed_dirs]
    if not installed or here in installed:
        return None
    return (f"dynamo_openrlhf is being imported from {here}, which has no compiled extension "
            f"dynamo_openrlhf._core, instead of the installed package ({', '.join(installed)}). This is what "
            "`ray job submit --working-dir <checkout>` does: Ray uploads the checkout without its git-ignored "
            "files (the compiled _core*.so) and puts the upload first on sys.path, where it shadows the installed "
            "package. Submit without --working-dir (the installed package then runs), or keep a working dir but "
            "leave the package out of it (--runtime-env-json '{\"working_dir\": \".\", \"excludes\": "
            "[\"dynamo_openrlhf/\"]}'). When that directory is a source checkout run directly (not a Ray "
            "upload), `pip install -e .` in it builds the extension into it.")
