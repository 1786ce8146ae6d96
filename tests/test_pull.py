"""`sambay pull`, the model cache and `-m` by name or repository id, against a loopback
stand-in for the Hugging Face Hub (HF_ENDPOINT), so huggingface_hub's real download path runs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_stand_in import StandInHub

from sambay import cache, hub as sambay_hub
from sambay.cli import main
from sambay.convert import convert, tiny
from sambay.errors import MissingDependencyError, PullError
from sambay.gguf_metadata import read_metadata

REPO = sambay_hub.DEFAULT_REPO


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("pull") / "ck", "tiny-8", seed=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("pull") / "ck2", "tiny-8", seed=3,
                                 sharded=True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = StandInHub(lifetime=300).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("SAMBAY_HOME", str(tmp_path / "sambay"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # never send a real token, even to loopback
    yield server
    server.stop()


def _hf_blobs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and "blobs" in p.parts]


def _staging_empty(tmp_path: Path) -> bool:
    staging = tmp_path / "sambay" / "staging"
    return not staging.exists() or not any(staging.iterdir())


def test_pull_converts_quantizes_and_cleans_up(hub, checkpoint, tmp_path):
    sha = hub.add_folder(REPO, checkpoint)
    hub.add_repo(REPO, {"README.md": b"x"}, branch="other")
    entry = sambay_hub.pull(progress=False)
    assert (entry.name, entry.tag, entry.type) == ("phi4-flash", "q4_k_m", "Q4_K_M")
    assert (entry.repo, entry.revision) == (REPO, sha)
    assert entry.path == tmp_path / "sambay" / "models" / "phi4-flash" / "q4_k_m" / "model.gguf"
    assert entry.size == entry.path.stat().st_size
    assert read_metadata(entry.path)["general.file_type"] == 15  # MOSTLY_Q4_K_M
    # only the files conversion needs, each fetched once
    got = sorted(p.rsplit("/", 1)[-1] for p, _ in hub.gets())
    assert got == sorted(p.name for p in checkpoint.iterdir())
    assert _hf_blobs(tmp_path) == []  # downloads deleted (no --keep-hf)
    assert _staging_empty(tmp_path)
    assert [e.ref for e in cache.list_entries()] == ["phi4-flash:q4_k_m"]
    # by name, by repo id (no network: the stand-in sees no new request)
    n = len(hub.requests)
    assert cache.resolve_model("phi4-flash:q4_k_m") == str(entry.path)
    assert cache.resolve_model("phi4-flash") == str(entry.path)
    assert cache.resolve_model(REPO) == str(entry.path)
    assert len(hub.requests) == n


def test_keep_hf_and_plain_types(hub, checkpoint, tmp_path):
    hub.add_folder("someone/My-Flash", checkpoint)
    entry = sambay_hub.pull("someone/My-Flash", quant="f32", keep_hf=True, progress=False)
    assert (entry.name, entry.tag) == ("my-flash", "f32")
    want = convert(checkpoint, tmp_path / "want.gguf", outtype="f32", progress=False)
    assert read_metadata(entry.path)["general.file_type"] == read_metadata(want)["general.file_type"]
    assert len(_hf_blobs(tmp_path)) == len(list(checkpoint.iterdir()))
    with pytest.raises(ValueError, match="quant must be one of"):
        sambay_hub.pull("someone/My-Flash", quant="Q9", progress=False)


def test_dropped_connection_resumes_with_a_range_request(hub, checkpoint, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes (and so can resume from) whole chunks of 10 MiB; the tiny file
    # is 1.5 MiB
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.add_folder(REPO, checkpoint)
    hub.faults["model.safetensors"] = "drop_once"
    entry = sambay_hub.pull(quant="Q8_0", progress=False)
    size = (checkpoint / "model.safetensors").stat().st_size
    ranges = [r for _, r in hub.gets("/model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1][len("bytes="):-1])
    assert 0 < resumed_at <= size // 2
    assert entry.path.is_file()


def test_failed_pull_leaves_no_entry_and_the_rerun_resumes(hub, sharded, tmp_path):
    hub.add_folder(REPO, sharded)
    second = "model-00002-of-00002.safetensors"
    hub.faults[second] = "error"
    with pytest.raises(PullError, match="500"):
        sambay_hub.pull(quant="Q8_0", progress=False)
    assert cache.list_entries() == [] and _staging_empty(tmp_path)
    first_run = [p for p, _ in hub.gets()]
    assert any(p.endswith("model-00001-of-00002.safetensors") for p in first_run)

    del hub.faults[second]
    hub.requests.clear()
    entry = sambay_hub.pull(quant="Q8_0", progress=False)
    assert [p.rsplit("/", 1)[-1] for p, _ in hub.gets()] == [second]  # the rest was kept
    assert entry.ref == "phi4-flash:q8_0"


def test_interrupted_pull_leaves_no_entry(hub, checkpoint, tmp_path, monkeypatch):
    import sambay.convert

    hub.add_folder(REPO, checkpoint)
    dead = tmp_path / "sambay" / "staging" / "999999999-0dead000"  # a killed pull's leftovers
    dead.mkdir(parents=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sambay.convert, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sambay_hub.pull(progress=False)
    assert cache.list_entries() == [] and _staging_empty(tmp_path)


def test_token_and_missing_extra(hub, checkpoint, monkeypatch):
    hub.add_folder(REPO, checkpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    sambay_hub.pull(quant="Q8_0", progress=False)
    assert hub.authorization and set(hub.authorization) == {"Bearer hf_stand_in"}

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "sambay\[hub\]"'):
        sambay_hub.pull(progress=False)


def test_clear_errors(hub, checkpoint, tmp_path):
    hub.add_folder(REPO, checkpoint)
    hub.add_repo("someone/no-weights", {"config.json": b"{}", "README.md": b"hi"})
    with pytest.raises(PullError, match="no revision 'v9'"):
        sambay_hub.pull(revision="v9", progress=False)
    with pytest.raises(PullError, match="no such repository"):
        sambay_hub.pull("someone/absent", progress=False)
    with pytest.raises(PullError, match=r"no \*\.safetensors checkpoint$"):
        sambay_hub.pull("someone/no-weights", progress=False)
    assert cache.list_entries() == [] and _staging_empty(tmp_path)


def test_no_disk_space_before_and_during(hub, checkpoint, tmp_path, monkeypatch):
    hub.add_folder(REPO, checkpoint)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=sambay_hub.DISK_MARGIN))
    with pytest.raises(PullError, match="not enough disk space"):
        sambay_hub.pull(progress=False)
    assert hub.gets() == []  # checked before any download
    monkeypatch.setattr(shutil, "disk_usage", real)

    import sambay.quantization

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sambay.quantization, "quantize", full)
    with pytest.raises(PullError, match="No space left on device"):
        sambay_hub.pull(progress=False)
    assert cache.list_entries() == [] and _staging_empty(tmp_path)


def test_gguf_repo_with_file(hub, checkpoint, tmp_path):
    import sambay

    f32 = convert(checkpoint, tmp_path / "m-f32.gguf", outtype="f32", progress=False)
    sambay.quantize(f32, tmp_path / "m-Q8_0.gguf", "Q8_0", progress=False)
    hub.add_repo("someone/flash-GGUF", {"README.md": b"x", "m-F32.gguf": f32.read_bytes(),
                                        "m-Q8_0.gguf": (tmp_path / "m-Q8_0.gguf").read_bytes()})
    with pytest.raises(PullError, match="pick one with --file"):
        sambay_hub.pull("someone/flash-GGUF", progress=False)  # no Q4_K_M file
    with pytest.raises(PullError, match="matches 2 files"):
        sambay_hub.pull("someone/flash-GGUF", file="*.gguf", progress=False)
    entry = sambay_hub.pull("someone/flash-GGUF", file="*Q8_0.gguf", progress=False)
    assert (entry.ref, entry.type, entry.hf_file) == ("flash-gguf:q8_0", "Q8_0", "m-Q8_0.gguf")
    assert entry.path.read_bytes() == (tmp_path / "m-Q8_0.gguf").read_bytes()
    # REPO:QUANT picks the file named after the type, as llama.cpp's -hf does
    assert cache.resolve_model("someone/flash-GGUF:Q8_0") == str(entry.path)
    other = sambay_hub.ensure("someone/flash-GGUF", quant="F32", progress=False)
    assert other.ref == "flash-gguf:f32"
    with pytest.raises(ValueError, match="several variants.*flash-gguf:f32, flash-gguf:q8_0"):
        cache.resolve_model("flash-gguf")


def test_cli_list_rm_and_run_hf(hub, checkpoint, tmp_path, capsys, monkeypatch):
    hub.add_folder("someone/flash", checkpoint)
    assert main(["run", "-hf", "someone/flash:Q8_0", "-p", "1 + 2 =", "-n", "3", "--temp", "0",
                 "-c", "64", "-t", "1", "-q"]) == 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "flash:q8_0" in out and "someone/flash" in out and "Q8_0" in out
    assert main(["info", "-m", "flash:q8_0"]) == 0
    import sambay.server

    served = []
    monkeypatch.setattr(sambay.server, "serve", lambda settings: served.append(settings) or 0)
    assert main(["serve", "-m", "flash:q8_0"]) == 0
    assert served[0].model == str(cache.find_entry("flash:q8_0").path)
    assert served[0].alias == "flash:q8_0"  # not the cache's file name
    assert main(["rm", "flash:q8_0"]) == 0
    assert cache.list_entries() == []
    assert main(["rm", "flash:q8_0"]) == 1
    assert "no cached model" in capsys.readouterr().err
    n = len(hub.requests)
    for missing in ("nothing-here", "flash:q8_0"):
        assert main(["run", "-m", missing, "-p", "x"]) == 1
        assert "no such file, cached model" in capsys.readouterr().err
    assert main(["run", "-m", "models/mistyped.gguf", "-p", "x"]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert len(hub.requests) == n  # none of these asked the hub


def test_from_pretrained(hub, checkpoint):
    from sambay import Llama

    hub.add_folder("someone/flash", checkpoint)
    with Llama.from_pretrained("someone/flash", quant="Q8_0", n_ctx=64, verbose=False) as llm:
        assert llm.metadata["general.file_type"] == 7
    assert [e.ref for e in cache.list_entries()] == ["flash:q8_0"]


def test_the_readme_commands_end_to_end(hub, checkpoint, tmp_path):
    """The README's "Get the model" commands as typed, in fresh processes."""
    hub.add_folder(REPO, checkpoint)

    def sambay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sambay", *args], capture_output=True,
                              text=True, timeout=300, env=dict(os.environ))

    out = sambay("pull")
    assert out.returncode == 0, out.stderr
    assert "phi4-flash:q4_k_m" in out.stdout
    out = sambay("run", "-m", "phi4-flash:q4_k_m", "-p", "What is 17 * 23?", "-n", "4")
    assert out.returncode == 0, out.stderr
    out = sambay("list")
    assert out.returncode == 0 and "phi4-flash:q4_k_m" in out.stdout and REPO in out.stdout
    assert sambay("rm", "phi4-flash:q4_k_m").returncode == 0
    assert "no models" in sambay("list").stderr
