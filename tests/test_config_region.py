"""The CONFIG region of kernel.py belongs to the user: `build_kernel.py --set` fills it (checked by
the kernel's own config code), a plain rebuild keeps it, --check ignores it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_kernel  # noqa: E402


@pytest.fixture(scope="module")
def default_text() -> str:
    return build_kernel.build()


@pytest.fixture
def kernel(tmp_path: Path, default_text: str) -> Path:
    path = tmp_path / "kernel.py"
    path.write_text(default_text, encoding="utf-8")
    return path


def rebuild(kernel: Path, *flags: str) -> int:
    return build_kernel.main(["--out", str(kernel), *flags])


def values(kernel: Path) -> dict:
    region, line = build_kernel.extract_region(kernel.read_text(encoding="utf-8"))
    return build_kernel.read_region_values(region, line)


def test_the_default_build_lists_every_option_and_sets_none(default_text):
    region, _ = build_kernel.extract_region(default_text)
    assert region == build_kernel.region_text() and build_kernel.read_region_values(region) == {}
    from kernelkit.core.config import Config
    for name in Config.__dataclass_fields__:
        assert f"    # {name}=" in region, name


def test_set_writes_typed_values_that_the_kernel_reads(kernel, default_text):
    assert rebuild(kernel, "--set", "budget=2h", "--set", "img_size=288", "--set", "amp=false",
                   "--set", "lr=3e-4", "--preset", "imet2019") == 0
    assert values(kernel) == {"preset": "imet2019", "budget": "2h", "img_size": 288, "amp": False, "lr": 3e-4}
    text = kernel.read_text(encoding="utf-8")
    # the listing below shows what each other option is under the preset
    assert "    # loss='focal'," in text and "    # img_size=" not in text
    assert build_kernel.without_region(text) == build_kernel.without_region(default_text)
    namespace: dict = {}
    region, _ = build_kernel.extract_region(text)
    exec(region, namespace)
    from kernelkit.core.options import make_config
    cfg, _ = make_config(namespace["CONFIG"], [])
    assert (cfg.img_size, cfg.amp, cfg.budget, cfg.loss, cfg.min_labels) == (288, False, "2h", "focal", 1)


def test_settings_accumulate_and_reset_returns_to_the_default_build(kernel, default_text):
    assert rebuild(kernel, "--set", "model=convnext_tiny") == 0
    assert rebuild(kernel, "--set", "epochs=3") == 0
    assert values(kernel) == {"model": "convnext_tiny", "epochs": 3}
    assert rebuild(kernel, "--reset-config", "--set", "tta=1") == 0
    assert values(kernel) == {"tta": 1}
    assert rebuild(kernel, "--reset-config") == 0
    assert kernel.read_text(encoding="utf-8") == default_text


@pytest.mark.parametrize("flags, message", [
    (["--set", "imgsize=288"], "unknown --set key 'imgsize' (did you mean 'img_size'?)"),
    (["--set", "img_size=2.5"], "img_size='2.5': expected an integer"),
    (["--set", "amp=maybe"], "amp='maybe': expected True or False"),
    (["--set", "aug=strnog"], "aug='strnog' is not one of 'auto' | 'none' | 'flip' | 'light' | 'medium' | 'strong'"),
    (["--set", "tta=0"], "tta=0: must be 1"),
    (["--set", "budget=soon"], "budget='soon'"),
    (["--set", "img_size"], "expected key=value"),
    (["--preset", "imet"], "preset='imet' is not one of demo | helsinki14 | imet2019"),
])
def test_a_bad_setting_is_refused_with_exit_2_and_the_kernel_is_left_alone(kernel, capsys, flags, message):
    before = kernel.read_bytes()
    assert rebuild(kernel, *flags) == 2
    assert message in capsys.readouterr().err
    assert kernel.read_bytes() == before


def test_a_plain_rebuild_keeps_a_hand_edited_region_as_it_is(kernel, capsys):
    text = kernel.read_text(encoding="utf-8")
    mine = ("CONFIG = dict(\n    model='convnext_tiny',  # my pick\n    img_size=256 + 32,\n"
            "    aug='strnog',\n)\n")
    start, end = build_kernel.find_region(text)
    kernel.write_text(text[:start] + mine + text[end:], encoding="utf-8")
    assert rebuild(kernel) == 0
    assert build_kernel.extract_region(kernel.read_text(encoding="utf-8"))[0] == mine
    assert "kept as it is, unchecked" in capsys.readouterr().err  # an expression cannot be checked
    # --set cannot rewrite an expression, and says so instead of dropping it
    assert rebuild(kernel, "--set", "tta=1") == 2
    assert "img_size= is an expression" in capsys.readouterr().err
    # with plain values, the checks run and point at what the kernel would refuse
    kernel.write_text(kernel.read_text(encoding="utf-8").replace("256 + 32", "288"), encoding="utf-8")
    assert rebuild(kernel) == 0
    assert "aug='strnog' is not one of" in capsys.readouterr().err
    assert "# my pick" in kernel.read_text(encoding="utf-8")


def test_an_outdated_listing_is_refreshed_and_settings_kept(kernel):
    """A region in the generated form is rewritten, so a new option's line reaches it."""
    assert rebuild(kernel, "--set", "epochs=3") == 0
    text = kernel.read_text(encoding="utf-8")
    kernel.write_text(text.replace("    # demo_images=1000,", "    # gone_option=1,"), encoding="utf-8")
    hand = kernel.read_text(encoding="utf-8")
    assert rebuild(kernel) == 0
    assert kernel.read_text(encoding="utf-8") == hand, "an unknown listed line is not the generated form: kept"
    kernel.write_text(text.replace("    # demo_images=1000,                     # demo: number of generated "
                                   "training images\n", ""), encoding="utf-8")
    assert rebuild(kernel) == 0
    assert kernel.read_text(encoding="utf-8") == text and values(kernel) == {"epochs": 3}


def test_a_kernel_from_before_the_markers_keeps_its_block(kernel, default_text):
    old = default_text.split(build_kernel.REGION_START + "\n")[0].rsplit("# Your settings", 1)[0]
    old += ("# Uncomment and edit. Precedence: defaults < preset < this block < command-line flags.\n"
            "CONFIG = dict(\n    img_size=288,\n)\n# " + "-" * 84 + "\n")
    kernel.write_text(old + default_text.split(build_kernel.REGION_END + "\n", 1)[1], encoding="utf-8")
    assert rebuild(kernel) == 0
    assert values(kernel) == {"img_size": 288}


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace(build_kernel.REGION_START + "\n", "", 1), "cannot tell where the CONFIG region is"),
    (lambda t: t.replace(build_kernel.REGION_END, build_kernel.REGION_START, 1), "found 2 start and 0 end"),
    (lambda t: t.replace("CONFIG = dict(\n", "CONFIG = dict(\n    lr=1e-3 oops,\n", 1), "(CONFIG region)"),
    (lambda t: t.replace("CONFIG = dict(", "SETTINGS = dict(", 1), "must assign CONFIG"),
])
def test_a_region_that_cannot_be_read_is_reported_not_dropped(kernel, capsys, damage, message):
    kernel.write_text(damage(kernel.read_text(encoding="utf-8")), encoding="utf-8")
    before = kernel.read_bytes()
    assert rebuild(kernel) == 2
    err = capsys.readouterr().err
    assert message in err and "--reset-config" in err
    if "lr=1e-3 oops" in before.decode():  # the line named is the kernel file's
        assert f"line {before.decode().splitlines().index('    lr=1e-3 oops,') + 1} " in err
    assert kernel.read_bytes() == before


def test_markers_survive_harmless_edits(kernel):
    text = kernel.read_text(encoding="utf-8")
    text = text.replace(build_kernel.REGION_START, "  # >>> CONFIG START (yours)  ", 1)
    kernel.write_text(text.replace(build_kernel.REGION_END, "#<<< CONFIG END", 1), encoding="utf-8")
    assert rebuild(kernel, "--set", "tta=1") == 0
    assert values(kernel) == {"tta": 1}


def test_settings_reach_the_kernel_and_files_are_left_to_where_it_runs(kernel, tmp_path):
    """Paths are not checked at build time (they exist on Kaggle); kernel.py checks them at start."""
    missing = str(tmp_path / "not-here")
    assert rebuild(kernel, "--set", f"data_dir={missing}", "--set", "img_size=96") == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(kernel), "--out-dir", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"data_dir={missing!r} does not exist" in proc.stderr, proc.stderr
