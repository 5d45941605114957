"""Upload bundle: `build_kernel.py --push-dir` writes a folder that the official kaggle client accepts.

The kaggle package's own `KaggleApi.kernels_push` runs on the folder, offline: it reads and
validates kernel-metadata.json, builds the SaveKernel request and prepares the HTTP request; the
test stops it at `requests.Session.send`, and sockets are blocked in case anything goes around that.
"""
import json
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_kernel  # noqa: E402

KERNEL_ID = "alice/imet-convnext"
COMPETITION = "imet-2019-fgvc6"
DATASETS = ["alice/timm-convnext-tiny", "bob_lab/imet-extra-labels"]
MODELS = ["timm/convnext-tiny/pyTorch/fb-in22k/1", "google/gemma-2/keras/gemma2_2b_en.v2/3"]
KERNELS = ["alice/imet-convnext-fold0", "bob_lab/imet-pseudo-labels"]


def push_args(folder: Path, *extra: str) -> list[str]:
    """A good command line; extra flags come last, so a repeated --id, --competition or --title wins
    and a --dataset is added."""
    datasets = [a for d in DATASETS for a in ("--dataset", d)]
    return ["--push-dir", str(folder), "--competition", COMPETITION, *datasets, "--id", KERNEL_ID, *extra]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    assert build_kernel.main(push_args(folder)) == 0
    return folder


class ReachedSend(Exception):
    """Raised where kaggle would put the request on the wire: everything before ran offline."""

    def __init__(self, request):
        super().__init__(request.url)
        self.request = request


@pytest.fixture
def kaggle_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An authenticated KaggleApi with dummy credentials and no way out to the network."""
    home, config = tmp_path / "home", tmp_path / "kaggle-config"
    home.mkdir()
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "0" * 32}))
    (config / "kaggle.json").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))  # no real ~/.kaggle/access_token is picked up
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    # An access token would be checked against the server; a notebook env reads a token file.
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_API_ENVIRONMENT"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the test reached the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    import requests
    from kaggle.api.kaggle_api_extended import KaggleApi  # `import kaggle` authenticates: env is set

    def send(session, request, **kwargs):
        raise ReachedSend(request)

    monkeypatch.setattr(requests.Session, "send", send)
    api = KaggleApi()
    api.authenticate()  # legacy username/key from the environment: no request
    return api


def kaggle_push_body(api, folder: Path) -> dict:
    """Runs kaggle's `kernels push -p folder` up to the send; returns the JSON body it would POST."""
    with pytest.raises(ReachedSend) as reached:
        api.kernels_push(str(folder))
    request = reached.value.request
    assert request.method == "POST"
    assert request.url.endswith("/kernels.KernelsApiService/SaveKernel")
    return json.loads(request.body)


def edit_metadata(folder: Path, **changes) -> None:
    path = folder / build_kernel.METADATA_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_push_dir_holds_the_built_kernel_and_its_metadata(bundle: Path):
    assert (bundle / "kernel.py").read_text(encoding="utf-8") == build_kernel.build()
    assert json.loads((bundle / "kernel-metadata.json").read_text()) == {
        "id": KERNEL_ID,
        "title": "Imet convnext",
        "code_file": "kernel.py",
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": True,
        "machine_shape": "NvidiaTeslaT4",  # Kaggle's "GPU T4 x2", which the DDP path uses
        "enable_internet": False,
        "competition_sources": [COMPETITION],
        "dataset_sources": DATASETS,
        "model_sources": [],
        "kernel_sources": [],
    }


def test_kaggle_client_accepts_the_bundle_offline(bundle: Path, kaggle_api, capsys: pytest.CaptureFixture):
    capsys.readouterr()
    body = kaggle_push_body(kaggle_api, bundle)
    # Fields left at their default (False, empty) are not sent, and the server reads them as such.
    assert body["slug"] == KERNEL_ID
    assert body["newTitle"] == "Imet convnext"
    assert body["text"] == (bundle / "kernel.py").read_text(encoding="utf-8")
    assert body["language"] == "python"
    assert body["kernelType"] == "script"
    assert body["isPrivate"] is True
    assert body["enableGpu"] is True and body["machineShape"] == "NvidiaTeslaT4"
    assert body.get("enableInternet", False) is False  # kaggle's own default would be True
    assert body["competitionDataSources"] == [COMPETITION]
    assert body["datasetDataSources"] == DATASETS
    assert body.get("kernelDataSources", []) == []
    # kaggle warns when the title would not resolve to the id; the default title must resolve.
    assert "does not resolve" not in capsys.readouterr().out


@pytest.mark.parametrize("flags, gpu, shape", [
    (("--no-gpu",), False, None),
    (("--accelerator", "none"), False, None),
    (("--accelerator", "p100"), True, "NvidiaTeslaP100"),
    (("--accelerator", "t4x2", "--gpu"), True, "NvidiaTeslaT4"),
])
def test_the_machine_choice_reaches_the_request(tmp_path: Path, kaggle_api, flags, gpu, shape):
    folder = tmp_path / "machine"
    assert build_kernel.main(push_args(folder, *flags)) == 0
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["enable_gpu"] is gpu and meta.get("machine_shape") == shape
    body = kaggle_push_body(kaggle_api, folder)
    assert body.get("enableGpu", False) is gpu and body.get("machineShape") == shape


def test_model_and_kernel_sources_pass_kaggle_validation_and_reach_the_request(tmp_path: Path, kaggle_api):
    folder = tmp_path / "sources"
    extra = [a for m in MODELS for a in ("--model-source", m)] + [a for k in KERNELS for a in ("--kernel-source", k)]
    assert build_kernel.main(push_args(folder, *extra, "--accelerator", "p100")) == 0
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["model_sources"] == MODELS and meta["kernel_sources"] == KERNELS
    body = kaggle_push_body(kaggle_api, folder)
    assert body["modelDataSources"] == MODELS and body["kernelDataSources"] == KERNELS
    assert body["datasetDataSources"] == DATASETS and body["machineShape"] == "NvidiaTeslaP100"


def test_push_dir_takes_the_config_region_and_set_without_touching_kernel_py(tmp_path: Path):
    before = (ROOT / "kernel.py").read_bytes()
    folder = tmp_path / "configured"
    assert build_kernel.main(push_args(folder, "--preset", "imet2019", "--set", "budget=8h",
                                       "--set", "pretrained_path=/kaggle/input/w/model.safetensors")) == 0
    text = (folder / "kernel.py").read_text(encoding="utf-8")
    region, line = build_kernel.extract_region(text)
    assert build_kernel.read_region_values(region, line) == {
        "preset": "imet2019", "budget": "8h", "pretrained_path": "/kaggle/input/w/model.safetensors"}
    assert build_kernel.without_region(text) == build_kernel.without_region(build_kernel.build())
    assert (ROOT / "kernel.py").read_bytes() == before


def test_a_refused_setting_writes_no_bundle(tmp_path: Path, capsys: pytest.CaptureFixture):
    folder = tmp_path / "refused"
    assert build_kernel.main(push_args(folder, "--set", "loss=focall")) == 2
    assert "loss='focall' is not one of" in capsys.readouterr().err
    assert not folder.exists()


# Each input is refused by our checks (before anything is written) and, put into an otherwise
# good kernel-metadata.json, by kaggle's validation (before any request is built).
REFUSED_BY_BOTH = [
    pytest.param(("--id", "alice/abc"), {"id": "alice/abc"}, "kernel slug needs", id="kernel-slug-too-short"),
    pytest.param(("--id", "alice/imet-convnext/3"), {"id": "alice/imet-convnext/3"}, "--id", id="id-with-version"),
    pytest.param(("--id", "/imet-convnext"), {"id": "/imet-convnext"}, "--id", id="id-without-owner"),
    pytest.param(("--id", "alice/"), {"id": "alice/"}, "--id", id="id-without-slug"),
    pytest.param(("--title", "abc"), {"title": "abc"}, "--title", id="title-too-short"),
    pytest.param(("--dataset", "alice/"), {"dataset_sources": ["alice/"]}, "--dataset", id="dataset-without-slug"),
    pytest.param(("--dataset", "a/b/c/d"), {"dataset_sources": ["a/b/c/d"]}, "--dataset", id="dataset-too-deep"),
    pytest.param(("--model-source", "timm/convnext-tiny/pyTorch/fb-in22k"),
                 {"model_sources": ["timm/convnext-tiny/pyTorch/fb-in22k"]}, "--model-source", id="model-no-version"),
    pytest.param(("--model-source", "timm/convnext-tiny/pyTorch/fb-in22k/v1"),
                 {"model_sources": ["timm/convnext-tiny/pyTorch/fb-in22k/v1"]}, "--model-source",
                 id="model-version-not-a-number"),
    pytest.param(("--model-source", "timm/convnext-tiny"), {"model_sources": ["timm/convnext-tiny"]},
                 "--model-source", id="model-without-instance"),
    pytest.param(("--kernel-source", "alice/abc"), {"kernel_sources": ["alice/abc"]}, "--kernel-source",
                 id="kernel-source-slug-too-short"),
    pytest.param(("--kernel-source", "a/imet-run/3/4"), {"kernel_sources": ["a/imet-run/3/4"]}, "--kernel-source",
                 id="kernel-source-too-deep"),
    pytest.param(("--kernel-source", "imet-convnext"), {"kernel_sources": ["imet-convnext"]}, "--kernel-source",
                 id="kernel-source-without-owner"),
]


@pytest.mark.parametrize("flag, edit, message", REFUSED_BY_BOTH)
def test_bad_input_is_refused_by_us_and_by_kaggle(tmp_path, bundle, kaggle_api, capsys, flag, edit, message):
    folder = tmp_path / "refused"
    assert build_kernel.main(push_args(folder, *flag)) == 2
    assert message in capsys.readouterr().err
    assert not folder.exists()

    edit_metadata(bundle, **edit)
    with pytest.raises(ValueError):
        kaggle_api.kernels_push(str(bundle))


def test_missing_code_file_is_refused_by_us_and_by_kaggle(bundle: Path, kaggle_api):
    build_kernel.check_push_dir(bundle)  # the intact bundle passes
    (bundle / "kernel.py").unlink()
    with pytest.raises(ValueError, match="code_file 'kernel.py' is not a file"):
        build_kernel.check_push_dir(bundle)
    with pytest.raises(ValueError, match="Source file not found"):
        kaggle_api.kernels_push(str(bundle))


# Accepted by the kaggle client but refused here: an id without owner would go to whoever is
# logged in, and Kaggle's slugs are lowercase with dashes, so anything else names another kernel.
@pytest.mark.parametrize("args, message", [
    (("--id", "imet-convnext"), "--id 'imet-convnext': expected owner/slug"),
    (("--id", "Alice/imet-convnext"), "--id 'Alice/imet-convnext'"),
    (("--id", "alice/imet_convnext"), "--id 'alice/imet_convnext'"),
    (("--competition", "iMet 2019"), "--competition 'iMet 2019'"),
    (("--dataset", "timm-weights"), "--dataset 'timm-weights'"),
    (("--dataset", DATASETS[0]), "given twice"),
    (("--model-source", "Timm/convnext-tiny/pyTorch/fb-in22k/1"), "--model-source 'Timm/"),
    (("--model-source", "timm/convnext tiny/pyTorch/fb-in22k/1"), "--model-source"),
    (("--model-source", MODELS[0], "--model-source", MODELS[0]), "given twice"),
    (("--kernel-source", "alice/imet_run"), "--kernel-source 'alice/imet_run'"),
])
def test_our_stricter_checks_name_the_bad_flag(tmp_path, capsys, args, message):
    folder = tmp_path / "refused"
    assert build_kernel.main(push_args(folder, *args)) == 2
    assert message in capsys.readouterr().err
    assert not folder.exists()


@pytest.mark.parametrize("argv", [
    ["--competition", COMPETITION],
    ["--no-gpu"],
    ["--push-dir", "x", "--id", KERNEL_ID],
    ["--push-dir", "x", "--competition", COMPETITION, "--id", KERNEL_ID, "--check"],
    ["--model-source", MODELS[0]],
    ["--kernel-source", KERNELS[0]],
    ["--accelerator", "p100"],
    ["--push-dir", "x", "--competition", COMPETITION, "--id", KERNEL_ID, "--no-gpu", "--accelerator", "t4x2"],
    ["--push-dir", "x", "--competition", COMPETITION, "--id", KERNEL_ID, "--accelerator", "tpu"],
    ["--check", "--set", "img_size=288"],
])
def test_push_flags_combine_only_as_documented(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_kernel.main(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err
