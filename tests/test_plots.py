import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from udg_lib import io
from udg_lib.plots import (
    EXP1_STAGE,
    FIGURE2_TITLE,
    LLM_STAGE,
    ScoresError,
    figure2_systems,
    main,
    plot_similarity_histograms,
    rebuild_figure2,
    similarity_histogram,
)

# (pretrain, method, display label, mean similarity)
SYSTEMS = [
    ("plain_t5", "one_id", "Plain T5 / One-ID", 0.60),
    ("psp", "one_id", "PSP / One-ID", 0.50),
    ("psp", "lora", "PSP / LoRA", 0.40),
    ("ppp", "lora", "PPP / LoRA", 0.55),
    ("ppp", "full", "PPP / FULL", 0.50),
    ("plain_dialogue", "da", "Plain Dialogue / DA", 0.70),  # not a Figure 2 method: never a default
    ("none", "retrieval", "Retrieval floor", 0.30),
    ("llm", "smollm2-135m-chat", "SmolLM2-135M (chat)", 0.20),
]


def score_rows(similarities, dataset="chitchat", pretrain="psp", method="lora", system="PSP / LoRA"):
    return pd.DataFrame({
        "dataset": dataset, "split_set": 0, "user_id": "u1", "pair_id": [f"p{i}" for i in range(len(similarities))],
        "pretrain": pretrain, "method": method, "system": system, "generated": "g", "reference": "r",
        "similarity": similarities, "rouge_l": 0.1, "nll": np.nan, "n_tokens": np.nan,
    })


def small_scores(n=6, datasets=("chitchat", "seinfeld")):
    """Two datasets; every system's similarities spread evenly around its mean (so the means are exact)."""
    spread = np.linspace(-0.1, 0.1, n)
    frames = [score_rows(np.clip(mean + spread, -1, 1), dataset, *system)
              for dataset in datasets for *system, mean in SYSTEMS]
    # on seinfeld, PSP / LoRA beats PPP / LoRA: the best LoRA system is chosen per dataset
    scores = pd.concat(frames, ignore_index=True)
    scores.loc[(scores["dataset"] == "seinfeld") & (scores["system"] == "PSP / LoRA"), "similarity"] += 0.3
    return scores


def test_histogram_bins_at_the_boundaries():
    similarities = [-0.2, -0.01, 0.0, 0.19999, 0.2, 0.4, 0.6, 0.8, 0.99, 1.0, 1.00001]  # last: rounding overshoot
    table = similarity_histogram(score_rows(similarities))
    assert table["bin"].tolist() == ["[-0.2, 0.0)", "[0.0, 0.2)", "[0.2, 0.4)", "[0.4, 0.6)", "[0.6, 0.8)", "[0.8, 1.0]"]
    assert table["count"].tolist() == [2, 2, 1, 1, 1, 4]  # 0.2 opens [0.2, 0.4); 1.0 is in the last bin
    assert table["share"].tolist() == pytest.approx([2 / 11, 2 / 11, 1 / 11, 1 / 11, 1 / 11, 4 / 11])
    assert set(table["n_samples"]) == {11}


def test_histogram_gives_negative_similarities_their_own_bins_and_keeps_empty_bins():
    table = similarity_histogram(score_rows([-0.5, 0.3, 0.7]))
    assert table["bin_low"].tolist() == pytest.approx([-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8])
    assert table["count"].tolist() == [1, 0, 0, 0, 1, 0, 1, 0]
    assert table.loc[0, "bin"] == "[-0.6, -0.4)"
    quarters = similarity_histogram(score_rows([0.25, 0.5, 1.0]), bin_width=0.25)
    assert quarters["bin"].tolist()[-2:] == ["[0.50, 0.75)", "[0.75, 1.00]"]
    assert quarters["count"].tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="must divide 1"):
        similarity_histogram(score_rows([0.5]), bin_width=0.3)


def test_histogram_is_per_dataset_and_system_with_shares_summing_to_one():
    scores = small_scores()
    table = similarity_histogram(scores)
    assert len(table) == 2 * len(SYSTEMS) * table["bin"].nunique()
    per_system = table.groupby(["dataset", "system"])
    assert np.allclose(per_system["share"].sum(), 1.0)
    assert (per_system["count"].sum() == 6).all()
    # table order: fine-tuned by pre-training, then the floor, then the LLMs
    order = table.drop_duplicates("system")["system"].tolist()
    assert order[0] == "Plain T5 / One-ID" and order[-2:] == ["Retrieval floor", "SmolLM2-135M (chat)"]
    assert set(table.loc[table["system"] == "SmolLM2-135M (chat)", "kind"]) == {"prompt-based"}


@pytest.mark.parametrize(
    "change, fault",
    [
        (lambda s: s.drop(columns="similarity"), "missing column(s) ['similarity']"),
        (lambda s: s.assign(similarity=np.where(s.index == 3, 1.5, s["similarity"])), "row 3 (chitchat, PSP / LoRA): similarity must be"),
        (lambda s: s.assign(similarity=np.where(s.index == 2, np.nan, s["similarity"])), "row 2"),
        (lambda s: s.assign(pretrain=np.where(s.index == 0, "gpt", s["pretrain"])), "unknown value(s) ['gpt']"),
        (lambda s: s.assign(method=np.where(s.index == 0, "full", s["method"])), "one label names several systems"),
    ],
)
def test_bad_scores_get_a_clear_error(change, fault):
    with pytest.raises(ScoresError) as error:
        similarity_histogram(change(score_rows([0.1, 0.2, 0.3, 0.4])))
    assert fault in str(error.value)


def test_default_systems_are_the_llms_and_the_best_fine_tuned_system_per_method():
    chosen = figure2_systems(small_scores())
    assert chosen["chitchat"] == ["Plain T5 / One-ID", "PPP / LoRA", "PPP / FULL", "SmolLM2-135M (chat)"]
    assert chosen["seinfeld"] == ["Plain T5 / One-ID", "PSP / LoRA", "PPP / FULL", "SmolLM2-135M (chat)"]


def test_plot_has_one_labelled_panel_per_dataset():
    scores = small_scores()
    fig = plot_similarity_histograms(scores)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["chitchat", "seinfeld"]
    assert axes[0].get_ylabel() == "share of replies"
    assert all(ax.get_xlabel() == "similarity to reference" for ax in axes)
    legend = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert legend == ["Plain T5 / One-ID (n=6)", "PSP / LoRA (n=6)", "PPP / FULL (n=6)", "SmolLM2-135M (chat) (n=6)"]
    assert len(axes[0].patches) == 4 * len(axes[0].get_xticks())  # 4 systems x bins

    fig = plot_similarity_histograms(scores, systems=["Retrieval floor", "SmolLM2-135M (chat)"])
    assert [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()] == [
        "Retrieval floor (n=6)", "SmolLM2-135M (chat) (n=6)"]
    with pytest.raises(ValueError, match="no scores for system"):
        plot_similarity_histograms(scores, systems=["GPT3.5"])


@pytest.mark.parametrize("datasets", [("chitchat",), ("chitchat", "seinfeld", "tbbt")])
@pytest.mark.parametrize("systems", ["default", "all", "many long names"])
def test_figure2_fits_its_title_labels_and_legends_in_the_canvas(datasets, systems):
    scores = small_scores(datasets=datasets)
    if systems == "many long names":  # 16 systems with long labels: the legends outgrow a panel's height
        scores = pd.concat([score_rows(np.linspace(-0.3, 0.9, 7) * (i + 1) / 16, dataset, "psp", f"method_{i}",
                                       f"PSP / a fine-tuning method with a long name {i}")
                            for dataset in datasets for i in range(16)], ignore_index=True)
    chosen = None if systems == "default" else sorted(set(scores["system"]))
    fig = plot_similarity_histograms(scores, systems=chosen)
    fig.draw_without_rendering()

    canvas = fig.bbox_inches  # (0, 0) to the figure's size: what savefig writes
    tight = fig.get_tightbbox()  # every artist drawn, in inches
    assert canvas.x0 <= tight.x0 and tight.x1 <= canvas.x1 and canvas.y0 <= tight.y0 and tight.y1 <= canvas.y1, (
        tight.bounds, canvas.bounds)
    [title] = [t for t in fig.findobj(Text) if t.get_text() and t.get_text() == fig.get_suptitle()]
    title_box = title.get_window_extent()
    assert fig.bbox.x0 <= title_box.x0 and title_box.x1 <= fig.bbox.x1 and title_box.y1 <= fig.bbox.y1
    assert title.get_text().replace("\n", " ") == FIGURE2_TITLE
    for ax in fig.get_axes():  # the title, each panel and each legend stand apart
        boxes = [ax.get_window_extent(), ax.get_legend().get_window_extent()]
        assert not any(title_box.overlaps(box) for box in boxes), ax.get_title()
        assert not boxes[0].overlaps(boxes[1]), ax.get_title()


def write_score_files(outputs_dir, scores):
    llm = scores["pretrain"] == "llm"
    io.write_parquet(outputs_dir / EXP1_STAGE / "scores.parquet", scores[~llm])
    io.write_parquet(outputs_dir / LLM_STAGE / "scores.parquet", scores[llm])


def test_rebuild_figure2_writes_png_pdf_and_csv_from_saved_scores(tmp_path):
    scores = small_scores()
    write_score_files(tmp_path, scores)
    paths = rebuild_figure2(tmp_path)
    figures = tmp_path / LLM_STAGE / "figures"
    assert paths == [figures / "figure2.png", figures / "figure2.pdf", figures / "figure2_histogram.csv"]
    assert paths[0].read_bytes().startswith(b"\x89PNG") and paths[1].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in figures.iterdir()) == ["figure2.pdf", "figure2.png", "figure2_histogram.csv"]
    table = pd.read_csv(paths[2])
    expected = similarity_histogram(scores)
    assert table[["dataset", "system", "bin", "count"]].equals(expected[["dataset", "system", "bin", "count"]])
    drawn = table.loc[table["in_figure"], ["dataset", "system"]].drop_duplicates()
    assert len(drawn) == 8 and "Retrieval floor" not in set(drawn["system"])

    # only the LLM file: still a figure, in a folder of the caller's choosing
    (tmp_path / EXP1_STAGE / "scores.parquet").unlink()
    paths = rebuild_figure2(tmp_path, tmp_path / "elsewhere")
    assert all(p.parent == tmp_path / "elsewhere" and p.stat().st_size > 0 for p in paths)


def test_rebuild_figure2_names_the_missing_score_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        rebuild_figure2(tmp_path)
    assert str(tmp_path / EXP1_STAGE / "scores.parquet") in str(error.value)
    assert str(tmp_path / LLM_STAGE / "scores.parquet") in str(error.value)
    assert main(["--profile", "cpu", "--outputs-root", str(tmp_path)]) == 1
    assert not (tmp_path / LLM_STAGE).exists()


def test_cli_rebuilds_the_figure_without_loading_a_model_library(tmp_path):
    write_score_files(tmp_path, small_scores())
    # runs `python -m udg_lib.plots` in a fresh interpreter, then checks no model library was imported
    script = tmp_path / "run_cli.py"
    script.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["udg_lib.plots", "--profile", "cpu", "--outputs-root", {str(tmp_path)!r}]
        try:
            runpy.run_module("udg_lib.plots", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        loaded = sorted(m for m in ("torch", "transformers", "peft", "sentence_transformers") if m in sys.modules)
        assert not loaded, loaded
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / LLM_STAGE / "figures" / name)
                                     for name in ("figure2.png", "figure2.pdf", "figure2_histogram.csv")]
    # and the module runs as `python -m`
    result = subprocess.run([sys.executable, "-m", "udg_lib.plots", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--outputs-root" in result.stdout


def test_rows_scored_without_a_reply_are_not_plotted():
    scores = score_rows([0.1, 0.3, 0.5, 0.9])
    scores["generated"] = ["a", None, "b", None]  # stage 04 scored 4 pairs, generated 2
    scores.loc[scores["generated"].isna(), "similarity"] = np.nan
    table = similarity_histogram(scores)
    assert table["count"].sum() == 2 and set(table["n_samples"]) == {2}
    with pytest.raises(ScoresError, match="similarity must be a number"):  # a reply without similarity is a fault
        similarity_histogram(score_rows([0.1, np.nan]))
