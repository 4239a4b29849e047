"""`tomoe report` on a tiny run: every section, real images, numbers that match the run, bad input, a headless browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tomoe.cli import main
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.report import DEFAULT_TEXT, build_report, collect, write_report
from tomoe.report.collect import jaccard_matrix, layer_active_ratios, union_coverage
from tomoe.run import TrainConfig, read_run
from tomoe.train import convert

SECTIONS = ("summary", "widths", "attention", "active", "overlap", "load", "tokens-view", "training")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Page(HTMLParser):
    """The parts of a report the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.tokens, self.external = [], [], [], []
        self.root: dict = {}  # attributes of <html>, where the page's script marks success or errors
        self._in_token = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.root = attrs
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "iframe") or (tag == "script" and "src" in attrs) or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append((tag, attrs))
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.tokens.append({"class": attrs["class"], "experts": [int(e) for e in attrs["data-e"].split()], "text": ""})
            self._in_token = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_token = False

    def handle_data(self, data):
        if self._in_token:
            self.tokens[-1]["text"] += data


def png_pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")


def assert_not_blank(pixels: np.ndarray) -> None:
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.shape[0] > 100 * 100
    non_white = (rgb < 0.95).any(axis=1).mean()
    colours = len(np.unique((rgb * 255).astype(np.uint8), axis=0))
    assert non_white > 0.02 and colours > 20, (non_white, colours)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_text_file) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    train = TrainConfig(model=str(tiny_model_dir), data=str(tiny_text_file), steps=20, seq_len=32, batch_size=2, save_every=10, log_every=2, eval_blocks=2)
    convert(run_dir, ToMoEConfig(attention="dynamic", num_experts=4), train, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    """(data, path) of the report of the tiny run with the built-in sample text."""
    data = collect(tiny_run)
    path = write_report(data, tmp_path_factory.mktemp("out") / "report.html")
    return data, path


def test_report_has_every_section_and_real_images(report):
    data, path = report
    page = Page(path.read_text())
    assert page.sections == list(SECTIONS)
    assert len(page.images) == 7  # widths, attention, active, overlap, overlap matrices, load, training
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert_not_blank(png_pixels(base64.b64decode(src.split(",", 1)[1])))
    assert page.external == []
    assert "http://" not in path.read_text() and "https://" not in path.read_text()
    assert path.stat().st_mode & 0o044  # readable by others: a page to share


def test_report_numbers_match_the_run(report, tiny_run):
    data, path = report
    result = read_run(tiny_run).result
    assert data.num_layers == 2 and data.num_experts == 4 and data.target_active == 0.5
    assert data.active_ratio == pytest.approx(result["active_ratio"], abs=1e-6)
    assert data.expert_widths == result["expert_widths"]
    assert data.qk_dims == result["qk_dims"] and data.vo_topk == result["vo_topk"]
    assert [int(m.sum(axis=1).max()) for m in data.expert_masks] == result["mlp_widths"]
    assert len(data.log) == 10 and data.log[-1]["step"] == 20
    # One span per token, each with its expert in every layer; together they give the sample text back.
    page = Page(path.read_text())
    assert len(page.tokens) == len(data.routing.tokens) > 20
    # Each token's experts are those the run's deterministic routing chooses for it, recomputed here.
    import torch

    from tomoe.run import load_run_for_inference

    model, tokenizer = load_run_for_inference(tiny_run)
    with torch.no_grad():
        model(torch.tensor([tokenizer(DEFAULT_TEXT)["input_ids"][: len(page.tokens)]]))
    routed = [one_hot[0].argmax(-1).tolist() for one_hot, _ in model.tomoe_routing.state.routes]
    assert [t["experts"] for t in page.tokens] == [list(experts) for experts in zip(*routed)]
    assert [t["experts"][1] for t in page.tokens] == data.routing.experts[1]
    assert all(t["class"] == f"tok e{t['experts'][0]}" for t in page.tokens)  # layer 0 shown before any JS runs
    assert "".join(t["text"] for t in page.tokens).strip() == DEFAULT_TEXT.strip()


def test_statistics():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    assert np.allclose(jaccard_matrix(masks), [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    assert union_coverage(masks) == 0.75
    from conftest import tiny_llama_config
    from tomoe.families import get_family

    config = tiny_llama_config()
    geometry = get_family(config).geometry(config)
    full = layer_active_ratios(geometry, [geometry.intermediate_size], [geometry.head_dim], [geometry.head_dim])
    assert full == [pytest.approx(1.0)]
    # nothing kept but v_proj, which is computed whole
    assert layer_active_ratios(geometry, [0], [0], [0]) == [pytest.approx(geometry.attention_params(0, 0) / geometry.dense_params_per_layer)]


def test_cli_report_with_user_text_is_escaped(tiny_run, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text("Ünïcode <script>alert('x')</script> & 日本語 text\nsecond line\n", encoding="utf-8")
    out = tmp_path / "mine.html"
    assert main(["report", str(tiny_run), "--text", str(text), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    html = out.read_text()
    assert "<script>alert" not in html and "&lt;" in html and "&amp;" in html  # the user's markup is shown, not run
    page = Page(html)
    assert "".join(t["text"] for t in page.tokens).strip() == text.read_text().strip()
    assert str(text) in html  # the caption names the user's file


@pytest.mark.parametrize("case", ["not-a-run", "missing-text", "empty-text", "out-is-dir"])
def test_bad_input_is_a_user_error(case, tiny_run, tmp_path, capsys):
    source, text, out = tiny_run, None, tmp_path / "r.html"
    if case == "not-a-run":
        source = tmp_path
    elif case == "missing-text":
        text = tmp_path / "nope.txt"
    elif case == "empty-text":
        text = tmp_path / "empty.txt"
        text.write_text("  \n")
    else:
        out = tmp_path
    args = ["report", str(source), "--out", str(out)] + (["--text", str(text)] if text else [])
    assert main(args) == 2
    message = capsys.readouterr().err
    assert message.startswith("tomoe report: error: ") and len(message.strip().splitlines()) == 1
    with pytest.raises(ToMoEError):
        build_report(source, out, text)


def test_unfinished_run_is_reported_from_its_checkpoint(tiny_run, tmp_path):
    run_dir = tmp_path / "unfinished"
    shutil.copytree(tiny_run, run_dir)
    values = json.loads((run_dir / "tomoe_run.json").read_text())
    values.update(status="running", result={})
    (run_dir / "tomoe_run.json").write_text(json.dumps(values))
    data = collect(run_dir)
    assert "unfinished" in data.details["note"]
    assert len(data.vo_topk) == 2 and data.target_active == 0.5
    page = Page(write_report(data, tmp_path / "r.html").read_text())
    assert page.sections == list(SECTIONS) and len(page.images) == 7


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    profile.mkdir()
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs /usr/bin/chromium (Debian: apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    data, path = report
    # The page logs nothing itself, so any console line (an uncaught error, a CSP refusal) is a failure.
    dom = _chromium(["--dump-dom", f"{path.as_uri()}#layer=1"], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    page = Page(dom.stdout)
    assert page.root.get("data-ready") == "yes" and "data-js-error" not in page.root, page.root
    # The layer selector works: #layer=1 opened layer 1, and every token is coloured by its layer-1 expert.
    assert [t["class"] for t in page.tokens] == [f"tok e{e}" for e in data.routing.experts[1]]

    shot = tmp_path / "shot.png"
    result = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", path.as_uri()], tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []
    assert_not_blank(png_pixels(shot.read_bytes()))


def test_report_of_exported_model_matches_its_run(tiny_run, report, tmp_path):
    from tomoe.export import export_run

    exported = export_run(tiny_run, tmp_path / "moe")
    data = collect(exported)
    run_data, _ = report
    assert data.kind == "model" and data.num_experts == run_data.num_experts
    assert data.expert_widths == run_data.expert_widths
    assert all((a == b).all() for a, b in zip(data.expert_masks, run_data.expert_masks))
    assert data.routing.experts == run_data.routing.experts  # the exported routers route the sample the same way
    assert data.vo_topk == run_data.vo_topk
    page = Page(write_report(data, tmp_path / "moe.html").read_text())
    assert page.sections[:-1] == list(SECTIONS)[:-1]  # no training log for a model folder
