"""examples/regularization_gallery.py end to end in quick mode: the table and the picture
are written, the numbers are reproducible from the seed, and early stopping reports the
restored epoch."""

import importlib.util
import math
import pathlib
import sys

import pytest

pytest.importorskip("sklearn", reason="the gallery trains on scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the gallery draws its curves with matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gallery():
    spec = importlib.util.spec_from_file_location(
        "regularization_gallery", ROOT / "examples" / "regularization_gallery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _numbers(results):
    """Everything a run reports except its wall times."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results]


def _rows(markdown):
    """The table's data rows, split into cells, without the time column."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")][:-1] for ln in lines[1:]]


def test_gallery_quick_mode_writes_table_and_png_reproducibly(gallery, tmp_path):
    first = gallery.main(["--quick", "--out", str(tmp_path / "a")])
    second = gallery.main(["--quick", "--out", str(tmp_path / "b")])

    assert [r["key"] for r in first] == gallery.QUICK
    for name in ("a", "b"):
        png = (tmp_path / name / "gallery.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    md = (tmp_path / "a" / "gallery.md").read_text()
    rows = _rows(md)
    assert [r[0] for r in rows] == [r["title"] for r in first]
    assert all(len(r) == 9 for r in rows), rows
    assert "--quick" in md

    # same seed, same numbers: curves, accuracies, norms, sparsity, epochs
    assert _numbers(first) == _numbers(second)
    assert rows == _rows((tmp_path / "b" / "gallery.md").read_text())

    by_key = {r["key"]: r for r in first}
    for r in first:
        assert r["epochs"] == gallery.QUICK_EPOCHS
        assert all(len(c) == r["epochs"] for c in r["curves"].values())
        assert all(math.isfinite(x) for c in r["curves"].values() for x in c)
        assert r["curves"]["val_loss"][-1] < r["curves"]["val_loss"][0], r["key"]
        assert r["val_acc"] > 0.3, f"{r['key']} did not learn: {r['val_acc']}"   # chance: 0.1
    assert by_key["l1"]["sparsity"] > 0 and by_key["none"]["sparsity"] == 0
    assert by_key["dropout"]["curves"] != by_key["none"]["curves"]
    stop = by_key["early-stopping"]
    assert stop["val_loss"] == min(stop["curves"]["val_loss"]), "the best epoch is restored"
    assert stop["best_epoch"] == stop["curves"]["val_loss"].index(stop["val_loss"])


def test_gallery_numbers_depend_on_the_seed(gallery):
    variant = {v.key: v for v in gallery.VARIANTS}["dropout"]
    a, _ = gallery.run([variant], 1, seed=0)
    b, _ = gallery.run([variant], 1, seed=1)
    c, _ = gallery.run([variant], 1, seed=0)
    assert _numbers(a) == _numbers(c)
    assert _numbers(a) != _numbers(b)


def test_early_stopping_variant_stops_and_restores(gallery):
    """With noisy labels the validation loss turns up after a few dozen epochs."""
    variant = gallery.Variant("es", "es", "patience 3", patience=3)
    with gallery.thread_limit(1):
        r = gallery.train(variant, gallery.load_data(0), gallery.EPOCHS, 0)
    assert r["epochs"] < gallery.EPOCHS, "early stopping never stopped"
    assert r["epochs"] == r["best_epoch"] + 1 + 3          # patience epochs after the best
    assert r["val_loss"] == min(r["curves"]["val_loss"])
    assert r["val_loss"] < r["curves"]["val_loss"][-1]


def test_gallery_rejects_unknown_variants(gallery, capsys):
    with pytest.raises(SystemExit):
        gallery.main(["--variants", "none,bagging"])
    assert "unknown variants ['bagging']" in capsys.readouterr().err
