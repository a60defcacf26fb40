"""`kubectl deeptune` as krew installs plugins: for each platform an archive holding the plugin as one
executable file (a PEX zipapp of the package's `cli` extra, for Python 3.11 and 3.12) and the LICENSE,
and the krew manifest that names the archives by URL and sha256.

    python scripts/krew_plugin.py --version 0.1.0 --out dist/krew              # every platform (release)
    python scripts/krew_plugin.py --version 0.1.0 --out DIR --host-only        # this machine's (tests)

The release workflow uploads the archives and `deeptune.yaml` to the GitHub release; users then run
`kubectl krew install --manifest-url=<the release's deeptune.yaml>`. The plugin needs `python3` (3.11
or 3.12) on the user's PATH: PEX carries the packages, not an interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXECUTABLE = "kubectl-deeptune"
PYTHONS = ("311", "312")
PLATFORMS: dict[tuple[str, str], str] = {
    ("linux", "amd64"): "manylinux2014_x86_64",
    ("linux", "arm64"): "manylinux2014_aarch64",
    ("darwin", "amd64"): "macosx_10_12_x86_64",
    ("darwin", "arm64"): "macosx_11_0_arm64",
}
"""krew's os/arch → the wheel platform tag PEX resolves the compiled dependencies (pydantic-core,
jiter) for."""
RELEASES = "https://github.com/deeptune/deeptune/releases/download"


def host() -> tuple[str, str]:
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    return {"linux": "linux", "darwin": "darwin"}[sys.platform], machine


def build_pex(target: tuple[str, str] | None, out: Path) -> Path:
    """The plugin as one file: PEX of `deeptune[cli]`, run by `python3` from the PATH. `target` None
    builds for this interpreter only (no foreign wheels to fetch)."""
    path = out / f"{EXECUTABLE}.pex"
    platforms = [f"--platform={PLATFORMS[target]}-cp-{v}-cp{v}" for v in PYTHONS] if target else []
    command = [
        sys.executable, "-m", "pex", f"{ROOT}[cli]", "--console-script", EXECUTABLE,
        "--python-shebang", "/usr/bin/env python3", "--output-file", str(path), *platforms,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return path


def archive(pex: Path, os_name: str, arch: str, out: Path) -> Path:
    """A tar.gz of the executable and the LICENSE (krew requires a license in every archive)."""
    path = out / f"{EXECUTABLE}-{os_name}-{arch}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(pex, arcname=EXECUTABLE)
        tar.add(ROOT / "LICENSE", arcname="LICENSE")
    return path


def manifest(version: str, archives: dict[tuple[str, str], Path], base_url: str) -> dict[str, object]:
    """krew's Plugin manifest for these archives (krew.googlecontainertools.github.com/v1alpha2)."""
    platforms = [
        {
            "selector": {"matchLabels": {"os": os_name, "arch": arch}},
            "uri": f"{base_url}/v{version}/{path.name}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bin": EXECUTABLE,
            "files": [{"from": EXECUTABLE, "to": "."}, {"from": "LICENSE", "to": "."}],
        }
        for (os_name, arch), path in archives.items()
    ]
    return {
        "apiVersion": "krew.googlecontainertools.github.com/v1alpha2",
        "kind": "Plugin",
        "metadata": {"name": "deeptune"},
        "spec": {
            "version": f"v{version}",
            "homepage": "https://github.com/deeptune/deeptune",
            "shortDescription": "Follow DeepTune fine-tuning runs and chat with their deployments",
            "description": (
                "Status with a progress bar, results against the base model, two runs side by side,\n"
                "the trainer's logs across retries, why a run failed, and a chat with a\n"
                "ModelDeployment's OpenAI endpoint, for DeepTune's FineTuneJob and ModelDeployment.\n"
            ),
            "caveats": "Runs with python3 from your PATH: Python 3.11 or 3.12.\n",
            "platforms": platforms,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="the release's version, without the v")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--host-only", action="store_true", help="this machine's platform only")
    parser.add_argument("--base-url", default=RELEASES, help="where the release's archives are served")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [host()] if args.host_only else list(PLATFORMS)
    archives = {}
    for target in targets:
        work = args.out / "-".join(target)
        work.mkdir(exist_ok=True)
        pex = build_pex(None if args.host_only else target, work)
        archives[target] = archive(pex, *target, args.out)
        shutil.rmtree(work)
    document = manifest(args.version, archives, args.base_url)
    (args.out / "deeptune.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    print(f"wrote {len(archives)} archives and deeptune.yaml to {args.out}")


if __name__ == "__main__":
    main()
