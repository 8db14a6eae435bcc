import io

import pytest
import tqdm.notebook
import tqdm.std

from udg_lib.progress import PROGRESS_ENV, progress_bar, settle_stream_outputs, settle_widget_bars


def stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


TABLE = {"output_type": "display_data", "data": {"text/plain": "a table"}, "metadata": {}}


def test_text_bars_where_the_runner_asks_for_them(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "text")
    out = io.StringIO()
    bar = progress_bar(range(3), desc="users", file=out)
    assert type(bar) is tqdm.std.tqdm and not isinstance(bar, tqdm.notebook.tqdm)
    assert list(bar) == [0, 1, 2]
    assert out.getvalue().rsplit("\r", 1)[-1].startswith("users: 100%|##########| 3/3")  # ascii: StringIO


def test_outside_a_notebook_the_bar_is_tqdms_own(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    with progress_bar(total=2, file=io.StringIO()) as bar:  # tqdm.auto: the text bar outside a kernel
        bar.update(2)
    assert isinstance(bar, tqdm.std.tqdm) and bar.n == 2


def test_a_text_bar_keeps_its_last_state():
    bar = [stream("stderr", "\rgen:   0%|          | 0/13"), stream("stderr", "\rgen:  46%|████▌     | 6/13"),
           stream("stderr", "\rgen: 100%|██████████| 13/13"), stream("stderr", "\n")]
    assert settle_stream_outputs(bar) == [stream("stderr", "gen: 100%|██████████| 13/13\n")]


def test_a_bar_interrupted_by_other_outputs_keeps_its_last_state_and_the_order():
    outputs = [stream("stdout", "start\n"), stream("stderr", "\rgen:   0%| 0/2"), stream("stdout", "user a\n"),
               stream("stderr", "\rgen:  50%| 1/2"), TABLE, stream("stderr", "\rgen: 100%| 2/2\n"),
               stream("stdout", "done\n")]
    assert settle_stream_outputs(outputs) == [
        stream("stdout", "start\n"), stream("stdout", "user a\n"), TABLE, stream("stderr", "gen: 100%| 2/2\n"),
        stream("stdout", "done\n"),
    ]
    assert outputs[1] == stream("stderr", "\rgen:   0%| 0/2")  # the caller's list is left as it was


@pytest.mark.parametrize(
    ("texts", "settled"),
    [
        (["a\nb\n", "c\n"], "a\nb\nc\n"),  # plain lines are joined, nothing lost
        (["line\n\rx 0%", "\rx 100%\n"], "line\nx 100%\n"),  # only the unfinished line is rewritten
        (["abc\r", "def\n"], "def\n"),  # a carriage return at the end of one output, text in the next
        (["ends with a windows newline\r\n"], "ends with a windows newline\r\n"),
    ],
)
def test_carriage_returns_resolve_as_a_terminal_shows_them(texts, settled):
    assert settle_stream_outputs([stream("stderr", text) for text in texts]) == [stream("stderr", settled)]


def widget_bar_notebook(value: float, total: float) -> dict:
    """An executed notebook with one tqdm widget bar, as nbclient saves it: the view in the output (its text
    fallback the bar's first state) and the last state of its models in the metadata."""
    def model(name: str, **state) -> dict:
        return {"model_module": "@jupyter-widgets/controls", "model_name": name, "state": state}

    left = "Loading\u2007weights:\u2007100%" if value == total else "Loading\u2007weights:\u2007\u200750%"
    models = {
        "box": model("HBoxModel", children=["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]),
        "left": model("HTMLModel", value=left),
        "bar": model("FloatProgressModel", value=value, max=total, bar_style="success"),
        "right": model("HTMLModel", value=f"\u2007{value:.0f}/{total:.0f}\u2007[00:00&lt;00:00,\u20073388.36it/s]"),
        "slider": model("IntSliderModel", value=3),
    }
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    return {
        "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": models}}},
        "cells": [{"cell_type": "code", "outputs": [
            {"output_type": "display_data", "metadata": {}, "data": {
                "application/vnd.jupyter.widget-view+json": view,
                "text/plain": ["Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]"]}},
            {"output_type": "display_data", "metadata": {}, "data": {
                "application/vnd.jupyter.widget-view+json": {**view, "model_id": "slider"}, "text/plain": "IntSlider"}},
        ]}],
    }


def test_a_widget_bar_of_another_library_gets_its_last_state_as_its_text_fallback():
    notebook = widget_bar_notebook(272, 272)
    assert settle_widget_bars(notebook) == 1
    bar, slider = (output["data"] for output in notebook["cells"][0]["outputs"])
    assert bar["text/plain"] == "Loading weights: 100%|██████████| 272/272 [00:00<00:00, 3388.36it/s]"
    assert "application/vnd.jupyter.widget-view+json" in bar  # still a widget where the notebook is trusted
    assert slider["text/plain"] == "IntSlider"  # not a tqdm bar: left alone

    stopped = widget_bar_notebook(136, 272)  # a loop that stopped halfway reads so
    settle_widget_bars(stopped)
    assert stopped["cells"][0]["outputs"][0]["data"]["text/plain"].startswith("Loading weights:  50%|█████     | 136/272")
    assert settle_widget_bars({"cells": stopped["cells"], "metadata": {}}) == 0  # no saved state: nothing to read
