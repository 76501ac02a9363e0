"""The fp4c command line: every command's --help, demo, quantize, backends, bench, and
one-line errors (exit status 2) for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fp4_compile import cli  # noqa: E402
from fp4_compile.checkpoint import load_nvfp4, nvfp4_linear_shapes  # noqa: E402
from fp4_compile.demo import build_demo_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("demo", "quantize", "inspect", "bench", "tune", "backends")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A small bf16 Llama-style model directory with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("dense")
    model = build_demo_model(hidden_size=64, num_layers=1, vocab_size=128, seed=3)
    model.save_pretrained(path)
    words = ["<unk>"] + [f"w{i}" for i in range(127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fp4_compile", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fp4c {command}")


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "fp4c demo" in out


def test_backends_table(capsys):
    code, out, _ = run(capsys, "backends", "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["backend", "semantics", "requires", "available", "reason"]
    emulation = next(line for line in lines if line.startswith("emulation"))
    assert "W4A4" in emulation and "yes" in emulation
    assert any(line.startswith("marlin") and "W4A16" in line for line in lines)
    assert "selected on cpu: emulation" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_says_so(capsys):
    code, out, err = run(capsys, "bench")
    assert code == 2 and out == ""
    assert "need a CUDA GPU" in err and "nothing was run" in err


@pytest.mark.parametrize("argv", [
    ("quantize", "{missing}", "{out}"),
    ("quantize", "{empty}", "{out}"),
    ("demo", "--model", "{empty}"),
    ("inspect", "--model", "{file}"),
    ("demo", "--model", "{no_weights}"),
])
def test_not_a_model_is_one_line_exit_2(capsys, tmp_path, argv):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    paths = {k: str(tmp_path / k) for k in ("missing", "empty", "file", "no_weights", "out")}
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("[fp4c]")]  # progress lines aside
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"fp4c {argv[0]}: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (("--dynamic", "--format", "modelopt"), "needs calibrated (static) activation scales"),
    (("--max-shard-size", "bogus"), "--max-shard-size 'bogus'"),
    (("--ignore", "re:["), "not a regular expression"),
    (("--backend", "nope"), "unknown NVFP4 backend"),
])
def test_quantize_refuses_bad_options_before_loading(capsys, tmp_path, options, message):
    """Refused in one line before SRC is read (here SRC does not even exist), not after minutes of loading,
    calibrating and quantizing."""
    code, _, err = run(capsys, "quantize", str(tmp_path / "missing"), str(tmp_path / "out"), *options)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_quantize_with_calibration_text(capsys, dense_dir, tmp_path):
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 127, (600,), generator=g)))
    out = tmp_path / "nvfp4"
    code, stdout, err = run(capsys, "quantize", str(dense_dir), str(out), "--calib-file", str(text),
                            "--num-samples", "4", "--seq-len", "32", "-q")
    assert code == 0, err
    assert "wrote" in stdout and "static activation scales" in stdout
    assert "4 sequences of 32 tokens" in err
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    model = load_nvfp4(out, device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "NVFP4Linear"]
    assert len(layers) == 7 and all(m.input_global_scale is not None for m in layers)
    # OUT exists now: a second run refuses without --overwrite
    code, _, err = run(capsys, "quantize", str(dense_dir), str(out), "-q")
    assert code == 2 and "already exists" in err


def test_quantize_modelopt_random_tokens(capsys, dense_dir, tmp_path):
    out = tmp_path / "mo"
    code, stdout, err = run(capsys, "quantize", str(dense_dir), str(out), "--format", "modelopt",
                            "--num-samples", "2", "--seq-len", "16", "-q")
    assert code == 0, err
    assert (out / "hf_quant_config.json").is_file()
    assert load_nvfp4(out, device="cpu").fp4_checkpoint["format"] == "modelopt"
    # `fp4c tune --model` takes the same linears' shapes from the checkpoint's config as from the model's
    model = build_demo_model(hidden_size=64, num_layers=1, vocab_size=128, seed=3)
    expected = sorted({(m.out_features, m.in_features) for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name != "lm_head"})
    assert len(expected) >= 3
    assert nvfp4_linear_shapes(dense_dir) == expected
    assert nvfp4_linear_shapes(out) == expected


def test_quantize_needs_a_tokenizer_for_text(capsys, tmp_path):
    src = tmp_path / "src"
    build_demo_model(hidden_size=64, num_layers=1, vocab_size=128).save_pretrained(src)
    (tmp_path / "calib.txt").write_text("hello")
    code, _, err = run(capsys, "quantize", str(src), str(tmp_path / "out"), "--calib-file",
                       str(tmp_path / "calib.txt"), "-q")
    assert code == 2 and "needs a tokenizer" in err
    assert not (tmp_path / "out").exists()


def test_interrupted_quantize_leaves_no_output(capsys, dense_dir, tmp_path, monkeypatch):
    from fp4_compile import checkpoint

    def interrupted(tensors, directory, max_shard_size):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.save, "_write_shards", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(dense_dir), str(out), "--num-samples", "2", "--seq-len", "16", "-q")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary directory


def test_demo_prints_the_table(capsys):
    code, out, err = run(capsys, "demo", "--hidden-size", "64", "--layers", "1", "--vocab-size", "128",
                         "--batch", "2", "--seq-len", "16", "--calib-batches", "2", "--iters", "1",
                         "--compile", "eager", "-q")
    assert code == 0, err
    for row in ("NVFP4 GEMM backend", "why", "torch.compile backend", "weight memory", "agreement vs bf16 (eager)",
                "agreement vs bf16 (compiled)", "forward time"):
        assert row in out
    assert "emulation (W4A4" in out or torch.cuda.is_available()
    assert "7 static (calibrated), 0 dynamic" in out


def test_demo_on_an_nvfp4_checkpoint(capsys, dense_dir, tmp_path):
    out = tmp_path / "nvfp4"
    assert run(capsys, "quantize", str(dense_dir), str(out), "--dynamic", "-q")[0] == 0
    code, stdout, err = run(capsys, "demo", "--model", str(out), "--batch", "2", "--seq-len", "16", "--iters", "1",
                            "--compile", "none", "-q")
    assert code == 0, err
    assert "NVFP4 compressed-tensors" in stdout and "0 static (calibrated), 7 dynamic" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu(capsys):
    code, _, err = run(capsys, "demo", "--device", "cuda", "-q")
    assert code == 2 and "no CUDA GPU" in err


def test_demo_rejects_bad_numbers(capsys):
    code, _, err = run(capsys, "demo", "--hidden-size", "100")
    assert code == 2 and "multiple of 64" in err
    code, _, err = run(capsys, "demo", "--backend", "nonsense", "--compile", "none", "--hidden-size", "64",
                       "--layers", "1", "--vocab-size", "64", "-q")
    assert code == 2 and "unknown NVFP4 backend 'nonsense'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_gpu_says_so(capsys):
    code, out, err = run(capsys, "tune", "--shapes", "4096x4096", "1024x4096")
    assert code == 2 and out == ""
    assert err.startswith("fp4c tune: error: ") and "torch sees none" in err


@pytest.mark.parametrize("argv, message", [
    (("--shapes", "4096"), "is not NxK"),
    (("--shapes", "4096x100"), "multiple of 16"),
    (("--shapes", "4096x4096", "--ms", "16,32"), "17..512"),
    (("--shapes", "4096x4096", "--ms", "32,a"), "comma-separated"),
    (("--shapes", "4096x4096", "--modes", "w4a8"), "--modes"),
    (("--shapes", "4096x4096", "--rounds", "0"), "--rounds"),
    (("--shapes", "4096x4096", "--margin", "-0.1"), "--margin"),
    (("--model", "{missing}"), "no such directory"),
])
def test_tune_rejects_bad_input_in_one_line(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, "tune", *(a.format(missing=tmp_path / "missing") for a in argv))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("fp4c tune: error: ") and message in err


def test_tune_needs_a_model_or_shapes(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["tune"])
    assert info.value.code == 2 and "one of the arguments --model --shapes is required" in capsys.readouterr().err


def test_bench_stages_are_run_gpu_sh_stages():
    """`fp4c bench --skip` offers exactly the benchmark stages that run_gpu.sh can skip."""
    script = (Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu.sh").read_text()
    stages = re.findall(r"if ! skip (\w+); then", script)
    assert tuple(s for s in stages if s not in cli.TEST_STAGES) == cli.BENCH_STAGES
    assert set(stages) - set(cli.BENCH_STAGES) == set(cli.TEST_STAGES)
