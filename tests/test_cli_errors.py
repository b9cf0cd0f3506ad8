"""Bad flags of ``python -m deqkern.bench`` and ``python -m deqkern.invert``: each ends in exit
code 2 and exactly one ``error:`` line that names the flag (argparse's style), never a traceback,
a silently clamped value or a "skipped" row."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqkern import invert as invert_cli
from deqkern._validate import Bounded, OptionError, device, output_dir, output_file
from deqkern.bench import __main__ as bench_cli

DIGITS_UNET = Path(__file__).resolve().parent.parent / "deqkern" / "assets" / "digits" / "unet"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error for a machine without CUDA")


def _flag_error(main, argv: list[str], flag: str, capsys) -> str:
    """Run ``main(argv)``; assert exit 2 and one ``error:`` line naming ``flag``; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert f"argument {flag}:" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    """A missing path, a plain file, an empty folder, a non-image and a broken checkpoint (a valid
    UNet2DModel layout whose weights file is truncated: only loading finds it)."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not an image\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text((DIGITS_UNET / "config.json").read_text())
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (broken / "scheduler").mkdir()
    sched = DIGITS_UNET.parent / "scheduler" / "scheduler_config.json"
    (broken / "scheduler" / "scheduler_config.json").write_text(sched.read_text())
    return {"missing": tmp_path / "missing", "file": a_file, "empty": empty, "broken": broken}


# ---------------------------------------------------------------------------------------------- bench
BENCH_CASES = [
    (["--threads", "0"], "--threads"),
    (["--max-batch", "0"], "--max-batch"),
    (["--eta", "-1"], "--eta"),
    (["--max-iters", "0"], "--max-iters"),
    (["--window", "0"], "--window"),
    (["--steps", "25", "1"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--repeats", "0"], "--repeats"),
    (["--history", "9"], "--history"),
    (["--ridge", "-1"], "--ridge"),
    (["--tol", "0"], "--tol"),
    (["--tol", "nan"], "--tol"),
    (["--paradigms-tol", "-0.1"], "--paradigms-tol"),
    (["--target-err", "inf"], "--target-err"),
    (["--seed", "-1"], "--seed"),
    (["--device", "cuda:64"], "--device"),
    (["--device", "warp-drive"], "--device"),
    (["--scheduler", "ddpm", "--eta", "0.5"], "--eta"),
    (["--no-warmup", "--repeats", "3"], "--repeats"),
]


@pytest.mark.parametrize("argv, flag", BENCH_CASES, ids=[" ".join(a) for a, _ in BENCH_CASES])
def test_bench_bad_flag(argv, flag, capsys):
    _flag_error(bench_cli.main, argv, flag, capsys)


@pytest.mark.parametrize("which", ["missing", "file", "empty", "broken"])
def test_bench_bad_model(which, paths, capsys):
    """Missing, a file, an empty folder: refused while parsing; a truncated weights file: when loading."""
    line = _flag_error(bench_cli.main, ["--model", str(paths[which]), "--no-progress"], "--model", capsys)
    assert str(paths[which]) in line


@NO_CUDA
def test_bench_cuda_without_cuda(capsys):
    assert "cuda" in _flag_error(bench_cli.main, ["--device", "cuda"], "--device", capsys)


def test_bench_bad_output_paths(paths, capsys):
    _flag_error(bench_cli.main, ["--out", str(paths["file"])], "--out", capsys)
    _flag_error(bench_cli.main, ["--out", str(paths["file"] / "sub")], "--out", capsys)
    _flag_error(bench_cli.main, ["--json", str(paths["empty"])], "--json", capsys)
    _flag_error(bench_cli.main, ["--rounds-md", str(paths["empty"])], "--rounds-md", capsys)


def test_bench_steps_beyond_the_models_training_timesteps(capsys, tmp_path):
    """Only the loaded scheduler knows the limit: still a flag error, before any solve."""
    line = _flag_error(bench_cli.main, ["--steps", "2000", "--no-progress", "--out", str(tmp_path)], "--steps", capsys)
    assert "1000" in line and not (tmp_path / "bench.json").exists()


# --------------------------------------------------------------------------------------------- invert
INVERT_CASES = [
    (["--threads", "0"], "--threads"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--num-images", "0"], "--num-images"),
    (["--budget", "0"], "--budget"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--thresholds", "1e-3", "0"], "--thresholds"),
    (["--adjoint-window", "0"], "--adjoint-window"),
    (["--device", "cuda:64"], "--device"),
    (["--negate"], "--negate"),
]


@pytest.mark.parametrize("argv, flag", INVERT_CASES, ids=[" ".join(a) for a, _ in INVERT_CASES])
def test_invert_bad_flag(argv, flag, capsys):
    _flag_error(invert_cli.main, argv, flag, capsys)


def test_invert_bad_images_and_paths(paths, capsys):
    assert "not a readable image" in _flag_error(invert_cli.main, ["--image", str(paths["file"])], "--image", capsys)
    assert "no such file" in _flag_error(invert_cli.main, ["--image", str(paths["missing"])], "--image", capsys)
    _flag_error(invert_cli.main, ["--out-dir", str(paths["file"])], "--out-dir", capsys)


def test_invert_num_images_with_image_is_refused(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "digit.png"
    Image.new("L", (8, 8)).save(png)
    _flag_error(invert_cli.main, ["--image", str(png), "--num-images", "2"], "--num-images", capsys)


@NO_CUDA
def test_invert_cuda_without_cuda(capsys):
    _flag_error(invert_cli.main, ["--device", "cuda"], "--device", capsys)


def test_invert_limits_known_after_loading(tmp_path, capsys):
    """``--steps`` beyond the model's 1000 training timesteps and more held-out digits than the test
    split has: errors naming the flag and the maximum (the latter was silently clamped)."""
    out = ["--out-dir", str(tmp_path)]
    assert "1000" in _flag_error(invert_cli.main, ["--steps", "2000", *out], "--steps", capsys)
    from deqkern.models import digits_dataset

    held_out = digits_dataset("test").shape[0]
    line = _flag_error(invert_cli.main, ["--num-images", "100000", *out], "--num-images", capsys)
    assert str(held_out) in line and not (tmp_path / "inversion.json").exists()


def test_invert_default_output_is_in_the_current_directory():
    """Not inside the installed package or the checkout (it was <checkout>/bench/results)."""
    parser = invert_cli.build_parser()
    out = parser.parse_args([]).out_dir
    assert out == Path("deqkern_invert_out") and not out.is_absolute()
    assert "current directory" in parser.format_help()


@pytest.mark.parametrize("module, argv, flag", [
    ("deqkern.bench", ["--max-iters", "0"], "--max-iters"),
    ("deqkern.invert", ["--lr", "-1"], "--lr"),
])
def test_real_process_prints_one_error_line(module, argv, flag):
    """As a user runs it: exit status 2, one ``error:`` line naming the flag on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"argument {flag}:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------------------- the helpers
def test_bounded_parses_and_checks():
    positive = Bounded(int, 1)
    assert positive("3") == 3 and positive.check("n", 3) == 3
    for text in ("0", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="an integer >= 1"):
            positive(text)
    unit = Bounded(float, 0.0, 1.0, lo_open=True)
    assert unit("1") == 1.0 and unit.check("p", torch.tensor(0.5, dtype=torch.float64)) == 0.5
    for bad in (0.0, 1.5, float("nan"), "0.5", True, torch.ones(2)):
        with pytest.raises(OptionError, match=r"^p: expected a finite number in \(0, 1\]"):
            unit.check("p", bad)


def test_device_and_output_types(tmp_path):
    assert device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a torch device"):
        device("gpu0")
    assert output_dir(str(tmp_path / "new" / "dir")) == tmp_path / "new" / "dir"
    assert output_file(str(tmp_path / "new" / "x.json")) == tmp_path / "new" / "x.json"
