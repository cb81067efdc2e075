"""A hostile user at every command line: corrupt files and bad flags, driven through each CLI's
real `main(argv)`. Every case must end in one `error:` line (argparse's own usage error counts:
it is the ecosystem's convention for a flag of the wrong type), a non-zero exit, no traceback,
and leave every file that existed before byte-identical with no half-written file visible."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import anomaly, evaluate, plot, sample, serve, train
from engine.checkpoint import save
from engine.models import build_model
from export import onnx as export_onnx

from .conftest import DATA_DIR, assert_intact, snapshot

CLIS: dict[str, Callable[[list[str]], int]] = {
    "sample": sample.main, "evaluate": evaluate.main, "export.onnx": export_onnx.main,
    "plot": plot.main, "anomaly": anomaly.main, "train": train.main,
    "serve": serve.main,
}
TRAIN = ["--data-dir", DATA_DIR, "--no-progress", "--max-steps", "1", "--hidden-dims", "16"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run dir (last/ of a tiny MLP VAE) with an ONNX export: built once, copied per case."""
    root = tmp_path_factory.mktemp("pristine")
    model = build_model("mlp", preset="mlp-mnist", hidden_dims=(16,), latent_dim=4)
    save(root / "run" / "last", model.eval(), train_config={"dataset": "mnist"})
    assert export_onnx.main([str(root / "run"), "--parity-batches", "1,3"]) == 0
    torch.save({"w": torch.zeros(2)}, root / "weights.pt")  # a pickle a user might try
    return root


@pytest.fixture
def world(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (257,), dtype=torch.uint8).numpy().tobytes())


def _encoder_as_decoder(w: Path) -> None:
    """The manifest lists only encoder.onnx, as the decoder (its size and hash are right)."""
    path = w / "run/export/manifest.json"
    data = json.loads(path.read_text())
    entry = {**data["artifacts"]["encoder.onnx"], "part": "decoder"}
    data["artifacts"] = {"encoder.onnx": entry}
    path.write_text(json.dumps(data))


def _edit_config(w: Path, **model: str) -> None:
    path = w / "run/last/config.json"
    config = json.loads(path.read_text())
    config["model"].update(model)
    path.write_text(json.dumps(config))


# (id, mutation of the world, cli, argv with {w} for the world's path)
CORRUPT = [
    ("truncated-weights-sample", lambda w: _truncate(w / "run/last/model.safetensors"),
     "sample", ["random", "{w}/run", "--n", "4", "--out", "{w}/s.png"]),
    ("truncated-weights-evaluate", lambda w: _truncate(w / "run/last/model.safetensors"),
     "evaluate", ["{w}/run", "--data-dir", DATA_DIR]),
    ("truncated-weights-export", lambda w: _truncate(w / "run/last/model.safetensors"),
     "export.onnx", ["{w}/run"]),
    ("garbage-weights-export", lambda w: _garbage(w / "run/last/model.safetensors"),
     "export.onnx", ["{w}/run"]),
    ("state-json-not-json", lambda w: (w / "run/last/state.json").write_text("{oops"),
     "sample", ["random", "{w}/run", "--n", "4", "--out", "{w}/s.png"]),
    ("config-json-missing", lambda w: (w / "run/last/config.json").unlink(),
     "sample", ["random", "{w}/run", "--n", "4", "--out", "{w}/s.png"]),
    ("config-unknown-family", lambda w: _edit_config(w, family="nope"),
     "export.onnx", ["{w}/run"]),
    ("truncated-onnx", lambda w: _truncate(w / "run/export/decoder.onnx"),
     "sample", ["random", "{w}/run/export", "--n", "4", "--out", "{w}/s.png"]),
    ("garbage-onnx-file", lambda w: _garbage(w / "run/export/decoder.onnx"),
     "sample", ["random", "{w}/run/export/decoder.onnx", "--n", "4", "--out", "{w}/s.png"]),
    ("manifest-not-json", lambda w: (w / "run/export/manifest.json").write_text("[1,"),
     "sample", ["random", "{w}/run/export", "--n", "4", "--out", "{w}/s.png"]),
    ("manifest-wrong-format", lambda w: (w / "run/export/manifest.json").write_text("{}"),
     "sample", ["random", "{w}/run/export", "--n", "4", "--out", "{w}/s.png"]),
    ("garbage-engine-file", lambda w: _garbage(w / "model.engine"),
     "sample", ["random", "{w}/model.engine", "--n", "4", "--out", "{w}/s.png"]),
    ("garbage-pt2-file", lambda w: _garbage(w / "model.pt2"),
     "sample", ["random", "{w}/model.pt2", "--n", "4", "--out", "{w}/s.png"]),
    ("pickle-given-to-sample", lambda w: None,
     "sample", ["random", "{w}/weights.pt", "--n", "4", "--out", "{w}/s.png"]),
    ("pickle-given-to-export", lambda w: None, "export.onnx", ["{w}/weights.pt"]),
    ("missing-run", lambda w: None, "export.onnx", ["{w}/nowhere"]),
    ("config-lies-about-latent-dim", lambda w: _edit_config(w, latent_dim=8),
     "sample", ["random", "{w}/run", "--n", "4", "--out", "{w}/s.png"]),
    ("config-lies-about-hidden-dims", lambda w: _edit_config(w, hidden_dims=[32]),
     "export.onnx", ["{w}/run"]),
    ("manifest-calls-the-encoder-a-decoder", _encoder_as_decoder,
     "sample", ["random", "{w}/run/export", "--n", "4", "--out", "{w}/s.png"]),
    ("crystal-csv-without-cif-column", lambda w: (w / "c.csv").write_text("a,b\n1,2\n"),
     "train", [*TRAIN, "--model", "crystal", "--dataset", "{w}/c.csv", "--out", "{w}/t"]),
    ("crystal-csv-garbage-cif", lambda w: (w / "c.csv").write_text('cif\n"not a cif"\n'),
     "train", [*TRAIN, "--model", "crystal", "--dataset", "{w}/c.csv", "--out", "{w}/t"]),
    ("crystal-csv-empty", lambda w: (w / "c.csv").write_text(""),
     "train", [*TRAIN, "--model", "crystal", "--dataset", "{w}/c.csv", "--out", "{w}/t"]),
    ("crystal-csv-gz-truncated", lambda w: (w / "c.csv.gz").write_bytes(b"\x1f\x8b\x08\x00ab"),
     "train", [*TRAIN, "--model", "crystal", "--dataset", "{w}/c.csv.gz", "--out", "{w}/t"]),
    ("garbage-latents-file", lambda w: _garbage(w / "z.safetensors"),
     "sample", ["decode", "{w}/z.safetensors", "--vae", "{w}/run", "--out", "{w}/dec"]),
    ("anomaly-report-not-json", lambda w: (w / "r.json").write_text("nope"),
     "anomaly", ["{w}/r.json"]),
    ("anomaly-report-of-another-shape",
     lambda w: (w / "r.json").write_text('{"anomaly": {"roc_auc": 0.5}}'),
     "anomaly", ["{w}/r.json"]),
    ("plot-not-a-run", lambda w: None, "plot", ["{w}/nowhere", "--curves-only"]),
]

BAD_FLAGS = [
    ("sample-n-0", "sample", ["random", "{w}/run/export", "--n", "0", "--out", "{w}/s.png"]),
    ("sample-n-negative", "sample", ["random", "{w}/run/export", "--n", "-3",
                                     "--out", "{w}/s.png"]),
    ("sample-n-float", "sample", ["random", "{w}/run/export", "--n", "2.5", "--out", "{w}/s.png"]),
    ("sample-batch-0", "sample", ["random", "{w}/run/export", "--batch-size", "0",
                                  "--out", "{w}/s.png"]),
    ("sample-nrow-0", "sample", ["random", "{w}/run/export", "--nrow", "0", "--out", "{w}/s.png"]),
    ("sample-unknown-backend", "sample", ["random", "{w}/run/export", "--backend", "tpu",
                                          "--out", "{w}/s.png"]),
    ("sample-bad-device", "sample", ["random", "{w}/run/export", "--device", "gpu",
                                     "--out", "{w}/s.png"]),
    ("sample-labels-unconditional", "sample", ["random", "{w}/run", "--labels", "3",
                                               "--out", "{w}/s.png"]),
    ("sample-unknown-image-suffix", "sample", ["random", "{w}/run/export", "--out", "{w}/s.xyz"]),
    ("sample-interpolate-bad-method", "sample", ["interpolate", "{w}/run", "--method", "cubic",
                                                 "--data-dir", DATA_DIR, "--out", "{w}/i.png"]),
    ("evaluate-batch-0", "evaluate", ["{w}/run", "--batch-size", "0", "--data-dir", DATA_DIR]),
    ("evaluate-unknown-dataset", "evaluate", ["{w}/run", "--dataset", "cifar99",
                                              "--data-dir", DATA_DIR]),
    ("export-opset-too-old", "export.onnx", ["{w}/run", "--opset", "9"]),
    ("export-opset-beyond-onnx", "export.onnx", ["{w}/run", "--opset", "99"]),
    ("export-opset-beyond-onnxruntime", "export.onnx", ["{w}/run", "--opset", "28"]),
    ("export-unknown-part", "export.onnx", ["{w}/run", "--parts", "wings"]),
    ("export-out-is-a-file", "export.onnx", ["{w}/run", "--out", "{w}/weights.pt"]),
    ("train-unknown-model", "train", [*TRAIN, "--model", "transformer9", "--out", "{w}/t"]),
    ("train-unknown-preset", "train", [*TRAIN, "--model", "mlp", "--preset", "huge",
                                       "--out", "{w}/t"]),
    ("train-unknown-dataset", "train", [*TRAIN, "--model", "mlp", "--dataset", "cifar99",
                                        "--out", "{w}/t"]),
    ("train-latent-dim-0", "train", [*TRAIN, "--model", "mlp", "--latent-dim", "0",
                                     "--out", "{w}/t"]),
    ("train-hidden-dims-text", "train", [*TRAIN, "--model", "mlp", "--hidden-dims", "a,b",
                                         "--out", "{w}/t"]),
    ("train-epochs-negative", "train", [*TRAIN, "--model", "mlp", "--epochs", "-1",
                                        "--out", "{w}/t"]),
    ("train-beta-negative", "train", [*TRAIN, "--model", "mlp", "--beta", "-1", "--out", "{w}/t"]),
    ("train-iw-samples-0", "train", [*TRAIN, "--model", "mlp", "--objective", "iwae",
                                     "--iw-samples", "0", "--out", "{w}/t"]),
    ("train-resume-nothing", "train", [*TRAIN, "--model", "mlp", "--resume", "--out", "{w}/t"]),
    ("train-out-is-a-file", "train", [*TRAIN, "--model", "mlp", "--out", "{w}/weights.pt"]),
    ("train-resume-and-overwrite", "train", [*TRAIN, "--model", "mlp", "--resume", "--overwrite",
                                             "--out", "{w}/run"]),
    ("train-conv-on-crystals", "train", [*TRAIN, "--model", "conv", "--dataset",
                                         "{w}/weights.pt", "--out", "{w}/t"]),
    ("sample-traverse-k-nan", "sample", ["traverse", "{w}/run", "--k", "nan",
                                         "--data-dir", DATA_DIR, "--out", "{w}/t.png"]),
    ("sample-grid-range-inf", "sample", ["grid", "{w}/run", "--range", "-inf", "3",
                                         "--out", "{w}/g.png"]),
    ("sample-out-is-a-folder", "sample", ["random", "{w}/run/export", "--out", "{w}/run"]),
    ("serve-threads-0", "serve", ["{w}/run/export", "--threads", "0"]),
    ("serve-device-typo", "serve", ["{w}/run/export", "--device", "gpu"]),
    ("serve-missing-artifact", "serve", ["{w}/nowhere"]),
    ("train-vq-with-iwae", "train", [*TRAIN, "--model", "vqvae", "--objective", "iwae",
                                     "--out", "{w}/t"]),
    ("train-vq-with-beta", "train", [*TRAIN, "--model", "vqvae", "--beta", "4", "--out", "{w}/t"]),
    ("train-crystal-with-tcvae", "train", [*TRAIN, "--model", "crystal", "--objective", "tcvae",
                                           "--dataset", DATA_DIR + "/perov_5", "--out", "{w}/t"]),
    ("train-triton-on-cpu-without-interpreter", "train", [*TRAIN, "--model", "mlp", "--kernels",
                                                          "triton", "--device", "cpu",
                                                          "--out", "{w}/t"]),
    ("train-unknown-compile-mode", "train", [*TRAIN, "--model", "mlp", "--compile",
                                             "--compile-mode", "fastest", "--out", "{w}/t"]),
    ("train-a-served-only-vae", "train", [*TRAIN, "--model", "autoencoder-tiny", "--out", "{w}/t"]),
    ("plot-max-images-0", "plot", ["{w}/run", "--max-images", "0", "--data-dir", DATA_DIR]),
]


def _run(cli: str, argv: list[str], w: Path, capsys) -> tuple[int, str]:
    argv = [a.replace("{w}", str(w)) for a in argv]
    try:
        code = CLIS[cli](argv)
    except SystemExit as e:  # argparse's usage error
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str) -> None:
    """One `error:` line (argparse prints its usage lines above its own `prog: error:` line)."""
    assert code != 0, "expected a non-zero exit"
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ") or ": error: " in x]
    assert len(errors) == 1, err
    if not errors[0].startswith("error: "):  # argparse: usage lines, then the error
        assert lines[0].startswith("usage:") and lines[-1] == errors[0], err
    else:
        assert len(lines) == 1, err


@pytest.mark.parametrize("case", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_files_end_in_one_line(world, capsys, case):
    _, mutate, cli, argv = case
    mutate(world)
    before = snapshot(world)
    code, err = _run(cli, argv, world, capsys)
    assert_one_error(code, err)
    assert_intact(world, before)


@pytest.mark.parametrize("case", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_flags_end_in_one_line(world, capsys, monkeypatch, case):
    _, cli, argv = case
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = snapshot(world)
    code, err = _run(cli, argv, world, capsys)
    assert_one_error(code, err)
    assert_intact(world, before)
